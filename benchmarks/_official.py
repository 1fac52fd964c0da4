"""The official SSD code (github prateksha/ScaleSpaceDiffusion), loaded for side-by-side runs.

Only the benchmarks use this module; the official code is never part of ssd_keras, of its
tests or of CI. ``load(path)`` imports the official ``guided_diffusion`` package from a
checkout at ``path`` with what it needs only for logging and pictures replaced by inert
stand-ins:

- ``torchvision`` and ``pandas`` (image dumps; an unused import);
- its ``logger`` (console and file logging);
- ``torch.distributed`` as seen by the diffusion modules (``get_rank`` 0, ``barrier`` a
  no-op), so that no process group is needed.

``OfficialTwin`` then builds the official FlexiUNet, its spaced diffusion (with
``space_timesteps``, as ``image_sample.py`` does) and its training pieces (AdamW, EMA)
for an ssd_keras pipeline, and copies the weights of an ssd_keras model into the official
network through ``ssd_keras.official`` (the mapping the ``ssd-run import`` command uses),
so both compute the same function.

``OfficialTwin(..., device="cuda", use_fp16=True)`` runs it on a GPU and as the official
``TrainLoop`` trains with ``use_fp16``: the network's torso in float16, float32 master
weights and the dynamic loss scale of its ``fp16_util.MixedPrecisionTrainer``
(``train_loop=True`` uses that trainer in float32 too, with its per-step gradient and
weight norms; ``benchmarks/device_check.py``). The released code's ``use_fp16`` does not
run on the FlexiUNet as it is (float32 adapters and zero skips meet float16 activations);
``OfficialTwin._fix_fp16`` makes the two changes it needs.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types
from pathlib import Path

import numpy as np


def _stub(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    # a spec, as imported modules have: torch._dynamo's first import looks one up per
    # module it knows of (pandas among them) and fails on a module without
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attrs)
    return module


class _NoDist:
    """What the official diffusion modules call on ``torch.distributed``, on one process."""

    @staticmethod
    def get_rank():
        return 0

    @staticmethod
    def get_world_size():
        return 1

    @staticmethod
    def is_initialized():
        return False

    @staticmethod
    def barrier(*args, **kwargs):
        return None


def load(path: str | Path) -> dict:
    """Import the official modules from the checkout at ``path``; returns them by name."""
    root = Path(path).resolve()
    if not (root / "guided_diffusion" / "unet.py").is_file():
        raise SystemExit(f"error: {root} is not a checkout of the official SSD code "
                         "(no guided_diffusion/unet.py); fetch github prateksha/ScaleSpaceDiffusion")
    for name in ("torchvision", "pandas"):
        sys.modules.setdefault(name, _stub(name))
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    logger = importlib.import_module("guided_diffusion.logger")
    for fn in ("log", "debug", "info", "warn", "logkv", "logkv_mean", "dumpkvs"):
        setattr(logger, fn, lambda *a, **k: None)
    modules = {}
    for name in ("unet", "nn", "scale_space_diffusion", "respace", "ssd_utils", "fp16_util"):
        module = importlib.import_module(f"guided_diffusion.{name}")
        if hasattr(module, "dist"):
            module.dist = _NoDist
        modules[name] = module
    return modules


class OfficialTwin:
    """The official network, diffusion and training step for one ssd_keras pipeline."""

    def __init__(self, official: dict, cfg, keras_unet, *, respacing: int | None = None,
                 device=None, use_fp16: bool = False, train_loop: bool = False):
        import torch

        p, m = cfg.process, cfg.model
        self.torch = torch
        self.official = official
        self.cfg = cfg
        unet = official["unet"]
        self.image_size = p.image_size
        self.resolutions = list(cfg.process.resolutions)
        layer_map = {r: r for r in self.resolutions}
        self.model = unet.FlexiUNet(
            image_size=p.image_size,
            in_channels=3,
            model_channels=m.base_channels,
            out_channels=3,
            num_res_blocks=m.num_res_blocks,
            attention_resolutions=tuple(p.image_size // r for r in m.attention_resolutions),
            dropout=m.dropout,
            channel_mult=tuple(float(c) for c in m.channel_mult),
            num_heads=m.num_heads,
            num_head_channels=m.num_head_channels,
            use_scale_shift_norm=True,
            unet_res_layer_map=layer_map,
            use_fp16=use_fp16,  # its forward casts to float16 (the torso is converted below)
        )
        self.ssd_config = {
            "resolution_schedule": p.resolution_schedule.replace("-", "_"),
            "t_res_sampling_mode": "one_res_many_t_except_one_t_for_res_change",
            "multires_training_mode": "flexi_unet",
            "unet_res_layer_map": layer_map,
            "scale_min": self.resolutions[0],
            "scale_max": p.image_size,
            "resize_operator": "BilinearOp",
        }
        self.copy_weights_from(keras_unet)
        self.device = torch.device(device or "cpu")
        self.model.to(self.device)
        self.diffusions = {}
        # the official TrainLoop's trainer: float16 torso + float32 master weights + loss
        # scale with use_fp16; in float32 it adds only the gradient and weight norms it logs
        self.mp_trainer = None
        params = list(self.model.parameters())
        if use_fp16 or train_loop:
            self.mp_trainer = official["fp16_util"].MixedPrecisionTrainer(
                model=self.model, use_fp16=use_fp16)
            params = self.mp_trainer.master_params
        if use_fp16:
            self._fix_fp16(official)
        self.opt = torch.optim.AdamW(params, lr=cfg.optimizer.lr,
                                     betas=(cfg.optimizer.beta1, cfg.optimizer.beta2),
                                     eps=cfg.optimizer.epsilon,
                                     weight_decay=cfg.optimizer.weight_decay)
        self.ema = [q.detach().clone() for q in params]

    def _fix_fp16(self, official) -> None:
        """The two changes the released FlexiUNet needs to run with ``use_fp16``.

        - Its ``convert_to_fp16`` converts the torso but not the input adapters, which
          then get float16 activations: "Input type (c10::Half) and bias type (float)
          should be the same" on the paths that enter the UNet through one (on the
          quickstart network: both paths from 4 px). They are converted too (the output
          adapters see float32 again, after the torso).
        - The zero skip tensors of a change path into a level below full resolution
          (4 -> 8 px there) are made in the input's dtype (float32); concatenated with
          the float16 activations they turn the rest of the decoder float32: "Input type
          (float) and bias type (c10::Half)". They are cast to the activations' dtype.

        Measured on the quickstart network: as released, 2 of its 5 paths fail; with
        either change alone 1 or 2 still do; with both, all run.
        """
        model = self.model
        model.adapters_in.apply(official["fp16_util"].convert_module_to_f16)
        zero_or_skip = model._get_skip_tensor

        def skip_in_compute_dtype(h, *args, **kwargs):
            return zero_or_skip(h, *args, **kwargs).type(h.dtype)

        model._get_skip_tensor = skip_in_compute_dtype

    # ------------------------------------------------------------------ pieces
    def diffusion(self, steps: int | None = None):
        """The official ``SpacedScaleSpaceDiffusion`` with ``steps`` respaced steps."""
        steps = steps or self.cfg.process.timesteps
        if steps not in self.diffusions:
            ssd = self.official["scale_space_diffusion"]
            respace = self.official["respace"]
            T = self.cfg.process.timesteps
            betas = ssd.get_named_beta_schedule(self.cfg.process.noise_schedule, T)
            self.diffusions[steps] = respace.SpacedScaleSpaceDiffusion(
                use_timesteps=respace.space_timesteps(T, [steps]),
                betas=betas,
                model_mean_type=ssd.ModelMeanType.START_X_RS,
                model_var_type=ssd.ModelVarType.FIXED_SMALL,
                loss_type=ssd.LossType.MSE,
                rescale_timesteps=False,
                experiment_type="ssd",
                ssd_config=self.ssd_config,
                resolutions_array=self.resolutions,
                mse_loss_weight_type=f"min_snr_{self.cfg.loss.min_snr_gamma:g}",
            )
        return self.diffusions[steps]

    def copy_weights_from(self, keras_unet) -> None:
        """Set every official tensor from the ssd_keras variable it maps to."""
        from keras import ops

        from ssd_keras.official import from_keras_array, official_names

        if getattr(self, "mp_trainer", None) is not None:
            raise RuntimeError("OfficialTwin: weights are copied before its MixedPrecisionTrainer "
                               "takes its master copy; build a new twin instead")
        state = self.model.state_dict()
        names = official_names(keras_unet)
        filled = set()
        for variable in keras_unet.model.trainable_variables:
            value = np.asarray(ops.convert_to_numpy(variable.value))
            for key in names[variable.path]:
                state[key] = self.torch.from_numpy(
                    from_keras_array(value, tuple(state[key].shape), key).copy())
                filled.add(key)
        self.model.load_state_dict(state)
        self.unused = sorted(set(state) - filled)  # the top level's last decoder block

    # ------------------------------------------------------------------ work
    def forward(self, x_nchw, t, r_out: int):
        """The official network on one path (as ``p_mean_variance`` calls it)."""
        torch = self.torch
        r_in = x_nchw.shape[-1]
        cond = None
        if r_out != r_in:
            if r_out == self.image_size:  # the official full-resolution change exception
                x_nchw = self.official["ssd_utils"].torch_resize_batch(x_nchw, r_out)
            else:
                cond = torch.full((x_nchw.shape[0],), float(r_out), device=x_nchw.device)
        return self.model(x_nchw, t, cond)

    def path_output(self, x_nhwc: np.ndarray, t: np.ndarray, key) -> np.ndarray:
        """The official network's output on path ``key`` for NHWC numpy inputs, NHWC."""
        torch = self.torch
        self.model.eval()
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))).to(self.device)
            t = torch.from_numpy(np.asarray(t, np.float32)).to(self.device)
            out = self.forward(x, t, key[1])
        return out.float().cpu().numpy().transpose(0, 2, 3, 1)

    def train_step(self, x0_nchw, t_np: np.ndarray) -> float:
        """One step of the official training: its losses, AdamW and EMA update."""
        torch = self.torch
        self.model.train()
        t = torch.from_numpy(np.asarray(t_np, dtype=np.int64)).to(self.device)
        mp = self.mp_trainer
        if mp is None:
            self.opt.zero_grad(set_to_none=True)
        else:
            mp.zero_grad()
        losses = self.diffusion().training_losses(self.model, x0_nchw.to(self.device), t, None)
        loss = losses["loss"].mean()
        if mp is None:
            loss.backward()
            self.opt.step()
            params = list(self.model.parameters())
        else:  # as TrainLoop.run_step: no EMA update after a skipped (overflowing) step
            mp.backward(loss)
            if not mp.optimize(self.opt):
                return float(loss.detach())
            params = mp.master_params
        self.official["nn"].update_ema(self.ema, params, rate=self.cfg.ema.rate)
        return float(loss.detach())

    def sample(self, num_images: int, steps: int, seed: int = 0):
        """``p_sample_loop`` of ``num_images`` images with ``steps`` respaced steps (NCHW)."""
        torch = self.torch
        torch.manual_seed(seed)
        self.model.eval()
        diffusion = self.diffusion(steps)
        with torch.no_grad():
            return diffusion.p_sample_loop(self.model, (num_images, 3, self.image_size,
                                                        self.image_size), device=self.device,
                                           progress=False)
