"""Data-debugging evaluations on planted problems: mislabeled examples and train/test leakage.

* **Mislabel detection**: given which training labels were flipped, rank the training set by
  suspicion and report the ROC AUC and the fraction of flipped examples found when inspecting the
  top x% of the ranking. Suspicion is the self-influence (an example that only its own wrong label
  explains has a large one) or, from scores on a clean validation set, how much an example *hurts*
  the validation queries in total (``-Σ_q τ(q, m)``).
* **Leakage detection**: copies of test points are planted in the training set; for each such
  test point (query), the rank of its duplicate among all training examples. Top-k rates are the
  fraction of queries whose duplicate ranks within the first k; ties count against the duplicate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import Tensor

from lightning_tda.scores import Scores


@dataclass
class MislabelResult:
    """Mislabel detection quality.

    Attributes:
        auc: ROC AUC of the suspicion ranking against the flip mask (0.5 = chance).
        fraction_inspected: ``(N + 1,)`` from 0 to 1, the top share of the ranking inspected.
        fraction_found: ``(N + 1,)`` share of the flipped examples among the inspected ones.
        suspicion: ``(N,)`` the ranking score used (higher = more suspicious).
    """

    auc: float
    fraction_inspected: np.ndarray
    fraction_found: np.ndarray
    suspicion: np.ndarray

    def found_at(self, fraction: float) -> float:
        """Share of the flipped examples found when inspecting the top ``fraction`` of the ranking."""
        count = int(np.floor(fraction * (len(self.fraction_inspected) - 1) + 1e-9))
        return float(self.fraction_found[count])

    def scalars(self, prefix: str = "mislabel") -> dict[str, float]:
        return {
            f"{prefix}/auc": self.auc,
            f"{prefix}/found@10%": self.found_at(0.1),
            f"{prefix}/found@20%": self.found_at(0.2),
        }


def suspicion_scores(scores: Scores | Tensor | np.ndarray) -> np.ndarray:
    """``(N,)`` higher = more likely mislabeled: self-influence as is, pairwise scores as ``-Σ_q τ(q, m)``."""
    values = scores.values if isinstance(scores, Scores) else torch.as_tensor(scores)
    values = values.double().numpy()
    if values.ndim == 1:
        return values
    if values.ndim == 2:
        return -values.sum(axis=0)
    raise ValueError(f"Scores of shape {values.shape}: pass self-influence (N,) or validation scores (Q, N).")


def mislabel_detection(scores: Scores | Tensor | np.ndarray, flipped: Tensor | np.ndarray) -> MislabelResult:
    """Rank training examples by :func:`suspicion_scores` and compare with the ``(N,)`` bool flip mask."""
    suspicion = suspicion_scores(scores)
    mask = np.asarray(torch.as_tensor(flipped).bool().numpy())
    if mask.shape != suspicion.shape:
        raise ValueError(f"flipped has shape {mask.shape} but the scores cover {suspicion.shape[0]} training examples.")
    if mask.all() or not mask.any():
        raise ValueError("flipped must mark some, but not all, training examples as mislabeled.")
    if not np.isfinite(suspicion).all():
        raise ValueError("The scores contain NaN or infinite values; check the method's damping or precision.")
    auc = float(roc_auc_score(mask, suspicion))  # rank-based: any monotone rescaling gives the same AUC
    order = np.argsort(-suspicion, kind="stable")
    found = np.concatenate([[0.0], np.cumsum(mask[order]) / mask.sum()])
    inspected = np.arange(len(mask) + 1) / len(mask)
    return MislabelResult(auc, inspected, found, suspicion)


@dataclass
class LeakageResult:
    """Leakage detection quality.

    Attributes:
        ranks: ``(Q,)`` 1-based rank of each query's planted duplicate (1 = ranked first).
        top_k: ``{k: fraction of queries whose duplicate ranks <= k}``.
    """

    ranks: np.ndarray
    top_k: dict[int, float]

    def scalars(self, prefix: str = "leakage") -> dict[str, float]:
        out = {f"{prefix}/top{k}": v for k, v in self.top_k.items()}
        out[f"{prefix}/mean_reciprocal_rank"] = float(np.mean(1.0 / self.ranks))
        return out


def leakage_detection(
    scores: Scores | Tensor | np.ndarray,
    duplicates: Sequence[int] | np.ndarray | Tensor,
    ks: Sequence[int] = (1, 5, 10),
    self_influence: Scores | Tensor | np.ndarray | None = None,
) -> LeakageResult:
    """Rank of each query's duplicate among the training examples by score (ties count against it).

    Raw influence favours training examples with large gradients over a well-fit duplicate (whose
    gradient, like its query's, is small); pass ``self_influence`` to rank by
    ``τ(q, m) / √|τ(m, m)|`` instead (the cosine-like normalization of RelatIF / gradient cosine).
    For a symmetric positive semi-definite score this ranks an *exact* copy first by Cauchy–Schwarz,
    so it is informative for near-duplicates, not for exact ones.

    Args:
        scores: ``(Q, N)`` scores of the leaked test points over the training set.
        duplicates: ``(Q,)`` training-set position of each query's planted copy.
        ks: the top-k cut-offs to report.
        self_influence: optional ``(N,)`` self-influence of the training examples for the normalization.
    """
    values = scores.values if isinstance(scores, Scores) else torch.as_tensor(scores)
    values = values.double().numpy()
    duplicates = np.asarray(torch.as_tensor(duplicates).long().numpy())
    if values.ndim != 2 or duplicates.shape != (values.shape[0],):
        raise ValueError(
            f"Need scores (Q, N) and one duplicate index per query; got scores {values.shape} and "
            f"duplicates {duplicates.shape}."
        )
    if duplicates.min() < 0 or duplicates.max() >= values.shape[1]:
        raise ValueError(f"duplicates must be training positions in [0, {values.shape[1]}).")
    if self_influence is not None:
        own_scores = self_influence.values if isinstance(self_influence, Scores) else torch.as_tensor(self_influence)
        norms = np.sqrt(np.abs(own_scores.double().numpy()))
        if norms.shape != (values.shape[1],):
            raise ValueError(f"self_influence has shape {norms.shape}; expected one value per training example.")
        values = values / np.maximum(norms, np.finfo(np.float64).tiny)[None, :]
    if not np.isfinite(values).all():
        raise ValueError("The scores contain NaN or infinite values; check the method's damping or precision.")
    own = values[np.arange(len(duplicates)), duplicates]
    ranks = (values >= own[:, None]).sum(axis=1)  # counts the duplicate itself, so rank 1 = strictly first
    return LeakageResult(ranks, {int(k): float(np.mean(ranks <= k)) for k in ks})
