"""A checkpoint written before a change of the network's code still loads and samples alike.

``tests/data/legacy_16px_ckpt.npz`` is a checkpoint that ssd_keras wrote at commit 7329507,
before the Flexi-UNet's layers were rewritten to compute on their own weights (issue 13):
a 16 px, 3-level network (4/8/16 px; base 32, channel_mult 1,1,1, 1 res block, attention
at 4x4, 2 heads) trained for 6 steps on the bundled digits. Its optimizer group was removed
to keep the file small (sampling never reads it). ``legacy_16px_expected.npz`` holds what
that code computed from it: every path's output on fixed inputs, and 4 samples (seed 5,
20 respaced steps) for ancestral/exact, ancestral/lanczos and ddim (eta 0.5).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import keras
import numpy as np
import pytest

from _tolerance import assert_rounding_close, network_tolerance

DATA = Path(__file__).parent / "data"
EXPECTED = np.load(DATA / "legacy_16px_expected.npz")


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
    from ssd_keras.runs import load_sampling_model

    run = tmp_path_factory.mktemp("runs") / "legacy_16px"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(DATA / "legacy_16px_ckpt.npz", run / "checkpoints" / "ckpt_000000006.npz")
    return load_sampling_model(run)


@pytest.mark.backend
def test_every_path_computes_what_the_old_code_computed(legacy):
    model, _, _ = legacy
    assert len(model.path_keys) == 5
    for r_in, r_out in model.path_keys:
        tag = f"{r_in}_{r_out}"
        out = keras.ops.convert_to_numpy(
            model.path(r_in, r_out)([EXPECTED[f"x_{tag}"], EXPECTED[f"t_{tag}"]], training=False))
        assert_rounding_close(out, EXPECTED[f"out_{tag}"], tol=network_tolerance(model.trainable_variables),
                              err_msg=tag)  # float32 rounding vs the fixture's machine


@pytest.mark.backend
@pytest.mark.parametrize("method,noise", [("ancestral", "exact"), ("ancestral", "lanczos"),
                                          ("ddim", "exact")])
def test_the_old_checkpoint_samples_the_same_images(legacy, method, noise):
    from ssd_keras.sample import sample_images

    model, process, objective = legacy
    result = sample_images(model, process, objective, num_images=4, steps=20, seed=5,
                           batch_size=4, method=method, noise=noise, eta=0.5, progress=False)
    assert_rounding_close(result.images, EXPECTED[f"samples_{method}_{noise}"],
                          tol=network_tolerance(model.trainable_variables, calls=result.network_calls),
                          err_msg=f"{method}/{noise}")
