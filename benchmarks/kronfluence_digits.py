"""Run kronfluence's EK-FAC influence on the digits MLP saved by ``bench_ekfac.py`` (separate venv).

Usage (called by ``bench_ekfac.py --kronfluence /path/to/venv/python``)::

    python kronfluence_digits.py WORKDIR

Reads ``WORKDIR/final.pt`` (state dict of the 64-128-128-10 ``nn.Sequential``) and ``WORKDIR/data.pt``,
fits kronfluence's factors (its default true Fisher with one sampled label per example, covariances
and eigenvalue correction recomputed at these parameters) and scores the queries with its
heuristic damping (0.1 × mean eigenvalue). Writes ``WORKDIR/kronfluence_scores.npy`` (queries ×
train, positive = helpful, as ours) and prints a JSON line with the version and the wall time.
Not imported by the library: kronfluence is not a dependency.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from torch import nn
from torch.utils.data import TensorDataset


class ClassificationTask(Task):
    """Summed cross-entropy; with ``sample`` the labels are drawn from the model's predictions (true Fisher)."""

    def compute_train_loss(self, batch, model: nn.Module, sample: bool = False) -> torch.Tensor:
        inputs, labels = batch
        logits = model(inputs)
        if sample:
            with torch.no_grad():
                labels = torch.multinomial(torch.softmax(logits.detach(), dim=-1), num_samples=1).flatten()
        return F.cross_entropy(logits, labels, reduction="sum")

    def compute_measurement(self, batch, model: nn.Module) -> torch.Tensor:
        inputs, labels = batch
        return F.cross_entropy(model(inputs), labels, reduction="sum")


def ekfac_scores(
    net: nn.Module,
    train: TensorDataset,
    queries: TensorDataset,
    output_dir: Path,
    batch_size: int = 256,
    factor_args: FactorArguments | None = None,
) -> torch.Tensor:
    """kronfluence's EK-FAC influence of ``train`` on ``queries`` (queries × train, float64): factors fitted
    with ``factor_args`` (default: its EK-FAC defaults), scores with its heuristic damping."""
    task = ClassificationTask()
    analyzer = Analyzer(
        analysis_name="influence",
        model=prepare_model(net, task),
        task=task,
        cpu=True,
        disable_tqdm=True,
        output_dir=str(output_dir),
        log_level=logging.WARNING,
    )
    analyzer.fit_all_factors(
        factors_name="ekfac",
        dataset=train,
        per_device_batch_size=batch_size,
        factor_args=factor_args or FactorArguments(strategy="ekfac"),
        overwrite_output_dir=True,
    )
    analyzer.compute_pairwise_scores(
        scores_name="pairwise",
        factors_name="ekfac",
        query_dataset=queries,
        train_dataset=train,
        per_device_query_batch_size=len(queries),
        per_device_train_batch_size=batch_size,
        score_args=ScoreArguments(damping_factor=None),
        overwrite_output_dir=True,
    )
    return analyzer.load_pairwise_scores("pairwise")["all_modules"].double()


def main() -> None:
    workdir = Path(sys.argv[1])
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    net.load_state_dict(torch.load(workdir / "final.pt"))
    net.eval()
    data = torch.load(workdir / "data.pt")
    train, queries = TensorDataset(*data["train"]), TensorDataset(*data["query"])
    start = time.perf_counter()
    scores = ekfac_scores(net, train, queries, workdir / "kronfluence")
    seconds = time.perf_counter() - start
    np.save(workdir / "kronfluence_scores.npy", scores.numpy())
    print(json.dumps({"version": version("kronfluence"), "seconds": seconds}))


if __name__ == "__main__":
    main()
