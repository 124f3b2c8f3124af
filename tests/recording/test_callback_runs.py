"""Runs that do not go straight through: resumed from a checkpoint, killed with SIGKILL, or spread over DDP."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import lightning as L
import numpy as np
import pytest
import torch
from conftest import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_tda import ClassificationTask, TDACallback, Trace
from lightning_tda.demo import MLPClassifier
from lightning_tda.recording.cadence import BudgetCadence, StepTimer
from lightning_tda.recording.segments import CurvatureDrift

SCRIPT = Path(__file__).parents[1] / "scripts" / "train_digits.py"
sys.path.insert(0, str(SCRIPT.parent))
from train_digits import dataset  # noqa: E402


def assert_same_trace(left: Path, right: Path, rtol: float = 0.0, atol: float = 0.0, loss: bool = True) -> None:
    """Same step log, segments, K-FAC sums and checkpoints (up to the given tolerances)."""
    a, b = Trace.open(left), Trace.open(right)
    steps_a, steps_b = a.steps(), b.steps()
    for column in ("step", "global_step", "epoch", "segment", "batch_size", "statistics", "lr"):
        np.testing.assert_array_equal(getattr(steps_a, column), getattr(steps_b, column), err_msg=column)
    if loss:
        np.testing.assert_allclose(steps_a.loss, steps_b.loss, rtol=rtol, atol=atol)
    assert [(s.start_step, s.end_step, s.stats_steps, s.checkpoints) for s in a.segments] == [
        (s.start_step, s.end_step, s.stats_steps, s.checkpoints) for s in b.segments
    ]
    for segment in a.segments:
        for layer in a.layer_names:
            sums_a, sums_b = a.kfac_sums(segment.index, layer), b.kfac_sums(segment.index, layer)
            for key in sums_a:
                # an entry far below the matrix's largest carries the float32 rounding of the largest (the
                # gradients of a 16-example batch round differently from those of a 32-example batch)
                scale = float(sums_a[key].abs().max())
                np.testing.assert_allclose(
                    sums_a[key], sums_b[key], rtol=rtol, atol=atol * max(1.0, scale), err_msg=f"{layer}/{key}"
                )
    assert a.checkpoints == b.checkpoints
    checks = [[(c["verdict"], c["first_step"], c["batches"]) for c in t.loss_checks()] for t in (a, b)]
    assert checks[0] == checks[1] == [("match", 1, 4)]  # one loss check per fit, also across a resume
    for checkpoint in a.checkpoints:
        state_a, state_b = a.checkpoint_state(checkpoint.index), b.checkpoint_state(checkpoint.index)
        for key in state_a:
            torch.testing.assert_close(state_a[key], state_b[key], rtol=rtol, atol=atol)


class CrashAtEpoch(L.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated failure")


def fit_digits(path: Path, callbacks=(), ckpt_path=None, recording=None, **trainer_kwargs) -> None:
    """4 epochs of 8 steps; ``recording``: the callback's options (default: statistics on every step)."""
    L.seed_everything(0, verbose=False)
    options = recording or {"every_n_steps": 1}
    tda = TDACallback(path, task=ClassificationTask(), **options)  # true Fisher: sampled targets
    trainer = quiet_trainer(max_epochs=4, callbacks=[tda, *callbacks], **trainer_kwargs)
    model = MLPClassifier(sizes=[64, 32, 10], lr=0.1)
    trainer.fit(model, DataLoader(dataset(), batch_size=32, shuffle=False), ckpt_path=ckpt_path)


def test_a_resumed_run_writes_the_same_trace_as_an_uninterrupted_one(tmp_path):
    fit_digits(tmp_path / "straight.h5")

    # 8 steps per epoch, segments end after steps 11, 21, 32. Checkpoints after every epoch; the run
    # fails at the start of epoch 3 (step 24), after segment 1 closed; we resume from epoch 1 (step 16),
    # so the trace must drop steps 17-24 and segment 1, and restore the open segment's sums.
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    with pytest.raises(RuntimeError, match="simulated failure"):
        fit_digits(tmp_path / "resumed.h5", callbacks=[checkpoints, CrashAtEpoch(3)], enable_checkpointing=True)
    crashed = Trace.open(tmp_path / "resumed.h5")
    assert crashed.num_steps == 24 and [s.index for s in crashed.segments] == [0, 1]

    fit_digits(tmp_path / "resumed.h5", ckpt_path=tmp_path / "ckpt" / "epoch=1-step=16.ckpt")
    assert_same_trace(tmp_path / "straight.h5", tmp_path / "resumed.h5", rtol=1e-6, atol=1e-9)


def fixed_step_durations(self: StepTimer, step: int, statistics_step: bool) -> None:
    """A deterministic clock for the budget cadence: a plain step takes 1 s, a statistics step 4 s."""
    self._pending.append((step, 0.0, 4.0 if statistics_step else 1.0, statistics_step))


@pytest.mark.parametrize("policy", ["budget", "drift"])
def test_resuming_continues_the_budget_cadence_and_a_drift_policy(tmp_path, monkeypatch, policy):
    """The default cadence (every_n_steps="auto", its timings, credit and plan) and CurvatureDrift (its running
    means) are resumed from the Lightning checkpoint: the resumed trace is the uninterrupted one."""
    monkeypatch.setattr(StepTimer, "stop", fixed_step_durations)
    monkeypatch.setattr(BudgetCadence, "spend", lambda self, seconds: None)  # writes take no time here

    def recording():
        if policy == "budget":  # 3 s extra per statistics step, 0.5 s earned per plain step: every ~7th step
            return {"every_n_steps": "auto", "overhead_budget": 0.5, "min_statistics_steps": 1}
        return {"segments": CurvatureDrift(threshold=0.3, min_steps=2, decay=0.5), "every_n_steps": 1}

    fit_digits(tmp_path / "straight.h5", recording=recording())
    straight = Trace.open(tmp_path / "straight.h5")
    if policy == "budget":  # optional steps were taken beyond the required one per segment
        assert 3 < straight.steps().statistics.sum() < 16
    else:
        reasons = [segment.reason for segment in straight.segments]
        assert reasons.count("drift") >= 2 and any(s.end_step > 16 for s in straight.segments[:-1]), reasons
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    with pytest.raises(RuntimeError, match="simulated failure"):
        fit_digits(
            tmp_path / "resumed.h5", [checkpoints, CrashAtEpoch(3)], recording=recording(), enable_checkpointing=True
        )
    fit_digits(tmp_path / "resumed.h5", ckpt_path=tmp_path / "ckpt" / "epoch=1-step=16.ckpt", recording=recording())
    assert_same_trace(tmp_path / "straight.h5", tmp_path / "resumed.h5", rtol=1e-6, atol=1e-9)


def run_script(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the training script; on a timeout (a hung DDP rank) kill its whole process group and fail."""
    command = [sys.executable, str(SCRIPT), *args]
    with subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            pytest.fail(f"{' '.join(args)} did not finish within {timeout} s (a rank hung?):\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_a_killed_run_leaves_a_trace_with_every_closed_segment(tmp_path):
    full = run_script(str(tmp_path / "full.h5"), cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-2000:]
    killed = run_script(str(tmp_path / "killed.h5"), "--kill-at-step", "20", cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]

    trace, reference = Trace.open(tmp_path / "killed.h5"), Trace.open(tmp_path / "full.h5")
    assert [s.index for s in trace.segments] == [0, 1]  # segments end after steps 8, 16, 24
    assert trace.num_steps >= 16
    np.testing.assert_array_equal(trace.steps().loss, reference.steps().loss[: trace.num_steps])
    for segment in trace.segments:
        for layer in trace.layer_names:
            for key, value in trace.kfac_sums(segment.index, layer).items():
                np.testing.assert_array_equal(value, reference.kfac_sums(segment.index, layer)[key])
        for index in segment.checkpoints:
            model = trace.load_checkpoint(MLPClassifier(sizes=[64, 32, 10]), index)
            for key, value in model.state_dict().items():
                assert torch.equal(value, reference.checkpoint_state(index)[key])


def test_ddp_on_two_processes_matches_one_process_over_the_same_data(tmp_path):
    """Two ranks with 16 examples each see, step by step, the 32 examples one process sees."""
    single = run_script(str(tmp_path / "single.h5"), "--batch-size", "32", cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = run_script(str(tmp_path / "ddp.h5"), "--devices", "2", "--batch-size", "16", cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    assert ddp.stderr.count("TDACallback: trace") == 1  # one writer
    # the loss column is rank 0's own loss (documented), so it is not compared
    assert_same_trace(tmp_path / "single.h5", tmp_path / "ddp.h5", rtol=1e-5, atol=1e-7, loss=False)
    with h5py.File(tmp_path / "ddp.h5", "r") as f:
        assert f["meta"].attrs["world_size"] == 2


def test_ddp_ranks_take_statistics_on_the_same_steps_under_the_overhead_budget(tmp_path):
    """The budget cadence decides on rank 0, from its own timings, at statistics steps and at each optional one it
    confirms: every rank follows (a rank on other steps would wait forever in the statistics' collectives)."""
    ddp = run_script(str(tmp_path / "ddp.h5"), "--devices", "2", "--batch-size", "16", "--budget", "0.5", cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    counts = sorted(line.split(": ", 1)[1] for line in ddp.stdout.splitlines() if line.startswith("rank "))
    assert len(counts) == 2 and counts[0] == counts[1], ddp.stdout
    confirmed = int(counts[0].split()[1].rstrip(","))
    assert confirmed > 0, ddp.stdout  # optional statistics steps were confirmed (and their decision broadcast)
    steps = Trace.open(tmp_path / "ddp.h5").steps()
    assert f"took {int(steps.statistics.sum())} statistics steps" in counts[0]


@pytest.mark.slow
def test_ddp_rank_0_write_failure_neither_hangs_nor_loses_closed_segments(tmp_path):
    """Rank 0's disk fills at step 12 (after segment 0 closed at 8): training finishes on both ranks (no rank waits
    in a collective rank 0 skipped; before the fix rank 0 stopped taking statistics and skipped the cadence's
    broadcast), and the trace keeps segment 0 as one process over the same data records it. Three training
    processes, about a minute on a busy machine: slow."""
    single = run_script(str(tmp_path / "single.h5"), "--batch-size", "32", cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-2000:]
    args = ("--devices", "2", "--batch-size", "16", "--disk-full-after-rows", "12")
    ddp = run_script(str(tmp_path / "ddp.h5"), *args, cwd=tmp_path, timeout=240)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("trained 24 steps") == 2  # both ranks finished every step
    assert "STOPPED RECORDING at optimizer step 12" in ddp.stderr and "No space left" in ddp.stderr
    trace, reference = Trace.open(tmp_path / "ddp.h5"), Trace.open(tmp_path / "single.h5")
    assert [(s.start_step, s.end_step) for s in trace.segments] == [(0, 8)]
    assert [c.step for c in trace.checkpoints] in ([4, 8], [4, 8, 12])  # 12 if its write completed
    for layer in trace.layer_names:
        for key, value in trace.kfac_sums(0, layer).items():
            torch.testing.assert_close(value, reference.kfac_sums(0, layer)[key], rtol=1e-5, atol=1e-7)


def test_two_recorders_in_one_trainer_resume_independently(tmp_path):
    """Each recorder keeps its resume state under its own key (its trace path): resuming continues both traces."""
    from torch.utils.data import TensorDataset

    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(96, 64, generator=generator), torch.randint(0, 10, (96,), generator=generator))

    def recorders() -> list[TDACallback]:
        task = ClassificationTask()
        return [
            TDACallback(str(tmp_path / "all.h5"), task, every_n_steps=1, segments=[4], loss_check_steps=0),
            TDACallback(str(tmp_path / "head.h5"), task, layers=["net.2"], every_n_steps=2, loss_check_steps=0),
        ]

    def run(epochs: int, ckpt_path=None) -> list[TDACallback]:
        L.seed_everything(0, verbose=False)
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
        callbacks = recorders()
        trainer = quiet_trainer(max_epochs=epochs, callbacks=[*callbacks, saver], enable_checkpointing=True)
        trainer.fit(MLPClassifier(sizes=[64, 16, 10]), DataLoader(data, batch_size=16), ckpt_path=ckpt_path)
        return callbacks

    first = run(1)  # 6 steps
    assert first[0].state_key != first[1].state_key and str(tmp_path / "head.h5") in first[1].state_key
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"]
    assert {saved[c.state_key]["run_id"] for c in first} == {c.run_id for c in first}  # both kept, not one twice
    second = run(2, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    for before, after in zip(first, second):
        trace = Trace.open(after.path)
        assert after.run_id == before.run_id == trace.run_id
        assert len(trace.steps()) == 12 and trace.segments[-1].end_step == 12  # continued, not restarted
    assert Trace.open(second[1].path).layer_names == ["net.2"]


@pytest.mark.parametrize("trace", ["another run's", "gone"])
def test_resuming_with_a_trace_that_is_not_the_runs_own_is_refused_with_the_fix(trace, tmp_path):
    from torch.utils.data import TensorDataset

    generator = torch.Generator().manual_seed(0)
    data = DataLoader(
        TensorDataset(torch.randn(48, 64, generator=generator), torch.randint(0, 10, (48,), generator=generator)),
        batch_size=16,
    )

    def run(path: Path, epochs: int, ckpt_path=None) -> None:
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
        callback = TDACallback(str(path), ClassificationTask(), loss_check_steps=0)
        trainer = quiet_trainer(max_epochs=epochs, callbacks=[callback, saver], enable_checkpointing=True)
        trainer.fit(MLPClassifier(sizes=[64, 16, 10]), data, ckpt_path=ckpt_path)

    path = tmp_path / "trace.h5"
    run(path, 1)
    if trace == "gone":
        path.unlink()
    else:  # the path now holds the trace of another run (recorded without resuming)
        path.unlink()
        L.seed_everything(1, verbose=False)
        quiet_trainer(max_epochs=1, callbacks=[TDACallback(str(path), ClassificationTask())]).fit(
            MLPClassifier(sizes=[64, 16, 10]), data
        )
    before = (Trace.open(path).run_id, len(Trace.open(path).steps())) if path.exists() else None
    expected = "is gone (moved or deleted)" if trace == "gone" else "belongs to run"
    with pytest.raises(RuntimeError, match=re.escape(expected)) as error:
        run(path, 2, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert "Resume (or continue) with the trace path of the original run." in str(error.value)
    after = (Trace.open(path).run_id, len(Trace.open(path).steps())) if path.exists() else None
    assert after == before  # the other run's trace is untouched; a gone one is not created anew
