"""The exact unrolled reference (``lightning_tda.evaluation.unrolled``) against the run it replays and
against finite-difference re-training, in float64 on a small MLP trained by Lightning."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_tda import RegressionTask, TDACallback, Trace
from lightning_tda.demo import load_concrete, mlp
from lightning_tda.evaluation import UnrolledTraining, replay_batches, unrolled_scores

N_TRAIN, BATCH, EPOCHS = 48, 16, 2


class TinyRegressor(L.LightningModule):
    """An 8-6-1 tanh MLP in float64 (so the replay must match the run to round-off)."""

    def __init__(self, optimizer: str = "momentum") -> None:
        super().__init__()
        self.optimizer = optimizer
        self.net = mlp([8, 6, 1])
        self.net[1] = torch.nn.Tanh()
        self.double()

    def forward(self, x):
        return self.net(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        if self.optimizer == "momentum":
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
        if self.optimizer == "nesterov":
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, nesterov=True)
        if self.optimizer == "plain":
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)}
        kind = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[self.optimizer]
        return kind(self.parameters(), lr=0.01, weight_decay=0.01)


def data():
    x, y = (torch.from_numpy(v).double() for v in load_concrete())
    return TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), TensorDataset(x[-3:], y[-3:])


def loader(train, seed=0):
    return DataLoader(train, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(seed))


def traced_run(tmp_path, optimizer):
    train, queries = data()
    L.seed_everything(0, verbose=False)
    path = tmp_path / f"{optimizer}.h5"
    callback = TDACallback(str(path), task=RegressionTask(), checkpoints_per_segment=1)
    quiet_trainer(max_epochs=EPOCHS, callbacks=[callback]).fit(TinyRegressor(optimizer), loader(train))
    return Trace.open(path), train, queries


def query_losses(replay, params, queries):
    x, y = queries.tensors
    values = [params[name] for name in replay.names]
    return replay._losses(values, (x, y), measure=True)


@pytest.mark.parametrize("optimizer", ["momentum", "nesterov", "plain", "adam", "adamw"])
def test_replay_reproduces_the_run_and_derivatives_equal_finite_differences(tmp_path, optimizer):
    trace, train, queries = traced_run(tmp_path, optimizer)
    replay = UnrolledTraining(trace, TinyRegressor(optimizer), RegressionTask(), train, loader(train))
    check = replay.check()
    assert check.max_loss_error < 1e-6 and check.parameter_error < 1e-6, str(check)  # float32 step log / checkpoint
    derivatives = replay.derivatives(queries)
    torch.testing.assert_close(replay.derivatives(queries, chunk_steps=2), derivatives, rtol=1e-10, atol=1e-14)
    h = 1e-5
    for example in (0, 17, 40):
        weights = torch.ones(N_TRAIN, dtype=torch.float64)
        weights[example] = 1 + h
        up = query_losses(replay, replay.train(weights), queries)
        weights[example] = 1 - h
        down = query_losses(replay, replay.train(weights), queries)
        torch.testing.assert_close(derivatives[:, example], (up - down) / (2 * h), rtol=1e-6, atol=1e-11)


def test_expected_membership_equals_finite_differences_and_scores_follow_the_convention(tmp_path):
    trace, train, queries = traced_run(tmp_path, "momentum")
    replay = UnrolledTraining(
        trace, TinyRegressor(), RegressionTask(), train, replay_batches(loader(train), 6), membership="expected"
    )
    derivatives = replay.derivatives(queries)
    h = 1e-5
    for example in (3, 30):
        weights = torch.ones(N_TRAIN, dtype=torch.float64)
        weights[example] = 1 + h
        up = query_losses(replay, replay.train(weights), queries)
        weights[example] = 1 - h
        down = query_losses(replay, replay.train(weights), queries)
        torch.testing.assert_close(derivatives[:, example], (up - down) / (2 * h), rtol=1e-6, atol=1e-11)
    scores = replay.scores(queries)
    assert scores.shape == (3, N_TRAIN) and scores.method == "unrolled"
    torch.testing.assert_close(scores.values.double(), -derivatives, rtol=1e-6, atol=1e-9)


def test_replay_batches_follow_the_loader_and_map_subsets():
    train, _ = data()
    batches = replay_batches(loader(train, seed=3), 7)  # crosses into the third epoch
    assert [len(b) for b in batches] == [BATCH] * 7
    first_epoch = torch.cat(batches[:3])
    assert sorted(first_epoch.tolist()) == list(range(N_TRAIN))
    generator = torch.Generator().manual_seed(3)
    torch.empty((), dtype=torch.int64).random_(generator=generator)  # the base seed DataLoader draws first
    assert torch.equal(first_epoch, torch.randperm(N_TRAIN, generator=generator))
    subset = torch.utils.data.Subset(train, list(range(10, 10 + BATCH)))
    (only,) = replay_batches(DataLoader(subset, batch_size=BATCH), 1)
    assert torch.equal(only, torch.arange(10, 10 + BATCH))


def test_unrolled_scores_refuse_a_replay_of_another_run(tmp_path):
    trace, train, queries = traced_run(tmp_path, "momentum")
    with pytest.raises(ValueError, match="does not reproduce the traced run"):
        unrolled_scores(trace, TinyRegressor(), RegressionTask(), queries, train, loader(train, seed=1))
    scores = unrolled_scores(trace, TinyRegressor(), RegressionTask(), queries, train, loader(train))
    assert torch.isfinite(scores.values).all()
    with pytest.raises(ValueError, match="recorded 6 optimizer steps"):
        UnrolledTraining(trace, TinyRegressor(), RegressionTask(), train, replay_batches(loader(train), 5))
    with pytest.raises(ValueError, match="membership="):
        UnrolledTraining(trace, TinyRegressor(), RegressionTask(), train, loader(train), membership="all")
    with pytest.raises(ValueError, match="chunk_steps=0"):
        UnrolledTraining(trace, TinyRegressor(), RegressionTask(), train, loader(train)).derivatives(queries, 0)


def test_unsupported_optimizers_are_named(tmp_path):
    train, _ = data()

    class RMSpropRegressor(TinyRegressor):
        def configure_optimizers(self):
            return torch.optim.RMSprop(self.parameters(), lr=0.01)

    L.seed_everything(0, verbose=False)
    path = tmp_path / "rmsprop.h5"
    quiet_trainer(max_epochs=1, callbacks=[TDACallback(str(path), task=RegressionTask())]).fit(
        RMSpropRegressor(), loader(train)
    )
    with pytest.raises(ValueError, match="replays SGD .* Adam and AdamW"):
        UnrolledTraining(Trace.open(path), TinyRegressor(), RegressionTask(), train, loader(train))
    np.testing.assert_equal(len(Trace.open(path).steps()), N_TRAIN // BATCH)
