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
  targets from the model's predictive distribution for the sampled (cheaper) estimate, keeping the
  positions the real targets leave out (``ignore_index``) out, and ``sampled_fisher_loss`` is the loss
  whose gradient at those targets has the Gauss-Newton matrix as its second moment (the loss itself,
  except for a mean over independently drawn positions). Sequence outputs always use samples.
* ``row_mask(batch)`` returns a ``(B, T)`` bool mask of the positions that are real tokens (``None``:
  all of them); padded positions do not enter the K-FAC input statistics.

Tasks: :class:`ClassificationTask`, :class:`RegressionTask` and :class:`LanguageModelingTask`
(next-token prediction with Hugging Face-style batches and outputs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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

    def outputs_of_call(self, batch: Any, args: tuple, kwargs: dict[str, Any], output: Any) -> Tensor | None:
        """The outputs :meth:`forward` would give for ``batch``, if a model call seen during training (its
        positional and keyword arguments and its output) is that same computation; else None.

        Lets the recorder reuse the training forward instead of running :meth:`forward` again. The default
        recognises ``model(self.inputs(batch))`` (the very input tensor) returning a tensor, and only when
        :meth:`forward` is not overridden; a task that overrides it should override this too, or keep None.
        """
        if type(self).forward is not Task.forward or kwargs or len(args) != 1 or not isinstance(output, Tensor):
            return None
        return output if args[0] is self.inputs(batch) else None

    def row_mask(self, batch: Any) -> Tensor | None:
        """``(B, T)`` bool mask of real (not padded) positions of a sequence batch; ``None`` = all real."""
        return None

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-example training loss, shape ``(B,)``."""
        raise NotImplementedError

    def sample_targets(
        self, outputs: Tensor, generator: torch.Generator | None = None, targets: Tensor | None = None
    ) -> Tensor:
        """Targets drawn from the model's predictive distribution (for the sampled true Fisher), in the
        format of :meth:`targets`; positions the real ``targets`` leave out stay left out."""
        raise NotImplementedError

    def sampled_fisher_loss(self, outputs: Tensor, sampled: Tensor) -> Tensor:
        """Per-example loss ``(B,)`` at targets drawn by :meth:`sample_targets`, scaled so that the second
        moment of its gradient over the draws is the example's Gauss-Newton matrix (the expectation that
        :meth:`fisher_factors` gives exactly). The loss itself when it is one negative log-likelihood term."""
        return self.loss(outputs, sampled)

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


def sample_classes(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One class per row of ``logits (..., C)`` drawn from its softmax: int64 ``(...)``.

    On an accelerator the draw is an exponential race, ``argmax_c p_c / E_c`` with ``E_c ~ Exp(1)`` (class ``c``
    wins with probability ``p_c``), which never waits for the device (``torch.multinomial`` checks its input
    on the host on some torch versions and devices); on the CPU, where nothing waits, ``torch.multinomial``
    keeps the draws of earlier traces.
    """
    probs = torch.softmax(logits.detach().reshape(-1, logits.shape[-1]).float(), dim=-1)
    # non-finite outputs: sample uniformly; the step's statistics are then dropped as non-finite
    probs = torch.where(probs.isfinite().all(dim=-1, keepdim=True), probs, torch.ones_like(probs))
    if probs.device.type == "cpu":
        drawn = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    else:
        drawn = exponential_race(probs, generator)
    return drawn.reshape(logits.shape[:-1])


def exponential_race(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One column per row of ``probs (N, C)`` (non-negative, rows need not be normalised), drawn with
    probability proportional to its entry: ``argmax_c p_c / E_c``, ``E_c ~ Exp(1)``; int64 ``(N,)``."""
    return (probs / torch.empty_like(probs).exponential_(generator=generator)).argmax(dim=-1)


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

    def sample_targets(
        self, outputs: Tensor, generator: torch.Generator | None = None, targets: Tensor | None = None
    ) -> Tensor:
        sampled = sample_classes(outputs, generator)
        if targets is not None:
            sampled = torch.where(targets == self.ignore_index, targets, sampled)
        return sampled

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

    def sample_targets(
        self, outputs: Tensor, generator: torch.Generator | None = None, targets: Tensor | None = None
    ) -> Tensor:
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


def logits_of(outputs: Any) -> Tensor:
    """The logits tensor of a model's output: a tensor, an object with ``.logits`` (a Hugging Face output), a
    mapping with ``"logits"`` or a tuple whose first element is the logits."""
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(getattr(outputs, "logits", None), Tensor):
        return outputs.logits
    if isinstance(outputs, Mapping) and isinstance(outputs.get("logits"), Tensor):
        return outputs["logits"]
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], Tensor):
        return outputs[0]
    raise TypeError(
        f"The model returned {type(outputs).__name__}, which holds no logits: return a (B, T, vocabulary) tensor, "
        f"or an object with .logits (a Hugging Face output)."
    )


class LanguageModelingTask(Task):
    """Next-token prediction for causal language models, with Hugging Face conventions.

    Batches are ``(input_ids, labels)`` tuples (``labels = input_ids``; the task shifts them, as Hugging
    Face models do: the logits at position ``t`` predict ``labels[t + 1]``), ``(input_ids,)`` tuples or
    bare ``input_ids`` (labels = the inputs), or mappings with ``input_ids`` and optionally
    ``attention_mask`` and ``labels`` (a Hugging Face tokenizer or collator's output). Positions whose
    label is ``ignore_index`` (``-100``), and padded positions (``attention_mask == 0``, or
    ``input_ids == pad_token_id`` when ``pad_token_id`` is given and there is no attention mask), are
    not predicted; padded positions also stay out of the K-FAC input statistics (:meth:`row_mask`).
    The model is called as ``model(input_ids)``, or ``model(input_ids, attention_mask=mask)`` when the
    batch has an attention mask, and may return logits ``(B, T, vocabulary)`` or a Hugging Face output
    object with ``.logits``.

    Args:
        reduction: the per-example loss over the example's predicted tokens: ``"mean"`` (default) or
            ``"sum"``. The default matches a ``training_step`` that returns a Hugging Face model's
            ``.loss`` (the mean over every predicted token of the batch) exactly when the examples have
            equally many predicted tokens (fixed-length blocks, the usual pre-training layout); with
            padding, Hugging Face weights each example by its token count, this task weights examples
            equally. ``"sum"`` is kronfluence's convention (the per-token losses summed).
        ignore_index: label value of positions without a target.
        pad_token_id: token id marking padding when batches carry no attention mask.
    """

    def __init__(self, reduction: str = "mean", ignore_index: int = -100, pad_token_id: int | None = None) -> None:
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"LanguageModelingTask(reduction={reduction!r}): use 'mean' or 'sum'.")
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.pad_token_id = pad_token_id

    # --- batches --------------------------------------------------------------------------------
    def inputs(self, batch: Any) -> Tensor:
        """``input_ids`` ``(B, T)``."""
        if isinstance(batch, Tensor):
            return batch
        if isinstance(batch, Mapping):
            if "input_ids" not in batch:
                raise ValueError(f"LanguageModelingTask: a mapping batch needs 'input_ids' (got keys {sorted(batch)}).")
            return batch["input_ids"]
        if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
            return batch[0]
        raise ValueError(
            f"LanguageModelingTask cannot read a batch of type {type(batch).__name__}: use input_ids, "
            f"(input_ids, labels) or a mapping with input_ids (and attention_mask, labels)."
        )

    def _attention_mask(self, batch: Any) -> Tensor | None:
        return batch.get("attention_mask") if isinstance(batch, Mapping) else None

    def row_mask(self, batch: Any) -> Tensor | None:
        """Real-token positions ``(B, T)`` bool: the attention mask, else ``input_ids != pad_token_id``, else None."""
        mask = self._attention_mask(batch)
        if mask is not None:
            return mask.bool()
        if self.pad_token_id is not None:
            return self.inputs(batch) != self.pad_token_id
        return None

    def targets(self, batch: Any) -> Tensor:
        """Unshifted labels ``(B, T)`` int64, ``ignore_index`` at padded positions."""
        if isinstance(batch, Mapping):
            labels = batch.get("labels")
        elif isinstance(batch, (tuple, list)) and len(batch) > 1:
            labels = batch[1]
        else:
            labels = None
        ids = self.inputs(batch)
        labels = ids if labels is None else labels
        if labels.shape != ids.shape:
            raise ValueError(
                f"LanguageModelingTask: labels of shape {tuple(labels.shape)} for input_ids of shape "
                f"{tuple(ids.shape)}; pass labels = input_ids (unshifted; the task shifts them)."
            )
        mask = self.row_mask(batch)
        return labels.long() if mask is None else labels.long().masked_fill(~mask, self.ignore_index)

    def batch_size(self, batch: Any) -> int:
        return len(self.inputs(batch))

    def forward(self, model: nn.Module, batch: Any) -> Tensor:
        """Logits ``(B, T, vocabulary)``."""
        mask = self._attention_mask(batch)
        outputs = model(self.inputs(batch)) if mask is None else model(self.inputs(batch), attention_mask=mask)
        return logits_of(outputs)

    def outputs_of_call(self, batch: Any, args: tuple, kwargs: dict[str, Any], output: Any) -> Tensor | None:
        """The logits of a training call ``model(input_ids, attention_mask=..., labels=...)`` (positional or
        keyword ``input_ids``, the batch's own tensors; ``labels`` do not change the logits, any other argument
        may), as :meth:`forward` would compute them; else None."""
        ids = args[0] if len(args) == 1 else kwargs.get("input_ids") if not args else None
        extra = set(kwargs) - {"input_ids", "attention_mask", "labels"}
        if ids is not self.inputs(batch) or extra or kwargs.get("attention_mask") is not self._attention_mask(batch):
            return None
        try:
            return logits_of(output)
        except TypeError:
            return None

    # --- losses ---------------------------------------------------------------------------------
    def token_losses(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy of every next-token prediction, ``(B, T - 1)``, zero where the label is ignored."""
        if outputs.dim() != 3 or outputs.shape[:2] != targets.shape:
            raise ValueError(
                f"LanguageModelingTask: logits of shape {tuple(outputs.shape)} do not match labels of shape "
                f"{tuple(targets.shape)}; the model must return (B, T, vocabulary) logits for (B, T) input_ids."
            )
        logits = at_least_float32(outputs[:, :-1])
        labels = targets[:, 1:]
        flat = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none", ignore_index=self.ignore_index
        )
        return flat.reshape(labels.shape)

    def _weights(self, targets: Tensor) -> Tensor:
        """Weight of each predicted position in the per-example loss, ``(B, T - 1)``."""
        valid = (targets[:, 1:] != self.ignore_index).float()
        if self.reduction == "sum":
            return valid
        return valid / valid.sum(dim=1, keepdim=True).clamp(min=1)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-example next-token loss ``(B,)``: the sum or mean over the example's predicted tokens (0 if none)."""
        tokens = self.token_losses(outputs, targets)
        return (tokens * self._weights(targets).to(tokens.dtype)).sum(dim=1)

    def sample_targets(
        self, outputs: Tensor, generator: torch.Generator | None = None, targets: Tensor | None = None
    ) -> Tensor:
        """Labels ``(B, T)`` with every next token drawn from the model (shifted like real labels); positions
        whose real label is ignored (or position 0, never predicted) hold ``ignore_index``."""
        sampled = torch.full(outputs.shape[:2], self.ignore_index, dtype=torch.long, device=outputs.device)
        sampled[:, 1:] = sample_classes(outputs[:, :-1], generator)
        if targets is not None:
            sampled = sampled.masked_fill(targets == self.ignore_index, self.ignore_index)
        return sampled

    def sampled_fisher_loss(self, outputs: Tensor, sampled: Tensor) -> Tensor:
        """``Σ_t √w_t CE_t`` at sampled labels ``(B,)``, not the loss's ``Σ_t w_t CE_t``: the positions are drawn
        independently, so the second moment of the gradient is ``Σ_t w_t Jᵀ H_t J``, the Gauss-Newton matrix
        of the loss. With ``reduction="mean"`` (``w_t = 1/T``) the loss's own weights would give ``1/T`` of it.
        """
        tokens = self.token_losses(outputs, sampled)
        return (tokens * self._weights(sampled).to(tokens.dtype).sqrt()).sum(dim=1)

    def num_fisher_factors(self, outputs: Tensor) -> int:
        return (outputs.shape[1] - 1) * outputs.shape[-1]

    def fisher_factors(self, outputs: Tensor) -> Tensor:
        """One factor per predicted position ``t`` and class ``c``: ``√(w_t p_{t,c}) (e_c − p_t)`` at position
        ``t``, zero elsewhere, with ``w_t`` the position's weight (every position predicted, no padding):
        ``((T−1)·V, B, T, V)``. They sum to the block-diagonal output Hessian without cross-position terms.
        Large; the curvature passes and the callback sample targets for sequences instead."""
        batch, length, vocabulary = outputs.shape
        probs = torch.softmax(outputs.detach()[:, :-1].float(), dim=-1)  # (B, T-1, V)
        weight = 1.0 if self.reduction == "sum" else 1.0 / max(length - 1, 1)
        eye = torch.eye(vocabulary, dtype=probs.dtype, device=probs.device)
        per_class = (weight * probs).sqrt().unsqueeze(-1) * (eye - probs.unsqueeze(-2))  # (B, T-1, V, V): row c
        factors = outputs.new_zeros(length - 1, vocabulary, batch, length, vocabulary, dtype=probs.dtype)
        for t in range(length - 1):
            factors[t, :, :, t] = per_class[:, t].transpose(0, 1)
        return factors.reshape(-1, batch, length, vocabulary).to(outputs.dtype)
