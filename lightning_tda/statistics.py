"""Streaming K-FAC statistics: per-layer sums of activation and gradient outer products.

Per tracked layer we keep, in float64,

* ``A_sum = Σ_rows a aᵀ`` with ``A_count`` = number of rows (examples × tokens/patches; padded
  tokens masked by the task are not rows), kept as its diagonal ``(a_dim,)`` for embeddings, whose
  one-hot inputs make it diagonal (token counts; a vocabulary-squared matrix is never formed),
* ``S_sum = Σ_rows δ δᵀ`` with ``S_count`` = number of examples,

so ``A = A_sum / A_count`` and ``S = S_sum / S_count`` give the K-FAC factors with the convention
used by kronfluence for sequences (``A ⊗ S`` then approximates the per-example Gauss-Newton
Hessian). Sums and counts are exact, mergeable across steps, checkpoints and ranks.
Contributions of one step are staged and committed only if every value is finite.
Nothing here imports Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_tda.capture import TrackedLayer

FACTORS = ("A_sum", "A_count", "S_sum", "S_count")


def outer_sum(rows: Tensor) -> Tensor:
    """``Σ_r x_r x_rᵀ`` over all rows of a ``(..., d)`` tensor, computed in float64: ``(d, d)``."""
    flat = rows.reshape(-1, rows.shape[-1]).double()
    return flat.T @ flat


class KFACStatistics:
    """Float64 K-FAC sums for a set of layers, with per-step staging.

    Call :meth:`stage_activations` / :meth:`stage_gradients` during a step, then :meth:`commit`
    (adds the staged sums if they are all finite, else drops them and counts the step in
    ``skipped_steps``). :meth:`factors` returns the averaged ``(A, S)`` of a layer.
    """

    def __init__(self, layers: Sequence[TrackedLayer]) -> None:
        self.layers = {layer.name: layer for layer in layers}
        self.sums: dict[str, dict[str, Tensor]] = {}
        self.skipped_steps = 0
        self.reset()
        self._staged: dict[str, dict[str, Tensor]] = {}

    def reset(self) -> None:
        """Zero every sum (used when a segment closes)."""
        self.sums = {name: self._zeros(layer) for name, layer in self.layers.items()}
        self.skipped_steps = 0

    @staticmethod
    def _zeros(layer: TrackedLayer) -> dict[str, Tensor]:
        return {
            "A_sum": torch.zeros(layer.input_factor_shape, dtype=torch.float64),
            "A_count": torch.zeros((), dtype=torch.float64),
            "S_sum": torch.zeros(layer.out_features, layer.out_features, dtype=torch.float64),
            "S_count": torch.zeros((), dtype=torch.float64),
        }

    def _stage(self, name: str) -> dict[str, Tensor]:
        if name not in self._staged:
            self._staged[name] = self._zeros(self.layers[name])
        return self._staged[name]

    def stage_activations(self, name: str, rows: Tensor, count: Tensor | float | None = None) -> None:
        """Stage input rows of layer ``name`` (``LayerCapture.activations``: ``(B, R, a_dim)``, or token
        ids ``(B, R)`` for an embedding) and their number (``LayerCapture.row_counts``; default ``B·R``)."""
        staged = self._stage(name)
        staged["A_sum"] += self.layers[name].input_sum(rows).cpu()
        staged["A_count"] += float(rows.shape[0] * rows.shape[1]) if count is None else torch.as_tensor(count).cpu()

    def stage_gradients(self, name: str, rows: Tensor, scale: float = 1.0) -> None:
        """Stage per-example output-gradient rows ``(B, R, out)``, multiplied by ``scale`` first."""
        staged = self._stage(name)
        staged["S_sum"] += outer_sum(rows).cpu() * (scale * scale)
        staged["S_count"] += rows.shape[0]

    def commit(self) -> dict[str, dict[str, Tensor]] | None:
        """Add the staged step to the sums if finite and return it; return None (and count the step
        in ``skipped_steps``) if any staged value is NaN or infinite."""
        staged, self._staged = self._staged, {}
        if not all(torch.isfinite(t).all() for parts in staged.values() for t in parts.values()):
            self.skipped_steps += 1
            return None
        for name, parts in staged.items():
            for key, value in parts.items():
                self.sums[name][key] += value
        return staged

    def discard_staged(self) -> None:
        self._staged = {}

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        """Averaged ``(A, S)`` of layer ``name``, float64, shapes ``(a_dim, a_dim)`` (``(a_dim,)``, the diagonal,
        for an embedding) and ``(out, out)``."""
        sums = self.sums[name]
        if sums["A_count"] == 0 or sums["S_count"] == 0:
            raise ValueError(f"No statistics were accumulated for layer {name!r}.")
        return sums["A_sum"] / sums["A_count"], sums["S_sum"] / sums["S_count"]

    def flat_tensors(self) -> list[Tensor]:
        """All sums in a fixed order (for cross-process reduction and checkpointing)."""
        return [self.sums[name][key] for name in sorted(self.sums) for key in FACTORS]

    def load_flat_tensors(self, tensors: Sequence[Tensor]) -> None:
        tensors = iter(tensors)
        for name in sorted(self.sums):
            for key in FACTORS:
                self.sums[name][key] = next(tensors).to(torch.float64).clone()
