"""Run directories: find one, read its newest checkpoint, build its model with its weights.

A run directory (``runs/<name>/``) holds ``config.toml``, ``checkpoints/ckpt_*.npz`` and
what training or ``ssd-run import`` wrote beside them. Sampling and evaluation load runs
through this module, so they never import the trainer.
"""

from __future__ import annotations

from pathlib import Path

from .checkpoint import CheckpointError, latest_good_checkpoint, load_checkpoint
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


def model_with_weights(cfg, groups: dict, ema: bool = True):
    """A float32 Flexi-UNet of ``cfg`` holding a checkpoint's EMA (or raw) weights; its
    non-trainable variables (e.g. dropout seed states) come from the raw model group."""
    from .builders import build_model

    model = build_model(cfg, precision="float32", channels=CHANNELS)
    trainable = [v.trainable for v in model.variables]
    if len(groups["model"]) != len(trainable):
        raise CheckpointError(
            f"checkpoint holds {len(groups['model'])} model tensors, the network of its "
            f"config has {len(trainable)}"
        )
    raw = dict(zip(map(id, model.variables), groups["model"]))
    weights = groups["ema"] if ema else [raw[id(v)] for v in model.trainable_variables]
    for v, a in zip(model.trainable_variables, weights):
        v.assign(a)
    for v in model.non_trainable_variables:
        v.assign(raw[id(v)])
    return model


def load_sampling_model(run_dir, checkpoint=None, ema: bool = True):
    """``(model, process, objective)`` of a run's checkpoint, ready to sample from."""
    from .builders import build_process
    from .objectives import make_objective

    cfg, groups, _, _ = load_run(run_dir, checkpoint)
    model = model_with_weights(cfg, groups, ema)
    process = build_process(cfg)
    return model, process, make_objective(process, cfg.loss.target, cfg.loss.min_snr_gamma)
