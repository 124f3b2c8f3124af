"""From W&B back to scores: the ``tda-trace`` artifact a report logs is enough to attribute again elsewhere."""

from __future__ import annotations

import base64
import hashlib
import shutil
from pathlib import Path

import torch
from hostile_traces import attribute, data, model, record_base_trace, task
from wandb_reader import OfflineRun, find_runs

from lightning_tda import Trace
from lightning_tda.reporting import WandbReporter, build_report, write_reports
from lightning_tda.scores import Scores


def test_the_logged_trace_artifact_is_enough_to_attribute_again(tmp_path):
    trace_path = record_base_trace(tmp_path / "run" / "trace.h5")  # SOURCE scores saved under results/
    scores = Scores.load(trace_path, "source")
    train, queries = data()
    content = build_report(scores, queries, train, model=model(), task=task(), k=3, trace_path=trace_path)
    write_reports(content, wandb=WandbReporter(project="tests", save_dir=str(tmp_path / "wandb")))

    (run_dir,) = find_runs(tmp_path / "wandb")
    entry = OfflineRun.read(run_dir).artifact("tda-trace")["files"]["trace.h5"]
    logged = Path(entry.local_path)  # the copy wandb staged for upload, checked against the manifest
    assert base64.b64encode(hashlib.md5(logged.read_bytes()).digest()).decode() == entry.digest
    elsewhere = tmp_path / "elsewhere" / "downloaded.h5"
    elsewhere.parent.mkdir()
    shutil.copy(logged, elsewhere)
    shutil.rmtree(tmp_path / "run")  # nothing of the original run is left

    trace = Trace.open(elsewhere)
    again = Scores.load(elsewhere, "source")
    assert torch.equal(again.values, scores.values) and torch.equal(again.train_ids, scores.train_ids)
    assert torch.equal(again.query_ids, scores.query_ids) and again.config == scores.config
    # attributing from the downloaded trace alone, with the curvature fitted afresh (its cache not used)
    torch.testing.assert_close(attribute(trace, cache="none").values, scores.values, rtol=1e-5, atol=1e-7)
