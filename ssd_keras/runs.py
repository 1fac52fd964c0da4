"""Run directories: find one, read its newest checkpoint, build its model with its weights,
sample from it.

A run directory (``runs/<name>/``) holds ``config.toml``, ``checkpoints/ckpt_*.npz`` and
what training or ``ssd-run import`` wrote beside them. Sampling and evaluation load runs
through this module, so they never import the trainer.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from .checkpoint import (CheckpointError, assign_checked, latest_good_checkpoint, list_checkpoints,
                         load_checkpoint)
from .config import from_dict

CHANNELS = 3  # RGB; the bundled digits are replicated to three channels
CLASSES_FILE = "classes.txt"  # a class-conditional run's class names, one a line, in label order


class RunNotFoundError(CheckpointError):
    """No run directory (with a ``checkpoints/`` folder) where one was asked for."""


def find_run(run: str | None, runs_dir: Path) -> Path:
    """The run ``run`` names (a directory, or a name under ``runs_dir``), or without a name
    the run under ``runs_dir`` whose newest checkpoint is the most recent."""
    runs_dir = Path(runs_dir)
    if run:
        for candidate in (Path(run), runs_dir / run):
            if (candidate / "checkpoints").is_dir():
                return candidate
        raise RunNotFoundError(f"no run {run!r}: neither {run} nor {runs_dir / run} holds a "
                               "checkpoints/ folder")
    runs = [p.parent.parent for p in runs_dir.glob("*/checkpoints/ckpt_*.npz")]
    if not runs:
        raise RunNotFoundError(f"no runs with checkpoints under {runs_dir}/; train one first: "
                               "ssd-run PIPELINE.toml")
    return max(runs, key=_newest_checkpoint_time)


def _newest_checkpoint_time(run_dir: Path) -> float:
    """The mtime of the run's newest checkpoint; a file pruned by a running trainer
    between the listing and the look is passed over."""
    times = []
    for p in (run_dir / "checkpoints").glob("ckpt_*.npz"):
        try:
            times.append(p.stat().st_mtime)
        except FileNotFoundError:
            continue
    return max(times, default=0.0)


def list_runs(runs_dir: Path) -> list[tuple[Path, int | None]]:
    """``(run directory, step of its newest checkpoint or None)`` of every run under
    ``runs_dir`` (a folder with a ``config.toml``), by name."""
    found = []
    for run_dir in sorted(p for p in Path(runs_dir).glob("*") if (p / "config.toml").is_file()):
        ckpts = list_checkpoints(run_dir / "checkpoints")
        found.append((run_dir, ckpts[-1][0] if ckpts else None))
    return found


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


def model_with_weights(cfg, groups: dict, meta: dict, ema: bool = True, where: str = "checkpoint"):
    """A float32 Flexi-UNet of ``cfg`` holding a checkpoint's EMA (or raw) weights; its
    non-trainable variables (e.g. dropout seed states) come from the raw model group.
    The checkpoint's variable names are verified first (``assign_checked``)."""
    from .builders import build_model

    model = build_model(cfg, precision="float32", channels=CHANNELS)
    names = meta.get("names", {})
    assign_checked(model.variables, groups["model"], names.get("model", []), "model", where)
    if ema:
        assign_checked(model.trainable_variables, groups["ema"], names.get("ema", []), "EMA", where)
    return model


def sampling_parts(cfg, groups: dict, meta: dict, path, ema: bool = True):
    """``(model, process, objective)`` of a loaded checkpoint (:func:`load_run`), with its
    EMA (or raw) weights."""
    from .builders import build_process
    from .objectives import make_objective

    model = model_with_weights(cfg, groups, meta, ema, where=f"checkpoint {path}")
    process = build_process(cfg)
    return model, process, make_objective(process, cfg.loss.target, cfg.loss.min_snr_gamma)


def load_sampling_model(run_dir, checkpoint=None, ema: bool = True):
    """``(model, process, objective)`` of a run's checkpoint, ready to sample from."""
    cfg, groups, meta, path = load_run(run_dir, checkpoint)
    return sampling_parts(cfg, groups, meta, path, ema)


def settings_name(step: int, sampler) -> str:
    """The folder name of samples drawn at ``step`` with ``sampler`` settings, e.g.
    ``step1500_K100_exact_seed0`` (ddim: ``..._ddim0.5_...``, its eta)."""
    method = sampler.noise if sampler.method == "ancestral" else f"ddim{sampler.eta:g}"
    return f"step{step}_K{sampler.steps}_{method}_seed{sampler.seed}"


# ------------------------------------------------------------------ classes
def write_classes(run_dir, classes) -> Path:
    """Record a class-conditional run's class names (label order) in ``run_dir/classes.txt``."""
    path = Path(run_dir) / CLASSES_FILE
    text = "".join(f"{name}\n" for name in classes)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return path


def read_classes(run_dir, num_classes: int) -> list[str]:
    """The class names of a run (``classes.txt``; else the label numbers ``"0"...``)."""
    path = Path(run_dir) / CLASSES_FILE
    if path.is_file():
        names = path.read_text(encoding="utf-8").splitlines()
        if len(names) == num_classes:
            return names
    return [str(i) for i in range(num_classes)]


def resolve_classes(asked, names: list[str]) -> list[int]:
    """Class indices of the names or indices ``asked`` (``"7"``, ``"golden retriever"``,
    ``"3,5"``); a ``ValueError`` names the first unknown one."""
    out = []
    for item in asked:
        for token in [item] if item in names else str(item).split(","):
            token = token.strip()
            if token in names:
                out.append(names.index(token))
            elif token.isdigit() and int(token) < len(names):
                out.append(int(token))
            else:
                shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
                raise ValueError(f"unknown class {token!r}; this run's {len(names)} classes "
                                 f"are {shown} (a name or an index 0..{len(names) - 1})")
    return out


def class_rows(num_classes: int, num_images: int, classes=None):
    """``(labels, columns)``: one grid row per class of ``classes`` (default all), each of
    ``num_images // len(classes)`` images (at least 1); ``(None, None)`` unconditional."""
    import numpy as np

    if not num_classes:
        return None, None
    classes = list(range(num_classes)) if classes is None else list(classes)
    per_row = max(1, num_images // len(classes))
    return np.repeat(np.asarray(classes, np.int32), per_row), per_row


def write_samples(model, process, objective, cfg, out: Path, progress: bool = True,
                  classes=None, names=None) -> dict:
    """Sample ``cfg.sampler.num_images`` images with the ``[sampler]`` settings and write
    ``out/grid.png``, ``out/images/00000.png ...`` and ``out/progression.png``.

    A class-conditional model draws one grid row per class of ``classes`` (indices;
    default all), with guidance ``sampler.guidance``, and ``out/labels.txt`` names each
    image's class (``names``). Returns ``{"images", "seconds", "grid", "progression"}``
    (how many, how long, where).
    """
    from .images import save_grid, save_images, save_progression
    from .sample import sample_images

    settings = dataclasses.asdict(cfg.sampler)
    labels, columns = class_rows(getattr(model, "num_classes", 0), settings["num_images"], classes)
    if labels is not None:
        settings["num_images"] = len(labels)
    start = time.perf_counter()
    result = sample_images(model, process, objective, **settings, labels=labels,
                           record_progression=True, progress=progress)
    seconds = time.perf_counter() - start
    out = Path(out)
    grid = save_grid(result.images, out / "grid.png", columns)
    save_images(result.images, out / "images", digits=5)
    if labels is not None:
        names = names or [str(i) for i in range(model.num_classes)]
        (out / "labels.txt").write_text("".join(
            f"images/{i:05d}.png,{names[c]}\n" for i, c in enumerate(labels)), encoding="utf-8")
    progression = save_progression(result.frames, out / "progression.png", process.image_size)
    return {"images": len(result.images), "seconds": seconds, "grid": grid, "progression": progression}
