"""EK-FAC influence functions at the final checkpoint, from the curvature recorded during training.

``τ(z_q, z_m) = ⟨∇θ f(z_q, θ_T), (H + λI)⁻¹ ∇θ ℓ(z_m, θ_T)⟩`` (docs/algorithms.md §3), with
``H`` the block-diagonal (per-layer) EK-FAC approximation of the Gauss-Newton Hessian of the mean
training loss. Removing ``z_m`` moves the parameters by ``+(1/N)(H + λI)⁻¹ g(z_m)``, which raises
the query measurement by ``τ/N``: the scores are ``τ/N`` (the library's unit: the predicted change
of the query's measurement when the example is removed), and positive means it helped the query.

Influence functions assume training reached an optimum; :mod:`~lightning_tda.methods.convergence`
checks the trace for the cases where it visibly did not (stopped early, or curvature training never
settled into) and the scores' config carries its ``warnings`` (also issued as a Python warning).

Computed query-side: the (few) query gradients are preconditioned once, then training examples are
streamed in batches and only dot products are kept, so per-example gradients of the training set
never exist all at once.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from lightning_tda.batches import Data
from lightning_tda.curvature.eigen import Curvature
from lightning_tda.curvature.fit import COVARIANCE_SOURCES, CURVATURES, fit_curvature
from lightning_tda.curvature.passes import PassData
from lightning_tda.layers.gradients import total_dot
from lightning_tda.methods.base import AttributionMethod, MethodOptions
from lightning_tda.methods.convergence import ConvergenceCheck, check_convergence
from lightning_tda.scores import Scores
from lightning_tda.tasks import Task
from lightning_tda.trace.cache import cache_location
from lightning_tda.trace.reader import Trace


class EKFACInfluence(AttributionMethod):
    """Influence functions with EK-FAC (or K-FAC, or exact per-layer Gauss-Newton) curvature.

    Args:
        trace, model, task: see :class:`~lightning_tda.methods.base.AttributionMethod`.
        damping: ``"heuristic"`` (``damping_scale`` × the mean eigenvalue of each layer, kronfluence's
            heuristic with 0.1), a float added to every layer's eigenvalues, or ``{layer: float}``.
        damping_scale: the factor of the heuristic.
        curvature: ``"ekfac"``, ``"kfac"`` (no correction pass) or ``"gauss-newton"`` (exact dense
            per-layer blocks; small models only, a reference).
        covariances: ``"recompute"`` (default) recomputes ``(A, S)`` at the final parameters over the
            training set (the textbook estimator, what kronfluence does); ``"stream"`` uses the ones
            recorded in the segment of the final checkpoint and skips that pass. Recompute is the
            default because the influence function is defined at the final parameters: on the digits
            MLP the streamed basis (averaged over the last third of training, while the model grew
            confident) gives mean per-query Pearson 0.28 with exact per-layer Gauss-Newton influence,
            the recomputed one 0.44 (EK-FAC in an ideal Kronecker basis: 0.46), for one extra pass as
            cheap as the correction pass (BENCHMARKS.md, ``bench_ekfac.py``). SOURCE, which needs
            the curvature along training, uses the streamed covariances.
        fisher: ``"true"`` or ``"empirical"`` for the fitting passes; default: what the trace recorded.
        samples: targets per example in the true-Fisher passes: ``None`` = the exact expectation over
            the predictive distribution where affordable (few outputs and a model small enough, see
            ``curvature.FisherOptions``), else 4 sampled targets; ``"exact"`` forces the expectation;
            an integer = that many sampled targets.
        correction_examples: fit on a random subset of this many training examples (seeded).
        seed: seed of the subset and of sampled targets.
        cache: where the fitted curvature is reused from and stored: ``"sidecar"`` (a file next to the
            trace, default), ``"trace"`` (inside it) or ``"none"``; see :mod:`lightning_tda.trace.cache`.
        options: the shared :class:`~lightning_tda.methods.base.MethodOptions`.
    """

    name = "ekfac"
    unit = "predicted change of the query's measurement when the training example is removed: τ/N"

    def __init__(
        self,
        trace: Trace,
        model: torch.nn.Module,
        task: Task,
        *,
        damping: float | str | dict[str, float] = "heuristic",
        damping_scale: float = 0.1,
        curvature: str = "ekfac",
        covariances: str = "recompute",
        fisher: str | None = None,
        samples: int | str | None = None,
        correction_examples: int | None = None,
        seed: int = 0,
        cache: str | bool = "sidecar",
        options: MethodOptions | None = None,
    ) -> None:
        values = list(damping.values()) if isinstance(damping, dict) else [damping]
        if damping != "heuristic" and not all(isinstance(v, (int, float)) and v >= 0 for v in values):
            raise ValueError(
                f"damping={damping!r}: use 'heuristic', a non-negative number or {{layer name: non-negative number}}."
            )
        if damping_scale <= 0:
            raise ValueError(f"damping_scale={damping_scale!r} must be positive.")
        if curvature not in CURVATURES:
            raise ValueError(f"curvature={curvature!r}: use one of {', '.join(map(repr, CURVATURES))}.")
        if covariances not in COVARIANCE_SOURCES:
            raise ValueError(f"covariances={covariances!r}: use 'stream' (recorded in training) or 'recompute'.")
        super().__init__(
            trace,
            model,
            task,
            options=options,
        )
        self.damping = damping
        self.damping_scale = damping_scale
        self.curvature_kind = curvature
        self.covariances = covariances
        self.fisher = fisher
        self.samples = samples
        self.correction_examples = correction_examples
        self.seed = seed
        self.cache = cache_location(cache)
        self.curvature: Curvature | None = None
        self.dampings: dict[str, float] = {}
        self.convergence: ConvergenceCheck | None = None

    def config(self) -> dict[str, Any]:
        return (
            super().config()
            | {
                "damping": self.damping,
                "damping_scale": self.damping_scale,
                "curvature": self.curvature_kind,
                "covariances": self.covariances,
                "fisher": self.fisher or self.trace.fisher,
                "samples": self.samples,
                "correction_examples": self.correction_examples,
                "seed": self.seed,
                "checkpoint": self.trace.final_checkpoint.index,
            }
            | (
                {"convergence": self.convergence.as_config(), "warnings": list(self.convergence.warnings)}
                if self.convergence is not None
                else {}
            )
        )

    # --- fitting ----------------------------------------------------------------------------------
    def fit(self, train: Data) -> Curvature:
        """Fit (or load from the trace's cache) the curvature at the final checkpoint; sets ``dampings``."""
        final = self.trace.final_checkpoint
        world = self.fabric.world_size if self.fabric is not None else 1
        rank = self.fabric.global_rank if self.fabric is not None else 0
        data = PassData(
            train,
            batch_size=self.batch_size,
            device=self.device,
            examples=self.correction_examples,
            seed=self.seed,
            shard=(rank, world),
            reduce=self.sum_across_processes,
            barrier=self.fabric.barrier if world > 1 else None,
            progress=self.progress,
        )
        self.curvature = fit_curvature(
            self.trace,
            self.model,
            self.task,
            self.layers,
            [final.index],
            data,
            segment=final.segment,
            curvature=self.curvature_kind,
            covariances=self.covariances,
            fisher=self.fisher,
            samples=self.samples,
            cache=self.cache,
        )
        self.curvature = {name: c.to(self.device, self.dtype) for name, c in self.curvature.items()}
        self.dampings = {name: self._layer_damping(name, c.mean_eigenvalue) for name, c in self.curvature.items()}
        means = {name: c.mean_eigenvalue for name, c in self.curvature.items()}
        self.convergence = check_convergence(self.trace, means, len(self.loader(train, "train").dataset))
        if self.convergence.warnings:
            warnings.warn("EK-FAC IF: " + " ".join(self.convergence.warnings), stacklevel=3)
        return self.curvature

    def _layer_damping(self, name: str, mean_eigenvalue: float) -> float:
        if isinstance(self.damping, dict):
            if name not in self.damping:
                raise ValueError(f"damping has no value for {name!r}; give one per layer: {list(self.curvature)}")
            return float(self.damping[name])
        if self.damping != "heuristic":
            return float(self.damping)
        if mean_eigenvalue <= 0:
            raise ValueError(
                f"Layer {name!r} has zero curvature (its gradients vanish on the training set), so the "
                f"heuristic damping is zero. Pass damping=<a positive number> or exclude the layer with options.layers."
            )
        return self.damping_scale * mean_eigenvalue

    def precondition(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        """``(H_l + λ_l I)⁻¹ G_l`` per layer for gradients ``{layer: (B, out, a_dim)}``, in the model's dtype
        (float64 with exact Gauss-Newton blocks)."""
        return {name: self.curvature[name].damped_inverse(g, self.dampings[name]) for name, g in grads.items()}

    # --- scores -----------------------------------------------------------------------------------
    def attribute(self, queries: Data, train: Data) -> Scores:
        """Influence scores ``(n_queries, n_train)`` (float32); positive = the example helped the query."""
        self.fit(train)
        self.load_checkpoint(self.trace.final_checkpoint.index)
        query_matrices = self.query_matrices(queries, transform=self.precondition)  # (Q, out, a_dim) per layer
        n_queries, n_train = len(next(iter(query_matrices.values()))), len(self.loader(train, "train").dataset)
        values = torch.zeros(n_queries, n_train, dtype=torch.float64, device=self.device)
        for ids, batch in self.train_batches(train, "influence"):
            values[:, ids.to(self.device)] = total_dot(self.gradient_rows(batch, "train"), query_matrices)
        values = self.sum_across_processes(values) / self.training_set_size(n_train)
        return self.scores(values, n_queries, n_train)

    def self_influence(self, train: Data) -> Scores:
        """``⟨g(z), (H + λI)⁻¹ g(z)⟩/N`` for every training example, shape ``(N,)``, without the N×N matrix:
        the predicted rise of the example's own loss when it is removed."""
        self.fit(train)
        self.load_checkpoint(self.trace.final_checkpoint.index)
        n_train = len(self.loader(train, "train").dataset)
        values = torch.zeros(n_train, dtype=torch.float64, device=self.device)
        for ids, batch in self.train_batches(train, "self-influence"):
            total = torch.zeros(len(ids), dtype=torch.float64, device=self.device)
            for name, g in self.gradient_rows(batch, "train").items():
                for chunk, dense in g.chunks():
                    preconditioned = self.curvature[name].damped_inverse(dense, self.dampings[name])
                    total[chunk] += (preconditioned * dense.double()).sum(dim=(1, 2))
            values[ids.to(self.device)] = total
        values = self.sum_across_processes(values) / self.training_set_size(n_train)
        return self.scores(values, None, n_train, kind="self")
