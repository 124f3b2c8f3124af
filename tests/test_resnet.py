"""A ResNet image classifier end to end: ``configs/resnet.yaml`` at tiny sizes (width 8, 300 images of
16×16) through the callback, all five methods and the report."""

from __future__ import annotations

from pathlib import Path

import torch
from html_reader import ReportParser

from lightning_tda import Scores, Trace
from lightning_tda.cli import main
from lightning_tda.demo import ResNet

METHODS = ("source", "datainf", "forward-inf", "ekfac", "tracin")
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "resnet.yaml"
TINY = [
    "--model.init_args.width=8",
    "--data.init_args.num_examples=300",
    "--data.init_args.size=16",
    "--callback.segments=2",
    "--callback.checkpoints_per_segment=1",
    "--queries.count=3",
    "--trainer.logger=false",
    "--report.wandb=false",
]


# median over the 3 queries of the largest |score|, measured on this run (a barely trained ResNet)
MEASURED_TOP = {"source": 1.8, "datainf": 0.24, "forward-inf": 1.8, "ekfac": 8.5, "tracin": 0.27}


def test_resnet_config_runs_every_method_into_the_report(tmp_path, capsys):
    out = tmp_path / "resnet"
    assert main(["run", "--config", str(CONFIG), f"--output_dir={out}", "--baselines=true", *TINY]) == 0
    trace = Trace.open(out / "trace.h5")
    tracin = Scores.load(out / "trace.h5", "tracin").values
    kinds = [layer.kind for layer in trace.tracked_layers(ResNet(width=8, stem="imagenet"))]
    assert kinds == ["conv2d"] * 20 + ["linear"]  # the 20 BatchNorm2d are not tracked
    n_train = 240
    for method in METHODS:
        scores = Scores.load(out / "trace.h5", method)
        assert scores.values.shape == (3, n_train) and torch.isfinite(scores.values).all(), method
        top = float(scores.values.abs().amax(dim=1).median())
        assert MEASURED_TOP[method] / 10 < top < MEASURED_TOP[method] * 10, (method, top)  # a 100x error fails
        # the sign: every method ranks like TracInCP (Σ η g_q·g_z, checked exactly in tests/methods/test_tracin.py)
        together = torch.stack([scores.values.flatten(), tracin.flatten()])
        assert float(torch.corrcoef(together)[0, 1]) > 0.15, method  # measured 0.30 (Forward-INF) to 1
    parser = ReportParser()
    parser.feed((out / "report.html").read_text())
    assert sorted(parser.queries) == sorted((m, q) for m in METHODS for q in range(3))
    assert all(len(found["proponent"]) == len(found["opponent"]) == 5 for found in parser.queries.values())
    printed = capsys.readouterr().out
    assert f"HTML report: {out / 'report.html'}" in printed
