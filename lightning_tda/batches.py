"""Data with stable example ids: loaders that never shuffle, batches with their ids, devices, progress.

Attribution scores name training examples by their position in the data the user passes, so every
pass over a data set (the methods' scoring passes, the curvature fits, the evaluation harnesses)
goes through :func:`as_loader`, which refuses anything whose order is not stable (a shuffling
DataLoader, an iterable dataset). Nothing here imports Lightning or the methods.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, SequentialSampler, TensorDataset

from lightning_tda.tasks import Task

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


def tensors_of(item: Any) -> Iterator[Tensor]:
    """Every tensor in an example or batch (a tensor, or lists, tuples and dicts of them; dicts by sorted key)."""
    if isinstance(item, Tensor):
        yield item
    elif isinstance(item, (list, tuple)):
        for part in item:
            yield from tensors_of(part)
    elif isinstance(item, dict):
        for key in sorted(item):
            yield from tensors_of(item[key])


def progress_bar(iterable: Any, enabled: bool | None, desc: str, total: int | None = None) -> Any:
    """A TQDM bar (what Lightning uses) on long passes; off when not on a terminal unless asked."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)
