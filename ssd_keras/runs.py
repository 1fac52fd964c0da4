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


def write_samples(model, process, objective, cfg, out: Path, progress: bool = True) -> dict:
    """Sample ``cfg.sampler.num_images`` images with the ``[sampler]`` settings and write
    ``out/grid.png``, ``out/images/00000.png ...`` and ``out/progression.png``.

    Returns ``{"images", "seconds", "grid", "progression"}`` (how many, how long, where).
    """
    from .images import save_grid, save_images, save_progression
    from .sample import sample_images

    start = time.perf_counter()
    result = sample_images(model, process, objective, **dataclasses.asdict(cfg.sampler),
                           record_progression=True, progress=progress)
    seconds = time.perf_counter() - start
    out = Path(out)
    grid = save_grid(result.images, out / "grid.png")
    save_images(result.images, out / "images", digits=5)
    progression = save_progression(result.frames, out / "progression.png", process.image_size)
    return {"images": len(result.images), "seconds": seconds, "grid": grid, "progression": progression}
