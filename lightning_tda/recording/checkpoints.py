"""The model states the callback saves into the trace: what a checkpoint holds, and a small model's mid-segment
checkpoints held in memory until their segment closes.

A checkpoint holds the trainable parameters (under every name of a tied parameter, so loading sets all) and the
buffers. Writing one inside a segment costs its HDF5 objects, the step rows it needs before it and a flush: on a
small model about 2 ms, as long as one of its training steps. A state of at most :data:`HELD_BYTES` is therefore
copied to host memory and written when its segment closes, with the segment's own checkpoint and in its flush.
A process killed inside a segment loses its held checkpoints with the segment (written at once, they would have
survived in the file, outside any closed segment: TracInCP could use them, SOURCE could not). An exception in training
writes them, and the callback's Lightning-checkpoint state writes and flushes them: a resumed run finds every
checkpoint before its step.
A larger state is written at once: its host copy costs about as much as the writes it saves (about 1 ms from a few
MB on, measured; 0.07 ms for 1 MB), besides its size in memory, and its steps dwarf both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightning as L
from torch import Tensor

from lightning_tda.trace.writer import TraceWriter, storage_alias

HELD_BYTES = 2 << 20  # the largest model state whose mid-segment checkpoints wait in host memory for the close


def checkpoint_state(pl_module: L.LightningModule) -> dict[str, Tensor]:
    """The tensors a checkpoint stores: trainable parameters, every name of a tied one (GPT-2's ``lm_head.weight``
    is ``transformer.wte.weight``; the writer stores the data once), and buffers. Views of the live module."""
    trainable = {name for name, p in pl_module.named_parameters(remove_duplicate=False) if p.requires_grad}
    buffers = {name for name, _ in pl_module.named_buffers()}
    return {k: v for k, v in pl_module.state_dict().items() if k in trainable or k in buffers}


@dataclass
class HeldCheckpoint:
    """A checkpoint copied to host memory: the arguments of :meth:`TraceWriter.write_checkpoint` but the dtype."""

    name: str
    state: dict[str, Tensor]
    attrs: dict[str, Any]
    second_moments: dict[str, Tensor]


class HeldCheckpoints:
    """Mid-segment checkpoints of a small model, in host memory until :meth:`write` at the segment's close."""

    def __init__(self, max_bytes: int = HELD_BYTES) -> None:
        self.max_bytes = max_bytes
        self.checkpoints: list[HeldCheckpoint] = []

    def hold(
        self, name: str, state: Mapping[str, Tensor], attrs: dict[str, Any], second_moments: Mapping[str, Tensor]
    ) -> bool:
        """Keep a host copy of the checkpoint if its state has at most ``max_bytes``; returns whether it was kept.

        Names of one tensor (tied parameters) stay names of one copy, so the writer still stores it once."""
        distinct = {storage_alias(tensor): tensor for tensor in state.values()}
        if sum(t.numel() * t.element_size() for t in distinct.values()) > self.max_bytes:
            return False
        copies = {alias: t.detach().to("cpu", copy=True) for alias, t in distinct.items()}
        state = {key: copies[storage_alias(t)] for key, t in state.items()}
        moments = {layer: v.detach().to("cpu", copy=True) for layer, v in second_moments.items()}
        self.checkpoints.append(HeldCheckpoint(name, state, attrs, moments))
        return True

    def write(self, writer: TraceWriter, dtype: str) -> None:
        """Write the held checkpoints (stored as ``dtype``) and forget them; the caller flushes."""
        held, self.checkpoints = self.checkpoints, []
        for checkpoint in held:
            writer.write_checkpoint(
                checkpoint.name, checkpoint.state, checkpoint.attrs, dtype, checkpoint.second_moments
            )

    def clear(self) -> None:
        self.checkpoints = []
