"""The `lightning-tda` command on configs/tiny.yaml: the main job end to end (read back from the
offline W&B run and the HTML page), each subcommand, one-line errors for bad configs, and DDP
attribution writing the report once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch
import yaml
from html_reader import ReportParser
from wandb_reader import OfflineRun, find_runs

from lightning_tda import Scores, Timeline
from lightning_tda.cli import main
from lightning_tda.reporting.wandb_report import SELF_COLUMNS, table_columns

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
TINY_CONFIG = yaml.safe_load(TINY.read_text())
SOURCE_ARGS = next(m.get("init_args", {}) for m in TINY_CONFIG["methods"] if m["name"] == "source")
METHODS = ["source", "datainf", "forward-inf"]  # tiny.yaml's main methods; ekfac and tracin are baselines
K, QUERIES, SELF_TOP = 3, 4, 10


def _command() -> list[str]:
    script = Path(sys.executable).parent / "lightning-tda"
    return [str(script)] if script.exists() else [sys.executable, "-m", "lightning_tda.cli"]


def _run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # No credentials and no mode: the command must choose offline itself. WANDB_SERVICE would attach the
    # command to this test process's wandb service, which writes the run log on its own schedule.
    dropped = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_SERVICE")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env["WANDB_SILENT"] = "true"
    return subprocess.run([*_command(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    """`lightning-tda run --config configs/tiny.yaml` in a fresh directory, without W&B credentials."""
    cwd = tmp_path_factory.mktemp("main_job")
    done = _run_cli(["run", "--config", str(TINY)], cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"cwd": cwd, "out": cwd / "runs" / "tiny", "stdout": done.stdout}


def test_main_job_writes_an_offline_wandb_run_with_the_report(main_job):
    out = main_job["out"]
    (run_dir,) = find_runs(out / "wandb")  # training and the report share the WandbLogger's run
    assert f"wandb sync {run_dir}" in main_job["stdout"]
    assert f"HTML report: {out / 'report.html'}" in main_job["stdout"]
    run = OfflineRun.read(run_dir)
    assert "train_loss" in {key for step in run.history for key in step}
    for method in METHODS:
        table = run.table(f"tda/{method}/queries")
        assert table["columns"] == table_columns(K, timeline=method == "source") and len(table["data"]) == QUERIES
        assert [row[0] for row in table["data"]] == list(range(QUERIES))
        histogram = run.logged(f"tda/{method}/scores")
        assert histogram["_type"] == "histogram" and sum(histogram["values"]) == QUERIES * 449
        ranking = run.table(f"tda/{method}/self_influence")
        assert ranking["columns"] == SELF_COLUMNS and len(ranking["data"]) == SELF_TOP
    # SOURCE has a time axis: its timeline (tiny.yaml: 2 segments) is in the run, and adds up to its scores
    timeline = Timeline.load(out / "trace.h5", "source-timeline")
    assert timeline.shape == (2, QUERIES, 449) and timeline.query_ids.tolist() == list(range(QUERIES))
    assert torch.equal(timeline.totals, Scores.load(out / "trace.h5", "source").values)
    rows = run.table("tda/source/timeline")["data"]
    assert len(rows) == QUERIES * 2 * K * 2 and {row[3] for row in rows} == {1, 2}
    assert run.table("tda/source/timeline_query_0_table")["data"]
    assert "with a timeline over 2 segments" in main_job["stdout"]
    artifact = run.artifact("tda-trace")
    assert artifact["files"]["trace.h5"].size == (out / "trace.h5").stat().st_size
    assert artifact["metadata"]["methods"] == METHODS
    # the trace in the artifact holds every method's scores and self-influence, and SOURCE's timeline
    assert sorted(Scores.available(out / "trace.h5")) == sorted(METHODS + [f"{m}-self" for m in METHODS])
    assert Timeline.available(out / "trace.h5") == ["source-timeline"]


def test_main_job_html_names_every_query_with_k_proponents_and_opponents(main_job):
    parser = ReportParser()
    parser.feed((main_job["out"] / "report.html").read_text())
    assert sorted(parser.queries) == sorted((m, q) for m in METHODS for q in range(QUERIES))
    for found in parser.queries.values():
        assert len(found["proponent"]) == K and len(found["opponent"]) == K
    assert parser.external == []
    html = (main_job["out"] / "report.html").read_text()
    assert html.count('<p class="timeline"') == QUERIES and html.count("Most of its support came from steps") == QUERIES
    assert html.count('<img class="figure timeline"') == QUERIES + 1


def test_each_subcommand(main_job, tmp_path, capsys):
    trace = main_job["out"] / "trace.h5"
    assert main(["inspect", str(trace)]) == 0
    assert "results: " in capsys.readouterr().out

    out = tmp_path / "sub"
    common = ["--config", str(TINY), "--output_dir", str(out)]
    assert main(["fit", *common, "--trainer.logger", "false", "--trainer.max_epochs", "1"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"trace: {out / 'trace.h5'}")

    # a baseline, asked for by name, on chosen test examples; without the timeline TracInCP would record
    timeline_off = ["--report.timeline", "false"]
    assert main(["attribute", *common, "--method", "tracin", "--queries.ids", "[7, 2, 11]", *timeline_off]) == 0
    assert "tracin: scores (3, 449) in" in capsys.readouterr().out
    assert sorted(Scores.available(out / "trace.h5")) == ["tracin", "tracin-self"]
    assert Timeline.available(out / "trace.h5") == []
    assert Scores.load(out / "trace.h5", "tracin").query_ids.tolist() == [7, 2, 11]

    elsewhere = tmp_path / "elsewhere"
    assert main(["report", *common, "--trace", str(out / "trace.h5"), "--output_dir", str(elsewhere)]) == 0
    printed = capsys.readouterr().out
    assert f"HTML report: {elsewhere / 'report.html'}" in printed and "wandb sync" in printed
    parser = ReportParser()
    parser.feed((elsewhere / "report.html").read_text())
    assert list(parser.queries) == [("tracin", q) for q in (7, 2, 11)]
    (run_dir,) = find_runs(elsewhere)
    assert [row[0] for row in OfflineRun.read(run_dir).table("tda/tracin/queries")["data"]] == [7, 2, 11]


def _config_without(key: str, tmp_path: Path) -> str:
    config = yaml.safe_load(TINY.read_text())
    del config[key]
    path = tmp_path / f"without_{key}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _config_with(tmp_path: Path, **changes) -> str:
    config = yaml.safe_load(TINY.read_text())
    config.update(changes)
    path = tmp_path / f"changed_{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize(
    "case",
    [
        "missing_model",
        "wrong_type",
        "wrong_type_in_yaml",
        "wrong_type_nested",
        "unknown_method",
        "unknown_method_in_config",
        "bad_method_argument",
        "missing_trace",
        "missing_trace_inspect",
        "missing_config_file",
    ],
)
def test_bad_configs_give_one_line_errors(case, tmp_path, capsys):
    missing = str(tmp_path / "nowhere" / "trace.h5")
    argv, expected = {
        "missing_model": (["fit", "--config", _config_without("model", tmp_path)], "model"),
        "wrong_type": (["fit", "--config", str(TINY), "--queries.count", "many"], "queries.count"),
        "wrong_type_in_yaml": (["fit", "--config", _config_with(tmp_path, report={"k": "five"})], "report.k"),
        "wrong_type_nested": (
            ["fit", "--config", _config_with(tmp_path, model={**TINY_CONFIG["model"], "init_args": {"lr": "fast"}})],
            "class_path 'lightning_tda.demo.MLPClassifier': Parser key \"lr\": Expected a <class 'float'>",
        ),
        "unknown_method": (["attribute", "--config", str(TINY), "--method", "magic"], "'magic'"),
        "unknown_method_in_config": (
            ["attribute", "--config", _config_with(tmp_path, methods=[{"name": "magic"}]), "--trace", missing],
            "unknown method 'magic'",
        ),
        "bad_method_argument": (
            [
                "attribute",
                "--config",
                _config_with(tmp_path, methods=[{"name": "tracin", "init_args": {"options": {"batch_size": "big"}}}]),
                "--trace",
                missing,
            ],
            "batch_size",
        ),
        "missing_trace": (["report", "--config", str(TINY), "--trace", missing], f"No trace at {missing}"),
        "missing_trace_inspect": (["inspect", missing], f"No trace at {missing}"),
        "missing_config_file": (["fit", "--config", str(tmp_path / "nope.yaml")], "nope.yaml"),
    }[case]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("lightning-tda: error: ") and expected in lines[0], lines[0]


def test_a_method_that_is_not_installed_is_a_one_line_error(main_job, monkeypatch, capsys):
    import lightning_tda.methods as methods

    monkeypatch.setitem(methods._WHERE, "SOURCE", "not_landed_yet")
    trace = str(main_job["out"] / "trace.h5")
    assert main(["attribute", "--config", str(TINY), "--trace", trace, "--method", "source"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("lightning-tda: error: Method 'source' (SOURCE) is not available in this installation")


def test_a_method_argument_the_method_refuses_is_a_one_line_error(main_job, tmp_path, capsys):
    config = _config_with(tmp_path, methods=[{"name": "ekfac", "init_args": {"cache": "disk"}}])
    assert main(["attribute", "--config", config, "--trace", str(main_job["out"] / "trace.h5")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("lightning-tda: error: methods[ekfac].init_args: cache='disk': use 'sidecar'"), line


def test_ddp_attribution_writes_the_report_once(main_job, tmp_path):
    """Two gloo processes share the training set; only rank 0 saves scores and writes the report."""
    done = _run_cli(
        [
            "run",
            "--config",
            str(TINY),
            "--attribution.devices",
            "2",
            "--methods",
            json.dumps([{"name": "source", "init_args": SOURCE_ARGS}]),
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "runs" / "tiny"
    assert done.stdout.count("source: scores (4, 449)") == 1
    with h5py.File(out / "trace.cache.h5", "r") as f:  # the fitted curvature was cached (by rank 0 only)
        assert len(f["cache"]) > 0
    assert list(out.rglob("*.html")) == [out / "report.html"]
    (run_dir,) = find_runs(out)
    assert len(OfflineRun.read(run_dir).table("tda/source/queries")["data"]) == QUERIES
    # the same seed trains the same model, so sharded scores equal the single-process ones
    for name in ("source", "source-self"):
        sharded = Scores.load(out / "trace.h5", name).values
        single = Scores.load(main_job["out"] / "trace.h5", name).values
        assert (sharded - single).abs().max() <= 1e-4 * single.abs().max()
    # each segment's part is summed across the processes too
    sharded, single = (Timeline.load(d / "trace.h5", "source-timeline").values for d in (out, main_job["out"]))
    assert (sharded - single).abs().max() <= 1e-4 * single.abs().max()


USER_MODULE = '''
"""A user's own model and data, in a module that sits only in the working directory."""
import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class UserNet(L.LightningModule):
    def __init__(self, hidden: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class UserData(L.LightningDataModule):
    def __init__(self, size: int = 60):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(size, 4, generator=generator)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
        self.train_set = TensorDataset(x[: size // 2 + 10], y[: size // 2 + 10])
        self.test_set = TensorDataset(x[size // 2 + 10 :], y[size // 2 + 10 :])

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=8, shuffle=True)
'''


def test_the_command_finds_the_users_module_in_the_working_directory(tmp_path):
    """`class_path: usermodel.UserNet` with usermodel.py only in the working directory (not on PYTHONPATH)."""
    (tmp_path / "usermodel.py").write_text(USER_MODULE)
    config = {
        "output_dir": "out",
        "model": {"class_path": "usermodel.UserNet"},
        "data": {"class_path": "usermodel.UserData"},
        "task": {"class_path": "lightning_tda.ClassificationTask"},
        "trainer": {**TINY_CONFIG["trainer"], "max_epochs": 1, "logger": False},
        "callback": {"segments": 1, "every_n_steps": 1},
        "methods": [{"name": "tracin"}],
        "queries": {"count": 2},
        "report": {"wandb": False, "k": 2, "self_top": 3},
    }
    (tmp_path / "user.yaml").write_text(yaml.safe_dump(config))
    assert str(tmp_path) not in os.environ.get("PYTHONPATH", "")
    done = _run_cli(["run", "--config", "user.yaml"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tracin: scores (2, 40)" in done.stdout
    assert sorted(Scores.available(tmp_path / "out" / "trace.h5")) == ["tracin", "tracin-self"]


@pytest.mark.parametrize(
    "module_text, expected",
    [
        (None, "no module 'usermodel' in the working directory {cwd} or on the Python path. Run lightning-tda from"),
        ("import not_installed_anywhere\n", "importing it failed: No module named 'not_installed_anywhere'. Install"),
        ("raise ValueError('broken on purpose')\n", "raised ValueError: broken on purpose"),
        ("x = 1\n", "module 'usermodel' ({cwd}/usermodel.py) has no 'UserNet'. Check the class name."),
    ],
)
def test_a_class_path_that_does_not_import_names_the_module_the_directory_and_the_fix(
    module_text, expected, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "usermodel", raising=False)
    if module_text is not None:
        (tmp_path / "usermodel.py").write_text(module_text)
    config = _config_with(tmp_path, model={"class_path": "usermodel.UserNet"})
    assert main(["fit", "--config", config]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("lightning-tda: error: model.class_path 'usermodel.UserNet': ")
    assert expected.format(cwd=tmp_path) in line, line
    assert str(tmp_path) not in sys.path  # the working directory is on sys.path only while the command runs
    sys.modules.pop("usermodel", None)
