"""torch: how one call of a Keras model runs — eager, a replayed ``torch.jit.trace``, or
``torch.compile`` — and the CPU workers that split a sampling batch over threads.

``forward_fn(model, graph, training)`` is ``fn(*inputs) -> model(list(inputs),
training=training)`` in one of these modes; ``ssd_keras.backend.execution`` picks the
mode for the device and keeps the functions. Nothing here is set on a model or tensor.
"""

from __future__ import annotations

import os
import threading
import warnings

from ._active import BACKEND

if BACKEND == "torch":
    import torch

#: the torch modes of a path's forward function ("auto" is resolved by execution.py)
MODES = ("eager", "trace", "compile")


def forward_fn(model, graph: str = "eager", *, training: bool = False, compile_mode=None):
    """``fn(*inputs) -> model(list(inputs), training=training)`` run as ``graph`` says:
    ``"eager"`` the Keras call, ``"trace"`` a replayed ``torch.jit.trace`` per input shape
    (``traced_call``), ``"compile"`` ``torch.compile`` (``compiled_call``, with
    ``compile_mode``, e.g. ``"reduce-overhead"`` for CUDA graphs)."""
    if graph == "trace":
        return traced_call(model, training=training)
    if graph == "compile":
        return compiled_call(model, training=training, mode=compile_mode)
    if graph != "eager":
        raise ValueError(f"unknown graph mode {graph!r}; valid: {', '.join(MODES)}")
    return lambda *inputs: model(list(inputs), training=training)


class _Forward(torch.nn.Module if BACKEND == "torch" else object):
    """A torch module whose ``forward(*inputs)`` is the Keras model's call (what the
    tracer and the compiler see)."""

    def __init__(self, keras_model, training: bool):
        super().__init__()
        self.keras_model = keras_model
        self.training_call = training

    def forward(self, *inputs):
        return self.keras_model(list(inputs), training=self.training_call)


def compiled_call(model, training: bool = False, mode=None):
    """``model(list(inputs), training=training)`` through ``torch.compile`` (TorchDynamo
    captures the Keras call, inductor generates the kernels; autograd differentiates the
    compiled graph, so the backward pass is compiled too).

    ``dynamic=False``: a path sees one input shape per batch size, and each shape gets
    its own specialised graph, as each gets its own trace. The parameters are read live
    (dynamo guards on them as module state), so later ``assign``s are seen.
    """
    return torch.compile(_Forward(model, training), mode=mode, dynamic=False)


def traced_call(model, training: bool = False):
    """torch: ``model(list(inputs), training=training)`` replayed from a ``torch.jit.trace``
    per input shape, with no Python (Keras's per-layer bookkeeping) between the kernels.

    A trace replays the ops of one call. That is sound for the Flexi-UNet's paths, whose
    control flow depends on shapes and configuration only (never on tensor values), as
    long as no dropout is active (its masks would be frozen). Each distinct input shape
    gets its own trace. Without autograd a trace holds the convolution weights as they
    were (``kernels._oihw``'s cached copies), so every call compares the parameters'
    ``_version`` counters with those at tracing time and traces anew after an ``assign``
    (e.g. fresh EMA weights); with autograd it reads the parameters themselves. The first
    call of each shape also runs the model eagerly and keeps the trace only if both agree
    within 1e-5; otherwise (an op the tracer froze or could not record) it warns and that
    shape stays eager.
    """
    wrapper = _Forward(model, training)
    traces: dict = {}
    params = [v.value for v in model.variables]
    traced_at: list = [None]  # the parameters' versions the traces were made with

    def key_of(inputs):
        grad = torch.is_grad_enabled()
        if not grad:
            versions = tuple(p._version for p in params)
            if versions != traced_at[0]:
                traces.clear()
                traced_at[0] = versions
        return tuple((tuple(a.shape), a.dtype) for a in inputs) + (grad,)

    def call(*inputs):
        key = key_of(inputs)
        # optimized_execution(False): TorchScript's profiling executor would re-specialise
        # and fuse the graph on its first calls, which cost seconds per call here (the
        # plain interpreter runs a 32 px path at half the eager time from the 2nd call)
        with torch.jit.optimized_execution(False):
            fn = traces.get(key)
            if fn is not None:
                return fn(*inputs)
            eager = wrapper(*inputs)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    traced = torch.jit.trace(wrapper, inputs, check_trace=False)
                with torch.no_grad():
                    ok = bool(torch.allclose(traced(*inputs), eager.detach(), rtol=0.0, atol=1e-5))
            except Exception as exc:  # an op the tracer cannot record
                traced, ok = None, False
                why = f"{type(exc).__name__}: {exc}"
            else:
                why = "the trace's output differs from the eager one"
            if not ok:
                warnings.warn(f"running {model.name} eagerly for inputs {key[0][0]}: tracing "
                              f"failed ({why.splitlines()[0][:200]})", stacklevel=2)
            traces[key] = traced if ok else wrapper
            return eager

    def needs_tracing(*inputs) -> bool:
        """Whether the next call with inputs shaped as ``inputs`` (under the current grad
        mode) traces, or runs eagerly because tracing failed for that shape."""
        return traces.get(key_of(inputs), wrapper) is wrapper

    call.needs_tracing = needs_tracing
    return call


def batch_parallel(fn, needs_tracing, *inputs):
    """``fn(*inputs)`` for a batch on the CPU, split over torch's threads (inter-op
    parallelism).

    Under ``OMP_WAIT_POLICY=PASSIVE`` every multi-threaded op of a small batch pays for
    waking the other thread, which cost as much as the second thread saved (a 32 px path at
    batch 8: 44 ms on one thread, 43 ms on two). Splitting the batch into one chunk per
    thread, each run single-threaded by ``CpuWorkers``, keeps every core busy without
    those wake-ups: 1.45x faster per path here (docs/design.md "Speed"). Each image's
    computation is independent of the others', so the result is the unsplit one up to
    float rounding (oneDNN may choose another kernel for another batch size; a given
    batch and thread count always gives the same result). Chunks whose shape is not
    traced yet (``needs_tracing``) run here, in order, so that tracing and its eager
    check stay on the calling thread; GPU tensors and single images are not split.
    """
    x = inputs[0]
    if not isinstance(x, torch.Tensor) or x.device.type != "cpu":
        return fn(*inputs)
    k = min(torch.get_num_threads(), int(x.shape[0]))
    if k < 2:
        return fn(*inputs)
    columns = [torch.tensor_split(a, k) for a in inputs]  # one tuple of k chunks per input
    chunks = list(zip(*columns))
    if any(needs_tracing(*c) for c in chunks):
        return torch.cat([fn(*c) for c in chunks])
    return torch.cat(list(CpuWorkers.get(k).map(fn, *columns)))


class CpuWorkers:
    """``k`` threads that each run torch ops single-threaded, shared by every model (a
    forked child starts its own: it has none of its parent's threads)."""

    _pools: dict = {}

    @classmethod
    def get(cls, k: int):
        if k not in cls._pools:
            cls._pools[k] = cls._start(k)
        return cls._pools[k]

    @staticmethod
    def _start(k: int):
        from concurrent.futures import ThreadPoolExecutor

        threads = torch.get_num_threads()
        started = threading.Barrier(k + 1)

        def single_threaded():
            # torch sets a thread's counts on its first parallel op from a process-wide
            # value (which the caller gets back below): take that first, then go to one
            torch.get_num_threads()
            torch.set_num_threads(1)  # this thread's OpenMP and MKL thread counts
            started.wait()

        pool = ThreadPoolExecutor(k, thread_name_prefix="ssd-inference", initializer=single_threaded)
        waiting = [pool.submit(lambda: None) for _ in range(k)]  # start all k threads now
        started.wait()
        for f in waiting:
            f.result()
        # torch.set_num_threads also sets the count that threads started later begin
        # with: give that back to the caller's
        torch.set_num_threads(threads)
        return pool


if BACKEND == "torch":
    os.register_at_fork(after_in_child=CpuWorkers._pools.clear)
