"""docs/math.md sections 1-2: noise schedules, levels and r(t)."""

import json
from pathlib import Path

import numpy as np
import pytest

from ssd_keras import schedules
from ssd_keras.schedules import (
    change_steps,
    level_resolutions,
    noise_schedule,
    parse_resolution_schedule,
    resolution_schedule,
)

ALL_KINDS = ["Equal", "ConvexDecay-0.5", "ConvexDecay-2", "TanhLikeDecay-2", "SigmoidLikeDecay-2",
             "TanhLikeDecay-1", "SigmoidLikeDecay-1.5"]


def test_linear_schedule_matches_ddpm_definition():
    betas = noise_schedule("linear", 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    assert np.allclose(np.diff(betas), (0.02 - 1e-4) / 999)
    # the scale s = 1000/T keeps the total noise comparable for other T
    short = noise_schedule("linear", 250)
    assert short[0] == pytest.approx(4e-4) and short[-1] == pytest.approx(0.08)


def test_linear_schedule_refuses_betas_of_one():
    with pytest.raises(ValueError, match="timesteps >= 21"):
        noise_schedule("linear", 20)


def test_cosine_schedule_is_monotone_and_capped():
    betas = noise_schedule("cosine", 1000)
    alphabar = np.cumprod(1 - betas)
    assert np.all(np.diff(alphabar) < 0)
    assert betas.max() <= 0.999
    assert alphabar[0] > 0.999 and alphabar[-1] < 1e-3


def test_unknown_noise_schedule_lists_valid_names():
    with pytest.raises(ValueError, match="linear, cosine"):
        noise_schedule("quadratic", 10)


def test_level_resolutions():
    assert level_resolutions(64, 4) == [8, 16, 32, 64]
    assert level_resolutions(128, 5) == [8, 16, 32, 64, 128]
    assert level_resolutions(256, 3) == [64, 128, 256]
    assert level_resolutions(64, 1) == [64]
    with pytest.raises(ValueError, match="divisible by 8"):
        level_resolutions(36, 4)


@pytest.mark.parametrize(
    "name, expected",
    [("Equal", [250, 500, 750]), ("ConvexDecay-0.5", [438, 750, 937]), ("ConvexDecay_0.5", [438, 750, 937])],
)
def test_sanity_values_from_spec(name, expected):
    r = resolution_schedule(name, [8, 16, 32, 64], 1000)
    assert change_steps(r) == expected


def test_convex_decay_step_counts():
    r = resolution_schedule("ConvexDecay-0.5", [8, 16, 32, 64], 1000)
    assert int((r == 64).sum()) == 438 and int((r == 8).sum()) == 63


@pytest.mark.parametrize("name", ALL_KINDS)
@pytest.mark.parametrize("levels", [2, 3, 4, 5, 6])
def test_invariants(name, levels):
    res = [2**k * 4 for k in range(levels)]
    r = resolution_schedule(name, res, 1000)
    assert r[0] == res[-1] and r[-1] == res[0]
    assert np.all(np.diff(r) <= 0)
    steps = change_steps(r)
    assert len(steps) == levels - 1
    for t in steps:  # each change is exactly one 2x step
        assert r[t - 1] == 2 * r[t]


def test_tanh_flat_in_middle_sigmoid_steep_in_middle():
    res = [8, 16, 32, 64]
    tanh = resolution_schedule("TanhLikeDecay-2", res, 1000)
    sigm = resolution_schedule("SigmoidLikeDecay-2", res, 1000)
    # Tanh-like: steep at both ends -> the extreme levels get few steps
    assert (tanh == 64).sum() < (tanh == 32).sum()
    # Sigmoid-like: steep in the middle -> the middle levels get few steps
    assert (sigm == 32).sum() < (sigm == 64).sum()


def test_warp_inverse_is_inverse():
    for g in (1.0, 1.5, 2.0, 3.0):
        for u in np.linspace(-0.5, 0.5, 11):
            y = 0.5 * float(schedules._warp(u, g) / schedules._warp(-0.5, g))
            assert schedules._warp_inverse(y, g) == pytest.approx(u, abs=1e-9)


OFFICIAL = json.loads((Path(__file__).parent / "data" / "official_schedule_tables.json").read_text())


@pytest.mark.parametrize("key", sorted(OFFICIAL["change_steps"]))
def test_change_steps_equal_the_official_tables(key):
    """All four schedules (several g), levels 2..6, T = 1000: the change steps of the table
    the official code computes (data made by running it; tests/data/README.md)."""
    schedule, levels = key.split("|")
    name = "Equal" if schedule == "equal" else schedule
    r = resolution_schedule(name, [4 << i for i in range(int(levels))], OFFICIAL["timesteps"])
    assert change_steps(r) == OFFICIAL["change_steps"][key]


def test_the_float_tie_is_decided_as_the_official_code_decides_it():
    # 1 - sqrt(1 - 888/999) is mathematically 2/3, but 3 * it is just below 2 in float64
    r = resolution_schedule("ConvexDecay-0.5", [16, 32, 64], 1000)
    assert change_steps(r) == [555, 889]


def test_one_level_is_constant():
    r = resolution_schedule("ConvexDecay-0.5", [64], 1000)
    assert np.all(r == 64) and change_steps(r) == []


@pytest.mark.parametrize(
    "bad, message",
    [
        ("Cubic-1", "valid: Equal, ConvexDecay-g"),
        ("ConvexDecay", "needs a parameter g"),
        ("ConvexDecay-abc", "not a number"),
        ("ConvexDecay--1", "not a number|must be > 0"),
        ("ConvexDecay-0", "must be > 0"),
        ("Equal-2", "takes no parameter"),
        ("TanhLikeDecay-0.5", "needs g >= 1"),
        ("SigmoidLikeDecay_0.9", "needs g >= 1"),
    ],
)
def test_bad_names(bad, message):
    with pytest.raises(ValueError, match=message):
        parse_resolution_schedule(bad)


def test_names_are_parsed_as_users_write_them():
    assert parse_resolution_schedule("ConvexDecay-0.5") == ("ConvexDecay", 0.5)
    assert parse_resolution_schedule("convexdecay_0.5") == ("ConvexDecay", 0.5)
    assert parse_resolution_schedule(" Equal ") == ("Equal", None)
    assert parse_resolution_schedule("SigmoidLikeDecay-2") == ("SigmoidLikeDecay", 2.0)


def test_too_few_timesteps_is_refused():
    with pytest.raises(ValueError, match="get no timestep"):
        resolution_schedule("Equal", [4, 8, 16, 32, 64], 3)


@pytest.mark.parametrize("k", sorted(OFFICIAL["space_timesteps"], key=int))
def test_respaced_steps_equal_the_official_spacing(k):
    """Without change steps (1 level) respacing is the official ``space_timesteps``."""
    from ssd_keras.process import ScaleSpaceProcess

    process = ScaleSpaceProcess(64, 1, 1000, "linear", "ConvexDecay-0.5")
    assert process.respace(int(k)) == OFFICIAL["space_timesteps"][k]
