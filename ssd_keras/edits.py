"""Scale-space edits with a trained SSD model: super-resolution, variations, interpolation.

The math of docs/scale_space_edits.md, apart from the command line and the network:

- **Starting from an observation.** At a step ``t`` whose resolution is ``r(t) = r``, the
  forward marginal is ``q(x_t | x0) = N(a_t D x0, sigma_t^2 I)`` with ``D = D_{r_max -> r}``
  (docs/math.md eq. 8). A picture ``y`` at resolution ``r`` therefore gives an exact sample
  of it for every ``x0`` with ``D x0 = y``: ``x_t = a_t y + sigma_t eps`` (:func:`start_state`).
  ``strength`` picks ``t`` among the steps of level ``r`` (:func:`start_step`).
- **Data consistency** (optional, ILVR/DDRM spirit): after each reverse step to ``s``, the
  component of ``x_s`` in the row space of ``P = D_{r(s) -> r}`` (the part ``y`` determines)
  is replaced by its noised observation, ``x_s <- x_s + P^+ (a_s y + sigma_s P eps - P x_s)``;
  the final image gets the ``sigma -> 0`` limit of the same rule, the orthogonal projection
  onto ``{x : D x = y}`` (:class:`Guide`).
- **Interpolation.** With ddim at ``eta = 0`` a sample is a deterministic function of its
  starting noise and of the fresh noise on the change steps' null spaces;
  :class:`InterpolatedNoise` interpolates each of them spherically.

Arrays are NHWC; images in [-1, 1].
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .operators import SeparableOperator
from .process import ScaleSpaceProcess


class EditError(ValueError):
    """A user input an edit cannot use (wrong size, missing file, level out of range)."""


# ---------------------------------------------------------------------- starting state
def input_levels(process: ScaleSpaceProcess) -> list[int]:
    """The resolutions an observation may have: every level below full resolution."""
    return [int(r) for r in process.resolutions if int(r) < process.image_size]


def level_steps(process: ScaleSpaceProcess, r: int) -> tuple[int, int]:
    """``(t_lo, t_hi)``: the first and last step whose resolution is ``r`` (``r(t)`` never
    increases with ``t``, so they are contiguous)."""
    steps = np.nonzero(process.r == int(r))[0]
    if steps.size == 0:
        raise EditError(f"{r} px is not a level of this run; its levels are "
                        f"{', '.join(str(v) for v in process.resolutions)} px")
    return int(steps.min()), int(steps.max())


def start_step(process: ScaleSpaceProcess, r: int, strength: float) -> int:
    """The step of level ``r`` where the chain starts: ``t_lo + round(strength (t_hi - t_lo))``.

    ``strength = 0`` is the level's least noisy step (the most faithful start: the next
    step changes to the finer level), ``1`` its noisiest (the most freedom left to the model).
    """
    strength = float(strength)
    if not 0.0 <= strength <= 1.0:
        raise EditError(f"--strength {strength:g}: must lie in [0, 1]")
    t_lo, t_hi = level_steps(process, r)
    return t_lo + int(round(strength * (t_hi - t_lo)))


def start_state(process: ScaleSpaceProcess, y, t: int, eps):
    """``x_t = a_t y + sigma_t eps``: a sample of ``q(x_t | x0)`` for every ``x0`` with
    ``D_{1:t} x0 = y`` (docs/scale_space_edits.md eq. 1). ``y`` and ``eps`` at ``r(t)``."""
    from .process import _as_float

    t = int(t)
    if int(np.shape(y)[1]) != int(process.r[t]):
        raise ValueError(f"y is {np.shape(y)[1]} px but r({t}) = {process.r[t]}")
    eps = _as_float(eps)
    y = _as_float(y, eps.dtype)
    return float(process.signal[t]) * y + float(process.noise_std[t]) * eps


# ---------------------------------------------------------------------- consistency
class Observation:
    """``y = D_{r_max -> r_y} x0`` and the operators consistency needs at each finer level."""

    def __init__(self, process: ScaleSpaceProcess, r_y: int):
        self.process = process
        self.r_y = int(r_y)
        self._ops: dict[int, tuple[SeparableOperator, SeparableOperator]] = {}

    def operators(self, r: int) -> tuple[SeparableOperator, SeparableOperator]:
        """``(P, P^+)`` for ``P = D_{r -> r_y}`` (per axis; ``P`` has full row rank, so
        ``P^+ = P^T (P P^T)^{-1}`` and ``P P^+ = I``). Cached."""
        r = int(r)
        if r not in self._ops:
            if r < self.r_y:
                raise ValueError(f"a state at {r} px is coarser than the observation ({self.r_y} px)")
            p = self.process.operator(r, self.r_y)
            self._ops[r] = (p, SeparableOperator(np.linalg.pinv(p.mh), np.linalg.pinv(p.mw)))
        return self._ops[r]

    def replace(self, x, y, a: float, sigma: float, eps):
        """``x + P^+ (a y + sigma P eps - P x)``: the row-space component of ``x`` replaced by
        that of ``a y + sigma eps`` (docs/scale_space_edits.md eq. 3); ``sigma = 0`` projects
        onto ``{x : P x = a y}``. ``eps`` at ``x``'s resolution (ignored when ``sigma = 0``)."""
        r = int(x.shape[1])
        if r == self.r_y:  # P = I: the observation determines all of x
            return a * y + sigma * eps if sigma else a * y
        p, p_pinv = self.operators(r)
        target = a * y + sigma * p.apply(eps) if sigma else a * y
        return x + p_pinv.apply(target - p.apply(x))

    def pinv_norm(self, r: int) -> float:
        """``||P^+||_inf`` (max absolute row sum of ``P_h^+ (x) P_w^+``), for the tolerance of
        docs/scale_space_edits.md eq. 5."""
        _, p_pinv = self.operators(r)
        return float(np.abs(p_pinv.mh).sum(1).max() * np.abs(p_pinv.mw).sum(1).max())


def consistency_tolerance(obs: Observation, x_max: float, y_max: float, r: int | None = None) -> float:
    """A bound on ``max |D x_hat - y|`` after the float32 projection of :meth:`Observation.replace`
    with ``sigma = 0`` (docs/scale_space_edits.md eq. 5): ``1.01 u ((n_h + n_w + 4) X + Y +
    (m_h + m_w + 5) ||P^+|| (X + Y))`` with ``u`` float32's unit roundoff,
    ``n``/``m`` the input/output sizes per axis, ``X``/``Y`` the largest magnitudes of the
    input and of ``y``; the factor 1.01 covers second-order terms."""
    r = obs.process.image_size if r is None else int(r)
    u = float(np.finfo(np.float32).eps) / 2
    p, _ = obs.operators(r)
    (m_h, m_w), (n_h, n_w) = p.out_shape, p.in_shape
    pn = obs.pinv_norm(r)
    xy = float(x_max) + float(y_max)
    return 1.01 * u * ((n_h + n_w + 4) * x_max + y_max + (m_h + m_w + 5) * pn * xy)


class Guide:
    """What ``sample.sample_images`` needs to start from observations (and keep to them).

    ``y``: ``(N, r_y, r_y, C)``, one observation per image to sample (repeat an input for
    several samples of it). ``consistency``: replace the observed part of every state and
    of the final image (docs/scale_space_edits.md section 3).
    """

    def __init__(self, process: ScaleSpaceProcess, y: np.ndarray, step: int, consistency: bool = True):
        self.process = process
        self.y = np.asarray(y, dtype=np.float32)
        self.step = int(step)
        if int(process.r[self.step]) != self.y.shape[1]:
            raise ValueError(f"start step {step} is at {process.r[self.step]} px, y at {self.y.shape[1]} px")
        self.consistency = bool(consistency)
        self.observation = Observation(process, self.y.shape[1])

    def _y(self, rows):
        from keras import ops

        return ops.convert_to_tensor(self.y[rows.start: rows.stop], dtype="float32")

    def start(self, eps, t: int, rows):
        if int(t) != self.step:
            raise ValueError(f"the chain starts at {t}, the guide at {self.step}")
        return start_state(self.process, self._y(rows), t, eps)

    def state(self, x, s: int, rows, draw):
        if not self.consistency:
            return x
        s = int(s)
        eps = draw(len(rows), s)
        a, sigma = float(self.process.signal[s]), float(self.process.noise_std[s])
        return self.observation.replace(x, self._y(rows), a, sigma, eps)

    def final(self, x0, rows):
        if not self.consistency:
            return x0
        return self.observation.replace(x0, self._y(rows), 1.0, 0.0, None)


# ---------------------------------------------------------------------- sampling from inputs
def upsample(model, process: ScaleSpaceProcess, objective, y: np.ndarray, *, num_samples: int = 1,
             strength: float = 0.0, consistency: bool = True, **sampler):
    """``num_samples`` full-resolution images for each observation in ``y`` (all at one level).

    Returns ``(images, result)``: ``images`` ``(len(y), num_samples, H, W, C)`` and the
    ``SampleResult`` (progression frames of the first batch). ``sampler``: the keyword
    arguments of ``sample_images`` (steps, method, eta, seed, batch_size, ...).
    """
    from .sample import sample_images

    y = np.asarray(y, dtype=np.float32)
    step = start_step(process, y.shape[1], strength)
    rows = np.repeat(y, int(num_samples), axis=0)
    guide = Guide(process, rows, step, consistency)
    result = sample_images(model, process, objective, num_images=len(rows), start_step=step,
                           guide=guide, channels=y.shape[-1], **sampler)
    return result.images.reshape((len(y), int(num_samples)) + result.images.shape[1:]), result


# ---------------------------------------------------------------------- interpolation
def slerp(a: np.ndarray, b: np.ndarray, alpha: float) -> np.ndarray:
    """Spherical interpolation of two arrays seen as vectors; ``a`` at 0 and ``b`` at 1 exactly."""
    alpha = float(alpha)
    if alpha == 0.0:
        return np.array(a, copy=True)
    if alpha == 1.0:
        return np.array(b, copy=True)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0.0 or nb == 0.0:
        return (1.0 - alpha) * a + alpha * b
    theta = math.acos(float(np.clip(np.vdot(a, b) / (na * nb), -1.0, 1.0)))
    if theta < 1e-6:
        return (1.0 - alpha) * a + alpha * b
    return (math.sin((1.0 - alpha) * theta) * a + math.sin(alpha * theta) * b) / math.sin(theta)


class InterpolatedNoise:
    """A ``noise_source`` for ``sample_images``: frame ``i`` gets, for every draw of the
    chain, the spherical interpolation at ``alphas[i]`` of the draws of seeds A and B.

    Seeds A and B draw exactly what ``sample_images`` with ``seed = A`` (or B) and one image
    draws, in the same order. A draw at a resolution ``r > r_min`` (ddim at ``eta = 0``: the
    fresh noise of the change span into ``r``) is split into its components in the null
    space and in the row space of ``D_{r -> r/2}`` (per-axis right singular vectors), each
    interpolated on its own sphere; the first draw (the starting noise) is one component.
    (docs/scale_space_edits.md section 5)
    """

    def __init__(self, process: ScaleSpaceProcess, seed_a: int, seed_b: int, alphas, channels: int = 3):
        self.process = process
        self.alphas = np.asarray(alphas, dtype=np.float64)
        self.channels = int(channels)
        self._rngs = (np.random.default_rng(seed_a), np.random.default_rng(seed_b))
        self._draws: list[tuple[np.ndarray, np.ndarray]] = []
        self._calls: dict[int, int] = {}

    def _bases(self, r: int):
        levels = [int(v) for v in self.process.resolutions]
        coarser = levels[levels.index(r) - 1]
        op = self.process.operator(r, coarser)
        vh = np.linalg.svd(op.mh, full_matrices=True)[2]  # rows: right singular vectors
        vw = np.linalg.svd(op.mw, full_matrices=True)[2]
        row = np.zeros((r, r), dtype=bool)
        row[: op.out_shape[0], : op.out_shape[1]] = True
        return vh, vw, row

    def mix(self, a: np.ndarray, b: np.ndarray, alpha: float, first: bool) -> np.ndarray:
        """One draw of one frame: ``(1, r, r, C)`` from A's and B's draws."""
        if alpha in (0.0, 1.0) or first or int(a.shape[1]) == int(self.process.resolutions[0]):
            return slerp(a, b, alpha)
        vh, vw, row = self._bases(int(a.shape[1]))
        coords = [np.einsum("ih,jw,bhwc->bijc", vh, vw, v) for v in (a, b)]
        out = np.zeros_like(coords[0])
        for part in (row, ~row):
            out[:, part] = slerp(coords[0][:, part], coords[1][:, part], alpha)
        return np.einsum("ih,jw,bijc->bhwc", vh, vw, out)

    def __call__(self, rows, t: int) -> np.ndarray:
        k = self._calls.get(rows.start, 0)
        self._calls[rows.start] = k + 1
        r = int(self.process.r[int(t)])
        while len(self._draws) <= k:
            self._draws.append(tuple(g.standard_normal((1, r, r, self.channels)) for g in self._rngs))
        a, b = self._draws[k]
        if a.shape[1] != r:
            raise ValueError(f"draw {k} is at {a.shape[1]} px, asked for {r} px: batches differ")
        return np.concatenate([self.mix(a, b, self.alphas[i], first=k == 0) for i in rows], axis=0)


def interpolate(model, process: ScaleSpaceProcess, objective, seed_a: int, seed_b: int, frames: int, **sampler):
    """``frames`` images along the path from seed A's ddim (eta 0) sample to seed B's."""
    from .sample import sample_images

    if int(frames) < 2:
        raise EditError(f"--frames {frames}: must be >= 2")
    alphas = np.linspace(0.0, 1.0, int(frames))
    source = InterpolatedNoise(process, seed_a, seed_b, alphas, channels=sampler.pop("channels", 3))
    return sample_images(model, process, objective, num_images=int(frames), method="ddim", eta=0.0,
                         noise_source=source, **sampler)


# ---------------------------------------------------------------------- inputs
def input_files(inputs) -> list[Path]:
    """The image files named by ``inputs`` (files, or folders: their images, sorted)."""
    from .data import IMAGE_EXTENSIONS

    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
                           and not p.name.startswith(".") and p.is_file())
            if not found:
                raise EditError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise EditError(f"{path}: no such file or folder")
    if not files:
        raise EditError("no input images given")
    return files


def read_image(path: Path) -> np.ndarray:
    """An image file as ``(H, W, 3)`` float32 in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError

    from .data import to_rgb

    try:
        with Image.open(path) as img:
            arr = np.asarray(to_rgb(img))
    except (UnidentifiedImageError, OSError) as exc:
        raise EditError(f"{path}: not a readable image ({exc})") from None
    return arr.astype(np.float32) / 127.5 - 1.0


def read_observations(files, process: ScaleSpaceProcess) -> dict[int, list[tuple[Path, np.ndarray]]]:
    """Input images grouped by level. An image that is not square at one of the run's levels
    below full resolution is an error naming the allowed sizes (docs/scale_space_edits.md
    section 6: a resize would change the observation the model is told to keep)."""
    allowed = input_levels(process)
    sizes = ", ".join(f"{r}x{r}" for r in allowed)
    groups: dict[int, list] = {}
    for path in files:
        img = read_image(path)
        h, w = img.shape[:2]
        if h != w or h not in allowed:
            hint = (" (full resolution: use `ssd-run vary` to make variations of it)"
                    if h == w == process.image_size else "")
            raise EditError(f"{path} is {w}x{h}; this run upsamples images of {sizes} px{hint}")
        groups.setdefault(h, []).append((path, img))
    return groups


def parse_level(level: int, process: ScaleSpaceProcess) -> int:
    """``--level``: a resolution (px) below full resolution."""
    allowed = input_levels(process)
    if int(level) not in allowed:
        raise EditError(f"--level {level}: must be one of this run's levels below full resolution: "
                        f"{', '.join(str(r) for r in allowed)} px")
    return int(level)
