"""Tolerances for comparing one float32 computation done two ways: on another number of
devices, processes or threads, with another batch split, kernel or Keras backend.

Such results differ only by rounding, and rounding has a known size. A sum of ``n``
float32 terms taken in two different orders differs by about ``sqrt(n) * u`` times the
size of its terms (``u = 2**-24``, the unit roundoff; the errors of the partial sums add
like a random walk, and the worst case ``n * u`` needs adversarial orderings). A network
repeats such sums layer after layer, and each layer passes the error of its input on,
so the relative error grows about linearly with the number of layers ``depth``. A result
smaller than its terms (cancellation) carries the terms' absolute error: ``safety``
covers that, and the comparison is made norm-wise over a whole tensor, which a few
cancelled elements cannot dominate.

The tolerance is then compared with what a real bug does: a gradient summed instead of
averaged over two ranks is off by 100 %, one rank's half-batch gradient by tens of %,
while ``rounding_tolerance`` for the test networks here is ~1e-4.

Never compare results after an adaptive optimizer step (Adam, AdamW) this way: Adam
divides each gradient by its own running RMS, so a rounding-level difference of a
near-zero gradient becomes an update difference of up to ``lr`` (issue 29). Compare the
gradients, the loss, or the state restored bit for bit instead.
"""

from __future__ import annotations

import numpy as np

UNIT_ROUNDOFF = float(np.finfo(np.float32).eps) / 2  # 2**-24: float32 round-to-nearest


def rounding_tolerance(terms: int, depth: int, safety: float = 8.0) -> float:
    """Relative (norm-wise) difference that float32 rounding alone explains between two
    evaluations of a computation whose results each sum up to ``terms`` products, through
    ``depth`` sequential layers (module docstring)."""
    if terms < 1 or depth < 1:
        raise ValueError(f"terms and depth must be >= 1, got {terms}, {depth}")
    return safety * depth * np.sqrt(terms) * UNIT_ROUNDOFF


def network_tolerance(variables, *, terms: int | None = None, calls: int = 1) -> float:
    """``rounding_tolerance`` of a network given by its ``variables``: one layer per kernel
    (a variable of rank >= 2), ``calls`` network calls in a row (a sampling chain), and
    ``terms`` products per result: by default the largest kernel fan-in (a forward pass);
    for a weight gradient, the positions it sums over (batch x height x width)."""
    kernels = [tuple(v.shape) for v in variables if len(v.shape) > 1]
    if terms is None:
        terms = max(int(np.prod(k[:-1])) for k in kernels)
    return rounding_tolerance(terms, len(kernels) * calls)


def assert_rounding_close(got, want, *, tol: float, scale: float = 0.0, err_msg: str = ""):
    """``||got - want||_2 <= tol * (||want||_2 + scale * sqrt(size))``.

    ``scale`` is the typical magnitude of one element of the family ``want`` belongs to
    (for a gradient, the RMS of the whole network's gradient): a tensor whose own values
    are near zero is then held to the rounding error of the computation around it, not to
    its own (cancelled) size.
    """
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{err_msg}: shapes {got.shape} vs {want.shape}"
    diff = float(np.linalg.norm(got - want))
    bound = tol * (float(np.linalg.norm(want)) + scale * np.sqrt(want.size))
    assert diff <= bound, (f"{err_msg}: ||difference|| = {diff:.3e} > {bound:.3e} "
                           f"(tol {tol:.2e}, ||want|| {np.linalg.norm(want):.3e})")


def rms(arrays) -> float:
    """The root mean square of all elements of ``arrays`` together."""
    flat = np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in arrays])
    return float(np.sqrt(np.mean(flat ** 2)))
