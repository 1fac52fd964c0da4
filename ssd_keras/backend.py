"""Backend-specific code: the only module that imports torch/jax/tensorflow.

Everything else in ``ssd_keras`` uses ``keras.ops`` and stays backend-agnostic; where a
backend has a much faster native kernel than the generic ``keras.ops`` composition, the
dispatch lives here, next to a generic fallback that computes the same thing.
"""

import keras
from keras import ops

BACKEND = keras.backend.backend()

if BACKEND == "torch":
    import torch
    import torch.nn.functional as _torch_F


# ---------------------------------------------------------------------------------------
# Group normalization (used by ssd_keras.nn.layers.GroupNorm)
# ---------------------------------------------------------------------------------------


def group_norm(x, groups, gamma, beta, epsilon=1e-5):
    """Group normalization of a channels-last tensor ``x`` (N, ..., C).

    Statistics are taken per sample over all spatial positions and the ``C // groups``
    channels of each group (biased variance), as ``torch.nn.GroupNorm``; then the
    per-channel affine ``gamma``, ``beta`` (shape (C,)) is applied. No dtype casting
    happens here: the caller decides the compute dtype (the GroupNorm layer uses float32).

    On torch, ``torch.nn.functional.group_norm`` runs on the channels-last view of ``x``
    (``movedim`` is free, and torch's channels-last CPU/GPU kernels need no copy); the
    generic ``keras.ops`` version with reshapes and NHWC<->NCHW copies cost ~30% of a
    training step there (DESIGN.md). Other backends use the generic version, which
    their compilers fuse.
    """
    if BACKEND == "torch" and isinstance(x, torch.Tensor):
        y = _torch_F.group_norm(torch.movedim(x, -1, 1), groups, gamma, beta, epsilon)
        return torch.movedim(y, 1, -1)
    return _group_norm_generic(x, groups, gamma, beta, epsilon)


def _group_norm_generic(x, groups, gamma, beta, epsilon=1e-5):
    shape = ops.shape(x)
    channels = shape[-1]
    grouped = ops.reshape(x, (shape[0], -1, groups, channels // groups))
    mean, var = ops.moments(grouped, axes=(1, 3), keepdims=True)
    y = (grouped - mean) * ops.rsqrt(var + epsilon)
    y = ops.reshape(y, shape)
    return y * gamma + beta


# ---------------------------------------------------------------------------------------
# Gradient steps (used by ssd_keras.train)
# ---------------------------------------------------------------------------------------


def no_grad():
    """A context in which tensor arithmetic records no autograd graph (torch only)."""
    if BACKEND == "torch":
        return torch.no_grad()
    import contextlib

    return contextlib.nullcontext()


def make_loss_and_grads(path_model, loss_fn):
    """``fn(x, t, target, weight) -> (loss, grads)`` for one Flexi-UNet path.

    ``grads`` are in the order of ``path_model.trainable_variables`` (exactly the path's
    variables); ``loss_fn(prediction, target, weight)`` returns a scalar. Non-trainable
    state the path updates (e.g. dropout seeds) is written back to its variables.
    """
    variables = path_model.trainable_variables

    if BACKEND == "torch":

        def loss_and_grads(x, t, target, weight):
            for v in variables:
                v.value.grad = None
            loss = loss_fn(path_model([x, t], training=True), target, weight)
            loss.backward()
            return loss.detach(), [v.value.grad for v in variables]

        return loss_and_grads

    if BACKEND == "tensorflow":
        import tensorflow as tf

        def loss_and_grads(x, t, target, weight):
            with tf.GradientTape() as tape:
                loss = loss_fn(path_model([x, t], training=True), target, weight)
            return loss, tape.gradient(loss, variables)

        return loss_and_grads

    if BACKEND == "jax":
        import jax

        state_vars = path_model.non_trainable_variables

        def pure(trainable, state, x, t, target, weight):
            pred, new_state = path_model.stateless_call(trainable, state, [x, t], training=True)
            return loss_fn(pred, target, weight), new_state

        grad_fn = jax.jit(jax.value_and_grad(pure, has_aux=True))

        def loss_and_grads(x, t, target, weight):
            (loss, new_state), grads = grad_fn(
                [v.value for v in variables], [v.value for v in state_vars], x, t, target, weight
            )
            for v, value in zip(state_vars, new_state):
                v.assign(value)
            return loss, grads

        return loss_and_grads

    raise NotImplementedError(f"training is not supported on the {BACKEND!r} backend")


def apply_gradients(optimizer, grads, variables):
    """``optimizer.apply`` on the given variables only (others stay bit-identical)."""
    with no_grad():
        optimizer.apply(grads, variables)
