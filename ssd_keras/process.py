"""The Scale Space Diffusion process (docs/math.md sections 3-7), as pure math.

``ScaleSpaceProcess`` owns every table that does not depend on a batch (noise schedule,
r(t), change steps, per-pair operators and their eigenbases, respaced step tables), computed
once in numpy float64. Its methods take NHWC arrays (numpy or tensors of the active Keras
backend) and return backend tensors of the input's float dtype. It knows nothing about
networks or training loops.

Timestep arguments are host-side integers (Python ints or numpy arrays): they decide which
resolution, hence which static shapes and which network path, a batch uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from . import schedules
from .operators import GramEigen, SeparableOperator, downsample_operator

NOISE_METHODS = ("exact", "lanczos")
VARIANCES = ("fixed_small", "fixed_large")


@dataclass(frozen=True)
class StepCoefficients:
    """Scalars of one reverse step ``t -> s``: ``c = a_t/a_s``, ``rho = sigma_s^2/sigma_t^2``."""

    t: int
    s: int
    a_s: float
    sigma_s: float
    c: float
    rho: float

    @property
    def shrink(self) -> float:
        """``rho c^2``: ``Sigma = sigma_s^2 (I - rho c^2 D^T D)`` (docs/math.md eq. 11)."""
        return self.rho * self.c**2


@dataclass(frozen=True)
class DDIMSpectra:
    """Gains of a DDIM-style step in the singular bases of ``D = P [S 0] Q^T`` (per axis).

    ``p_h``, ``p_w``: left singular vectors padded with zero columns to ``(m, n)``;
    ``q_h``, ``q_w``: all right singular vectors ``(n, n)``, the first ``m`` spanning the
    row space of the axis matrix; ``keep``/``fresh``: ``(n_h, n_w)`` grids of the gains on
    the whitened residual and on fresh noise (docs/sampling.md, section 3).
    """

    k: StepCoefficients
    eta: float
    p_h: np.ndarray
    p_w: np.ndarray
    q_h: np.ndarray
    q_w: np.ndarray
    keep: np.ndarray
    fresh: np.ndarray


class ScaleSpaceProcess:
    """Noise schedule + resolution schedule + downsampling operators of an SSD model.

    Args:
        image_size: ``r_max``, the full resolution.
        levels: number of resolutions ``L``; 1 is plain DDPM (predicting x0).
        timesteps: ``T``.
        noise_schedule: ``"linear"`` (paper) or ``"cosine"``.
        resolution_schedule: ``"Equal"``, ``"ConvexDecay-g"``, ``"TanhLikeDecay-g"``,
            ``"SigmoidLikeDecay-g"`` (``_`` also accepted as separator).
        degradation: per-axis matrix builder of ``operators.MATRIX_BUILDERS``.

    Raises ``ValueError`` for an unusable configuration, including a transition covariance
    that is not positive semi-definite (naming the step and the margin).
    """

    def __init__(
        self,
        image_size: int,
        levels: int,
        timesteps: int = 1000,
        noise_schedule: str = "linear",
        resolution_schedule: str = "ConvexDecay-0.5",
        degradation: str = "bilinear",
    ):
        self.image_size = int(image_size)
        self.levels = int(levels)
        self.timesteps = int(timesteps)
        self.noise_schedule_name = noise_schedule
        self.resolution_schedule_name = resolution_schedule
        self.degradation = degradation

        self.resolutions: list[int] = schedules.level_resolutions(self.image_size, self.levels)
        self.betas = schedules.noise_schedule(noise_schedule, self.timesteps)
        self.alphas_cumprod = np.cumprod(1.0 - self.betas)
        self.signal = np.sqrt(self.alphas_cumprod)  # a_t
        self.noise_std = np.sqrt(1.0 - self.alphas_cumprod)  # sigma_t
        self.r = schedules.resolution_schedule(
            resolution_schedule, self.resolutions, self.timesteps
        )
        self.change_steps: list[int] = schedules.change_steps(self.r)
        self._operators: dict[tuple[int, int], SeparableOperator] = {}
        self._eigen: dict[tuple[int, int], GramEigen] = {}
        self.check_transitions()

    # ------------------------------------------------------------------ tables
    def snr(self, t) -> np.ndarray:
        t = np.asarray(t)
        return self.alphas_cumprod[t] / (1.0 - self.alphas_cumprod[t])

    def output_step(self, t: int) -> int:
        """The step whose resolution the network's x0 prediction at ``t`` has: ``max(t-1, 0)``."""
        return max(int(t) - 1, 0)

    def path_at(self, t: int) -> tuple[int, int]:
        """The network path ``(r_in, r_out) = (r(t), r(t-1))`` used at step ``t``."""
        return int(self.r[t]), int(self.r[self.output_step(t)])

    @cached_property
    def paths(self) -> list[tuple[int, int]]:
        """All paths the process uses, ordered from the noisiest to the cleanest."""
        seen = []
        for t in range(self.timesteps - 1, -1, -1):
            key = self.path_at(t)
            if key not in seen:
                seen.append(key)
        return seen

    def operator(self, r_from: int, r_to: int) -> SeparableOperator:
        """``D_{r_from -> r_to}``: the chain of 2x downsamples (cached; docs/math.md section 3)."""
        key = (int(r_from), int(r_to))
        if key not in self._operators:
            self._operators[key] = downsample_operator(*key, builder=self.degradation)
        return self._operators[key]

    def gram_eigen(self, r_from: int, r_to: int) -> GramEigen:
        key = (int(r_from), int(r_to))
        if key not in self._eigen:
            self._eigen[key] = self.operator(*key).gram_eigh()
        return self._eigen[key]

    def step_coefficients(self, t: int, s: int | None = None) -> StepCoefficients:
        t = int(t)
        s = self.output_step(t) if s is None else int(s)
        if not 0 <= s < t < self.timesteps:
            raise ValueError(f"a reverse step needs 0 <= s < t < T, got t={t}, s={s}")
        a_t, a_s = self.signal[t], self.signal[s]
        return StepCoefficients(
            t=t,
            s=s,
            a_s=float(a_s),
            sigma_s=float(self.noise_std[s]),
            c=float(a_t / a_s),
            rho=float(self.noise_std[s] ** 2 / self.noise_std[t] ** 2),
        )

    # ------------------------------------------------------------------ validity
    def check_transitions(self, steps=None) -> None:
        """Refuse a configuration whose transition covariance is not PSD.

        ``Sigma_{t|s} = sigma_t^2 I - c^2 sigma_s^2 D D^T`` for each change step (or each
        ``(t, s)`` pair given); its smallest eigenvalue is
        ``sigma_t^2 - c^2 sigma_s^2 lam_max(D^T D)``.
        """
        pairs = steps if steps is not None else [(t, t - 1) for t in self.change_steps]
        for t, s in pairs:
            lam = self.gram_eigen(self.r[s], self.r[t]).largest
            c2 = self.alphas_cumprod[t] / self.alphas_cumprod[s]
            margin = self.noise_std[t] ** 2 - c2 * self.noise_std[s] ** 2 * lam
            if margin < -1e-12:
                raise ValueError(
                    f"transition covariance of step t={t} (from s={s}, "
                    f"{self.r[s]}->{self.r[t]} px) is not positive semi-definite: smallest "
                    f"eigenvalue {margin:.3e} (largest eigenvalue of D^T D = {lam:.4f}); "
                    f"use a gentler degradation or noise schedule"
                )

    # ------------------------------------------------------------------ forward
    def _same_resolution(self, t) -> tuple[np.ndarray, int]:
        t = np.atleast_1d(np.asarray(t, dtype=np.int64))
        if t.min() < 0 or t.max() >= self.timesteps:
            raise ValueError(f"timesteps must lie in [0, {self.timesteps - 1}], got {t}")
        res = np.unique(self.r[t])
        if res.size != 1:
            raise ValueError(
                f"a batch must share one resolution (one network path); got r(t) = {res.tolist()}"
            )
        return t, int(res[0])

    def degrade(self, x0, r_to: int):
        """``D_{r_max -> r_to} x0`` (identity at full resolution)."""
        if int(r_to) == self.image_size:
            return _as_float(x0)
        return self.operator(self.image_size, r_to).apply(_as_float(x0))

    def q_sample(self, x0, t, noise):
        """``x_t = a_t D_{1:t} x0 + sigma_t noise`` (docs/math.md eq. 8); ``noise`` has the
        resolution ``r(t)``."""
        from keras import ops

        t, res = self._same_resolution(t)
        x = self.degrade(x0, res)
        a = _per_sample(self.signal[t], x)
        sigma = _per_sample(self.noise_std[t], x)
        return a * x + sigma * ops.cast(noise, x.dtype)

    def x0_target(self, x0, t):
        """The regression target at ``t``: ``D_{1:s} x0`` with ``s = max(t-1, 0)`` (docs/math.md eq. 9)."""
        t, _ = self._same_resolution(t)
        s = np.maximum(t - 1, 0)
        _, res_s = self._same_resolution(s)
        return self.degrade(x0, res_s)

    def loss_weight(self, t, gamma: float | None = 5.0) -> np.ndarray:
        """Min-SNR-gamma weight ``min(SNR(t), gamma)`` (docs/math.md eq. 9); ``gamma`` None
        or <= 0 gives ones."""
        t = np.asarray(t)
        if gamma is None or gamma <= 0:
            return np.ones(t.shape, dtype=np.float64)
        return np.minimum(self.snr(t), gamma)

    # ------------------------------------------------------------------ training t
    def sample_training_timesteps(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
        """The paper's one-path-per-batch timestep sampler (docs/math.md section 4).

        Draw ``t*`` uniformly; a change step is used by the whole batch, otherwise each sample
        draws uniformly among the non-change steps at resolution ``r(t*)``. Every ``t`` keeps
        marginal probability ``1/T``.
        """
        t_star = int(rng.integers(self.timesteps))
        if t_star in self._change_set:
            return np.full(batch_size, t_star, dtype=np.int64)
        pool = self._plain_steps_at[int(self.r[t_star])]
        return pool[rng.integers(len(pool), size=batch_size)]

    @cached_property
    def _change_set(self) -> frozenset:
        return frozenset(self.change_steps)

    @cached_property
    def _plain_steps_at(self) -> dict[int, np.ndarray]:
        plain = np.array([t for t in range(self.timesteps) if t not in self._change_set])
        return {r: plain[self.r[plain] == r] for r in self.resolutions}

    # ------------------------------------------------------------------ reverse
    def posterior_mean(self, x0_hat, x_t, t: int, s: int | None = None):
        """``mu = a_s x0_hat + rho c D^T (x_t - c a_s D x0_hat)`` (Theorem 2; docs/math.md eq. 10)."""
        k = self.step_coefficients(t, s)
        x0_hat = _as_float(x0_hat)
        mu_s = k.a_s * x0_hat
        op = self.operator(self.r[k.s], self.r[k.t])
        if op.is_identity:
            return (1.0 - k.shrink) * mu_s + (k.rho * k.c) * _as_float(x_t, x0_hat.dtype)
        residual = _as_float(x_t, x0_hat.dtype) - k.c * op.apply(mu_s)
        return mu_s + (k.rho * k.c) * op.adjoint(residual)

    def posterior_noise(
        self,
        xi,
        t: int,
        s: int | None = None,
        method: str = "exact",
        iterations: int = 40,
        variance: str = "fixed_small",
    ):
        """Noise ``z`` with covariance ``sigma_s^2 (I - rho c^2 D^T D)``, from ``xi ~ N(0, I)``.

        ``method="exact"`` uses the per-axis eigenbases (docs/math.md eq. 13); ``"lanczos"`` runs
        ``iterations`` Lanczos steps of ``sqrt(A) xi`` batched over samples and channels.
        ``variance="fixed_large"`` (the DDPM-eps baseline, plain steps only) uses
        ``1 - alphabar_t/alphabar_s`` instead (the posterior variance when ``s = 0``).
        """
        if method not in NOISE_METHODS:
            raise ValueError(f"unknown noise method {method!r}; valid: {', '.join(NOISE_METHODS)}")
        if variance not in VARIANCES:
            raise ValueError(f"unknown variance {variance!r}; valid: {', '.join(VARIANCES)}")
        k = self.step_coefficients(t, s)
        xi = _as_float(xi)
        change = int(self.r[k.s]) != int(self.r[k.t])
        if variance == "fixed_large":
            if change:
                raise ValueError("fixed_large variance is defined for plain (DDPM) steps only")
            if k.s > 0:
                return math.sqrt(1.0 - self.alphas_cumprod[k.t] / self.alphas_cumprod[k.s]) * xi
        if not change:
            return (k.sigma_s * math.sqrt(1.0 - k.shrink)) * xi
        if method == "exact":
            return k.sigma_s * self._sqrt_exact(xi, k)
        return k.sigma_s * lanczos_sqrt(
            lambda v: self._apply_a(v, k), xi, iterations=int(iterations)
        )

    def _apply_a(self, v, k: StepCoefficients):
        """``A v = v - rho c^2 D^T D v`` at resolution ``r(s)`` (docs/math.md eq. 12)."""
        op = self.operator(self.r[k.s], self.r[k.t])
        return v - k.shrink * op.adjoint(op.apply(v))

    def _sqrt_exact(self, xi, k: StepCoefficients):
        """``Q_h [sqrt(1 - rho c^2 lam_i mu_j) (Q_h^T xi Q_w)] Q_w^T`` (docs/math.md eq. 13)."""
        from keras import ops

        from .operators import separable_apply

        eig = self.gram_eigen(self.r[k.s], self.r[k.t])
        key = ("sqrt", k.t, k.s, str(xi.dtype))
        cache = self.__dict__.setdefault("_sqrt_constants", {})
        if key not in cache:
            scale = np.sqrt(np.clip(1.0 - k.shrink * eig.eigenvalue_grid(), 0.0, None))
            dtype = _dtype_name(xi)
            cache[key] = tuple(
                ops.convert_to_tensor(m, dtype=dtype)
                for m in (eig.qh, eig.qh.T, eig.qw, eig.qw.T, scale[None, :, :, None])
            )
        qh, qh_t, qw, qw_t, scale = cache[key]
        spectral = separable_apply(xi, qh_t, qw_t)  # Q_h^T xi Q_w
        return separable_apply(scale * spectral, qh, qw)  # Q_h (.) Q_w^T

    # ------------------------------------------------------------------ ddim
    def ddim_spectra(self, t: int, s: int, eta: float) -> "DDIMSpectra":
        """Per-direction gains of the DDIM-style step ``t -> s`` (docs/sampling.md, section 3).

        With the per-axis SVDs ``A = P [S 0] Q^T`` of ``D = D_{r(s)->r(t)}`` the step acts
        on each right singular direction ``(i, j)`` of ``D`` on its own. In the row space
        (``i, j < m``) the correlation of the posterior is ``k = sqrt(rho) c s_i s_j`` and
        the step keeps ``g = sqrt(1 - eta^2 (1 - k^2))`` of the whitened residual and adds
        ``h = eta sqrt(1 - k^2)`` fresh noise; in the null space (``i >= m`` or ``j >= m``)
        it is pure fresh noise, ``g = 0, h = 1``. ``eta = 1`` is the SSD posterior
        (docs/math.md section 5); on a plain span this is DDIM (docs/sampling.md, section 2).
        """
        eta = float(eta)
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"ddim eta must lie in [0, 1], got {eta}")
        k = self.step_coefficients(t, s)
        op = self.operator(self.r[k.s], self.r[k.t])
        ph, sh, qh_t = np.linalg.svd(op.mh, full_matrices=True)
        pw, sw, qw_t = np.linalg.svd(op.mw, full_matrices=True)
        n_h, n_w = op.in_shape
        m_h, m_w = op.out_shape
        k2 = np.zeros((n_h, n_w))
        k2[:m_h, :m_w] = k.shrink * np.outer(sh**2, sw**2)  # rho c^2 s_i^2 s_j^2
        row = np.zeros((n_h, n_w), dtype=bool)
        row[:m_h, :m_w] = True
        one_minus = np.clip(1.0 - k2, 0.0, None)
        keep = np.where(row, np.sqrt(np.clip(1.0 - eta**2 * one_minus, 0.0, None)), 0.0)
        fresh = np.where(row, eta * np.sqrt(one_minus), 1.0)
        pad_h = np.zeros((m_h, n_h))
        pad_h[:, :m_h] = ph
        pad_w = np.zeros((m_w, n_w))
        pad_w[:, :m_w] = pw
        return DDIMSpectra(k=k, eta=eta, p_h=pad_h, p_w=pad_w, q_h=qh_t.T, q_w=qw_t.T,
                           keep=keep, fresh=fresh)

    def ddim_step(self, x0_hat, x_t, xi, t: int, s: int | None = None, eta: float = 0.0):
        """One DDIM-style step ``x_t -> x_s`` that keeps ``q(x_s | x0)`` for every ``eta``.

        ``x_s = a_s x0_hat + sigma_s Q [g * (P^T e) + h * (Q^T xi)]`` with the whitened
        residual ``e = (x_t - a_t D x0_hat) / sigma_t`` and the gains of ``ddim_spectra``
        (docs/sampling.md, section 3). On a plain span (``D = I``) this is DDIM,
        ``x_s = a_s x0_hat + sqrt(sigma_s^2 - eta^2 sigmatilde^2) eps_hat + eta sigmatilde xi``
        with ``eps_hat = (x_t - a_t x0_hat) / sigma_t`` and ``sigmatilde^2`` the DDPM
        posterior variance of the span (docs/sampling.md, section 2). ``xi ~ N(0, I)`` at
        resolution ``r(s)``; it may be ``None`` where no fresh noise is needed (a plain span
        with ``eta = 0``). Same cost as an ancestral step: on a change span eight small
        matrix products, as for the posterior mean plus the exact noise.
        """
        from keras import ops

        k = self.step_coefficients(t, s)
        eta = float(eta)
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"ddim eta must lie in [0, 1], got {eta}")
        x0_hat = _as_float(x0_hat)
        x_t = _as_float(x_t, x0_hat.dtype)
        op = self.operator(self.r[k.s], self.r[k.t])
        if op.is_identity:
            sigma_t = float(self.noise_std[k.t])
            tilde2 = k.sigma_s**2 * (1.0 - k.shrink)  # DDPM posterior variance of the span
            keep = math.sqrt(max(k.sigma_s**2 - eta**2 * tilde2, 0.0)) / sigma_t
            a_t = k.c * k.a_s
            out = (k.a_s - keep * a_t) * x0_hat + keep * x_t
            if eta > 0.0:
                if xi is None:
                    raise ValueError("ddim_step with eta > 0 needs the noise xi")
                out = out + (eta * math.sqrt(tilde2)) * _as_float(xi, x0_hat.dtype)
            return out
        if xi is None:
            raise ValueError("a ddim step across a resolution change needs the noise xi "
                             "(the null space of the downsample is always fresh noise)")
        from .operators import separable_apply

        dtype = _dtype_name(x0_hat)
        key = ("ddim", k.t, k.s, eta, dtype)
        cache = self.__dict__.setdefault("_ddim_constants", {})
        if key not in cache:
            spec = self.ddim_spectra(k.t, k.s, eta)
            sigma_t = float(self.noise_std[k.t])
            cache[key] = tuple(ops.convert_to_tensor(m, dtype=dtype) for m in (
                spec.p_h.T, spec.p_w.T, spec.q_h.T, spec.q_w.T, spec.q_h, spec.q_w,
                (k.sigma_s / sigma_t * spec.keep)[None, :, :, None],
                (k.sigma_s * spec.fresh)[None, :, :, None],
            ))
        p_h_t, p_w_t, q_h_t, q_w_t, q_h, q_w, keep, fresh = cache[key]
        mu_s = k.a_s * x0_hat
        residual = x_t - k.c * op.apply(mu_s)  # sigma_t e
        spectral = keep * separable_apply(residual, p_h_t, p_w_t)
        spectral = spectral + fresh * separable_apply(_as_float(xi, x0_hat.dtype), q_h_t, q_w_t)
        return mu_s + separable_apply(spectral, q_h, q_w)

    # ------------------------------------------------------------------ respacing
    def respace(self, num_steps: int) -> list[int]:
        """Kept original timesteps for ``num_steps`` sampling steps, ascending (docs/math.md section 7).

        ``round(i (T-1)/(K-1))`` for ``i = 0..K-1`` plus every resolution-change step.
        The stride is accumulated in float64 as guided-diffusion's ``space_timesteps``
        (and so the official SSD code) does, so the kept steps equal the official ones
        exactly, rounding ties included (docs/math.md, "Respaced sampling").
        """
        k = int(num_steps)
        if not 2 <= k <= self.timesteps:
            raise ValueError(f"sampling steps must lie in [2, {self.timesteps}], got {num_steps}")
        stride = (self.timesteps - 1) / (k - 1)
        kept, position = set(), 0.0
        for _ in range(k):
            kept.add(round(position))
            position += stride
        return sorted(kept | set(self.change_steps))

    def reverse_steps(self, num_steps: int | None = None, start: int | None = None) -> list[tuple[int, int]]:
        """``(t, s)`` pairs of the reverse chain, noisiest first, for the respaced steps.

        The network is evaluated at each ``t`` (and once more at ``t = 0``, whose x0
        prediction is the sample). Each pair satisfies ``r(s) = r(t-1)``. ``start``: begin
        at this step instead (kept or not), then follow the kept steps below it; every
        change step below it is kept, so the first pair satisfies ``r(s) = r(t-1)`` too
        (docs/scale_space_edits.md).
        """
        kept = self.respace(num_steps or self.timesteps)
        if start is not None:
            start = int(start)
            if not 0 <= start < self.timesteps:
                raise ValueError(f"start step must lie in [0, {self.timesteps - 1}], got {start}")
            kept = [t for t in kept if t < start] + [start]
        return [(kept[i], kept[i - 1]) for i in range(len(kept) - 1, 0, -1)]


# ---------------------------------------------------------------------- Lanczos
def lanczos_sqrt(apply_a, xi, iterations: int = 40):
    """``sqrt(A) xi`` by ``iterations`` Lanczos steps, batched over samples and channels.

    Each ``(sample, channel)`` slice of the NHWC tensor ``xi`` is its own Krylov vector
    (``A`` acts on every channel alike), so all slices run in lockstep with inner products
    reduced over the spatial axes. The small tridiagonal eigenproblems are solved on the
    host in float64. ``apply_a`` must be a symmetric positive semi-definite linear map.
    """
    from keras import ops

    if iterations < 1:
        raise ValueError(f"lanczos iterations must be >= 1, got {iterations}")
    tiny = 1e-30
    # below this relative size a new Lanczos vector is rounding noise: the Krylov space is
    # (numerically) invariant and further vectors must not couple to it
    breakdown = 100 * float(np.finfo(_dtype_name(xi)).eps)

    def dot(u, v):
        return ops.sum(u * v, axis=(1, 2), keepdims=True)

    norm0 = ops.sqrt(dot(xi, xi))
    q = xi / _at_least(norm0, tiny)
    q_prev = ops.zeros_like(xi)
    beta_prev = ops.zeros_like(norm0)
    basis, alphas, betas = [], [], []
    for j in range(iterations):
        basis.append(q)
        w = apply_a(q) - beta_prev * q_prev
        alpha = dot(w, q)
        w = w - alpha * q
        alphas.append(alpha)
        if j == iterations - 1:
            break
        beta = ops.sqrt(dot(w, w))
        alive = ops.cast(beta > breakdown * _at_least(ops.abs(alpha), tiny), w.dtype)
        beta = beta * alive  # an invariant subspace was found: stop coupling further vectors
        q_prev, q = q, alive * w / _at_least(beta, tiny)
        beta_prev = beta
        betas.append(beta)

    # f(T) e1 for each slice, T = tridiag(betas, alphas, betas), on the host.
    a = np.stack([ops.convert_to_numpy(v)[:, 0, 0, :] for v in alphas], axis=-1).astype(np.float64)
    b = (
        np.stack([ops.convert_to_numpy(v)[:, 0, 0, :] for v in betas], axis=-1).astype(np.float64)
        if betas
        else np.zeros(a.shape[:-1] + (0,))
    )
    m = a.shape[-1]
    tri = np.zeros(a.shape + (m,))
    idx = np.arange(m)
    tri[..., idx, idx] = a
    tri[..., idx[:-1], idx[1:]] = b
    tri[..., idx[1:], idx[:-1]] = b
    lam, vec = np.linalg.eigh(tri)
    coeff = vec @ (np.sqrt(np.clip(lam, 0.0, None)) * vec[..., 0, :])[..., None]  # (B, C, m, 1)
    coeff = coeff[..., 0] * ops.convert_to_numpy(norm0)[:, 0, 0, :, None].astype(np.float64)
    dtype = _dtype_name(xi)
    out = ops.zeros_like(xi)
    for j, v in enumerate(basis):
        out = out + ops.convert_to_tensor(coeff[:, None, None, :, j], dtype=dtype) * v
    return out


# ---------------------------------------------------------------------- helpers
def _at_least(x, floor: float):
    """``max(x, floor)`` in x's dtype (on torch, ``ops.maximum`` of two float64 tensors
    returns float32 in Keras 3.15, which stalled float64 Lanczos at 1e-7)."""
    from keras import ops

    return ops.where(x > floor, x, ops.full_like(x, floor))


def _dtype_name(x) -> str:
    from keras import backend

    return backend.standardize_dtype(x.dtype)


def _as_float(x, dtype=None):
    from keras import backend, ops

    if dtype is None:
        current = backend.standardize_dtype(getattr(x, "dtype", "float32"))
        dtype = current if current.startswith(("float", "bfloat")) else "float32"
    return ops.convert_to_tensor(x, dtype=dtype)


def _per_sample(values: np.ndarray, like):
    from keras import ops

    return ops.convert_to_tensor(values.reshape(-1, 1, 1, 1), dtype=_dtype_name(like))
