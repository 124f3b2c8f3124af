"""TracInCP against a direct loop over the checkpoints (torch.func gradients, learning rates per param group)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import quiet_trainer
from torch.func import functional_call, grad, vmap
from torch.utils.data import Subset, TensorDataset

from lightning_tda import ClassificationTask, TDACallback
from lightning_tda.demo import DigitsDataModule, MLPClassifier
from lightning_tda.methods import MethodOptions, TracInCP
from lightning_tda.trace import Trace, TraceError

SIZES = [64, 12, 10]


class TwoGroupMLP(MLPClassifier):
    """The hidden layer and the head in two optimizer param groups with different learning rates,
    and a cosine schedule, so each layer's rate differs per checkpoint."""

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(
            [
                {"params": self.net[0].parameters(), "lr": 0.2},
                {"params": self.net[2].parameters(), "lr": 0.02},
            ],
            momentum=0.5,
        )
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=30)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    L.seed_everything(0, verbose=False)
    path = tmp_path_factory.mktemp("tracin") / "trace.h5"
    dm = DigitsDataModule(batch_size=64, seed=0)
    model = TwoGroupMLP(sizes=SIZES)
    callback = TDACallback(str(path), task=ClassificationTask(), segments=2, checkpoints_per_segment=2)
    quiet_trainer(max_epochs=2, limit_train_batches=12, callbacks=[callback]).fit(model, dm)
    return {
        "trace": Trace.open(path),
        "train": Subset(dm.train_set, range(150)),
        "queries": Subset(dm.test_set, range(6)),
    }


def _stack(dataset):
    x, y = zip(*[dataset[i] for i in range(len(dataset))])
    return torch.stack(x).double(), torch.stack(y)


def direct_tracin(
    trace: Trace, train, queries, self_influence: bool = False, segment: int | None = None
) -> torch.Tensor:
    """Σ_c Σ_params η_{c,group} ⟨∇f(q, θ_c), ∇ℓ(z, θ_c)⟩ · T/(C·N) with the learning rates read from the step
    log: each of the C checkpoints stands for T/C of the T steps, in each of which an example weighs η/N on
    average, so a score is a change of the query loss. With ``segment``, only the terms of the checkpoints
    taken in that segment (the segment's part of the scores)."""
    net = TwoGroupMLP(sizes=SIZES).net.double()
    x, y = _stack(train)
    xq, yq = _stack(queries)
    steps = trace.steps()
    group = {"0": 0, "2": 1}

    def loss(params, xi, yi):
        return torch.nn.functional.cross_entropy(functional_call(net, params, (xi[None],)), yi[None])

    total = torch.zeros(len(x)) if self_influence else torch.zeros(len(xq), len(x))
    total = total.double()
    for checkpoint in trace.checkpoints:
        if segment is not None and checkpoint.segment != segment:
            continue
        state = trace.checkpoint_state(checkpoint.index)
        params = {k.removeprefix("net."): v.double() for k, v in state.items()}
        lr = steps.lr[list(steps.step).index(checkpoint.step)]
        g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
        q = g if self_influence else vmap(grad(loss), in_dims=(None, 0, 0))(params, xq, yq)
        for name in g:
            rate = lr[group[name.split(".")[0]]]
            if self_influence:
                total += rate * (g[name].flatten(1) ** 2).sum(1)
            else:
                total += rate * q[name].flatten(1) @ g[name].flatten(1).T
    return total * len(steps) / (len(trace.checkpoints) * 1438)  # N: the digits training set


def test_tracin_equals_a_direct_loop_over_checkpoints(run):
    trace = run["trace"]
    lrs = trace.steps().lr
    assert len(trace.checkpoints) == 4 and lrs.shape[1] == 2 and lrs[:, 0].std() > 0
    method = TracInCP(trace, TwoGroupMLP(sizes=SIZES), ClassificationTask(), options=MethodOptions(batch_size=64))
    scores = method.attribute(run["queries"], run["train"])
    expected = direct_tracin(trace, run["train"], run["queries"])
    assert scores.shape == (6, 150) and scores.method == "tracin"
    assert torch.allclose(scores.values.double(), expected, rtol=1e-4, atol=1e-6 * expected.abs().max())
    own = method.self_influence(run["train"])
    assert own.kind == "self"
    expected_self = direct_tracin(trace, run["train"], run["queries"], self_influence=True)
    assert torch.allclose(own.values.double(), expected_self, rtol=1e-4)


def test_chosen_checkpoints_and_bad_input(run):
    trace = run["trace"]
    last = TracInCP(trace, TwoGroupMLP(sizes=SIZES), ClassificationTask(), checkpoints=[3])
    assert last.config()["checkpoints"] == [3]
    assert set(last.learning_rates) == {3}
    with pytest.raises(ValueError, match="checkpoints=\\[7\\]"):
        TracInCP(trace, TwoGroupMLP(sizes=SIZES), ClassificationTask(), checkpoints=[7])
    with pytest.raises(TraceError, match="trained architecture"):
        TracInCP(trace, MLPClassifier(sizes=[64, 30, 10]), ClassificationTask())
    wrong = TensorDataset(torch.randn(3, 10), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="shape and type"):
        last.attribute(wrong, run["train"])


def test_timeline_splits_the_direct_loop_by_segment(run):
    trace = run["trace"]
    method = TracInCP(trace, TwoGroupMLP(sizes=SIZES), ClassificationTask(), options=MethodOptions(batch_size=64))
    timeline = method.attribute_over_time(run["queries"], run["train"])
    assert timeline.shape == (2, 6, 150) and timeline.method == "tracin"
    assert timeline.segments.tolist() == [0, 1] and [c.segment for c in trace.checkpoints] == [0, 0, 1, 1]
    segment_steps = [(s.start_step + 1, s.end_step) for s in trace.segments]
    assert [tuple(row) for row in timeline.steps.tolist()] == segment_steps
    # the cosine schedule falls in both segments; their mean rates are those of the step log
    assert timeline.phases == ["decay", "decay"]
    lrs = trace.steps().lr[:, 0]
    assert timeline.learning_rates.tolist() == pytest.approx([lrs[: segment_steps[0][1]].mean(), lrs[12:].mean()])
    for s in (0, 1):
        expected = direct_tracin(trace, run["train"], run["queries"], segment=s)
        scale = expected.abs().max()
        assert torch.allclose(timeline.values[s].double(), expected, rtol=1e-4, atol=1e-6 * scale)
    scores = method.attribute(run["queries"], run["train"])
    torch.testing.assert_close(timeline.total().values, scores.values, rtol=1e-5, atol=1e-7)
    # one checkpoint per segment, given out of order: the segments are still in training order
    chosen = TracInCP(trace, TwoGroupMLP(sizes=SIZES), ClassificationTask(), checkpoints=[3, 0])
    partial = chosen.attribute_over_time(run["queries"], run["train"])
    assert partial.segments.tolist() == [0, 1]
    torch.testing.assert_close(partial.total().values, chosen.attribute(run["queries"], run["train"]).values)


# --- Adam-aware TracInCP -------------------------------------------------------------------------
ADAM_SIZES = [64, 10, 10]
ADAM_EPS = {"0": 1e-6, "2": 1e-8}  # per param group, so the test sees which ε each layer uses


class TwoGroupAdamW(MLPClassifier):
    """AdamW in two param groups (different learning rates and ε) with a linear warm-up, so η and P differ
    per layer and per checkpoint."""

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            [
                {"params": self.net[0].parameters(), "lr": 0.01, "eps": ADAM_EPS["0"]},
                {"params": self.net[2].parameters(), "lr": 0.003, "eps": ADAM_EPS["2"]},
            ],
            weight_decay=0.01,
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 4))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class SecondMoments(L.Callback):
    """Keeps Adam's bias-corrected ``v̂ = v/(1 − β₂^t)`` of every parameter after each optimizer step ``t``,
    read straight from the optimizer (independently of the trace): ``by_step[t][parameter name]``."""

    def __init__(self) -> None:
        self.by_step: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        optimizer = trainer.optimizers[0]
        beta2 = optimizer.param_groups[0]["betas"][1]
        v_hat, step = {}, 0
        for name, param in pl_module.named_parameters():
            state = optimizer.state[param]
            step = int(float(state["step"]))
            v_hat[name.removeprefix("net.")] = state["exp_avg_sq"].double() / (1 - beta2**step)
        self.by_step[step] = v_hat


@pytest.fixture(scope="module")
def adam_run(tmp_path_factory):
    L.seed_everything(0, verbose=False)
    path = tmp_path_factory.mktemp("tracin_adam") / "trace.h5"
    dm = DigitsDataModule(batch_size=32, seed=0)
    recorder = SecondMoments()
    callback = TDACallback(str(path), task=ClassificationTask(), segments=3, checkpoints_per_segment=2)
    quiet_trainer(max_epochs=1, limit_train_batches=6, callbacks=[callback, recorder]).fit(
        TwoGroupAdamW(sizes=ADAM_SIZES), dm
    )
    return {
        "trace": Trace.open(path),
        "second_moments": recorder.by_step,
        "train": Subset(dm.train_set, range(40)),
        "queries": Subset(dm.test_set, range(5)),
    }


def direct_adam_tracin(trace: Trace, second_moments, train, queries) -> torch.Tensor:
    """Σ_c η_c ⟨∇f(q, θ_c), P_c ∇ℓ(z, θ_c)⟩ · T/(C·N) per parameter tensor, with P_c = 1/(√v̂_c + ε) from the
    optimizer's own state at checkpoint c's step and plain autograd per example."""
    net = TwoGroupAdamW(sizes=ADAM_SIZES).net.double()
    x, y = _stack(train)
    xq, yq = _stack(queries)
    steps = trace.steps()
    group = {"0": 0, "2": 1}

    def loss(params, xi, yi):
        return torch.nn.functional.cross_entropy(functional_call(net, params, (xi[None],)), yi[None])

    def per_example(params, inputs, targets):
        return [torch.autograd.grad(loss(params, a, b), list(params.values())) for a, b in zip(inputs, targets)]

    total = torch.zeros(len(xq), len(x), dtype=torch.float64)
    for checkpoint in trace.checkpoints:
        state = trace.checkpoint_state(checkpoint.index)
        params = {k.removeprefix("net."): v.double().requires_grad_() for k, v in state.items()}
        lr = steps.lr[list(steps.step).index(checkpoint.step)]
        v_hat = second_moments[checkpoint.step]
        train_grads, query_grads = per_example(params, x, y), per_example(params, xq, yq)
        for position, name in enumerate(params):
            layer = name.split(".")[0]
            update = lr[group[layer]] / (v_hat[name].sqrt() + ADAM_EPS[layer])
            g = torch.stack([grads[position] * update for grads in train_grads]).flatten(1)
            q = torch.stack([grads[position] for grads in query_grads]).flatten(1)
            total += q @ g.T
    return total * len(steps) / (len(trace.checkpoints) * 1438)


def test_adam_tracin_weights_each_checkpoint_by_the_update_adam_applied(adam_run):
    trace = adam_run["trace"]
    assert len(trace.checkpoints) == 6 and [c.step for c in trace.checkpoints] == list(range(1, 7))
    assert trace.dataset_size == 1438
    method = TracInCP(trace, TwoGroupAdamW(sizes=ADAM_SIZES), ClassificationTask())
    assert method.preconditioned and method.config()["preconditioned"] is True
    scores = method.attribute(adam_run["queries"], adam_run["train"])
    expected = direct_adam_tracin(trace, adam_run["second_moments"], adam_run["train"], adam_run["queries"])
    assert torch.allclose(scores.values.double(), expected, rtol=1e-4, atol=1e-5 * expected.abs().max())
    # the preconditioner matters here: plain TracInCP differs by far more than the tolerance
    plain = TracInCP(trace, TwoGroupAdamW(sizes=ADAM_SIZES), ClassificationTask(), preconditioned=False)
    assert plain.config()["preconditioned"] is False
    plain_values = plain.attribute(adam_run["queries"], adam_run["train"]).values.double()
    assert (plain_values - expected).abs().max() > 0.5 * expected.abs().max()
    own = method.self_influence(adam_run["train"]).values.double()
    diagonal = direct_adam_tracin(trace, adam_run["second_moments"], adam_run["train"], adam_run["train"]).diagonal()
    assert torch.allclose(own, diagonal, rtol=1e-4, atol=1e-6 * diagonal.abs().max())


def test_preconditioned_tracin_needs_adam_moments(run):
    method = TracInCP(run["trace"], TwoGroupMLP(sizes=SIZES), ClassificationTask())
    assert method.preconditioned is False and method.config()["update"] == "η·g"
    with pytest.raises(TraceError, match="preconditioned=False"):
        TracInCP(run["trace"], TwoGroupMLP(sizes=SIZES), ClassificationTask(), preconditioned=True)
    with pytest.raises(ValueError, match="preconditioned='yes'"):
        TracInCP(run["trace"], TwoGroupMLP(sizes=SIZES), ClassificationTask(), preconditioned="yes")
