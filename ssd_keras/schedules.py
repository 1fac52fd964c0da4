"""Noise schedules and resolution schedules r(t) (docs/math.md sections 1-2).

Everything here is numpy float64 and independent of Keras. Timesteps are 0-indexed:
``t = 0`` is the least noisy state and ``t = T-1`` the noisiest.
"""

from __future__ import annotations

import math
import re

import numpy as np
from scipy.optimize import root_scalar

NOISE_SCHEDULES = ("linear", "cosine")
RESOLUTION_SCHEDULES = ("Equal", "ConvexDecay-g", "TanhLikeDecay-g", "SigmoidLikeDecay-g")

# --------------------------------------------------------------------------- noise
def noise_schedule(name: str, timesteps: int) -> np.ndarray:
    """Betas of the named noise schedule, float64 array of length ``timesteps``.

    ``linear``: ``linspace(s*1e-4, s*0.02, T)`` with ``s = 1000/T`` (DDPM, the paper's).
    ``cosine``: Nichol & Dhariwal's squared-cosine alphabar with offset 0.008, betas capped
    at 0.999.
    """
    timesteps = _positive_int(timesteps, "timesteps")
    key = str(name).strip().lower()
    if key == "linear":
        scale = 1000.0 / timesteps
        if scale * 0.02 >= 1.0:
            raise ValueError(
                f"linear noise schedule with timesteps = {timesteps} gives beta up to "
                f"{scale * 0.02:.3g} >= 1; use timesteps >= 21 or the cosine schedule"
            )
        return np.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=np.float64)
    if key == "cosine":
        offset = 0.008
        steps = np.arange(timesteps + 1, dtype=np.float64) / timesteps
        alphabar = np.cos((steps + offset) / (1 + offset) * math.pi / 2) ** 2
        betas = 1.0 - alphabar[1:] / alphabar[:-1]
        return np.minimum(betas, 0.999)
    raise ValueError(
        f"unknown noise schedule {name!r}; valid names: {', '.join(NOISE_SCHEDULES)}"
    )


# --------------------------------------------------------------------------- levels
def level_resolutions(image_size: int, levels: int) -> list[int]:
    """The ascending SSD levels ``[r_max / 2^(L-1), ..., r_max]`` for ``r_max = image_size``."""
    image_size = _positive_int(image_size, "image_size")
    levels = _positive_int(levels, "levels")
    factor = 2 ** (levels - 1)
    if image_size % factor:
        raise ValueError(
            f"image_size {image_size} cannot be halved {levels - 1} times "
            f"(levels = {levels} needs image_size divisible by {factor})"
        )
    return [image_size // 2 ** (levels - 1 - k) for k in range(levels)]


# --------------------------------------------------------------------------- r(t)
def parse_resolution_schedule(name: str) -> tuple[str, float | None]:
    """Split a schedule name as users write it into ``(kind, g)``.

    Accepts ``"Equal"``, ``"ConvexDecay-0.5"`` and the official code's ``"ConvexDecay_0.5"``
    (case-insensitive kind). ``g`` must be a positive number; ``Equal`` takes none.
    """
    text = str(name).strip()
    match = re.fullmatch(r"([A-Za-z]+)(?:[-_](.+))?", text)
    kinds = {k.split("-")[0].lower(): k.split("-")[0] for k in RESOLUTION_SCHEDULES}
    valid = ", ".join(RESOLUTION_SCHEDULES) + " (g > 0, e.g. ConvexDecay-0.5)"
    if not match or match.group(1).lower() not in kinds:
        raise ValueError(f"unknown resolution schedule {name!r}; valid: {valid}")
    kind = kinds[match.group(1).lower()]
    param = match.group(2)
    if kind == "Equal":
        if param is not None:
            raise ValueError(f"resolution schedule {name!r}: Equal takes no parameter")
        return kind, None
    if param is None:
        raise ValueError(
            f"resolution schedule {name!r}: {kind} needs a parameter g, e.g. {kind}-0.5"
        )
    try:
        g = float(param)
    except ValueError:
        raise ValueError(
            f"resolution schedule {name!r}: parameter {param!r} is not a number"
        ) from None
    if not (g > 0 and math.isfinite(g)):
        raise ValueError(f"resolution schedule {name!r}: parameter g must be > 0, got {g}")
    if kind in ("TanhLikeDecay", "SigmoidLikeDecay") and g < 1:
        # phat is monotone (hence a valid, invertible warp) only when 0.5^g <= 0.5
        raise ValueError(
            f"resolution schedule {name!r}: {kind} needs g >= 1 (phat is not monotone for g < 1)"
        )
    return kind, g


def _warp(u, g):
    """The odd warp ``q(sign(u) |u|^g)``, ``q(v) = 1.5 v - 2 v^3``, in the official code's
    float operation order: ``3 y^2 - 2 y^3 - 1/2`` with ``y = sign(u) |u|^g + 1/2``.

    Algebraically ``3y^2 - 2y^3 - 1/2 = q(y - 1/2)``; the order of the float operations is
    kept as the official code has it because ``int()`` of the result decides the level
    (docs/math.md, "r(t) bit for bit").
    """
    y = np.sign(u) * np.abs(u) ** g + 0.5
    return 3 * y**2 - 2 * y**3 - 0.5


def _tanh_like(v, g):
    """``S`` of the TanhLikeDecay schedule (flat in the middle, steep at both ends)."""
    return 0.5 * (_warp(v - 0.5, g) / _warp(-0.5, g)) + 0.5


def _warp_inverse(y, g):
    """``u`` in [-1/2, 1/2] with ``_warp(u) / _warp(-1/2) / 2 = y``, by Brent's method with
    scipy's default tolerances (as the official code solves it).

    The map is decreasing (``y = 1/2`` at ``u = -1/2``). At the ends (``|y| >= 1/2``) the
    root is the bracket's end; the official code returns it when the end evaluates to
    exactly zero and fails when rounding leaves it a hair off (e.g. g = 1.5), so the ends
    are answered directly."""
    if y >= 0.5:
        return -0.5
    if y <= -0.5:
        return 0.5
    solution = root_scalar(
        lambda u: 0.5 * (_warp(u, g) / _warp(-0.5, g)) - y, bracket=[-0.5, 0.5], method="brentq"
    )
    return solution.root if solution.converged else np.nan


def _sigmoid_like(v, g):
    """``G`` of the SigmoidLikeDecay schedule (steep in the middle): the inverse warp."""
    return 0.5 * (_warp_inverse(v - 0.5, g) / _warp_inverse(-0.5, g)) + 0.5


def _level_from_top(kind, g, tau, n):
    """Levels below the top (0 = full resolution) at ``tau = t/(T-1)``: docs/math.md section 2,
    with Python's ``int()`` of the float exactly as the official code computes it (no
    tolerance: float rounding decides ties, e.g. ConvexDecay-0.5, 3 levels, t = 888)."""
    if kind == "Equal":
        return min(int(tau * n), n - 1)
    if kind == "ConvexDecay":
        return min(int((1 - (1 - tau) ** g) * n), n - 1)
    warp = _tanh_like if kind == "TanhLikeDecay" else _sigmoid_like
    return n - 1 - min(int((1 - warp(1 - tau, g)) * n), n - 1)


def level_index(name: str, levels: int, timesteps: int) -> np.ndarray:
    """The level index ``i(t)`` (0 = coarsest) for t = 0..T-1, per docs/math.md section 2.

    Computed per step in float64 with the official code's expressions, so the released
    checkpoints' table is reproduced bit for bit (tested against tables made by it).
    """
    kind, g = parse_resolution_schedule(name)
    n = _positive_int(levels, "levels")
    timesteps = _positive_int(timesteps, "timesteps")
    if n == 1:
        return np.zeros(timesteps, dtype=np.int64)
    denominator = max(timesteps - 1, 1)
    index = [n - 1 - _level_from_top(kind, g, t / denominator, n) for t in range(timesteps)]
    return np.clip(np.asarray(index, dtype=np.int64), 0, n - 1)


def resolution_schedule(name: str, resolutions, timesteps: int) -> np.ndarray:
    """r(t) for t = 0..T-1 as an int array; ``resolutions`` ascending, e.g. ``[8, 16, 32, 64]``.

    Checks the invariants of docs/math.md section 2 (``r(0) = r_max``, ``r(T-1) = r_min``,
    non-increasing, every level visited) and raises ``ValueError`` naming the schedule if a
    parameter breaks them.
    """
    res = [int(r) for r in resolutions]
    if not res or any(b <= a for a, b in zip(res, res[1:])):
        raise ValueError(f"resolutions must be strictly ascending, got {list(resolutions)}")
    index = level_index(name, len(res), timesteps)
    r = np.asarray(res, dtype=np.int64)[index]
    if len(res) > 1:
        problems = []
        if r[0] != res[-1]:
            problems.append(f"r(0) = {r[0]} != r_max = {res[-1]}")
        if r[-1] != res[0]:
            problems.append(f"r(T-1) = {r[-1]} != r_min = {res[0]}")
        rising = np.nonzero(np.diff(r) > 0)[0]
        if rising.size:
            problems.append(f"r increases at t = {int(rising[0]) + 1}")
        missing = sorted(set(res) - set(r.tolist()))
        if missing:
            problems.append(f"levels {missing} get no timestep (T = {timesteps} too small)")
        if problems:
            raise ValueError(f"resolution schedule {name!r} is not usable: " + "; ".join(problems))
    return r


def change_steps(r: np.ndarray) -> list[int]:
    """Steps ``t >= 1`` with ``r(t) != r(t-1)`` (resolution-change steps), ascending."""
    r = np.asarray(r)
    return [int(t) for t in np.nonzero(r[1:] != r[:-1])[0] + 1]


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
