"""Forward-INF: the first-order TracIn relation, batching, joint/descent modes, leakage detection, bad input."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
from conftest import quiet_trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_tda import ClassificationTask, TDACallback, Trace
from lightning_tda.demo import MLPClassifier
from lightning_tda.methods import ForwardINF, MethodOptions

TASK = ClassificationTask()


@pytest.fixture(scope="module")
def digits(digits_run):
    trace = Trace.open(digits_run["path"])
    dm = digits_run["datamodule"]
    x, y = dm.train_set.tensors
    xq, yq = dm.test_set.tensors
    return {
        "trace": trace,
        "train": TensorDataset(x[:150], y[:150]),
        "queries": TensorDataset(xq[:6], yq[:6]),
        "factory": digits_run["model_factory"],
    }


def method(digits, **kwargs) -> ForwardINF:
    """Forward-INF on the digits MLP with the paper's plain steps ``θ + α∇f`` unless ``normalize=True``."""
    return ForwardINF(digits["trace"], digits["factory"](), TASK, **{"normalize": False, **kwargs})


def flat_gradients(model, data: TensorDataset, names: list[str] | None = None) -> torch.Tensor:
    """``(n, D)`` per-example gradients of the loss by plain autograd, one example at a time."""
    params = [p for n, p in model.named_parameters() if names is None or n in names]
    rows = []
    for x, y in data:
        loss = TASK.train_loss(model, (x[None], y[None])).sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def loss_changes(scores) -> torch.Tensor:
    """The raw ``ℓ(z, θ_K) − ℓ(z, θ̂)`` behind scores in the library's unit (each row was multiplied by a
    positive factor that the config records)."""
    return scores.values / torch.tensor(scores.config["unit_factor_per_query"], dtype=torch.float32)[:, None]


def test_one_small_step_is_alpha_times_the_gradient_inner_product(digits):
    """Loss change ≈ α⟨∇ℓ(z), ∇f(z_q)⟩ (the paper's eq. 8); the error is second order, so it shrinks with α."""
    fi = method(digits, steps=1, lr=1e-2)
    expected = flat_gradients(fi.model, digits["queries"]) @ flat_gradients(fi.model, digits["train"]).T
    errors = []
    for lr in (1e-2, 3e-3, 1e-3):
        fi.lr = lr
        errors.append(relative_error(loss_changes(fi.attribute(digits["queries"], digits["train"])) / lr, expected))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[0] / errors[1] > 2 and errors[2] < 5e-3, errors
    # K small steps: K·α⟨·,·⟩ to first order (the query gradient grows along the way: second order).
    fi.steps = 3
    errors = []
    for lr in (1e-3, 3e-4):
        fi.lr = lr
        errors.append(
            relative_error(loss_changes(fi.attribute(digits["queries"], digits["train"])) / (3 * lr), expected)
        )
    assert errors[0] / errors[1] > 2 and errors[1] < 3e-2, errors


def test_descent_keeps_positive_as_helpful(digits):
    """Descent is scored with the sign flipped, so it has the same first-order term as ascent."""
    descent = method(digits, steps=1, lr=1e-3, direction="descent")
    expected = flat_gradients(descent.model, digits["queries"]) @ flat_gradients(descent.model, digits["train"]).T
    scores = descent.attribute(digits["queries"], digits["train"])
    assert scores.config["direction"] == "descent"
    # A step down can cross a ReLU kink of a training example (one entry here), so compare robustly.
    correlation = np.corrcoef(loss_changes(scores).flatten(), expected.flatten())[0, 1]
    assert correlation > 0.98 and relative_error(loss_changes(scores) / 1e-3, expected) < 0.1


def test_scores_are_predicted_changes_of_the_query_loss_and_keep_the_raw_ranking(digits):
    """The unit: a row of loss changes ÷ (K·α) × φ(σ_q)/N, with σ_q the recorded K-FAC curvature (last segment)
    along the query's gradient and φ(σ) = (1 − e^(−Λσ))/σ the response of a training run of learning-rate mass
    Λ (momentum 0.9 counted 10×): to first order φ(σ_q)/N·⟨∇ℓ(z), ∇f(z_q)⟩, an influence function whose
    curvature is that one number. The factor is positive per query, so each query's ranking is the raw one."""
    trace, queries, train = digits["trace"], digits["queries"], digits["train"]
    fi = method(digits, steps=1, lr=1e-3)
    scores = fi.attribute(queries, train)
    model, names = fi.model, ["net.0", "net.2", "net.4"]

    def layer_gradients(data):  # {layer: (n, out, in + 1)}, one backward per example
        rows = {n: [] for n in names}
        for x, y in data:
            model.zero_grad()
            TASK.train_loss(model, (x[None], y[None])).sum().backward()
            for n in names:
                module = model.get_submodule(n)
                rows[n].append(torch.cat([module.weight.grad, module.bias.grad[:, None]], 1).double())
        return {n: torch.stack(r) for n, r in rows.items()}

    gq, gz = layer_gradients(queries), layer_gradients(train)
    segment = trace.final_checkpoint.segment
    quadratic = sum(
        torch.einsum(
            "qoa,op,qpb,ab->q", gq[n], trace.covariances(segment, n)[1], gq[n], trace.covariances(segment, n)[0]
        )
        for n in names
    )
    sigma = quadratic / sum(gq[n].pow(2).sum((1, 2)) for n in names)
    mass = float(trace.steps().lr.sum()) * 10
    response = (1 - torch.exp(-mass * sigma)) / sigma
    inner = sum(gq[n].flatten(1) @ gz[n].flatten(1).T for n in names)
    expected = response[:, None] / trace.dataset_size * inner
    assert relative_error(scores.values.double(), expected) < 1e-2
    assert scores.config["unit"].startswith("predicted change of the query's measurement")

    # The default (one normalized step of 0.1‖θ̂‖, far from first order) ranks as its raw loss changes do.
    default = ForwardINF(trace, digits["factory"](), TASK)
    ranked = default.attribute(queries, train).values
    for q, (x, y) in enumerate(queries):
        model.zero_grad()
        TASK.train_loss(model, (x[None], y[None])).sum().backward()
        grads = {n: p.grad.detach() for n, p in model.named_parameters()}
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
        moved = {n: p.detach() + default.lr * grads[n] / norm for n, p in model.named_parameters()}
        with torch.no_grad():
            after = TASK.train_loss(lambda inputs, p=moved: torch.func.functional_call(model, p, (inputs,)), train[:])
            before = TASK.train_loss(model, train[:])
        assert torch.equal(ranked[q].argsort(), (after - before).argsort()), q


def test_batched_queries_equal_one_query_at_a_time(digits):
    batched = method(digits, steps=3, lr=0.05, options=MethodOptions(query_batch_size=4, batch_size=64))
    scores = batched.attribute(digits["queries"], digits["train"]).values
    single = method(digits, steps=3, lr=0.05, options=MethodOptions(query_batch_size=1, batch_size=150))
    rows = [single.attribute(TensorDataset(x[None], y[None]), digits["train"]).values[0] for x, y in digits["queries"]]
    torch.testing.assert_close(scores, torch.stack(rows), rtol=1e-4, atol=1e-6)
    looped = method(digits, steps=3, lr=0.05, vectorize=False, options=MethodOptions(query_batch_size=4))
    looped_scores = looped.attribute(digits["queries"], digits["train"]).values
    torch.testing.assert_close(scores, looped_scores, rtol=1e-4, atol=1e-6)


def test_normalized_steps_move_each_query_the_same_distance(digits):
    fi = method(digits, steps=1, lr=0.01, normalize=True)
    stacked = fi._ascend(tuple(digits["queries"].tensors), torch.arange(6)).params
    moved = torch.stack([(stacked[n] - fi.original[n]).reshape(6, -1).pow(2).sum(1) for n in stacked]).sum(0).sqrt()
    torch.testing.assert_close(moved, torch.full((6,), 0.01), rtol=1e-4, atol=0)


class ItemMLP(MLPClassifier):
    """Same parameters as the digits MLP, but ``forward`` calls ``.item()``, which vmap cannot trace."""

    def forward(self, x):
        scale = 1.0 if self.net[0].weight.abs().max().item() >= 0 else 0.0
        return self.net(x) * scale


def test_models_vmap_cannot_run_fall_back_to_a_loop(digits):
    reference = method(digits, steps=2, lr=0.05).attribute(digits["queries"], digits["train"]).values
    fi = ForwardINF(digits["trace"], ItemMLP(), TASK, steps=2, lr=0.05, normalize=False)
    with pytest.warns(UserWarning, match="vmap cannot run this model"):
        scores = fi.attribute(digits["queries"], digits["train"]).values
    torch.testing.assert_close(scores, reference, rtol=1e-4, atol=1e-6)


def test_joint_mode_steps_on_the_mean_query_loss(digits):
    fi = method(digits, steps=1, lr=1e-3)
    joint = fi.attribute(digits["queries"], digits["train"], joint=True)
    assert joint.shape == (1, 150) and joint.config["joint"] and joint.config["n_joint_queries"] == 6
    grads = flat_gradients(fi.model, digits["train"])
    mean_query = flat_gradients(fi.model, digits["queries"]).mean(0)
    assert relative_error(loss_changes(joint)[0] / 1e-3, grads @ mean_query) < 1e-2
    # Streaming the query set in batches gives the same single step.
    small_batches = method(digits, steps=2, lr=0.05, options=MethodOptions(query_batch_size=4))
    one_batch = method(digits, steps=2, lr=0.05, options=MethodOptions(query_batch_size=6))
    torch.testing.assert_close(
        small_batches.attribute(digits["queries"], digits["train"], joint=True).values,
        one_batch.attribute(digits["queries"], digits["train"], joint=True).values,
        rtol=1e-4,
        atol=1e-6,
    )
    # A single query as the whole set is the per-query row.
    query = TensorDataset(*[t[:1] for t in digits["queries"].tensors])
    torch.testing.assert_close(
        one_batch.attribute(query, digits["train"], joint=True).values,
        one_batch.attribute(query, digits["train"]).values,
    )


def test_only_selected_modules_move(digits):
    fi = method(digits, steps=1, lr=1e-3, modules=["net.4"])
    assert fi.moving_names == ["net.4.weight", "net.4.bias"]
    stacked = fi._ascend(tuple(digits["queries"].tensors), torch.arange(6)).params
    assert set(stacked) == {"net.4.weight", "net.4.bias"}
    names = fi.moving_names
    expected = flat_gradients(fi.model, digits["queries"], names) @ flat_gradients(fi.model, digits["train"], names).T
    assert relative_error(loss_changes(fi.attribute(digits["queries"], digits["train"])) / 1e-3, expected) < 1e-2
    assert method(digits, options=MethodOptions(layers=["net.0"])).moving_names == ["net.0.weight", "net.0.bias"]
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        method(digits, modules=["encoder.*"])


def test_self_influence_is_the_diagonal_of_pairwise_scores(digits):
    fi = method(digits, steps=2, lr=0.05, options=MethodOptions(query_batch_size=16))
    small = TensorDataset(*[t[:40] for t in digits["train"].tensors])
    own = fi.self_influence(small)
    assert own.kind == "self" and own.shape == (40,)
    torch.testing.assert_close(own.values, fi.attribute(small, small).values.diagonal(), rtol=1e-4, atol=1e-6)


class OneOfTwoProcesses:
    """A stand-in for a launched Fabric of two processes whose all-reduce we do by hand."""

    world_size = 2
    device = torch.device("cpu")

    def __init__(self, rank: int) -> None:
        self.global_rank = rank

    def all_reduce(self, tensor, reduce_op):
        return tensor


def test_shards_of_the_training_set_add_up_to_the_full_scores(digits):
    train = TensorDataset(*[t[:60] for t in digits["train"].tensors])
    sizes = {"batch_size": 16, "query_batch_size": 16}
    full = method(digits, steps=2, lr=0.05, options=MethodOptions(**sizes))
    shards = [
        method(digits, steps=2, lr=0.05, options=MethodOptions(**sizes, fabric=OneOfTwoProcesses(rank)))
        for rank in (0, 1)
    ]
    parts = [m.attribute(digits["queries"], train).values for m in shards]
    assert (parts[0] != 0).any() and (parts[1] != 0).any()
    torch.testing.assert_close(parts[0] + parts[1], full.attribute(digits["queries"], train).values)
    own = sum(m.self_influence(train).values for m in shards)
    torch.testing.assert_close(own, full.self_influence(train).values)


def test_default_is_one_normalized_step_of_a_tenth_of_the_parameter_norm(digits):
    fi = ForwardINF(digits["trace"], digits["factory"](), TASK)
    norm = torch.cat([p.detach().reshape(-1) for p in fi.model.parameters()]).norm()
    assert (fi.steps, fi.normalize) == (1, True) and fi.lr == pytest.approx(0.1 * float(norm), rel=1e-5)
    assert fi.checkpoint == digits["trace"].final_checkpoint.index
    assert {"steps", "lr", "lr_rule", "direction", "modules", "normalize", "unit"} <= set(fi.config())
    head = ForwardINF(digits["trace"], digits["factory"](), TASK, modules=["net.4"])  # only what moves counts
    head_norm = torch.cat([p.detach().reshape(-1) for p in head.model.net[4].parameters()]).norm()
    assert head.lr == pytest.approx(0.1 * float(head_norm), rel=1e-5)
    plain = method(digits)  # the paper's rule: α = the last recorded learning rate
    assert plain.lr == pytest.approx(float(np.max(digits["trace"].steps().lr[-1])))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, "K must be a positive integer"),
        ({"steps": -2}, "K must be a positive integer"),
        ({"steps": 1.5}, "K must be a positive integer"),
        ({"lr": 0.0}, "finite number > 0"),
        ({"lr": -0.1}, "finite number > 0"),
        ({"lr": math.nan}, "finite number > 0"),
        ({"direction": "sideways"}, "use 'ascent' or 'descent'"),
    ],
)
def test_bad_hyper_parameters_are_refused(digits, kwargs, message):
    with pytest.raises(ValueError, match=message):
        method(digits, **kwargs)


def test_a_query_loss_that_is_nan_at_the_start_stops_and_names_the_query(digits):
    """No step size can fix a query whose loss is NaN at θ̂: that is bad input, named, not backed off."""
    x, y = (t.clone() for t in digits["queries"].tensors)
    x[4, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"query loss is NaN/inf at the trained parameters .* \[4\]"):
        method(digits, steps=2, lr=0.05).attribute(TensorDataset(x, y), digits["train"])
    with pytest.raises(FloatingPointError, match=r"query id\(s\) \[4\]"):
        method(digits, steps=2, lr=0.05).attribute(TensorDataset(x, y), digits["train"], joint=True)


def test_diverging_queries_back_off_alone_and_the_scores_name_the_alpha_used(digits):
    """At K=5, α=0.1 the poorly fit query 3 explodes (its loss grows ~1e5-fold) while the others barely
    move: only query 3 is re-run with a smaller α, the others keep theirs, and every score is finite."""
    queries, train = digits["queries"], digits["train"]
    with pytest.warns(UserWarning, match="steps on 1 of 6 queries diverged"):
        scores = method(digits, steps=5, lr=0.1).attribute(queries, train)
    used = scores.config["lr_per_query"]
    assert torch.isfinite(scores.values).all()
    assert list(scores.config["backed_off"]) == [3] and used[3] == scores.config["backed_off"][3] < 0.1
    assert [a for i, a in enumerate(used) if i != 3] == [0.1] * 5
    # Each row is what a call with that query's α gives.
    alone = method(digits, steps=5, lr=used[3]).attribute(TensorDataset(*queries[3:4]), train)
    torch.testing.assert_close(scores.values[3], alone.values[0], rtol=1e-4, atol=1e-6)
    in_pairs = method(digits, steps=5, lr=0.1, options=MethodOptions(query_batch_size=2))
    with pytest.warns(UserWarning, match="diverged"):
        torch.testing.assert_close(in_pairs.attribute(queries, train).values, scores.values, rtol=1e-4, atol=1e-6)
    # backoff=False keeps the old contract: stop and name the query.
    with pytest.raises(FloatingPointError, match=r"exploded while stepping on query id\(s\) \[3\]"):
        method(digits, steps=5, lr=0.1, backoff=False).attribute(queries, train)


def test_a_first_alpha_that_overflows_everywhere_still_returns_finite_scores(digits):
    """α = 10⁴ for 5 steps overflows every query, the joint set and (nearly) every self-influence step."""
    queries, train = digits["queries"], TensorDataset(*digits["train"][:16])
    fi = method(digits, steps=5, lr=1e4)
    with pytest.warns(UserWarning, match="diverged"):
        scores = fi.attribute(queries, train)
    assert torch.isfinite(scores.values).all() and (scores.values != 0).any()
    assert sorted(scores.config["backed_off"]) == list(range(6)) and max(scores.config["lr_per_query"]) < 1e4
    with pytest.warns(UserWarning, match="diverged"):
        joint = fi.attribute(queries, train, joint=True)
    assert torch.isfinite(joint.values).all() and joint.config["backed_off"][-1] < 1e4
    with pytest.warns(UserWarning, match="diverged"):
        own = fi.self_influence(train)
    assert torch.isfinite(own.values).all() and len(own.config["backed_off"]) >= 12  # a few barely move at all
    assert fi.lr == 1e4  # the method's own α is untouched


def test_empty_or_shuffled_sets_are_refused(digits):
    fi = method(digits)
    empty = TensorDataset(torch.zeros(0, 64), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="query set is empty"):
        fi.attribute(empty, digits["train"])
    with pytest.raises(ValueError, match="query set is empty"):
        fi.attribute(empty, digits["train"], joint=True)
    with pytest.raises(ValueError, match="training set is empty|train set is empty"):
        fi.attribute(digits["queries"], empty)
    with pytest.raises(ValueError, match="shuffles"):
        fi.attribute(DataLoader(digits["queries"], shuffle=True), digits["train"])


# --- a real data set with leaked test points ------------------------------------------------------


@pytest.fixture(scope="module")
def leaked(digits_run, tmp_path_factory):
    """The digits MLP trained on its training set plus copies of 30 test points (the leak)."""
    dm = digits_run["datamodule"]
    (x, y), (xq, yq) = dm.train_set.tensors, dm.test_set.tensors
    n_leaked = 30
    train = TensorDataset(torch.cat([x, xq[:n_leaked]]), torch.cat([y, yq[:n_leaked]]))
    path = tmp_path_factory.mktemp("leak") / "trace.h5"
    L.seed_everything(0, verbose=False)
    model = MLPClassifier(lr=0.1, momentum=0.9)
    loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    quiet_trainer(max_epochs=8, callbacks=[TDACallback(str(path), task=TASK)]).fit(model, loader)
    copies = torch.arange(len(x), len(x) + n_leaked)
    queries = TensorDataset(xq[:n_leaked], yq[:n_leaked])
    return {"trace": Trace.open(path), "train": train, "queries": queries, "copies": copies}


def copy_ranks(scores: torch.Tensor, copies: torch.Tensor) -> torch.Tensor:
    own = scores[torch.arange(len(copies)), copies]
    return (scores >= own[:, None]).sum(1)


def test_leaked_test_points_are_found_in_the_training_set(leaked):
    """Each leaked test point's own copy ranks near the top of ~1,470 training examples."""
    fi = ForwardINF(leaked["trace"], MLPClassifier(), TASK, steps=10, lr=1.0, normalize=True)
    ranks = copy_ranks(fi.attribute(leaked["queries"], leaked["train"]).values, leaked["copies"])
    n_train = len(leaked["train"])
    assert (ranks == 1).float().mean() >= 0.25, ranks  # chance: 1 / 1468
    assert (ranks <= 10).float().mean() >= 0.6, ranks
    assert ranks.float().median() <= 5, ranks
    assert ranks.float().median() < n_train / 100


def test_tune_picks_the_candidate_that_ranks_planted_copies_first(leaked):
    pool = TensorDataset(*[t[:400] for t in leaked["train"].tensors])
    fi = ForwardINF(leaked["trace"], MLPClassifier(), TASK, normalize=True, options=MethodOptions(query_batch_size=24))
    result = fi.tune(pool, steps=(1, 10), lrs=(0.1, 1.0, 1e4), n_planted=12, seed=0)
    assert set(result.top1) | set(result.diverged) == {(k, a) for k in (1, 10) for a in (0.1, 1.0, 1e4)}
    best = result.top1[(result.steps, result.lr)]
    assert all(best >= rate for rate in result.top1.values())
    assert best >= 0.25 and (fi.steps, fi.lr) == (result.steps, result.lr)
    assert len(result.planted) == 12 and "chosen" in result.table()
    unnormalized = ForwardINF(leaked["trace"], MLPClassifier(), TASK, steps=5, normalize=False)
    diverging = unnormalized.tune(pool, steps=(1, 50), lrs=(1.0,), n_planted=2, apply=False)
    assert (50, 1.0) in diverging.diverged and (1, 1.0) in diverging.top1
    assert (unnormalized.steps, unnormalized.lr, unnormalized.backoff) == (5, pytest.approx(0.1), True)


def test_regression_task_follows_the_same_first_order_relation(tmp_path):
    """Concrete (UCI) regression MLP: loss change/α → ⟨∇ℓ(z), ∇f(z_q)⟩ with an error linear in α."""
    from lightning_tda import RegressionTask
    from lightning_tda.demo import ConcreteDataModule, MLPRegressor

    L.seed_everything(0, verbose=False)
    dm = ConcreteDataModule(batch_size=64, seed=0)
    task = RegressionTask()
    path = tmp_path / "concrete.h5"
    quiet_trainer(max_epochs=5, callbacks=[TDACallback(str(path), task=task)]).fit(MLPRegressor(), dm)
    train = TensorDataset(*[t[:100] for t in dm.train_set.tensors])
    queries = TensorDataset(*[t[:4] for t in dm.test_set.tensors])
    fi = ForwardINF(Trace.open(path), MLPRegressor(), task, steps=1, lr=1e-2, normalize=False)
    params = list(fi.model.parameters())

    def gradients(data):
        rows = []
        for x, y in data:
            loss = task.train_loss(fi.model, (x[None], y[None])).sum()
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
        return torch.stack(rows)

    expected = gradients(queries) @ gradients(train).T
    errors = []
    for lr in (1e-2, 1e-3):
        fi.lr = lr
        errors.append(relative_error(loss_changes(fi.attribute(queries, train)) / lr, expected))
    assert errors[0] / errors[1] > 5 and errors[1] < 0.03, errors


def test_adam_runs_step_along_the_optimizers_direction(digits, tmp_path):
    """On an AdamW trace the default step is along ``P̃ ⊙ ∇f``, with ``P = 1/(√v̂ + ε)`` of the final optimizer
    state (read here from the optimizer itself) over its mean: a small step of length α changes the loss of z by
    α⟨∇ℓ(z), P̃∇f(z_q)⟩/‖P̃∇f(z_q)‖ to first order. SGD traces keep the plain step."""
    assert method(digits, steps=1, lr=1e-3).config()["preconditioned"] is False
    L.seed_everything(0, verbose=False)
    train = digits["train"]
    loader = DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    trainer = quiet_trainer(max_epochs=1, callbacks=[TDACallback(str(tmp_path / "adamw.h5"), task=TASK)])
    trainer.fit(MLPClassifier(optimizer="adamw", lr=3e-3, weight_decay=0.01), loader)
    optimizer = trainer.optimizers[0]
    group = optimizer.param_groups[0]
    scales = []
    for param in trainer.lightning_module.parameters():
        state = optimizer.state[param]
        v_hat = state["exp_avg_sq"].double() / (1 - group["betas"][1] ** float(state["step"]))
        scales.append((1.0 / (v_hat.sqrt() + group["eps"])).reshape(-1))
    scale = torch.cat(scales)
    scale = (scale / scale.mean()).float()
    alpha = 1e-3
    fi = ForwardINF(Trace.open(tmp_path / "adamw.h5"), MLPClassifier(), TASK, steps=1, lr=alpha)
    assert fi.config()["preconditioned"] is True and fi.normalize
    directions = flat_gradients(fi.model, digits["queries"]) * scale
    expected = directions @ flat_gradients(fi.model, train).T / directions.norm(dim=1, keepdim=True)
    changes = loss_changes(fi.attribute(digits["queries"], train)) / alpha
    assert relative_error(changes, expected) < 2e-2
    plain = flat_gradients(fi.model, digits["queries"])
    unpreconditioned = plain @ flat_gradients(fi.model, train).T / plain.norm(dim=1, keepdim=True)
    assert relative_error(changes, unpreconditioned) > 0.2  # the preconditioner changes the direction here
