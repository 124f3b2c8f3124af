"""PNG plots of the evaluations (matplotlib, no display needed) and logging them to a W&B run.

Each ``plot_*`` takes ``{method name: result}`` so methods appear side by side, writes a PNG and
returns its path. :func:`log_to_wandb` logs images and scalars to a run you already have
(``wandb.init(...)`` or ``WandbLogger.experiment``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lightning_tda.evaluation.counterfactual import CounterfactualResult
from lightning_tda.evaluation.detection import LeakageResult, MislabelResult
from lightning_tda.evaluation.lds import LDSResult


def _figure(width: float = 6.0, height: float = 4.0):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(width, height))


def _save(plt: Any, fig: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_lds(results: Mapping[str, LDSResult], path: str | os.PathLike, title: str = "LDS") -> Path:
    """Bar per method: mean LDS with its bootstrap interval."""
    plt, fig, ax = _figure()
    names = list(results)
    means = np.array([results[n].mean for n in names])
    errors = np.array([[results[n].mean - results[n].ci_low, results[n].ci_high - results[n].mean] for n in names]).T
    ax.bar(names, means, yerr=errors, capsize=4, color="tab:blue")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_ylabel("LDS (Spearman)")
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    return _save(plt, fig, path)


def plot_counterfactual(
    results: Mapping[str, CounterfactualResult], path: str | os.PathLike, title: str = "Subset removal"
) -> Path:
    """Flip rate against the number removed, one line per method, random removal dashed."""
    plt, fig, ax = _figure()
    for name, result in results.items():
        ax.plot(result.ks, result.flip_fraction, marker="o", label=name)
    first = next(iter(results.values()))
    ax.plot(first.ks, first.random_flip_fraction, linestyle="--", color="gray", marker="x", label="random")
    ax.set_xlabel("training examples removed (k)")
    ax.set_ylabel("fraction of queries flipped")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.legend()
    return _save(plt, fig, path)


def plot_mislabel(
    results: Mapping[str, MislabelResult], path: str | os.PathLike, title: str = "Mislabel detection"
) -> Path:
    """Fraction of flipped labels found against the fraction of the training set inspected."""
    plt, fig, ax = _figure()
    for name, result in results.items():
        ax.plot(result.fraction_inspected, result.fraction_found, label=f"{name} (AUC {result.auc:.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="random")
    ax.set_xlabel("fraction of training set inspected")
    ax.set_ylabel("fraction of flipped labels found")
    ax.set_title(title)
    ax.legend(fontsize="small")
    return _save(plt, fig, path)


def plot_leakage(
    results: Mapping[str, LeakageResult], path: str | os.PathLike, title: str = "Leakage detection"
) -> Path:
    """Grouped bars: top-k rate of the planted duplicate, per method and k."""
    plt, fig, ax = _figure()
    names = list(results)
    ks = sorted(next(iter(results.values())).top_k)
    width = 0.8 / len(ks)
    positions = np.arange(len(names))
    for i, k in enumerate(ks):
        ax.bar(positions + i * width, [results[n].top_k[k] for n in names], width, label=f"top-{k}")
    ax.set_xticks(positions + width * (len(ks) - 1) / 2, names, rotation=30)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction of leaked queries")
    ax.set_title(title)
    ax.legend()
    return _save(plt, fig, path)


def log_to_wandb(
    run: Any,
    images: Mapping[str, str | os.PathLike] | None = None,
    scalars: Mapping[str, float] | None = None,
    step: int | None = None,
) -> None:
    """Log PNGs (as ``wandb.Image``) and scalars to an existing W&B run in one ``run.log`` call."""
    import wandb

    payload: dict[str, Any] = {key: wandb.Image(str(path)) for key, path in (images or {}).items()}
    payload.update({key: float(value) for key, value in (scalars or {}).items()})
    if not payload:
        raise ValueError("log_to_wandb: nothing to log; pass images and/or scalars.")
    run.log(payload, step=step)
