"""Factored per-example gradients (products against dense computations) and eigendecompositions of
ill-conditioned factors."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lightning_tda.curvature.eigen as eigen
import lightning_tda.layers.gradients as gradients
from lightning_tda.curvature.eigen import symmetric_eigh
from lightning_tda.curvature.passes import squared_rotated_sum
from lightning_tda.layers.gradients import LayerGradients, per_example_rows
from lightning_tda.layers.tracked import TrackedLayer, find_layers


def _check_products(grads: LayerGradients, dense: torch.Tensor, queries: int) -> None:
    """Every product of ``grads`` against the same product of its dense gradients ``(B, out, a_dim)``."""
    batch, out, a_dim = dense.shape
    matrices, weights = torch.randn(queries, out, a_dim, dtype=torch.float64), torch.randn(queries, batch).double()
    own = torch.randn(batch, out, a_dim, dtype=torch.float64)
    torch.testing.assert_close(grads.dot(matrices), torch.einsum("qoi,boi->qb", matrices, dense))
    torch.testing.assert_close(grads.dot(matrices.flatten(1)), torch.einsum("qoi,boi->qb", matrices, dense))
    torch.testing.assert_close(grads.self_dot(own), (own * dense).sum((1, 2)))
    torch.testing.assert_close(grads.squared_norms(), dense.pow(2).sum((1, 2)))
    torch.testing.assert_close(grads.weighted_sum(weights), torch.einsum("qb,boi->qoi", weights, dense))
    torch.testing.assert_close(torch.cat([d for _, d in grads.chunks()]), dense)
    torch.testing.assert_close(grads[2:5].dense(), dense[2:5])


@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("queries", [1, 5])
@pytest.mark.parametrize("budget", [2**30, 200])  # one chunk, or a few examples per chunk
def test_products_equal_dense_computations(rows, queries, budget, monkeypatch):
    monkeypatch.setattr(gradients, "DENSE_CHUNK_BYTES", budget)
    torch.manual_seed(rows + queries)
    batch, out, a_dim = 7, 6, 9
    deltas, inputs = torch.randn(batch, rows, out, dtype=torch.float64), torch.randn(batch, rows, a_dim).double()
    layer = TrackedLayer("layer", nn.Identity(), "linear", a_dim, out, False)
    _check_products(LayerGradients(layer, deltas, inputs), torch.einsum("bro,bri->boi", deltas, inputs), queries)


@pytest.mark.parametrize("queries", [1, 5])
@pytest.mark.parametrize("budget", [2**30, 200])
def test_embedding_products_from_token_ids(queries, budget, monkeypatch):
    """One-hot inputs kept as token ids (-1: no gradient), repeated tokens within an example included."""
    monkeypatch.setattr(gradients, "DENSE_CHUNK_BYTES", budget)
    torch.manual_seed(queries)
    batch, rows, out, vocabulary = 7, 6, 4, 11
    ids = torch.randint(0, 5, (batch, rows))
    ids[0, :2] = -1
    deltas = torch.randn(batch, rows, out, dtype=torch.float64)
    one_hot = torch.nn.functional.one_hot(ids.clamp(min=0), vocabulary).double() * (ids >= 0)[..., None]
    layer = TrackedLayer("embedding", nn.Identity(), "embedding", vocabulary, out, False)
    grads = LayerGradients(layer, deltas, ids)
    assert grads.one_hot and grads.activations.dtype == torch.int64
    _check_products(grads, torch.einsum("bro,brv->bov", deltas, one_hot), queries)


def test_products_are_computed_in_float32_and_returned_in_float64():
    layer = TrackedLayer("layer", nn.Identity(), "linear", 5, 3, False)
    grads = LayerGradients(
        layer, torch.randn(4, 2, 3, dtype=torch.bfloat16), torch.randn(4, 2, 5, dtype=torch.bfloat16)
    )
    assert grads.dtype == torch.float32 and grads.activations.dtype == torch.float32
    assert grads.dot(torch.randn(2, 3, 5, dtype=torch.float64)).dtype == torch.float64
    assert grads.squared_norms().dtype == torch.float64


def test_rows_of_a_conv_net_give_its_per_example_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 4))
    x, y = torch.randn(5, 2, 4, 4), torch.randint(0, 4, (5,))
    layers = find_layers(model).layers

    def losses(m):
        return nn.functional.cross_entropy(m(x), y, reduction="none")

    rows = per_example_rows(model, layers, losses)
    for layer in layers:
        for i in range(len(x)):  # against autograd on the example alone
            model.zero_grad()
            nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
            own = layer.module.weight.grad.reshape(layer.out_features, -1)
            torch.testing.assert_close(rows[layer.name].dense()[i, :, :-1], own, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 8, 16), (40, 3, 4)])  # rotate the rows first / the per-example matrices
def test_squared_rotated_sum_matches_the_definition(shape):
    torch.manual_seed(0)
    rows, out, a_dim = shape
    deltas, inputs = torch.randn(3, 5, rows, out, dtype=torch.float64), torch.randn(5, rows, a_dim).double()
    q_a = torch.linalg.qr(torch.randn(a_dim, a_dim, dtype=torch.float64))[0]
    q_s = torch.linalg.qr(torch.randn(out, out, dtype=torch.float64))[0]
    weights = [0.5, 0.25, 0.25]
    expected = sum(
        w * (q_s.T @ torch.einsum("bro,bri->boi", d, inputs) @ q_a).pow(2).sum(0) for d, w in zip(deltas, weights)
    )
    basis = eigen.LayerEigenbasis("layer", q_a, q_s, torch.zeros(out, a_dim, dtype=torch.float64))
    layer = TrackedLayer("layer", nn.Identity(), "linear", a_dim, out, False)
    torch.testing.assert_close(squared_rotated_sum(layer, deltas, weights, inputs, basis), expected)


def _assert_eigenbasis(matrix: torch.Tensor, values: torch.Tensor, vectors: torch.Tensor) -> None:
    eye = torch.eye(len(matrix), dtype=torch.float64)
    scale = matrix.abs().max()
    assert values.dtype == vectors.dtype == torch.float64
    assert (values[1:] >= values[:-1]).all()
    assert (vectors.T @ vectors - eye).abs().max() < 1e-10
    assert ((vectors * values) @ vectors.T - matrix).abs().max() < 1e-10 * scale


def test_rank_deficient_conv_factor_with_repeated_eigenvalues():
    """The widest ResNet-18 (half width) input factor, 256 channels × 3×3 taps = 2,304, on a 1×1 feature
    map: 8 of the 9 taps only ever see padding, and it is estimated from fewer rows than its width, with
    duplicated channels (repeated eigenvalues)."""
    torch.manual_seed(0)
    rows = torch.zeros(200, 256, 3, 3, dtype=torch.float64)
    rows[:, :, 1, 1] = torch.randn(200, 256).relu()
    rows[:, 128:, 1, 1] = rows[:, :128, 1, 1]
    rows = rows.reshape(200, -1)
    factor = rows.T @ rows / 200
    values, vectors = symmetric_eigh(factor.float(), "layer4.1.conv2")  # float32 in, float64 out
    _assert_eigenbasis(factor.float().double(), values, vectors)
    assert (values.abs() < 1e-6 * values.max()).sum() >= 2304 - 128


def test_ill_conditioned_dense_factor():
    torch.manual_seed(0)
    rows = torch.randn(50, 300, dtype=torch.float64) * torch.logspace(-8, 0, 300, dtype=torch.float64)
    factor = rows.T @ rows / 50 + 1e-30
    _assert_eigenbasis((factor + factor.T) / 2, *symmetric_eigh(factor, "fc"))


def test_lapack_failure_retries_with_jitter_then_falls_back_to_an_svd(monkeypatch):
    torch.manual_seed(0)
    rows = torch.randn(30, 60, dtype=torch.float64)
    factor = rows.T @ rows / 30
    eigh = torch.linalg.eigh
    for failures, message in ((1, "after adding 1e-12"), (1 + len(eigen.EIGH_JITTERS), "fell back to an SVD")):
        calls = []

        def failing(matrix, failures=failures, calls=calls):
            calls.append(1)
            if len(calls) <= failures:
                raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
            return eigh(matrix)

        monkeypatch.setattr(torch.linalg, "eigh", failing)
        monkeypatch.setattr(eigen, "_warned_layers", set())
        with pytest.warns(RuntimeWarning, match=f"net.layer4.0.conv1.*{message}"):
            values, vectors = symmetric_eigh(factor, "net.layer4.0.conv1")
        _assert_eigenbasis(factor, values, vectors)
        calls.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the same failure again: warned once per layer
            _assert_eigenbasis(factor, *symmetric_eigh(factor, "net.layer4.0.conv1"))


def test_non_finite_factor_is_an_error_naming_the_layer():
    factor = torch.eye(4, dtype=torch.float64)
    factor[0, 1] = float("nan")
    with pytest.raises(ValueError, match="net.fc.*NaN or infinite"):
        symmetric_eigh(factor, "net.fc")


def test_rotations_skip_the_unit_columns_of_inputs_that_are_always_zero():
    torch.manual_seed(0)
    rows = torch.randn(40, 12, dtype=torch.float64)
    rows[:, [0, 5, 6, 11]] = 0
    values, q_a = symmetric_eigh(rows.T @ rows, "conv")
    q_a[:, q_a[0] == 1] *= -1  # eigenvectors are defined up to sign: one unit column is -e_0
    q_s = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0]
    basis = eigen.LayerEigenbasis("conv", q_a, q_s, torch.rand(3, 12, dtype=torch.float64))
    split = basis._input_split
    assert split is not None and sorted(split.unit_rows.tolist()) == [0, 5, 6, 11] and split.signs.min() == -1
    v = torch.randn(5, 3, 12, dtype=torch.float64)
    torch.testing.assert_close(basis.rotate(v), q_s.T @ v @ q_a)
    torch.testing.assert_close(basis.unrotate(v), q_s @ v @ q_a.T)
    torch.testing.assert_close(basis.apply(v, basis.eigenvalues), q_s @ (basis.eigenvalues * (q_s.T @ v @ q_a)) @ q_a.T)
