"""The run directory ``<run.output_dir>/<run.name>/`` before training starts.

One job: decide from what is on disk whether the run starts fresh or resumes (and from
which checkpoint), and leave the directory ready to train in: proven writable, unreadable
checkpoints set aside, leftovers of a killed write removed, ``config.toml`` written.
Nothing here is ever deleted except those leftovers (``.tmp-*``).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from ..checkpoint import CheckpointError, atomic_write_text, latest_good_checkpoint, list_checkpoints
from ..config import ConfigError, from_dict, incompatible_keys
from ..run_lock import FolderLock, FolderLockedError

__all__ = ["RunDir", "RunDirError", "FolderLockedError"]


class RunDirError(RuntimeError):
    """The run directory (or a file in it) cannot be created or written."""


class RunDir:
    """The paths of a run: ``path`` (the run directory), ``checkpoints``, ``log``."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.path = Path(cfg.run.output_dir) / cfg.run.name
        self.checkpoints = self.path / "checkpoints"
        self.log = self.path / "log.csv"
        self._lock = None

    def lock(self) -> None:
        """Take the run's lock (``ssd_keras/run_lock.py``): a second job on this run
        directory raises ``FolderLockedError`` at once. Held until ``unlock``."""
        if self._lock is None:
            self._lock = FolderLock(self.path, "run").acquire()

    def claim(self, dist) -> None:
        """Rank 0 proves the run directory writable and takes its lock; under data
        parallelism every rank learns the outcome (one gather) and raises the same error,
        so no rank waits for a rank 0 that has already given up."""
        error = None
        if dist.is_main:
            try:
                self.check_writable()
                self.lock()
            except (RunDirError, FolderLockedError) as exc:
                error = exc
        if dist.world_size > 1:
            first = dist.gather_object(None if error is None else
                                       (isinstance(error, FolderLockedError), str(error)))[0]
            if first is not None and error is None:
                error = (FolderLockedError if first[0] else RunDirError)(first[1])
        if error is not None:
            raise error

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def check_writable(self) -> None:
        """Create the run directory and prove it writable (fail before any work)."""
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".tmp-write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise RunDirError(
                f"cannot write to the run directory {self.path} (run.output_dir = "
                f"{self.cfg.run.output_dir!r}): {exc.strerror or exc}"
            ) from exc

    def checkpoints_on_disk(self) -> list[tuple[int, Path]]:
        """``(step, path)`` of every checkpoint file, readable or not, by step."""
        return list_checkpoints(self.checkpoints)

    def resume_point(self, existing, resume: bool, allow_config_change: bool):
        """``(path, groups, meta)`` of the checkpoint to resume from, or None: a fresh run.

        Refuses (``ConfigError``) to resume when ``resume`` is false, or when the saved
        config differs in keys that change the model or the process (unless
        ``allow_config_change``); refuses (``CheckpointError``) when no checkpoint of
        ``existing`` can be read. Never deletes anything.
        """
        if existing and not resume:
            raise ConfigError(
                f"{self.path} already holds checkpoints; resume it, or choose another "
                f"run.name (nothing was deleted)"
            )
        found = latest_good_checkpoint(self.checkpoints) if existing else None
        if existing and found is None:
            names = ", ".join(p.name for _, p in existing[-3:])
            raise CheckpointError(
                f"{self.checkpoints} holds no readable checkpoint ({names} cannot be read); "
                f"move them away to start the run over, or use another run.name"
            )
        if found is None:
            return None
        path, groups, meta = found
        try:
            old = from_dict(meta["config"], source=str(path))
        except KeyError:
            raise CheckpointError(f"checkpoint {path} has no saved config") from None
        changed = incompatible_keys(old, self.cfg)
        if changed and not allow_config_change:
            raise ConfigError(
                f"{self.path}: the pipeline differs from the run's saved config in "
                f"{', '.join(changed)}, which change the model or the process; use another "
                f"run.name, or --allow-config-change to resume anyway"
            )
        return found

    def set_aside_unreadable(self, existing, restored_step: int) -> None:
        """Rename checkpoints newer than the restored one (all unreadable, or the newest
        good one would have been restored) to ``*.npz.unreadable``: they must not count
        as the newest ones when old checkpoints are pruned. Nothing is deleted."""
        for step, path in existing:
            if step > restored_step:
                target = path.with_name(path.name + ".unreadable")
                try:
                    os.replace(path, target)
                except OSError:
                    continue
                warnings.warn(f"set aside the unreadable checkpoint {path.name} as {target.name}",
                              stacklevel=3)

    def prepare(self) -> None:
        """Remove what a kill in the middle of a write left (``.tmp-*``) and write the
        run's ``config.toml`` (rank 0 alone writes to the run directory)."""
        try:
            for leftover in self.path.glob(".tmp-*"):
                leftover.unlink(missing_ok=True)
            atomic_write_text(self.path / "config.toml", self.cfg.to_toml())
        except OSError as exc:
            raise RunDirError(f"cannot write to the run directory {self.path}: "
                              f"{exc.strerror or exc}") from exc

    def write_json(self, name: str, record: dict) -> None:
        """Write ``record`` as ``<run>/<name>`` (atomically)."""
        import json

        try:
            atomic_write_text(self.path / name, json.dumps(record, indent=2) + "\n")
        except OSError as exc:
            raise RunDirError(f"cannot write to the run directory {self.path}: "
                              f"{exc.strerror or exc}") from exc
