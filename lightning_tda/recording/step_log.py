"""The step log the callback writes: one row per optimizer step, kept in memory and appended in blocks.

Appending a row to an HDF5 dataset costs about as much as writing a block of them, and reading the step's loss
from the device would synchronise every step; rows are therefore buffered (the loss as the training step's own
tensor, left on its device) and written at each checkpoint and segment close, with one device synchronisation
per block. Learning rates held as tensors (PyTorch allows them, e.g. for capturable or fused Adam) are kept on
their device the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_tda.trace.schema import STEP_COLUMNS
from lightning_tda.trace.writer import TraceWriter


class StepLogBuffer:
    """Rows of the step log not yet written, as tuples (a tuple per step costs a third of a dict of lists)."""

    COLUMNS = (*STEP_COLUMNS, "lr")  # the order of append's arguments

    def __init__(self) -> None:
        self.rows: list[tuple] = []

    def append(self, row: tuple) -> None:
        """One optimizer step's row, its values in the order of :attr:`COLUMNS`: the loss as :func:`loss_value` gives
        it (left on its device), the learning rates (per param group) as :func:`learning_rates` does."""
        self.rows.append(row)

    def flush(self, writer: TraceWriter | None) -> None:
        """Append the buffered rows to ``writer``'s trace (if any) and forget them."""
        if writer is not None and self.rows:
            values = dict(zip(self.COLUMNS, zip(*self.rows)))
            columns = {key: np.asarray(column) for key, column in values.items() if key not in ("loss", "lr")} | {
                "lr": host_values(values["lr"]),  # one device sync per block for tensor learning rates
                "loss": torch.stack([loss.reshape(()) for loss in values["loss"]]).double().cpu().numpy(),  # one sync
            }
            writer.append_steps(columns)
        self.rows = []


def loss_value(outputs: Any, device: torch.device) -> Tensor:
    """The training loss of a batch from ``training_step``'s output (tensor, dict or None), as a tensor left on
    its device (read once per block of rows, not once per step)."""
    if isinstance(outputs, Mapping):
        outputs = outputs.get("loss")
    if isinstance(outputs, Tensor):  # Lightning's is detached already
        return outputs.detach() if outputs.requires_grad else outputs
    return torch.full((), float("nan"), device=device)


def learning_rates(optimizer: Any) -> list[float | Tensor]:
    """Each param group's learning rate, read without a device synchronisation: a float stays a float, a tensor
    is copied on its device in float64 (a scheduler updates a tensor learning rate in place)."""
    rates = [group["lr"] for group in optimizer.param_groups]
    return [lr.detach().to(torch.float64, copy=True) if isinstance(lr, Tensor) else float(lr) for lr in rates]


def host_values(rows: Sequence[Sequence[float | Tensor]]) -> np.ndarray:
    """Rows of floats and scalar tensors (e.g. steps × param groups of :func:`learning_rates`) as a float64
    array of the same shape; all tensors are read in one device transfer."""
    values = np.array([[np.nan if isinstance(v, Tensor) else v for v in row] for row in rows], dtype=np.float64)
    where = [(i, j) for i, row in enumerate(rows) for j, v in enumerate(row) if isinstance(v, Tensor)]
    if where:
        device = rows[where[0][0]][where[0][1]].device
        read = torch.stack([rows[i][j].reshape(()).to(device, torch.float64) for i, j in where]).cpu().numpy()
        values[tuple(np.array(where).T)] = read
    return values
