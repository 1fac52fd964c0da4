"""docs/math.md sections 3-7 against dense-matrix reference computations at small sizes.

The reference builds the joint Gaussian of the whole forward chain from the per-step
definition ``x_t = c_t D_t x_{t-1} + n_t`` (dense matrices, one channel), then conditions
with generic linear algebra. It never uses the closed forms that the process implements.
"""

import numpy as np
import pytest
from keras import ops

from ssd_keras.operators import resize_matrix
from ssd_keras.process import ScaleSpaceProcess, lanczos_sqrt

# backend-sensitive: CI reruns this module under jax and tensorflow
pytestmark = pytest.mark.backend

np_ = ops.convert_to_numpy


def small_process(**kw):
    args = dict(image_size=8, levels=3, timesteps=40, resolution_schedule="Equal")
    args.update(kw)
    return ScaleSpaceProcess(**args)


class DenseChain:
    """Joint moments of (x_0, ..., x_{T-1}) given x0 for one channel, from per-step transitions."""

    def __init__(self, proc: ScaleSpaceProcess):
        self.proc = proc
        T = proc.timesteps
        r = proc.r
        ab = proc.alphas_cumprod
        self.step = []  # (M_t, Sigma_t) for t >= 0; t = 0 maps the data to x_0
        for t in range(T):
            r_prev = proc.image_size if t == 0 else r[t - 1]
            d1 = resize_matrix(r_prev, r[t]) if r_prev != r[t] else np.eye(r[t])
            D = np.kron(d1, d1)
            if t == 0:
                c, sig_prev2 = np.sqrt(ab[0]), 0.0
            else:
                c, sig_prev2 = np.sqrt(ab[t] / ab[t - 1]), 1 - ab[t - 1]
            cov = (1 - ab[t]) * np.eye(r[t] ** 2) - c**2 * sig_prev2 * D @ D.T
            self.step.append((c * D, cov))

    def propagator(self, s, t):
        """Phi with E[x_t | x_s] = Phi x_s (product of the M's from s+1 to t)."""
        phi = np.eye(self.proc.r[s] ** 2)
        for k in range(s + 1, t + 1):
            phi = self.step[k][0] @ phi
        return phi

    def marginal(self, x0_flat, t):
        mean, cov = x0_flat, np.zeros((x0_flat.size, x0_flat.size))
        for k in range(t + 1):
            m, sig = self.step[k]
            mean, cov = m @ mean, m @ cov @ m.T + sig
        return mean, cov

    def posterior(self, x0_flat, x_t_flat, t, s):
        m_s, c_s = self.marginal(x0_flat, s)
        phi = self.propagator(s, t)
        m_t, c_t = self.marginal(x0_flat, t)
        c_ts = phi @ c_s
        gain = np.linalg.solve(c_t, c_ts).T  # C_st C_tt^{-1}
        return m_s + gain @ (x_t_flat - m_t), c_s - gain @ c_ts


def sym_sqrt(cov):
    lam, q = np.linalg.eigh((cov + cov.T) / 2)
    return q @ np.diag(np.sqrt(np.clip(lam, 0, None))) @ q.T


def per_channel(fn, x):
    """Apply a flat (one-channel) function to each channel of an NHWC numpy array."""
    b, h, w, c = x.shape
    outs = [[fn(x[i, :, :, k].reshape(-1)) for k in range(c)] for i in range(b)]
    n = int(np.sqrt(outs[0][0].size))
    return np.stack([np.stack([o.reshape(n, n) for o in row], -1) for row in outs])


# --------------------------------------------------------------------------- tables
def test_public_attributes():
    p = ScaleSpaceProcess(64, 4)
    assert p.resolutions == [8, 16, 32, 64]
    assert p.change_steps == [438, 750, 937]
    assert p.alphas_cumprod.dtype == np.float64 and p.alphas_cumprod.shape == (1000,)
    assert np.allclose(p.alphas_cumprod, np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))
    assert p.paths == [(8, 8), (8, 16), (16, 16), (16, 32), (32, 32), (32, 64), (64, 64)]
    assert p.path_at(438) == (32, 64) and p.path_at(437) == (64, 64) and p.path_at(0) == (64, 64)


def test_loss_weight_is_min_snr():
    p = ScaleSpaceProcess(64, 4)
    t = np.array([0, 100, 500, 999])
    snr = p.alphas_cumprod[t] / (1 - p.alphas_cumprod[t])
    assert np.allclose(p.loss_weight(t), np.minimum(snr, 5))
    assert p.loss_weight(np.array([0]))[0] == 5.0 and p.loss_weight(np.array([999]))[0] < 1e-3
    assert np.allclose(p.loss_weight(t, gamma=1.0), np.minimum(snr, 1))
    assert np.all(p.loss_weight(t, gamma=0) == 1)


# --------------------------------------------------------------------------- forward
def test_dense_chain_marginal_is_the_claimed_one():
    """The chain of per-step transitions has marginal N(a_t D_{1:t} x0, sigma_t^2 I)."""
    p = small_process()
    chain = DenseChain(p)
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((1, 8, 8, 1))
    for t in range(p.timesteps):
        mean, cov = chain.marginal(x0[0, :, :, 0].reshape(-1), t)
        expected = np_(p.q_sample(x0, [t], np.zeros((1, p.r[t], p.r[t], 1))))[0, :, :, 0]
        assert np.allclose(mean, expected.reshape(-1), atol=1e-6)
        assert np.allclose(cov, p.noise_std[t] ** 2 * np.eye(p.r[t] ** 2), atol=1e-12)


def test_forward_marginal_by_monte_carlo():
    """Simulate the Markov chain step by step; compare with q_sample's distribution."""
    p = small_process()
    chain = DenseChain(p)
    rng = np.random.default_rng(1)
    x0 = rng.uniform(-1, 1, (8, 8))
    n = 20000
    x = np.repeat(x0.reshape(1, -1), n, axis=0)
    for t in range(p.timesteps):
        m, sig = chain.step[t]
        x = x @ m.T + rng.standard_normal((n, m.shape[0])) @ sym_sqrt(sig)
        if t in (12, 13, 27, 39):
            want_mean = np_(p.q_sample(x0[None, :, :, None], [t], np.zeros((1, p.r[t], p.r[t], 1)))).reshape(-1)
            assert np.abs(x.mean(0) - want_mean).max() < 5 * p.noise_std[t] / np.sqrt(n) + 1e-6
            assert np.allclose(x.var(0), p.noise_std[t] ** 2, rtol=0.06)
            off = np.cov(x.T) - np.diag(np.diag(np.cov(x.T)))
            assert np.abs(off).max() < 0.06 * p.noise_std[t] ** 2


def test_q_sample_and_target_resolutions():
    p = ScaleSpaceProcess(32, 3, timesteps=100)
    x0 = np.random.default_rng(2).standard_normal((4, 32, 32, 3)).astype(np.float32)
    t = p.change_steps[0]
    xt = p.q_sample(x0, np.full(4, t), np.zeros((4, p.r[t], p.r[t], 3), np.float32))
    assert tuple(xt.shape) == (4, 16, 16, 3)
    target = p.x0_target(x0, np.full(4, t))
    assert tuple(target.shape) == (4, 32, 32, 3)  # r(t-1): the output of a change step is 2x
    assert np.allclose(np_(target), x0)
    target = p.x0_target(x0, np.full(4, 99))
    assert tuple(target.shape) == (4, 8, 8, 3)
    # the target is the chained downsample of x0
    d = resize_matrix(16, 8) @ resize_matrix(32, 16)
    assert np.allclose(np_(target)[0, :, :, 0], d @ x0[0, :, :, 0] @ d.T, atol=1e-5)
    with pytest.raises(ValueError, match="one resolution"):
        p.q_sample(x0[:2], np.array([0, 99]), np.zeros((2, 8, 8, 3)))


def test_training_timestep_sampler_one_path_per_batch_and_uniform_marginal():
    p = ScaleSpaceProcess(16, 3, timesteps=40, resolution_schedule="ConvexDecay-0.5")
    rng = np.random.default_rng(3)
    counts = np.zeros(p.timesteps)
    batches = 40000
    for _ in range(batches):
        t = p.sample_training_timesteps(rng, 4)
        assert len({p.path_at(int(v)) for v in t}) == 1
        if t[0] in p.change_steps:
            assert np.all(t == t[0])
        counts += np.bincount(t, minlength=p.timesteps)
    freq = counts / counts.sum()
    assert np.abs(freq - 1 / p.timesteps).max() < 0.15 / p.timesteps


# --------------------------------------------------------------------------- reverse
def reverse_pairs(p):
    cs = p.change_steps
    return [
        (cs[0], cs[0] - 1),  # change step
        (cs[1], cs[1] - 1),  # change step into the coarser level pair
        (2, 1),  # plain step at full resolution
        (cs[0] + 1, cs[0]),  # plain step at a coarse level
        (cs[0] + 2, cs[0] - 2),  # respaced step spanning a change
        (p.timesteps - 1, 1),  # respaced step spanning two changes
        (1, 0),
    ]


@pytest.mark.parametrize("pair", range(7))
def test_posterior_mean_and_covariance_match_dense_gaussian_conditioning(pair):
    p = small_process()
    t, s = reverse_pairs(p)[pair]
    chain = DenseChain(p)
    rng = np.random.default_rng(10 + pair)
    x0 = rng.uniform(-1, 1, (2, 8, 8, 2))
    x_t = rng.standard_normal((2, p.r[t], p.r[t], 2))
    # the network's ideal prediction at step t is D_{1:s} x0 (at resolution r(s))
    x0_hat = np_(p.degrade(x0, p.r[s]))

    mean = np_(p.posterior_mean(x0_hat, x_t, t, s))
    assert mean.shape == (2, p.r[s], p.r[s], 2)
    ref = np.stack([
        np.stack([
            chain.posterior(x0[b, :, :, k].reshape(-1), x_t[b, :, :, k].reshape(-1), t, s)[0]
            .reshape(p.r[s], p.r[s]) for k in range(2)], -1) for b in range(2)])
    assert np.abs(mean - ref).max() < 1e-9

    # covariance: both samplers, fed the same xi, equal the dense symmetric square root
    _, cov = chain.posterior(x0[0, :, :, 0].reshape(-1), x_t[0, :, :, 0].reshape(-1), t, s)
    root = sym_sqrt(cov)
    xi = rng.standard_normal((3, p.r[s], p.r[s], 2))
    want = per_channel(lambda v: root @ v, xi)
    exact = np_(p.posterior_noise(xi, t, s, method="exact"))
    assert np.abs(exact - want).max() < 1e-9
    lanczos = np_(p.posterior_noise(xi, t, s, method="lanczos", iterations=30))
    assert np.abs(lanczos - want).max() < 1e-7


def test_plain_steps_are_the_ddpm_fixed_small_posterior():
    p = ScaleSpaceProcess(16, 2, timesteps=1000)
    rng = np.random.default_rng(4)
    ab, betas = p.alphas_cumprod, p.betas
    for t in (1, 5, 300, 998):
        if t in p.change_steps:
            continue
        s = t - 1
        x0_hat = rng.standard_normal((2, p.r[s], p.r[s], 3)).astype(np.float32)
        x_t = rng.standard_normal((2, p.r[t], p.r[t], 3)).astype(np.float32)
        coef_x0 = betas[t] * np.sqrt(ab[s]) / (1 - ab[t])
        coef_xt = (1 - ab[s]) * np.sqrt(1 - betas[t]) / (1 - ab[t])
        want = coef_x0 * x0_hat + coef_xt * x_t
        assert np.abs(np_(p.posterior_mean(x0_hat, x_t, t)) - want).max() < 1e-5
        var = betas[t] * (1 - ab[s]) / (1 - ab[t])
        xi = rng.standard_normal((2, p.r[s], p.r[s], 3)).astype(np.float32)
        for method in ("exact", "lanczos"):
            z = np_(p.posterior_noise(xi, t, method=method))
            assert np.allclose(z, np.sqrt(var) * xi, rtol=1e-5, atol=1e-7)


def test_fixed_large_variance_for_the_eps_baseline():
    p = ScaleSpaceProcess(8, 1, timesteps=100)
    xi = np.ones((1, 8, 8, 3), np.float32)
    z = np_(p.posterior_noise(xi, 50, 49, variance="fixed_large"))
    assert np.allclose(z, np.sqrt(p.betas[50]), rtol=1e-6)
    with pytest.raises(ValueError, match="plain"):
        ScaleSpaceProcess(8, 2, timesteps=40, resolution_schedule="Equal").posterior_noise(
            np.ones((1, 8, 8, 1)), 20, 19, variance="fixed_large")


def test_lanczos_error_falls_with_iterations():
    p = ScaleSpaceProcess(32, 2, timesteps=100)
    t = p.change_steps[0]
    xi = np.random.default_rng(5).standard_normal((4, 32, 32, 3))
    exact = np_(p.posterior_noise(xi, t, method="exact"))
    errors = [np.abs(np_(p.posterior_noise(xi, t, method="lanczos", iterations=k)) - exact).max()
              for k in (1, 2, 3, 4, 8)]
    assert all(b < a for a, b in zip(errors, errors[1:4])), errors
    assert errors[-1] < 1e-8 and errors[0] > 1e-3


def test_lanczos_batched_equals_per_sample_and_handles_degenerate_vectors():
    rng = np.random.default_rng(6)
    m = rng.standard_normal((16, 16))
    a = np.eye(16) * 2 + m @ m.T / 16

    def apply_a(v):  # acts on (B, 4, 4, C) tensors
        v = np_(v)
        flat = v.transpose(0, 3, 1, 2).reshape(-1, 16) @ a.T
        return ops.convert_to_tensor(flat.reshape(v.shape[0], v.shape[3], 4, 4).transpose(0, 2, 3, 1))

    xi = rng.standard_normal((3, 4, 4, 2))
    xi[1, :, :, 0] = 0.0  # a zero vector must give zero, not NaN
    xi[2, :, :, 1] = 0.0
    xi[2, 0, 0, 1] = 1.0  # a unit vector
    out = np_(lanczos_sqrt(apply_a, xi, iterations=16))
    root = sym_sqrt(a)
    want = per_channel(lambda v: root @ v, xi)
    assert np.isfinite(out).all()
    assert np.abs(out - want).max() < 1e-8


def test_psd_check_refuses_a_bad_degradation(monkeypatch):
    from ssd_keras import operators

    monkeypatch.setitem(operators.MATRIX_BUILDERS, "sharpening", lambda a, b: 3.0 * resize_matrix(a, b))
    with pytest.raises(ValueError, match=r"step t=\d+ .* not positive semi-definite: smallest eigenvalue -"):
        ScaleSpaceProcess(16, 2, timesteps=100, degradation="sharpening")
    ScaleSpaceProcess(16, 2, timesteps=100)  # the paper's operator passes


# --------------------------------------------------------------------------- respacing
def test_respacing_full_length_is_the_original_chain():
    p = ScaleSpaceProcess(64, 4)
    assert p.respace(1000) == list(range(1000))
    pairs = p.reverse_steps()
    assert pairs[0] == (999, 998) and pairs[-1] == (1, 0) and len(pairs) == 999


def test_respacing_keeps_every_change_step():
    p = ScaleSpaceProcess(64, 4)
    kept = p.respace(250)
    assert len(kept) == 252  # docs/math.md section 7: 250 steps with ConvexDecay-0.5 and 4 levels
    assert set(p.change_steps) <= set(kept) and kept == sorted(kept)
    assert kept[0] == 0 and kept[-1] == 999
    uniform = [round(i * 999 / 249) for i in range(250)]
    assert set(uniform) <= set(kept)
    for t, s in p.reverse_steps(250):
        assert p.r[s] == p.r[t - 1]  # the network is only asked what it was trained for
    with pytest.raises(ValueError, match=r"\[2, 1000\]"):
        p.respace(1)


def test_respaced_chain_is_consistent_with_the_forward_marginals():
    """Running the posterior of a respaced step on q_sample draws reproduces the marginal at s."""
    p = ScaleSpaceProcess(16, 2, timesteps=50, resolution_schedule="Equal")
    kept = p.respace(6)
    t, s = next((t, s) for t, s in p.reverse_steps(6) if p.r[t] != p.r[s])
    assert t - s > 1 or kept == list(range(50))
    rng = np.random.default_rng(7)
    x0 = rng.uniform(-1, 1, (1, 16, 16, 1))
    n = 4000
    eps = rng.standard_normal((n, p.r[t], p.r[t], 1))
    x_t = np_(p.q_sample(np.repeat(x0, n, 0), np.full(n, t), eps))
    x0_hat = np.repeat(np_(p.degrade(x0, p.r[s])), n, 0)
    x_s = np_(p.posterior_mean(x0_hat, x_t, t, s)) + np_(
        p.posterior_noise(rng.standard_normal((n, p.r[s], p.r[s], 1)), t, s))
    want_mean = p.signal[s] * np_(p.degrade(x0, p.r[s]))[0]
    assert np.abs(x_s.mean(0) - want_mean).max() < 5 * p.noise_std[s] / np.sqrt(n)
    assert np.allclose(x_s.var(0), p.noise_std[s] ** 2, rtol=0.12)
