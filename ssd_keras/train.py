"""Training: one path per batch, EMA, atomic checkpoints, exact resume, clean stops.

Reads top to bottom: ``Trainer.__init__`` builds the pieces from the config and restores
the latest good checkpoint of the run; ``train_step`` does one optimisation step on one
Flexi-UNet path; ``fit`` loops with progress, logging, checkpoints and sample grids.
"""

from __future__ import annotations

from dataclasses import asdict
import csv
import io
import math
import os
import random
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import backend, distributed
from .builders import build_dataset, build_model, build_optimizer, build_process
from .checkpoint import (
    CheckpointError,
    assign_checked,
    atomic_write_text,
    checkpoint_path,
    latest_good_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    variable_names,
)
from .config import ConfigError, PipelineConfig, from_dict, incompatible_keys
from .objectives import make_objective
from .runs import CHANNELS, load_run  # noqa: F401  (load_run: kept importable from here)
LOG_FIELDS = ["step", "loss", "path", "t_mean", "steps_per_s", "images_per_s", "skipped", "time"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite (``train.on_nonfinite = "stop"``)."""


class Stopped(Exception):
    """Training was stopped by a signal after writing a checkpoint."""

    def __init__(self, message: str, signum: int | None = None):
        super().__init__(message)
        self.signum = signum


class RunDirError(RuntimeError):
    """The run directory (or a file in it) cannot be created or written."""


class Trainer:
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
        self.run_dir = Path(cfg.run.output_dir) / cfg.run.name
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.step = 0
        self.skipped = 0
        self._grad_fns: dict = {}
        self._stop_requested = None  # the signal number once SIGINT/SIGTERM arrived
        self._previous_handlers = None  # while ours are installed: the ones they replaced
        self._stop_agreed = None
        self._saved_step = None  # the step of the last checkpoint written or restored
        # losses etc. of the steps since the last log row; checkpointed, so that the log
        # rows of a resumed run equal an uninterrupted run's
        self._window: dict = _empty_window()
        # cheap checks first: a missing data folder or an unwritable output directory
        # fails before the (possibly large) model is built
        self.process = build_process(cfg)
        self.objective = make_objective(self.process, cfg.loss.target, cfg.loss.min_snr_gamma)
        try:
            # strided sharding: the checkpointed data position is the job's, so a run
            # resumes with another number of processes (one process: the plain stream)
            self.data = build_dataset(cfg, shard_index=self.dist.rank,
                                      num_shards=self.dist.world_size, sharding="strided")
        except BaseException:
            self._close_dist()
            raise
        try:
            self._jax_distribution = (distributed.jax_data_parallel(cfg)
                                      if backend.BACKEND == "jax" else None)
            if self.is_main:
                self._check_writable()
            # The initial weights and dropout seeds follow run.seed: Keras draws the seeds of
            # unseeded initializers and SeedGenerators from Python's `random` when they are
            # created. (Not keras.utils.set_random_seed: it imports TensorFlow, if installed,
            # to seed it too, which costs seconds and memory under torch or jax.)
            outer = random.getstate()
            random.seed(cfg.run.seed)
            try:
                self.model = build_model(cfg, channels=CHANNELS)
            finally:
                random.setstate(outer)
            self.optimizer = build_optimizer(cfg)
            self.optimizer.build(self.model.trainable_variables)
            self.ema = [_copy(v) for v in self.model.trainable_variables]
            # rank 0 draws run.seed's stream (a one-process run's); rank r its own
            self.rng = np.random.default_rng(
                cfg.run.seed if self.dist.rank == 0 else [cfg.run.seed, self.dist.rank])
            self._prepare_run_dir(resume, allow_config_change)
            if self.dist.world_size > 1:
                self._check_ranks_agree()
                if self.dist.rank:
                    _offset_seed_states(self.model, self.dist.rank)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ run dir
    def _check_writable(self) -> None:
        """Create the run directory and prove it writable (fail before any work)."""
        try:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / f".tmp-write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise RunDirError(
                f"cannot write to the run directory {self.run_dir} (run.output_dir = "
                f"{self.cfg.run.output_dir!r}): {exc.strerror or exc}"
            ) from exc

    def _prepare_run_dir(self, resume: bool, allow_config_change: bool) -> None:
        existing = list_checkpoints(self.ckpt_dir)
        if existing and not resume:
            raise ConfigError(
                f"{self.run_dir} already holds checkpoints; resume it, or choose another "
                f"run.name (nothing was deleted)"
            )
        found = latest_good_checkpoint(self.ckpt_dir) if existing else None
        if existing and found is None:
            names = ", ".join(p.name for _, p in existing[-3:])
            raise CheckpointError(
                f"{self.ckpt_dir} holds no readable checkpoint ({names} cannot be read); "
                f"move them away to start the run over, or use another run.name"
            )
        if found is not None:
            path, groups, meta = found
            try:
                old = from_dict(meta["config"], source=str(path))
            except KeyError:
                raise CheckpointError(f"checkpoint {path} has no saved config") from None
            changed = incompatible_keys(old, self.cfg)
            if changed and not allow_config_change:
                raise ConfigError(
                    f"{self.run_dir}: the pipeline differs from the run's saved config in "
                    f"{', '.join(changed)}, which change the model or the process; use another "
                    f"run.name, or --allow-config-change to resume anyway"
                )
            self._restore(groups, meta, path, allow_config_change)
            self.resumed_from = path
            if self.is_main:
                self._set_aside_unreadable(existing)
        else:
            self.resumed_from = None
        if not self.is_main:  # rank 0 alone writes to the run directory
            return
        try:
            for leftover in self.run_dir.glob(".tmp-*"):  # a kill in the middle of a write
                leftover.unlink(missing_ok=True)
            atomic_write_text(self.run_dir / "config.toml", self.cfg.to_toml())
            self._trim_log()
        except OSError as exc:
            raise RunDirError(f"cannot write to the run directory {self.run_dir}: "
                              f"{exc.strerror or exc}") from exc

    def _set_aside_unreadable(self, existing) -> None:
        """Rename checkpoints newer than the restored one (all unreadable, or the newest
        good one would have been restored) to ``*.npz.unreadable``: they must not count
        as the newest ones when old checkpoints are pruned. Nothing is deleted."""
        for step, path in existing:
            if step > self.step:
                target = path.with_name(path.name + ".unreadable")
                try:
                    os.replace(path, target)
                except OSError:
                    continue
                warnings.warn(f"set aside the unreadable checkpoint {path.name} as {target.name}",
                              stacklevel=3)

    # ------------------------------------------------------------------ state
    def state_groups(self) -> dict[str, list[np.ndarray]]:
        from keras import ops

        return {
            "model": [ops.convert_to_numpy(v.value) for v in self.model.variables],
            "ema": [ops.convert_to_numpy(e) for e in self.ema],
            "optimizer": [ops.convert_to_numpy(v.value) for v in self.optimizer.variables],
        }

    def state_names(self) -> dict[str, list[str]]:
        """The variable names of each group of ``state_groups``, in order."""
        return {
            "model": variable_names(self.model.variables),
            "ema": variable_names(self.model.trainable_variables),
            "optimizer": variable_names(self.optimizer.variables, optimizer=True),
        }

    def state_meta(self) -> dict:
        import keras

        return {
            "config": self.cfg.to_dict(),
            "rng": self.rng.bit_generator.state,
            "data": self.data.state(),
            "skipped": self.skipped,
            "log_window": {k: list(v) for k, v in self._window.items()},
            "backend": keras.backend.backend(),
        }

    def _restore(self, groups: dict, meta: dict, path=None, allow_config_change: bool = False) -> None:
        from keras import ops

        where = f"checkpoint {path}" if path is not None else "checkpoint"
        try:
            model, optimizer, ema = groups["model"], groups["optimizer"], groups["ema"]
            step, rng, data = int(meta["step"]), meta["rng"], meta["data"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where} is incomplete (no {exc})") from None
        names = meta.get("names", {})
        checks = [(self.model.trainable_variables, ema, "ema", "EMA"),
                  (self.model.variables, model, "model", "model"),
                  (self.optimizer.variables, optimizer, "optimizer", "optimizer")]
        for assign in (False, True):  # everything is checked before anything is assigned
            for variables, arrays, group, what in checks:
                if group != "ema" or not assign:
                    assign_checked(variables, arrays, names.get(group, []), what, where, assign)
        self.ema = [ops.convert_to_tensor(a) for a in ema]
        rng, data = self._rank_state(meta, rng, data)
        try:
            self.rng.bit_generator.state = rng
        except (TypeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{where} has an unusable RNG state ({exc})") from None
        try:
            self.data.restore(data)
        except ValueError as exc:
            if not allow_config_change:
                raise ConfigError(
                    f"{where}: {exc} (the data changed since the checkpoint); use "
                    f"--allow-config-change to go on from the start of the saved epoch"
                ) from None
            epoch = data.get("epoch", 0) if isinstance(data, dict) else 0
            epoch = epoch if isinstance(epoch, int) and epoch >= 0 else 0
            self.data.restore({"epoch": epoch, "position": 0})
            warnings.warn(f"the data changed since {where}: the data stream starts "
                          f"again at epoch {epoch}", stacklevel=3)
        self.step = step
        self._saved_step = step
        self.skipped = int(meta.get("skipped", 0))
        window = meta.get("log_window") or {}
        self._window = _empty_window()
        if set(window) == set(self._window):
            self._window = {k: list(v) for k, v in window.items()}
            self._window["paths"] = [tuple(p) for p in self._window["paths"]]

    def _rank_state(self, meta: dict, rng, data):
        """This rank's ``(rng state, data state)`` from a checkpoint's metadata.

        Same number of processes as when it was written: each rank's own (``meta["ranks"]``),
        an exact continuation. Another number: the data stream goes on from the job's
        position (``meta["data"]``: the least advanced rank's, so nothing is skipped); rank
        0 takes the saved RNG state and every other rank a fresh one from
        ``(run.seed, rank, step)`` (docs/distributed.md).
        """
        ranks = meta.get("ranks")
        n, r = self.dist.world_size, self.dist.rank
        if isinstance(ranks, list) and len(ranks) == n and n > 1:
            return ranks[r]["rng"], ranks[r]["data"]
        if r == 0:
            return rng, data
        fresh = np.random.default_rng([self.cfg.run.seed, r, int(meta["step"])])
        return fresh.bit_generator.state, data

    def _check_ranks_agree(self) -> None:
        """Every rank restored the same step and built the same variables."""
        mine = (self.step, len(self.model.variables), len(self.optimizer.variables))
        seen = self.dist.gather_object(mine)
        if any(tuple(o) != mine for o in seen):
            raise distributed.DistributedError(
                f"the processes disagree on (step, variables, optimizer variables): {seen}; "
                f"they must all see the same run directory and pipeline")

    def save(self) -> Path:
        """Write a checkpoint of the current step (atomically) and prune old ones.

        Data parallel: a collective call on every rank; rank 0 writes (weights, EMA and
        optimizer state are identical on all ranks; the RNG and data positions of all
        ranks go into ``meta["ranks"]``), then every rank learns whether the write worked.
        """
        meta = self.state_meta()
        if self.dist.world_size > 1:
            ranks = self.dist.gather_object({"rng": meta["rng"], "data": meta["data"]})
            meta["ranks"] = ranks
            meta["world_size"] = self.dist.world_size
            # the job's position for another number of processes: the least advanced rank
            meta["data"] = min((r["data"] for r in ranks), key=lambda d: (d["epoch"], d["position"]))
        error = None
        if self.is_main:
            try:
                path = save_checkpoint(self.ckpt_dir, self.step, self.state_groups(), meta,
                                       self.state_names())
            except CheckpointError as exc:
                if self.dist.world_size == 1:
                    raise
                error = str(exc)
            else:
                try:
                    prune_checkpoints(self.ckpt_dir, self.cfg.train.keep_checkpoints,
                                      self.cfg.train.milestones)
                except OSError as exc:  # the new checkpoint is written; old ones merely linger
                    warnings.warn(f"could not prune old checkpoints in {self.ckpt_dir}: {exc}",
                                  stacklevel=2)
        if self.dist.world_size > 1:  # a barrier that carries rank 0's outcome
            error = self.dist.gather_object(error)[0]
            if error is not None:
                raise CheckpointError(error)
        self._saved_step = self.step
        return checkpoint_path(self.ckpt_dir, self.step)

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
        t, key, noise = self._draw(x0.shape[0])
        x_t, target, weight = self.objective.training_example(ops.convert_to_tensor(x0), t, noise)
        path, loss_and_grads = self._grads_for(key)
        inputs = (
            x_t,
            ops.convert_to_tensor(t.astype(np.float32)),
            ops.convert_to_tensor(target, dtype="float32"),
            ops.convert_to_tensor(np.asarray(weight, np.float32)),
        )
        if self._jax_distribution is not None:  # the batch split over the local devices
            inputs = distributed.shard_batch(self._jax_distribution, *inputs)
        loss, grads = loss_and_grads(*inputs)
        if self.dist.world_size > 1:
            return self._finish_step_data_parallel(loss, grads, key, path, t)
        value = float(ops.convert_to_numpy(loss))
        if not math.isfinite(value):
            where = f"step {self.step + 1}, t = {t.min()}..{t.max()}, level {key[0]}px, path {key[0]}->{key[1]}"
            self._stop_or_skip(f"loss is {value} at {where}")
            return value, key, t
        backend.apply_gradients(self.optimizer, grads, path.trainable_variables)
        self.step += 1
        self._update_ema()
        return value, key, t

    def _stop_or_skip(self, what: str) -> None:
        """A non-finite loss: raise (``train.on_nonfinite = "stop"``) or count the step as
        skipped, its update not applied."""
        if self.cfg.train.on_nonfinite == "stop":
            raise NonFiniteLossError(
                f"{what}; stopped without applying it (the last good checkpoint is kept; "
                f"set train.on_nonfinite = \"skip\" to skip such steps)"
            )
        self.skipped += 1
        self.step += 1

    def _draw(self, batch: int):
        """``(t, path key, noise)`` of one step: the path follows ``t[0]`` (one per batch)."""
        t = self.process.sample_training_timesteps(self.rng, batch)
        key = self.process.path_at(int(t[0]))
        noise = self.rng.standard_normal((batch, key[0], key[0], CHANNELS)).astype(np.float32)
        return t, key, noise

    def _finish_step_data_parallel(self, loss, grads, key, path, t):
        """Average the gradients over the ranks and apply them (docs/distributed.md).

        Every rank gathers the ranks' paths, so all agree on the union of their variables
        (in the model's order); a variable off this rank's path contributes zeros. One
        all-reduce carries the gradients, the loss, the non-finite flags and the stop
        requests, so every rank takes the same decision at the same step. The update is
        applied to the union only: a variable on no rank's path stays bit-identical, as in
        a one-process run; weights, EMA and optimizer state stay identical on all ranks.
        """
        from keras import ops

        keys = self.dist.gather_paths(key)
        union = self._union_variables(keys)
        mine = {id(v): g for v, g in zip(path.trainable_variables, grads)}
        value = float(ops.convert_to_numpy(loss))
        local_bad = not math.isfinite(value)
        stop = self._stop_requested
        extras = [0.0 if local_bad else value, float(local_bad),
                  float(stop == signal.SIGINT), float(stop == signal.SIGTERM)]
        averaged, (loss_sum, bad, sigints, sigterms) = self.dist.reduce_step(
            union, [mine.get(id(v)) for v in union], extras)
        # every rank stops after the step in which any rank had a signal (a signal arriving
        # later on one rank is seen by all in the next step's all-reduce)
        if sigints or sigterms:
            self._stop_agreed = signal.SIGTERM if sigterms else signal.SIGINT
        n = self.dist.world_size
        if bad:
            where = (f"step {self.step + 1}, on {int(bad)} of {n} processes (this one: rank "
                     f"{self.dist.rank}, loss {value}, t = {t.min()}..{t.max()}, path "
                     f"{key[0]}->{key[1]})")
            self._stop_or_skip(f"non-finite loss at {where}")
            return float("nan"), key, t
        backend.apply_gradients(self.optimizer, averaged, union)
        self.step += 1
        self._update_ema()
        return loss_sum / n, key, t

    def _union_variables(self, keys):
        """The trainable variables of the paths ``keys``, in the model's order (cached)."""
        cache = self.__dict__.setdefault("_unions", {})
        k = frozenset(keys)
        if k not in cache:
            ids = {id(v) for key in k for v in self._grads_for(key)[0].trainable_variables}
            cache[k] = [v for v in self.model.trainable_variables if id(v) in ids]
        return cache[k]

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
        milestones = set(cfg.milestones)
        self._stop_requested = None
        self._stop_agreed = None  # data parallel: the stop all ranks agreed on
        self._install_signal_handlers()
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.cfg.run.name, unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        tick, ticked = time.perf_counter(), 0
        start_step = self.step
        started = time.perf_counter()
        try:
            while self.step < goal:
                loss, key, t = self.train_step()
                self._window["losses"].append(loss)
                self._window["paths"].append(key)
                self._window["t"].append(float(t.mean()))
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
                if self._stopping():
                    break
            if self._saved_step != self.step:
                self.save()
            stop = self._stopping()
            if stop:
                name = signal.Signals(stop).name
                raise Stopped(
                    f"stopped by {name} at step {self.step}; checkpoint "
                    f"{self.ckpt_dir / f'ckpt_{self.step:09d}.npz'}; run the same command "
                    f"again to resume", stop)
        finally:
            bar.close()
            if not self._stop_requested:  # after a signal they stay, until close()
                self._restore_signal_handlers()
        elapsed = time.perf_counter() - started
        return {"step": self.step, "steps_run": self.step - start_step, "seconds": elapsed,
                "skipped": self.skipped}

    def _stopping(self):
        """The signal to stop on: this process's, or (data parallel) the ranks' agreed one,
        so that all ranks leave the loop at the same step."""
        return self._stop_agreed if self.dist.world_size > 1 else self._stop_requested

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
            self._restore_signal_handlers()

    def _close_dist(self) -> None:
        if self._owns_dist:
            self.dist.close()

    # ------------------------------------------------------------------ logging
    @property
    def log_path(self) -> Path:
        return self.run_dir / "log.csv"

    def _log(self, rate) -> None:
        """Append one row summarising the steps since the last row, and start a new window."""
        losses, paths, ts = self._window["losses"], self._window["paths"], self._window["t"]
        self._window = _empty_window()
        counts = {}
        for p in paths:
            counts[p] = counts.get(p, 0) + 1
        top = max(counts, key=counts.get)
        finite = [v for v in losses if math.isfinite(v)]
        row = {
            "step": self.step, "loss": f"{np.mean(finite):.6f}" if finite else "nan",
            "path": f"{top[0]}->{top[1]}", "t_mean": f"{np.mean(ts):.1f}",
            "steps_per_s": f"{rate:.3f}", "images_per_s": f"{rate * self.cfg.train.batch_size:.1f}",
            "skipped": self.skipped, "time": f"{time.time():.0f}",
        }
        buf = io.StringIO()
        w = csv.DictWriter(buf, LOG_FIELDS, lineterminator="\n")
        if not self.log_path.exists():
            w.writeheader()
        w.writerow(row)
        try:
            with open(self.log_path, "a", newline="") as f:
                f.write(buf.getvalue())  # one write: a kill leaves at most one partial row
        except OSError as exc:
            raise RunDirError(f"cannot write the training log {self.log_path}: "
                              f"{exc.strerror or exc}") from exc

    def _trim_log(self) -> None:
        """Rewrite the log (atomically) with only the complete rows up to the current step:
        rows written after the restored checkpoint, and a row cut short by a kill, go."""
        if not self.log_path.exists():
            return
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise RunDirError(f"cannot read the training log {self.log_path}: "
                              f"{exc.strerror or exc}") from exc
        lines = [line.rstrip("\r") for line in text.split("\n")]
        lines = lines[:-1]  # "" after the final newline, or a last line cut short
        rows = list(csv.reader(lines[1:])) if lines and lines[0] == ",".join(LOG_FIELDS) else []
        kept = []
        for r in rows:
            if len(r) != len(LOG_FIELDS):
                continue
            try:
                step = int(r[0])
            except ValueError:
                continue
            if step <= self.step:
                kept.append(r)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(LOG_FIELDS)
        w.writerows(kept)
        atomic_write_text(self.log_path, buf.getvalue())

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
        settings = dict(asdict(s), num_images=num_images or s.num_images)
        result = sample_images(self.ema_model(), self.process, self.objective, **settings,
                               channels=CHANNELS, progress=False)
        return save_grid(result.images, path)

    # ------------------------------------------------------------------ signals
    def _install_signal_handlers(self) -> None:
        """SIGINT/SIGTERM, from ``fit`` until it returns or, once a signal came, until
        ``close()`` (a second signal during the data loader's shutdown still counts).

        The first signal sets a flag: the step in progress finishes, a checkpoint is
        written and ``fit`` raises ``Stopped``. The second one ends the process at once
        (``_stop_at_once``). No-op outside the main thread (Python runs handlers there).
        """
        def handler(signum, frame):
            if self._stop_requested:
                self._stop_at_once(signum)
            self._stop_requested = signum
            message = (f"\n{signal.Signals(signum).name} received: finishing step {self.step + 1}, "
                       f"writing a checkpoint and stopping (send it again to stop at once)\n")
            try:  # os.write: safe even if the signal interrupted a print to stderr
                os.write(2, message.encode())
            except OSError:
                pass

        if self._previous_handlers is not None:
            return
        previous = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: no signal handling
            pass
        self._previous_handlers = previous

    def _restore_signal_handlers(self) -> None:
        previous, self._previous_handlers = self._previous_handlers, None
        for sig, h in (previous or {}).items():
            signal.signal(sig, h)

    def _stop_at_once(self, signum: int) -> None:
        """A second SIGINT/SIGTERM: end the process now with exit code 128 + signum.

        From the handler itself, not by raising an exception: Python raises a handler's
        exception in whatever code runs when the signal is handled, and code that catches
        everything swallows it. Keras does, in every forward pass (``Functional`` checks
        its inputs inside a bare ``except:``), so the run went on as if the second signal
        never came (it finished the step, wrote a checkpoint and exited 130). Checkpoint
        writes are atomic: the temporary file of a write in progress is removed, every
        checkpoint under its final name is complete.
        """
        for directory in (self.run_dir, self.ckpt_dir):
            try:
                leftovers = list(directory.glob(".tmp-*"))
            except OSError:
                leftovers = []
            for leftover in leftovers:
                try:
                    leftover.unlink()
                except OSError:
                    pass
        for stream in (sys.stdout, sys.stderr):  # what was printed before still shows
            try:
                stream.flush()
            except Exception:  # e.g. the signal came in the middle of a print
                pass
        message = (f"\nerror: {signal.Signals(signum).name} received as a second signal: "
                   f"stopped at once; the checkpoints already written are intact\n")
        try:
            os.write(2, message.encode())
        except OSError:
            pass
        os._exit(128 + signum)


def _offset_seed_states(model, rank: int) -> None:
    """Give rank ``rank`` its own dropout streams: the seed of every ``SeedGenerator``
    state (``[seed, counter]``) is shifted by the rank, so the ranks draw different masks."""
    from keras import ops

    for v in model.non_trainable_variables:
        if "seed_generator_state" in v.path:
            state = np.array(ops.convert_to_numpy(v.value))
            state[0] = (int(state[0]) + 1_000_003 * rank) % (2 ** 31)
            v.assign(state)


def _empty_window() -> dict:
    return {"losses": [], "paths": [], "t": []}


def _copy(variable):
    from keras import ops

    with backend.no_grad():
        return ops.copy(ops.stop_gradient(variable.value))
