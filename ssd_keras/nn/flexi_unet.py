"""The Flexi-UNet of Scale Space Diffusion (arXiv 2603.08709; docs/architecture.md), in Keras 3.

One ADM / guided-diffusion UNet is built once as shared layers; every *path*
``(r_in, r_out)`` is a Keras Functional sub-model that calls only the blocks it needs:

- ``(r, r)`` for every level ``r`` (resolution-preserving), and
- ``(r, 2r)`` between adjacent levels (the resolution-change steps).

A path entering at UNet level ``k_in`` (feature map ``r x r``, ``r = image_size / 2^k``)
and leaving at level ``k_out`` (``k_out = k_in`` or ``k_in - 1``) computes exactly what the
official network computes (docs/architecture.md; tested against its outputs):

1. shared input conv ``input_blocks_0_0`` (3x3, in_channels -> ``ch0 = mult[0]*base``);
2. a shared 1x1 adapter ``adapters_in_to_{c}`` to the ``c`` channels the encoder expects
   at level ``k_in`` (the output channels of level k_in-1); one adapter per distinct
   ``c``, none when ``c == ch0``. Its output is never used as a skip;
3. the encoder from level ``k_in`` down and the middle block;
4. the decoder up to the output level, where only the first ``num_res_blocks`` of its
   ``num_res_blocks + 1`` blocks run (the last block of the output level, the one with
   the Upsample, does not; so the top level's last block is never run by any path and
   is not built). A change path runs the whole entry level (the last block with its
   Upsample) and the first blocks of the level above; those blocks and the entry level's
   last block receive zero-filled skips (``ZeroSkip``);
5. a shared 1x1 adapter ``adapters_out_from_{c}`` from that level's ``c`` channels to
   ``ch0`` (none when equal) and the shared head ``out`` (GN, SiLU, conv3x3).

Exception of the official code, on by default (``full_res_change_via_upsample=True``):
the change path ``(r_max/2, r_max)`` bilinearly upsamples x_t to full resolution and runs
the plain ``(r_max, r_max)`` path, so it has no zero skips and uses exactly the
parameters of the full path. With ``False`` it is built like the other change paths.

Implementation: ``FlexiUNet`` is a plain Python object (not a ``keras.Model``) that
owns one *union* Functional model, ``.model``, with an input per level resolution
(``x_{r}``), an input ``t`` and one output per path in ``path_keys`` order. Each path
is sliced out of it as ``keras.Model([x_{r_in}, t], out_path)``, so all paths share the
very same variable objects, and saving/loading goes through the union model (its
``.weights.h5`` keys follow layer class and graph order, which is fixed for a config).

Class-conditional (``num_classes > 0``): as ADM built with ``num_classes``, a class
embedding ``label_emb`` (one row per class) is looked up by an integer label input ``y``
and added to the time embedding, so every block of every path sees it; every path then
takes ``[x, t, y]``. With ``null_class`` (the default) the embedding has one more row,
index ``num_classes``, the learned "no class" of classifier-free guidance
(``null_label``; docs/sampling.md). An official class-conditional checkpoint has no such
row (``null_class=False``). Unconditional models (``num_classes = 0``) have exactly
the inputs, variables and outputs they always had.
"""


import keras

from ssd_keras.nn import layers as L

_GROUPS = 32


class PathError(ValueError, KeyError):
    """An invalid ``(r_in, r_out)`` pair (both a ValueError and a KeyError)."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


def _as_int_tuple(name, value):
    try:
        out = tuple(int(v) for v in value)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of ints, got {value!r}") from None
    if any(float(a) != float(b) for a, b in zip(out, value)):
        raise ValueError(f"{name} must hold integers, got {value!r}")
    return out


class FlexiUNet:
    """ADM UNet with one Functional sub-model per SSD path; see the module docstring.

    Args:
        image_size: full resolution ``r_max`` (square images).
        resolutions: ascending SSD levels ``[r_min, 2 r_min, ..., image_size]``; each
            must be a feature resolution of the UNet (``image_size / 2^k`` with
            ``k < len(channel_mult)``).
        in_channels, out_channels: image channels in and out.
        base_channels: ADM ``model_channels``; every ``base_channels * mult`` must be
            divisible by 32 (GroupNorm 32).
        channel_mult: channel multiplier per UNet level (level k has resolution
            ``image_size / 2^k``).
        num_res_blocks: ResBlocks per encoder level (the decoder has one more).
        attention_resolutions: *feature-map resolutions* (e.g. ``(16, 8)``) where
            self-attention follows each ResBlock (guided-diffusion's command line takes
            the same numbers and converts them to downsampling factors).
        num_heads, num_head_channels: heads, or channels per head if not -1 (as ADM).
        dropout: ResBlock dropout rate.
        full_res_change_via_upsample: see the module docstring.
        num_classes: classes of a class-conditional network (0: unconditional); see
            the module docstring.
        null_class: with ``num_classes``, one more embedding row, the "no class" label
            ``num_classes`` of classifier-free guidance (official checkpoints: False).
        dtype: a Keras dtype policy (name), e.g. ``"mixed_bfloat16"``; ``None`` takes
            the global policy. Variables are float32 under mixed policies, GroupNorm
            computes in float32 and every path returns float32.
    """

    def __init__(
        self,
        image_size,
        resolutions,
        *,
        in_channels=3,
        out_channels=3,
        base_channels=128,
        channel_mult=(1, 2, 3, 4),
        num_res_blocks=2,
        attention_resolutions=(16, 8),
        num_heads=4,
        num_head_channels=-1,
        dropout=0.0,
        full_res_change_via_upsample=True,
        num_classes=0,
        null_class=True,
        dtype=None,
    ):
        self.image_size = int(image_size)
        self.resolutions = _as_int_tuple("resolutions", resolutions)
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.base_channels = int(base_channels)
        self.channel_mult = _as_int_tuple("channel_mult", channel_mult)
        self.num_res_blocks = int(num_res_blocks)
        self.attention_resolutions = _as_int_tuple(
            "attention_resolutions", attention_resolutions
        )
        self.num_heads = int(num_heads)
        self.num_head_channels = int(num_head_channels)
        self.dropout = float(dropout)
        self.full_res_change_via_upsample = bool(full_res_change_via_upsample)
        self.num_classes = int(num_classes)
        self.null_class = bool(null_class)
        policy = keras.config.dtype_policy() if dtype is None else dtype
        self.dtype_policy = keras.dtype_policies.get(policy)
        self._validate()

        n = len(self.channel_mult)
        self.num_levels = n
        self.feature_resolutions = tuple(self.image_size >> k for k in range(n))
        self.level_of = {r: self.feature_resolutions.index(r) for r in self.resolutions}
        self._ch = [self.base_channels * m for m in self.channel_mult]

        keys = []
        for i, r in enumerate(self.resolutions):
            keys.append((r, r))
            if i + 1 < len(self.resolutions):
                keys.append((r, self.resolutions[i + 1]))
        self._path_keys = keys

        self._build_layers()
        self._build_union()
        self._paths = {}
        self._probes = {}

    # ------------------------------------------------------------------ validation
    def _validate(self):
        s = self.image_size
        if s < 1:
            raise ValueError(f"image_size must be positive, got {s}")
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ValueError(f"channel_mult must be non-empty positive ints, got {self.channel_mult}")
        n = len(self.channel_mult)
        if s % (2 ** (n - 1)):
            raise ValueError(
                f"image_size {s} is not divisible by 2^{n - 1} (len(channel_mult)={n} "
                "UNet levels, each halving the resolution)"
            )
        feats = [s >> k for k in range(n)]
        res = self.resolutions
        if not res:
            raise ValueError("resolutions must not be empty")
        for r in res:
            if r not in feats:
                raise ValueError(
                    f"resolution {r} is not a feature resolution of the UNet "
                    f"(image_size={s}, channel_mult={self.channel_mult}: {feats})"
                )
        for a, b in zip(res, res[1:]):
            if b != 2 * a:
                raise ValueError(
                    f"resolutions must be ascending, each twice the previous: {a} is "
                    f"followed by {b} in {list(res)}"
                )
        if res[-1] != s:
            raise ValueError(
                f"the last resolution must be image_size={s}, got {res[-1]} in {list(res)}"
            )
        if self.base_channels < 1 or self.in_channels < 1 or self.out_channels < 1:
            raise ValueError("base_channels, in_channels and out_channels must be positive")
        for m in self.channel_mult:
            if (self.base_channels * m) % _GROUPS:
                raise ValueError(
                    f"base_channels={self.base_channels} x channel_mult {m} = "
                    f"{self.base_channels * m} channels is not divisible by the "
                    f"{_GROUPS} groups of GroupNorm"
                )
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
        for a in self.attention_resolutions:
            if a not in feats:
                raise ValueError(
                    f"attention resolution {a} is not a feature resolution of the UNet "
                    f"({feats})"
                )
        for k, m in enumerate(self.channel_mult):
            if feats[k] not in self.attention_resolutions and k != n - 1:
                continue  # the middle block (lowest level) always has attention
            c = self.base_channels * m
            if self.num_head_channels == -1:
                if self.num_heads < 1 or c % self.num_heads:
                    raise ValueError(
                        f"{c} attention channels (level {feats[k]}) are not divisible "
                        f"by num_heads={self.num_heads}"
                    )
            elif self.num_head_channels < 1 or c % self.num_head_channels:
                raise ValueError(
                    f"{c} attention channels (level {feats[k]}) are not a multiple of "
                    f"num_head_channels={self.num_head_channels}"
                )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: unconditional), got {self.num_classes}")

    # ------------------------------------------------------------------ layers
    def _build_layers(self):
        """Create every shared layer once, in ADM module order."""
        p = self.dtype_policy
        n, nrb, ch = self.num_levels, self.num_res_blocks, self._ch
        emb_dim = 4 * self.base_channels

        def attn(name, res):
            if res not in self.attention_resolutions:
                return None
            return L.AttentionBlock(
                self.num_heads, self.num_head_channels, name=name, dtype=p
            )

        self.time_embed = L.TimestepEmbedding(
            self.base_channels, emb_dim, name="time_embed", dtype=p
        )
        self.label_emb = None
        if self.num_classes:
            rows = self.num_classes + (1 if self.null_class else 0)
            self.label_emb = L.ClassEmbedding(rows, emb_dim, name="label_emb", dtype=p)
        self.conv_in = L._conv(ch[0], 3, "input_blocks_0_0", p)

        # Encoder: enc[k] = [(ResBlock, Attention|None)] * nrb, down[k] = Downsample|None
        self.enc, self.down = [], []
        skip_chans = [ch[0]]  # ADM's input_block_chans
        self.entry_channels = [ch[0]]  # channels entering level k
        idx = 1
        for k in range(n):
            blocks = []
            for _ in range(nrb):
                blocks.append(
                    (
                        L.ResBlock(ch[k], self.dropout, name=f"input_blocks_{idx}_0", dtype=p),
                        attn(f"input_blocks_{idx}_1", self.image_size >> k),
                    )
                )
                skip_chans.append(ch[k])
                idx += 1
            self.enc.append(blocks)
            if k != n - 1:
                self.down.append(L.Downsample(ch[k], name=f"input_blocks_{idx}_0", dtype=p))
                skip_chans.append(ch[k])
                self.entry_channels.append(ch[k])
                idx += 1
            else:
                self.down.append(None)

        self.middle = [
            L.ResBlock(ch[-1], self.dropout, name="middle_block_0", dtype=p),
            L.AttentionBlock(
                self.num_heads, self.num_head_channels, name="middle_block_1", dtype=p
            ),
            L.ResBlock(ch[-1], self.dropout, name="middle_block_2", dtype=p),
        ]

        # Decoder: dec[k] = [(ResBlock, Attention|None)] * (nrb+1); up[k] Upsample|None
        self.dec = [None] * n
        self.up = [None] * n
        self.dec_skip_channels = [None] * n
        idx = 0
        for k in reversed(range(n)):
            blocks, chans = [], []
            for i in range(nrb + 1):
                chans.append(skip_chans.pop())
                if k == 0 and i == nrb:  # never run by any path (see _run_path)
                    idx += 1
                    continue
                a = attn(f"output_blocks_{idx}_1", self.image_size >> k)
                blocks.append(
                    (L.ResBlock(ch[k], self.dropout, name=f"output_blocks_{idx}_0", dtype=p), a)
                )
                if k and i == nrb:
                    self.up[k] = L.Upsample(
                        ch[k], name=f"output_blocks_{idx}_{2 if a else 1}", dtype=p
                    )
                idx += 1
            self.dec[k] = blocks
            self.dec_skip_channels[k] = chans
        assert not skip_chans

        self.head = L.OutputHead(self.out_channels, name="out", dtype=p)

        # Adapters as the official network has them: one 1x1 conv per distinct channel
        # count, shared by every UNet level below the top that needs that mapping.
        self.in_adapter, self.out_adapter = {}, {}
        by_channels_in, by_channels_out = {}, {}
        for k in range(1, n):
            c_in, c_out = self.entry_channels[k], ch[k]
            if c_in != ch[0]:
                if c_in not in by_channels_in:
                    by_channels_in[c_in] = L._conv(c_in, 1, f"adapters_in_to_{c_in}", p)
                self.in_adapter[k] = by_channels_in[c_in]
            if c_out != ch[0]:
                if c_out not in by_channels_out:
                    by_channels_out[c_out] = L._conv(ch[0], 1, f"adapters_out_from_{c_out}", p)
                self.out_adapter[k] = by_channels_out[c_out]

    # ------------------------------------------------------------------ graphs
    def _run_path(self, x, emb, k_in, k_out, tag):
        """Call the shared layers from level k_in to level k_out (k_out <= k_in)."""
        p = self.dtype_policy
        skips = []  # (decoder block name, skip tensor, is_zero)
        h = self.conv_in(x)
        if k_in in self.in_adapter:
            h = self.in_adapter[k_in](h)
        hs = [h]
        for k in range(k_in, self.num_levels):
            for res, att in self.enc[k]:
                h = res(h, emb)
                if att is not None:
                    h = att(h)
                hs.append(h)
            if self.down[k] is not None:
                h = self.down[k](h)
                hs.append(h)
        h = self.middle[0](h, emb)
        h = self.middle[1](h)
        h = self.middle[2](h, emb)
        nrb = self.num_res_blocks
        for k in reversed(range(k_out, self.num_levels)):
            blocks = self.dec[k] if k > k_out else self.dec[k][:nrb]
            for i, (res, att) in enumerate(blocks):
                # zero skips: every block above the entry level, and the entry level's
                # last block (the one that carries its Upsample) on a change path
                zero = k < k_in or (k == k_in and i == nrb)
                if not zero:
                    skip = hs.pop()
                else:
                    skip = L.ZeroSkip(
                        self.dec_skip_channels[k][i], name=f"{tag}_zero_skip_{res.name}", dtype=p
                    )(h)
                skips.append((res.name, skip, zero))
                h = keras.layers.Concatenate(axis=-1, name=f"{tag}_concat_{res.name}", dtype=p)(
                    [h, skip]
                )
                h = res(h, emb)
                if att is not None:
                    h = att(h)
            if k > k_out:
                h = self.up[k](h)
        assert len(hs) == 1, "skip bookkeeping out of sync"  # the stem output: no skip
        if k_out in self.out_adapter:
            h = self.out_adapter[k_out](h)
        return self.head(h), skips

    def _build_union(self):
        self.inputs = {
            r: keras.Input((r, r, self.in_channels), name=f"x_{r}") for r in self.resolutions
        }
        self.t_input = keras.Input((), dtype="float32", name="t")
        emb = self.time_embed(self.t_input)
        self.y_input = None
        if self.label_emb is not None:  # ADM: emb = time_embed(t) + label_emb(y)
            self.y_input = keras.Input((), dtype="int32", name="y")
            emb = keras.layers.Add(name="emb_plus_label", dtype=self.dtype_policy)(
                [emb, self.label_emb(self.y_input)])
        self._outputs, self._skips = {}, {}
        r_max = self.image_size
        for r_in, r_out in self._path_keys:
            tag = f"path_{r_in}_{r_out}"
            x = self.inputs[r_in]
            k_in, k_out = self.level_of[r_in], self.level_of[r_out]
            if self.full_res_change_via_upsample and r_in != r_out and r_out == r_max:
                x = L.ResizeInput(r_max, name=f"{tag}_upsample_input", dtype=self.dtype_policy)(x)
                k_in = k_out
            out, skips = self._run_path(x, emb, k_in, k_out, tag)
            self._outputs[(r_in, r_out)] = out
            self._skips[(r_in, r_out)] = skips
        self.model = keras.Model(
            inputs=[self.inputs[r] for r in self.resolutions] + self._cond_inputs(),
            outputs=[self._outputs[key] for key in self._path_keys],
            name="flexi_unet",
        )

    def _cond_inputs(self):
        """The inputs after x: ``[t]``, or ``[t, y]`` for a class-conditional network."""
        return [self.t_input] + ([self.y_input] if self.y_input is not None else [])

    # ------------------------------------------------------------------ public API
    @property
    def null_label(self):
        """The label of the learned "no class" row (``num_classes``), or ``None`` when the
        network is unconditional or has no such row (an official checkpoint's)."""
        return self.num_classes if self.num_classes and self.null_class else None

    @property
    def path_keys(self):
        """All valid ``(r_in, r_out)`` pairs, in a fixed order."""
        return list(self._path_keys)

    def _check_key(self, r_in, r_out):
        key = (int(r_in), int(r_out))
        if key not in self._outputs:
            raise PathError(
                f"no Flexi-UNet path ({r_in}, {r_out}); valid (r_in, r_out) pairs for "
                f"resolutions {list(self.resolutions)}: {self._path_keys}"
            )
        return key

    def path(self, r_in, r_out):
        """The Functional sub-model of path ``(r_in, r_out)``, called as
        ``model([x, t], training=...)`` with x (B, r_in, r_in, in_channels) and t (B,)
        float32 timestep indices; returns (B, r_out, r_out, out_channels) float32.
        A class-conditional network's paths take ``[x, t, y]``, y (B,) int32 labels."""
        key = self._check_key(r_in, r_out)
        if key not in self._paths:
            self._paths[key] = keras.Model(
                inputs=[self.inputs[key[0]]] + self._cond_inputs(),
                outputs=self._outputs[key],
                name=f"path_{key[0]}_{key[1]}",
            )
        return self._paths[key]

    def path_variables(self, r_in, r_out):
        """The trainable variables that path ``(r_in, r_out)`` uses (shared objects)."""
        return list(self.path(r_in, r_out).trainable_variables)

    def skip_probe(self, r_in, r_out):
        """Debug model returning every skip tensor the path feeds to a decoder concat.

        Returns ``(probe_model, info)``: ``probe_model([x, t])`` gives the list of skip
        tensors in decoder order; ``info`` lists ``(decoder_block_name, is_zero_skip)``.
        """
        key = self._check_key(r_in, r_out)
        skips = self._skips[key]
        if key not in self._probes:
            self._probes[key] = keras.Model(
                inputs=[self.inputs[key[0]]] + self._cond_inputs(),
                outputs=[s for _, s, _ in skips],
                name=f"skip_probe_{key[0]}_{key[1]}",
            )
        return self._probes[key], [(name, zero) for name, _, zero in skips]

    @property
    def variables(self):
        return self.model.variables

    @property
    def trainable_variables(self):
        return self.model.trainable_variables

    @property
    def non_trainable_variables(self):
        return self.model.non_trainable_variables

    def count_params(self):
        return self.model.count_params()

    def save_weights(self, filepath, overwrite=True):
        """Save all shared weights (``.weights.h5``) through the union model."""
        self.model.save_weights(filepath, overwrite=overwrite)

    def load_weights(self, filepath):
        """Load weights saved by ``save_weights`` of a FlexiUNet with the same config."""
        self.model.load_weights(filepath)

    def get_config(self):
        return {
            "image_size": self.image_size,
            "resolutions": list(self.resolutions),
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "base_channels": self.base_channels,
            "channel_mult": list(self.channel_mult),
            "num_res_blocks": self.num_res_blocks,
            "attention_resolutions": list(self.attention_resolutions),
            "num_heads": self.num_heads,
            "num_head_channels": self.num_head_channels,
            "dropout": self.dropout,
            "full_res_change_via_upsample": self.full_res_change_via_upsample,
            "num_classes": self.num_classes,
            "null_class": self.null_class,
            "dtype": self.dtype_policy.name,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        image_size = config.pop("image_size")
        resolutions = config.pop("resolutions")
        return cls(image_size, resolutions, **config)

    def __repr__(self):
        return (
            f"FlexiUNet(image_size={self.image_size}, resolutions={list(self.resolutions)}, "
            f"base_channels={self.base_channels}, channel_mult={self.channel_mult}, "
            f"params={self.count_params():,}, paths={self._path_keys})"
        )
