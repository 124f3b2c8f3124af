"""A small model's mid-segment checkpoints are held in host memory and written at the segment's close: the trace is
the one written checkpoint by checkpoint, held copies do not follow later training, and tied parameters stay one
stored tensor."""

from __future__ import annotations

import h5py
import lightning as L
import numpy as np
import torch
from conftest import quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tda import ClassificationTask, TDACallback, Trace
from lightning_tda.demo import MLPClassifier
from lightning_tda.recording.checkpoints import HeldCheckpoints
from lightning_tda.trace.writer import TraceWriter


def record(path, optimizer: str = "sgd") -> Trace:
    L.seed_everything(0, verbose=False)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 64, generator=generator), torch.randint(0, 10, (96,), generator=generator)
    callback = TDACallback(path, task=ClassificationTask(), checkpoints_per_segment=3, every_n_steps=2)
    model = MLPClassifier(sizes=[64, 16, 10], optimizer=optimizer)
    quiet_trainer(max_epochs=3, callbacks=[callback]).fit(model, DataLoader(TensorDataset(x, y), batch_size=16))
    return Trace.open(path)


def test_held_checkpoints_write_the_trace_that_immediate_writes_do(tmp_path, monkeypatch):
    writes = []
    original = HeldCheckpoints.write

    def counted(self, writer, dtype):
        writes.append(len(self.checkpoints))
        return original(self, writer, dtype)

    monkeypatch.setattr(HeldCheckpoints, "write", counted)
    held = record(tmp_path / "held.h5", optimizer="adamw")
    assert sum(writes) == 6  # 3 segments × 2 mid-segment checkpoints, written at the closes
    monkeypatch.setattr(HeldCheckpoints, "hold", lambda *args: False)  # as for a state above HELD_BYTES
    direct = record(tmp_path / "direct.h5", optimizer="adamw")
    assert [(c.index, c.step, c.segment) for c in held.checkpoints] == [
        (c.index, c.step, c.segment) for c in direct.checkpoints
    ]
    assert len(held.checkpoints) == 9
    for checkpoint in held.checkpoints:
        a, b = held.checkpoint_state(checkpoint.index), direct.checkpoint_state(checkpoint.index)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
        for layer in ("net.0", "net.2"):
            torch.testing.assert_close(
                held.checkpoint_preconditioner(checkpoint.index, layer),
                direct.checkpoint_preconditioner(checkpoint.index, layer),
                rtol=0,
                atol=0,
            )
    np.testing.assert_array_equal(held.steps().loss, direct.steps().loss)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight


def test_a_held_copy_keeps_the_state_of_its_step_and_tied_names_stay_one_tensor(tmp_path):
    model = Tied()
    state = model.state_dict()
    held = HeldCheckpoints()
    assert held.hold("000000", state, {"index": 0, "step": 1, "segment": 0, "epoch": 0}, {})
    before = model.embed.weight.detach().clone()
    with torch.no_grad():
        model.embed.weight.add_(1.0)  # training goes on after the checkpoint's step
    (copy,) = held.checkpoints
    torch.testing.assert_close(copy.state["embed.weight"], before)
    assert copy.state["embed.weight"] is copy.state["head.weight"]
    writer = TraceWriter(tmp_path / "t.h5")
    writer.file.create_group("checkpoints")
    held.write(writer, "float32")
    assert held.checkpoints == []
    writer.close()
    with h5py.File(tmp_path / "t.h5", "r") as f:
        group = f["checkpoints/000000"]
        assert group["embed.weight"].id == group["head.weight"].id  # one dataset, two names
        np.testing.assert_array_equal(group["embed.weight"][()], before.numpy())


def test_a_state_above_the_limit_is_not_held():
    weights = {"w": torch.zeros(1024)}  # 4 KiB
    assert not HeldCheckpoints(max_bytes=4095).hold("000000", weights, {}, {})
    held = HeldCheckpoints(max_bytes=4096)
    assert held.hold("000000", weights, {}, {}) and len(held.checkpoints) == 1
