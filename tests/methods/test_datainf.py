"""DataInf and its baselines against direct, loop-by-loop implementations of the paper's formulas
on a small peft LoRA model fine-tuned with TDACallback(layers="lora") (examples/lora_digits.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import quiet_trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_tda import ClassificationTask, TDACallback, Trace
from lightning_tda.layers.tracked import UnsupportedModelError
from lightning_tda.methods import DataInf, ExactInfluence, HessianFree, LiSSA, MethodOptions

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
pytest.importorskip("peft")
import lora_digits  # noqa: E402

RANK = 2
N_TRAIN = 120
N_QUERIES = 6
TASK = ClassificationTask()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """Pre-train on digits 0–4, LoRA-fine-tune (rank 2) on 120 examples of 5–9 with 20% flipped labels."""
    data = lora_digits.digits_split(flip_fraction=0.2, max_finetune=N_TRAIN)
    base = lora_digits.pretrain(data, epochs=3)
    path = tmp_path_factory.mktemp("lora") / "trace.h5"
    model = lora_digits.finetune(data, base, path, rank=RANK, epochs=8, batch_size=16)
    queries = TensorDataset(*[t[:N_QUERIES] for t in data.test.tensors])
    return {"trace": Trace.open(path), "data": data, "queries": queries, "model": model, "base": base}


def make(cls, run, **kwargs):
    return cls(run["trace"], lora_digits.LoRAClassifier(rank=RANK), TASK, modules="lora", **kwargs)


def per_example_gradients(model, layers, dataset):
    """Direct per-example gradients ``{layer: (n, d)}`` float64: one backward per example."""
    x, y = dataset.tensors
    grads = {la.name: [] for la in layers}
    for i in range(len(y)):
        model.zero_grad()
        TASK.train_loss(model, (x[i : i + 1], y[i : i + 1])).sum().backward()
        for la in layers:
            grads[la.name].append(la.module.weight.grad.detach().reshape(-1).double().clone())
    return {name: torch.stack(g) for name, g in grads.items()}


@pytest.fixture(scope="module")
def direct(lora_run):
    """Loop-by-loop Algorithm 1 of the paper (and eq. 2, LiSSA, Hessian-free) from direct gradients."""
    method = make(DataInf, lora_run)
    model = method.load_checkpoint(lora_run["trace"].final_checkpoint.index)
    train_g = per_example_gradients(model, method.layers, lora_run["data"].finetune)
    query_g = per_example_gradients(model, method.layers, lora_run["queries"])
    out = {"lambda": {}, "datainf": {}, "exact": {}, "lissa": {}, "hessian-free": {}}
    out |= {"self-exact": {}, "self-datainf": {}, "self-hessian-free": {}}
    fit = {"r": 0.0, "energy": 0.0}  # Σ_l ⟨r_l, v_l⟩ and Σ_l ⟨r_l, (G_l + λ_l I) r_l⟩ of DataInf's r, per query
    for name, g in train_g.items():
        n, d = g.shape
        lam = 0.1 * sum(float(g[i] @ g[i]) for i in range(n)) / (n * d)
        out["lambda"][name] = lam
        paper = {}  # the paper's I (positive = harmful), one row per query
        rows, rs = [], []
        for v in query_g[name]:
            r = torch.zeros(d, dtype=torch.float64)
            for i in range(n):
                c = float(v @ g[i]) / (lam + float(g[i] @ g[i]))
                r += (v - c * g[i]) / (n * lam)
            rows.append(torch.stack([-(r @ g[k]) for k in range(n)]))
            rs.append(r)
        paper["datainf"] = torch.stack(rows)
        damped = sum(torch.outer(g[i], g[i]) for i in range(n)) / n + lam * torch.eye(d, dtype=torch.float64)
        rs = torch.stack(rs)
        fit["r"] = fit["r"] + (rs * query_g[name]).sum(1)
        fit["energy"] = fit["energy"] + (rs * (rs @ damped)).sum(1)
        paper["exact"] = -(query_g[name] @ torch.linalg.inv(damped) @ g.T)
        lissa_rows = []
        for v in query_g[name]:
            r = v.clone()
            for _ in range(10):
                r = v + r - damped @ r
            lissa_rows.append(-(g @ r))
        paper["lissa"] = torch.stack(lissa_rows)
        paper["hessian-free"] = -(query_g[name] @ g.T)
        for key, value in paper.items():
            out[key][name] = -value  # library convention: positive = helpful
        out["self-exact"][name] = torch.stack([g[k] @ torch.linalg.solve(damped, g[k]) for k in range(n)])
        out["self-datainf"][name] = torch.stack(
            [
                sum((g[k] @ g[k] - (g[i] @ g[k]) ** 2 / (lam + g[i] @ g[i])) / (n * lam) for i in range(n))
                for k in range(n)
            ]
        )
        out["self-hessian-free"][name] = (g * g).sum(1)
    # The library's unit: every score / N (N = the 120 fine-tuning examples), and DataInf's rows times the
    # scalar that brings its r closest to the exact inverse in the (G + λI)-norm.
    out["datainf-rescale"] = fit["r"] / fit["energy"]
    for key in ("datainf", "exact", "lissa", "hessian-free", "self-exact", "self-datainf", "self-hessian-free"):
        factor = out["datainf-rescale"][:, None] if key == "datainf" else 1.0
        out[key] = {name: value * factor / N_TRAIN for name, value in out[key].items()}
    return out


@pytest.mark.parametrize("cls", [DataInf, ExactInfluence, LiSSA, HessianFree])
def test_vectorized_equals_loop_per_layer(lora_run, direct, cls):
    method = make(cls, lora_run)
    per_layer = method.attribute_per_layer(lora_run["queries"], lora_run["data"].finetune)
    assert len(per_layer) == 2 * 3  # lora_A and lora_B of each of the three Linear layers
    for name, scores in per_layer.items():
        expected = direct[cls.name][name]
        assert scores.values.shape == (N_QUERIES, N_TRAIN)
        scale = expected.abs().max()
        torch.testing.assert_close(scores.values.double() / scale, expected / scale, atol=2e-5, rtol=0)
        if cls is not HessianFree:
            assert method.lambdas[name] == pytest.approx(direct["lambda"][name], rel=1e-6)
    total = method.attribute(lora_run["queries"], lora_run["data"].finetune)
    torch.testing.assert_close(total.values, sum(s.values for s in per_layer.values()), atol=1e-5, rtol=1e-4)
    assert total.method == cls.name and total.config["modules"] == "lora"


def test_mean_query_is_the_mean_row(lora_run):
    """With the paper's mean validation gradient, the single row equals the mean of the per-query rows
    (before each row's own rescaling, which the scores' config records)."""
    train, queries = lora_run["data"].finetune, lora_run["queries"]
    per_query = make(DataInf, lora_run).attribute(queries, train)
    rows = per_query.values / torch.tensor(per_query.config["curvature_rescale"])[:, None]
    mean = make(DataInf, lora_run, mean_query=True).attribute(queries, train)
    assert mean.values.shape == (1, N_TRAIN) and mean.query_ids.tolist() == [-1]
    unscaled = mean.values[0] / mean.config["curvature_rescale"][0]
    torch.testing.assert_close(unscaled, rows.mean(0), atol=1e-5 * float(rows.abs().max()), rtol=1e-4)


def test_datainf_rescaled_to_the_exact_inverse_in_size_not_in_ranking(lora_run, direct):
    """DataInf's swapped inverse overshoots the exact one; the per-query rescaling brings its scores to the
    exact influence's order of magnitude (a change of the query loss) and reverses no ranking. Measured: the
    largest score per query is 97–175x the exact one's before, 0.23–0.31x after (the projection onto a
    direction that is only partly the exact one's undershoots by that cosine)."""
    train, queries = lora_run["data"].finetune, lora_run["queries"]
    scores = make(DataInf, lora_run).attribute(queries, train)
    factors = torch.tensor(scores.config["curvature_rescale"], dtype=torch.float64)
    torch.testing.assert_close(factors, direct["datainf-rescale"], rtol=1e-4, atol=0)
    assert (factors > 0).all() and (factors < 1).all()  # it shrinks: the swapped inverse overshoots
    exact = make(ExactInfluence, lora_run).attribute(queries, train)
    assert exact.config.get("curvature_rescale") is None  # the exact inverse needs none
    size = scores.values.abs().amax(1) / exact.values.abs().amax(1)
    unscaled = size / factors.float()
    assert (size.log().abs() < unscaled.log().abs()).all() and (size.log10().abs() < 1).all(), (size, unscaled)
    raw = scores.values / factors[:, None].float()
    assert torch.equal(scores.values.argsort(1), raw.argsort(1))


@pytest.mark.parametrize("cls", [DataInf, ExactInfluence, HessianFree])
def test_self_influence_matches_loop(lora_run, direct, cls):
    scores = make(cls, lora_run).self_influence(lora_run["data"].finetune)
    assert scores.kind == "self" and scores.values.shape == (N_TRAIN,) and scores.method == cls.name
    expected = sum(direct[f"self-{cls.name}"].values())
    torch.testing.assert_close(scores.values.double(), expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))


def test_datainf_approaches_exact_as_damping_grows(lora_run):
    """Averaging the inverses agrees with inverting the average to leading order in 1/λ, so the
    relative error to exact influence falls as λ grows past the squared gradient norms (the automatic
    λ is ~mean‖g‖²/(10 d), far below them). Measured: 55, 1.8, 0.0095, 1.4e-6 (the 1/λ² rate)."""
    train, queries = lora_run["data"].finetune, lora_run["queries"]
    auto = make(DataInf, lora_run)
    auto.attribute(queries, train)
    base = max(auto.lambdas.values())
    errors = []
    for factor in (1.0, 1e2, 1e4, 1e6):
        kwargs = {"damping": base * factor}
        approx = make(DataInf, lora_run, **kwargs).attribute(queries, train).values.double()
        exact = make(ExactInfluence, lora_run, **kwargs).attribute(queries, train).values.double()
        errors.append(float((approx - exact).norm() / exact.norm()))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    print(f"\nrelative error DataInf vs exact for λ × (1, 1e2, 1e4, 1e6): {errors}")
    assert errors[-1] < 1e-3, errors


def pearson(a, b):
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def test_correlation_with_exact_paper_ordering(lora_run, capsys):
    """Pearson correlation with exact influence on a rank-2 LoRA (the paper's Figure 1).

    Measured here: DataInf 0.51, Hessian-free 0.45, LiSSA 0.21. Over 3 seeds × ranks 1, 2, 4 (n = 200):
    DataInf beat LiSSA 9/9 times and Hessian-free 8/9 (once 0.49 vs 0.51), mean 0.51 / 0.47 / 0.27, and
    fell with the rank as in the paper. So DataInf > LiSSA is asserted, and DataInf ≥ Hessian-free
    only up to 0.05.
    """
    train, queries = lora_run["data"].finetune, lora_run["data"].test
    exact = make(ExactInfluence, lora_run).attribute(queries, train).values
    corr = {
        cls.name: pearson(make(cls, lora_run).attribute(queries, train).values, exact)
        for cls in (DataInf, HessianFree, LiSSA)
    }
    with capsys.disabled():
        print(f"\nPearson with exact (rank {RANK}, n={N_TRAIN}, Q={len(queries)}): {corr}")
    assert corr["datainf"] > corr["lissa"]
    assert corr["datainf"] >= corr["hessian-free"] - 0.05
    assert corr["datainf"] > 0.3


# --- bad input --------------------------------------------------------------------------------
def test_no_lora_layers(digits_run):
    trace = Trace.open(digits_run["path"])
    with pytest.raises(UnsupportedModelError, match="LoRA"):
        DataInf(trace, digits_run["model_factory"](), TASK, modules="lora")


def test_layer_too_large_for_exact(digits_run, lora_run):
    trace = Trace.open(digits_run["path"])
    with pytest.raises(ValueError, match=r"max_dim=4096.*modules='lora' or options.layers"):
        ExactInfluence(trace, digits_run["model_factory"](), TASK)
    ExactInfluence(
        trace, digits_run["model_factory"](), TASK, options=MethodOptions(layers=["net.4"])
    )  # 10 × 129: fine
    with pytest.raises(ValueError, match="max_dim=100"):
        make(ExactInfluence, lora_run, max_dim=100)


def test_zero_gradient_layer(lora_run, tmp_path):
    """Adapters that never trained keep B = 0, so every lora_A gradient is 0 and the automatic λ is 0."""
    train = TensorDataset(*[t[:32] for t in lora_run["data"].finetune.tensors])
    model = lora_digits.LoRAClassifier(rank=RANK, lr=0.0)
    model.load_base(lora_run["base"])
    path = tmp_path / "untrained.h5"
    trainer = quiet_trainer(max_epochs=1, callbacks=[TDACallback(str(path), task=TASK, layers="lora")])
    trainer.fit(model, DataLoader(train, batch_size=16))
    trace, queries = Trace.open(path), lora_run["queries"]
    with pytest.raises(ValueError, match=r"lora_A.*zero gradient.*fixed damping"):
        DataInf(trace, lora_digits.LoRAClassifier(rank=RANK), TASK, modules="lora").attribute(queries, train)
    fixed = DataInf(trace, lora_digits.LoRAClassifier(rank=RANK), TASK, modules="lora", damping=1e-3)
    per_layer = fixed.attribute_per_layer(queries, train)
    assert all((s.values == 0).all() for name, s in per_layer.items() if "lora_A" in name)
    assert any((s.values != 0).any() for name, s in per_layer.items() if "lora_B" in name)


def test_empty_queries_and_bad_arguments(lora_run):
    empty = TensorDataset(torch.zeros(0, 64), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="query set is empty"):
        make(DataInf, lora_run).attribute(empty, lora_run["data"].finetune)
    with pytest.raises(ValueError, match="damping"):
        make(DataInf, lora_run, damping=0.0)
    with pytest.raises(UnsupportedModelError, match="matches none"):
        DataInf(lora_run["trace"], lora_digits.LoRAClassifier(rank=RANK), TASK, modules=["decoder.*"])
    with pytest.raises(ValueError, match="LiSSA diverged"):
        make(LiSSA, lora_run, scale=1e-60).attribute(lora_run["queries"], lora_run["data"].finetune)
    with pytest.raises(NotImplementedError, match="self-influence"):
        make(LiSSA, lora_run).self_influence(lora_run["data"].finetune)


def test_example_fine_tunes_with_lora(lora_run):
    """The example's LoRA run learned the new digits and recorded only the adapters."""
    assert lora_digits.accuracy(lora_run["model"], lora_run["data"].test) > 0.35  # 5 classes: chance 0.2
    names = lora_run["trace"].layer_names
    assert len(names) == 6 and all("lora_" in name for name in names)
