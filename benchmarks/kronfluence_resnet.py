"""Run kronfluence's EK-FAC influence on the ResNet saved by ``bench_resnet.py`` (separate venv).

Usage (called by ``bench_resnet.py --kronfluence /path/to/venv/python``)::

    python kronfluence_resnet.py WORKDIR THREADS

Reads ``WORKDIR/kronfluence/model.pt`` (``{"config": resnet() arguments, "state": its state dict}``) and
``WORKDIR/kronfluence/data.pt``, builds the network with ``resnet`` from ``lightning_tda/models.py`` by file path
(that environment has torch and kronfluence, not this package's dependencies), fits kronfluence's
factors at its defaults (true Fisher with one sampled label per example, covariances and eigenvalue
correction recomputed at these parameters; BatchNorm untracked) and scores the queries with its
heuristic damping (0.1 × mean eigenvalue). If its eigendecomposition fails on float32 covariances,
it is re-run with float64 covariances (reported). Writes ``WORKDIR/kronfluence/scores.npy`` (queries ×
train, positive = helpful, as ours) and prints a JSON line with the version, wall and CPU seconds and
peak RSS. Not imported by the library: kronfluence is not a dependency.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import resource
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

MODELS = Path(__file__).resolve().parent.parent / "lightning_tda" / "models.py"


class ClassificationTask(Task):
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


def load_resnet(saved: dict) -> nn.Module:
    spec = importlib.util.spec_from_file_location("resnet_models", MODELS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = module.resnet(**saved["config"])
    net.load_state_dict(saved["state"])
    return net.eval()


def main() -> None:
    workdir, threads = Path(sys.argv[1]) / "kronfluence", int(sys.argv[2])
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = load_resnet(torch.load(workdir / "model.pt"))
    data = torch.load(workdir / "data.pt")
    train, queries = TensorDataset(*data["train"]), TensorDataset(*data["query"])
    start, cpu = time.perf_counter(), time.process_time()
    task = ClassificationTask()
    model = prepare_model(net, task)
    analyzer = Analyzer(
        analysis_name="resnet",
        model=model,
        task=task,
        cpu=True,
        disable_tqdm=True,
        output_dir=str(workdir / "output"),
        log_level=logging.WARNING,
    )
    covariance_dtype = "float32 (its default)"
    try:
        analyzer.fit_all_factors(
            factors_name="ekfac",
            dataset=train,
            per_device_batch_size=128,
            factor_args=FactorArguments(strategy="ekfac"),
            overwrite_output_dir=True,
        )
    except RuntimeError as err:  # torch.linalg.eigh did not converge on float32 covariances
        covariance_dtype = f"float64 (float32 failed: {str(err).splitlines()[0][:80]})"
        analyzer.fit_all_factors(
            factors_name="ekfac",
            dataset=train,
            per_device_batch_size=128,
            factor_args=FactorArguments(
                strategy="ekfac",
                activation_covariance_dtype=torch.float64,
                gradient_covariance_dtype=torch.float64,
            ),
            overwrite_output_dir=True,
        )
    analyzer.compute_pairwise_scores(
        scores_name="pairwise",
        factors_name="ekfac",
        query_dataset=queries,
        train_dataset=train,
        per_device_query_batch_size=len(queries),
        per_device_train_batch_size=128,
        score_args=ScoreArguments(damping_factor=None),
        overwrite_output_dir=True,
    )
    scores = analyzer.load_pairwise_scores("pairwise")
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    np.save(workdir / "scores.npy", scores["all_modules"].double().numpy())
    print(
        json.dumps(
            {
                "version": version("kronfluence"),
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
                "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "covariance_dtype": covariance_dtype,
            }
        )
    )


if __name__ == "__main__":
    main()
