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
import resource
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from kronfluence.arguments import FactorArguments
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kronfluence_digits import ekfac_scores  # noqa: E402  (the same analysis, one venv, no package)

MODELS = Path(__file__).resolve().parent.parent / "lightning_tda" / "models.py"


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
    covariance_dtype = "float32 (its default)"
    try:
        scores = ekfac_scores(net, train, queries, workdir / "output", batch_size=128)
    except RuntimeError as err:  # torch.linalg.eigh did not converge on float32 covariances
        covariance_dtype = f"float64 (float32 failed: {str(err).splitlines()[0][:80]})"
        double = FactorArguments(
            strategy="ekfac", activation_covariance_dtype=torch.float64, gradient_covariance_dtype=torch.float64
        )
        scores = ekfac_scores(net, train, queries, workdir / "output", batch_size=128, factor_args=double)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    np.save(workdir / "scores.npy", scores.numpy())
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
