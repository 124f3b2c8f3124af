"""The step log the callback writes: one row per optimizer step, kept in memory and appended in blocks.

Appending a row to an HDF5 dataset costs about as much as writing a block of them, and reading the step's loss
from the device would synchronise every step; rows are therefore buffered (the loss as the training step's own
tensor, left on its device) and written at each checkpoint and segment close, with one device synchronisation
per block.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_tda.trace.writer import TraceWriter


class StepLogBuffer:
    """Rows of the step log not yet written (columns as in ``trace.schema.STEP_COLUMNS`` plus ``lr``)."""

    def __init__(self) -> None:
        self.rows: dict[str, list] = {}

    def append(self, row: Mapping[str, Any]) -> None:
        for key, value in row.items():
            self.rows.setdefault(key, []).append(value)

    def flush(self, writer: TraceWriter | None) -> None:
        """Append the buffered rows to ``writer``'s trace (if any) and forget them."""
        if writer is not None and self.rows:
            columns = {key: np.asarray(values) for key, values in self.rows.items() if key != "loss"}
            losses = [loss.reshape(()).double() for loss in self.rows["loss"]]
            columns["loss"] = torch.stack(losses).cpu().numpy()  # one device sync per block
            writer.append_steps(columns)
        self.rows = {}


def loss_value(outputs: Any, device: torch.device) -> Tensor:
    """The training loss of a batch from ``training_step``'s output (tensor, dict or None), as a tensor left on
    its device (read once per block of rows, not once per step)."""
    if isinstance(outputs, Mapping):
        outputs = outputs.get("loss")
    if isinstance(outputs, Tensor):
        return outputs.detach()
    return torch.full((), float("nan"), device=device)
