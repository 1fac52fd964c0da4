"""Atomic, backend-neutral checkpoints.

A checkpoint is one ``.npz`` file holding named lists of numpy arrays (model variables,
EMA, optimizer state) and a JSON metadata record (step, RNG and data positions, config).
It is written to a temporary file in the same directory, flushed to disk and renamed into
place, so a run killed at any moment leaves either the old set of checkpoints or the new
one, never a half-written file under a checkpoint name. Arrays are plain numpy, so a
checkpoint written under one Keras backend loads under the others.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt_(\d{9})\.npz$")
_TMP_PREFIX = ".tmp-"
_UMASK = os.umask(0o022)  # read the process umask (mkstemp creates files 0600) ...
os.umask(_UMASK)  # ... and put it back


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the model it is loaded into."""


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"ckpt_{int(step):09d}.npz"


def save_checkpoint(directory: str | Path, step: int, groups: dict[str, list], meta: dict) -> Path:
    """Write ``groups`` (name -> list of arrays) and ``meta`` atomically; return the path.

    A failure (disk full, unwritable directory, an interrupt) leaves the directory as it
    was: no temporary file behind, an existing checkpoint of the same step untouched. I/O
    failures raise ``CheckpointError`` naming the file and the reason.
    """
    directory = Path(directory)
    payload = {}
    for group, arrays in groups.items():
        for i, a in enumerate(arrays):
            payload[f"{group}/{i:05d}"] = np.asarray(a)
    record = dict(meta, step=int(step), format_version=FORMAT_VERSION,
                  groups={g: len(a) for g, a in groups.items()})
    payload["__meta__"] = np.frombuffer(json.dumps(record).encode(), dtype=np.uint8)
    final = checkpoint_path(directory, step)

    def write(f):
        np.savez(f, **payload)

    try:
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(final, write)
    except OSError as exc:
        raise CheckpointError(
            f"cannot write checkpoint {final}: {exc.strerror or exc}; the previous "
            f"checkpoints are untouched"
        ) from exc
    return final


def atomic_write(path: str | Path, write) -> Path:
    """Create or replace ``path`` atomically: ``write(binary_file)`` fills a temporary file
    in the same directory, which is flushed, synced and renamed over ``path``.

    On any failure (``OSError``, ``KeyboardInterrupt``, ...) the temporary file is removed
    and ``path`` keeps its old content; the exception propagates.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):  # the permissions of a file made with open()
                os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """``atomic_write`` of UTF-8 text."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


def load_checkpoint(path: str | Path) -> tuple[dict[str, list[np.ndarray]], dict]:
    """Read a checkpoint; raises ``CheckpointError`` naming the file if it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["__meta__"]).decode())
            groups = {
                g: [data[f"{g}/{i:05d}"] for i in range(n)] for g, n in meta["groups"].items()
            }
    except Exception as exc:  # zip, json and key errors all mean the same to a user
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc})") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format_version')}, expected {FORMAT_VERSION}")
    return groups, meta


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the checkpoint files in ``directory``, ascending by step."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_good_checkpoint(directory: str | Path):
    """``(path, groups, meta)`` of the newest readable checkpoint, or ``None``.

    Unreadable files (a disk that filled up, a copy cut short) are skipped with a warning.
    """
    for step, path in reversed(list_checkpoints(directory)):
        try:
            groups, meta = load_checkpoint(path)
        except CheckpointError as exc:
            warnings.warn(f"skipping {exc}", stacklevel=2)
            continue
        return path, groups, meta
    return None


def prune_checkpoints(directory: str | Path, keep: int, milestones=()) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints, sparing milestone steps."""
    ckpts = list_checkpoints(directory)
    spare = set(int(m) for m in milestones)
    removed = []
    for step, path in ckpts[: max(len(ckpts) - keep, 0)]:
        if step not in spare:
            path.unlink(missing_ok=True)
            removed.append(path)
    for leftover in Path(directory).glob(f"{_TMP_PREFIX}*.npz"):  # from a run killed mid-write
        leftover.unlink(missing_ok=True)
    return removed


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
