"""The true Fisher's output gradients on the callback's statistics steps, preferably without a second forward.

A statistics step needs, besides the training gradients, per-example output gradients for targets drawn from
the model (or, for few outputs, every output-Hessian factor: :mod:`lightning_tda.layers.fisher` chooses, as for
the methods' curvature passes). When ``training_step`` called the model (the LightningModule, or a Hugging Face
model inside it) on the batch's own inputs and :meth:`Task.outputs_of_call` recognises that call as
:meth:`Task.forward`, the sampled targets are back-propagated through the training graph itself, before the
training backward (:meth:`TrainingGraphFisher.from_training_graph`, with the outputs
:mod:`~lightning_tda.recording.training_forward` kept): no second forward pass. Otherwise one more
forward runs after the training backward, under the training step's autocast, with dropout's random state and
batch-norm buffers restored (:meth:`TrainingGraphFisher.by_second_forward`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_tda.layers.capture import LayerCapture
from lightning_tda.layers.fisher import FisherOptions, pseudo_gradient_rows
from lightning_tda.layers.tracked import TrackedLayer
from lightning_tda.tasks import Task


class TrainingGraphFisher:
    """True-Fisher output-gradient rows ``{layer: (B, R, out)}`` of a training batch.

    Args:
        layers: the tracked layers.
        task: the Task (targets, sampling, the model call it recognises).
        fisher: which pseudo-gradients (exact factors up to the callback's ``exact_fisher_outputs``, else one
            sampled target per example).
        generator: draws the sampled targets (seeded per rank; its state is resumed with the callback's).
    """

    def __init__(self, layers: Sequence[TrackedLayer], task: Task, fisher: FisherOptions, generator: torch.Generator):
        self.layers = list(layers)
        self.task = task
        self.fisher = fisher
        self.generator = generator

    def from_training_graph(self, capture: LayerCapture, outputs: Tensor, batch: Any) -> dict[str, Tensor]:
        """Rows from one more backward through the training graph (kept for training), given the training forward's
        ``outputs`` (:class:`~lightning_tda.recording.training_forward.TrainingForward`)."""
        return self._rows(capture, outputs, batch, keep_graph=True)

    def by_second_forward(
        self, model: nn.Module, batch: Any, batch_size: int, autocast: AbstractContextManager
    ) -> dict[str, Tensor]:
        """Rows from a second forward of ``batch`` (under the training step's ``autocast``); the input rows
        already came from the training forward, dropout draws the same masks and buffers are restored."""
        buffers = [b.detach().clone() for b in model.buffers()]
        device = next(model.parameters()).device
        capture = LayerCapture(  # A came from the training forward: only the outputs are needed here
            self.layers,
            on_inputs=lambda *_: None,
            row_mask=self.task.row_mask(batch),
            batch_size=batch_size,
        )
        with (
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            torch.enable_grad(),
            autocast,
            capture,
        ):
            rows = self._rows(capture, self.task.forward(model, batch), batch)
        with torch.no_grad():  # the extra forward must not move batch-norm statistics
            for buffer, saved in zip(model.buffers(), buffers):
                buffer.copy_(saved)
        return rows

    def _rows(self, capture: LayerCapture, outputs: Tensor, batch: Any, keep_graph: bool = False) -> dict[str, Tensor]:
        """Rows whose outer products estimate the true Fisher; the rows of several factors (or samples) are
        concatenated along ``R``, each scaled by the square root of its weight, so ``S`` counts each example once."""
        targets = self.task.targets(batch)
        parts = list(
            pseudo_gradient_rows(capture, outputs, targets, self.task, self.fisher, self.generator, keep_graph)
        )
        if len(parts) == 1 and parts[0][1] == 1.0:
            return parts[0][0]
        return {name: torch.cat([rows[name] * weight**0.5 for rows, weight in parts], dim=1) for name in parts[0][0]}
