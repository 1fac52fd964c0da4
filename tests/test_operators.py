"""docs/math.md section 3: separable antialiased-bilinear operators."""

import numpy as np
import pytest
import torch
from keras import ops

from ssd_keras.operators import (
    MATRIX_BUILDERS,
    SeparableOperator,
    box_matrix,
    downsample_chain_matrix,
    downsample_operator,
    resize_matrix,
)

# backend-sensitive: CI reruns this module under jax and tensorflow
pytestmark = pytest.mark.backend

SIZE_PAIRS = [(64, 32), (32, 16), (16, 8), (8, 4), (4, 2), (2, 1), (64, 8), (7, 3), (13, 5),
              (5, 12), (16, 32), (3, 3), (256, 128), (10, 17)]


def torch_resize(x_nhwc: np.ndarray, size) -> np.ndarray:
    x = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)
    y = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return y.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("n_in, n_out", SIZE_PAIRS)
def test_resize_matrix_equals_torch_interpolate(n_in, n_out):
    eye = np.eye(n_in, dtype=np.float64).reshape(n_in, 1, n_in, 1)  # each row a unit impulse along w
    columns = torch_resize(eye, (1, n_out))[:, 0, :, 0]  # (n_in, n_out): response to impulse k
    assert np.abs(resize_matrix(n_in, n_out) - columns.T).max() < 1e-12


@pytest.mark.parametrize("shape_in, shape_out", [((16, 16), (8, 8)), ((12, 20), (6, 5)), ((8, 8), (16, 16))])
def test_separable_apply_equals_torch_on_images(shape_in, shape_out):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, *shape_in, 2)).astype(np.float32)
    op = SeparableOperator(resize_matrix(shape_in[0], shape_out[0]), resize_matrix(shape_in[1], shape_out[1]))
    y = ops.convert_to_numpy(op.apply(x))
    assert y.shape == (3, *shape_out, 2)
    assert np.abs(y - torch_resize(x, shape_out)).max() < 1e-5


@pytest.mark.parametrize("r_from, r_to", [(16, 8), (32, 8), (8, 8), (12, 6)])
def test_adjoint_identity(r_from, r_to):
    rng = np.random.default_rng(1)
    op = downsample_operator(r_from, r_to)
    x = rng.standard_normal((2, r_from, r_from, 3))
    y = rng.standard_normal((2, r_to, r_to, 3))
    lhs = np.sum(ops.convert_to_numpy(op.apply(x)) * y)
    rhs = np.sum(x * ops.convert_to_numpy(op.adjoint(y)))
    assert lhs == pytest.approx(rhs, rel=1e-10)
    # and it is the transpose of the dense matrix
    dense = op.dense()
    ty = ops.convert_to_numpy(op.adjoint(y))[0, :, :, 0].reshape(-1)
    assert np.allclose(ty, dense.T @ y[0, :, :, 0].reshape(-1))


def test_dense_matches_apply():
    rng = np.random.default_rng(2)
    op = SeparableOperator(resize_matrix(8, 4), resize_matrix(6, 3))
    x = rng.standard_normal((1, 8, 6, 1))
    y = ops.convert_to_numpy(op.apply(x))[0, :, :, 0].reshape(-1)
    assert np.allclose(y, op.dense() @ x[0, :, :, 0].reshape(-1))


def test_chain_differs_from_direct_resize():
    chain = downsample_chain_matrix([16, 8, 4])
    assert np.allclose(chain, resize_matrix(8, 4) @ resize_matrix(16, 8))
    assert np.abs(chain - resize_matrix(16, 4)).max() > 1e-3
    assert np.allclose(downsample_operator(16, 4).mh, chain)


def test_identity_and_compose():
    assert downsample_operator(8, 8).is_identity
    a, b = downsample_operator(16, 8), downsample_operator(8, 4)
    assert np.allclose(b.compose(a).mh, downsample_operator(16, 4).mh)
    assert not a.is_identity


def test_gram_eigendecomposition():
    op = SeparableOperator(resize_matrix(8, 4), resize_matrix(6, 3))
    eig = op.gram_eigh()
    gram = op.dense().T @ op.dense()
    q = np.kron(eig.qh, eig.qw)
    assert np.allclose(q @ np.diag(eig.eigenvalue_grid().reshape(-1)) @ q.T, gram, atol=1e-12)
    assert eig.largest == pytest.approx(np.linalg.eigvalsh(gram).max())


def test_antialiased_halving_spectrum_matches_spec():
    # docs/math.md section 6: for the paper's operators the eigenvalues of D^T D lie in [0, ~0.25]
    # (slightly above 0.25 from the renormalized border taps), so A = I - rho c^2 D^T D
    # has its spectrum in about [0.75, 1].
    for n in (64, 32, 16, 8):
        eig = downsample_operator(n, n // 2).gram_eigh()
        assert 0.25 < eig.largest < 0.27
        assert eig.eigenvalue_grid().min() >= 0


def test_box_is_another_builder_not_another_code_path():
    assert np.allclose(box_matrix(4, 2), [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    op = downsample_operator(8, 2, builder="box")
    x = np.arange(64, dtype=np.float64).reshape(1, 8, 8, 1)
    y = ops.convert_to_numpy(op.apply(x))
    assert np.allclose(y[0, :, :, 0], x[0, :, :, 0].reshape(2, 4, 2, 4).mean(axis=(1, 3)))
    assert set(MATRIX_BUILDERS) >= {"bilinear", "box"}
    with pytest.raises(ValueError, match="valid: bilinear, box"):
        downsample_operator(8, 4, builder="gauss")


def test_bad_sizes():
    with pytest.raises(ValueError):
        resize_matrix(0, 3)
    with pytest.raises(ValueError, match="not a chain of 2x"):
        downsample_operator(12, 4)
