"""Training: one path per batch, EMA, atomic checkpoints, exact resume, clean stops.

Reads top to bottom: ``Trainer.__init__`` builds the pieces from the config and restores
the latest good checkpoint of the run; ``train_step`` does one optimisation step on one
Flexi-UNet path; ``fit`` loops with progress, logging, checkpoints and sample grids.
"""

from __future__ import annotations

import csv
import math
import signal
import time
import warnings
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import backend
from .builders import build_dataset, build_model, build_optimizer, build_process
from .checkpoint import (
    CheckpointError,
    latest_good_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from .config import ConfigError, PipelineConfig, from_dict, incompatible_keys
from .objectives import make_objective

CHANNELS = 3
LOG_FIELDS = ["step", "loss", "path", "t_mean", "steps_per_s", "images_per_s", "skipped", "time"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite (``train.on_nonfinite = "stop"``)."""


class Stopped(Exception):
    """Training was stopped by a signal after writing a checkpoint."""

    def __init__(self, message: str, signum: int | None = None):
        super().__init__(message)
        self.signum = signum


class Trainer:
    def __init__(
        self,
        cfg: PipelineConfig,
        *,
        resume: bool = True,
        allow_config_change: bool = False,
        progress: bool = True,
    ):
        self.cfg = cfg
        self.progress = progress
        self.run_dir = Path(cfg.run.output_dir) / cfg.run.name
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.process = build_process(cfg)
        self.objective = make_objective(self.process, cfg.loss.target, cfg.loss.min_snr_gamma)
        self.model = build_model(cfg, channels=CHANNELS)
        self.optimizer = build_optimizer(cfg)
        self.optimizer.build(self.model.trainable_variables)
        self.ema = [_copy(v) for v in self.model.trainable_variables]
        self.data = build_dataset(cfg)
        self.rng = np.random.default_rng(cfg.run.seed)
        self.step = 0
        self.skipped = 0
        self._grad_fns: dict = {}
        self._stop_requested = None  # the signal number once SIGINT/SIGTERM arrived
        self._prepare_run_dir(resume, allow_config_change)

    # ------------------------------------------------------------------ run dir
    def _prepare_run_dir(self, resume: bool, allow_config_change: bool) -> None:
        saved = self.run_dir / "config.toml"
        found = latest_good_checkpoint(self.ckpt_dir) if resume else None
        if found is not None:
            path, groups, meta = found
            old = from_dict(meta["config"], source=str(path))
            changed = incompatible_keys(old, self.cfg)
            if changed and not allow_config_change:
                raise ConfigError(
                    f"{self.run_dir}: the pipeline differs from the run's saved config in "
                    f"{', '.join(changed)}, which change the model or the process; use another "
                    f"run.name, or --allow-config-change to resume anyway"
                )
            self._restore(groups, meta)
            self.resumed_from = path
        else:
            if not resume and any(self.ckpt_dir.glob("ckpt_*.npz")):
                raise ConfigError(
                    f"{self.run_dir} already holds checkpoints; resume it, or choose another "
                    f"run.name (nothing was deleted)"
                )
            self.resumed_from = None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.cfg.save(saved)
        self._trim_log()

    # ------------------------------------------------------------------ state
    def state_groups(self) -> dict[str, list[np.ndarray]]:
        from keras import ops

        return {
            "model": [ops.convert_to_numpy(v.value) for v in self.model.variables],
            "ema": [ops.convert_to_numpy(e) for e in self.ema],
            "optimizer": [ops.convert_to_numpy(v.value) for v in self.optimizer.variables],
        }

    def state_meta(self) -> dict:
        import keras

        return {
            "config": self.cfg.to_dict(),
            "rng": self.rng.bit_generator.state,
            "data": self.data.state(),
            "skipped": self.skipped,
            "backend": keras.backend.backend(),
            "model_variables": [v.path for v in self.model.variables],
        }

    def _restore(self, groups: dict, meta: dict) -> None:
        from keras import ops

        self._assign(self.model.variables, groups["model"], "model")
        self._assign(self.optimizer.variables, groups["optimizer"], "optimizer")
        if len(groups["ema"]) != len(self.ema):
            raise CheckpointError(f"checkpoint EMA has {len(groups['ema'])} tensors, model has {len(self.ema)}")
        self.ema = [ops.convert_to_tensor(a) for a in groups["ema"]]
        self.rng.bit_generator.state = meta["rng"]
        self.data.restore(meta["data"])
        self.step = int(meta["step"])
        self.skipped = int(meta.get("skipped", 0))

    @staticmethod
    def _assign(variables, arrays, what: str) -> None:
        if len(variables) != len(arrays):
            raise CheckpointError(
                f"checkpoint holds {len(arrays)} {what} tensors, this model has {len(variables)}"
            )
        for v, a in zip(variables, arrays):
            if tuple(v.shape) != tuple(a.shape):
                raise CheckpointError(
                    f"checkpoint {what} tensor for {v.path} has shape {a.shape}, model wants {tuple(v.shape)}"
                )
            v.assign(a)

    def save(self) -> Path:
        path = save_checkpoint(self.ckpt_dir, self.step, self.state_groups(), self.state_meta())
        prune_checkpoints(self.ckpt_dir, self.cfg.train.keep_checkpoints, self.cfg.train.milestones)
        return path

    # ------------------------------------------------------------------ one step
    def _loss_fn(self, prediction, target, weight):
        from keras import ops

        err = ops.mean(ops.square(ops.cast(prediction, "float32") - target), axis=(1, 2, 3))
        return ops.mean(err * weight)

    def _grads_for(self, key):
        if key not in self._grad_fns:
            path = self.model.path(*key)
            self._grad_fns[key] = (path, backend.make_loss_and_grads(path, self._loss_fn))
        return self._grad_fns[key]

    def train_step(self, x0: np.ndarray | None = None) -> tuple[float, tuple[int, int], np.ndarray]:
        """One optimisation step; returns ``(loss, (r_in, r_out), t)``."""
        from keras import ops

        if x0 is None:
            x0 = next(self.data)
        batch = x0.shape[0]
        t = self.process.sample_training_timesteps(self.rng, batch)
        key = self.process.path_at(int(t[0]))
        noise = self.rng.standard_normal((batch, key[0], key[0], CHANNELS)).astype(np.float32)
        x_t, target, weight = self.objective.training_example(ops.convert_to_tensor(x0), t, noise)
        path, loss_and_grads = self._grads_for(key)
        loss, grads = loss_and_grads(
            x_t,
            ops.convert_to_tensor(t.astype(np.float32)),
            ops.convert_to_tensor(target, dtype="float32"),
            ops.convert_to_tensor(np.asarray(weight, np.float32)),
        )
        value = float(ops.convert_to_numpy(loss))
        if not math.isfinite(value):
            where = f"step {self.step + 1}, t = {t.min()}..{t.max()}, level {key[0]}px, path {key[0]}->{key[1]}"
            if self.cfg.train.on_nonfinite == "stop":
                raise NonFiniteLossError(
                    f"loss is {value} at {where}; stopped without applying it (the last good "
                    f"checkpoint is kept; set train.on_nonfinite = \"skip\" to skip such steps)"
                )
            self.skipped += 1
            self.step += 1
            return value, key, t
        backend.apply_gradients(self.optimizer, grads, path.trainable_variables)
        self.step += 1
        self._update_ema()
        return value, key, t

    def _update_ema(self) -> None:
        from keras import ops

        rate = self.cfg.ema.rate if self.step > self.cfg.ema.start_step else 0.0
        with backend.no_grad():
            self.ema = [
                e * rate + ops.stop_gradient(v.value) * (1.0 - rate)
                for e, v in zip(self.ema, self.model.trainable_variables)
            ]

    # ------------------------------------------------------------------ loop
    def fit(self, steps: int | None = None) -> dict:
        """Train until ``train.steps`` (or ``steps`` more); returns a summary."""
        cfg = self.cfg.train
        goal = cfg.steps if steps is None else min(cfg.steps, self.step + steps)
        previous = self._install_signal_handlers()
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.cfg.run.name, unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        window, window_paths, window_t, tick = [], [], [], time.perf_counter()
        start_step = self.step
        started = time.perf_counter()
        try:
            while self.step < goal:
                loss, key, t = self.train_step()
                window.append(loss)
                window_paths.append(key)
                window_t.append(float(t.mean()))
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", path=f"{key[0]}->{key[1]}", refresh=False)
                if self.step % cfg.log_every == 0 or self.step == goal:
                    now = time.perf_counter()
                    rate = len(window) / max(now - tick, 1e-9)
                    self._log(window, window_paths, window_t, rate)
                    window, window_paths, window_t, tick = [], [], [], now
                if self.step % cfg.checkpoint_every == 0:
                    self.save()
                if cfg.sample_every and self.step % cfg.sample_every == 0:
                    self.sample_grid(self.run_dir / "samples" / f"step_{self.step:09d}.png")
                if self._stop_requested:
                    path = self.save()
                    name = signal.Signals(self._stop_requested).name
                    raise Stopped(
                        f"stopped by {name} at step {self.step}; checkpoint {path}; run the same "
                        f"command again to resume", self._stop_requested)
            if self.step == goal:
                self.save()
        finally:
            bar.close()
            self._restore_signal_handlers(previous)
        elapsed = time.perf_counter() - started
        return {"step": self.step, "steps_run": self.step - start_step, "seconds": elapsed,
                "skipped": self.skipped}

    # ------------------------------------------------------------------ logging
    @property
    def log_path(self) -> Path:
        return self.run_dir / "log.csv"

    def _log(self, losses, paths, ts, rate) -> None:
        new = not self.log_path.exists()
        counts = {}
        for p in paths:
            counts[p] = counts.get(p, 0) + 1
        top = max(counts, key=counts.get)
        with open(self.log_path, "a", newline="") as f:
            w = csv.DictWriter(f, LOG_FIELDS)
            if new:
                w.writeheader()
            w.writerow({
                "step": self.step, "loss": f"{np.nanmean(losses):.6f}", "path": f"{top[0]}->{top[1]}",
                "t_mean": f"{np.mean(ts):.1f}", "steps_per_s": f"{rate:.3f}",
                "images_per_s": f"{rate * self.cfg.train.batch_size:.1f}", "skipped": self.skipped,
                "time": f"{time.time():.0f}",
            })

    def _trim_log(self) -> None:
        """After a resume, drop log rows written after the restored checkpoint."""
        if not self.log_path.exists():
            return
        with open(self.log_path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= self.step]
        with open(self.log_path, "w", newline="") as f:
            w = csv.DictWriter(f, LOG_FIELDS)
            w.writeheader()
            w.writerows(rows)

    # ------------------------------------------------------------------ sampling
    def ema_model(self):
        """A float32 Flexi-UNet holding the EMA weights."""
        model = build_model(self.cfg, precision="float32", channels=CHANNELS)
        for v, e in zip(model.trainable_variables, self.ema):
            v.assign(e)
        for v, src in zip(model.non_trainable_variables, self.model.non_trainable_variables):
            v.assign(src.value)
        return model

    def sample_grid(self, path: Path, num_images: int | None = None) -> Path:
        from .images import save_grid
        from .sample import sample_images

        s = self.cfg.sampler
        result = sample_images(
            self.ema_model(), self.process, self.objective,
            num_images=num_images or s.num_images, steps=s.steps, noise=s.noise,
            lanczos_iterations=s.lanczos_iterations, clip=s.clip, variance=s.variance,
            seed=s.seed, batch_size=s.batch_size, channels=CHANNELS, progress=False,
        )
        return save_grid(result.images, path)

    # ------------------------------------------------------------------ signals
    def _install_signal_handlers(self):
        def handler(signum, frame):
            if self._stop_requested:  # second signal: leave now; checkpoint writes are atomic
                raise KeyboardInterrupt
            self._stop_requested = signum
            warnings.warn(
                f"{signal.Signals(signum).name} received: finishing step {self.step + 1}, "
                f"writing a checkpoint and stopping (send it again to stop at once)",
                stacklevel=1,
            )

        previous = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: no signal handling
            pass
        return previous

    @staticmethod
    def _restore_signal_handlers(previous) -> None:
        for sig, h in previous.items():
            signal.signal(sig, h)


def _copy(variable):
    from keras import ops

    with backend.no_grad():
        return ops.copy(ops.stop_gradient(variable.value))


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None):
    """``(cfg, groups, meta, path)`` of a run's newest good checkpoint (or the one named)."""
    run_dir = Path(run_dir)
    if checkpoint is not None:
        path = Path(checkpoint)
        groups, meta = load_checkpoint(path)
    else:
        found = latest_good_checkpoint(run_dir / "checkpoints")
        if found is None:
            raise CheckpointError(f"{run_dir} has no readable checkpoint in {run_dir / 'checkpoints'}")
        path, groups, meta = found
    cfg = from_dict(meta["config"], source=str(path))
    return cfg, groups, meta, path
