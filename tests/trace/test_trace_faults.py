"""Faults while recording: a full disk, two trainers on one trace, reading a trace while it is written.

The chosen behaviour on a write failure (documented in docs/trace-schema.md, "Trust"): training
continues without the callback, with a loud warning, and the trace keeps every write completed before
the fault (so every segment closed before it), in a state that opens: each write first
reserves its disk space, so a full disk is detected before the write touches the file.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from hostile_traces import attribute, record_base_trace
from test_trace_errors import fit

import lightning_tda.trace.writer
from lightning_tda import Trace, TraceError
from lightning_tda.demo import MLPClassifier
from lightning_tda.recording.checkpoints import HeldCheckpoints
from lightning_tda.scores import Scores
from lightning_tda.trace.lock import lock_path
from lightning_tda.trace.writer import TraceWriter

SCRIPT = Path(__file__).parents[1] / "scripts" / "train_digits.py"


def assert_prefix_of(trace: Trace, reference: Trace, sizes: list[int]) -> None:
    """``trace`` holds exactly the first segments of ``reference`` (and the rows and checkpoints before)."""
    np.testing.assert_array_equal(trace.steps().loss, reference.steps().loss[: trace.num_steps])
    assert [(s.start_step, s.end_step) for s in trace.segments] == [
        (s.start_step, s.end_step) for s in reference.segments[: len(trace.segments)]
    ]
    for segment in trace.segments:
        for layer in trace.layer_names:
            for key, value in trace.kfac_sums(segment.index, layer).items():
                torch.testing.assert_close(value, reference.kfac_sums(segment.index, layer)[key], rtol=0, atol=0)
    assert trace.checkpoints == reference.checkpoints[: len(trace.checkpoints)]
    for checkpoint in trace.checkpoints:
        model = trace.load_checkpoint(MLPClassifier(sizes=sizes), checkpoint.index)
        for key, value in model.state_dict().items():
            assert torch.equal(value, reference.checkpoint_state(checkpoint.index)[key])


def test_a_full_disk_stops_recording_and_keeps_every_closed_segment(tmp_path, monkeypatch):
    """The writer's flush raises ENOSPC at step 6, where the third of four segments ends (after its checkpoint)."""
    fit(tmp_path / "reference.h5", epochs=2, segments=4, every_n_steps=1)
    reserve = lightning_tda.trace.writer.reserve_space

    def disk_full_at_third_segment(file: h5py.File, extra: int = 0) -> None:
        if "segments" in file and len(file["segments"]) == 2 and file["steps/step"].shape[0] == 6:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        reserve(file, extra)

    monkeypatch.setattr(lightning_tda.trace.writer, "reserve_space", disk_full_at_third_segment)
    path = tmp_path / "trace.h5"
    with pytest.warns(UserWarning, match=r"STOPPED RECORDING at optimizer step 6: Writing the trace .* No space left"):
        trainer = fit(path, epochs=2, segments=4, every_n_steps=1)
    assert trainer.global_step == 8  # training went on
    trace = Trace.open(path)
    assert [s.index for s in trace.segments] == [0, 1] and trace.num_steps == 6  # rows up to the last flush
    assert_prefix_of(trace, Trace.open(tmp_path / "reference.h5"), sizes=[64, 16, 10])
    assert not lock_path(path).exists()  # released


def full_disk_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, counted: str, full: Callable[[h5py.File, list], bool], step: int
) -> Trace:
    """Record a reference trace, then the same run whose disk fills (ENOSPC from the space reservation) the first
    time ``full(file, calls)`` holds, ``calls`` being the first arguments of the ``TraceWriter`` method ``counted``
    so far. Recording must stop at optimizer step ``step``; returns the trace, which opens and is a prefix of the
    reference."""
    fit(tmp_path / "reference.h5", epochs=2, segments=4, every_n_steps=1)
    reserve, method, calls, failed = lightning_tda.trace.writer.reserve_space, getattr(TraceWriter, counted), [], []

    def counted_call(self: TraceWriter, first: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(first)
        return method(self, first, *args, **kwargs)

    def disk_full(file: h5py.File, extra: int = 0) -> None:
        if not failed and full(file, calls):
            failed.append(True)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        reserve(file, extra)

    monkeypatch.setattr(TraceWriter, counted, counted_call)
    monkeypatch.setattr(lightning_tda.trace.writer, "reserve_space", disk_full)
    path = tmp_path / "trace.h5"
    stopped = rf"STOPPED RECORDING at optimizer step {step}: Writing the trace .* No space left"
    with pytest.warns(UserWarning, match=stopped):
        fit(path, epochs=2, segments=4, every_n_steps=1)
    trace = Trace.open(path)
    assert_prefix_of(trace, Trace.open(tmp_path / "reference.h5"), sizes=[64, 16, 10])
    return trace


def test_a_full_disk_at_the_step_log_of_a_checkpoint_keeps_a_trace_that_opens(tmp_path, monkeypatch):
    """A checkpoint's step must be in the step log (the reader refuses one past it), so the step log is written
    first: a full disk at the third step-log block (step 3, the middle of segment 1, of a model too large to hold
    its checkpoints until the segment closes) leaves neither that block nor the checkpoint of step 3, and the trace
    opens with segment 0."""
    monkeypatch.setattr(HeldCheckpoints, "hold", lambda *args: False)  # as for a state above HELD_BYTES

    def third_block(file: h5py.File, blocks: list) -> bool:
        return len(blocks) == 3 and "steps" in file and file["steps/step"].shape[0] == 2

    trace = full_disk_run(tmp_path, monkeypatch, "append_steps", third_block, step=3)
    assert [s.index for s in trace.segments] == [0] and trace.num_steps == 2
    assert [c.step for c in trace.checkpoints] == [1, 2]


def test_a_full_disk_at_a_held_checkpoint_keeps_the_rows_before_it(tmp_path, monkeypatch):
    """A small model's mid-segment checkpoint waits in memory for its segment's close, which writes the step rows
    first: a full disk at the held checkpoint of step 3 keeps segment 0 and the rows up to step 4, and the trace
    opens."""
    trace = full_disk_run(tmp_path, monkeypatch, "write_checkpoint", lambda _, names: names[-1:] == ["000002"], step=4)
    assert [s.index for s in trace.segments] == [0] and trace.num_steps == 4
    assert [c.step for c in trace.checkpoints] == [1, 2]


def test_a_full_disk_before_the_first_flush_leaves_no_file(tmp_path, monkeypatch):
    def no_space(file: h5py.File, extra: int = 0) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(lightning_tda.trace.writer, "reserve_space", no_space)
    path = tmp_path / "trace.h5"
    with pytest.warns(UserWarning, match=r"STOPPED RECORDING at optimizer step 0: .* the file keeps nothing"):
        assert fit(path).global_step == 4
    with pytest.raises(TraceError, match="No trace at"):
        Trace.open(path)


def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow
def test_a_file_size_limit_mid_run_keeps_a_trace_that_opens_with_the_closed_segments(tmp_path):
    """A real write failure: the process may not grow any file past a limit (EFBIG, as ENOSPC on a full disk).
    Two training processes (about 20 s): slow; the simulated ENOSPC above takes the same path in-process."""
    reference = run_script(str(tmp_path / "reference.h5"), "--print-sizes", cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-2000:]
    size = {
        int(step): int(n)
        for _, step, n in (line.split() for line in reference.stdout.splitlines() if line.startswith("size"))
    }
    # 8 steps per segment, checkpoints every 4 steps: the file grows at steps 4, 8, 12, 16, ...
    limit = (size[12] + size[16]) // 2  # room for segment 0 and the checkpoint at step 12, not for segment 1
    limited = run_script(str(tmp_path / "trace.h5"), "--file-size-limit", str(limit), cwd=tmp_path)
    assert limited.returncode == 0, limited.stderr[-3000:]
    assert "trained 24 steps" in limited.stdout
    assert "STOPPED RECORDING at optimizer step 16: Writing the trace" in limited.stderr
    assert "File too large" in limited.stderr and "Exception ignored" not in limited.stderr  # failed before HDF5 wrote
    trace = Trace.open(tmp_path / "trace.h5")
    assert [s.index for s in trace.segments] == [0]
    assert [c.step for c in trace.checkpoints] in ([4, 8, 12], [4, 8, 12, 16])  # 16 if its write fit
    assert_prefix_of(trace, Trace.open(tmp_path / "reference.h5"), sizes=[64, 32, 10])


def start_paused_writer(path: Path, cwd: Path, step: int) -> tuple[subprocess.Popen, Path]:
    resume = cwd / "resume"
    command = [sys.executable, str(SCRIPT), str(path), "--pause-at-step", str(step), "--pause-file", str(resume)]
    writer = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not Path(f"{resume}.paused").exists():
        assert writer.poll() is None, writer.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "the writer never reached its pause"
        time.sleep(0.1)
    return writer, resume


def test_a_second_writer_and_readers_are_refused_while_a_trace_is_written(tmp_path, monkeypatch):
    path = tmp_path / "trace.h5"
    writer, resume = start_paused_writer(path, tmp_path, step=10)
    try:
        being_written = rf"The trace {path} is being written by process {writer.pid} on "
        with pytest.raises(TraceError, match=being_written + r".* open it after training ends"):
            Trace.open(path)
        before = path.read_bytes()
        # even where HDF5's own lock is off (network file systems), the second trainer touches nothing
        monkeypatch.setenv("HDF5_USE_FILE_LOCKING", "FALSE")
        with pytest.raises(TraceError, match=being_written + r".* give this run another trace path"):
            fit(path, if_exists="overwrite")
        monkeypatch.setattr(lightning_tda.trace.writer, "WRITE_LOCK_TIMEOUT", 0.2)
        scores = Scores(torch.zeros(1, 3), torch.arange(3), torch.arange(1), "x")
        with pytest.raises(TraceError, match=being_written):
            scores.save(path)
        assert path.read_bytes() == before
    finally:
        resume.touch()
        out, err = writer.communicate(timeout=300)
    assert writer.returncode == 0, err[-2000:]
    trace = Trace.open(path)  # the first writer's trace, complete
    assert trace.num_steps == 24 and [s.end_step for s in trace.segments] == [8, 16, 24]
    assert not lock_path(path).exists()


def test_a_crashed_writer_leaves_no_stale_lock(tmp_path):
    path = tmp_path / "trace.h5"
    killed = run_script(str(path), "--kill-at-step", "10", cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL
    assert lock_path(path).exists()  # the lock file stays, but the kernel released the lock with the process
    assert [s.index for s in Trace.open(path).segments] == [0]
    fit(path, if_exists="overwrite")
    assert Trace.open(path).num_steps == 4


def test_a_cache_write_that_fails_is_warned_about_and_attribution_goes_on(tmp_path, monkeypatch):
    """Found by the fuzzer: HDF5 raised RuntimeError closing a damaged trace after a cache was written into it."""
    path = record_base_trace(tmp_path / "trace.h5")
    expected = attribute(Trace.open(path), cache="none").values

    def cannot_finish(file: h5py.File) -> None:
        raise RuntimeError("Can't decrement id ref count (simulated)")

    monkeypatch.setattr(lightning_tda.trace.writer, "release_reserve", cannot_finish)
    with h5py.File(path, "a") as f:
        del f["cache"]  # so that attributing writes the cache again
    with pytest.warns(UserWarning, match=r"could not be cached \(Writing into .* failed \(Can't decrement"):
        scores = attribute(Trace.open(path), cache="trace")
    torch.testing.assert_close(scores.values, expected)
    assert Trace.open(path).num_steps == 8 and not lock_path(path).exists()
