"""Timeline reports read back from where they were written: the offline W&B run (timeline table, line
charts, the queries table's support_segment column, per-segment histograms), the HTML page (a sentence and
a chart per query), CSV and TensorBoard.

The timeline splits real scores (signed cosine similarity of digits) over three segments with known
per-query weights, so which segment carried each query's support is known in advance.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import similarity_scores
from html_reader import ReportParser
from wandb_reader import OfflineRun

from lightning_tda import ClassificationTask, Scores, Timeline
from lightning_tda.demo import DigitsDataModule
from lightning_tda.reporting import ImageRenderer, WandbReporter, build_report, log_to_logger, write_reports
from lightning_tda.reporting.wandb_report import TIMELINE_COLUMNS, table_columns

K = 3
QUERY_IDS = [3, 1, 4, 15]
STEPS = [[1, 40], [41, 80], [81, 120]]
PHASES = ["warm-up", "constant rate", "decay"]


@pytest.fixture(scope="module")
def timeline_case():
    dm = DigitsDataModule(batch_size=64, seed=0)
    dm.setup()
    train, test = dm.train_set, dm.test_set
    totals = similarity_scores(train, test, QUERY_IDS)
    # query q's scores come from the segments with weights w[q] (rows sum to 1): its support segment is argmax w[q]
    weights = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.15, 0.25, 0.6]])
    values = weights.T[:, :, None] * totals[None]
    timeline = Timeline(
        values,
        totals,
        torch.arange(len(train)),
        torch.tensor(QUERY_IDS),
        torch.arange(3),
        torch.tensor(STEPS),
        torch.tensor([[0, 2], [2, 5], [5, 7]]),
        torch.tensor([0.05, 0.1, 0.04], dtype=torch.float64),
        PHASES,
        3,
        "similarity",
        {"unit": "cosine"},
    )
    content = build_report(
        [timeline.total()],
        test,
        train,
        task=ClassificationTask(),
        k=K,
        renderer=ImageRenderer(shape=[8, 8]),
        timelines=[timeline],
    )
    return {"content": content, "timeline": timeline, "weights": weights, "totals": totals}


def test_content_names_the_segment_that_carried_each_querys_support(timeline_case):
    (section,) = timeline_case["content"].methods
    weights, totals = timeline_case["weights"], timeline_case["totals"]
    assert section.timeline is not None and section.timeline.labels[2] == (
        "steps 81–120 (segment 3 of 3, during the decay)"
    )
    for row, (view, when) in enumerate(zip(section.queries, section.timeline.queries)):
        assert when.helpful_ids == [e.id for e in view.helpful] and when.harmful_ids == [e.id for e in view.harmful]
        expected = weights[row, :, None].numpy() * totals[row, when.helpful_ids].numpy()[None]
        np.testing.assert_allclose(when.helpful, expected, rtol=1e-6)
        assert when.support_segment == int(weights[row].argmax())
        assert when.support_share == pytest.approx(float(weights[row].max()), rel=1e-5)
        label = section.timeline.labels[when.support_segment]
        assert when.sentence.startswith(f"Most of its support came from {label}: {weights[row].max():.0%}")


def test_wandb_run_holds_the_timeline_table_charts_column_and_histograms(timeline_case, tmp_path):
    written = write_reports(timeline_case["content"], wandb=WandbReporter(project="tests", save_dir=str(tmp_path)))
    run = OfflineRun.read(written.wandb.run_dir)
    weights = timeline_case["weights"]
    (section,) = timeline_case["content"].methods

    table = run.table("tda/similarity/timeline")
    assert table["columns"] == TIMELINE_COLUMNS and len(table["data"]) == len(QUERY_IDS) * 2 * K * 3
    rows = [dict(zip(TIMELINE_COLUMNS, row)) for row in table["data"]]
    for row, view in enumerate(section.queries):
        first = view.helpful[0]
        mine = [r for r in rows if r["query_id"] == view.query.id and r["train_id"] == first.id]
        assert [r["segment"] for r in mine] == [1, 2, 3] and {r["role"] for r in mine} == {"proponent"}
        assert [[r["first_step"], r["last_step"]] for r in mine] == STEPS
        np.testing.assert_allclose([r["score"] for r in mine], weights[row].numpy() * first.score, rtol=1e-5)

    queries = run.table("tda/similarity/queries")
    assert queries["columns"] == table_columns(K, timeline=True)
    supports = [row[-1] for row in queries["data"]]
    assert supports == [section.timeline.short_label(int(w.argmax())) for w in weights]
    assert supports[0] == "segment 1 (steps 1–40)"

    chart = run.table(f"tda/similarity/timeline_query_{QUERY_IDS[0]}_table")
    assert len(chart["data"]) == 2 * K * 3  # (lineKey, step, score) for each shown example and segment
    for segment in (1, 2, 3):
        histogram = run.logged(f"tda/similarity/timeline_segment_{segment}")
        assert histogram["_type"] == "histogram" and sum(histogram["values"]) == timeline_case["totals"].numel()


def test_html_has_a_sentence_and_a_chart_per_query(timeline_case, tmp_path):
    html = write_reports(timeline_case["content"], html=tmp_path / "report.html", wandb=False).html.read_text()
    parser = ReportParser()
    parser.feed(html)
    assert len(parser.queries) == len(QUERY_IDS) and parser.external == []
    assert len(re.findall(r'<img class="figure timeline"', html)) == len(QUERY_IDS) + 1  # + the histograms
    supports = [int(s) for s in re.findall(r'<p class="timeline" data-support-segment="(\d+)"', html)]
    assert supports == [int(w.argmax()) for w in timeline_case["weights"]]
    assert "Most of its support came from steps 1–40 (segment 1 of 3, during the warm-up): 70%" in html
    assert "steps 41–80 (segment 2 of 3, at a constant rate)" in html


def test_csv_and_tensorboard_get_the_timeline(timeline_case, tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    content = timeline_case["content"]
    logger = CSVLogger(str(tmp_path), name="csv")
    log_to_logger(content, logger)
    directory = Path(logger.log_dir) / "tda"
    with open(directory / "similarity_timeline.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == TIMELINE_COLUMNS and len(rows) == 1 + len(QUERY_IDS) * 2 * K * 3
    figures = {p.name for p in directory.glob("*.png")}
    assert {f"similarity_timeline_query_{q}.png" for q in QUERY_IDS} | {"similarity_timeline_histogram.png"} <= figures

    board = TensorBoardLogger(str(tmp_path), name="tb")
    log_to_logger(content, board)
    tags = EventAccumulator(board.log_dir, size_guidance={"images": 0, "tensors": 0}).Reload().Tags()
    assert {f"tda/similarity/timeline_query_{q}" for q in QUERY_IDS} <= set(tags["images"])
    assert {f"tda/similarity/timeline_segment_{s}" for s in (1, 2, 3)} <= set(tags["histograms"])


def test_a_timeline_for_other_data_is_refused(timeline_case):
    timeline = timeline_case["timeline"]
    other = Scores(timeline.totals[:, :100], torch.arange(100), timeline.query_ids, "similarity")
    dm = DigitsDataModule(batch_size=64, seed=0)
    dm.setup()
    with pytest.raises(ValueError, match="covers other queries or training examples"):
        build_report([other], dm.test_set, dm.train_set, k=K, timelines=[timeline])
