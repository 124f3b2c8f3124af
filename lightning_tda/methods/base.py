"""What every attribution method shares: data with stable ids, checkpoints, per-example gradients.

A method is constructed from a :class:`~lightning_tda.trace.Trace`, an instance of the trained
architecture and a :class:`~lightning_tda.tasks.Task`; ``attribute(queries, train)`` returns a
:class:`~lightning_tda.scores.Scores` of shape ``(n_queries, n_train)``. Training data is streamed
in batches; per-example gradients exist for one batch at a time only.

Distributed attribution: pass a launched ``lightning.fabric.Fabric`` as ``fabric=`` and every
process scores every ``world_size``-th training batch (:meth:`AttributionMethod.train_batches`);
:meth:`AttributionMethod.sum_across_processes` then sums the partial score matrices (or any
partial sums over training examples), so each process ends with the full result.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, SequentialSampler, TensorDataset

from lightning_tda.capture import TrackedLayer, per_example_gradients
from lightning_tda.scores import Scores
from lightning_tda.tasks import Task
from lightning_tda.trace import Trace

Data = Dataset | DataLoader | Sequence[Tensor]


def as_loader(data: Data, batch_size: int, role: str) -> DataLoader:
    """A non-shuffling DataLoader over ``data`` whose order defines the example ids ``0..n-1``.

    Accepts a map-style dataset, a tuple of tensors (wrapped in a TensorDataset) or a DataLoader
    that does not shuffle. Raises ``ValueError`` naming the problem otherwise.
    """
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, Tensor) for t in data):
        data = TensorDataset(*data)
    if isinstance(data, DataLoader):
        if isinstance(data.dataset, IterableDataset) or not isinstance(data.sampler, SequentialSampler):
            raise ValueError(
                f"The {role} DataLoader shuffles (or streams an IterableDataset), so its examples have no stable "
                f"ids. Pass the dataset itself or a DataLoader with shuffle=False."
            )
        loader = data
    elif isinstance(data, IterableDataset) or not hasattr(data, "__len__"):
        raise ValueError(
            f"The {role} set is an iterable dataset without stable indices; pass a map-style dataset "
            f"(indexable, with __len__) so scores can name training examples."
        )
    else:
        loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    if len(loader.dataset) == 0:
        raise ValueError(f"The {role} set is empty; pass at least one example.")
    return loader


def batches_with_ids(loader: DataLoader, task: Task) -> Iterator[tuple[Tensor, Any]]:
    """Yield ``(ids, batch)`` with ``ids`` the ``(B,)`` int64 positions of the batch's examples."""
    offset = 0
    for batch in loader:
        size = task.batch_size(batch)
        yield torch.arange(offset, offset + size), batch
        offset += size


def move_to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    return batch


def progress_bar(iterable: Any, enabled: bool | None, desc: str, total: int | None = None) -> Any:
    """A TQDM bar (what Lightning uses) on long passes; off when not on a terminal unless asked."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


class AttributionMethod:
    """Base class of the attribution methods.

    Args:
        trace: the recorded trace (:meth:`Trace.open`).
        model: an instance of the trained architecture; checkpoints are loaded into it.
        task: how to get per-example losses and measurements from a batch.
        layers: restrict to these trace layers (fnmatch patterns); default all tracked layers.
        batch_size: training examples per batch when streaming the training set.
        query_batch_size: queries per batch.
        device: where to compute.
        progress: show a progress bar (default: when stderr is a terminal).
        fabric: a launched ``lightning.fabric.Fabric`` to shard the training set across processes.
    """

    name = "base"

    def __init__(
        self,
        trace: Trace,
        model: nn.Module,
        task: Task,
        *,
        layers: Sequence[str] | None = None,
        batch_size: int = 128,
        query_batch_size: int = 64,
        device: str | torch.device = "cpu",
        progress: bool | None = None,
        fabric: Any | None = None,
    ) -> None:
        self.trace = trace
        self.model = model.to(device)
        self.task = task
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.query_batch_size = query_batch_size
        self.progress = progress
        self.fabric = fabric
        tracked = trace.tracked_layers(self.model)
        if layers is not None:
            import fnmatch

            tracked = [la for la in tracked if any(fnmatch.fnmatchcase(la.name, p) for p in layers)]
            if not tracked:
                raise ValueError(f"layers={list(layers)} matches none of the trace's layers {trace.layer_names}.")
        self.layers: list[TrackedLayer] = tracked

    # --- to implement ---------------------------------------------------------------------------
    def attribute(self, queries: Data, train: Data) -> Scores:
        """Scores ``(n_queries, n_train)``; positive = the training example helped the query."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """Hyper-parameters recorded with the scores."""
        return {"layers": [la.name for la in self.layers], "batch_size": self.batch_size}

    # --- shared helpers -------------------------------------------------------------------------
    def load_checkpoint(self, index: int) -> nn.Module:
        """Load checkpoint ``index`` into the model and put it in eval mode."""
        self.trace.load_checkpoint(self.model, index)
        return self.model.eval()

    def loader(self, data: Data, role: str) -> DataLoader:
        size = self.query_batch_size if role == "query" else self.batch_size
        return as_loader(data, size, role)

    def batches(self, data: Data, role: str, desc: str | None = None) -> Iterator[tuple[Tensor, Any]]:
        """``(ids, batch)`` pairs of ``data`` on the method's device, with a progress bar."""
        loader = self.loader(data, role)
        for ids, batch in progress_bar(batches_with_ids(loader, self.task), self.progress, desc or role, len(loader)):
            yield ids, move_to(batch, self.device)

    def train_batches(self, train: Data, desc: str = "train") -> Iterator[tuple[Tensor, Any]]:
        """This process's share of the training batches: ``(global ids, batch)``, every
        ``world_size``-th batch under Fabric, all of them otherwise."""
        world = self.fabric.world_size if self.fabric is not None else 1
        rank = self.fabric.global_rank if self.fabric is not None else 0
        for position, (ids, batch) in enumerate(self.batches(train, "train", desc)):
            if position % world == rank:
                yield ids, batch

    def sum_across_processes(self, tensor: Tensor) -> Tensor:
        """Sum a partial result over the Fabric processes (identity without Fabric)."""
        if self.fabric is None or self.fabric.world_size == 1:
            return tensor
        return self.fabric.all_reduce(tensor.to(self.fabric.device), reduce_op="sum").to(tensor.device)

    def gradients(self, batch: Any, role: str) -> dict[str, Tensor]:
        """Per-example gradients of the batch: ``{layer: (B, out, a_dim)}``.

        ``role="train"`` differentiates the training loss, ``role="query"`` the task's measurement.
        """
        values = self.task.measurement if role == "query" else self.task.train_loss
        try:
            return per_example_gradients(self.model, self.layers, lambda m: values(m, batch))
        except RuntimeError as err:
            raise ValueError(
                f"The model could not be evaluated on a {role} batch ({str(err).splitlines()[0]}). Check that "
                f"the {role} examples have the shape and type the model was trained on."
            ) from err

    @staticmethod
    def flatten(grads: dict[str, Tensor]) -> Tensor:
        """Concatenate per-layer per-example gradients into ``(B, D)``."""
        return torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)

    def scores(self, values: Tensor, n_queries: int | None, n_train: int, kind: str = "pairwise") -> Scores:
        query_ids = None if kind == "self" else torch.arange(n_queries)
        return Scores(values.float().cpu(), torch.arange(n_train), query_ids, self.name, self.config(), kind)
