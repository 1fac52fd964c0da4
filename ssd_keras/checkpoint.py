"""Atomic, backend-neutral checkpoints.

A checkpoint is one ``.npz`` file holding groups of numpy arrays (model variables, EMA,
optimizer state), each array keyed by its variable's path (``model/input_blocks_1_0/
in_layers_2/kernel``), and a JSON metadata record (step, RNG and data positions, config,
the paths of each group in order). Loading into a model verifies the paths
(``assign_checked``): a renamed or reordered variable is refused, naming the first
differing path, instead of loading silently into the wrong variable.
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

FORMAT_VERSION = 2  # 1: arrays keyed by position (before the official network)
_NAME = re.compile(r"^ckpt_(\d{9})\.npz$")
_TMP_PREFIX = ".tmp-"
_RELIST_TRIES = 100  # latest_good_checkpoint lists again while a trainer prunes under it
_UMASK = os.umask(0o022)  # read the process umask (mkstemp creates files 0600) ...
os.umask(_UMASK)  # ... and put it back


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the model it is loaded into."""


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"ckpt_{int(step):09d}.npz"


def variable_names(variables, optimizer: bool = False) -> list[str]:
    """The checkpoint names of ``variables``: their paths, but without the process-wide
    counters Keras puts into some: the dropout layers' seed states
    (``seed_generator_12/...``) are named by their order, and an optimizer's variables
    (``adam_w_2/input_blocks_0_0_kernel_momentum``) by ``optimizer/`` and the rest."""
    names, seeds = [], 0
    for v in variables:
        if optimizer:
            names.append("optimizer/" + v.path.split("/", 1)[-1])
        elif v.path.startswith("seed_generator"):
            names.append(f"seed_generator_state/{seeds}")
            seeds += 1
        else:
            names.append(v.path)
    return names


def assign_checked(variables, arrays, names, what: str, where: str, assign: bool = True) -> None:
    """Check that a checkpoint group's ``names`` are ``variables``' names, in order, and
    that every shape fits; then (``assign``) assign. Any mismatch raises
    ``CheckpointError`` naming the first differing path, and nothing is assigned."""
    expected = variable_names(variables, optimizer=what == "optimizer")
    for i, (theirs, ours) in enumerate(zip(names, expected)):
        if theirs != ours:
            raise CheckpointError(
                f"{where}: {what} tensor {i} is {theirs!r}, the model's is {ours!r} (a renamed "
                f"or reordered variable; the checkpoint does not fit this network)"
            )
    if len(names) != len(expected):
        raise CheckpointError(
            f"{where} holds {len(names)} {what} tensors, this model has {len(expected)}"
        )
    for v, a, name in zip(variables, arrays, expected):
        if tuple(v.shape) != tuple(a.shape):
            raise CheckpointError(
                f"{where}: {what} tensor {name} has shape {a.shape}, the model wants {tuple(v.shape)}"
            )
    if assign:
        for v, a in zip(variables, arrays):
            v.assign(a)


def save_checkpoint(directory: str | Path, step: int, groups: dict[str, list], meta: dict,
                    names: dict[str, list[str]]) -> Path:
    """Write ``groups`` (name -> list of arrays, ``names[group]`` their variable names)
    and ``meta`` atomically; return the path.

    A failure (disk full, unwritable directory, an interrupt) leaves the directory as it
    was: no temporary file behind, an existing checkpoint of the same step untouched. I/O
    failures raise ``CheckpointError`` naming the file and the reason.
    """
    directory = Path(directory)
    payload = {}
    for group, arrays in groups.items():
        keys = list(names[group])
        if len(keys) != len(arrays) or len(set(keys)) != len(keys):
            raise ValueError(f"checkpoint group {group!r}: {len(arrays)} arrays, "
                             f"{len(set(keys))} distinct names for them")
        for key, a in zip(keys, arrays):
            payload[f"{group}/{key}"] = np.asarray(a)
    record = dict(meta, step=int(step), format_version=FORMAT_VERSION,
                  groups={g: len(a) for g, a in groups.items()},
                  names={g: list(names[g]) for g in groups})
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
            if meta.get("format_version") != FORMAT_VERSION:
                groups = None
            else:
                groups = {g: [data[f"{g}/{k}"] for k in keys] for g, keys in meta["names"].items()}
    except Exception as exc:  # zip, json and key errors all mean the same to a user
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc})") from exc
    if groups is None:
        version = meta.get("format_version")
        hint = (" (arrays keyed by position, written before ssd_keras built the official "
                "network; its variables no longer match: retrain, or import an official "
                "checkpoint)") if version == 1 else ""
        raise CheckpointError(f"checkpoint {path} has format {version}, expected "
                              f"{FORMAT_VERSION}{hint}")
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
    Safe while a trainer writes to ``directory``: every file under a checkpoint name is
    complete (``atomic_write``), and one that vanishes between the listing and the read
    (pruned by the trainer) makes it list again, as it is no damaged file.
    """
    for _ in range(_RELIST_TRIES):
        vanished = False
        for step, path in reversed(list_checkpoints(directory)):
            try:
                groups, meta = load_checkpoint(path)
            except CheckpointError as exc:
                if not path.exists():  # pruned meanwhile: newer ones exist now
                    vanished = True
                    break
                warnings.warn(f"skipping {exc}", stacklevel=2)
                continue
            return path, groups, meta
        if not vanished:
            return None
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
