"""A plain-torch eager twin of ssd_keras's Flexi-UNet, for ``bench_vs_official.py``.

What ssd_keras's network computes on a path, written directly as torch functions over
copies of its weights: the same channels-last layout and kernels as
``ssd_keras.backend`` (oneDNN convolutions on NHWC views, native group norm, SDPA), but
no Keras in between. The benchmark's ratio "twin / ssd_keras" is therefore the price of
Keras (per-layer ``__call__`` bookkeeping, its optimizer) on top of torch, visible to
anyone without the official code at hand.

The twin walks the same layer objects as ``FlexiUNet._run_path`` (read-only), trains with
``torch.optim.AdamW`` (foreach) and a ``torch._foreach_lerp_`` EMA, and samples through
ssd_keras's own ``sample_images`` loop (so sampling compares the network execution only).
Only the benchmark uses it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


class TorchTwin:
    def __init__(self, cfg, keras_unet, process):
        from keras import ops

        from ssd_keras.objectives import make_objective

        self.cfg = cfg
        self.unet = keras_unet
        self.process = process
        self.objective = make_objective(process, cfg.loss.target, cfg.loss.min_snr_gamma)
        self.params = {v.path: torch.tensor(np.asarray(ops.convert_to_numpy(v.value)), requires_grad=True)
                       for v in keras_unet.model.trainable_variables}
        o = cfg.optimizer
        self.opt = torch.optim.AdamW(list(self.params.values()), lr=o.lr, betas=(o.beta1, o.beta2),
                                     eps=o.epsilon, weight_decay=o.weight_decay, foreach=True)
        self.ema = [p.detach().clone() for p in self.params.values()]

    # ------------------------------------------------------------------ weights
    def copy_weights_from(self, keras_unet) -> None:
        from keras import ops

        with torch.no_grad():
            for v in keras_unet.model.trainable_variables:
                self.params[v.path].copy_(torch.from_numpy(np.asarray(ops.convert_to_numpy(v.value))))

    def _w(self, layer, name):
        return self.params[f"{layer.path}/{name}"]

    # ------------------------------------------------------------------ layers
    def conv(self, layer, x):
        k = self._w(layer, "kernel")
        y = F.conv2d(x.permute(0, 3, 1, 2), k.permute(3, 2, 0, 1), self._w(layer, "bias"),
                     layer.strides, layer.kernel_size // 2)
        return y.permute(0, 2, 3, 1)

    def linear(self, layer, x):
        return F.linear(x, self._w(layer, "kernel").T, self._w(layer, "bias"))

    def norm(self, layer, x):
        y = F.group_norm(x.permute(0, 3, 1, 2), layer.groups, self._w(layer, "gamma"),
                         self._w(layer, "beta"), layer.epsilon)
        return y.permute(0, 2, 3, 1)

    def resblock(self, block, x, emb):
        h = self.conv(block.in_conv, F.silu(self.norm(block.in_norm, x)))
        scale, shift = self.linear(block.emb_linear, F.silu(emb))[:, None, None, :].chunk(2, dim=-1)
        h = F.silu(self.norm(block.out_norm, h) * (1.0 + scale) + shift)
        h = self.conv(block.out_conv, h)
        return (x if block.skip_connection is None else self.conv(block.skip_connection, x)) + h

    def attention(self, block, x):
        b, hh, ww, c = x.shape
        heads, ch = block.heads, c // block.heads
        qkv = self.linear(block.qkv, self.norm(block.norm, x).reshape(b, -1, c))
        qkv = qkv.reshape(b, -1, heads, 3, ch)
        q, k, v = (qkv[:, :, :, i, :].transpose(1, 2) for i in range(3))
        a = F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(ch))
        return x + self.linear(block.proj_out, a.transpose(1, 2).reshape(b, -1, c)).reshape(x.shape)

    def embed(self, t):
        te = self.unet.time_embed
        half = te.model_channels // 2
        freqs = torch.exp(torch.arange(half, dtype=torch.float32) * (-math.log(te.max_period) / half))
        args = t.float()[:, None] * freqs[None]
        e = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.linear(te.linear_2, F.silu(self.linear(te.linear_0, e)))

    # ------------------------------------------------------------------ a path
    def path_forward(self, x, t, key):
        """The network on path ``key`` = (r_in, r_out) for NHWC torch tensors."""
        u = self.unet
        emb = self.embed(t)
        k_in, k_out = u.level_of[key[0]], u.level_of[key[1]]
        if u.full_res_change_via_upsample and key[0] != key[1] and key[1] == u.image_size:
            x = F.interpolate(x.permute(0, 3, 1, 2), size=(key[1], key[1]), mode="bilinear",
                              align_corners=False).permute(0, 2, 3, 1)
            k_in = k_out
        h = self.conv(u.conv_in, x)
        if k_in in u.in_adapter:
            h = self.conv(u.in_adapter[k_in], h)
        hs = [h]
        for k in range(k_in, u.num_levels):
            for res, att in u.enc[k]:
                h = self.resblock(res, h, emb)
                if att is not None:
                    h = self.attention(att, h)
                hs.append(h)
            if u.down[k] is not None:
                h = self.conv(u.down[k].op, h)
                hs.append(h)
        h = self.resblock(u.middle[0], h, emb)
        h = self.attention(u.middle[1], h)
        h = self.resblock(u.middle[2], h, emb)
        nrb = u.num_res_blocks
        for k in reversed(range(k_out, u.num_levels)):
            blocks = u.dec[k] if k > k_out else u.dec[k][:nrb]
            for i, (res, att) in enumerate(blocks):
                if k < k_in or (k == k_in and i == nrb):
                    b, hh, ww, _ = h.shape
                    skip = h.new_zeros((b, hh, ww, u.dec_skip_channels[k][i]))
                else:
                    skip = hs.pop()
                h = self.resblock(res, torch.cat([h, skip], dim=-1), emb)
                if att is not None:
                    h = self.attention(att, h)
            if k > k_out:
                up = u.up[k]
                h = F.interpolate(h.permute(0, 3, 1, 2), scale_factor=2.0, mode="nearest")
                h = self.conv(up.conv, h.permute(0, 2, 3, 1))
        if k_out in u.out_adapter:
            h = self.conv(u.out_adapter[k_out], h)
        return self.conv(u.head.conv, F.silu(self.norm(u.head.norm, h)))

    def path_output(self, x_nhwc: np.ndarray, t: np.ndarray, key) -> np.ndarray:
        with torch.no_grad():
            out = self.path_forward(torch.from_numpy(x_nhwc), torch.from_numpy(np.asarray(t, np.float32)), key)
        return out.numpy()

    # ------------------------------------------------------------------ work
    def train_step(self, x0_nchw, t_np) -> float:
        """Forward, the same weighted loss, backward, AdamW, EMA: all plain torch calls
        (the example x_t, target, weight from ssd_keras's process, as its trainer)."""
        t = np.asarray(t_np, dtype=np.int64)
        key = self.process.path_at(int(t[0]))
        x0 = x0_nchw.permute(0, 2, 3, 1).contiguous()
        noise = np.random.default_rng(0).standard_normal((len(t), key[0], key[0], 3)).astype(np.float32)
        x_t, target, weight = self.objective.training_example(x0, t, noise)
        self.opt.zero_grad(set_to_none=True)
        pred = self.path_forward(x_t, torch.from_numpy(t.astype(np.float32)), key)
        w = torch.as_tensor(np.asarray(weight, np.float32))
        loss = ((pred - target) ** 2).mean(dim=(1, 2, 3)).mul(w).mean()
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, list(self.params.values()), 1.0 - self.cfg.ema.rate)
        return float(loss.detach())

    def sample(self, num_images: int, steps: int, seed: int = 0):
        from ssd_keras.sample import sample_images

        return sample_images(_TwinModel(self), self.process, self.objective, num_images=num_images,
                             steps=steps, batch_size=num_images, seed=seed, progress=False,
                             graph="eager").images


class _TwinModel:
    """What ``sample_images`` needs of a model: ``path(r_in, r_out)([x, t], training=...)``."""

    def __init__(self, twin: TorchTwin):
        self.twin = twin

    def path(self, r_in, r_out):
        twin = self.twin

        def call(inputs, training=False):
            x, t = inputs
            return twin.path_forward(x, t, (r_in, r_out))

        return call
