"""Numerics of a training step (docs/math.md "Mixed precision"): non-finite gradients
never reach AdamW or the EMA (``train.on_nonfinite``), the float16 loss scale (overflow,
underflow, growth, checkpoints), and mixed precision tracking float32.

Tiny model (tests/test_end_to_end.py's), fixed seeds, a few steps each.
"""

import numpy as np
import pytest

from _dist_worker import poisoned_loss_fn, zero_weight_at
from test_end_to_end import TINY, write_images

from ssd_keras.config import load_pipeline
from ssd_keras.distributed import Single
from ssd_keras.training.loss_scale import APPLY, MIN_SCALE, NONFINITE, OVERFLOW, LossScale

U_BF16 = 2.0 ** -8   # unit roundoff of bfloat16 (8 significand bits)
U_FP16 = 2.0 ** -11  # unit roundoff of float16 (11 significand bits)


@pytest.fixture
def pipe(tmp_path):
    write_images(tmp_path / "data", n=10)
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.format(out=tmp_path / "runs", data=tmp_path / "data")
                    .replace("sample_every = 4", "sample_every = 0"))
    return path


def trainer_for(pipe, *overrides):
    from ssd_keras.train import Trainer

    return Trainer(load_pipeline(pipe, list(overrides)), progress=False, dist=Single())


def snapshot(trainer) -> list[np.ndarray]:
    """Weights, EMA and optimizer state (copies)."""
    from keras import ops

    return ([np.array(ops.convert_to_numpy(v.value)) for v in trainer.model.variables]
            + [np.array(ops.convert_to_numpy(e)) for e in trainer.ema]
            + [np.array(ops.convert_to_numpy(v.value)) for v in trainer.optimizer.variables])


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------- a NaN gradient, finite loss
def poison_gradients(monkeypatch):
    """NaN gradients with a finite loss in the steps ``zero_weight_at`` marks."""
    from ssd_keras.train import Trainer

    monkeypatch.setattr(Trainer, "_loss_fn", poisoned_loss_fn(Trainer._loss_fn))


@pytest.mark.backend
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_nan_gradient_with_a_finite_loss_never_reaches_adamw_nor_the_ema(pipe, monkeypatch,
                                                                           policy):
    from ssd_keras.train import NonFiniteLossError

    poison_gradients(monkeypatch)
    trainer = trainer_for(pipe, f"train.on_nonfinite={policy}")
    try:
        zero_weight_at(trainer, {2})
        loss, _, _ = trainer.train_step()  # a clean step: the added term changes nothing
        assert np.isfinite(loss)
        before = snapshot(trainer)
        if policy == "stop":
            with pytest.raises(NonFiniteLossError, match="gradients are non-finite") as info:
                trainer.train_step()
            assert "at step 2" in str(info.value) and "loss " in str(info.value)
            assert trainer.step == 1 and trainer.skipped == 0
        else:
            loss, _, _ = trainer.train_step()
            assert np.isfinite(loss)  # the loss was finite: only the gradients were not
            assert trainer.step == 2 and trainer.skipped == 1
        assert_same(snapshot(trainer), before)  # weights, EMA, AdamW moments and counter
        if policy == "skip":  # training goes on from the untouched state
            trainer.train_step()
            after = snapshot(trainer)
            assert all(np.isfinite(a).all() for a in after)
            assert any(not np.array_equal(a, b) for a, b in zip(after, before))
    finally:
        trainer.close()


# ----------------------------------------------------------------- the loss scale's rules
def test_loss_scale_follows_torch_gradscaler_update_rule():
    """Against torch's own GradScaler update kernel over a random sequence of clean and
    overflowing steps (the scale stays above our floor of 1)."""
    import torch

    rng = np.random.default_rng(0)
    ours = LossScale(True, 2.0 ** 16, growth_interval=3)
    scale = torch.full((1,), 2.0 ** 16)
    tracker = torch.zeros(1, dtype=torch.int32)
    for overflow in rng.random(200) < 0.2:
        verdict = ours.verdict(True, not overflow)
        assert verdict == (OVERFLOW if overflow else APPLY)
        torch._amp_update_scale_(scale, tracker, torch.full((1,), float(overflow)), 2.0, 0.5, 3)
        assert ours.scale == float(scale) and ours.good_steps == int(tracker)
    assert ours.scale != 2.0 ** 16  # the sequence moved it


def test_loss_scale_floor_non_finite_loss_and_fixed_scale():
    s = LossScale(True, 2.0, growth_interval=5)
    assert s.verdict(True, False) == OVERFLOW and s.scale == MIN_SCALE == 1.0
    # at scale 1 nothing is scaled: a non-finite gradient is train.on_nonfinite's call
    assert s.verdict(True, False) == NONFINITE and s.scale == 1.0
    # a non-finite loss is never a scale problem; it resets the clean-step count
    s.good_steps = 4
    assert s.verdict(False, False) == NONFINITE and s.scale == 1.0 and s.good_steps == 0
    fixed = LossScale(False)
    assert fixed.scale == 1.0 and fixed.state() is None
    assert fixed.verdict(True, False) == NONFINITE
    for _ in range(3):
        assert fixed.verdict(True, True) == APPLY
    assert fixed.scale == 1.0


# ----------------------------------------------------------------- float16: the loss scale
def needs_float16():
    from ssd_keras import backend

    why = backend.float16_unsupported()
    if why:  # jax on the CPU (test_float16_where_unsupported_is_a_clear_config_error)
        pytest.skip(why)


@pytest.mark.backend
def test_float16_where_unsupported_is_a_clear_config_error(pipe):
    from ssd_keras import backend
    from ssd_keras.config import ConfigError

    if backend.float16_unsupported() is None:
        trainer_for(pipe, "train.precision=mixed_float16").close()  # builds and runs below
        return
    with pytest.raises(ConfigError, match='train.precision = "mixed_float16": jax'):
        trainer_for(pipe, "train.precision=mixed_float16")


@pytest.mark.backend
def test_float16_overflow_skips_the_step_and_halves_the_scale(pipe):
    """A scale of 2^100 overflows float16 in the backward pass (the loss itself, float32,
    stays finite): the step is skipped, the scale halved, the weights, the EMA and AdamW's
    state untouched, and the run goes on although on_nonfinite = "stop"."""
    needs_float16()
    trainer = trainer_for(pipe, "train.precision=mixed_float16",
                          f"train.loss_scale_init={2.0 ** 100}")
    try:
        assert trainer.cfg.train.on_nonfinite == "stop"
        before = snapshot(trainer)
        loss, _, _ = trainer.train_step()
        assert np.isfinite(loss)  # reported unscaled
        assert trainer.step == 1 and trainer.skipped == 1
        assert trainer.state.loss_scale.scale == 2.0 ** 99
        assert_same(snapshot(trainer), before)
        trainer.state.loss_scale.scale = 2.0 ** 8  # a scale that fits: the step applies
        trainer.train_step()
        assert trainer.step == 2 and trainer.skipped == 1
        assert any(not np.array_equal(a, b) for a, b in zip(snapshot(trainer), before))
    finally:
        trainer.close()


def _gradients(trainer, scale, x0, t, key, noise):
    """The unscaled gradients of one step at loss scale ``scale``, flattened (the Step's
    own path: ``inputs`` scales the weights, ``backend.unscale_and_check`` unscales)."""
    from keras import ops

    from ssd_keras import backend

    trainer.state.loss_scale.scale = scale
    step = trainer._step_fn
    _, fn = step.gradients(key)
    _, grads = fn(*step.inputs(x0, t, noise))
    grads, found = backend.unscale_and_check(grads, 1.0 / scale)
    assert backend.to_host([found]) == [0.0]
    return np.concatenate([ops.convert_to_numpy(g).ravel() for g in grads])


@pytest.mark.backend
def test_float16_small_gradients_flush_to_zero_without_the_loss_scale_and_not_with_it(
        pipe, monkeypatch):
    """With the loss multiplied by 2^-20 (a small loss), the float16 backward pass flushes
    every gradient to zero at scale 1; at scale 2^24 none, and the unscaled gradients equal
    float32's within 8 float16 rounding units (measured: 6.8e-4 = 1.4 units)."""
    needs_float16()
    from ssd_keras.train import Trainer

    original = Trainer._loss_fn
    monkeypatch.setattr(Trainer, "_loss_fn",
                        lambda self, p, y, w: original(self, p, y, w) * 2.0 ** -20)
    grads = {}
    for precision in ("float32", "mixed_float16"):
        trainer = trainer_for(pipe, f"train.precision={precision}", f"run.name={precision}")
        try:
            x0 = next(trainer.data)
            t, key, noise = trainer._draw(x0.shape[0])  # same seed: same batch and draw
            for scale in (1.0, 2.0 ** 24):
                grads[precision, scale] = _gradients(trainer, scale, x0, t, key, noise)
        finally:
            trainer.close()
    ref = grads["float32", 1.0]
    np.testing.assert_array_equal(grads["float32", 2.0 ** 24], ref)  # exact in float32
    live = ref != 0  # at initialisation the zero-initialised convs stop most gradients
    assert live.sum() > 500
    assert np.all(grads["mixed_float16", 1.0][live] == 0)  # underflow: all flushed
    scaled = grads["mixed_float16", 2.0 ** 24]
    assert np.count_nonzero(scaled[live] == 0) == 0
    assert np.linalg.norm(scaled - ref) <= 8 * U_FP16 * np.linalg.norm(ref)


@pytest.mark.backend
def test_float16_scale_grows_after_clean_steps_and_round_trips_a_checkpoint(pipe, tmp_path):
    """Growth every 3 clean steps from 2^8; the scale and its clean-step count are saved
    and restored, and a run resumed at step 4 is bitwise the uninterrupted run at step 6."""
    needs_float16()
    over = ["train.precision=mixed_float16", f"train.loss_scale_init={2.0 ** 8}",
            "train.loss_scale_growth_interval=3", "train.checkpoint_every=4"]
    trainer = trainer_for(pipe, *over, "train.steps=6")
    try:
        scales = []
        for _ in range(6):
            trainer.train_step()
            scales.append((trainer.state.loss_scale.scale, trainer.state.loss_scale.good_steps))
            if trainer.step == 4:
                trainer.save()
        assert trainer.skipped == 0
        assert scales == [(256, 1), (256, 2), (512, 0), (512, 1), (512, 2), (1024, 0)]
        straight = snapshot(trainer)
        assert trainer.state_meta()["loss_scale"] == {"scale": 1024.0, "good_steps": 0}
    finally:
        trainer.close()
    resumed = trainer_for(pipe, *over, "train.steps=6")
    try:
        assert resumed.step == 4
        assert (resumed.state.loss_scale.scale, resumed.state.loss_scale.good_steps) == (512, 1)
        resumed.fit()
        assert resumed.step == 6 and resumed.state.loss_scale.scale == 1024.0
        assert_same(snapshot(resumed), straight)
    finally:
        resumed.close()


# ----------------------------------------------------------------- mixed precision tracks float32
def _run(pipe, precision, steps):
    from keras import ops

    trainer = trainer_for(pipe, f"train.precision={precision}", f"run.name={precision}")
    try:
        start = [np.array(ops.convert_to_numpy(v.value)) for v in trainer.model.trainable_variables]
        losses = [trainer.train_step()[0] for _ in range(steps)]
        # master weights, AdamW state and EMA stay float32 whatever the compute dtype
        dtypes = {str(ops.convert_to_numpy(v.value).dtype) for v in trainer.model.variables
                  if "seed_generator" not in v.path}
        dtypes |= {str(ops.convert_to_numpy(v.value).dtype) for v in trainer.optimizer.variables
                   if v.path.split("/")[-1] != "iteration"}
        dtypes |= {str(ops.convert_to_numpy(e).dtype) for e in trainer.ema}
        moved = np.concatenate([(ops.convert_to_numpy(v.value) - s).ravel()
                                for v, s in zip(trainer.model.trainable_variables, start)])
        return np.array(losses), moved, dtypes, trainer.skipped
    finally:
        trainer.close()


@pytest.mark.slow
@pytest.mark.parametrize("precision, u", [("mixed_bfloat16", U_BF16), ("mixed_float16", U_FP16)])
def test_mixed_precision_training_tracks_float32(pipe, precision, u):
    """30 steps from the same initial weights on the same batches, timesteps and noise.

    Tolerances, with ``u`` the compute dtype's unit roundoff: the mean loss over the run
    within ``16 u`` of float32's (the loss is quadratic in the prediction, 2u per
    rounding, times 8 for roundings compounding through the network's depth; measured
    on torch: 8e-5 = 0.02 u for bfloat16); the weights' total change within half its
    norm of float32's (measured 0.17 for bfloat16 and 0.02 for float16 with the loss
    scale; float16 *without* it, i.e. with gradients underflowing, was at 0.82).
    """
    steps = 30
    ref_losses, ref_moved, ref_dtypes, _ = _run(pipe, "float32", steps)
    losses, moved, dtypes, skipped = _run(pipe, precision, steps)
    assert ref_dtypes == dtypes == {"float32"}
    assert skipped == 0  # the default 2^16 scale never overflowed here
    assert abs(losses.mean() - ref_losses.mean()) <= 16 * u * ref_losses.mean()
    assert np.linalg.norm(moved - ref_moved) <= 0.5 * np.linalg.norm(ref_moved)
