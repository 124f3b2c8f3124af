"""Linear datamodeling score (LDS, Park et al. 2023), the standard test of attribution scores.

Draw ``M`` random subsets ``S_j`` holding a fraction ``α`` of the training set, re-train ``R`` seeds
on each and measure every query. For query ``q`` the scores predict the effect of training on
``S_j`` as the group sum ``Σ_{m∈S_j} τ(q, m)``; the LDS of ``q`` is the Spearman correlation over
``j`` between that prediction and ``-mean_r measurement(q; S_j, r)`` (positive scores mean
*helpful*, so more helpful examples should mean a lower loss). The reported number is the mean over
queries with a bootstrap confidence interval.

The ground truth (the re-trained measurements) does not depend on the method, so
:func:`lds_ground_truth` computes it once, caches it in HDF5 (see
:class:`~lightning_tda.evaluation.retrain.RetrainRunner`) and :func:`lds` scores any number of
methods against it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torchmetrics.functional import spearman_corrcoef

from lightning_tda.batches import Data
from lightning_tda.evaluation.retrain import RetrainRunner, TrainFn
from lightning_tda.scores import Scores
from lightning_tda.tasks import Task


def draw_subsets(n_train: int, num_subsets: int, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """``(num_subsets, round(fraction·n_train))`` int64 sorted training indices, one random subset per row."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction={fraction}: the subsets must hold a fraction strictly between 0 and 1.")
    if num_subsets < 2:
        raise ValueError(f"num_subsets={num_subsets}: a rank correlation over subsets needs at least 2 (50+ typical).")
    size = int(round(fraction * n_train))
    if not 0 < size < n_train:
        raise ValueError(f"fraction={fraction} of {n_train} training examples gives an empty or full subset.")
    rng = np.random.default_rng(seed)
    return np.stack([np.sort(rng.choice(n_train, size=size, replace=False)) for _ in range(num_subsets)])


@dataclass
class GroundTruth:
    """Re-trained query measurements on random subsets.

    Attributes:
        subsets: ``(M, k)`` int64 training indices of each subset.
        seeds: ``(R,)`` training seeds used on every subset.
        measurements: ``(M, R, Q)`` float64 ``task.measurement`` of each query (lower is better).
        n_train: size of the full training set.
        num_trained: models trained to produce it in this call (0 when fully read from the cache).
    """

    subsets: np.ndarray
    seeds: np.ndarray
    measurements: np.ndarray
    n_train: int
    num_trained: int = 0

    @property
    def num_queries(self) -> int:
        return self.measurements.shape[2]

    def masks(self) -> np.ndarray:
        """``(M, n_train)`` float64 membership indicators of the subsets."""
        masks = np.zeros((len(self.subsets), self.n_train))
        np.put_along_axis(masks, self.subsets, 1.0, axis=1)
        return masks


def lds_ground_truth(
    train_fn: TrainFn,
    task: Task,
    queries: Data,
    n_train: int,
    *,
    num_subsets: int = 50,
    fraction: float = 0.5,
    num_seeds: int = 1,
    seed: int = 0,
    cache: str | os.PathLike | None = None,
    tag: str = "",
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> GroundTruth:
    """Re-train ``num_seeds`` models on each of ``num_subsets`` random subsets and measure the queries.

    Args:
        train_fn: ``train_fn(subset_indices, seed) -> trained model`` (e.g.
            :class:`~lightning_tda.evaluation.LightningTrainFn`), the same recipe as the attributed run.
        task: the task whose ``measurement`` the scores attribute.
        queries: the query set the scores were computed for, in the same order.
        n_train: size of the training set the scores cover (indices ``0..n_train-1``).
        num_subsets, fraction, seed: ``M``, ``α`` and the seed of the subset draw.
        num_seeds: ``R`` re-trainings per subset (seeds ``0..R-1``), averaged.
        cache: HDF5 file caching every re-trained result; a second call with the same subsets,
            seeds and queries trains nothing.
        tag: names the training recipe in the cache (change it when ``train_fn`` changes).
        workers: processes re-training in parallel.
        progress: called as ``progress(done, total)`` after each newly trained model.
    """
    subsets = draw_subsets(n_train, num_subsets, fraction, seed)
    seeds = np.arange(num_seeds, dtype=np.int64)
    runner = RetrainRunner(train_fn, task, queries, cache=cache, tag=tag, workers=workers)
    outcomes = runner.run([(subset, int(s)) for subset in subsets for s in seeds], progress=progress)
    measurements = np.stack([o.measurement for o in outcomes]).reshape(num_subsets, num_seeds, -1)
    return GroundTruth(subsets, seeds, measurements, n_train, runner.num_trained)


@dataclass
class LDSResult:
    """LDS of one set of scores.

    Attributes:
        per_query: ``(Q,)`` Spearman correlation of each query (NaN when its measurement did not vary).
        mean: mean over queries with a defined LDS.
        ci_low, ci_high: bootstrap confidence interval of the mean (resampling queries).
        confidence: level of the interval.
    """

    per_query: np.ndarray
    mean: float
    ci_low: float
    ci_high: float
    confidence: float

    def scalars(self, prefix: str = "lds") -> dict[str, float]:
        return {f"{prefix}/mean": self.mean, f"{prefix}/ci_low": self.ci_low, f"{prefix}/ci_high": self.ci_high}

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}]"


def bootstrap_mean(values: np.ndarray, resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> tuple:
    """``(mean, low, high)``: mean of the finite ``values`` and its percentile bootstrap interval."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    return float(values.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def _score_matrix(scores: Scores | Tensor | np.ndarray) -> np.ndarray:
    if isinstance(scores, Scores):
        if scores.kind != "pairwise":
            raise ValueError("LDS needs pairwise (query × train) scores, not self-influence.")
        if not torch.equal(scores.train_ids, torch.arange(len(scores.train_ids))):
            raise ValueError("LDS expects scores over the whole training set in order (train_ids 0..N-1).")
        scores = scores.values
    return torch.as_tensor(scores).double().numpy()


def lds(
    scores: Scores | Tensor | np.ndarray,
    ground_truth: GroundTruth,
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> LDSResult:
    """LDS of ``scores`` ``(Q, n_train)`` against ``ground_truth`` (see the module docstring)."""
    values = _score_matrix(scores)
    expected = (ground_truth.num_queries, ground_truth.n_train)
    if values.shape != expected:
        raise ValueError(
            f"Scores of shape {values.shape} do not match the ground truth's (queries, training examples) = "
            f"{expected}; attribute the same queries over the same training set."
        )
    predicted = ground_truth.masks() @ values.T  # (M, Q) group sums
    actual = -ground_truth.measurements.mean(axis=1)  # (M, Q): higher = better for the query
    per_query = _spearman_columns(predicted, actual)
    mean, low, high = bootstrap_mean(per_query, resamples, confidence, seed)
    return LDSResult(per_query, mean, low, high, confidence)


def _spearman_columns(predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column pair; NaN where either column is constant."""
    defined = (np.ptp(predicted, axis=0) > 0) & (np.ptp(actual, axis=0) > 0)
    result = np.full(predicted.shape[1], np.nan)
    if defined.any():
        rho = spearman_corrcoef(torch.from_numpy(predicted[:, defined]), torch.from_numpy(actual[:, defined]))
        result[defined] = np.atleast_1d(rho.double().numpy())
    return result
