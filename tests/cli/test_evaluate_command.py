"""`lightning-tda evaluate` end to end on a configs/tiny.yaml job: killed mid-way through the ground truth
and resumed without repeating a finished fit; the LDS of every method read back from the offline W&B run,
the trace and the HTML page; a config whose training does not replay is refused with the cause named."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from wandb_reader import OfflineRun, find_runs

from lightning_tda import Scores
from lightning_tda.cli import main
from lightning_tda.evaluation.record import Evaluation, scores_digest
from lightning_tda.reporting.wandb_report import LDS_COLUMNS

REPO = Path(__file__).resolve().parents[2]
TINY = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
SUBSETS, QUERIES = 8, 4
METHODS = ["source", "tracin"]


def _command() -> list[str]:
    script = Path(sys.executable).parent / "lightning-tda"
    return [str(script)] if script.exists() else [sys.executable, "-m", "lightning_tda.cli"]


def _environment() -> dict[str, str]:
    # No credentials and no mode: the command chooses offline itself; WANDB_SERVICE would attach the command
    # to this test process's wandb service.
    dropped = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_SERVICE")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env["WANDB_SILENT"] = "true"
    return env


def _cached_fits(cache: Path) -> dict[str, np.ndarray]:
    """The re-trained measurements in the ground-truth cache, by key (empty while it is being created)."""
    try:
        with h5py.File(cache, "r") as f:
            group = f.get("retrains", {})
            return {key: np.asarray(group[key]["measurement"]) for key in group}
    except (OSError, KeyError):  # not there yet, or locked by the writer for a moment
        return {}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """Evaluate tiny.yaml (no trace yet: it trains first), kill the command once the cache holds a finished
    fit, then run it again to the end."""
    cwd = tmp_path_factory.mktemp("evaluate")
    config = {
        **TINY,
        "trainer": {**TINY["trainer"], "logger": False},
        "methods": [m for m in TINY["methods"] if m["name"] in METHODS],
        "evaluation": {"subsets": SUBSETS, "seeds": 1, "workers": 1},
    }
    (cwd / "tiny.yaml").write_text(yaml.safe_dump(config))
    out = cwd / "runs" / "tiny"
    cache = out / "ground_truth.h5"
    command = [*_command(), "evaluate", "--config", "tiny.yaml"]
    log = cwd / "first.log"
    with log.open("w") as sink:
        first = subprocess.Popen(
            command, cwd=cwd, env=_environment(), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 600
        while not _cached_fits(cache) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert first.poll() is None, log.read_text()[-3000:]  # still running: killed mid-way
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    first_output = log.read_text()
    before = _cached_fits(cache)
    assert 1 <= len(before) < SUBSETS, first_output[-3000:]

    second = subprocess.run(command, cwd=cwd, env=_environment(), capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    return {"out": out, "cache": cache, "before": before, "first": first_output, "stdout": second.stdout}


def test_a_killed_evaluation_resumes_without_repeating_a_finished_fit(evaluated):
    before, after = evaluated["before"], _cached_fits(evaluated["cache"])
    assert "training with the callback first" in evaluated["first"]  # the first run had to record the trace
    assert len(after) == SUBSETS and set(before) <= set(after)
    for key, measurement in before.items():  # the fits of the killed run were kept, not trained again
        np.testing.assert_array_equal(after[key], measurement)
    stdout = evaluated["stdout"]
    assert f"ground truth: {SUBSETS - len(before)} fits trained now, {len(before)} read from" in stdout
    # plain progress lines (no terminal): one per fit of this run, the last with nothing left
    progress = re.findall(r"ground truth: (\d+)/(\d+) fits, [\d.]+ s per fit, ETA (\S+)", stdout)
    assert [(int(d), int(t)) for d, t, _ in progress] == [
        (i, SUBSETS - len(before)) for i in range(1, len(progress) + 1)
    ]
    assert progress[-1][2] == "0m00s"
    assert "replayed 16 steps with seed_everything=0; losses match the trace" in stdout


def test_the_trace_holds_each_methods_lds_measured_on_its_saved_scores(evaluated):
    trace = evaluated["out"] / "trace.h5"
    evaluation = Evaluation.load(trace)
    assert [m.method for m in evaluation.methods] == METHODS
    assert (evaluation.num_subsets, evaluation.num_seeds, evaluation.fraction) == (SUBSETS, 1, 0.5)
    assert evaluation.query_ids == list(range(QUERIES)) and evaluation.ground_truth == str(evaluated["cache"])
    assert sorted(Scores.available(trace)) == sorted(METHODS)  # no self-influence: the LDS does not measure it
    for measured in evaluation.methods:
        scores = Scores.load(trace, measured.method)
        assert measured.scores_digest == scores_digest(scores)
        assert measured.per_query.shape == (QUERIES,)
        assert measured.ci_low <= measured.mean <= measured.ci_high
        assert measured.mean == pytest.approx(np.nanmean(measured.per_query))
        assert f"LDS {measured.describe()}" in evaluated["stdout"]
    # on 449 digits both methods predict the re-trained losses far better than chance
    assert all(m.mean > 0.3 for m in evaluation.methods), [m.describe() for m in evaluation.methods]
    assert evaluation.verdict()[1] in evaluated["stdout"]


def test_the_wandb_run_holds_the_lds_table_and_bar_chart(evaluated):
    (run_dir,) = find_runs(evaluated["out"])
    run = OfflineRun.read(run_dir)
    table = run.table("tda/evaluation/lds")
    evaluation = Evaluation.load(evaluated["out"] / "trace.h5")
    trusted, verdict = evaluation.verdict()
    assert table["columns"] == LDS_COLUMNS
    assert table["data"] == [
        [m.method, m.mean, m.ci_low, m.ci_high, QUERIES - int(np.isnan(m.per_query).sum()), m.method == trusted]
        for m in evaluation.methods
    ]
    chart = run.table("tda/evaluation/lds_chart_table")  # wandb.plot.bar logs the table it draws as <key>_table
    assert chart["columns"] == LDS_COLUMNS and chart["data"] == table["data"]
    for m in evaluation.methods:
        assert run.summary[f"tda/{m.method}/lds"] == pytest.approx(m.mean)
        assert len(run.table(f"tda/{m.method}/queries")["data"]) == QUERIES  # the scores beside it
    assert run.summary["tda/evaluation/verdict"] == verdict


def test_the_html_report_shows_the_lds_beside_each_methods_scores_and_the_verdict(evaluated):
    html = (evaluated["out"] / "report.html").read_text()
    evaluation = Evaluation.load(evaluated["out"] / "trace.h5")
    assert '<h2 id="evaluation">Which method to trust on this model</h2>' in html
    assert evaluation.verdict()[1].replace("'", "&#x27;") in html
    for m in evaluation.methods:
        shown = f"{m.mean:.3f} [{m.ci_low:.3f}, {m.ci_high:.3f}]"
        assert f'<p class="lds" data-method="{m.method}">Measured LDS on this model: {shown}.</p>' in html
        section = html.index(f'id="method-{m.method}"')
        assert html.index(f'class="lds" data-method="{m.method}"') > section  # inside the method's section


def test_report_after_evaluate_names_the_method_to_trust(evaluated, tmp_path, capsys):
    config = {**TINY, "trainer": {**TINY["trainer"], "logger": False}, "report": {**TINY["report"], "wandb": False}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    trace = evaluated["out"] / "trace.h5"
    assert main(["report", "--config", str(path), "--trace", str(trace), "--output_dir", str(tmp_path)]) == 0
    verdict = Evaluation.load(trace).verdict()[1]
    assert verdict in capsys.readouterr().out
    assert "Measured LDS on this model" in (tmp_path / "report.html").read_text()


UNSEEDED_MODULE = '''
"""A user's model whose data module shuffles with a generator seeded from the operating system."""
import os

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class UserNet(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class UserData(L.LightningDataModule):
    def __init__(self, seeded: bool = True):
        super().__init__()
        x = torch.randn(60, 4, generator=torch.Generator().manual_seed(0))
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
        self.seeded = seeded
        self.train_set = TensorDataset(x[:40], y[:40])
        self.test_set = TensorDataset(x[40:], y[40:])

    def train_dataloader(self):
        seed = 0 if self.seeded else int.from_bytes(os.urandom(4), "little")
        return DataLoader(self.train_set, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(seed))
'''


@pytest.mark.parametrize("case", ["seeded", "unseeded", "recorded_with_other_epochs"])
def test_a_config_whose_training_does_not_replay_is_refused_with_the_cause(case, tmp_path, monkeypatch, capsys):
    """A data order drawn from the operating system, or a trace recorded with other trainer arguments, is refused
    before anything is re-trained; the same model with a seeded order, evaluated as recorded, replays exactly."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "usermodel", raising=False)
    (tmp_path / "usermodel.py").write_text(UNSEEDED_MODULE)
    config = {
        "output_dir": "out",
        "model": {"class_path": "usermodel.UserNet"},
        "data": {"class_path": "usermodel.UserData", "init_args": {"seeded": case != "unseeded"}},
        "task": {"class_path": "lightning_tda.ClassificationTask"},
        "trainer": {**TINY["trainer"], "max_epochs": 1, "logger": False},
        "callback": {"segments": 1, "every_n_steps": 1},
        "methods": [{"name": "tracin"}],
        "queries": {"count": 2},
        "report": {"wandb": False, "html": False, "k": 2, "self_top": 3},
        "evaluation": {"subsets": 2, "workers": 1},
    }
    (tmp_path / "user.yaml").write_text(yaml.safe_dump(config))
    if case == "recorded_with_other_epochs":
        assert main(["fit", "--config", "user.yaml", "--trainer.max_epochs", "2"]) == 0
    status = main(["evaluate", "--config", "user.yaml"])
    captured = capsys.readouterr()
    sys.modules.pop("usermodel", None)
    if case == "seeded":
        assert status == 0, captured.err[-2000:]
        assert "replayed 5 steps with seed_everything=0; losses match the trace" in captured.out
        assert "ground truth: 2 fits trained now" in captured.out
        return
    assert status == 2
    errors = [line for line in captured.err.splitlines() if line.startswith("lightning-tda: error:")]
    assert len(errors) == 1, captured.err
    line = errors[0]
    if case == "unseeded":
        assert line.startswith("lightning-tda: error: The config user.yaml: training is not reproducible"), line
        assert re.search(r"gave a loss of [\d.]+ at step 1 where the trace recorded [\d.]+", line), line
        for cause in ("unseeded data order or augmentation", "dropout", "nondeterministic ops", "num_workers"):
            assert cause in line
        assert "re-record the trace with `lightning-tda fit`" in line
    else:
        expected = "The config user.yaml: this recipe trains 5 optimizer steps but the trace recorded 10"
        assert line.startswith(f"lightning-tda: error: {expected}"), line
        assert "--trainer.max_epochs on the command line" in line
    assert not (tmp_path / "out" / "ground_truth.h5").exists()  # refused before re-training anything
    assert Evaluation.load(tmp_path / "out" / "trace.h5") is None


@pytest.mark.parametrize(
    "options, expected",
    [
        (["--evaluation.subsets", "1"], "evaluation.subsets=1: use at least 2 (20+ for a tight interval)."),
        (["--evaluation.fraction", "1.0"], "evaluation.fraction=1.0: use a fraction between 0 and 1."),
        (["--evaluation.queries.split", "val"], "evaluation.queries.split='val' differs from queries.split='test'"),
        (["--evaluation.methods", "[magic]"], "evaluation.methods: unknown ['magic']"),
        (["--attribution.devices", "2"], "attribution.devices=2: evaluate attributes in one process"),
    ],
)
def test_evaluation_options_are_checked_before_any_work(options, expected, tmp_path, capsys):
    config = {**TINY, "trainer": {**TINY["trainer"], "logger": False}, "output_dir": str(tmp_path)}
    (tmp_path / "c.yaml").write_text(json.dumps(config))
    assert main(["evaluate", "--config", str(tmp_path / "c.yaml"), *options]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"lightning-tda: error: {expected}"), line
    assert not (tmp_path / "trace.h5").exists()


def test_progress_without_a_terminal_prints_each_fit_with_its_eta(monkeypatch, capsys):
    import lightning_tda.cli.evaluate as evaluate_command

    clock = iter([100.0, 110.0, 10900.0])  # started; 2 fits done after 10 s; 3 after three hours
    monkeypatch.setattr(evaluate_command.time, "perf_counter", lambda: next(clock))
    progress = evaluate_command.FitProgress("ground truth")
    progress(2, 5)
    progress(3, 5)
    progress.close()
    assert capsys.readouterr().out.splitlines() == [
        "ground truth: 2/5 fits, 5.0 s per fit, ETA 0m15s",
        "ground truth: 3/5 fits, 3600.0 s per fit, ETA 2h00m00s",
    ]
