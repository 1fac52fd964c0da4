"""Run directories: find one, read its newest checkpoint, build its model with its weights.

A run directory (``runs/<name>/``) holds ``config.toml``, ``checkpoints/ckpt_*.npz`` and
what training or ``ssd-run import`` wrote beside them. Sampling and evaluation load runs
through this module, so they never import the trainer.
"""

from __future__ import annotations

from pathlib import Path

from .checkpoint import CheckpointError, assign_checked, latest_good_checkpoint, load_checkpoint
from .config import from_dict

CHANNELS = 3  # RGB; the bundled digits are replicated to three channels


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


def load_sampling_model(run_dir, checkpoint=None, ema: bool = True):
    """``(model, process, objective)`` of a run's checkpoint, ready to sample from."""
    from .builders import build_process
    from .objectives import make_objective

    cfg, groups, meta, path = load_run(run_dir, checkpoint)
    model = model_with_weights(cfg, groups, meta, ema, where=f"checkpoint {path}")
    process = build_process(cfg)
    return model, process, make_objective(process, cfg.loss.target, cfg.loss.min_snr_gamma)
