"""Gradient finiteness and loss-scale unscaling, and reading a step's scalars back: one
implementation for ``train.on_nonfinite`` and the float16 loss scale
(``ssd_keras.training.step`` and ``training/loss_scale.py``; docs/math.md)."""

from __future__ import annotations

from keras import ops

from ._active import BACKEND

if BACKEND == "torch":
    import torch
elif BACKEND == "jax":
    import jax
elif BACKEND == "tensorflow":
    import tensorflow as tf


def unscale_and_check(grads, inv_scale: float):
    """``(grads * inv_scale, found)``: the gradients unscaled and a float32 scalar tensor
    on their device, 1.0 if any gradient element is inf or NaN, else 0.0.

    Nothing is read back to the host here: the caller fetches ``found`` with the loss in
    one transfer (``to_host``), so the check adds no device synchronisation to a step.
    ``None`` entries (variables without a gradient) pass through. torch: in place, one
    multi-tensor kernel (``torch._amp_foreach_non_finite_check_and_unscale_``, the one
    ``torch.amp.GradScaler`` runs). jax and tensorflow: one compiled function per list of
    gradient shapes, returning new tensors.
    """
    present = [g for g in grads if g is not None]
    if BACKEND == "torch":
        device = present[0].device if present else torch.device("cpu")
        found = torch.zeros(1, dtype=torch.float32, device=device)
        if present:
            inv = torch.full((1,), float(inv_scale), dtype=torch.float32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(present, found, inv)
        return list(grads), found[0]
    if not present:
        return list(grads), ops.convert_to_tensor(0.0, dtype="float32")
    fn = _JAX_UNSCALE if BACKEND == "jax" else _TF_UNSCALE
    unscaled, found = fn(present, ops.convert_to_tensor(float(inv_scale), dtype="float32"))
    unscaled = iter(unscaled)
    return [None if g is None else next(unscaled) for g in grads], found


def _unscale_generic(grads, inv):
    finite = [ops.all(ops.isfinite(g)) for g in grads]
    found = ops.cast(ops.logical_not(ops.all(ops.stack(finite))), "float32")
    return [g * ops.cast(inv, g.dtype) for g in grads], found


if BACKEND == "jax":
    _JAX_UNSCALE = jax.jit(_unscale_generic)
elif BACKEND == "tensorflow":
    _TF_UNSCALE = tf.function(_unscale_generic, reduce_retracing=True)


def to_host(scalars) -> list[float]:
    """The values of device scalar tensors as Python floats, in one device-to-host transfer
    (a step's loss and its flags: the only synchronisation of a step on a GPU)."""
    if BACKEND == "torch":
        return torch.stack([torch.as_tensor(s).reshape(()).to(torch.float32)
                            for s in scalars]).tolist()
    if BACKEND == "jax":
        return [float(v) for v in jax.device_get(list(scalars))]
    return [float(v) for v in ops.convert_to_numpy(
        ops.stack([ops.cast(ops.reshape(s, ()), "float32") for s in scalars]))]


def float16_unsupported() -> str | None:
    """Why ``mixed_float16`` cannot train here, or ``None``: jax's CPU backend has no
    float16 matrix product with float32 accumulation (what Keras asks of it)."""
    if BACKEND == "jax" and jax.default_backend() == "cpu":
        return ("jax's CPU backend has no float16 matrix product with float32 accumulation; "
                "on the CPU use mixed_bfloat16 or float32 (float16 needs a GPU under jax)")
    return None
