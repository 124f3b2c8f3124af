"""Scores: the result every attribution method returns.

``values[q, m]`` is the score of training example ``train_ids[m]`` for query ``query_ids[q]``.
Positive means the training example *helped* the query (removing it would raise the query loss);
negative means it hurt. Self-influence scores (each training example against itself, used to find
mislabeled examples) have ``kind="self"``, ``values`` of shape ``(N,)`` and no query ids.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor

from lightning_tda.trace.checks import TraceError, TraceReader, expect_str
from lightning_tda.trace.probe import parse_in_child
from lightning_tda.trace.schema import to_json
from lightning_tda.trace.writer import OBJECT_OVERHEAD, writing

KINDS = ("pairwise", "self")
TIMELINE_KIND = "timeline"  # results/<name> written by lightning_tda.timeline.Timeline
EVALUATION_KIND = "evaluation"  # results/evaluation written by lightning_tda.evaluation.record.Evaluation


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
        if self.kind not in KINDS:
            raise ValueError(f"Scores kind {self.kind!r}: use 'pairwise' or 'self'.")
        self.values = torch.as_tensor(self.values).float()
        self.train_ids = torch.as_tensor(self.train_ids, dtype=torch.int64)
        if self.query_ids is not None:
            self.query_ids = torch.as_tensor(self.query_ids, dtype=torch.int64)
        elif self.kind == "pairwise":
            raise ValueError("Pairwise scores need query_ids.")
        if self.train_ids.dim() != 1 or (self.train_ids < 0).any():
            raise ValueError("Scores train_ids must be a 1-D list of training-set indices (non-negative).")
        if self.query_ids is not None and self.query_ids.dim() != 1:
            raise ValueError("Scores query_ids must be a 1-D list of query ids.")
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
        Saving again under the same name overwrites in place (:func:`write_result`)."""
        name = name or (self.method if self.kind == "pairwise" else f"{self.method}-self")
        arrays = {
            "values": self.values.numpy(),
            "train_ids": self.train_ids.numpy(),
            "config": np.asarray(np.bytes_(to_json(self.config))),
        }
        if self.query_ids is not None:
            arrays["query_ids"] = self.query_ids.numpy()
        return write_result(path, name, arrays, {"method": self.method, "kind": self.kind})

    @classmethod
    def load(cls, path: str | os.PathLike, name: str) -> Scores:
        """Read scores saved with :meth:`save`, checking every part before it is read.

        Raises ``KeyError`` when there are no results named ``name``, and
        :class:`~lightning_tda.trace.checks.TraceError` naming the part when they are malformed.
        """
        with reading_results(path) as r:
            where = f"results/{name}"
            if "/" in name or not r.has(where):
                available = r.members("results") if r.has("results") else []
                raise KeyError(f"No results named {name!r} in {path}; available: {available}.")
            attrs = r.attributes(where)
            kinds = (*KINDS, TIMELINE_KIND, EVALUATION_KIND)
            kind = expect_str(r, f"{where} attribute 'kind'", attrs.get("kind"), kinds)
            if kind == TIMELINE_KIND:
                raise KeyError(f"The results {name!r} in {path} are a timeline; read them with Timeline.load.")
            if kind == EVALUATION_KIND:
                raise KeyError(f"The results {name!r} in {path} are an evaluation; read them with Evaluation.load.")
            method = expect_str(r, f"{where} attribute 'method'", attrs.get("method"))
            (n,) = ids_shape(r, f"{where}/train_ids")
            query_ids = None
            if kind == "pairwise":
                (q,) = ids_shape(r, f"{where}/query_ids")
                query_ids = r.array(f"{where}/query_ids", [(q,)], kinds="iu")
            values = r.array(f"{where}/values", [(q, n)] if kind == "pairwise" else [(n,)], kinds="f")
            train_ids = r.array(f"{where}/train_ids", [(n,)], kinds="iu")
            config = r.json(f"{where}/config", dict)
            try:
                return cls(
                    values,
                    train_ids.astype(np.int64),
                    None if query_ids is None else query_ids.astype(np.int64),
                    method,
                    config,
                    kind,
                )
            except (ValueError, OverflowError) as err:
                raise r.error(where, str(err).rstrip(".")) from err

    @staticmethod
    def available(path: str | os.PathLike) -> list[str]:
        """Names of the scores stored in ``path`` (timelines, :meth:`Timeline.available`, and the evaluation
        are not listed)."""
        return [name for name, kind in stored_results(path).items() if kind not in (TIMELINE_KIND, EVALUATION_KIND)]


def stored_results(path: str | os.PathLike) -> dict[str, str]:
    """``{name: kind}`` of every result stored in ``path`` (kind ``"pairwise"``, ``"self"``, ``"timeline"``,
    ``"evaluation"``; empty when a result does not say)."""
    if not Path(path).exists():
        return {}
    with reading_results(path) as r:
        names = r.members("results") if r.has("results") else []
        return {name: str(r.attributes(f"results/{name}").get("kind", "")) for name in names}


def write_result(path: str | os.PathLike, name: str, arrays: dict[str, np.ndarray], attributes: dict[str, str]) -> str:
    """Write ``arrays`` as the datasets of ``results/<name>`` in an HDF5 file, with string ``attributes``;
    returns the name.

    Writing again under the same name overwrites the datasets in place when their shapes are unchanged
    (strings are fixed-length), so repeated attribution leaves the file's size alone: HDF5 does not give
    the space of deleted objects back, and variable-length strings would leave their old copies in the
    file's global heap.
    """
    if not name or "/" in name:
        raise ValueError(f"Results name {name!r}: use a name without '/'.")
    estimate = sum(array.nbytes for array in arrays.values()) + OBJECT_OVERHEAD * (len(arrays) + 2)
    with writing(path, estimate) as f:
        reader = TraceReader(f, Path(path))  # links out of the file are refused, never written through
        where = f"results/{name}"
        existing = reader.has(where)
        group = reader.group(where) if existing else f.require_group("results").create_group(name)
        for key in [key for key in group if key not in arrays]:
            del group[key]
        for key, array in arrays.items():
            if reader.has(f"{where}/{key}"):
                current = reader.dataset(f"{where}/{key}")
                if current.shape == array.shape and current.dtype == array.dtype:
                    current[...] = array
                    continue
                del group[key]
            group.create_dataset(key, data=array)
        for key, value in attributes.items():
            if not existing or reader.attribute(where, key) != value:
                group.attrs[key] = value
    return name


@contextmanager
def reading_results(path: str | os.PathLike) -> Iterator[TraceReader]:
    """``path`` checked in a child process, then opened read-only behind a :class:`TraceReader`."""
    parse_in_child(path)
    try:
        file = h5py.File(path, "r")
    except (OSError, RuntimeError, ValueError) as err:
        raise TraceError(f"{path} could not be opened to read scores ({str(err)[:300]}).") from err
    try:
        yield TraceReader(file, Path(path))
    finally:
        file.close()


def ids_shape(r: TraceReader, where: str) -> tuple[int, ...]:
    """The shape of a 1-D integer dataset of example ids; a :class:`TraceError` otherwise."""
    shape = r.shape_of(where, "iu")
    if len(shape) != 1:
        raise r.error(where, f"has shape {shape}, expected a list of example ids")
    return shape
