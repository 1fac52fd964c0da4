"""The Trainer's public pieces used outside the CLI: ``train_step`` and ``ema_model``."""

import numpy as np
import pytest
from PIL import Image

from ssd_keras.config import from_dict


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from ssd_keras.train import Trainer

    root = tmp_path_factory.mktemp("trainer")
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / f"{i}.png")
    cfg = from_dict({
        "run": {"name": "steps", "output_dir": str(root / "runs"), "seed": 1},
        "data": {"source": "folder", "path": str(root), "random_flip": False, "num_workers": 1},
        "process": {"image_size": 16, "levels": 3, "timesteps": 60},
        "model": {"base_channels": 32, "channel_mult": [1, 1, 1], "num_res_blocks": 1,
                  "attention_resolutions": [], "dropout": 0.0},
        # weight decay: a variable off the path would move even with a zero gradient
        "optimizer": {"lr": 1e-3, "weight_decay": 0.01},
        "ema": {"rate": 0.9},
        "train": {"batch_size": 4, "steps": 100, "sample_every": 0},
    }, source="test_trainer")
    trainer = Trainer(cfg, progress=False)
    yield trainer
    trainer.close()


def weights(trainer):
    from keras import ops

    return [ops.convert_to_numpy(v.value) for v in trainer.model.trainable_variables]


def test_ema_model_is_built_once_and_refreshed(trainer):
    from keras import ops

    model = trainer.ema_model()
    trainer.train_step()
    assert trainer.ema_model() is model
    for v, e in zip(model.trainable_variables, trainer.ema):
        np.testing.assert_array_equal(ops.convert_to_numpy(v.value), ops.convert_to_numpy(e))
    for v, src in zip(model.non_trainable_variables, trainer.model.non_trainable_variables):
        np.testing.assert_array_equal(ops.convert_to_numpy(v.value), ops.convert_to_numpy(src.value))
