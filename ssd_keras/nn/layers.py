"""ADM (guided-diffusion) UNet blocks as Keras 3 layers, channels-last (NHWC).

Each block mirrors a module of guided-diffusion's ``unet.py`` (Dhariwal & Nichol 2021)
and names its sub-layers after that module's children, with ``_`` in place of ``.``
(torch-backend Keras registers variables as torch parameters, whose names may not hold
dots). A guided-diffusion state dict maps onto the Keras variables by path: replace
``/`` and every ``_<digits>`` by ``.<digits>``, e.g. ``input_blocks_1_0/in_layers_2/kernel``
<- ``input_blocks.1.0.in_layers.2.weight`` (conv kernels transposed OIHW -> HWIO; the
attention ``qkv``/``proj_out`` 1x1 conv1d weights become Dense kernels; GroupNorm
``gamma``/``beta`` <- ``weight``/``bias``). Two containers repeat their prefix:
``time_embed/time_embed_0`` <- ``time_embed.0`` and ``out/out_0`` <- ``out.0``.

Mixed precision: layers take a Keras dtype policy (``dtype=``). Group normalization and
the sinusoidal timestep features always compute in float32 (as ADM's ``GroupNorm32``);
every other op runs in the policy's compute dtype, variables stay float32.

Initialization follows PyTorch's defaults (kaiming-uniform with a=sqrt(5), i.e.
``VarianceScaling(1/3, "fan_in", "uniform")``) for kernels; biases start at zero (PyTorch
draws them uniformly, an irrelevant difference), and the convs ADM zero-initializes
(``zero_module``) start at zero: the last conv of every ResBlock, the attention output
projection and the output head's conv.
"""

import math
import random

import keras
from keras import ops

from ssd_keras.backend import (
    attention_legacy_qkv,
    conv2d,
    dense,
    group_norm,
    scale_shift,
    upsample_nearest_2x,
)


def torch_default_init():
    """Kernel initializer equal in distribution to PyTorch's default for Conv/Linear."""
    return keras.initializers.VarianceScaling(
        scale=1.0 / 3.0, mode="fan_in", distribution="uniform"
    )


def _conv(filters, kernel_size, name, dtype, zero=False, strides=1):
    return Conv(filters, kernel_size, strides=strides, zero_init=zero, name=name, dtype=dtype)


def _dense(units, name, dtype, zero=False):
    return Linear(units, zero_init=zero, name=name, dtype=dtype)


class _Configured(keras.layers.Layer):
    """A layer whose ``get_config`` adds its constructor arguments named in
    ``config_keys`` (attributes of the same names) to Keras's own."""

    config_keys: tuple = ()

    def get_config(self):
        return {**super().get_config(), **{k: getattr(self, k) for k in self.config_keys}}


@keras.saving.register_keras_serializable(package="ssd_keras")
class Conv(_Configured):
    """2-D convolution of a channels-last tensor with torch's padding (``kernel_size // 2``
    on every side; ADM's ``conv_nd(..., padding=1)`` and its stride-2 ``Downsample``).

    Holds ``kernel`` (kh, kw, in, out) and ``bias`` (out,), the variables of
    ``keras.layers.Conv2D`` under the same names, and computes through
    ``ssd_keras.backend.conv2d`` (on torch: one oneDNN channels-last convolution, bias
    included, no layout copies; docs/design.md "Speed").
    """

    config_keys = ("filters", "kernel_size", "strides", "zero_init")

    def __init__(self, filters, kernel_size, strides=1, zero_init=False, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.kernel_size = int(kernel_size)
        self.strides = int(strides)
        self.zero_init = bool(zero_init)

    def build(self, input_shape):
        k, init = self.kernel_size, "zeros" if self.zero_init else torch_default_init()
        self.kernel = self.add_weight(shape=(k, k, int(input_shape[-1]), self.filters),
                                      initializer=init, name="kernel")
        self.bias = self.add_weight(shape=(self.filters,), initializer="zeros", name="bias")

    def call(self, x):
        return conv2d(x, self.kernel, self.bias, self.strides, self.kernel_size // 2)

    def compute_output_shape(self, input_shape):
        def out(n):
            if n is None:
                return None
            p = self.kernel_size // 2
            return (n + 2 * p - self.kernel_size) // self.strides + 1

        return (input_shape[0], out(input_shape[1]), out(input_shape[2]), self.filters)


@keras.saving.register_keras_serializable(package="ssd_keras")
class Linear(_Configured):
    """``x @ kernel + bias`` over the last axis (``keras.layers.Dense``'s variables)."""

    config_keys = ("units", "zero_init")

    def __init__(self, units, zero_init=False, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        self.zero_init = bool(zero_init)

    def build(self, input_shape):
        init = "zeros" if self.zero_init else torch_default_init()
        self.kernel = self.add_weight(shape=(int(input_shape[-1]), self.units),
                                      initializer=init, name="kernel")
        self.bias = self.add_weight(shape=(self.units,), initializer="zeros", name="bias")

    def call(self, x):
        return dense(x, self.kernel, self.bias)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)


@keras.saving.register_keras_serializable(package="ssd_keras")
class GroupNorm(_Configured):
    """GroupNorm(groups) over the last axis, computed in float32 (ADM's GroupNorm32).

    ``gamma``/``beta`` are float32 and never autocast; the output is cast back to the
    input's dtype. The kernel is ``ssd_keras.backend.group_norm`` (native torch kernel
    on torch, ``keras.ops`` elsewhere).
    """

    config_keys = ("groups", "epsilon")

    def __init__(self, groups=32, epsilon=1e-5, **kwargs):
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self.groups = int(groups)
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels % self.groups:
            raise ValueError(
                f"GroupNorm '{self.name}': {channels} channels are not divisible "
                f"into {self.groups} groups"
            )
        self.gamma = self.add_weight(
            shape=(channels,), initializer="ones", name="gamma", autocast=False
        )
        self.beta = self.add_weight(
            shape=(channels,), initializer="zeros", name="beta", autocast=False
        )

    def call(self, x):
        dtype = x.dtype
        y = group_norm(
            ops.cast(x, "float32"),
            self.groups,
            ops.cast(self.gamma, "float32"),
            ops.cast(self.beta, "float32"),
            self.epsilon,
        )
        return ops.cast(y, dtype)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="ssd_keras")
class TimestepEmbedding(_Configured):
    """ADM ``timestep_embedding`` (cos | sin, max_period 10000) then ``time_embed`` MLP.

    ``t`` (B,) holds the original timestep indices as floats; the sinusoids are computed
    in float32 whatever the policy (bfloat16 cannot even represent t = 999 exactly).
    Sub-layers: ``time_embed.0`` (Dense), SiLU, ``time_embed.2`` (Dense).
    """

    config_keys = ("model_channels", "embed_dim", "max_period")

    def __init__(self, model_channels, embed_dim, max_period=10000.0, **kwargs):
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        if model_channels % 2:
            raise ValueError("TimestepEmbedding: model_channels must be even")
        self.model_channels = int(model_channels)
        self.embed_dim = int(embed_dim)
        self.max_period = float(max_period)
        self.linear_0 = _dense(self.embed_dim, "time_embed_0", self.dtype_policy)
        self.linear_2 = _dense(self.embed_dim, "time_embed_2", self.dtype_policy)

    def build(self, t_shape):
        self.linear_0.build((None, self.model_channels))
        self.linear_2.build((None, self.embed_dim))

    def sinusoids(self, t):
        half = self.model_channels // 2
        freqs = ops.exp(
            ops.arange(half, dtype="float32") * (-math.log(self.max_period) / half)
        )
        args = ops.cast(t, "float32")[:, None] * freqs[None, :]
        return ops.concatenate([ops.cos(args), ops.sin(args)], axis=-1)

    def call(self, t):
        emb = ops.cast(self.sinusoids(t), self.compute_dtype)
        return self.linear_2.call(ops.silu(self.linear_0.call(emb)))


@keras.saving.register_keras_serializable(package="ssd_keras")
class ClassEmbedding(_Configured):
    """ADM's ``label_emb`` (``nn.Embedding(num_classes, time_embed_dim)``): one learned
    row per class, looked up by an integer label ``y`` (B,) and added to the time
    embedding by the Flexi-UNet. ``rows`` may hold one more row than the classes, the
    learned "no class" row of classifier-free guidance (docs/sampling.md).

    Holds ``embeddings`` (rows, embed_dim), initialised N(0, 1) as torch's ``Embedding``.
    """

    config_keys = ("rows", "embed_dim")

    def __init__(self, rows, embed_dim, **kwargs):
        super().__init__(**kwargs)
        self.rows = int(rows)
        self.embed_dim = int(embed_dim)

    def build(self, y_shape):
        self.embeddings = self.add_weight(
            shape=(self.rows, self.embed_dim),
            initializer=keras.initializers.RandomNormal(stddev=1.0), name="embeddings")

    def call(self, y):
        return ops.take(ops.cast(self.embeddings, self.compute_dtype), ops.cast(y, "int32"), axis=0)

    def compute_output_shape(self, y_shape):
        return (y_shape[0], self.embed_dim)


@keras.saving.register_keras_serializable(package="ssd_keras")
class ResBlock(_Configured):
    """ADM ResBlock with scale-shift norm, called as ``block(x, emb, training=...)``.

    ``h = conv3x3(SiLU(GN(x)))``; ``scale, shift = Dense(SiLU(emb))``;
    ``h = conv3x3_zero(dropout(SiLU(GN(h) * (1 + scale) + shift)))``; returns
    ``skip(x) + h`` with ``skip`` a 1x1 conv when the channel count changes.
    Sub-layer names: ``in_layers.0`` (GN), ``in_layers.2`` (conv), ``emb_layers.1``
    (Dense), ``out_layers.0`` (GN), ``out_layers.2`` (Dropout), ``out_layers.3`` (conv),
    ``skip_connection`` (1x1 conv).
    """

    config_keys = ("out_channels", "dropout", "use_scale_shift_norm")

    def __init__(self, out_channels, dropout=0.0, use_scale_shift_norm=True, **kwargs):
        super().__init__(**kwargs)
        self.out_channels = int(out_channels)
        self.dropout = float(dropout)
        self.use_scale_shift_norm = bool(use_scale_shift_norm)
        p = self.dtype_policy
        c = self.out_channels
        self.in_norm = GroupNorm(32, name="in_layers_0", dtype=p)
        self.in_conv = _conv(c, 3, "in_layers_2", p)
        self.emb_linear = _dense(2 * c if self.use_scale_shift_norm else c, "emb_layers_1", p)
        self.out_norm = GroupNorm(32, name="out_layers_0", dtype=p)
        # An explicit seed (from Python's ``random``, which the trainer seeds with
        # run.seed while it builds the model) makes dropout draw from the SeedGenerator's
        # state, a model variable that every checkpoint holds, on every backend; an
        # unseeded Dropout on torch would use torch's global RNG and resume differently.
        seed = random.randrange(1, 2**31 - 1) if self.dropout > 0 else None
        self.out_dropout = keras.layers.Dropout(self.dropout, seed=seed, name="out_layers_2", dtype=p)
        self.out_conv = _conv(c, 3, "out_layers_3", p, zero=True)
        self.skip_connection = None

    def build(self, x_shape, emb_shape):
        in_channels = x_shape[-1]
        self.in_channels = int(in_channels)
        self.in_norm.build(x_shape)
        self.in_conv.build(x_shape)
        self.emb_linear.build(emb_shape)
        h_shape = tuple(x_shape[:-1]) + (self.out_channels,)
        self.out_norm.build(h_shape)
        self.out_conv.build(h_shape)
        if in_channels != self.out_channels:
            self.skip_connection = _conv(
                self.out_channels, 1, "skip_connection", self.dtype_policy
            )
            self.skip_connection.build(x_shape)

    def call(self, x, emb, training=None):
        # The sub-layers hold the weights (and name them as ADM does); their computation
        # is called directly, not through Layer.__call__, whose per-call bookkeeping cost
        # more than the arithmetic of a small block (docs/design.md "Speed").
        h = self.in_conv.call(ops.silu(self.in_norm.call(x)))
        emb_out = self.emb_linear.call(ops.silu(emb))[:, None, None, :]
        if self.use_scale_shift_norm:
            scale, shift = ops.split(emb_out, 2, axis=-1)
            h = scale_shift(self.out_norm.call(h), scale, shift)  # h * (1 + scale) + shift
        else:
            h = self.out_norm.call(h + emb_out)
        h = ops.silu(h)
        if self.dropout > 0:
            h = self.out_dropout.call(h, training=bool(training))
        h = self.out_conv.call(h)
        skip = x if self.skip_connection is None else self.skip_connection.call(x)
        return skip + h

    def compute_output_shape(self, x_shape, emb_shape):
        return tuple(x_shape[:-1]) + (self.out_channels,)


@keras.saving.register_keras_serializable(package="ssd_keras")
class AttentionBlock(_Configured):
    """ADM AttentionBlock: multi-head self-attention over all spatial positions.

    ``qkv`` (Dense 3C, ADM's 1x1 conv1d) uses ADM's *legacy* channel layout
    ``[head][q|k|v][head_channels]`` (``QKVAttentionLegacy``, guided-diffusion's default),
    attention is ``softmax(q k^T / sqrt(head_channels)) v`` and ``proj_out`` is
    zero-initialized; returns ``x + proj_out(attention(GN(x)))``.
    Heads: ``num_heads``, or ``channels // num_head_channels`` when
    ``num_head_channels != -1`` (as ADM).
    """

    config_keys = ("num_heads", "num_head_channels")

    def __init__(self, num_heads=1, num_head_channels=-1, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)
        self.num_head_channels = int(num_head_channels)
        self.norm = GroupNorm(32, name="norm", dtype=self.dtype_policy)

    def heads_for(self, channels):
        if self.num_head_channels == -1:
            heads = self.num_heads
        else:
            if channels % self.num_head_channels:
                raise ValueError(
                    f"AttentionBlock '{self.name}': {channels} channels are not a "
                    f"multiple of num_head_channels={self.num_head_channels}"
                )
            heads = channels // self.num_head_channels
        if heads < 1 or channels % heads:
            raise ValueError(
                f"AttentionBlock '{self.name}': {channels} channels cannot be split "
                f"into {heads} heads"
            )
        return heads

    def build(self, x_shape):
        channels = int(x_shape[-1])
        self.channels = channels
        self.heads = self.heads_for(channels)
        self.norm.build(x_shape)
        self.qkv = _dense(3 * channels, "qkv", self.dtype_policy)
        self.qkv.build((None, None, channels))
        self.proj_out = _dense(channels, "proj_out", self.dtype_policy, zero=True)
        self.proj_out.build((None, None, channels))

    def call(self, x):
        shape = ops.shape(x)
        b, c = shape[0], self.channels
        heads, ch = self.heads, self.channels // self.heads
        h = ops.reshape(self.norm.call(x), (b, -1, c))
        qkv = ops.reshape(self.qkv.call(h), (b, -1, heads, 3, ch))
        a = attention_legacy_qkv(qkv, scale=1.0 / math.sqrt(ch))  # (b, L, heads, ch)
        h = self.proj_out.call(ops.reshape(a, (b, -1, c)))
        return x + ops.reshape(h, shape)

    def compute_output_shape(self, x_shape):
        return x_shape


@keras.saving.register_keras_serializable(package="ssd_keras")
class Downsample(_Configured):
    """ADM Downsample with ``conv_resample``: 3x3 conv, stride 2, padding 1 (``op``).

    The padding is symmetric like torch's ``padding=1`` (Keras's "same" with stride 2
    would pad only bottom/right and shift the sampling grid); ``Conv`` pads so.
    """

    config_keys = ("channels",)

    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        self.channels = int(channels)
        self.op = _conv(self.channels, 3, "op", self.dtype_policy, strides=2)

    def build(self, x_shape):
        self.op.build(x_shape)

    def call(self, x):
        return self.op.call(x)

    def compute_output_shape(self, x_shape):
        def half(n):
            return None if n is None else (n + 2 - 3) // 2 + 1

        return (x_shape[0], half(x_shape[1]), half(x_shape[2]), self.channels)


@keras.saving.register_keras_serializable(package="ssd_keras")
class Upsample(_Configured):
    """ADM Upsample with ``conv_resample``: nearest 2x, then a 3x3 conv (``conv``)."""

    config_keys = ("channels",)

    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        self.channels = int(channels)
        self.conv = _conv(self.channels, 3, "conv", self.dtype_policy)

    def build(self, x_shape):
        self.conv.build(x_shape)

    def call(self, x):
        return self.conv.call(upsample_nearest_2x(x))

    def compute_output_shape(self, x_shape):
        def double(n):
            return None if n is None else 2 * n

        return (x_shape[0], double(x_shape[1]), double(x_shape[2]), self.channels)


@keras.saving.register_keras_serializable(package="ssd_keras")
class OutputHead(_Configured):
    """ADM ``out``: GN (``out.0``), SiLU, zero-initialized 3x3 conv (``out.2``).

    The result is cast to float32 (the usual last step of a mixed-precision model).
    """

    config_keys = ("out_channels",)

    def __init__(self, out_channels, **kwargs):
        super().__init__(**kwargs)
        self.out_channels = int(out_channels)
        self.norm = GroupNorm(32, name="out_0", dtype=self.dtype_policy)
        self.conv = _conv(self.out_channels, 3, "out_2", self.dtype_policy, zero=True)

    def build(self, x_shape):
        self.norm.build(x_shape)
        self.conv.build(x_shape)

    def call(self, x):
        return ops.cast(self.conv.call(ops.silu(self.norm.call(x))), "float32")


@keras.saving.register_keras_serializable(package="ssd_keras")
class ZeroSkip(_Configured):
    """Zero-filled skip tensor (B, H, W, channels) shaped like its input's batch/space.

    Fed to the decoder blocks of a path's output level when the encoder never ran at
    that resolution (resolution-increasing paths).
    """

    config_keys = ("channels",)

    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        self.channels = int(channels)

    def call(self, h):
        shape = ops.shape(h)
        return ops.zeros((shape[0], shape[1], shape[2], self.channels), dtype=h.dtype)

    def compute_output_shape(self, h_shape):
        return tuple(h_shape[:-1]) + (self.channels,)


@keras.saving.register_keras_serializable(package="ssd_keras")
class ResizeInput(_Configured):
    """Bilinear resize (half-pixel centers, no antialiasing) to ``size x size``.

    Used by the official code's full-resolution change step, which upsamples x_t to
    the full resolution and runs the plain full-resolution path.
    """

    config_keys = ("size",)

    def __init__(self, size, **kwargs):
        super().__init__(**kwargs)
        self.size = int(size)

    def call(self, x):
        return ops.image.resize(
            x, (self.size, self.size), interpolation="bilinear", antialias=False
        )

    def compute_output_shape(self, x_shape):
        return (x_shape[0], self.size, self.size, x_shape[-1])

