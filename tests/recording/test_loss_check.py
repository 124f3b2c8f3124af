"""The callback's check that the Task's loss is the loss training_step optimises: a plain run (with
dropout, batch norm and gradient accumulation, in float32 and bf16) passes silently, from the training forward's
own outputs or, when the Task cannot recognise the model call, a replayed forward; 10x the loss, a sum
reduction and label smoothing are each warned about with the numbers and recorded in the trace; the
explanations themselves (token mean, constant offset) on exact numbers."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tda import ClassificationTask, TDACallback, Trace
from lightning_tda.cli import main
from lightning_tda.demo.language import CausalLanguageModel, SyntheticTextDataModule
from lightning_tda.recording.loss_check import LossCheck
from lightning_tda.tasks import LanguageModelingTask


class LossVariant(L.LightningModule):
    """A small classifier with dropout and batch norm whose training_step returns the loss ``kind``."""

    def __init__(self, kind: str = "mean") -> None:
        super().__init__()
        self.kind = kind
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x) if self.kind == "direct" else self(x)  # "direct": a call the Task cannot recognise
        if self.kind == "sum":
            return F.cross_entropy(logits, y, reduction="sum")
        if self.kind == "times10":
            return 10 * F.cross_entropy(logits, y)
        if self.kind == "smoothing":
            return F.cross_entropy(logits, y, label_smoothing=0.1)
        return F.cross_entropy(logits, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _train(kind: str, path, forwards: list | None = None, **trainer_options):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(60, 8, generator=generator)
    y = torch.randint(0, 3, (60,), generator=generator)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)  # the last batch has 12 examples
    L.seed_everything(0, verbose=False)
    callback = TDACallback(str(path), task=ClassificationTask(), segments=1)
    model = LossVariant(kind)
    if forwards is not None:  # count the network's forward passes
        model.net.register_forward_hook(lambda *_: forwards.append(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=6, callbacks=[callback], **trainer_options).fit(model, loader)
    messages = [str(w.message) for w in caught if "loss check" in str(w.message)]
    (record,) = Trace.open(path).loss_checks()
    return messages, record


@pytest.mark.parametrize(
    "trainer_options", [{}, {"accumulate_grad_batches": 2}, {"precision": "bf16-mixed"}], ids=["f32", "accum", "bf16"]
)
def test_a_plain_run_passes_without_a_warning(trainer_options, tmp_path):
    messages, record = _train("mean", tmp_path / "trace.h5", **trainer_options)
    assert messages == []
    assert record["verdict"] == "match" and record["first_step"] == 1
    assert record["batches"] == 4 * trainer_options.get("accumulate_grad_batches", 1)
    assert record["max_relative_difference"] < (1e-2 if trainer_options else 1e-5)


@pytest.mark.parametrize("kind", ["mean", "direct"])
def test_the_check_reuses_the_training_forward_and_replays_it_only_when_it_cannot(kind, tmp_path):
    """``self(x)`` is the Task's forward: its output gives the Task's losses (and the true Fisher's targets), so
    recording adds no forward pass. ``self.net(x)`` is not recognised: one replayed forward per checked batch (and a
    second forward per statistics step), and the replay reproduces dropout and batch norm exactly."""
    path, forwards = tmp_path / "trace.h5", []
    messages, record = _train(kind, path, forwards)
    assert messages == [] and record["verdict"] == "match" and record["max_relative_difference"] < 1e-5
    statistics_steps = sum(segment.stats_steps for segment in Trace.open(path).segments)
    assert statistics_steps >= 1
    assert len(forwards) == 6 + (0 if kind == "mean" else 4 + statistics_steps)


@pytest.mark.parametrize(
    "kind, verdict, expected",
    [
        ("times10", "scale", ["training_step's loss is 10 x the batch mean of ClassificationTask", "divide it by 10"]),
        ("sum", "example_sum", ["returns the SUM of the per-example losses", "reduction='mean'"]),
        ("smoothing", "mismatch", ["does not account for", "label smoothing"]),
    ],
)
def test_a_training_step_that_is_not_the_tasks_loss_is_warned_about_and_recorded(kind, verdict, expected, tmp_path):
    path = tmp_path / "trace.h5"
    messages, record = _train(kind, path)
    (message,) = messages
    assert record["verdict"] == verdict and record["message"] in message
    for text in expected:
        assert text in message, message
    assert f"reported {record['reported'][0]:.6g} vs ClassificationTask mean {record['task_mean'][0]:.6g}" in message
    if kind == "times10":
        assert record["factor"] == pytest.approx(10, rel=1e-5)
    if kind == "sum":  # the ratio follows each batch's size, the last one included
        ratios = [r / m for r, m in zip(record["reported"], record["task_mean"])]
        assert ratios == pytest.approx([16, 16, 16, 12], rel=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_a_language_model_trained_on_the_token_mean(reduction, tmp_path):
    """The Hugging Face .loss (token mean over the batch) against LanguageModelingTask's per-example mean and sum."""
    path = tmp_path / "trace.h5"
    data = SyntheticTextDataModule(train_blocks=24, test_blocks=2, batch_size=8)
    callback = TDACallback(str(path), task=LanguageModelingTask(reduction=reduction), segments=1)
    L.seed_everything(0, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=3, callbacks=[callback]).fit(CausalLanguageModel(width=16, layers=1), data)
    messages = [str(w.message) for w in caught if "loss check" in str(w.message)]
    (record,) = Trace.open(path).loss_checks()
    if reduction == "mean":
        assert record["verdict"] == "match" and messages == []
    else:
        assert record["verdict"] == "token_mean" and record["factor"] == pytest.approx(1 / 15)  # 15 predicted tokens
        (message,) = messages
        assert "Fix: LanguageModelingTask(reduction='mean')" in message


def test_inspect_shows_the_check(tmp_path, capsys):
    path = tmp_path / "trace.h5"
    _train("times10", path)
    assert main(["inspect", str(path)]) == 0
    assert "loss check (from step 1): scale: training_step's loss is 10 x" in capsys.readouterr().out


def test_explanations_on_exact_numbers():
    token_sums = [torch.tensor([3.0, 5.0]), torch.tensor([2.0, 2.0, 4.0])]  # per-example sums over tokens
    tokens = [torch.tensor([2.0, 2.0]), torch.tensor([3.0, 3.0, 3.0])]
    token_mean = LossCheck(task=LanguageModelingTask(reduction="sum"))
    for losses, count in zip(token_sums, tokens):  # training_step: the mean over the batch's tokens
        token_mean.update(losses, float(losses.sum() / count.sum()), positions=count)
    result = token_mean.compute()
    assert result.verdict == "token_mean" and "Fix: LanguageModelingTask(reduction='mean')" in result.message

    weighted = LossCheck(task=LanguageModelingTask())
    means, counts = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([5.0, 3.0, 2.0])  # padded: unequal lengths
    weighted.update(means, float((means * counts).sum() / counts.sum()), positions=counts)
    result = weighted.compute()
    assert result.verdict == "token_weighted" and "No Task option reproduces" in result.message

    offset = LossCheck()  # an example-independent term (a weight penalty) added to the mean loss
    for mean in (2.0, 1.5, 1.2):
        offset.update(torch.full((4,), mean), mean + 0.3)
    result = offset.compute()
    assert result.verdict == "mismatch" and "nearly constant (0.3)" in result.message

    nothing = LossCheck()
    nothing.skip("training_step returned no loss tensor")
    result = nothing.compute()
    assert result.verdict == "unchecked" and "training_step returned no loss tensor" in result.message
