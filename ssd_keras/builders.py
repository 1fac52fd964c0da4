"""Turn a validated ``PipelineConfig`` into the objects a run needs (one place, no logic)."""

from __future__ import annotations

import dataclasses

from .config import PipelineConfig
from .process import ScaleSpaceProcess


def build_process(cfg: PipelineConfig) -> ScaleSpaceProcess:
    return ScaleSpaceProcess(**dataclasses.asdict(cfg.process))


def build_model(cfg: PipelineConfig, *, precision: str | None = None, channels: int = 3):
    """The Flexi-UNet of a pipeline (``precision`` overrides ``train.precision``)."""
    from . import backend
    from .config import ConfigError
    from .nn import FlexiUNet

    policy = precision or cfg.train.precision
    why = backend.float16_unsupported() if policy == "mixed_float16" else None
    if why:
        raise ConfigError(f'{cfg.source}: train.precision = "mixed_float16": {why}')
    return FlexiUNet(
        cfg.process.image_size,
        cfg.process.resolutions,
        in_channels=channels,
        out_channels=channels,
        dtype=None if policy == "float32" else policy,
        **dataclasses.asdict(cfg.model),
    )


def build_optimizer(cfg: PipelineConfig):
    """AdamW with the pipeline's values set explicitly.

    Keras's AdamW differs from PyTorch's in its defaults (epsilon 1e-7, weight decay
    0.004), which is why every value is passed here; its bias correction counts one global
    step for all variables (PyTorch counts per parameter), so a variable on a rarely
    trained path gets a slightly different first-steps correction than in PyTorch.
    """
    import keras

    o = cfg.optimizer
    return keras.optimizers.AdamW(
        learning_rate=o.lr,
        weight_decay=o.weight_decay,
        beta_1=o.beta1,
        beta_2=o.beta2,
        epsilon=o.epsilon,
        global_clipnorm=o.grad_clip if o.grad_clip > 0 else None,
    )


def build_dataset(cfg: PipelineConfig, *, shard_index: int = 0, num_shards: int = 1,
                  sharding: str = "contiguous"):
    from .data import make_dataset

    d = dataclasses.asdict(cfg.data)
    for key in ("path", "split_file", "tfds_name", "tfds_data_dir", "labels_file"):
        d[key] = d[key] or None  # "" in TOML means "not set"
    d["limit"] = d["limit"] or None
    return make_dataset(
        image_size=cfg.process.image_size,
        batch_size=cfg.train.batch_size // num_shards,
        seed=cfg.run.seed,
        shard_index=shard_index,
        num_shards=num_shards,
        sharding=sharding,
        **d,
    )
