"""Scores: the result every attribution method returns.

``values[q, m]`` is the score of training example ``train_ids[m]`` for query ``query_ids[q]``.
Positive means the training example *helped* the query (removing it would raise the query loss);
negative means it hurt. Self-influence scores (each training example against itself, used to find
mislabeled examples) have ``kind="self"``, ``values`` of shape ``(N,)`` and no query ids.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor

from lightning_tda.trace import LIBVER, to_json


@dataclass
class Scores:
    """Attribution scores with stable example ids.

    Attributes:
        values: ``(Q, N)`` float32 (``kind="pairwise"``) or ``(N,)`` (``kind="self"``).
        train_ids: ``(N,)`` int64 ids of the training examples (dataset indices).
        query_ids: ``(Q,)`` int64 ids of the queries, ``None`` for self-influence.
        method: name of the method that produced them (``"source"``, ``"ekfac"``...).
        config: the method's hyper-parameters (JSON-serialisable).
        kind: ``"pairwise"`` or ``"self"``.
    """

    values: Tensor
    train_ids: Tensor
    query_ids: Tensor | None
    method: str
    config: dict[str, Any] = field(default_factory=dict)
    kind: str = "pairwise"

    def __post_init__(self) -> None:
        self.values = torch.as_tensor(self.values).float()
        self.train_ids = torch.as_tensor(self.train_ids, dtype=torch.int64)
        if self.query_ids is not None:
            self.query_ids = torch.as_tensor(self.query_ids, dtype=torch.int64)
        expected = (len(self.train_ids),) if self.kind == "self" else (len(self.query_ids), len(self.train_ids))
        if tuple(self.values.shape) != expected:
            raise ValueError(f"Scores values have shape {tuple(self.values.shape)}, expected {expected}.")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    def top_k(self, k: int, largest: bool = True) -> tuple[Tensor, Tensor]:
        """The ``k`` most helpful (``largest=True``) or most harmful training examples.

        Returns:
            ``(scores, train_ids)``, each ``(Q, k)`` (or ``(k,)`` for self-influence).
        """
        k = min(k, self.values.shape[-1])
        top = self.values.topk(k, dim=-1, largest=largest)
        return top.values, self.train_ids[top.indices]

    def bottom_k(self, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` most harmful training examples (most negative scores)."""
        return self.top_k(k, largest=False)

    # --- persistence ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, name: str | None = None) -> str:
        """Write into ``results/<name>`` of an HDF5 file (a trace or a standalone file); returns the name.

        Saving again under the same name overwrites the datasets in place when their shapes are unchanged
        (the config is a fixed-length string), so repeated attribution leaves the file's size alone: HDF5
        does not give the space of deleted objects back, and variable-length strings would leave their old
        copies in the file's global heap.
        """
        name = name or (self.method if self.kind == "pairwise" else f"{self.method}-self")
        arrays = {
            "values": self.values.numpy(),
            "train_ids": self.train_ids.numpy(),
            "config": np.asarray(np.bytes_(to_json(self.config))),
        }
        if self.query_ids is not None:
            arrays["query_ids"] = self.query_ids.numpy()
        with h5py.File(path, "a", libver=LIBVER) as f:
            results = f.require_group("results")
            group = results.require_group(name)
            for key in [key for key in group if key not in arrays]:
                del group[key]
            for key, array in arrays.items():
                current = group.get(key)
                if isinstance(current, h5py.Dataset) and current.shape == array.shape and current.dtype == array.dtype:
                    current[...] = array
                    continue
                if key in group:
                    del group[key]
                group.create_dataset(key, data=array)
            for key, value in (("method", self.method), ("kind", self.kind)):
                if group.attrs.get(key) != value:
                    group.attrs[key] = value
            f.flush()
        return name

    @classmethod
    def load(cls, path: str | os.PathLike, name: str) -> Scores:
        """Read scores saved with :meth:`save`."""
        with h5py.File(path, "r") as f:
            if f"results/{name}" not in f:
                available = list(f["results"]) if "results" in f else []
                raise KeyError(f"No results named {name!r} in {path}; available: {available}.")
            group = f["results"][name]
            return cls(
                values=torch.from_numpy(np.asarray(group["values"][()])),
                train_ids=torch.from_numpy(np.asarray(group["train_ids"][()])),
                query_ids=torch.from_numpy(np.asarray(group["query_ids"][()])) if "query_ids" in group else None,
                method=str(group.attrs["method"]),
                config=json.loads(group["config"][()]),
                kind=str(group.attrs["kind"]),
            )

    @staticmethod
    def available(path: str | os.PathLike) -> list[str]:
        """Names of the results stored in ``path``."""
        if not Path(path).exists():
            return []
        with h5py.File(path, "r") as f:
            return list(f["results"]) if "results" in f else []
