"""Bad input to the callback and the trace reader: each a clear error or warning, nothing recorded is lost."""

from __future__ import annotations

import shutil

import h5py
import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_tda import ClassificationTask, TDACallback, Trace, TraceError
from lightning_tda.demo import MLPClassifier
from lightning_tda.trace import SCHEMA_VERSION


def small_data(n: int = 64, nan_at: int | None = None) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 64, generator=generator)
    if nan_at is not None:
        x[nan_at] = float("nan")
    return DataLoader(TensorDataset(x, torch.randint(0, 10, (n,), generator=generator)), batch_size=16)


def fit(path, epochs: int = 1, data: DataLoader | None = None, model=None, **callback_kwargs) -> L.Trainer:
    L.seed_everything(0, verbose=False)
    trainer = quiet_trainer(
        max_epochs=epochs, callbacks=[TDACallback(path, task=ClassificationTask(), **callback_kwargs)]
    )
    trainer.fit(model or MLPClassifier(sizes=[64, 16, 10]), data or small_data())
    return trainer


@pytest.fixture
def trace_path(tmp_path):
    path = tmp_path / "trace.h5"
    fit(path)
    return path


def test_opening_something_that_is_not_a_trace(tmp_path, trace_path):
    with pytest.raises(TraceError, match="No trace at"):
        Trace.open(tmp_path / "missing.h5")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(TraceError, match="not an HDF5 file"):
        Trace.open(tmp_path / "notes.txt")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(TraceError, match="not a lightning_tda trace"):
        Trace.open(tmp_path / "other.h5")
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(trace_path.read_bytes()[:2048])
    with pytest.raises(TraceError, match=r"truncated|incomplete|could not be opened"):
        Trace.open(truncated)


def test_a_schema_from_the_future_asks_for_an_upgrade(tmp_path, trace_path):
    future = tmp_path / "future.h5"
    shutil.copy(trace_path, future)
    with h5py.File(future, "a") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(TraceError, match="Upgrade lightning_tda"):
        Trace.open(future)


def test_a_trace_of_another_architecture_is_refused(trace_path):
    trace = Trace.open(trace_path)
    with pytest.raises(TraceError, match="shape"):
        trace.tracked_layers(MLPClassifier(sizes=[64, 32, 10]))
    with pytest.raises(TraceError, match="does not exist in the model"):
        trace.tracked_layers(MLPClassifier(sizes=[64, 10]))
    with pytest.raises(TraceError, match="does not fit the given model"):
        trace.load_checkpoint(MLPClassifier(sizes=[64, 32, 10]), 0)


def test_an_existing_trace_is_never_silently_overwritten(trace_path):
    before = trace_path.read_bytes()
    with pytest.raises(TraceError, match="if_exists='overwrite'"):
        fit(trace_path)
    assert trace_path.read_bytes() == before

    fit(trace_path, if_exists="append")  # a second stage continues the same trace
    trace = Trace.open(trace_path)
    assert trace.num_steps == 8 and [s.index for s in trace.segments] == [0, 1, 2, 3, 4, 5]
    np.testing.assert_array_equal(trace.steps().step, np.arange(1, 9))
    assert trace.segments[3].start_step == 4 and trace.segments[-1].end_step == 8

    fit(trace_path, if_exists="overwrite")
    assert Trace.open(trace_path).num_steps == 4


def test_an_unwritable_trace_directory_is_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(TraceError, match="Choose a writable path"):
        fit(blocker / "trace.h5")


def test_nonfinite_statistics_skip_the_step_count_it_and_warn_once(tmp_path):
    path = tmp_path / "trace.h5"
    with pytest.warns(UserWarning, match="NaN/Inf in the K-FAC statistics"):
        fit(path, data=small_data(nan_at=50), segments=1, every_n_steps=1)  # batch 3 of 4 holds a NaN
    segment = Trace.open(path).segments[0]
    assert (segment.stats_steps, segment.skipped_steps) == (4, 1)
    for layer in Trace.open(path).layer_names:
        assert all(torch.isfinite(t).all() for t in Trace.open(path).kfac_sums(0, layer).values())


def test_a_run_without_optimizer_steps_warns_and_writes_nothing(tmp_path):
    path = tmp_path / "trace.h5"
    with pytest.warns(UserWarning, match="made no optimizer step"):
        quiet_trainer(max_steps=0, callbacks=[TDACallback(path, task=ClassificationTask())]).fit(
            MLPClassifier(sizes=[64, 16, 10]), small_data(16)
        )
    with pytest.raises(TraceError, match="No trace at"):
        Trace.open(path)


def test_bad_callback_arguments_and_manual_optimization(tmp_path):
    task = ClassificationTask()
    for kwargs, message in (
        ({"fisher": "exact"}, "use 'true' or 'empirical'"),
        ({"every_n_steps": 0}, "positive integer"),
        ({"checkpoints_per_segment": 0}, "at least 1"),
        ({"checkpoint_dtype": "int8"}, "float16"),
        ({"if_exists": "replace"}, "overwrite"),
        ({"segments": "three"}, "SegmentPolicy"),
        ({"segments": [5, 3]}, "increasing"),
    ):
        with pytest.raises((ValueError, TypeError), match=message):
            TDACallback(tmp_path / "t.h5", task=task, **kwargs)

    class Manual(MLPClassifier):
        def __init__(self):
            super().__init__(sizes=[64, 10])
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(F.cross_entropy(self(batch[0]), batch[1]))
            opt.step()

    with pytest.raises(RuntimeError, match="automatic optimization only"):
        fit(tmp_path / "manual.h5", model=Manual())


def test_mixed_precision_and_checkpoint_dtypes(tmp_path):
    path = tmp_path / "trace.h5"
    L.seed_everything(0, verbose=False)
    model = MLPClassifier(sizes=[64, 16, 10])
    callback = TDACallback(path, task=ClassificationTask(), checkpoint_dtype="bfloat16", every_n_steps=1)
    quiet_trainer(max_epochs=2, precision="bf16-mixed", callbacks=[callback]).fit(model, small_data())
    trace = Trace.open(path)
    assert trace.meta["precision"] == "bf16-mixed"
    for segment in trace.segments:
        for layer in trace.layer_names:
            A, S = trace.covariances(segment.index, layer)
            assert A.dtype == S.dtype == torch.float64 and torch.isfinite(A).all() and torch.isfinite(S).all()
    restored = trace.checkpoint_state(trace.final_checkpoint.index)
    for key, value in model.state_dict().items():
        assert restored[key].dtype == value.dtype
        torch.testing.assert_close(restored[key], value, rtol=1e-2, atol=1e-2)  # bfloat16 storage
