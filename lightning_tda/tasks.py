"""Tasks: how to turn ``(model, batch)`` into per-example losses and query measurements.

Every attribution method and the training-time curvature capture go through a :class:`Task`, so a
model only has to say once how its batches look and which loss it trains on.

Conventions
-----------
* ``loss(outputs, targets)`` returns the **per-example** loss, shape ``(B,)``. The training
  objective is assumed to be the batch mean of it (what ``reduction="mean"`` gives).
* ``measurement(model, batch)`` returns a per-example query quantity where **lower is better**
  (the loss by default; ``-margin`` for the margin measurement). Methods differentiate it, so a
  positive score always means "the training example helped the query".
* ``fisher_factors(outputs)`` returns vectors ``v_k`` with ``sum_k v_k v_kᵀ`` equal to the Hessian
  of the per-example loss with respect to the model outputs (the Gauss-Newton output Hessian).
  Back-propagating them gives the *exact* expectation of the true Fisher; ``sample_targets`` draws
  targets from the model's predictive distribution for the sampled (cheaper) estimate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Getter = Callable[[Any], Any]


def _first(batch: Any) -> Any:
    return batch[0]


def _second(batch: Any) -> Any:
    return batch[1]


def at_least_float32(x: Tensor) -> Tensor:
    """Half-precision tensors as float32 (losses need the range); float32 and float64 unchanged."""
    return x.float() if x.is_floating_point() and x.element_size() < 4 else x


class Task:
    """Base task for ``(inputs, targets)`` batches; subclasses define the loss.

    Args:
        input_getter: maps a batch to the model input (default ``batch[0]``).
        target_getter: maps a batch to the targets (default ``batch[1]``).
    """

    def __init__(self, input_getter: Getter | None = None, target_getter: Getter | None = None) -> None:
        self.input_getter = input_getter or _first
        self.target_getter = target_getter or _second

    def inputs(self, batch: Any) -> Any:
        return self.input_getter(batch)

    def targets(self, batch: Any) -> Tensor:
        return self.target_getter(batch)

    def batch_size(self, batch: Any) -> int:
        """Number of examples in ``batch``."""
        return len(self.targets(batch))

    def forward(self, model: nn.Module, batch: Any) -> Tensor:
        """Model outputs for ``batch``; override for models that take several inputs."""
        return model(self.inputs(batch))

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-example training loss, shape ``(B,)``."""
        raise NotImplementedError

    def sample_targets(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Targets drawn from the model's predictive distribution (for the sampled true Fisher)."""
        raise NotImplementedError

    def fisher_factors(self, outputs: Tensor) -> Tensor:
        """Square-root factors of the output Hessian, shape ``(K, *outputs.shape)``."""
        raise NotImplementedError

    def num_fisher_factors(self, outputs: Tensor) -> int:
        """``K``, the number of factors :meth:`fisher_factors` returns (without forming them)."""
        raise NotImplementedError

    def train_loss(self, model: nn.Module, batch: Any) -> Tensor:
        """Per-example training losses of ``batch``, shape ``(B,)``."""
        return self.loss(self.forward(model, batch), self.targets(batch))

    def measurement(self, model: nn.Module, batch: Any) -> Tensor:
        """Per-example query measurement (lower is better), shape ``(B,)``. Default: the loss."""
        return self.train_loss(model, batch)

    def measurement_from_outputs(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Measurement from precomputed outputs (used by methods that batch many parameter sets)."""
        return self.loss(outputs, targets)


class ClassificationTask(Task):
    """Cross-entropy classification; outputs are logits ``(B, C)`` or ``(B, T, C)`` for sequences.

    For sequence outputs the per-example loss is the sum over positions, and positions whose target
    equals ``ignore_index`` are skipped.

    Args:
        measurement: ``"loss"`` (cross-entropy) or ``"margin"``; with ``"margin"`` the measurement is
            ``-(logit_y - logsumexp_{c != y} logit_c)`` so that lower is still better.
        ignore_index: target value that marks positions without a label.
    """

    def __init__(
        self,
        input_getter: Getter | None = None,
        target_getter: Getter | None = None,
        measurement: str = "loss",
        ignore_index: int = -100,
    ) -> None:
        super().__init__(input_getter, target_getter)
        if measurement not in ("loss", "margin"):
            raise ValueError(f"ClassificationTask(measurement={measurement!r}): use 'loss' or 'margin'.")
        self.measurement_kind = measurement
        self.ignore_index = ignore_index

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        flat = F.cross_entropy(
            at_least_float32(outputs.reshape(-1, outputs.shape[-1])),
            targets.reshape(-1),
            reduction="none",
            ignore_index=self.ignore_index,
        )
        return flat.reshape(targets.shape).reshape(targets.shape[0], -1).sum(dim=1)

    def margin(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-example margin ``logit_y - logsumexp_{c != y} logit_c`` (summed over positions)."""
        logits = at_least_float32(outputs.reshape(-1, outputs.shape[-1]))
        flat_targets = targets.reshape(-1)
        valid = flat_targets != self.ignore_index
        safe = flat_targets.clamp(min=0)
        correct = logits.gather(1, safe[:, None]).squeeze(1)
        others = logits.scatter(1, safe[:, None], float("-inf")).logsumexp(dim=1)
        margins = torch.where(valid, correct - others, torch.zeros_like(correct))
        return margins.reshape(targets.shape[0], -1).sum(dim=1)

    def measurement_from_outputs(self, outputs: Tensor, targets: Tensor) -> Tensor:
        if self.measurement_kind == "margin":
            return -self.margin(outputs, targets)
        return self.loss(outputs, targets)

    def measurement(self, model: nn.Module, batch: Any) -> Tensor:
        return self.measurement_from_outputs(self.forward(model, batch), self.targets(batch))

    def sample_targets(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        probs = torch.softmax(outputs.detach().reshape(-1, outputs.shape[-1]).float(), dim=-1)
        # non-finite outputs: sample uniformly; the step's statistics are then dropped as non-finite
        probs = torch.where(probs.isfinite().all(dim=-1, keepdim=True), probs, torch.ones_like(probs))
        sampled = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        return sampled.reshape(outputs.shape[:-1])

    def num_fisher_factors(self, outputs: Tensor) -> int:
        return outputs.shape[-1]

    def fisher_factors(self, outputs: Tensor) -> Tensor:
        # Hessian of CE w.r.t. logits is diag(p) - p pᵀ = Σ_c p_c (e_c - p)(e_c - p)ᵀ.
        probs = torch.softmax(outputs.detach().float(), dim=-1)
        eye = torch.eye(outputs.shape[-1], dtype=probs.dtype, device=probs.device)
        factors = probs.sqrt().unsqueeze(-1) * (eye - probs.unsqueeze(-2))  # (..., C, C): row c = factor c
        return factors.movedim(-2, 0).to(outputs.dtype)


class RegressionTask(Task):
    """Squared-error regression; outputs ``(B,)`` or ``(B, D)``.

    The per-example loss is the mean over output dimensions of ``(y - t)²``, so its batch mean is
    exactly ``F.mse_loss``. Its Gauss-Newton output Hessian is ``(2/D)·I`` and the matching
    predictive distribution is ``N(y, D/2)``.
    """

    def _as_matrix(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        predictions = at_least_float32(self._as_matrix(outputs))
        return (predictions - self._as_matrix(targets).to(predictions.dtype)).pow(2).mean(dim=1)

    def sample_targets(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        dim = self._as_matrix(outputs).shape[1]
        noise = torch.randn(outputs.shape, generator=generator, dtype=outputs.dtype, device=outputs.device)
        return outputs.detach() + noise * (dim / 2) ** 0.5

    def num_fisher_factors(self, outputs: Tensor) -> int:
        return self._as_matrix(outputs).shape[1]

    def fisher_factors(self, outputs: Tensor) -> Tensor:
        flat = self._as_matrix(outputs)
        dim = flat.shape[1]
        eye = torch.eye(dim, dtype=outputs.dtype, device=outputs.device) * (2.0 / dim) ** 0.5
        factors = eye[:, None, :].expand(dim, flat.shape[0], dim)
        return factors.reshape(dim, *outputs.shape)
