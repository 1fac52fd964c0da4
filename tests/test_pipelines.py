"""Every pipeline in pipelines/ parses, validates, builds, trains one step and samples.

The models are built at reduced width (base_channels 32, one res block) and trained on
tiny random batches, keeping each pipeline's structure: image size, levels,
channel_mult, attention resolutions, loss target, variance. The paper's values
(supplementary Tables 5/6) are checked on the files as written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ssd_keras.config import load_pipeline

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = sorted(p.stem for p in (ROOT / "pipelines").glob("*.toml"))
PAPER = [p for p in PIPELINES if p.startswith(("celeba", "imagenet"))]
#: the configurations of the paper's tables that must exist
EXPECTED = {"celeba64_2L", "celeba64_3L", "celeba64_4L", "celeba128_3L", "celeba128_5L",
            "celeba256_3L", "celeba256_4L", "celeba256_6L", "imagenet64_2L", "imagenet64_4L",
            "celeba64_ddpm_x0", "celeba64_ddpm_eps", "quickstart", "cifar10_3L"}

REDUCED = ["model.base_channels=32", "model.num_res_blocks=1", "model.dropout=0.0",
           'data.source="digits"', 'data.path=""', 'data.split_file=""', 'data.tfds_name=""',
           "data.random_flip=false", "data.num_workers=0"]


def test_every_paper_configuration_has_a_pipeline():
    assert EXPECTED <= set(PIPELINES), sorted(EXPECTED - set(PIPELINES))


@pytest.mark.parametrize("name", PAPER)
def test_paper_hyperparameters(name):
    """Supplementary Tables 5/6 of the paper."""
    cfg = load_pipeline(ROOT / "pipelines" / f"{name}.toml")
    size = cfg.process.image_size
    p, m, o = cfg.process, cfg.model, cfg.optimizer
    assert (p.timesteps, p.noise_schedule, p.resolution_schedule) == (1000, "linear", "ConvexDecay-0.5")
    assert (m.base_channels, m.num_res_blocks, tuple(m.attention_resolutions), m.num_heads) == (
        128, 2, (16, 8), 4)
    assert m.num_head_channels == -1 and m.channel_mult[0] == 1
    assert cfg.ema.rate == 0.9999
    assert o.weight_decay == 0.0  # AdamW, as the paper's
    assert cfg.train.batch_size == (64 if size == 256 else 128)
    assert o.lr == (5e-5 if size == 256 else 1e-4)
    assert cfg.train.precision == "float32"
    # the paper's training length (Table 5), the official code's dropout and clipping
    assert cfg.train.steps == (1_000_000 if size == 64 else 300_000)
    assert (m.dropout, o.grad_clip) == (0.0, 0.0)
    assert f"{p.levels}L" in name or "ddpm" in name
    if name.endswith("ddpm_eps"):
        assert (p.levels, cfg.loss.target, cfg.loss.min_snr_gamma, cfg.sampler.variance) == (
            1, "eps", 0.0, "fixed_large")
    else:
        assert (cfg.loss.target, cfg.loss.min_snr_gamma, cfg.sampler.variance) == (
            "x0", 5.0, "fixed_small")
        if "ddpm" in name:
            assert p.levels == 1
    # the same network as the CelebA-64 / ImageNet-64 DDPM baselines at 64 px
    if size == 64:
        assert tuple(m.channel_mult) == (1, 2, 3, 4)


@pytest.mark.parametrize("name", PIPELINES)
def test_pipeline_builds_trains_and_samples(name, tmp_path):
    from ssd_keras.sample import sample_images
    from ssd_keras.train import Trainer

    full = load_pipeline(ROOT / "pipelines" / f"{name}.toml")
    batch = 2 if full.process.image_size >= 128 else 4
    # class-conditional pipelines: the digits' 10 classes stand in for the data's
    classes = ["model.num_classes=10"] if full.model.num_classes else []
    cfg = load_pipeline(ROOT / "pipelines" / f"{name}.toml", REDUCED + classes + [
        f"train.batch_size={batch}", f'run.output_dir="{tmp_path.as_posix()}"',
        "train.steps=1", "train.sample_every=0"])
    # the structure is the pipeline's own
    for key in ("process.image_size", "process.levels", "model.channel_mult",
                "model.attention_resolutions", "loss.target", "sampler.variance"):
        assert cfg.get(key) == full.get(key), key

    trainer = Trainer(cfg, progress=False)
    size = cfg.process.image_size
    x0 = np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    from keras import ops

    before = [ops.convert_to_numpy(v.value) for v in trainer.model.trainable_variables]
    y = np.arange(batch) % 10 if cfg.model.num_classes else None
    loss, key, t = trainer.train_step(x0, y=y)
    assert np.isfinite(loss) and trainer.step == 1
    assert key == trainer.process.path_at(int(t[0]))
    changed = sum(not np.array_equal(b, ops.convert_to_numpy(v.value))
                  for b, v in zip(before, trainer.model.trainable_variables))
    assert changed > 0

    s = cfg.sampler
    result = sample_images(trainer.model, trainer.process, trainer.objective, num_images=1,
                           steps=2, noise=s.noise, variance=s.variance, batch_size=1,
                           progress=False, labels=[7] if cfg.model.num_classes else None,
                           guidance=s.guidance)
    assert result.images.shape == (1, size, size, 3)
    assert np.all(np.isfinite(result.images)) and np.abs(result.images).max() <= 1.0
    assert result.network_calls == len(trainer.process.respace(2)) == 2 + cfg.process.levels - 1
