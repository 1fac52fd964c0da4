"""Training: one path per batch, EMA, atomic checkpoints, exact resume, clean stops.

``Trainer`` puts together the parts in ``ssd_keras/training/`` (the run directory, the
training state, the optimisation step, the log, the signal handlers) and reads top to
bottom: ``__init__`` builds the pieces from the config and restores the latest good
checkpoint of the run; ``train_step`` does one optimisation step on one Flexi-UNet path;
``fit`` loops with progress, logging, checkpoints and sample grids.
"""

from __future__ import annotations

from dataclasses import asdict
import signal
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import backend, distributed
from .builders import build_dataset, build_model, build_process
from .config import PipelineConfig
from .objectives import make_objective
from .runs import CHANNELS, class_rows, write_classes
from .training.log import LOG_FIELDS, LogWindow, append_row, trim as trim_log
from .training.run_dir import FolderLockedError, RunDir, RunDirError
from .training.signals import Stopped, StopSignals
from .training.state import TrainState
from .training.step import (DataParallelStep, NonFiniteLossError, PathGradients, Step, draw,
                            weighted_mse, with_timesteps)

# what other code imports from here: the trainer, its errors, the log columns
__all__ = ["Trainer", "Stopped", "NonFiniteLossError", "RunDirError", "FolderLockedError",
           "LOG_FIELDS"]


def _from_state(name: str, doc: str) -> property:
    return property(lambda self: getattr(self.state, name), doc=doc)


class Trainer:
    """Trains the run of a pipeline config (``runs/<run.name>/``); see the module docstring."""

    def __init__(
        self,
        cfg: PipelineConfig,
        *,
        resume: bool = True,
        allow_config_change: bool = False,
        progress: bool = True,
        dist=None,
    ):
        self.cfg = cfg
        # data parallelism (docs/distributed.md): torchrun's processes, or jax's local devices
        self._owns_dist = dist is None
        self.dist = distributed.context(cfg) if dist is None else dist
        self.is_main = self.dist.is_main
        self.progress = progress and self.is_main
        self.run = RunDir(cfg)
        self.run_dir, self.ckpt_dir, self.log_path = self.run.path, self.run.checkpoints, self.run.log
        self.signals = StopSignals(lambda: self.step, (self.run_dir, self.ckpt_dir),
                                   data_parallel=self.dist.world_size > 1)
        self._ema_model = None  # the sampling model of ema_model(), built on first use
        self.execution = backend.Execution.from_config(cfg)  # how paths run on this device
        # cheap checks first: a missing data folder or an unwritable output directory
        # fails before the (possibly large) model is built
        self.process = build_process(cfg)
        self.objective = make_objective(self.process, cfg.loss.target, cfg.loss.min_snr_gamma)
        try:
            # strided sharding: the checkpointed data position is the job's, so a run
            # resumes with another number of processes (one process: the plain stream)
            self.data = build_dataset(cfg, shard_index=self.dist.rank,
                                      num_shards=self.dist.world_size, sharding="strided")
            self.classes = self._check_classes(cfg, self.data)
        except BaseException:
            if self.__dict__.get("data") is not None:
                self.data.close()
            self._close_dist()
            raise
        try:
            self._jax_distribution = (distributed.jax_data_parallel(cfg)
                                      if backend.BACKEND == "jax" else None)
            self.run.claim(self.dist)  # writable, and locked: one job per run directory
            # model (initial weights from run.seed), optimizer, EMA, RNG: a fresh run's state
            self.state = TrainState(cfg, self.data, rank=self.dist.rank)
            # resume: the newest readable checkpoint, if the config still fits it
            existing = self.run.checkpoints_on_disk()
            found = self.run.resume_point(existing, resume, allow_config_change)
            self.resumed_from = None
            if found is not None:
                self.resumed_from, groups, meta = found
                self.state.restore(groups, meta, self.dist, self.resumed_from, allow_config_change)
                if self.is_main:
                    self.run.set_aside_unreadable(existing, self.step)
            # a fresh run from weights trained elsewhere (docs/finetune.md); on resume the
            # checkpoint holds them and the source is not read again
            self.initialized_from = (self.state.initialize_from_source()
                                     if found is None and cfg.train.init_from else None)
            if self.is_main:  # rank 0 alone writes to the run directory
                self.run.prepare()
                trim_log(self.log_path, self.step)
                if self.initialized_from is not None:
                    self.run.write_json("init_from.json", self.state.init_record)
                if self.classes is not None:
                    write_classes(self.run_dir, self.classes)
            if self.dist.world_size > 1:
                self.state.check_ranks_agree(self.dist)
                if self.dist.rank:
                    self.state.offset_seed_states(self.dist.rank)
            # the optimisation step: one process, or the ranks averaging their gradients;
            # how each path runs on this device (mode, precision): the execution layer
            gradients = PathGradients(self.model, self._loss_fn, self.execution)
            if self.dist.world_size > 1:
                self._step_fn = DataParallelStep(self.state, self.objective, gradients, cfg,
                                                 self.dist, self.signals, self._jax_distribution)
            else:
                self._step_fn = Step(self.state, self.objective, gradients, cfg,
                                     self._jax_distribution)
        except BaseException:
            self.close()
            raise

    # the training state (training/state.py), read through the trainer
    model = _from_state("model", "The Flexi-UNet being trained (all paths).")
    optimizer = _from_state("optimizer", "The optimizer (AdamW), built on all trainable variables.")
    ema = _from_state("ema", "The EMA tensors, one per trainable variable of ``model``.")
    rng = _from_state("rng", "The numpy generator of the training timesteps and noise.")
    step = _from_state("step", "The number of steps done (skipped non-finite ones included).")
    skipped = _from_state("skipped", "The number of steps skipped for a non-finite loss.")

    # ------------------------------------------------------------------ one step
    def train_step(self, x0: np.ndarray | None = None, t: np.ndarray | None = None,
                   y: np.ndarray | None = None) -> tuple[float, tuple[int, int], np.ndarray]:
        """One optimisation step; returns ``(loss, (r_in, r_out), t)``.

        ``x0``: the batch (this process's share, data parallel); by default the next one
        of the data stream. ``t``: the integer timesteps of the batch, one per image, all
        on one path (else ``ValueError``); the step trains that path, e.g. to time or
        probe one path. By default they are drawn with the paper's one-path-per-batch
        sampler (``_draw``). The noise always comes from the trainer's RNG (with a given
        ``t`` it is the only draw of the step, besides a class-conditional model's label
        dropout). ``y``: the labels of a given ``x0`` (class-conditional models, which
        need them; the data stream's batches carry their own).
        """
        if x0 is None:
            x0 = next(self.data)
            if self.classes is not None:
                x0, y = x0
        if (y is None) != (self.classes is None):
            raise ValueError("a class-conditional model's step needs the labels y of x0"
                             if y is None else "labels y given, but the model is unconditional")
        if t is None:
            t, key, noise = self._draw(x0.shape[0])
        else:
            t, key, noise = with_timesteps(self.process, self.rng, t, x0.shape[0])
        if y is None:
            return self._step_fn(x0, t, key, noise)
        return self._step_fn(x0, t, key, noise, y)

    @staticmethod
    def _check_classes(cfg, data):
        """The class names of a class-conditional run's data (``None`` if unconditional);
        a ``DataError`` if the data has no labels or another number of classes."""
        from .data import DataError

        if not cfg.model.num_classes:
            return None
        if data.classes is None:
            raise DataError(f"model.num_classes = {cfg.model.num_classes}: a class-conditional "
                            "model trains on labelled data; set data.labels = true")
        if len(data.classes) != cfg.model.num_classes:
            raise DataError(f"the data has {len(data.classes)} classes, model.num_classes = "
                            f"{cfg.model.num_classes}")
        return list(data.classes)

    def _draw(self, batch: int):
        """``(t, path key, noise)`` of one step: the path follows ``t[0]`` (one per batch).
        (Tests replace it on an instance to fix the inputs of a step.)"""
        return draw(self.process, self.rng, batch)

    def _loss_fn(self, prediction, target, weight):
        """The loss of every path's gradient function (a method: tests wrap it to make a
        loss non-finite or to send a signal in the forward pass)."""
        return weighted_mse(prediction, target, weight)

    # ------------------------------------------------------------------ loop
    def fit(self, steps: int | None = None) -> dict:
        """Train until ``train.steps`` (or ``steps`` more); returns a summary."""
        cfg = self.cfg.train
        goal = cfg.steps if steps is None else min(cfg.steps, self.step + steps)
        milestones = set(cfg.milestones)
        self.signals.install()
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.cfg.run.name, unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        tick, ticked = time.perf_counter(), 0
        start_step = self.step
        started = time.perf_counter()
        try:
            while self.step < goal:
                loss, key, t = self.train_step()
                self.state.window.add(loss, key, float(t.mean()))
                ticked += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", path=f"{key[0]}->{key[1]}", refresh=False)
                # log rows at fixed steps only (never at an interruption), so that a resumed
                # run writes the rows of an uninterrupted one; rank 0 alone writes them
                if self.is_main and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    now = time.perf_counter()
                    self._log(ticked / max(now - tick, 1e-9))
                    tick, ticked = now, 0
                if self.step % cfg.checkpoint_every == 0 or self.step in milestones:
                    self.save()
                if cfg.sample_every and self.step % cfg.sample_every == 0 and self.is_main:
                    self.sample_grid(self.run_dir / "samples" / f"step_{self.step:09d}.png")
                if self.signals.stop:
                    break
            if self.state.saved_step != self.step:
                self.save()
            stop = self.signals.stop
            if stop:
                name = signal.Signals(stop).name
                raise Stopped(
                    f"stopped by {name} at step {self.step}; checkpoint "
                    f"{self.ckpt_dir / f'ckpt_{self.step:09d}.npz'}; run the same command "
                    f"again to resume", stop)
        finally:
            bar.close()
            if not self.signals.requested:  # after a signal they stay, until close()
                self.signals.restore()
        elapsed = time.perf_counter() - started
        return {"step": self.step, "steps_run": self.step - start_step, "seconds": elapsed,
                "skipped": self.skipped}

    def _log(self, steps_per_s: float) -> None:
        """Append one row summarising the steps since the last row, and start a new window."""
        row = self.state.window.row(self.step, steps_per_s, self.cfg.train.batch_size,
                                    self.skipped)
        self.state.window = LogWindow()
        append_row(self.log_path, row)

    def close(self) -> None:
        """Stop the data loader's background threads, leave the process group, give back
        the signal handlers."""
        try:
            data = self.__dict__.get("data")
            if data is not None:
                data.close()
            if self.__dict__.get("_jax_distribution") is not None:
                import keras

                keras.distribution.set_distribution(None)
                self._jax_distribution = None
            self._close_dist()
        finally:
            self.run.unlock()
            self.signals.restore()

    def _close_dist(self) -> None:
        if self._owns_dist:
            self.dist.close()

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        """Write a checkpoint of the current step (``TrainState.save``: atomic, old ones
        pruned; data parallel, a collective call on every rank)."""
        return self.state.save(self.ckpt_dir, self.dist)

    def state_groups(self) -> dict[str, list[np.ndarray]]:
        """The arrays a checkpoint holds: ``model``, ``ema``, ``optimizer``."""
        return self.state.groups()

    def state_names(self) -> dict[str, list[str]]:
        """The variable names of each group of ``state_groups``, in order."""
        return self.state.names()

    def state_meta(self) -> dict:
        """The metadata a checkpoint holds (config, RNG, data position, counters)."""
        return self.state.meta()

    # ------------------------------------------------------------------ sampling
    def ema_model(self):
        """A float32 Flexi-UNet holding the current EMA weights (and the model's
        non-trainable state, e.g. dropout seeds).

        Built on the first call and refreshed on every later one: each call returns the
        same model, so a model returned earlier holds the newest EMA weights afterwards.
        """
        if self._ema_model is None:
            self._ema_model = build_model(self.cfg, precision="float32", channels=CHANNELS)
        model = self._ema_model
        for v, e in zip(model.trainable_variables, self.ema):
            v.assign(e)
        for v, src in zip(model.non_trainable_variables, self.model.non_trainable_variables):
            v.assign(src.value)
        return model

    def sample_grid(self, path: Path, num_images: int | None = None) -> Path:
        """Sample a grid with the ``[sampler]`` settings from the EMA weights into ``path``."""
        from .images import save_grid
        from .sample import sample_images

        s = self.cfg.sampler
        settings = dict(asdict(s), num_images=num_images or s.num_images)
        labels, columns = class_rows(self.cfg.model.num_classes, settings["num_images"])
        if labels is not None:
            settings["num_images"] = len(labels)
        result = sample_images(self.ema_model(), self.process, self.objective, **settings,
                               channels=CHANNELS, progress=False, labels=labels,
                               execution=self.execution)
        return save_grid(result.images, path, columns)
