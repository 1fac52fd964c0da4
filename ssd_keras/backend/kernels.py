"""Layer kernels of the Flexi-UNet: one branch per Keras backend where torch gains from
its own op (channels-last convolutions, fused group norm, ``addmm``, strided attention),
the generic ``keras.ops`` version elsewhere (docs/design.md "Speed").
"""

from __future__ import annotations

from keras import ops

from ._active import BACKEND

if BACKEND == "torch":
    import torch
    import torch.nn.functional as _torch_F
    from torch.utils.weak import WeakIdKeyDictionary

    # {conv kernel tensor: (its _version, its channels-last OIHW copy)}; an entry dies
    # with its tensor (no attribute is set on the tensor itself)
    _OIHW_CACHE = WeakIdKeyDictionary()


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
    training step there (docs/design.md). Other backends use the generic version, which
    their compilers fuse.
    """
    if BACKEND == "torch" and isinstance(x, torch.Tensor):
        y = _torch_F.group_norm(torch.movedim(x, -1, 1), groups, gamma, beta, epsilon)
        return torch.movedim(y, 1, -1)
    return _group_norm_generic(x, groups, gamma, beta, epsilon)


def conv2d(x, kernel, bias, strides=1, padding=0):
    """2-D convolution of channels-last ``x`` (N, H, W, C_in) with a Keras kernel
    (kh, kw, C_in, C_out), ``padding`` zeros on every side (torch's ``padding=``), plus
    ``bias``; returns (N, H', W', C_out).

    On torch the NHWC tensor *is* a channels-last NCHW tensor: ``permute`` views it so
    without a copy, and oneDNN convolves channels-last natively (faster on CPU than NCHW:
    docs/design.md "Speed") with the bias fused and returns a channels-last result, which
    ``permute`` views back as contiguous NHWC. Keras's own torch convolution copied to
    contiguous NCHW and back around every call and added the bias separately.
    """
    if BACKEND == "torch" and isinstance(x, torch.Tensor):
        y = _torch_F.conv2d(torch.permute(x, (0, 3, 1, 2)), _oihw(_torch_value(kernel)),
                            _torch_value(bias), strides, padding)
        return torch.permute(y, (0, 2, 3, 1))
    if padding and strides == 1 and 2 * padding + 1 == kernel.shape[0]:
        y = ops.conv(x, kernel, strides=1, padding="same")
    else:
        if padding:
            x = ops.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
        y = ops.conv(x, kernel, strides=strides, padding="valid")
    return y + bias


def dense(x, kernel, bias):
    """``x @ kernel + bias`` over the last axis: one ``addmm`` on torch, which reads the
    Keras kernel (in, out) as it is stored (``F.linear`` wants (out, in) and copied its
    output back for 3-D inputs)."""
    if BACKEND == "torch" and isinstance(x, torch.Tensor):
        kernel = _torch_value(kernel)
        y = torch.addmm(_torch_value(bias), x.reshape(-1, x.shape[-1]), kernel)
        return y.reshape(*x.shape[:-1], kernel.shape[-1])
    return ops.matmul(x, kernel) + bias


def upsample_nearest_2x(x):
    """Nearest-neighbour 2x upsampling of channels-last ``x`` (one pass on torch)."""
    if BACKEND == "torch" and isinstance(x, torch.Tensor):
        y = _torch_F.interpolate(torch.permute(x, (0, 3, 1, 2)), scale_factor=2.0, mode="nearest")
        return torch.permute(y, (0, 2, 3, 1))
    return ops.repeat(ops.repeat(x, 2, axis=1), 2, axis=2)


def scale_shift(h, scale, shift):
    """``h * (1 + scale) + shift`` (ADM's scale-shift norm); one ``addcmul`` on torch."""
    if BACKEND == "torch" and isinstance(h, torch.Tensor):
        return torch.addcmul(shift, h, 1.0 + scale)
    return h * (1.0 + scale) + shift


def attention_legacy_qkv(qkv, scale):
    """Multi-head attention from a (B, L, heads, 3, ch) tensor of ``[q|k|v]`` per head
    (ADM's legacy layout); returns (B, L, heads, ch).

    On torch ``scaled_dot_product_attention`` reads q, k and v as strided views of
    ``qkv``, so no per-head copy is made (``ops.dot_product_attention`` made q, k and v
    contiguous first); elsewhere ``ops.dot_product_attention``.
    """
    if BACKEND == "torch" and isinstance(qkv, torch.Tensor):
        q, k, v = (torch.select(qkv, 3, i).transpose(1, 2) for i in range(3))  # (B, heads, L, ch)
        return _torch_F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2)
    q, k, v = qkv[:, :, :, 0, :], qkv[:, :, :, 1, :], qkv[:, :, :, 2, :]
    return ops.dot_product_attention(q, k, v, scale=scale)


def _oihw(kernel):
    """A Keras conv kernel (kh, kw, in, out) as the (out, in, kh, kw) weight torch wants.

    A permuted view would do, but for a channels-last input the convolution copies the
    weight to channels-last memory on every call, and each such copy wakes the OpenMP
    threads (~0.1 ms under PASSIVE, up to 30 times per forward of a small path). Without
    autograd (sampling) that copy is made once per weight value and kept (``_OIHW_CACHE``, weakly
    keyed by the tensor) until the weight changes (its ``_version``); with autograd the view is passed, as the
    copy must then be part of the differentiated graph anyway.
    """
    view = torch.permute(kernel, (3, 2, 0, 1))
    if (torch.is_grad_enabled() and kernel.requires_grad) or torch.compiler.is_compiling():
        return view  # under torch.compile inductor chooses the weight layout itself
    hit = _OIHW_CACHE.get(kernel)
    if hit is not None and hit[0] == kernel._version:
        return hit[1]
    weight = view.detach().contiguous(memory_format=torch.channels_last)
    _OIHW_CACHE[kernel] = (kernel._version, weight)
    return weight


def _torch_value(v):
    """The torch tensor behind a Keras variable (read through ``.value``, so autocast
    applies under mixed precision), or ``v`` itself."""
    return v.value if hasattr(v, "value") and not isinstance(v, torch.Tensor) else v


def _group_norm_generic(x, groups, gamma, beta, epsilon=1e-5):
    shape = ops.shape(x)
    channels = shape[-1]
    grouped = ops.reshape(x, (shape[0], -1, groups, channels // groups))
    mean, var = ops.moments(grouped, axes=(1, 3), keepdims=True)
    y = (grouped - mean) * ops.rsqrt(var + epsilon)
    y = ops.reshape(y, shape)
    return y * gamma + beta


