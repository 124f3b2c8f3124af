"""Curvature: eigenbases, EK-FAC correction (exact expectation and sampled), dense Gauss-Newton blocks, cache."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import quiet_trainer
from torch import nn

import lightning_tda.curvature.passes as passes
import lightning_tda.layers.fisher as fisher
from lightning_tda import ClassificationTask, RegressionTask, TDACallback
from lightning_tda.curvature.eigen import LayerEigenbasis, decay_response, eigenbases_from_covariances, exp_decay
from lightning_tda.curvature.fit import fit_curvature, fit_segment_curvature
from lightning_tda.curvature.passes import PassData, correct_eigenvalues, covariances_at, gauss_newton_blocks
from lightning_tda.demo import DigitsDataModule, MLPClassifier
from lightning_tda.layers.fisher import FisherOptions
from lightning_tda.layers.tracked import find_layers
from lightning_tda.trace import Trace, TraceError


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A 64-12-10 digits MLP (910 parameters) trained 24 steps with the callback (2 segments)."""
    import lightning as L

    L.seed_everything(0, verbose=False)
    path = tmp_path_factory.mktemp("curv") / "trace.h5"
    dm = DigitsDataModule(batch_size=64, seed=0)
    model = MLPClassifier(sizes=[64, 12, 10], lr=0.1, momentum=0.9)
    # 4 streamed statistics steps per segment, past the budget: the tests read the streamed covariances
    callback = TDACallback(str(path), task=ClassificationTask(), segments=2, strict_budget=False)
    quiet_trainer(max_epochs=2, callbacks=[callback]).fit(model, dm)
    return {"path": path, "train": torch.utils.data.Subset(dm.train_set, range(256))}


def _kron_matrix(basis: LayerEigenbasis) -> torch.Tensor:
    q = torch.kron(basis.q_s, basis.q_a)
    return q @ torch.diag(basis.eigenvalues.flatten()) @ q.T


def test_stable_matrix_functions():
    sigma = torch.tensor([0.0, 1e-12, 1e-7, 1e-3, 1.0, 50.0], dtype=torch.float64)
    t = 20.0
    expected = torch.cat([torch.tensor([t], dtype=torch.float64), -torch.expm1(-t * sigma[1:]) / sigma[1:]])
    expected[1] = t * (1 - t * 1e-12 / 2)  # the closed form loses all digits here; the series does not
    assert torch.allclose(decay_response(sigma, t), expected, rtol=1e-9)
    assert torch.isfinite(decay_response(sigma, t)).all()
    assert torch.allclose(exp_decay(sigma, t), torch.exp(-t * sigma))


def test_apply_matches_dense_kronecker():
    torch.manual_seed(0)
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    a, s = x @ x.T / 5, y @ y.T / 3
    basis = eigenbases_from_covariances({"layer": (a, s)})["layer"]
    v = torch.randn(2, 4, 7, dtype=torch.float64)
    damped = basis.damped_inverse(v, 0.3)
    dense = torch.linalg.solve(torch.kron(s, a) + 0.3 * torch.eye(28, dtype=torch.float64), v.reshape(2, 28).T).T
    assert torch.allclose(damped.reshape(2, 28), dense, atol=1e-10)
    assert torch.allclose(basis.unrotate(basis.rotate(v)), v, atol=1e-12)


def test_ekfac_eigenvalues_are_the_gauss_newton_diagonal_in_the_kronecker_basis(small_run):
    """With the exact expectation, Λ* = diag(Qᵀ H Q) for the exact per-layer GN block H (George et al.).

    In float64 (model and data), so the identity holds to round-off; a float32 model computes in float32."""
    trace = Trace.open(small_run["path"])
    model, task = MLPClassifier(sizes=[64, 12, 10]).double(), ClassificationTask()
    layers = trace.tracked_layers(model)
    final = trace.final_checkpoint
    x, y = small_run["train"].dataset[small_run["train"].indices]
    data = PassData((x.double(), y), batch_size=100)
    ekfac = fit_curvature(trace, model, task, layers, [final.index], data, segment=final.segment, cache=False)
    exact = fit_curvature(trace, model, task, layers, [final.index], data, curvature="gauss-newton", cache=False)
    for name, basis in ekfac.items():
        q = torch.kron(basis.q_s, basis.q_a)
        diagonal = torch.diagonal(q.T @ exact[name].matrix @ q).reshape(basis.eigenvalues.shape)
        assert torch.allclose(basis.eigenvalues, diagonal, rtol=1e-9, atol=1e-12)
        # the eigenbasis is the segment's streamed one, not the GN block's: EK-FAC is an approximation
        assert not torch.allclose(_kron_matrix(basis), exact[name].matrix, atol=1e-3)


def test_sampled_correction_approaches_the_expectation(small_run):
    trace = Trace.open(small_run["path"])
    model, task = MLPClassifier(sizes=[64, 12, 10]), ClassificationTask()
    trace.load_checkpoint(model, trace.final_checkpoint.index)
    layers = trace.tracked_layers(model)
    bases = eigenbases_from_covariances({la.name: trace.covariances(1, la.name) for la in layers})
    data = PassData(torch.utils.data.Subset(small_run["train"], range(128)), batch_size=128)
    exact = correct_eigenvalues(bases, model, layers, task, data, FisherOptions("true"))
    one = correct_eigenvalues(bases, model, layers, task, data, FisherOptions("true", samples=1))
    many = correct_eigenvalues(bases, model, layers, task, data, FisherOptions("true", samples=64))
    for name in exact:
        error_one = (one[name] - exact[name]).norm() / exact[name].norm()
        error_many = (many[name] - exact[name]).norm() / exact[name].norm()
        print(name, float(error_one), float(error_many))
        assert error_many < error_one / 3  # noise falls like 1/sqrt(samples): 1/8 expected


def test_unbatched_backward_fallback_gives_the_same_correction(small_run, monkeypatch):
    trace = Trace.open(small_run["path"])
    model, task = MLPClassifier(sizes=[64, 12, 10]), ClassificationTask()
    trace.load_checkpoint(model, trace.final_checkpoint.index)
    layers = trace.tracked_layers(model)
    bases = eigenbases_from_covariances({la.name: trace.covariances(1, la.name) for la in layers})
    data = PassData(torch.utils.data.Subset(small_run["train"], range(64)), batch_size=32)
    batched = correct_eigenvalues(bases, model, layers, task, data, FisherOptions("true"))

    def unsupported(*args):
        raise RuntimeError("no batched backward")

    monkeypatch.setattr(fisher, "_batched_output_gradient_rows", unsupported)
    looped = correct_eigenvalues(bases, model, layers, task, data, FisherOptions("true"))
    for name in batched:
        assert torch.allclose(batched[name], looped[name], rtol=1e-10, atol=1e-14)


def test_correction_with_several_rows_per_example_matches_a_loop():
    """Sequence-shaped inputs (R > 1 rows per example) take the general path; check it against autograd."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(6, 5, 3), torch.randn(6, 5, 2)
    task = RegressionTask()
    layers = find_layers(model).layers
    covariances = {
        la.name: (torch.eye(la.a_dim, dtype=torch.float64) + 0.1, torch.eye(la.out_features) * 2.0) for la in layers
    }
    bases = eigenbases_from_covariances(covariances)
    corrected = correct_eigenvalues(
        bases, model, layers, task, PassData((x, y), batch_size=4), FisherOptions("empirical")
    )
    for layer in layers:
        expected = torch.zeros_like(corrected[layer.name])
        for i in range(len(x)):
            model.zero_grad()
            task.loss(model(x[i : i + 1]), y[i : i + 1]).sum().backward()
            grad = layer.module.weight.grad
            matrix = torch.cat([grad, layer.module.bias.grad[:, None]], dim=1).double()
            expected += bases[layer.name].rotate(matrix) ** 2 / len(x)
        assert torch.allclose(corrected[layer.name], expected, rtol=1e-5, atol=1e-10)


def test_recomputed_covariances_and_exact_fisher(small_run):
    trace = Trace.open(small_run["path"])
    model, task = MLPClassifier(sizes=[64, 12, 10]), ClassificationTask()
    trace.load_checkpoint(model, trace.final_checkpoint.index)
    layers = trace.tracked_layers(model)
    x, _ = (torch.stack(t) for t in zip(*[small_run["train"][i] for i in range(64)]))
    data = PassData(torch.utils.data.Subset(small_run["train"], range(64)), batch_size=32)
    factors = covariances_at(model, layers, task, data, FisherOptions("true"))
    # independent: activations and logits by hand, S from the softmax Hessian diag(p) - p pᵀ
    h = torch.relu(model.net[0](x))
    logits = model.net[2](h)
    p = torch.softmax(logits, -1).double()
    hessians = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    a_last = torch.cat([h, torch.ones(64, 1)], 1).double()
    a_last_expected = a_last.T @ a_last / 64
    s_last_expected = hessians.mean(0)
    a_found, s_found = factors["net.2"]
    assert torch.allclose(a_found, a_last_expected, atol=1e-6)
    assert torch.allclose(s_found, s_last_expected, atol=1e-6)
    blocks = gauss_newton_blocks(model, layers, task, data, FisherOptions("true"))
    expected_block = torch.einsum("nop,ni,nj->oipj", hessians, a_last, a_last).reshape(130, 130) / 64
    assert torch.allclose(blocks["net.2"], expected_block, atol=1e-6)


def test_cache_reuses_the_fit_and_keys_on_options(small_run, monkeypatch):
    trace = Trace.open(small_run["path"])
    model, task = MLPClassifier(sizes=[64, 12, 10]), ClassificationTask()
    calls = []
    original = passes.correct_eigenvalues
    monkeypatch.setattr(passes, "correct_eigenvalues", lambda *a, **k: calls.append(1) or original(*a, **k))
    data = PassData(small_run["train"], batch_size=128)
    first = fit_segment_curvature(trace, model, task, 0, data)
    assert len(calls) == len(trace.segment(0).checkpoints)  # one pass per checkpoint of the segment, averaged
    second = fit_segment_curvature(trace, model, task, 0, data)
    assert len(calls) == 2  # no refit
    for name in first:
        assert torch.equal(first[name].eigenvalues, second[name].eigenvalues)
        assert torch.equal(first[name].q_a, second[name].q_a)
    fit_segment_curvature(trace, model, task, 0, PassData(small_run["train"], batch_size=128, examples=100))
    assert len(calls) == 4  # a different subset is a different fit
    kfac = fit_segment_curvature(trace, model, task, 0, data, curvature="kfac")
    assert len(calls) == 4  # K-FAC needs no correction pass
    a, s = trace.covariances(0, "net.0")
    expected = torch.outer(torch.linalg.eigvalsh(s).clamp(min=0), torch.linalg.eigvalsh(a).clamp(min=0))
    assert torch.allclose(kfac["net.0"].eigenvalues, expected)


def test_bad_options(small_run):
    trace = Trace.open(small_run["path"])
    model, task = MLPClassifier(sizes=[64, 12, 10]), ClassificationTask()
    layers = trace.tracked_layers(model)
    data = PassData(small_run["train"])
    with pytest.raises(ValueError, match="curvature='eigen'"):
        fit_curvature(trace, model, task, layers, [0], data, segment=0, curvature="eigen")
    with pytest.raises(ValueError, match="covariances='final'"):
        fit_curvature(trace, model, task, layers, [0], data, segment=0, covariances="final")
    with pytest.raises(TraceError, match="No checkpoints"):
        fit_curvature(trace, model, task, layers, [], data, segment=0)
    with pytest.raises(ValueError, match="samples=0"):
        FisherOptions("true", samples=0)
    with pytest.raises(ValueError, match="gauss-newton"):
        big = find_layers(nn.Sequential(nn.Linear(200, 200))).layers
        gauss_newton_blocks(nn.Sequential(nn.Linear(200, 200)), big, task, data, FisherOptions())


def test_exact_expectation_where_affordable_and_sampled_targets_beyond():
    from lightning_tda.layers.tracked import TrackedLayer

    def layers(width: int) -> list[TrackedLayer]:
        return [TrackedLayer("fc", nn.Identity(), "linear", width, 10, True)]

    logits = torch.zeros(4, 10)
    assert FisherOptions().exact_expectation(logits, layers(2_000))  # 10 x 20k parameters
    assert not FisherOptions().exact_expectation(logits, layers(300_000))  # 10 x 3M: sampled
    assert FisherOptions(samples="exact").exact_expectation(logits, layers(300_000))
    assert not FisherOptions(samples=2).exact_expectation(logits, layers(10))
    assert not FisherOptions().exact_expectation(torch.zeros(4, 100), layers(10))  # more than 64 outputs
    with pytest.raises(ValueError, match="sequence"):
        FisherOptions(samples="exact").exact_expectation(torch.zeros(4, 3, 10), layers(10))
    with pytest.raises(ValueError, match="samples='all'"):
        FisherOptions(samples="all")


def test_split_examples_gives_each_checkpoint_a_disjoint_share():
    x = torch.arange(10.0)[:, None]
    data = PassData((x, torch.zeros(10)), batch_size=4, examples=9, seed=3)
    task = RegressionTask()
    shares = [
        {int(v) for v in torch.cat([b[0][:, 0] for b in replace(data, part=(i, 3)).batches(task, "")])}
        for i in range(3)
    ]
    assert [len(s) for s in shares] == [3, 3, 3] and len(set.union(*shares)) == 9  # disjoint, the same 9 examples
    assert set.union(*shares) == {int(v) for v in torch.cat([b[0][:, 0] for b in data.batches(task, "")])}
