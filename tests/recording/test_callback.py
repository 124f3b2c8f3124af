"""TDACallback writes a trace whose step log, segments, checkpoints and K-FAC sums match what happened.

Every statistic is checked against a recomputation made here, independently of the library's capture
code: plain forward hooks, ``retain_grad`` on layer outputs, and the per-example rescaling by hand.
"""

from __future__ import annotations

import copy
import math

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tda import ClassificationTask, RegressionTask, TDACallback, Trace
from lightning_tda.demo import MLPClassifier, SmallCNN, load_concrete


def digits_subset(n: int = 192, images: bool = False) -> TensorDataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data[:n], dtype=torch.float32) / 16.0
    if images:
        x = x.reshape(-1, 1, 8, 8)
    return TensorDataset(x, torch.tensor(digits.target[:n]))


class TokenClassifier(L.LightningModule):
    """Embeds 8 pixels as one token (8 tokens of width 8), a token-wise Linear, mean-pooled, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Linear(8, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(torch.tanh(self.token(x.reshape(x.shape[0], 8, 8))).mean(dim=1))

    def loss(self, logits, y):
        return F.cross_entropy(logits, y)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return {"loss": self.loss(self(x), y)}  # a dict, as many modules return

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


class Recorder(L.Callback):
    """Records, independently of TDACallback, each micro-batch with the parameters it saw, each optimizer
    step's learning rates, and the parameters after every optimizer step."""

    def __init__(self) -> None:
        self.micro_batches: list[tuple[dict, tuple]] = []
        self.lrs: list[list[float]] = []
        self.after_step: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.micro_batches.append((copy.deepcopy(pl_module.state_dict()), batch))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append([group["lr"] for group in optimizer.param_groups])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after_step[trainer.global_step] = copy.deepcopy(pl_module.state_dict())


def reference_sums(model: L.LightningModule, micro_batches, accumulate: int) -> dict[str, dict[str, torch.Tensor]]:
    """Empirical-Fisher K-FAC sums of every Linear/Conv2d, recomputed with plain hooks.

    Returns one ``{layer: {A_sum, A_count, S_sum, S_count}}`` per optimizer step.
    """
    modules = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    per_step, current = [], {}
    for position, (state, (x, y)) in enumerate(micro_batches):
        model.load_state_dict(state)
        seen = {}

        def keep(name, seen=seen):
            def hook(module, args, output):
                output.retain_grad()
                seen[name] = (args[0].detach(), output)

            return hook

        handles = [m.register_forward_hook(keep(n)) for n, m in modules.items()]
        model.zero_grad()
        model.loss(model(x), y).backward()
        for handle in handles:
            handle.remove()
        batch = len(y)
        for name, module in modules.items():
            a, out = seen[name]
            delta = out.grad * batch  # per-example gradient of the per-example loss
            if isinstance(module, nn.Conv2d):
                a = F.unfold(a, module.kernel_size, padding=module.padding, stride=module.stride).transpose(1, 2)
                delta = delta.flatten(2).transpose(1, 2)
            else:
                a = a.reshape(batch, -1, a.shape[-1])
                delta = delta.reshape(batch, -1, delta.shape[-1])
            a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1).reshape(-1, a.shape[-1] + 1).double()
            delta = delta.reshape(-1, delta.shape[-1]).double()
            sums = current.setdefault(name, {"A_sum": 0, "A_count": 0, "S_sum": 0, "S_count": 0})
            sums["A_sum"] = sums["A_sum"] + a.T @ a
            sums["A_count"] += a.shape[0]
            sums["S_sum"] = sums["S_sum"] + delta.T @ delta
            sums["S_count"] += batch
        if (position + 1) % accumulate == 0:
            per_step.append(current)
            current = {}
    return per_step


CASES = {
    "mlp": (lambda: MLPClassifier(sizes=[64, 32, 10], lr=0.1, cosine=True), False, 1),
    "mlp-accumulate": (lambda: MLPClassifier(sizes=[64, 32, 10], lr=0.1), False, 2),
    "cnn": (lambda: SmallCNN(channels=4, lr=0.05), True, 1),
    "tokens": (TokenClassifier, False, 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_trace_matches_an_independent_recomputation(case, tmp_path):
    factory, images, accumulate = CASES[case]
    L.seed_everything(0, verbose=False)
    model = factory()
    recorder = Recorder()
    path = tmp_path / "trace.h5"
    tda = TDACallback(path, task=ClassificationTask(), fisher="empirical", every_n_steps=1, segments=3)
    trainer = quiet_trainer(max_epochs=3, accumulate_grad_batches=accumulate, callbacks=[recorder, tda])
    trainer.fit(model, DataLoader(digits_subset(images=images), batch_size=32, shuffle=True))

    trace = Trace.open(path)
    steps = trace.steps()
    n_steps = 3 * 6 // accumulate
    assert len(steps) == trace.num_steps == n_steps == trainer.global_step
    np.testing.assert_array_equal(steps.step, np.arange(1, n_steps + 1))
    np.testing.assert_array_equal(steps.global_step, np.arange(1, n_steps + 1))
    np.testing.assert_allclose(steps.lr, np.asarray(recorder.lrs), rtol=0, atol=0)
    np.testing.assert_array_equal(steps.batch_size, np.full(n_steps, 32 * accumulate))
    assert np.isfinite(steps.loss).all()
    if case == "mlp":  # the per-step cosine schedule, read before each step
        expected = [0.05 * (1 + math.cos(math.pi * k / n_steps)) for k in range(n_steps)]
        np.testing.assert_allclose(steps.lr[:, 0], expected, rtol=1e-12)

    # segments tile the run, each closed with its checkpoints; checkpoints hold the exact parameters
    assert [s.index for s in trace.segments] == [0, 1, 2]
    assert trace.segments[0].start_step == 0 and trace.segments[-1].end_step == n_steps
    for left, right in zip(trace.segments, trace.segments[1:]):
        assert left.end_step == right.start_step
    for segment in trace.segments:
        assert segment.num_steps == segment.end_step - segment.start_step == segment.stats_steps
        in_segment = (steps.step > segment.start_step) & (steps.step <= segment.end_step)
        np.testing.assert_array_equal(steps.segment[in_segment], segment.index)
        np.testing.assert_allclose(segment.mean_lr, steps.lr[in_segment].mean(axis=0), rtol=1e-12)
        assert len(segment.checkpoints) == 2
        assert trace.checkpoints[segment.checkpoints[-1]].step == segment.end_step
    for checkpoint in trace.checkpoints:
        restored = trace.checkpoint_state(checkpoint.index)
        for key, value in recorder.after_step[checkpoint.step].items():
            assert torch.equal(restored[key], value), (checkpoint, key)

    # K-FAC sums equal the recomputation, segment by segment
    per_step = reference_sums(factory(), recorder.micro_batches, accumulate)
    assert len(per_step) == n_steps
    for segment in trace.segments:
        for layer in trace.layer_names:
            got = trace.kfac_sums(segment.index, layer)
            for key in ("A_sum", "A_count", "S_sum", "S_count"):
                expected = sum(per_step[k][layer][key] for k in range(segment.start_step, segment.end_step))
                np.testing.assert_allclose(got[key].numpy(), np.asarray(expected), rtol=1e-5, atol=1e-9)


def test_true_fisher_of_a_linear_layer_with_mse_is_the_exact_gauss_newton_hessian(tmp_path):
    """Scalar regression: the recorded true-Fisher K-FAC A ⊗ S is the exact Gauss-Newton Hessian."""
    x, y = (torch.from_numpy(a) for a in load_concrete())

    class Linear(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(8, 1)

        def forward(self, inputs):
            return self.net(inputs).squeeze(-1)

        def training_step(self, batch, batch_idx):
            return F.mse_loss(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    path = tmp_path / "trace.h5"
    tda = TDACallback(path, task=RegressionTask(), segments=1, every_n_steps=1)
    quiet_trainer(max_epochs=2, callbacks=[tda]).fit(Linear(), DataLoader(TensorDataset(x, y), batch_size=103))
    A, S = Trace.open(path).covariances(0, "net")
    kfac = torch.kron(S, A)  # (1·9)²: rows of the (1, 9) gradient matrix, S first
    inputs = torch.cat([x, torch.ones(len(x), 1)], dim=1).double()
    gauss_newton = 2 * inputs.T @ inputs / len(x)  # Hessian of the mean per-example MSE in (w, b)
    torch.testing.assert_close(kfac, gauss_newton, rtol=1e-6, atol=1e-9)


def test_true_fisher_matches_the_expected_fisher_of_a_classifier(tmp_path):
    """Sampled true-Fisher S, averaged over many steps at fixed parameters, approaches its expectation."""
    L.seed_everything(0, verbose=False)
    model = MLPClassifier(sizes=[64, 10], lr=0.0, momentum=0.0)  # lr 0: parameters stay put
    data = digits_subset(64)
    path = tmp_path / "trace.h5"
    tda = TDACallback(path, task=ClassificationTask(), segments=1, every_n_steps=1)
    quiet_trainer(max_epochs=60, callbacks=[tda]).fit(model, DataLoader(data, batch_size=64))
    _, S = Trace.open(path).covariances(0, "net.0")
    probs = torch.softmax(model(data.tensors[0]), dim=-1).double().detach()
    expected = (torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]).mean(0)
    assert torch.linalg.norm(S - expected) / torch.linalg.norm(expected) < 0.08
