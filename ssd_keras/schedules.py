"""Noise schedules and resolution schedules r(t) (SPEC.md sections 1-2).

Everything here is numpy float64 and independent of Keras. Timesteps are 0-indexed:
``t = 0`` is the least noisy state and ``t = T-1`` the noisiest.
"""

from __future__ import annotations

import math
import re

import numpy as np
from scipy.optimize import brentq

NOISE_SCHEDULES = ("linear", "cosine")
RESOLUTION_SCHEDULES = ("Equal", "ConvexDecay-g", "TanhLikeDecay-g", "SigmoidLikeDecay-g")

# floor() of a quantity that is mathematically an integer must not fall one short because
# of rounding; this slack is far below the spacing of tau = t / (T-1) for any usable T.
_FLOOR_SLACK = 1e-9


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


def _q(v):
    return 1.5 * v - 2.0 * v**3


def _phat(u, g):
    """Odd map of [-0.5, 0.5] onto [-1, 1] used by the Tanh- and Sigmoid-like schedules."""
    u = np.asarray(u, dtype=np.float64)
    return _q(np.sign(u) * np.abs(u) ** g) / _q(0.5**g)


def _phat_inverse(y: float, g: float) -> float:
    if y <= -1.0:
        return -0.5
    if y >= 1.0:
        return 0.5
    return brentq(lambda u: float(_phat(u, g)) - y, -0.5, 0.5, xtol=1e-14, rtol=1e-14)


def level_index(name: str, levels: int, timesteps: int) -> np.ndarray:
    """The level index ``i(t)`` (0 = coarsest) for t = 0..T-1, per SPEC.md section 2."""
    kind, g = parse_resolution_schedule(name)
    n = _positive_int(levels, "levels")
    timesteps = _positive_int(timesteps, "timesteps")
    tau = np.arange(timesteps, dtype=np.float64) / max(timesteps - 1, 1)

    def floor_n(fraction):
        return np.minimum(np.floor(n * fraction + _FLOOR_SLACK), n - 1)

    if kind == "Equal":
        index = n - 1 - floor_n(tau)
    elif kind == "ConvexDecay":
        index = n - 1 - floor_n(1.0 - (1.0 - tau) ** g)
    elif kind == "TanhLikeDecay":
        s = 0.5 + 0.5 * _phat(tau - 0.5, g)
        index = floor_n(1.0 - s)
    else:  # SigmoidLikeDecay
        gt = np.array([0.5 + _phat_inverse(2.0 * x - 1.0, g) for x in tau])
        index = floor_n(1.0 - gt)
    return np.clip(index, 0, n - 1).astype(np.int64)


def resolution_schedule(name: str, resolutions, timesteps: int) -> np.ndarray:
    """r(t) for t = 0..T-1 as an int array; ``resolutions`` ascending, e.g. ``[8, 16, 32, 64]``.

    Checks the invariants of SPEC.md section 2 (``r(0) = r_max``, ``r(T-1) = r_min``,
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
