"""EKFACInfluence against exact influence: Gauss-Newton code path on a 910-parameter MLP, EK-FAC on a
single linear layer, K-FAC against a dense Kronecker inverse; sign on digits; cache; bad input."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import quiet_trainer
from torch.func import functional_call, grad, jacrev, vmap
from torch.utils.data import Subset, TensorDataset

import lightning_tda.curvature.passes as passes
from lightning_tda import ClassificationTask, RegressionTask, TDACallback
from lightning_tda.demo import ConcreteDataModule, DigitsDataModule, MLPClassifier, MLPRegressor
from lightning_tda.layers.fisher import FisherOptions
from lightning_tda.methods import EKFACInfluence, MethodOptions
from lightning_tda.trace import Trace, TraceError

SIZES = [64, 12, 10]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 64-12-10 digits MLP (910 parameters) trained 24 steps with the callback, plus data subsets."""
    import lightning as L

    L.seed_everything(0, verbose=False)
    path = tmp_path_factory.mktemp("ekfac") / "trace.h5"
    dm = DigitsDataModule(batch_size=64, seed=0)
    model = MLPClassifier(sizes=SIZES, lr=0.1, momentum=0.9)
    # 4 streamed statistics steps per segment, past the budget: the tests read the streamed covariances
    callback = TDACallback(str(path), task=ClassificationTask(), segments=2, strict_budget=False)
    quiet_trainer(max_epochs=2, limit_train_batches=12, callbacks=[callback]).fit(model, dm)
    return {
        "trace": Trace.open(path),
        "train": Subset(dm.train_set, range(200)),
        "queries": Subset(dm.test_set, range(8)),
    }


def _stack(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = zip(*[dataset[i] for i in range(len(dataset))])
    return torch.stack(x), torch.stack(y)


def _final_model(trace: Trace, sizes=SIZES) -> torch.nn.Module:
    model = MLPClassifier(sizes=sizes)
    trace.load_checkpoint(model, trace.final_checkpoint.index)
    return copy.deepcopy(model.net).double().eval()


def _layer_matrices(per_param: dict[str, torch.Tensor], layer: str) -> torch.Tensor:
    """Per-example ``(..., out, in + 1)`` matrices from weight and bias tensors (bias as last column)."""
    return torch.cat([per_param[f"{layer}.weight"], per_param[f"{layer}.bias"][..., None]], dim=-1)


def exact_gauss_newton_influence(net, train, queries, damping_scale=0.1, kronecker=None):
    """Reference block-diagonal Gauss-Newton influence, written independently with torch.func.

    ``H_l = mean_n J_nlᵀ (diag(p_n) - p_n p_nᵀ) J_nl`` per layer; damping ``damping_scale × tr(H_l)/D_l``;
    ``τ = Σ_l ∇f(q)_lᵀ (H_l + λ_l I)⁻¹ g(z)_l / N`` with N = 1438 examples trained on (the digits training
    set): the predicted change of the query loss when z is removed. With ``kronecker={layer: (A, S)}``
    the block is ``S ⊗ A``.
    """
    params = {k: v.detach() for k, v in net.named_parameters()}
    x, y = (t.double() if t.is_floating_point() else t for t in _stack(train))
    xq, yq = (t.double() if t.is_floating_point() else t for t in _stack(queries))

    def logits(p, xi):
        return functional_call(net, p, (xi[None],))[0]

    def loss(p, xi, yi):
        return torch.nn.functional.cross_entropy(logits(p, xi)[None], yi[None])

    jac = vmap(jacrev(logits), in_dims=(None, 0))(params, x)  # name -> (N, C, *shape)
    probs = torch.softmax(vmap(logits, in_dims=(None, 0))(params, x), -1)
    out_hessian = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    train_grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    query_grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, xq, yq)
    scores = torch.zeros(len(xq), len(x), dtype=torch.float64)
    for layer in ("0", "2"):
        j = _layer_matrices(jac, layer).flatten(2)  # (N, C, D)
        if kronecker is None:
            block = torch.einsum("nci,ncd,ndj->ij", j, out_hessian, j) / len(x)
        else:
            a, s = kronecker[f"net.{layer}"]
            block = torch.kron(s, a)
        damping = damping_scale * torch.trace(block) / block.shape[0]
        eye = torch.eye(block.shape[0], dtype=torch.float64)
        g = _layer_matrices(train_grads, layer).flatten(1)
        q = _layer_matrices(query_grads, layer).flatten(1)
        scores += torch.linalg.solve(block + damping * eye, q.T).T @ g.T
    return scores / 1438


def _assert_close(found: torch.Tensor, expected: torch.Tensor, rtol: float = 2e-3) -> None:
    scale = expected.abs().max()
    assert (found.double() - expected).abs().max() <= rtol * scale, float((found.double() - expected).abs().max())


def test_exact_gauss_newton_curvature_gives_the_exact_influence(tiny):
    method = EKFACInfluence(tiny["trace"], MLPClassifier(sizes=SIZES), ClassificationTask(), curvature="gauss-newton")
    scores = method.attribute(tiny["queries"], tiny["train"])
    expected = exact_gauss_newton_influence(_final_model(tiny["trace"]), tiny["train"], tiny["queries"])
    assert scores.shape == (8, 200) and scores.method == "ekfac"
    _assert_close(scores.values, expected)


@pytest.mark.parametrize("covariances", ["recompute", "stream"])
def test_kfac_curvature_equals_the_dense_kronecker_inverse(tiny, covariances):
    """K-FAC with the factors recomputed at the final parameters (the default) or streamed in training."""
    trace = tiny["trace"]
    method = EKFACInfluence(
        trace, MLPClassifier(sizes=SIZES), ClassificationTask(), curvature="kfac", covariances=covariances
    )
    scores = method.attribute(tiny["queries"], tiny["train"])
    if covariances == "stream":
        segment = trace.final_checkpoint.segment
        factors = {name: trace.covariances(segment, name) for name in ("net.0", "net.2")}
    else:
        method.load_checkpoint(trace.final_checkpoint.index)
        data = passes.PassData(tiny["train"])
        factors = passes.covariances_at(method.model, method.layers, ClassificationTask(), data, FisherOptions("true"))
    expected = exact_gauss_newton_influence(_final_model(trace), tiny["train"], tiny["queries"], kronecker=factors)
    _assert_close(scores.values, expected)


def test_ekfac_approximates_the_exact_influence(tiny):
    ekfac = EKFACInfluence(tiny["trace"], MLPClassifier(sizes=SIZES), ClassificationTask())
    scores = ekfac.attribute(tiny["queries"], tiny["train"]).values.double()
    expected = exact_gauss_newton_influence(_final_model(tiny["trace"]), tiny["train"], tiny["queries"])
    correlations = [torch.corrcoef(torch.stack([s, e]))[0, 1] for s, e in zip(scores, expected)]
    assert min(correlations) > 0.5  # an approximation, but clearly the same ranking signal


@pytest.fixture(scope="module")
def linear_run(tmp_path_factory):
    """Full-batch gradient descent on linear regression (Concrete): one linear layer, MSE."""
    import lightning as L

    L.seed_everything(0, verbose=False)
    path = tmp_path_factory.mktemp("linear") / "trace.h5"
    dm = ConcreteDataModule(batch_size=10_000, seed=0, shuffle=False)
    model = MLPRegressor(sizes=[8, 1], lr=0.1, momentum=0.0)
    callback = TDACallback(str(path), task=RegressionTask(), segments=1, every_n_steps=1)
    quiet_trainer(max_epochs=60, callbacks=[callback]).fit(model, dm)
    return {"trace": Trace.open(path), "dm": dm}


@pytest.mark.parametrize("kind", ["ekfac", "kfac"])
def test_single_linear_layer_is_exact(linear_run, kind):
    """For one linear layer with MSE the Gauss-Newton Hessian is 2·E[a aᵀ], a Kronecker product:
    EK-FAC (and K-FAC, with S exact) give the exact influence function."""
    trace, dm = linear_run["trace"], linear_run["dm"]
    queries = Subset(dm.test_set, range(10))
    method = EKFACInfluence(trace, MLPRegressor(sizes=[8, 1]), RegressionTask(), curvature=kind)
    scores = method.attribute(queries, dm.train_set)
    state = trace.checkpoint_state(trace.final_checkpoint.index)
    w = torch.cat([state["net.0.weight"][0], state["net.0.bias"]]).double()
    x, t = (v.double() for v in dm.train_set.tensors)
    xq, tq = (v.double() for v in _stack(queries))
    a, aq = torch.cat([x, torch.ones(len(x), 1)], 1), torch.cat([xq, torch.ones(len(xq), 1)], 1)
    hessian = 2 * a.T @ a / len(a)
    damping = 0.1 * torch.trace(hessian) / 9
    g, q = 2 * (a @ w - t)[:, None] * a, 2 * (aq @ w - tq)[:, None] * aq
    expected = q @ torch.linalg.solve(hessian + damping * torch.eye(9, dtype=torch.float64), g.T) / len(x)
    _assert_close(scores.values, expected, rtol=1e-4)


def _retrain_linear(state, x, t, keep, steps, lr):
    """Replay full-batch gradient descent of the linear model on the kept examples (float64)."""
    w = state["net.0.weight"].double().clone().requires_grad_(True)
    b = state["net.0.bias"].double().clone().requires_grad_(True)
    for _ in range(steps):
        loss = ((x[keep] @ w.T + b).squeeze(1) - t[keep]).pow(2).mean()
        gw, gb = torch.autograd.grad(loss, (w, b))
        with torch.no_grad():
            w -= lr * gw
            b -= lr * gb
    return w.detach(), b.detach()


def test_removing_the_most_helpful_examples_raises_the_query_loss_most(linear_run):
    """Counterfactual check of the sign and the unit: retrain without a query's 20 highest-scored training
    examples and its loss rises, more than when 20 random examples are removed, and by about the sum of
    their scores (a score is the predicted change of the query loss when the example is removed)."""
    trace, dm = linear_run["trace"], linear_run["dm"]
    queries = Subset(dm.test_set, range(5))
    scores = EKFACInfluence(trace, MLPRegressor(sizes=[8, 1]), RegressionTask()).attribute(queries, dm.train_set)
    x, t = (v.double() for v in dm.train_set.tensors)
    xq, tq = (v.double() for v in _stack(queries))
    initial, steps = trace.initial_state(), trace.num_steps
    lr = float(trace.steps().lr[0, 0])
    everything = torch.ones(len(x), dtype=torch.bool)
    w, b = _retrain_linear(initial, x, t, everything, steps, lr)
    final = trace.checkpoint_state(trace.final_checkpoint.index)
    assert torch.allclose(w.float(), final["net.0.weight"], atol=1e-5)  # the replay reproduces training

    def query_losses(keep):
        w, b = _retrain_linear(initial, x, t, keep, steps, lr)
        return ((xq @ w.T + b).squeeze(1) - tq).pow(2)

    base = query_losses(everything)
    generator = torch.Generator().manual_seed(0)
    predicted, actual = [], []
    for q, row in enumerate(scores.values):
        keep = everything.clone()
        keep[row.topk(20).indices] = False
        top_rise = query_losses(keep)[q] - base[q]
        predicted.append(float(row.topk(20).values.sum()))
        actual.append(float(top_rise))
        random_rises = []
        for _ in range(3):
            keep = everything.clone()
            keep[torch.randperm(len(x), generator=generator)[:20]] = False
            random_rises.append(query_losses(keep)[q] - base[q])
        assert top_rise > 0
        assert top_rise > max(random_rises)
    # Same order as the actual rise (about 2x under it: removing 20 helpful examples at once compounds,
    # and the damping shrinks the response); without the 1/N it would be 824x over.
    assert 1 / 3 < np.median(np.array(actual) / np.array(predicted)) < 3, (predicted, actual)


def test_self_influence_is_the_diagonal(tiny):
    train = Subset(tiny["train"], range(40))
    method = EKFACInfluence(
        tiny["trace"], MLPClassifier(sizes=SIZES), ClassificationTask(), options=MethodOptions(batch_size=16)
    )
    pairwise = method.attribute(train, train)
    own = method.self_influence(train)
    assert own.kind == "self" and own.shape == (40,)
    assert torch.allclose(own.values, torch.diagonal(pairwise.values), rtol=1e-4)
    assert (own.values > 0).all()


def test_second_call_reuses_the_cached_curvature(tiny, monkeypatch):
    calls = []
    original = passes.correct_eigenvalues
    monkeypatch.setattr(passes, "correct_eigenvalues", lambda *a, **k: calls.append(1) or original(*a, **k))
    train = Subset(tiny["train"], range(100))
    first = EKFACInfluence(tiny["trace"], MLPClassifier(sizes=SIZES), ClassificationTask(), seed=7)
    scores = first.attribute(tiny["queries"], train)
    assert len(calls) == 1
    again = EKFACInfluence(tiny["trace"], MLPClassifier(sizes=SIZES), ClassificationTask(), seed=7)
    assert torch.equal(again.attribute(tiny["queries"], train).values, scores.values)
    assert len(calls) == 1
    EKFACInfluence(tiny["trace"], MLPClassifier(sizes=SIZES), ClassificationTask(), seed=7, cache=False).attribute(
        tiny["queries"], train
    )
    assert len(calls) == 2


def test_duplicate_of_the_query_is_most_helpful(digits_run):
    """Queries that are training examples the model has not fit (highest training loss): each one's own
    copy in the training set is its most helpful example, by far."""
    trace = Trace.open(digits_run["path"])
    train = digits_run["datamodule"].train_set
    model = digits_run["model_factory"]()
    trace.load_checkpoint(model, trace.final_checkpoint.index)
    with torch.no_grad():
        losses = ClassificationTask().loss(model(train.tensors[0]), train.tensors[1])
    ids = losses.topk(5).indices.tolist()
    scores = EKFACInfluence(trace, digits_run["model_factory"](), ClassificationTask()).attribute(
        Subset(train, ids), train
    )
    for row, own in zip(scores.values, ids):
        assert row.argmax() == own
        assert row[own] > 100 * row.abs().median()
    assert scores.config["curvature"] == "ekfac" and scores.config["damping"] == "heuristic"


def test_bad_input(tiny):
    trace, task = tiny["trace"], ClassificationTask()
    with pytest.raises(TraceError, match="pass the trained architecture"):
        EKFACInfluence(trace, MLPClassifier(sizes=[64, 20, 10]), task)
    method = EKFACInfluence(trace, MLPClassifier(sizes=SIZES), task)
    wrong = TensorDataset(torch.randn(4, 32), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="shape and type"):
        method.attribute(wrong, tiny["train"])
    for bad in ({"damping": "auto"}, {"damping": -1.0}, {"curvature": "diagonal"}, {"covariances": "final"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            EKFACInfluence(trace, MLPClassifier(sizes=SIZES), task, **bad)
    partial = EKFACInfluence(trace, MLPClassifier(sizes=SIZES), task, damping={"net.0": 0.1})
    with pytest.raises(ValueError, match="no value for 'net.2'"):
        partial.attribute(tiny["queries"], tiny["train"])
