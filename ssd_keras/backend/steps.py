"""One training step's framework calls on one Flexi-UNet path, per Keras backend:
the loss and its gradients, the optimizer update on the path's variables only, the EMA.

torch runs autograd over a forward function chosen by the execution layer (eager,
replayed ``torch.jit.trace`` or ``torch.compile``, ``execution.py``); jax compiles the
gradient (``jax.jit`` of ``value_and_grad`` over ``stateless_call``) and the optimizer
update (``jax.jit`` of ``optimizer.apply`` inside a ``StatelessScope``) once per path;
tensorflow traces both into ``tf.function`` graphs once per path. Only the path's
variables and their optimizer slots change: every other variable stays bit-identical on
all three backends.

Random numbers: the training and sampling noise of ``ssd_keras`` is drawn with numpy on
the host, so it is identical on every backend. Dropout (``model.dropout > 0``) draws from
Keras's ``SeedGenerator``, whose streams differ between backends; on jax its state is
threaded through ``stateless_call`` explicitly, so each step gets fresh masks.
"""

from __future__ import annotations

import contextlib
import weakref

import keras
from keras import ops

from ._active import BACKEND

if BACKEND == "torch":
    import torch
elif BACKEND == "jax":
    import jax
elif BACKEND == "tensorflow":
    import tensorflow as tf


def no_grad():
    """A context in which tensor arithmetic records no autograd graph (torch only)."""
    if BACKEND == "torch":
        return torch.no_grad()
    return contextlib.nullcontext()


def make_loss_and_grads(path_model, loss_fn, graph: str = "eager", *, forward=None,
                        autocast=None, numerics=None):
    """``fn(*inputs, target, weight) -> (loss, grads)`` for one Flexi-UNet path, whose
    model takes ``inputs`` (``x_t, t`` today).

    ``grads`` are in the order of ``path_model.trainable_variables`` (exactly the path's
    variables); ``loss_fn(prediction, target, weight)`` returns a scalar. ``target`` and
    ``weight`` stay inputs of every call (never constants of a trace or compiled graph).
    Non-trainable state the path updates (dropout seed states) is written back to its
    variables, so consecutive calls draw fresh dropout masks on every backend. Shapes are
    static per path, so jax and tensorflow compile once per path (on the first call).

    torch: the forward pass is ``forward(*inputs)`` if given (the execution layer passes a
    traced or compiled one, ``execution.Execution``), else the eager Keras call (``graph``
    names a mode of ``graphs.forward_fn``); autograd records it, under ``autocast()`` (a
    context factory: mixed precision) if given; the loss is taken outside it, in float32.
    ``numerics()`` (a context factory, e.g. TF32 on CUDA) wraps the whole call: forward,
    loss and backward.
    """
    variables = path_model.trainable_variables

    if BACKEND == "torch":
        if forward is None:
            from .graphs import forward_fn

            forward = forward_fn(path_model, graph, training=True)
        autocast = autocast or contextlib.nullcontext
        numerics = numerics or contextlib.nullcontext

        def loss_and_grads(*args):
            *inputs, target, weight = args
            for v in variables:
                v.value.grad = None
            with numerics():
                with autocast():
                    prediction = forward(*inputs)
                loss = loss_fn(prediction, target, weight)
                loss.backward()
            return loss.detach(), [v.value.grad for v in variables]

        return loss_and_grads

    if BACKEND == "tensorflow":

        @tf.function
        def loss_and_grads(*args):
            *inputs, target, weight = args
            with tf.GradientTape() as tape:
                loss = loss_fn(path_model(list(inputs), training=True), target, weight)
            return loss, tape.gradient(loss, variables)

        return loss_and_grads

    if BACKEND == "jax":
        state_vars = path_model.non_trainable_variables

        def pure(trainable, state, inputs, target, weight):
            pred, new_state = path_model.stateless_call(trainable, state, list(inputs),
                                                        training=True)
            return loss_fn(pred, target, weight), new_state

        grad_fn = jax.jit(jax.value_and_grad(pure, has_aux=True))

        def loss_and_grads(*args):
            *inputs, target, weight = args
            (loss, new_state), grads = grad_fn(
                [v.value for v in variables], [v.value for v in state_vars], tuple(inputs),
                target, weight)
            for v, value in zip(state_vars, new_state):
                v.assign(value)
            return loss, grads

        return loss_and_grads

    raise NotImplementedError(f"training is not supported on the {BACKEND!r} backend")


def ema_update(ema, variables, rate: float) -> list:
    """``ema * rate + weights * (1 - rate)`` for every (EMA tensor, variable) pair; returns
    the new EMA tensors.

    torch: one in-place multi-tensor ``lerp`` over all pairs (``torch._foreach_lerp_``,
    the kernel ``torch.optim`` uses), instead of three tensor ops per variable: at the
    quickstart's size the per-variable version cost ~10 ms a step (docs/design.md "Speed").
    ``lerp`` with weight ``1 - rate`` is the same average up to rounding, and equals the
    weights exactly at ``rate = 0``. Other backends return new tensors.
    """
    if BACKEND == "torch":
        with torch.no_grad():
            torch._foreach_lerp_(list(ema), [v.value for v in variables], 1.0 - float(rate))
        return ema
    return [e * rate + ops.stop_gradient(v.value) * (1.0 - rate) for e, v in zip(ema, variables)]


# {optimizer: {tuple of variable ids: compiled update}} of callers that pass no cache; an
# entry dies with its optimizer (nothing is set on the optimizer itself)
_APPLY_FNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def apply_gradients(optimizer, grads, variables, cache: dict | None = None):
    """``optimizer.apply(grads, variables)`` on the given variables only.

    Every other model variable and every optimizer slot of another variable stays
    bit-identical (weight decay included); the optimizer's step counter advances. On jax
    and tensorflow the update is compiled once per variable subset (i.e. per path) and
    kept in ``cache`` ({tuple of variable ids: update}; the execution layer passes its
    own, else a module-level one per optimizer).
    """
    variables = list(variables)
    if BACKEND == "torch":
        with torch.no_grad():
            optimizer.apply(grads, variables)
        return
    if BACKEND not in ("jax", "tensorflow"):
        optimizer.apply(grads, variables)
        return
    if cache is None:
        cache = _APPLY_FNS.setdefault(optimizer, {})
    key = tuple(id(v) for v in variables)
    if key not in cache:
        make = _jax_apply_fn if BACKEND == "jax" else _tf_apply_fn
        cache[key] = make(optimizer, variables)
    cache[key](list(grads))


def _tf_apply_fn(optimizer, variables):
    optimizer = weakref.proxy(optimizer)  # the cache may be keyed by it: no strong reference

    @tf.function
    def apply(grads):
        optimizer.apply(grads, variables)

    return apply


def _jax_apply_fn(optimizer, variables):
    """A jitted ``optimizer.apply`` on ``variables`` run statelessly.

    The function takes the current values of the path's variables and of all optimizer
    variables and returns the new path values and the optimizer variables the update
    changed (found while tracing: the others come back as the very input tracer), so
    off-path optimizer slots are neither copied nor written.
    """
    opt_vars = list(optimizer.variables)
    optimizer = weakref.proxy(optimizer)  # the cache may be keyed by it: no strong reference
    changed: list[int] = []  # indices into opt_vars, filled while tracing

    def pure(values, opt_values, grads):
        mapping = list(zip(variables, values)) + list(zip(opt_vars, opt_values))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            old_opt = [scope.get_current_value(v) for v in opt_vars]
            optimizer.apply(grads, variables)
        new_values = [scope.get_current_value(v) for v in variables]
        new_opt = [scope.get_current_value(v) for v in opt_vars]
        changed[:] = [i for i, (new, old) in enumerate(zip(new_opt, old_opt)) if new is not old]
        return new_values, [new_opt[i] for i in changed]

    jitted = jax.jit(pure)

    def apply(grads):
        new_values, new_opt = jitted(
            [v.value for v in variables], [v.value for v in opt_vars], grads
        )
        for v, value in zip(variables, new_values):
            v.assign(value)
        for i, value in zip(changed, new_opt):
            opt_vars[i].assign(value)

    return apply
