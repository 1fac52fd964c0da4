"""The training log ``log.csv``: one row per ``train.log_every`` steps.

One job: summarise the steps since the last row (the log window: their losses, paths and
mean timesteps) into a CSV row, append it, and on resume cut the file back to the rows of
the restored step. Rows are written at fixed steps only and the window is checkpointed,
so a resumed run writes exactly the rows of an uninterrupted one.
"""

from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path

import numpy as np

from ..checkpoint import atomic_write_text
from .run_dir import RunDirError

LOG_FIELDS = ["step", "loss", "path", "t_mean", "steps_per_s", "images_per_s", "skipped", "time"]


class LogWindow:
    """The steps since the last log row: loss, path ``(r_in, r_out)`` and mean ``t`` of each."""

    def __init__(self):
        self.losses: list[float] = []
        self.paths: list[tuple[int, int]] = []
        self.t: list[float] = []

    def add(self, loss: float, path: tuple[int, int], t_mean: float) -> None:
        self.losses.append(loss)
        self.paths.append(path)
        self.t.append(t_mean)

    def state(self) -> dict:
        """The window as a checkpoint stores it (``meta["log_window"]``)."""
        return {"losses": list(self.losses), "paths": list(self.paths), "t": list(self.t)}

    @classmethod
    def from_state(cls, state) -> "LogWindow":
        """The window of ``state()``; an empty one if ``state`` is missing or not one."""
        window = cls()
        if state and set(state) == set(window.state()):
            window.losses, window.t = list(state["losses"]), list(state["t"])
            window.paths = [tuple(p) for p in state["paths"]]
        return window

    def row(self, step: int, steps_per_s: float, batch_size: int, skipped: int) -> dict:
        """The log row of these steps (ending at ``step``): the mean of the finite losses,
        the most frequent path, the mean timestep, the speed."""
        counts = {}
        for p in self.paths:
            counts[p] = counts.get(p, 0) + 1
        top = max(counts, key=counts.get)
        finite = [v for v in self.losses if math.isfinite(v)]
        return {
            "step": step, "loss": f"{np.mean(finite):.6f}" if finite else "nan",
            "path": f"{top[0]}->{top[1]}", "t_mean": f"{np.mean(self.t):.1f}",
            "steps_per_s": f"{steps_per_s:.3f}", "images_per_s": f"{steps_per_s * batch_size:.1f}",
            "skipped": skipped, "time": f"{time.time():.0f}",
        }


def append_row(path: Path, row: dict) -> None:
    """Append ``row`` to the log at ``path`` (with the header if the file is new)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, LOG_FIELDS, lineterminator="\n")
    if not path.exists():
        w.writeheader()
    w.writerow(row)
    try:
        with open(path, "a", newline="") as f:
            f.write(buf.getvalue())  # one write: a kill leaves at most one partial row
    except OSError as exc:
        raise RunDirError(f"cannot write the training log {path}: "
                          f"{exc.strerror or exc}") from exc


def trim(path: Path, step: int) -> None:
    """Rewrite the log at ``path`` (atomically) with only the complete rows up to ``step``:
    rows written after the restored checkpoint, and a row cut short by a kill, go."""
    if not path.exists():
        return
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise RunDirError(f"cannot read the training log {path}: "
                          f"{exc.strerror or exc}") from exc
    lines = [line.rstrip("\r") for line in text.split("\n")]
    lines = lines[:-1]  # "" after the final newline, or a last line cut short
    rows = list(csv.reader(lines[1:])) if lines and lines[0] == ",".join(LOG_FIELDS) else []
    kept = []
    for r in rows:
        if len(r) != len(LOG_FIELDS):
            continue
        try:
            row_step = int(r[0])
        except ValueError:
            continue
        if row_step <= step:
            kept.append(r)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(LOG_FIELDS)
    w.writerows(kept)
    try:
        atomic_write_text(path, buf.getvalue())
    except OSError as exc:  # as any other write to the run directory before training
        raise RunDirError(f"cannot write to the run directory {path.parent}: "
                          f"{exc.strerror or exc}") from exc
