"""Reports read back from where they were written: the offline W&B run, CSV/TensorBoard logs, the
HTML page (parsed, and rendered by a real headless Chromium).

The scores are built here from real data (signed cosine similarity of digits, per-example losses of
the trained fixture model as self-influence) so the reporters are tested independently of the
attribution methods; the CLI tests cover the methods end to end.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import similarity_scores
from html_reader import ReportParser
from wandb_reader import OfflineRun, find_runs

from lightning_tda import ClassificationTask, RegressionTask, Scores, Trace
from lightning_tda.demo import ConcreteDataModule, DigitsDataModule
from lightning_tda.recording.cost import combined_cost
from lightning_tda.reporting import (
    AutoRenderer,
    ImageRenderer,
    TabularRenderer,
    TextRenderer,
    WandbReporter,
    build_report,
    log_to_logger,
    write_html_report,
    write_reports,
)
from lightning_tda.reporting.wandb_report import SELF_COLUMNS, table_columns
from lightning_tda.trace.records import cost_percent

K = 4
QUERY_IDS = [3, 1, 4, 15, 9]
SELF_TOP = 20
UNIT = "cosine similarity of the pixels, negated across labels"
WARNING = "similarity is not attribution; prefer SOURCE or TracInCP"


@pytest.fixture(scope="module")
def report_case(digits_run, tmp_path_factory):
    """Digits with 5% flipped training labels (same split as the fixture run), real scores, a trace copy."""
    dm = DigitsDataModule(batch_size=64, seed=0, flip_fraction=0.05)
    dm.setup()
    train, test = dm.train_set, dm.test_set
    values = similarity_scores(train, test, QUERY_IDS)
    config = {"kind": "cosine", "unit": UNIT, "warnings": [WARNING]}
    pairwise = Scores(values, torch.arange(len(train)), torch.tensor(QUERY_IDS), "similarity", config)
    model = digits_run["final_model"].eval()
    with torch.no_grad():
        losses = F.cross_entropy(model(train.tensors[0]), train.tensors[1], reduction="none")
    self_scores = Scores(losses, torch.arange(len(train)), None, "similarity", kind="self")
    trace = tmp_path_factory.mktemp("report") / "trace.h5"
    shutil.copy(digits_run["path"], trace)
    pairwise.save(trace)
    self_scores.save(trace)
    content = build_report(
        [pairwise, self_scores],
        test,
        train,
        model=model,
        task=ClassificationTask(),
        k=K,
        renderer=ImageRenderer(shape=[8, 8]),
        noisy=dm.flipped,
        self_top=SELF_TOP,
        trace_path=trace,
    )
    return {"content": content, "pairwise": pairwise, "self": self_scores, "dm": dm, "trace": trace}


# ------------------------------------------------------------------------------------ renderers
def test_renderers_default_to_sensible_views():
    digit = torch.linspace(0, 1, 64)
    image = ImageRenderer(shape=[8, 8])(digit)
    assert image.image.shape == (64, 64) and image.image.dtype == np.uint8
    assert image.image.min() == 0 and image.image.max() == 255
    assert image.image[0, 0] == 255 and image.image[-1, -1] == 0  # low values light, high values dark
    rgb = ImageRenderer(invert=False)(torch.rand(3, 16, 16))
    assert rgb.image.shape == (64, 64, 3)

    class Tokenizer:
        def decode(self, ids):
            return "".join(chr(ord("a") + i) for i in ids)

    assert TextRenderer(tokenizer=Tokenizer(), ignore_ids=[0])(torch.tensor([1, 2, 0, 0])).text == "bc"
    assert TextRenderer(vocabulary=["<pad>", "the", "cat"])(torch.tensor([1, 2])).text == "the cat"
    row = TabularRenderer(feature_names=["cement", "water"])(torch.tensor([1.23456, -0.5]))
    assert row.text == "cement=1.23, water=-0.5" and row.image is None

    auto = AutoRenderer()
    assert auto(torch.tensor([5, 6])).text == "ids 5 6"
    assert auto(torch.rand(1, 8, 8)).image is not None
    assert auto(torch.rand(8)).image is None and "x7=" in auto(torch.rand(8)).text


def test_renderers_reject_inputs_they_cannot_show():
    with pytest.raises(ValueError, match=r"cannot reshape an input of 10 values"):
        ImageRenderer(shape=[8, 8])(torch.rand(10))
    with pytest.raises(ValueError, match=r"pass shape=\[H, W\]"):
        ImageRenderer()(torch.rand(64))
    with pytest.raises(ValueError, match="2 feature names for rows of 3 values"):
        TabularRenderer(feature_names=["a", "b"])(torch.rand(3))
    with pytest.raises(ValueError, match="needs an object with decode"):
        TextRenderer(tokenizer="gpt2")


# --------------------------------------------------------------------------------- the content
def test_report_content_ranks_helpful_and_harmful_examples(report_case):
    content, pairwise, dm = report_case["content"], report_case["pairwise"], report_case["dm"]
    (section,) = content.methods
    assert [view.query.id for view in section.queries] == QUERY_IDS
    labels = dm.train_set.tensors[1]
    for row, view in enumerate(section.queries):
        expected_top = pairwise.values[row].topk(K).indices.tolist()
        expected_bottom = pairwise.values[row].topk(K, largest=False).indices.tolist()
        assert [e.id for e in view.helpful] == expected_top
        assert [e.id for e in view.harmful] == expected_bottom
        assert all(e.score > 0 for e in view.helpful) and all(e.score < 0 for e in view.harmful)
        # signed similarity: helpful examples share the query's label, harmful ones do not
        assert all(e.label == view.query.label for e in view.helpful)
        assert all(e.label == str(int(labels[e.id])) for e in view.helpful + view.harmful)
        assert all(e.noisy == bool(dm.flipped[e.id]) for e in view.helpful + view.harmful)
        assert view.query.prediction.split(" ")[0].isdigit() and np.isfinite(view.query.loss)


def test_self_influence_ranking_puts_flipped_labels_first(report_case):
    (section,) = report_case["content"].self_influence
    scores = [e.score for e in section.ranking]
    assert len(scores) == SELF_TOP and scores == sorted(scores, reverse=True)
    # the model was trained on clean labels, so the flipped ones have the largest losses
    assert section.noisy_total == int(report_case["dm"].flipped.sum())
    assert section.noisy_in_top >= 0.8 * SELF_TOP


# ----------------------------------------------------------------------------------------- W&B
def test_wandb_run_holds_tables_histograms_and_trace_artifact(report_case, tmp_path):
    content, pairwise = report_case["content"], report_case["pairwise"]
    written = write_reports(content, wandb=WandbReporter(project="tests", save_dir=str(tmp_path)))
    assert written.wandb.offline and written.wandb.sync_command == f"wandb sync {written.wandb.run_dir}"
    (run_dir,) = find_runs(tmp_path)
    assert run_dir == written.wandb.run_dir
    run = OfflineRun.read(run_dir)

    table = run.table("tda/similarity/queries")
    assert table["columns"] == table_columns(K)
    assert len(table["data"]) == len(QUERY_IDS) and run.logged("tda/similarity/queries")["nrows"] == len(QUERY_IDS)
    column = {name: [row[i] for row in table["data"]] for i, name in enumerate(table["columns"])}
    assert column["query_id"] == QUERY_IDS
    assert column["helpful_1_id"] == pairwise.values.argmax(dim=1).tolist()
    assert column["harmful_1_id"] == pairwise.values.argmin(dim=1).tolist()
    np.testing.assert_allclose(column["helpful_1_score"], pairwise.values.max(dim=1).values, rtol=1e-6)
    images = run.artifact("run_table")  # wandb keeps a table's images in an artifact of its own
    pngs = [path for path in images["files"] if path.endswith(".png")]
    assert len(pngs) >= len(QUERY_IDS) + K

    histogram = run.logged("tda/similarity/scores")
    assert histogram["_type"] == "histogram" and sum(histogram["values"]) == pairwise.values.numel()
    assert histogram["bins"][0] <= float(pairwise.values.min()) and histogram["bins"][-1] >= float(
        pairwise.values.max()
    )

    ranking = run.table("tda/similarity/self_influence")
    assert ranking["columns"] == SELF_COLUMNS and len(ranking["data"]) == SELF_TOP
    assert [row[1] for row in ranking["data"]] == report_case["self"].values.topk(SELF_TOP).indices.tolist()

    artifact = run.artifact("tda-trace")
    trace = report_case["trace"]
    assert set(artifact["files"]) == {"trace.h5"}
    assert artifact["files"]["trace.h5"].size == trace.stat().st_size
    assert artifact["metadata"]["methods"] == ["similarity"]
    assert run.summary["tda/similarity/mean_score"] == pytest.approx(float(pairwise.values.mean()), rel=1e-5)
    assert run.summary["tda/similarity/unit"] == UNIT and run.summary["tda/similarity/warnings"] == WARNING
    cost = combined_cost(Trace.open(trace).recording_costs())  # what recording the trace cost
    assert run.summary["tda/recording/seconds"] == pytest.approx(sum(cost["seconds"].values()))
    assert run.summary["tda/recording/statistics_seconds"] == pytest.approx(cost["seconds"]["statistics"])
    assert run.summary["tda/recording/percent_of_training"] == pytest.approx(cost_percent(cost))


def test_wandb_report_goes_into_the_wandb_logger_run(report_case, tmp_path):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(project="tests", save_dir=str(tmp_path), offline=True)
    run_id = logger.experiment.id
    logger.log_metrics({"train_loss": 0.5}, step=0)
    written = write_reports(report_case["content"], loggers=[logger])
    assert written.wandb.run_id == run_id
    wandb.finish()
    (run_dir,) = find_runs(tmp_path)  # one run holds training metrics and the report
    run = OfflineRun.read(run_dir)
    assert run.logged("train_loss") == 0.5
    assert len(run.table("tda/similarity/queries")["data"]) == len(QUERY_IDS)
    assert run.artifact("tda-trace")["files"]["trace.h5"].size == report_case["trace"].stat().st_size


def test_only_rank_zero_writes(report_case, tmp_path, monkeypatch):
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert (
        write_reports(report_case["content"], html=tmp_path / "r.html", wandb=WandbReporter(save_dir=str(tmp_path)))
        is None
    )
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------- other loggers
def test_csv_logger_gets_tables_figures_and_scalars(report_case, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(str(tmp_path), name="csv")
    where = log_to_logger(report_case["content"], logger)
    directory = Path(logger.log_dir) / "tda"
    assert where == f"CSV: {directory}"
    with open(directory / "similarity_queries.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == table_columns(K) and [int(r[0]) for r in rows[1:]] == QUERY_IDS
    with open(directory / "similarity_self_influence.csv", newline="") as handle:
        assert len(list(csv.reader(handle))) == SELF_TOP + 1
    figures = sorted(p.name for p in directory.glob("*.png"))
    assert {f"similarity_query_{q}.png" for q in QUERY_IDS} <= set(figures)
    assert "similarity_scores_histogram.png" in figures
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as handle:
        metrics = list(csv.DictReader(handle))
    assert float(metrics[0]["tda/similarity/mean_score"]) == pytest.approx(float(report_case["pairwise"].values.mean()))


def test_tensorboard_logger_gets_text_images_histograms_and_scalars(report_case, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is in the dev extra: pip install -e '.[dev]'")
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    log_to_logger(report_case["content"], logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "tensors": 0}).Reload()
    tags = events.Tags()
    assert {f"tda/similarity/query_{q}" for q in QUERY_IDS} <= set(tags["images"])
    assert "tda/similarity/scores" in tags["histograms"]
    assert "tda/similarity/mean_score" in tags["scalars"]
    text = [t for t in tags["tensors"] if t.startswith("tda/similarity_queries")]
    assert text, tags["tensors"]
    table = events.Tensors(text[0])[0].tensor_proto.string_val[0].decode()
    assert table.count("\n") == len(QUERY_IDS) + 1 and "helpful_1_id" in table


def test_mlflow_logger_gets_tables_figures_notes_and_metrics(report_case, tmp_path, monkeypatch):
    """A local file store (no server): the tables as CSV artifacts, the figures as PNGs, the scalars as metrics."""
    pytest.importorskip("mlflow", reason="mlflow is in the dev extra: pip install -e '.[dev]'")
    from lightning.pytorch.loggers import MLFlowLogger

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 prefers a database; a folder needs nothing

    logger = MLFlowLogger(experiment_name="tests", tracking_uri=(tmp_path / "mlruns").as_uri())
    assert log_to_logger(report_case["content"], logger) == f"MLflow run {logger.run_id}"
    client, run_id = logger.experiment, logger.run_id
    local = Path(client.download_artifacts(run_id, "tda", str(tmp_path / "artifacts")))
    with open(local / "similarity_queries.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == table_columns(K) and [int(r[0]) for r in rows[1:]] == QUERY_IDS
    with open(local / "similarity_self_influence.csv", newline="") as handle:
        assert len(list(csv.reader(handle))) == SELF_TOP + 1
    figures = {p.relative_to(local).as_posix() for p in local.rglob("*.png")}
    assert {f"similarity/query_{q}.png" for q in QUERY_IDS} <= figures, figures
    metrics = client.get_run(run_id).data.metrics
    assert metrics["tda/similarity/mean_score"] == pytest.approx(float(report_case["pairwise"].values.mean()))


# ---------------------------------------------------------------------------------------- HTML
def test_html_report_names_every_query_with_k_proponents_and_opponents(report_case, tmp_path):
    content = report_case["content"]
    path = write_html_report(content, tmp_path / "sub" / "report.html")
    html = path.read_text()
    parser = ReportParser()
    parser.feed(html)
    assert sorted(q for _, q in parser.queries) == sorted(QUERY_IDS)
    for view in content.methods[0].queries:
        found = parser.queries[("similarity", view.query.id)]
        assert found["proponent"] == [e.id for e in view.helpful] and len(found["proponent"]) == K
        assert found["opponent"] == [e.id for e in view.harmful] and len(found["opponent"]) == K
        assert f"Query #{view.query.id}:" in html
    assert parser.external == [] and parser.scripts == 0  # self-contained
    assert parser.figures == len(QUERY_IDS) + 2  # one per query, the score and self-influence histograms
    assert len(re.findall(r'class="self-row"', html)) == SELF_TOP
    assert html.count('<span class="noisy">') >= 0.8 * SELF_TOP
    assert f"Unit: {UNIT}." in html and html.count(f'<p class="warning">⚠ {WARNING}</p>') == 1


def test_tabular_regression_report_shows_feature_rows(tmp_path):
    dm = ConcreteDataModule(seed=0)
    dm.setup()
    x_train, x_test = dm.train_set.tensors[0], dm.test_set.tensors[0]
    values = -torch.cdist(x_test[:3], x_train)
    values = values - values.mean(dim=1, keepdim=True)
    scores = Scores(values, torch.arange(len(x_train)), torch.arange(3), "distance")
    names = ["cement", "slag", "fly_ash", "water", "superplasticizer", "coarse", "fine", "age"]
    content = build_report(
        scores, dm.test_set, dm.train_set, task=RegressionTask(), k=3, renderer=TabularRenderer(names)
    )
    assert not content.images and content.methods[0].queries[0].helpful[0].rendered.text.startswith("cement=")
    html = write_html_report(content, tmp_path / "report.html").read_text()
    parser = ReportParser()
    parser.feed(html)
    assert len(parser.queries) == 3 and parser.figures == 3 + 1
    assert html.count("superplasticizer=") >= 3 * (1 + 2 * 3)


# ------------------------------------------------------------------------------ a real browser
def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.fixture(scope="session")
def chromium():
    """Headless Chromium from Debian's packages, installed once if absent (CI runs as root)."""
    binary = _chromium()
    if binary is None and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (["apt-get", "install", "-y", "-q", "chromium"], ["apt-get", "update", "-q"]):
            subprocess.run(command, env=env, capture_output=True, timeout=900)
            binary = _chromium()
            if binary:
                break
        if binary is None:
            subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], env=env, capture_output=True, timeout=900)
            binary = _chromium()
    if binary is None:
        pytest.skip("headless Chromium is not installed and `apt-get install chromium` failed (not root/offline?)")
    return binary


def _browse(chromium: str, page: Path, screenshot: Path) -> tuple[list[str], str]:
    """Render ``page``: returns (console lines, rendered DOM) and writes a screenshot."""
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr"]
    flags += ["--v=0", f"--user-data-dir={screenshot.parent / 'chromium-profile'}"]
    shot = subprocess.run(
        [*flags, "--window-size=1100,1400", f"--screenshot={screenshot}", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    console = [
        line
        for line in (shot.stderr + dom.stderr).splitlines()
        if ":CONSOLE" in line or "Failed to load resource" in line or "Not allowed to load" in line
    ]
    return console, dom.stdout


def test_browser_renders_the_report_without_console_errors(chromium, report_case, tmp_path):
    from matplotlib.image import imread

    broken = tmp_path / "broken.html"  # the check must be able to fail
    broken.write_text('<!DOCTYPE html><html><body><script>console.error("boom"); missing();</script></body></html>')
    console, _ = _browse(chromium, broken, tmp_path / "broken.png")
    assert any("boom" in line for line in console) and any("missing is not defined" in line for line in console)

    page = write_html_report(report_case["content"], tmp_path / "report.html")
    console, dom = _browse(chromium, page, tmp_path / "report.png")
    assert console == []
    assert len(re.findall(r'class="query"', dom)) == len(QUERY_IDS)
    pixels = imread(tmp_path / "report.png")
    assert pixels.shape[:2] == (1400, 1100)
    assert pixels[..., :3].std() > 0.05  # not a blank page


def test_token_ids_are_decoded_by_a_real_tokenizer_in_wandb_and_html(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    train_text = ["the cat sat on the mat", "a dog ran in the park", "the cat ate the fish", "stocks fell on monday"]
    query_text = ["the cat sat", "markets fell on friday"]
    words = sorted({w for s in train_text + query_text for w in s.split()})
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tokenizer = tokenizers.Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()

    def encode(texts):
        rows = [tokenizer.encode(t).ids for t in texts]
        return torch.tensor([r + [0] * (8 - len(r)) for r in rows])

    train = torch.utils.data.TensorDataset(encode(train_text), torch.tensor([0, 0, 0, 1]))
    queries = torch.utils.data.TensorDataset(encode(query_text), torch.tensor([0, 1]))
    bags = [{w for w in s.split()} for s in train_text]
    overlap = torch.tensor([[len(set(q.split()) & b) for b in bags] for q in query_text], dtype=torch.float32)
    scores = Scores(overlap - overlap.mean(dim=1, keepdim=True), torch.arange(4), torch.arange(2), "overlap")
    content = build_report(scores, queries, train, k=1, renderer=TextRenderer(tokenizer=tokenizer, ignore_ids=[0]))

    written = write_reports(content, html=tmp_path / "report.html", wandb=WandbReporter(save_dir=str(tmp_path)))
    table = OfflineRun.read(written.wandb.run_dir).table("tda/overlap/queries")
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [(r["query"], r["helpful_1"], r["harmful_1"]) for r in rows] == [
        ("the cat sat", "the cat sat on the mat", "stocks fell on monday"),
        ("markets fell on friday", "stocks fell on monday", "a dog ran in the park"),
    ]
    html = written.html.read_text()
    assert "the cat sat on the mat" in html and "[PAD]" not in html
