"""A model's inference call (``training=False``, no autograd) in the fastest form each
backend offers; the execution layer (``execution.py``) picks the torch mode and keeps the
functions."""

from __future__ import annotations

import contextlib

from ._active import BACKEND

if BACKEND == "torch":
    import torch
elif BACKEND == "jax":
    import jax
elif BACKEND == "tensorflow":
    import tensorflow as tf

#: the torch modes of an inference function that compile in well under a second per path
#: (``"compile"`` is accepted too: ``graphs.MODES``)
INFERENCE_GRAPHS = ("trace", "eager")


def inference_fn(model, graph: str = "trace", *, compile_mode=None, autocast=None):
    """``fn(*inputs) -> model(list(inputs), training=False)``, compiled where that pays.

    torch: ``"trace"`` a ``torch.jit.trace`` of the path per input shape
    (``graphs.traced_call``), replayed on the CPU one chunk of the batch per torch thread
    (``graphs.batch_parallel``); ``"compile"`` ``torch.compile`` with ``compile_mode``
    (``graphs.compiled_call``); ``"eager"`` an eager call. All without autograd, under
    ``autocast()`` if given (a context factory: mixed precision).
    jax: ``jax.jit`` of ``stateless_call`` with the model's current variable values passed
    in on each call (later ``assign``s are seen). tensorflow: a ``tf.function`` graph
    (variables are captured by reference). Each distinct input shape compiles once.
    """
    if BACKEND == "jax":
        trainable = model.trainable_variables
        state = model.non_trainable_variables

        @jax.jit
        def pure(trainable_values, state_values, inputs):
            out, _ = model.stateless_call(trainable_values, state_values, list(inputs),
                                          training=False)
            return out

        def call(*inputs):
            return pure([v.value for v in trainable], [v.value for v in state], inputs)

        return call

    if BACKEND == "tensorflow":

        @tf.function
        def call(*inputs):
            return model(list(inputs), training=False)

        return call

    from .graphs import batch_parallel, forward_fn

    autocast = autocast or contextlib.nullcontext
    if graph == "trace":
        traced = forward_fn(model, "trace", training=False)

        def replay(*inputs):
            # grad mode and autocast are per thread: set them where the call runs
            with torch.no_grad(), autocast():
                return traced(*inputs)

        def traced_fn(*inputs):
            with torch.no_grad():  # the grad mode needs_tracing keys on
                return batch_parallel(replay, traced.needs_tracing, *inputs)

        return traced_fn

    forward = forward_fn(model, graph, training=False, compile_mode=compile_mode)
    cuda_graphs = graph == "compile" and compile_mode == "reduce-overhead"

    def call(*inputs):
        with torch.no_grad(), autocast():
            if cuda_graphs:
                # a CUDA graph's output buffer is rewritten by its next replay: a new step
                # begins with each call, and the caller gets its own copy
                torch.compiler.cudagraph_mark_step_begin()
                return forward(*inputs).clone()
            return forward(*inputs)

    return call
