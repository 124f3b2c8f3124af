"""Callback options: segment policies, manual segments, Adam moments, layer selection, loops that must not count."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from conftest import quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tda import ClassificationTask, TDACallback, Trace
from lightning_tda.demo import MLPClassifier
from lightning_tda.recording.segments import CurvatureDrift, EpochBoundaries


def loader(n: int = 128, batch_size: int = 16, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 64, generator=generator)
    return DataLoader(TensorDataset(x, torch.randint(0, 10, (n,), generator=generator)), batch_size=batch_size)


def fit(path, model=None, epochs: int = 2, callbacks=(), trainer_kwargs=None, **callback_kwargs) -> TDACallback:
    L.seed_everything(0, verbose=False)
    tda = TDACallback(path, task=ClassificationTask(), **callback_kwargs)
    trainer = quiet_trainer(max_epochs=epochs, callbacks=[tda, *callbacks], **(trainer_kwargs or {}))
    trainer.fit(model or MLPClassifier(sizes=[64, 16, 10]), loader())
    return tda


def bounds(path) -> list[tuple[int, int, str]]:
    return [(s.start_step, s.end_step, s.reason) for s in Trace.open(path).segments]


def test_segment_policies(tmp_path):
    fit(tmp_path / "steps.h5", segments=[3, 10], epochs=2)  # 16 steps
    assert bounds(tmp_path / "steps.h5") == [(0, 3, "planned"), (3, 10, "planned"), (10, 16, "planned")]
    fit(tmp_path / "epochs.h5", segments=EpochBoundaries([1, 2]), epochs=3)  # 8 steps per epoch
    assert bounds(tmp_path / "epochs.h5") == [(0, 8, "planned"), (8, 16, "planned"), (16, 24, "planned")]
    fit(tmp_path / "one.h5", segments=1, checkpoints_per_segment=4)
    trace = Trace.open(tmp_path / "one.h5")
    assert [c.step for c in trace.checkpoints] == [4, 8, 12, 16]


def test_curvature_drift_closes_segments_when_the_data_changes(tmp_path):
    class SwitchData(L.Callback):  # scale the inputs 20x from epoch 2 on: the curvature moves
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch >= 2:
                batch[0].mul_(20.0)

    policy = CurvatureDrift(threshold=0.2, min_steps=4)
    fit(tmp_path / "drift.h5", segments=policy, epochs=4, callbacks=[SwitchData()], every_n_steps=1)
    segments = bounds(tmp_path / "drift.h5")
    assert any(reason == "drift" for *_, reason in segments)
    assert any(16 < end <= 24 for _, end, reason in segments if reason == "drift")  # soon after the switch


def test_new_segment_closes_after_the_current_step(tmp_path):
    class Switch(L.Callback):
        def __init__(self, tda):
            self.tda = tda

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 5:
                self.tda.new_segment()

    L.seed_everything(0, verbose=False)
    tda = TDACallback(tmp_path / "t.h5", task=ClassificationTask(), segments=1)
    quiet_trainer(max_epochs=2, callbacks=[tda, Switch(tda)]).fit(MLPClassifier(sizes=[64, 16, 10]), loader())
    assert bounds(tmp_path / "t.h5") == [(0, 6, "manual"), (6, 16, "planned")]


def test_adam_second_moments_are_recorded_per_segment(tmp_path):
    moments: list[dict[str, torch.Tensor]] = []

    class Moments(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            optimizer = trainer.optimizers[0]
            beta2 = optimizer.param_groups[0]["betas"][1]
            moments.append(
                {
                    name: optimizer.state[p]["exp_avg_sq"] / (1 - beta2 ** float(optimizer.state[p]["step"]))
                    for name, p in pl_module.named_parameters()
                }
            )

    model = MLPClassifier(sizes=[64, 16, 10], optimizer="adamw", lr=1e-2)
    fit(tmp_path / "adam.h5", model=model, callbacks=[Moments()], every_n_steps=2, segments=2)
    trace = Trace.open(tmp_path / "adam.h5")
    assert trace.optimizer["name"] == "AdamW" and trace.optimizer["param_groups"][0]["betas"] == [0.9, 0.999]
    steps = trace.steps()
    for segment in trace.segments:
        taken = [
            k for k in range(segment.start_step, segment.end_step) if steps.statistics[k]
        ]  # row k is optimizer step k + 1
        for layer in ("net.0", "net.2"):
            expected = torch.stack(
                [torch.cat([moments[k][f"{layer}.weight"], moments[k][f"{layer}.bias"][:, None]], 1) for k in taken]
            ).mean(0)
            # v̂ is read and averaged in float32 (what Adam keeps), its bias correction formed in float64
            torch.testing.assert_close(trace.preconditioner(segment.index, layer), expected.double(), rtol=1e-6, atol=0)
        for checkpoint in trace.checkpoints:  # and v̂ behind every checkpoint's state
            for layer in ("net.0", "net.2"):
                k = checkpoint.step - 1
                expected = torch.cat([moments[k][f"{layer}.weight"], moments[k][f"{layer}.bias"][:, None]], 1)
                stored = trace.checkpoint_preconditioner(checkpoint.index, layer)
                torch.testing.assert_close(stored, expected.double(), rtol=1e-6, atol=0)

    sgd = Trace.open(fit(tmp_path / "sgd.h5", every_n_steps=2).path)  # plain SGD keeps no second moments
    assert sgd.preconditioner(0, "net.0") is None and sgd.checkpoint_preconditioner(0, "net.0") is None


class WithExtras(MLPClassifier):
    """An MLP with an embedding-like table and a LayerNorm: parameters the callback cannot track."""

    def __init__(self):
        super().__init__(sizes=[64, 16, 10])
        self.norm = nn.LayerNorm(64)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.net(self.norm(x)) * self.scale


def test_layer_selection_and_unsupported_layers_are_reported_once(tmp_path):
    with pytest.warns(UserWarning, match=r"norm \(LayerNorm\)") as record:
        fit(tmp_path / "all.h5", model=WithExtras())
    assert sum("does not track" in str(w.message) for w in record) == 1
    assert Trace.open(tmp_path / "all.h5").layer_names == ["net.0", "net.2"]
    fit(tmp_path / "some.h5", layers=["net.2"])
    assert Trace.open(tmp_path / "some.h5").layer_names == ["net.2"]
    fit(tmp_path / "excl.h5", exclude=["net.2"])
    assert Trace.open(tmp_path / "excl.h5").layer_names == ["net.0"]


def test_validation_and_sanity_checks_do_not_touch_the_statistics(tmp_path):
    fit(tmp_path / "plain.h5", every_n_steps=1, fisher="empirical")
    L.seed_everything(0, verbose=False)
    tda = TDACallback(tmp_path / "val.h5", task=ClassificationTask(), every_n_steps=1, fisher="empirical")
    trainer = quiet_trainer(max_epochs=2, callbacks=[tda], limit_val_batches=None, num_sanity_val_steps=2)
    trainer.fit(MLPClassifier(sizes=[64, 16, 10]), loader(), val_dataloaders=loader(32, seed=1))
    plain, val = Trace.open(tmp_path / "plain.h5"), Trace.open(tmp_path / "val.h5")
    for segment in plain.segments:
        for layer in plain.layer_names:
            for key, value in plain.kfac_sums(segment.index, layer).items():
                np.testing.assert_array_equal(value, val.kfac_sums(segment.index, layer)[key])


def test_checkpoint_dtype_float16(tmp_path):
    model = MLPClassifier(sizes=[64, 16, 10])
    fit(tmp_path / "half.h5", model=model, checkpoint_dtype="float16")
    trace = Trace.open(tmp_path / "half.h5")
    restored = trace.checkpoint_state(trace.final_checkpoint.index)
    for key, value in model.state_dict().items():
        assert restored[key].dtype == torch.float32
        torch.testing.assert_close(restored[key], value, rtol=1e-3, atol=1e-3)
    assert "run" in trace.summary() and "segment" in trace.summary()
