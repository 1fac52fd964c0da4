"""What a checkpoint holds, and how it is written and read back.

One job: the training state (model weights, EMA, optimizer slots, the numpy RNG of
noise and timesteps, the data position, the step, the skipped-step count, the log
window and the float16 loss scale) is built from the config, saved as three groups of arrays plus metadata, and
restored so that a resumed run continues bit for bit. Data parallel, it also keeps the
ranks' states consistent (docs/distributed.md).
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np

from .. import backend, distributed
from ..builders import build_model, build_optimizer
from ..checkpoint import (CheckpointError, assign_checked, checkpoint_path, prune_checkpoints,
                          save_checkpoint, variable_names)
from ..config import ConfigError
from ..runs import CHANNELS
from .log import LogWindow
from .loss_scale import LossScale


class TrainState:
    """The state of a run that a checkpoint saves; everything else is rebuilt from the config.

    ``model`` and ``optimizer`` hold their own variables; ``ema`` is a list of tensors,
    one per trainable variable (replaced, not updated in place, by each step); ``rng``
    draws the timesteps and noise; ``data`` is the batch stream (its position is saved);
    ``saved_step`` is the step of the last checkpoint written or restored.
    """

    def __init__(self, cfg, data, rank: int = 0):
        self.cfg = cfg
        self.data = data
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
        self.rng = np.random.default_rng(cfg.run.seed if rank == 0 else [cfg.run.seed, rank])
        self.step = 0
        self.skipped = 0
        # the float16 loss scale (fixed at 1 under float32 and mixed_bfloat16)
        self.loss_scale = LossScale.from_config(cfg.train)
        # losses etc. of the steps since the last log row; checkpointed, so that the log
        # rows of a resumed run equal an uninterrupted run's
        self.window = LogWindow()
        self.saved_step = None
        self.init_record = None  # train.init_from's record (finetune.InitReport), if any

    def initialize_from_source(self):
        """A fresh run's weights from ``train.init_from`` (docs/finetune.md): the model and
        the EMA take the source's weights; returns the ``finetune.InitReport``."""
        from ..finetune import initialize

        _, report = initialize(self.model, self.cfg)
        self.ema = [_copy(v) for v in self.model.trainable_variables]
        self.init_record = report.to_dict()
        return report

    # ------------------------------------------------------------------ to a checkpoint
    def groups(self) -> dict[str, list[np.ndarray]]:
        """The arrays of a checkpoint: ``model`` (all variables), ``ema``, ``optimizer``."""
        from keras import ops

        return {
            "model": [ops.convert_to_numpy(v.value) for v in self.model.variables],
            "ema": [ops.convert_to_numpy(e) for e in self.ema],
            "optimizer": [ops.convert_to_numpy(v.value) for v in self.optimizer.variables],
        }

    def names(self) -> dict[str, list[str]]:
        """The variable names of each group of ``groups``, in order."""
        return {
            "model": variable_names(self.model.variables),
            "ema": variable_names(self.model.trainable_variables),
            "optimizer": variable_names(self.optimizer.variables, optimizer=True),
        }

    def meta(self) -> dict:
        """The checkpoint's metadata: config, RNG and data positions, counters, log window."""
        import keras

        return {
            "config": self.cfg.to_dict(),
            "rng": self.rng.bit_generator.state,
            "data": self.data.state(),
            "skipped": self.skipped,
            "log_window": self.window.state(),
            "backend": keras.backend.backend(),
            **({"init_from": self.init_record} if self.init_record else {}),
            **({"loss_scale": self.loss_scale.state()} if self.loss_scale.dynamic else {}),
        }

    def save(self, ckpt_dir: Path, dist) -> Path:
        """Write a checkpoint of the current step (atomically) and prune old ones.

        Data parallel: a collective call on every rank; rank 0 writes (weights, EMA and
        optimizer state are identical on all ranks; the RNG and data positions of all
        ranks go into ``meta["ranks"]``), then every rank learns whether the write worked.
        """
        meta = self.meta()
        if dist.world_size > 1:
            ranks = dist.gather_object({"rng": meta["rng"], "data": meta["data"]})
            meta["ranks"] = ranks
            meta["world_size"] = dist.world_size
            # the job's position for another number of processes: the least advanced rank
            meta["data"] = min((r["data"] for r in ranks), key=lambda d: (d["epoch"], d["position"]))
        error = None
        if dist.is_main:
            try:
                save_checkpoint(ckpt_dir, self.step, self.groups(), meta, self.names())
            except CheckpointError as exc:
                if dist.world_size == 1:
                    raise
                error = str(exc)
            else:
                try:
                    prune_checkpoints(ckpt_dir, self.cfg.train.keep_checkpoints,
                                      self.cfg.train.milestones)
                except OSError as exc:  # the new checkpoint is written; old ones merely linger
                    warnings.warn(f"could not prune old checkpoints in {ckpt_dir}: {exc}",
                                  stacklevel=3)
        if dist.world_size > 1:  # a barrier that carries rank 0's outcome
            error = dist.gather_object(error)[0]
            if error is not None:
                raise CheckpointError(error)
        self.saved_step = self.step
        return checkpoint_path(ckpt_dir, self.step)

    # ------------------------------------------------------------------ from a checkpoint
    def restore(self, groups: dict, meta: dict, dist, path=None,
                allow_config_change: bool = False) -> None:
        """Take over a checkpoint's state (``path`` names it in messages; ``dist`` picks
        this rank's RNG and data position). Every array is checked against its variable
        (name, shape) before anything is assigned."""
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
        rng, data = self._rank_state(meta, rng, data, dist)
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
        self.saved_step = step
        self.skipped = int(meta.get("skipped", 0))
        self.window = LogWindow.from_state(meta.get("log_window"))
        self.init_record = meta.get("init_from")  # the source is never read again
        self.loss_scale.restore(meta.get("loss_scale"))

    def _rank_state(self, meta: dict, rng, data, dist):
        """This rank's ``(rng state, data state)`` from a checkpoint's metadata.

        Same number of processes as when it was written: each rank's own (``meta["ranks"]``),
        an exact continuation. Another number: the data stream goes on from the job's
        position (``meta["data"]``: the least advanced rank's, so nothing is skipped); rank
        0 takes the saved RNG state and every other rank a fresh one from
        ``(run.seed, rank, step)`` (docs/distributed.md).
        """
        ranks = meta.get("ranks")
        n, r = dist.world_size, dist.rank
        if isinstance(ranks, list) and len(ranks) == n and n > 1:
            return ranks[r]["rng"], ranks[r]["data"]
        if r == 0:
            return rng, data
        fresh = np.random.default_rng([self.cfg.run.seed, r, int(meta["step"])])
        return fresh.bit_generator.state, data

    # ------------------------------------------------------------------ data parallel
    def check_ranks_agree(self, dist) -> None:
        """Every rank restored the same step and built the same variables."""
        mine = (self.step, len(self.model.variables), len(self.optimizer.variables))
        seen = dist.gather_object(mine)
        if any(tuple(o) != mine for o in seen):
            raise distributed.DistributedError(
                f"the processes disagree on (step, variables, optimizer variables): {seen}; "
                f"they must all see the same run directory and pipeline")

    def offset_seed_states(self, rank: int) -> None:
        """Give rank ``rank`` its own dropout streams: the seed of every ``SeedGenerator``
        state (``[seed, counter]``) is shifted by the rank, so the ranks draw different masks."""
        from keras import ops

        for v in self.model.non_trainable_variables:
            if "seed_generator_state" in v.path:
                state = np.array(ops.convert_to_numpy(v.value))
                state[0] = (int(state[0]) + 1_000_003 * rank) % (2 ** 31)
                v.assign(state)


def _copy(variable):
    from keras import ops

    with backend.no_grad():
        return ops.copy(ops.stop_gradient(variable.value))
