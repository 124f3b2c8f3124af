"""The Fisher a curvature estimate uses, in one place: per-example pseudo-gradients whose outer products
sum to each example's Fisher (the true Fisher: the Gauss-Newton matrix; or the empirical Fisher).

The pseudo-gradients of the true Fisher are, where affordable, the **exact expectation** over the
model's predictive distribution: each square-root factor of the output Hessian (``task.fisher_factors``)
is back-propagated (K factors for K outputs, in one vmapped backward pass), so
``Σ_k vec(G_{n,k}) vec(G_{n,k})ᵀ`` is the example's Gauss-Newton matrix and has no sampling noise.
That multiplies the backward and per-factor work by K, so larger models (K × tracked parameters
above ``EXACT_BUDGET``) draw ``DEFAULT_SAMPLES`` targets per example instead (:class:`FisherOptions`;
``samples=m`` or ``samples="exact"`` choose; kronfluence draws one). Sequence outputs always use
samples, because the factors of a sum over positions cannot be back-propagated jointly without
cross-position terms. The callback's statistics steps and the attribution methods' curvature passes
both choose here. Nothing here imports Lightning.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_tda.layers.capture import LayerCapture
from lightning_tda.layers.tracked import TrackedLayer
from lightning_tda.tasks import Task

DEFAULT_SAMPLES = 4  # targets per example when the exact expectation is not affordable
MAX_EXACT_FACTORS = 64  # back-propagate every output-Hessian factor up to this many outputs
EXACT_BUDGET = 2**24  # ... and while (outputs) × (tracked parameters) stays below this


@dataclass(frozen=True)
class FisherOptions:
    """Which per-example pseudo-gradients a curvature estimate uses: the callback's statistics steps and the
    methods' curvature passes both choose here.

    ``kind="true"``: ``samples="exact"`` back-propagates every output-Hessian factor (the exact
    expectation over the predictive distribution; outputs ``(B,)`` or ``(B, K)``), ``samples=m`` draws
    ``m`` targets per example, and ``samples=None`` (the default) takes the exact expectation where
    it is affordable (see :meth:`exact_expectation`) and draws ``fallback_samples`` targets otherwise.
    ``exact_outputs`` caps "affordable" at that many output-Hessian factors (the callback's
    ``exact_fisher_outputs``: during training every factor is one more backward pass, so by default only
    scalar regression is exact there); ``None`` uses the budget below. ``kind="empirical"``: the real-label
    training gradient.
    """

    kind: str = "true"
    samples: int | str | None = None
    seed: int = 0
    exact_outputs: int | None = None
    fallback_samples: int = DEFAULT_SAMPLES

    def __post_init__(self) -> None:
        if self.kind not in ("true", "empirical"):
            raise ValueError(f"fisher={self.kind!r}: use 'true' or 'empirical'.")
        if self.fallback_samples < 1:
            raise ValueError(f"fallback_samples={self.fallback_samples!r}: draw at least one target per example.")
        number = isinstance(self.samples, int) and not isinstance(self.samples, bool) and self.samples >= 1
        if self.samples not in (None, "exact") and not number:
            raise ValueError(
                f"samples={self.samples!r}: use None (exact expectation where affordable), 'exact' or a positive "
                f"integer (sampled targets per example)."
            )

    def exact_expectation(self, outputs: Tensor, layers: Sequence[TrackedLayer]) -> bool:
        """Whether the true-Fisher passes back-propagate all ``K`` output-Hessian factors of ``outputs``.

        With ``samples=None``: when outputs are ``(B,)`` or ``(B, K)`` with ``K <= exact_outputs`` if that is
        set, else ``K <= MAX_EXACT_FACTORS`` and ``K`` × the tracked parameters ``<= EXACT_BUDGET``. The exact
        expectation multiplies the backward pass and the per-factor work of the passes by ``K``: on the digits
        MLP (10 × 26k) it is cheap and removes the sampling noise that costs influence accuracy there; on a
        ResNet-18 at half width (10 × 2.8M) it took 1.8x the CPU time of 4 sampled targets, whose scores
        correlate 0.985 with it (BENCHMARKS.md).
        """
        flat = outputs.dim() <= 2
        if self.samples == "exact":
            if not flat:
                raise ValueError(
                    f"samples='exact' back-propagates the output-Hessian factors of (B,) or (B, K) outputs; these "
                    f"are {tuple(outputs.shape)} (a sequence). Pass samples=<number of sampled targets> instead."
                )
            return True
        if self.samples is not None or not flat:
            return False
        factors = outputs.reshape(len(outputs), -1).shape[1]
        if self.exact_outputs is not None:
            return factors <= self.exact_outputs
        parameters = sum(layer.out_features * layer.a_dim for layer in layers)
        return factors <= MAX_EXACT_FACTORS and factors * parameters <= EXACT_BUDGET


def pseudo_gradient_rows(
    capture: LayerCapture,
    outputs: Tensor,
    targets: Tensor,
    task: Task,
    fisher: FisherOptions,
    generator: torch.Generator | None,
    keep_graph: bool = False,
) -> Iterator[tuple[dict[str, Tensor], float]]:
    """Yield ``(output-gradient rows {layer: (B, R, out)}, weight)`` whose weighted per-example outer
    products sum to the example's Fisher (true: Gauss-Newton; empirical: ``g gᵀ``). ``keep_graph`` keeps
    the graph of ``outputs`` after the last backward (the callback reuses the training step's graph)."""
    if fisher.kind == "empirical":
        yield capture.output_gradient_rows(task.loss(outputs, targets).sum(), retain_graph=keep_graph), 1.0
        return
    if fisher.exact_expectation(outputs, capture.layers):
        factors = task.fisher_factors(outputs)
        try:
            yield from ((rows, 1.0) for rows in _batched_output_gradient_rows(capture, outputs, factors))
        except RuntimeError:  # an operation without a batched backward: one backward pass per factor
            for k, factor in enumerate(factors):
                keep = keep_graph or k < len(factors) - 1
                yield capture.output_gradient_rows((outputs * factor).sum(), retain_graph=keep), 1.0
        return
    samples = fisher.samples or fisher.fallback_samples
    for s in range(samples):
        sampled = task.sample_targets(outputs, generator, targets=targets)
        loss = task.sampled_fisher_loss(outputs, sampled).sum()
        yield capture.output_gradient_rows(loss, retain_graph=keep_graph or s < samples - 1), 1.0 / samples


def _batched_output_gradient_rows(capture: LayerCapture, outputs: Tensor, factors: Tensor) -> list[dict[str, Tensor]]:
    """Output-gradient rows of every factor ``⟨factor_k, outputs⟩`` from one vmapped backward pass."""
    names = list(capture.outputs)
    flat = [out for name in names for out in capture.outputs[name]]
    grads = torch.autograd.grad(
        outputs, flat, grad_outputs=factors, retain_graph=True, is_grads_batched=True, allow_unused=True
    )
    per_factor: list[dict[str, Tensor]] = [{} for _ in range(len(factors))]
    position = 0
    for name in names:
        layer = next(la for la in capture.layers if la.name == name)
        parts = []
        for out in capture.outputs[name]:
            grad = grads[position]
            position += 1
            parts.append(out.new_zeros(len(factors), *out.shape) if grad is None else grad)
        for k in range(len(factors)):
            per_factor[k][name] = torch.cat([layer.gradient_rows(part[k]) for part in parts], dim=1)
    return per_factor
