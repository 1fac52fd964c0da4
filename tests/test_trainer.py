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


def test_a_step_on_given_timesteps_trains_their_path_only(trainer):
    """``train_step(x0, t=...)`` trains the path of ``t`` (not a drawn one): every variable
    off that path stays bit-identical, and the noise is the only draw from the RNG."""
    process, batch = trainer.process, trainer.cfg.train.batch_size
    x0 = np.random.default_rng(2).uniform(-1, 1, (batch, 16, 16, 3)).astype(np.float32)
    smallest = min(process.paths)
    for key in [smallest] + [k for k in process.paths if k != smallest]:
        on_path = [t for t in range(process.timesteps) if process.path_at(t) == key]
        t = np.random.default_rng(3).choice(on_path, batch).astype(np.int32)
        path_ids = {id(v) for v in trainer.model.path(*key).trainable_variables}
        before, step = weights(trainer), trainer.step
        rng = np.random.default_rng()
        rng.bit_generator.state = trainer.rng.bit_generator.state
        rng.standard_normal((batch, key[0], key[0], 3))  # the noise of the step

        loss, got_key, got_t = trainer.train_step(x0, t=t)

        assert np.isfinite(loss) and trainer.step == step + 1
        assert got_key == key and got_t.dtype == np.int64
        np.testing.assert_array_equal(got_t, t)
        assert trainer.rng.bit_generator.state == rng.bit_generator.state
        changed = {id(v) for v, b, a in zip(trainer.model.trainable_variables, before, weights(trainer))
                   if not np.array_equal(b, a)}
        assert changed and changed <= path_ids, key
        if key == smallest:  # the test means something: some variables are off this path
            assert len(path_ids) < len(trainer.model.trainable_variables)


@pytest.mark.parametrize("t, message", [
    ("two paths", "on the paths"),
    ([0, 1], "expected 4 integer timesteps"),
    ([0.0, 0.0, 0.0, 0.0], "expected 4 integer timesteps"),
    ([0, 0, 0, 60], r"must be in \[0, 59\]"),
])
def test_given_timesteps_are_checked(trainer, t, message):
    process = trainer.process
    if t == "two paths":
        a, b = process.paths[0], process.paths[-1]
        t = [next(s for s in range(process.timesteps) if process.path_at(s) == k)
             for k in (a, a, b, b)]
    step, state = trainer.step, trainer.rng.bit_generator.state
    x0 = np.zeros((4, 16, 16, 3), np.float32)
    with pytest.raises(ValueError, match=message):
        trainer.train_step(x0, t=np.array(t))
    assert trainer.step == step and trainer.rng.bit_generator.state == state
