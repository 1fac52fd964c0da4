"""Sample-quality metrics: closed forms, sanity on known distributions, and `ssd-run evaluate`."""

import json

import numpy as np
import pytest

from ssd_keras import metrics


# ---------------------------------------------------------------------------- Fréchet distance
def test_frechet_distance_equals_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.1, 3.0, 5), rng.uniform(0.1, 3.0, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-9)
    assert metrics.frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_equals_closed_form_for_commuting_full_covariances():
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute: tr sqrt(S1 S2) = sum sqrt(a b)
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    a, b = rng.uniform(0.2, 2.0, 6), rng.uniform(0.2, 2.0, 6)
    got = metrics.frechet_distance(np.zeros(6), q @ np.diag(a) @ q.T, np.ones(6), q @ np.diag(b) @ q.T)
    assert got == pytest.approx(6.0 + np.sum(a + b - 2 * np.sqrt(a * b)), rel=1e-8)


def test_frechet_distance_of_samples_is_small_for_same_distribution_and_grows_with_shift():
    rng = np.random.default_rng(2)
    cov = np.diag(rng.uniform(0.5, 2.0, 8))
    x = rng.multivariate_normal(np.zeros(8), cov, 20000)
    y = rng.multivariate_normal(np.zeros(8), cov, 20000)
    same = metrics.frechet_distance_features(x, y)
    small = metrics.frechet_distance_features(x, y + 0.5)
    large = metrics.frechet_distance_features(x, y + 1.0)
    assert 0 <= same < 0.01
    assert small == pytest.approx(8 * 0.25, rel=0.05)
    assert large == pytest.approx(8 * 1.0, rel=0.05) and large > small > same


def test_frechet_distance_survives_singular_covariances():
    # fewer points than dimensions: rank-deficient covariances, the eps fallback keeps it finite
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(4, 50)), rng.normal(size=(4, 50))
    value = metrics.frechet_distance_features(x, y)
    assert np.isfinite(value) and value > 0


# ---------------------------------------------------------------------------- KID
def test_kid_is_near_zero_for_same_distribution_and_positive_for_shifted():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(600, 16)), rng.normal(size=(600, 16))
    same, same_std = metrics.kernel_inception_distance(x, y, num_subsets=20, subset_size=300)
    shifted, _ = metrics.kernel_inception_distance(x, y + 0.5, num_subsets=20, subset_size=300)
    assert abs(same) < 3 * same_std + 1e-3
    assert shifted > 0.05 and shifted > 20 * abs(same)


def test_mmd_estimator_is_unbiased_not_the_biased_v_statistic():
    # for two independent draws of one distribution the unbiased estimate averages ~0,
    # the biased one (diagonal included) is clearly positive
    rng = np.random.default_rng(5)
    values = [metrics.mmd2_unbiased(rng.normal(size=(10, 4)), rng.normal(size=(10, 4))) for _ in range(400)]
    assert abs(np.mean(values)) < 3 * np.std(values) / np.sqrt(len(values))


# ---------------------------------------------------------------------------- weights-free metrics
def test_pixel_features_downsample_to_8x8_and_average_constant_images_exactly():
    imgs = np.zeros((2, 32, 32, 3), np.float32)
    imgs[0] += 0.5
    imgs[1, ..., 2] = -1.0
    f = metrics.pixel_features(imgs)
    assert f.shape == (2, 8 * 8 * 3)
    np.testing.assert_allclose(f[0], 0.5, atol=1e-12)
    np.testing.assert_allclose(f[1].reshape(8, 8, 3)[..., 2], -1.0, atol=1e-12)


def test_channel_stats_detect_a_channel_offset():
    rng = np.random.default_rng(6)
    data = rng.uniform(-0.8, 0.8, (50, 16, 16, 3)).astype(np.float32)
    samples = rng.uniform(-0.8, 0.8, (50, 16, 16, 3)).astype(np.float32)
    fine = metrics.compare_channel_stats(samples, data)
    assert fine["max_abs_mean_diff"] < 0.02
    samples[..., 1] += 0.2
    shifted = metrics.compare_channel_stats(samples, data)
    diff = np.subtract(shifted["samples"]["mean"], shifted["data"]["mean"])
    assert diff[1] == pytest.approx(0.2, abs=0.02) and abs(diff[0]) < 0.02 and abs(diff[2]) < 0.02
    assert shifted["max_abs_mean_diff"] == pytest.approx(0.2, abs=0.02)
    # the Fréchet distance in the pixel space sees it too: a mean shift of 0.2 on 64 of
    # its 192 coordinates adds about 64 * 0.2^2 (the small-N bias stays the same)
    fd = lambda s: metrics.frechet_distance_features(metrics.pixel_features(s), metrics.pixel_features(data))
    assert fd(samples) - fd(samples - [0, 0.2, 0]) == pytest.approx(64 * 0.04, rel=0.15)


def test_nearest_neighbour_ratio_is_one_for_fresh_draws_and_zero_for_copies():
    rng = np.random.default_rng(7)
    images = rng.uniform(-1, 1, (200, 8, 8, 3))
    fresh = metrics.nearest_neighbour_ratio(images[:100], images[100:])
    assert fresh["ratio"] == pytest.approx(1.0, abs=0.05)
    copies = images[100:130] + rng.normal(0, 0.01, (30, 8, 8, 3))
    copied = metrics.nearest_neighbour_ratio(copies, images[100:])
    assert copied["ratio"] < 0.05


# ---------------------------------------------------------------------------- weights-free evaluation
def test_evaluate_images_is_json_able_and_tabulated():
    rng = np.random.default_rng(8)
    data = rng.uniform(-1, 1, (6, 16, 16, 3)).astype(np.float32)
    samples = rng.uniform(-1, 1, (5, 16, 16, 3)).astype(np.float32)
    result = metrics.evaluate_images(samples, data, kid_subsets=5)
    assert set(result["metrics"]) == {"fd_pix8", "kid_pix8", "channels", "nearest_neighbour"}
    table = metrics.format_table(result)
    assert "FD-pix8" in table and "FID" not in table.replace("not FID", "")
    json.dumps(result)


def test_frechet_distance_matches_the_matrix_square_root_definition():
    # tr sqrt(S1 S2) from eigenvalues equals tr of scipy's sqrtm (non-commuting covariances)
    from scipy import linalg

    rng = np.random.default_rng(9)
    a, b = rng.normal(size=(7, 7)), rng.normal(size=(7, 7))
    s1, s2 = a @ a.T + 0.1 * np.eye(7), b @ b.T + 0.1 * np.eye(7)
    mu1, mu2 = rng.normal(size=7), rng.normal(size=7)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_load_images_reads_pngs_back_exactly(tmp_path):
    from ssd_keras.images import save_image, to_uint8

    images = metrics.quantize(np.random.default_rng(10).uniform(-1, 1, (3, 8, 8, 3)))
    for i, img in enumerate(to_uint8(images)):
        save_image(img, tmp_path / "images" / f"{i:05d}.png")
    np.testing.assert_array_equal(metrics.load_image_folder(tmp_path, image_size=8), images)
    with pytest.raises(ValueError, match="16x16"):
        metrics.load_image_folder(tmp_path, image_size=16)
