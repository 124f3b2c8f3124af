"""Subset-removal counterfactual: does removing a query's most helpful examples change its prediction?

For each correctly classified query (correct under the models trained on the full set with every
seed), remove its ``k`` highest-scoring training examples, re-train, and count the query as
flipped when the re-trained model misclassifies it. Good scores flip many queries with small
``k``; the baseline removes ``k`` random examples instead. Re-trainings go through the same
cache as the LDS ground truth, so the full-data models and the random baseline are shared by
every method evaluated with the same queries, seeds and tag.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from lightning_tda.batches import Data
from lightning_tda.evaluation.lds import _score_matrix
from lightning_tda.evaluation.retrain import RetrainRunner, TrainFn
from lightning_tda.scores import Scores
from lightning_tda.tasks import ClassificationTask, Task


@dataclass
class CounterfactualResult:
    """Flip rates after removing the top-``k`` helpful examples, next to random removal.

    Attributes:
        ks: ``(K,)`` numbers of removed examples.
        flip_fraction: ``(K,)`` fraction of (query, seed) pairs that flipped, top-``k`` removal.
        random_flip_fraction: ``(K,)`` the same for ``k`` random examples removed.
        queries: indices (into the query set) of the correctly classified queries tested.
        num_seeds: re-training seeds per removal.
    """

    ks: np.ndarray
    flip_fraction: np.ndarray
    random_flip_fraction: np.ndarray
    queries: np.ndarray
    num_seeds: int

    def scalars(self, prefix: str = "counterfactual") -> dict[str, float]:
        out = {}
        for k, flip, rand in zip(self.ks, self.flip_fraction, self.random_flip_fraction):
            out[f"{prefix}/flip@{k}"] = float(flip)
            out[f"{prefix}/random_flip@{k}"] = float(rand)
        return out


def subset_removal(
    scores: Scores | np.ndarray,
    train_fn: TrainFn,
    task: Task,
    queries: Data,
    *,
    ks: Sequence[int] = (10, 20, 40),
    num_seeds: int = 1,
    max_queries: int | None = 10,
    seed: int = 0,
    cache: str | os.PathLike | None = None,
    tag: str = "",
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> CounterfactualResult:
    """Flip rates of correctly classified queries after removing their top-``k`` examples (see module doc).

    Args:
        scores: ``(Q, n_train)`` scores of ``queries`` over the whole training set.
        train_fn: ``train_fn(subset_indices, seed) -> trained model``, the attributed run's recipe.
        task: a classification task; a query is correct when its arg-max class is its label.
        queries: the query set the scores were computed for, in the same order.
        ks: numbers of examples to remove.
        num_seeds: re-training seeds per removal (seeds ``0..num_seeds-1``).
        max_queries: test at most this many correctly classified queries (the first ones), ``None`` for all.
        seed: seed of the random-removal baseline.
        cache, tag, workers, progress: as in :func:`~lightning_tda.evaluation.lds_ground_truth`.
    """
    if not isinstance(task, ClassificationTask):
        raise ValueError(
            f"Subset removal counts flipped classifications, but the task is a {type(task).__name__}; "
            "use a ClassificationTask (for regression, use the LDS)."
        )
    values = _score_matrix(scores)
    n_queries, n_train = values.shape
    ks_array = np.asarray(sorted(set(int(k) for k in ks)), dtype=np.int64)
    if len(ks_array) == 0 or ks_array[0] < 1 or ks_array[-1] >= n_train:
        raise ValueError(f"ks={list(ks)}: each k must be between 1 and n_train - 1 = {n_train - 1}.")
    seeds = list(range(num_seeds))
    runner = RetrainRunner(train_fn, task, queries, cache=cache, tag=tag, workers=workers)

    full = np.arange(n_train)
    full_correct = np.stack([o.correct for o in runner.run([(full, s) for s in seeds])])  # (R, Q)
    if full_correct.shape[1] != n_queries:
        raise ValueError(f"Scores cover {n_queries} queries but the query set has {full_correct.shape[1]}.")
    if np.isnan(full_correct).any():
        raise ValueError("Subset removal needs (batch, classes) logits to tell correct predictions; got other outputs.")
    correct = np.flatnonzero((full_correct == 1).all(axis=0))
    chosen = correct if max_queries is None else correct[:max_queries]
    if len(chosen) == 0:
        raise ValueError("No query is classified correctly by the full-data models; nothing can flip.")

    rng = np.random.default_rng(seed)
    jobs, slots = [], []
    for kind in ("top", "random"):
        for q in chosen:
            order = np.argsort(-values[q], kind="stable")
            for ki, k in enumerate(ks_array):
                removed = order[:k] if kind == "top" else rng.choice(n_train, size=k, replace=False)
                kept = np.setdiff1d(full, removed)
                for s in seeds:
                    jobs.append((kept, s))
                    slots.append((kind, q, ki))
    outcomes = runner.run(jobs, progress=progress)

    flips = {"top": np.zeros(len(ks_array)), "random": np.zeros(len(ks_array))}
    for (kind, q, ki), outcome in zip(slots, outcomes):
        flips[kind][ki] += float(outcome.correct[q] == 0)
    total = len(chosen) * num_seeds
    return CounterfactualResult(ks_array, flips["top"] / total, flips["random"] / total, chosen, num_seeds)
