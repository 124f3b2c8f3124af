"""Fuzzing the trace reader: every mutated copy of a valid trace works or raises the documented errors.

A valid small trace (a tiny Adam MLP: segments, checkpoints, Adam second moments, a SOURCE cache and
saved scores) is mutated 200 times with a fixed seed (``hostile_traces.mutate``: flipped
bytes, deleted and resized datasets, attributes and JSON rewritten with random values, swapped dtypes,
links and virtual datasets pointing out of the file, NaN/Inf/negative/asymmetric values). A child
process opens, inspects, reads every tensor and checkpoint, reads scores and caches, and attributes
(every 5th case) for each copy: any exception other than ``TraceError``/``ValueError`` fails the test.
The child runs with its address space capped (``MEMORY_MB`` beyond what it maps once its imports are done,
so a CUDA build of torch fits) and a per-case alarm, so an allocation sized by a number
in the file, a hang or a segfault in HDF5 shows up as a failed case (the child is restarted after it).
The parent writes cases while the child works through them (two cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
from hostile_traces import exercise, mutate, record_base_trace

SEED = 13
CASES = 200
MEMORY_MB = 2000  # address space the child may add after its imports
SECONDS_PER_CASE = 30
BUDGET_SECONDS = 300  # a hard stop far above a normal run (about 25 s of CPU time in all)
SCRIPT = Path(__file__).parents[1] / "hostile_traces.py"


def _start(cases: Path, first: int) -> tuple[subprocess.Popen, Path]:
    log = cases / f"child-from-{first}.log"
    command = [sys.executable, str(SCRIPT), str(cases), str(first), str(MEMORY_MB), str(SECONDS_PER_CASE)]
    with open(log, "w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    return child, log


def _read_log(log: Path) -> tuple[dict[int, list], int | None]:
    """Finished cases and the case started but not finished (if any)."""
    done, started = {}, None
    for line in log.read_text().splitlines():
        if line.startswith("START "):
            started = int(line.split()[1])
        elif line.startswith("DONE "):
            _, index, outcomes = line.split(" ", 2)
            done[int(index)] = json.loads(outcomes)
            started = None
    return done, started


def test_mutated_traces_work_or_raise_documented_errors(tmp_path):
    base = record_base_trace(tmp_path / "base.h5")
    assert {outcome for _, outcome in exercise(base)} == {"ok"}  # the unmutated trace works throughout
    outside = tmp_path / "outside.h5"  # what external links and virtual datasets point at
    with h5py.File(outside, "w") as f:
        f["x"] = np.arange(100.0)
    cases = tmp_path / "cases"
    cases.mkdir()

    deadline = time.monotonic() + BUDGET_SECONDS
    child, log = _start(cases, 0)
    described, outcomes, crashes = {}, {}, {}
    try:
        for index in range(CASES):
            staging = cases / f"staging_{index}.h5"
            described[index] = mutate(base, staging, SEED * 100_000 + index, outside)
            staging.rename(cases / f"case_{index:04d}.h5")
        (cases / "all-written").touch()
        while True:
            child.wait(timeout=max(1.0, deadline - time.monotonic()))
            done, unfinished = _read_log(log)
            outcomes.update(done)
            if child.returncode == 0:
                break
            assert unfinished is not None, f"the fuzz child failed outside a case:\n{log.read_text()[-3000:]}"
            crashes[unfinished] = f"child died with status {child.returncode} (signal if negative)"
            child, log = _start(cases, unfinished + 1)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()

    failures = [
        f"case {index} ({described[index]}): {operation}: {outcome}"
        for index, case_outcomes in sorted(outcomes.items())
        for operation, outcome in case_outcomes
        if outcome.startswith("UNDOCUMENTED")
    ] + [f"case {index} ({described[index]}): {what}" for index, what in crashes.items()]
    assert not failures, "\n".join(failures)
    assert len(outcomes) == CASES
    # the mutations reach past the first check: many copies open, some attribute, many are refused
    opened = sum(dict(o).get("open") == "ok" for o in outcomes.values())
    attributed = sum(dict(o).get("attribute") == "ok" for o in outcomes.values())
    refused = sum(any(outcome.startswith("error") for _, outcome in o) for o in outcomes.values())
    assert opened >= CASES // 4 and refused >= CASES // 4 and attributed >= CASES // 20, (opened, refused, attributed)
