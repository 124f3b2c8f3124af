"""Smoke runs of what the README tells users to run: every script in examples/ and the digits and Concrete
configs (the README's main job), each at a tiny size (one epoch, few examples) so a broken import, a renamed
argument or a config the command no longer accepts fails here rather than for the user."""

from __future__ import annotations

import runpy
from pathlib import Path

import lightning as L
import pytest

from lightning_tda import Scores, Trace
from lightning_tda.cli import main

REPO = Path(__file__).resolve().parents[1]
EXAMPLES, CONFIGS = REPO / "examples", REPO / "configs"


def example(name: str) -> dict:
    """The example's namespace, without running its ``__main__`` block."""
    return runpy.run_path(str(EXAMPLES / name), run_name="example")


@pytest.mark.parametrize("config, epochs", [("digits.yaml", 1), ("concrete.yaml", 2)])
def test_a_config_runs_end_to_end(tmp_path, monkeypatch, capsys, config, epochs):
    """Every method the config names (baselines aside) on a fifth of the data (360 digits, 206 Concrete mixes)."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    args = ["--output_dir", str(out), "--trainer.max_epochs", str(epochs), "--trainer.logger", "false"]
    args += ["--data.init_args.test_fraction", "0.8", "--report.wandb", "false"]  # W&B: tests/cli/test_cli.py
    assert main(["run", "--config", str(CONFIGS / config), *args, "--queries.count", "2"]) == 0
    trace = Trace.open(out / "trace.h5")
    assert trace.num_steps > 0 and len(trace.segments) == 3
    assert {"source", "datainf", "forward-inf"} <= set(Scores.available(out / "trace.h5"))
    assert (out / "report.html").exists()


def test_train_digits_example_runs(tmp_path, monkeypatch, capsys):
    """The README's example, with its Trainer cut to one epoch."""

    class OneEpoch(L.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "max_epochs": 1, "enable_progress_bar": False})

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(L, "Trainer", OneEpoch)
    runpy.run_path(str(EXAMPLES / "train_digits.py"), run_name="__main__")
    assert "HTML" in capsys.readouterr().out or (tmp_path / "runs/example/report.html").exists()
    assert Trace.open(tmp_path / "runs/example/trace.h5").num_steps == 23  # 1,438 digits / 64 per batch


def test_train_resnet_example_runs(tmp_path):
    described = example("train_resnet.py")["main"](width=4, n=64, size=16, out=str(tmp_path), queries=2)
    assert (tmp_path / "report.html").exists() and described
    assert {"ekfac", "source"} <= set(Scores.available(tmp_path / "trace.h5"))


def test_lora_digits_example_runs(tmp_path, capsys):
    example("lora_digits.py")["main"](flip_fraction=0.2, rank=2, workdir=str(tmp_path))
    assert "mislabel detection AUC" in capsys.readouterr().out


def test_language_model_example_runs(tmp_path, capsys):
    pytest.importorskip("transformers")
    example("language_model.py")["main"](lora=False, epochs=1, train_blocks=16, out=str(tmp_path))
    assert "most helpful:" in capsys.readouterr().out and (tmp_path / "report.html").exists()
