"""Separable linear degradations (docs/math.md section 3).

A degradation ``D`` that acts on every channel of an image the same way and factorizes over
the spatial axes is stored as two small matrices, ``mh`` (rows) and ``mw`` (columns):
``(D x)[i, j] = sum_{h, w} mh[i, h] mw[j, w] x[h, w]``. Its adjoint is the pair of
transposes, a chain is the pair of products, and the Gram matrix ``D^T D`` is the Kronecker
product of the per-axis Gram matrices, so its eigendecomposition costs two small ``eigh``.

Adding another separable degradation (box filter as in UDPM, Gaussian blur) means writing a
new per-axis matrix builder and registering it in ``MATRIX_BUILDERS``; nothing else changes.
Matrices are numpy float64; ``apply``/``adjoint`` run on the active Keras backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np


# ----------------------------------------------------------------- per-axis matrices
def _triangle(x: np.ndarray) -> np.ndarray:
    return np.clip(1.0 - np.abs(x), 0.0, None)


@lru_cache(maxsize=None)
def _resize_matrix_cached(n_in: int, n_out: int) -> np.ndarray:
    # PyTorch's antialiased separable interpolation (align_corners=False, size given):
    # output sample i sits at center = scale * (i + 0.5) in input pixel units; the triangle
    # kernel is stretched by `scale` when downsampling (that is the antialiasing) and the
    # weights of the taps that fall inside the image are renormalized to sum to one.
    scale = n_in / n_out
    support = scale if scale >= 1.0 else 1.0
    inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
    matrix = np.zeros((n_out, n_in), dtype=np.float64)
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)  # int() truncates, as in C++
        hi = min(int(center + support + 0.5), n_in)
        taps = np.arange(lo, hi)
        weights = _triangle((taps - center + 0.5) * inv_scale)
        total = weights.sum()
        if total > 0:
            matrix[i, lo:hi] = weights / total
    matrix.setflags(write=False)
    return matrix


def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """The ``(n_out, n_in)`` per-axis matrix of antialiased bilinear resizing.

    Numerically identical to ``torch.nn.functional.interpolate(x, size=..., mode="bilinear",
    antialias=True, align_corners=False)`` applied along one axis.
    """
    n_in, n_out = int(n_in), int(n_out)
    if n_in < 1 or n_out < 1:
        raise ValueError(f"resize sizes must be positive, got {n_in} -> {n_out}")
    return _resize_matrix_cached(n_in, n_out)


def box_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Per-axis box-filter downsampling by an integer factor (average of each block)."""
    if n_in % n_out:
        raise ValueError(f"box downsampling needs n_in divisible by n_out, got {n_in} -> {n_out}")
    factor = n_in // n_out
    return np.kron(np.eye(n_out), np.full((1, factor), 1.0 / factor))


MATRIX_BUILDERS: dict[str, Callable[[int, int], np.ndarray]] = {
    "bilinear": resize_matrix,
    "box": box_matrix,
}


def downsample_chain_matrix(sizes, builder: str = "bilinear") -> np.ndarray:
    """Per-axis matrix of the chain of resizes ``sizes[0] -> sizes[1] -> ...``.

    docs/math.md section 3: ``D_{1:t}`` is the chain of the per-step 2x resizes, not one direct resize
    (with antialiasing, two 2x steps differ from one 4x).
    """
    build = _builder(builder)
    sizes = [int(s) for s in sizes]
    matrix = np.eye(sizes[0])
    for a, b in zip(sizes, sizes[1:]):
        matrix = build(a, b) @ matrix
    return matrix


def halving_sizes(r_from: int, r_to: int) -> list[int]:
    """``[r_from, r_from/2, ..., r_to]``: the per-step sizes of a chain of 2x downsamples."""
    if r_to > r_from or r_from % r_to or (r_from // r_to) & (r_from // r_to - 1):
        raise ValueError(f"{r_from} -> {r_to} is not a chain of 2x downsamples")
    sizes = [r_from]
    while sizes[-1] > r_to:
        sizes.append(sizes[-1] // 2)
    return sizes


def _builder(name: str) -> Callable[[int, int], np.ndarray]:
    try:
        return MATRIX_BUILDERS[name]
    except KeyError:
        raise ValueError(
            f"unknown degradation {name!r}; valid: {', '.join(MATRIX_BUILDERS)}"
        ) from None


# ----------------------------------------------------------------- separable operator
@dataclass(frozen=True)
class GramEigen:
    """Eigendecomposition of ``D^T D = (mh^T mh) (x) (mw^T mw)``: ``G = Q diag(lam) Q^T``."""

    qh: np.ndarray
    lam_h: np.ndarray
    qw: np.ndarray
    lam_w: np.ndarray

    def eigenvalue_grid(self) -> np.ndarray:
        """``lam_h[i] * lam_w[j]``: the eigenvalues of ``D^T D`` on the (h, w) grid."""
        return np.outer(self.lam_h, self.lam_w)

    @property
    def largest(self) -> float:
        return float(self.lam_h.max() * self.lam_w.max())


class SeparableOperator:
    """A linear map of NHWC images, ``(D x)[b, i, j, c] = mh[i, h] mw[j, w] x[b, h, w, c]``."""

    def __init__(self, mh: np.ndarray, mw: np.ndarray | None = None):
        self.mh = np.asarray(mh, dtype=np.float64)
        self.mw = self.mh if mw is None else np.asarray(mw, dtype=np.float64)
        self._constants: dict = {}

    # shapes
    @property
    def in_shape(self) -> tuple[int, int]:
        return self.mh.shape[1], self.mw.shape[1]

    @property
    def out_shape(self) -> tuple[int, int]:
        return self.mh.shape[0], self.mw.shape[0]

    @property
    def is_identity(self) -> bool:
        return (
            self.mh.shape[0] == self.mh.shape[1]
            and self.mw.shape[0] == self.mw.shape[1]
            and np.array_equal(self.mh, np.eye(self.mh.shape[0]))
            and np.array_equal(self.mw, np.eye(self.mw.shape[0]))
        )

    # algebra (numpy)
    def compose(self, first: "SeparableOperator") -> "SeparableOperator":
        """``self o first``: apply ``first``, then ``self``."""
        return SeparableOperator(self.mh @ first.mh, self.mw @ first.mw)

    def dense(self) -> np.ndarray:
        """The full matrix acting on row-major vectorized ``(h, w)`` images (tests, small sizes)."""
        return np.kron(self.mh, self.mw)

    def gram_eigh(self) -> GramEigen:
        lam_h, qh = np.linalg.eigh(self.mh.T @ self.mh)
        if self.mw is self.mh:
            lam_w, qw = lam_h, qh
        else:
            lam_w, qw = np.linalg.eigh(self.mw.T @ self.mw)
        # Gram matrices are PSD; clip the rounding noise below zero.
        return GramEigen(qh, np.clip(lam_h, 0, None), qw, np.clip(lam_w, 0, None))

    # application on the Keras backend
    def _matrices(self, dtype: str):
        if dtype not in self._constants:
            from keras import ops

            self._constants[dtype] = (
                ops.convert_to_tensor(self.mh, dtype=dtype),
                ops.convert_to_tensor(self.mw, dtype=dtype),
            )
        return self._constants[dtype]

    def apply(self, x):
        """``D x`` for an NHWC tensor."""
        return separable_apply(x, *self._matrices(_dtype_of(x)))

    def adjoint(self, y):
        """``D^T y`` for an NHWC tensor."""
        mh, mw = self._matrices(_dtype_of(y))
        from keras import ops

        return separable_apply(y, ops.transpose(mh), ops.transpose(mw))


def separable_apply(x, mh, mw):
    """``y[b, i, j, c] = mh[i, h] mw[j, w] x[b, h, w, c]`` with backend tensors."""
    from keras import ops

    y = ops.einsum("ih,bhwc->biwc", mh, x)
    return ops.einsum("jw,biwc->bijc", mw, y)


def _dtype_of(x) -> str:
    from keras import backend

    dtype = backend.standardize_dtype(getattr(x, "dtype", "float32"))
    return dtype if dtype in ("float16", "bfloat16", "float32", "float64") else "float32"


def downsample_operator(r_from: int, r_to: int, builder: str = "bilinear") -> SeparableOperator:
    """``D_{r_from -> r_to}`` as a chain of 2x steps (identity when ``r_from == r_to``)."""
    sizes = halving_sizes(int(r_from), int(r_to))
    return SeparableOperator(downsample_chain_matrix(sizes, builder))

