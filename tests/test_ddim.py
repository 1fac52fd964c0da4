"""The DDIM-style step (docs/sampling.md) against dense-matrix references, in float64.

For a fixed ideal prediction ``x0_hat = D_{1:s} x0`` the step is affine in ``(x_t, xi)``:
``x_s = b + K x_t + N xi``. The tests read ``b``, ``K`` and ``N`` off the implementation by
feeding basis vectors, then push the forward marginal ``q(x_t | x0)`` of the dense chain of
tests/test_process.py (built from the per-step transitions, never from the closed forms)
through that map analytically and compare with ``q(x_s | x0)``.
"""

from types import SimpleNamespace

import numpy as np
import pytest
from keras import ops

from ssd_keras.operators import resize_matrix
from ssd_keras.process import ScaleSpaceProcess
from test_process import DenseChain, small_process

# backend-sensitive: CI reruns this module under jax and tensorflow
pytestmark = pytest.mark.backend

np_ = ops.convert_to_numpy
ETAS = (0.0, 0.5, 1.0)


def spans(p):
    """(t, s) pairs: single and respaced plain spans, change spans (single and respaced)."""
    cs = p.change_steps
    return {
        "plain": (2, 1),
        "plain-coarse": (cs[0] + 1, cs[0]),
        "plain-respaced": (cs[0] - 1, 3),
        "plain-respaced-coarse": (p.timesteps - 1, cs[1] + 1),
        "change": (cs[0], cs[0] - 1),
        "change-coarse": (cs[1], cs[1] - 1),
        "change-respaced": (cs[0] + 2, cs[0] - 3),
        "two-changes": (p.timesteps - 1, 1),
        "last": (1, 0),
    }


def affine_map(p, x0, t, s, eta):
    """``b, K, N`` of ``x_s = b + K x_t + N xi`` for one channel, from the implementation."""
    n_t, n_s = p.r[t] ** 2, p.r[s] ** 2
    x0_hat = np_(p.degrade(x0, p.r[s]))  # (1, r_s, r_s, 1): the ideal prediction

    def run(x_t, xi):
        b = x_t.shape[0]
        out = p.ddim_step(np.repeat(x0_hat, b, 0), x_t, xi, t, s, eta=eta)
        return np_(out).reshape(b, n_s)

    zeros_t = np.zeros((1, p.r[t], p.r[t], 1))
    zeros_s = np.zeros((1, p.r[s], p.r[s], 1))
    offset = run(zeros_t, zeros_s)[0]
    basis_t = np.eye(n_t).reshape(n_t, p.r[t], p.r[t], 1)
    basis_s = np.eye(n_s).reshape(n_s, p.r[s], p.r[s], 1)
    k = (run(basis_t, np.repeat(zeros_s, n_t, 0)) - offset).T
    n = (run(np.repeat(zeros_t, n_s, 0), basis_s) - offset).T
    return offset, k, n


def dense_d(p, s, t):
    """Dense ``D_{r(s) -> r(t)}``: the chain of 2x resize matrices, Kronecker over axes."""
    m = np.eye(p.r[s])
    size = p.r[s]
    while size > p.r[t]:
        m = resize_matrix(size, size // 2) @ m
        size //= 2
    return np.kron(m, m)


@pytest.mark.parametrize("eta", ETAS)
@pytest.mark.parametrize("span", list(spans(small_process())))
def test_one_step_maps_the_forward_marginal_at_t_onto_the_one_at_s(span, eta):
    p = small_process()
    t, s = spans(p)[span]
    chain = DenseChain(p)
    x0 = np.random.default_rng(0).uniform(-1, 1, (1, 8, 8, 1))
    offset, k, n = affine_map(p, x0, t, s, eta)
    m_t, c_t = chain.marginal(x0.reshape(-1), t)
    m_s, c_s = chain.marginal(x0.reshape(-1), s)
    assert np.abs(offset + k @ m_t - m_s).max() < 1e-12
    assert np.abs(k @ c_t @ k.T + n @ n.T - c_s).max() < 1e-12


@pytest.mark.parametrize("eta", ETAS)
@pytest.mark.parametrize("span", ["change", "change-coarse", "change-respaced", "two-changes"])
def test_change_spans_match_the_dense_range_null_space_formula(span, eta):
    """``K = sigma_s/sigma_t D^T h(D D^T)``, ``h(mu) = sqrt(1 - eta^2 (1 - rho c^2 mu)) / sqrt(mu)``;
    fresh-noise covariance ``sigma_s^2 [(I - Pr) + eta^2 (Pr - rho c^2 D^T D)]`` with the
    row-space projector ``Pr = D^T (D D^T)^{-1} D`` (docs/sampling.md, section 3)."""
    p = small_process()
    t, s = spans(p)[span]
    x0 = np.random.default_rng(1).uniform(-1, 1, (1, 8, 8, 1))
    _, k, n = affine_map(p, x0, t, s, eta)
    d = dense_d(p, s, t)
    ab = p.alphas_cumprod
    sig_s2, sig_t2 = 1 - ab[s], 1 - ab[t]
    shrink = (sig_s2 / sig_t2) * (ab[t] / ab[s])  # rho c^2
    mu, v = np.linalg.eigh(d @ d.T)
    h = np.sqrt(1 - eta**2 * (1 - shrink * mu)) / np.sqrt(mu)
    k_ref = np.sqrt(sig_s2 / sig_t2) * d.T @ (v * h) @ v.T
    proj = d.T @ np.linalg.solve(d @ d.T, d)
    cov_ref = sig_s2 * ((np.eye(d.shape[1]) - proj) + eta**2 * (proj - shrink * d.T @ d))
    assert np.abs(k - k_ref).max() < 1e-12
    assert np.abs(n @ n.T - cov_ref).max() < 1e-12
    if eta == 0.0:  # fresh noise only in the null space of D, and all of it there
        assert np.abs(n @ n.T - sig_s2 * (np.eye(d.shape[1]) - proj)).max() < 1e-12
        assert np.linalg.matrix_rank(n, tol=1e-9) == d.shape[1] - d.shape[0]


@pytest.mark.parametrize("span", ["plain", "plain-coarse", "last", "change", "change-coarse"])
def test_eta_one_on_a_single_step_is_the_ancestral_posterior(span):
    """Same x_t, x0_hat and noise in, same sample out (plain: DDPM; change: SSD posterior)."""
    p = small_process()
    t, s = spans(p)[span]
    assert s == t - 1
    rng = np.random.default_rng(2)
    x0_hat = rng.uniform(-1, 1, (3, p.r[s], p.r[s], 2))  # any prediction, not the ideal one
    x_t = rng.standard_normal((3, p.r[t], p.r[t], 2))
    xi = rng.standard_normal((3, p.r[s], p.r[s], 2))
    ddim = np_(p.ddim_step(x0_hat, x_t, xi, t, s, eta=1.0))
    ancestral = np_(p.posterior_mean(x0_hat, x_t, t, s)) + np_(p.posterior_noise(xi, t, s))
    assert np.abs(ddim - ancestral).max() < 1e-12


@pytest.mark.parametrize("span", ["plain", "plain-coarse", "plain-respaced", "plain-respaced-coarse", "last"])
def test_eta_zero_on_plain_spans_is_deterministic_ddim(span):
    p = small_process()
    t, s = spans(p)[span]
    x0 = np.random.default_rng(3).uniform(-1, 1, (1, 8, 8, 1))
    _, _, n = affine_map(p, x0, t, s, 0.0)
    assert np.abs(n).max() == 0.0
    # the textbook DDIM update x_s = a_s x0_hat + sigma_s eps_hat, with no noise argument
    rng = np.random.default_rng(4)
    x0_hat = rng.uniform(-1, 1, (2, p.r[s], p.r[s], 3))
    x_t = rng.standard_normal((2, p.r[t], p.r[t], 3))
    eps_hat = (x_t - p.signal[t] * x0_hat) / p.noise_std[t]
    want = p.signal[s] * x0_hat + p.noise_std[s] * eps_hat
    assert np.abs(np_(p.ddim_step(x0_hat, x_t, None, t, s, eta=0.0)) - want).max() < 1e-12


@pytest.mark.parametrize("span", ["plain-respaced", "change-respaced"])
def test_batches_and_channels_act_independently(span):
    """An NHWC batch equals the one-channel dense map applied to each (sample, channel)."""
    p = small_process()
    t, s = spans(p)[span]
    rng = np.random.default_rng(5)
    x0 = rng.uniform(-1, 1, (1, 8, 8, 1))
    offset, k, n = affine_map(p, x0, t, s, 0.5)
    x0_hat = np.repeat(np.repeat(np_(p.degrade(x0, p.r[s])), 3, 0), 2, -1)
    x_t = rng.standard_normal((3, p.r[t], p.r[t], 2))
    xi = rng.standard_normal((3, p.r[s], p.r[s], 2))
    got = np_(p.ddim_step(x0_hat, x_t, xi, t, s, eta=0.5))
    want = np.stack([np.stack([
        (offset + k @ x_t[b, :, :, c].reshape(-1) + n @ xi[b, :, :, c].reshape(-1))
        .reshape(p.r[s], p.r[s]) for c in range(2)], -1) for b in range(3)])
    assert np.abs(got - want).max() < 1e-12


def test_one_level_respaced_ddim_matches_the_textbook_formula():
    """DDPM-x0 / DDPM-eps (one level): plain DDIM over a respaced span, any eta."""
    p = ScaleSpaceProcess(8, 1, timesteps=100)
    ab = p.alphas_cumprod
    rng = np.random.default_rng(6)
    for t, s in p.reverse_steps(10):
        x0_hat = rng.uniform(-1, 1, (2, 8, 8, 3))
        x_t = rng.standard_normal((2, 8, 8, 3))
        xi = rng.standard_normal((2, 8, 8, 3))
        for eta in ETAS:
            # Song et al. (2021), eq. 12 and 16
            sig = eta * np.sqrt((1 - ab[s]) / (1 - ab[t]) * (1 - ab[t] / ab[s]))
            eps_hat = (x_t - np.sqrt(ab[t]) * x0_hat) / np.sqrt(1 - ab[t])
            want = np.sqrt(ab[s]) * x0_hat + np.sqrt(1 - ab[s] - sig**2) * eps_hat + sig * xi
            got = np_(p.ddim_step(x0_hat, x_t, xi, t, s, eta=eta))
            assert np.abs(got - want).max() < 1e-12, (t, s, eta)


def test_bad_arguments_are_refused():
    p = small_process()
    t = p.change_steps[0]
    x0_hat = np.zeros((1, p.r[t - 1], p.r[t - 1], 1))
    x_t = np.zeros((1, p.r[t], p.r[t], 1))
    with pytest.raises(ValueError, match=r"eta must lie in \[0, 1\], got 1.5"):
        p.ddim_step(x0_hat, x_t, x0_hat, t, t - 1, eta=1.5)
    with pytest.raises(ValueError, match="null space"):
        p.ddim_step(x0_hat, x_t, None, t, t - 1, eta=0.0)
    with pytest.raises(ValueError, match="needs the noise"):
        p.ddim_step(np.zeros((1, 8, 8, 1)), np.zeros((1, 8, 8, 1)), None, 2, 1, eta=0.3)


def test_sample_images_refuses_unknown_methods():
    from ssd_keras.sample import sample_images

    p = small_process()
    with pytest.raises(ValueError, match="unknown sampling method 'ddpm'; valid: ancestral, ddim"):
        sample_images(None, p, None, method="ddpm")
    with pytest.raises(ValueError, match=r"change_eta must lie in \[0, 1\]"):
        sample_images(None, p, None, method="ddim", change_eta=-0.1)


def test_dense_reference_self_check():
    """The dense chain's marginal covariance is sigma_t^2 I (so the tests above test something)."""
    p = small_process()
    chain = DenseChain(p)
    x0 = np.ones(64)
    for t in (0, p.change_steps[0], p.timesteps - 1):
        _, cov = chain.marginal(x0, t)
        assert np.allclose(cov, p.noise_std[t] ** 2 * np.eye(p.r[t] ** 2), atol=1e-12)


class _LinearToyModel:
    """A stand-in network: x0_hat = 0.5 * (spatial mean of x_t), at the output resolution."""

    def path(self, r_in, r_out):
        def predict(x, t_vec):
            m = ops.mean(x, axis=(1, 2), keepdims=True)
            return ops.zeros((x.shape[0], r_out, r_out, x.shape[3]), dtype=x.dtype) + 0.5 * m

        return predict


@pytest.mark.parametrize("eta, change_eta", [(0.0, None), (0.3, None), (0.0, 1.0)])
def test_sampling_loop_takes_the_ddim_step_with_the_right_eta_and_noise(monkeypatch, eta, change_eta):
    """The loop of sample.py against a hand-written chain of ddim_step calls (same rng use)."""
    from ssd_keras import sample as sample_module
    from ssd_keras.objectives import X0Objective

    p = ScaleSpaceProcess(16, 3, timesteps=60, resolution_schedule="Equal")
    model = _LinearToyModel()
    plain = SimpleNamespace(forward=lambda fn: fn)  # the toy paths called as they are
    got = sample_module.sample_images(model, p, X0Objective(p), num_images=2, steps=8,
                                      method="ddim", eta=eta, change_eta=change_eta, seed=3,
                                      batch_size=2, channels=3, progress=False, execution=plain)
    rng = np.random.default_rng(3)
    pairs = p.reverse_steps(8)
    x = rng.standard_normal((2, p.r[pairs[0][0]], p.r[pairs[0][0]], 3))
    for t, s in pairs:
        x0_hat = np.clip(np_(model.path(p.r[t], p.r[s])(ops.convert_to_tensor(x, "float32"), None)), -1, 1)
        change = p.r[s] != p.r[t]
        step_eta = change_eta if (change and change_eta is not None) else eta
        xi = rng.standard_normal((2, p.r[s], p.r[s], 3)) if (change or step_eta > 0) else None
        x = np_(p.ddim_step(x0_hat, x.astype(np.float32), None if xi is None else xi.astype(np.float32),
                            t, s, eta=step_eta))
    final = np.clip(0.5 * x.mean(axis=(1, 2), keepdims=True) + np.zeros((2, 16, 16, 3)), -1, 1)
    assert got.network_calls == len(pairs) + 1
    assert np.abs(got.images - final).max() < 1e-5
