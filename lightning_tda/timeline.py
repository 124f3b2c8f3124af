"""Timeline: when in training each training example mattered to each query.

Only a training-time recorder can say this. SOURCE and TracInCP are sums over the trace's
segments (SOURCE over segment responses, TracInCP over checkpoints, grouped here by the segment
they were taken in), so their scores split into one ``(Q, N)`` slice per segment:
``Timeline.values[s, q, m]`` is the part of the score of training example ``m`` for query ``q``
that segment ``s`` contributes, in the unit of the method's scores, and the slices add up to the
scores ``attribute`` returns (:meth:`Timeline.total`). Positive = helped, as everywhere.

The slices are accumulated in the same single pass that computes the scores (:class:`ScoreSums`).
They take ``S·Q·N·4`` bytes; up to :data:`DEFAULT_MAX_BYTES` every example is kept, beyond it (or
when ``keep`` is given) only the ``keep`` largest and ``keep`` smallest totals of each query keep
their slices (the query's strongest proponents and opponents), while the totals stay complete.
A timeline is saved into the trace under ``results/<method>-timeline`` next to the scores.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_tda.scores import TIMELINE_KIND, Scores, ids_shape, reading_results, stored_results, write_result
from lightning_tda.trace.checks import TraceError, expect_int, expect_str
from lightning_tda.trace.reader import Trace
from lightning_tda.trace.schema import to_json

#: Up to this many bytes (``S·Q·N·4``) a timeline keeps every training example's slices.
DEFAULT_MAX_BYTES = 256 * 2**20
#: Beyond :data:`DEFAULT_MAX_BYTES`: the proponents and the opponents kept per query (each).
DEFAULT_KEEP = 100
#: How the learning rate moved inside a segment (relative change between its first and last step).
PHASES = ("warm-up", "decay", "warm-up and decay", "constant rate")
_PHASE_TOLERANCE = 0.01
_SUFFIX = "-timeline"


@dataclass
class Timeline:
    """Per-segment attribution scores of one method, with the segments' steps, epochs and learning rates.

    Attributes:
        values: ``(S, Q, K)`` float32; ``values[s, q, j]`` is segment ``s``'s part of the score of training
            example ``train_ids[kept[q, j]]`` (``train_ids[j]`` when ``kept`` is ``None``, ``K = N``).
        totals: ``(Q, N)`` float32, the complete scores (the sum over all segments), every example.
        train_ids: ``(N,)`` int64 ids of the training examples.
        query_ids: ``(Q,)`` int64 ids of the queries.
        segments: ``(S,)`` int64 indices of the trace segments.
        steps: ``(S, 2)`` int64, the first and last optimizer step of each segment (steps count from 1).
        epochs: ``(S, 2)`` int64, the first and last epoch of each segment.
        learning_rates: ``(S,)`` float64, each segment's mean learning rate (first param group).
        phases: ``S`` of :data:`PHASES`: how the learning rate moved inside each segment.
        trace_segments: the number of segments in the trace (for "segment 3 of 3").
        method, config: as in :class:`~lightning_tda.scores.Scores`.
        kept: ``(Q, K)`` int64 positions into ``train_ids`` whose slices are kept, per query; ``None`` = all.
    """

    values: Tensor
    totals: Tensor
    train_ids: Tensor
    query_ids: Tensor
    segments: Tensor
    steps: Tensor
    epochs: Tensor
    learning_rates: Tensor
    phases: list[str]
    trace_segments: int
    method: str
    config: dict[str, Any] = field(default_factory=dict)
    kept: Tensor | None = None

    def __post_init__(self) -> None:
        self.values = torch.as_tensor(self.values).float()
        self.totals = torch.as_tensor(self.totals).float()
        self.train_ids = torch.as_tensor(self.train_ids, dtype=torch.int64)
        self.query_ids = torch.as_tensor(self.query_ids, dtype=torch.int64)
        self.segments = torch.as_tensor(self.segments, dtype=torch.int64)
        self.steps = torch.as_tensor(self.steps, dtype=torch.int64)
        self.epochs = torch.as_tensor(self.epochs, dtype=torch.int64)
        self.learning_rates = torch.as_tensor(self.learning_rates, dtype=torch.float64)
        self.phases = [str(p) for p in self.phases]
        if self.kept is not None:
            self.kept = torch.as_tensor(self.kept, dtype=torch.int64)
        n, q, s = len(self.train_ids), len(self.query_ids), len(self.segments)
        if self.train_ids.dim() != 1 or self.query_ids.dim() != 1 or self.segments.dim() != 1:
            raise ValueError("Timeline train_ids, query_ids and segments must be 1-D.")
        if tuple(self.totals.shape) != (q, n):
            raise ValueError(f"Timeline totals have shape {tuple(self.totals.shape)}, expected {(q, n)}.")
        k = n if self.kept is None else self.kept.shape[-1]
        if self.kept is not None and (
            tuple(self.kept.shape) != (q, k) or (self.kept < 0).any() or (self.kept >= n).any()
        ):
            raise ValueError(f"Timeline kept must be (Q, K) = ({q}, K) positions into the {n} training ids.")
        if tuple(self.values.shape) != (s, q, k):
            raise ValueError(f"Timeline values have shape {tuple(self.values.shape)}, expected {(s, q, k)}.")
        for name in ("steps", "epochs"):
            if tuple(getattr(self, name).shape) != (s, 2):
                raise ValueError(f"Timeline {name} have shape {tuple(getattr(self, name).shape)}, expected {(s, 2)}.")
        if tuple(self.learning_rates.shape) != (s,) or len(self.phases) != s:
            raise ValueError(f"Timeline learning_rates and phases need one entry per segment ({s}).")
        if unknown := sorted(set(self.phases) - set(PHASES)):
            raise ValueError(f"Timeline phases {unknown}: use {', '.join(PHASES)}.")
        if (self.steps[:, 0] > self.steps[:, 1]).any() or (self.train_ids < 0).any():
            raise ValueError("Timeline steps must be (first, last) pairs and train_ids non-negative.")
        if s and not (0 <= int(self.segments.min()) and int(self.segments.max()) < self.trace_segments):
            raise ValueError(f"Timeline segments {self.segments.tolist()} are not among {self.trace_segments}.")

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(S, Q, K)``."""
        return tuple(self.values.shape)

    def total(self) -> Scores:
        """The scores summed over the segments: what the method's ``attribute`` returns."""
        return Scores(self.totals, self.train_ids, self.query_ids, self.method, dict(self.config))

    def series(self, row: int, train_ids: Sequence[int] | Tensor) -> Tensor:
        """``(S, m)`` float32: the per-segment scores of query row ``row`` for the given training ids.

        Raises ``KeyError`` naming an id whose slices were not kept (see ``kept``)."""
        position = {int(t): j for j, t in enumerate(self.train_ids.tolist())}
        columns = {int(c): j for j, c in enumerate(self.kept[row].tolist())} if self.kept is not None else None
        chosen = []
        for train_id in torch.as_tensor(train_ids).reshape(-1).tolist():
            column = position.get(int(train_id))
            if column is not None and columns is not None:
                column = columns.get(column)
            if column is None:
                raise KeyError(
                    f"Training example {train_id} has no per-segment scores for query {int(self.query_ids[row])}: "
                    f"the timeline kept {self.values.shape[-1]} examples per query (pass a larger keep)."
                )
            chosen.append(column)
        return self.values[:, row, chosen]

    def label(self, position: int) -> str:
        """``"steps 81–120 (segment 3 of 3, during the decay)"`` for the segment at ``position``."""
        first, last = self.steps[position].tolist()
        phase = self.phases[position]
        during = "at a constant rate" if phase == "constant rate" else f"during the {phase}"
        index = int(self.segments[position]) + 1
        return f"steps {first}–{last} (segment {index} of {self.trace_segments}, {during})"

    # --- persistence ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, name: str | None = None) -> str:
        """Write into ``results/<name>`` (default ``<method>-timeline``) of an HDF5 file; returns the name."""
        name = name or f"{self.method}{_SUFFIX}"
        description = {"phases": self.phases, "trace_segments": self.trace_segments, "config": self.config}
        arrays = {
            "values": self.values.numpy(),
            "totals": self.totals.numpy(),
            "train_ids": self.train_ids.numpy(),
            "query_ids": self.query_ids.numpy(),
            "segments": self.segments.numpy(),
            "steps": self.steps.numpy(),
            "epochs": self.epochs.numpy(),
            "learning_rates": self.learning_rates.numpy(),
            "description": np.asarray(np.bytes_(to_json(description))),
        }
        if self.kept is not None:
            arrays["kept"] = self.kept.numpy()
        return write_result(path, name, arrays, {"method": self.method, "kind": TIMELINE_KIND})

    @classmethod
    def load(cls, path: str | os.PathLike, name: str) -> Timeline:
        """Read a timeline saved with :meth:`save`, checking every part before it is read.

        Raises ``KeyError`` when there is no timeline named ``name``, and
        :class:`~lightning_tda.trace.checks.TraceError` naming the part when it is malformed."""
        with reading_results(path) as r:
            where = f"results/{name}"
            if "/" in name or not r.has(where):
                raise KeyError(f"No results named {name!r} in {path}; timelines there: {cls.available(path)}.")
            attrs = r.attributes(where)
            expect_str(r, f"{where} attribute 'kind'", attrs.get("kind"), (TIMELINE_KIND,))
            method = expect_str(r, f"{where} attribute 'method'", attrs.get("method"))
            (n,) = ids_shape(r, f"{where}/train_ids")
            (q,) = ids_shape(r, f"{where}/query_ids")
            (s,) = ids_shape(r, f"{where}/segments")
            kept = None
            if r.has(f"{where}/kept"):
                shape = r.shape_of(f"{where}/kept", "iu")
                if len(shape) != 2 or shape[0] != q:
                    raise r.error(f"{where}/kept", f"has shape {shape}, expected ({q}, K)")
                kept = r.array(f"{where}/kept", [shape], kinds="iu").astype(np.int64)
            k = n if kept is None else kept.shape[1]
            description = r.json(f"{where}/description", dict)
            phases = description.get("phases")
            if not isinstance(phases, list) or len(phases) != s:
                raise r.error(f"{where}/description", f"holds no list of {s} phases")
            for position, phase in enumerate(phases):
                expect_str(r, f"{where}/description phase {position}", phase, PHASES)
            trace_segments = expect_int(r, f"{where}/description trace_segments", description.get("trace_segments"), 1)
            config = description.get("config")
            if not isinstance(config, dict):
                raise r.error(f"{where}/description", "holds no config object")
            arrays = {
                "values": r.array(f"{where}/values", [(s, q, k)], kinds="f"),
                "totals": r.array(f"{where}/totals", [(q, n)], kinds="f"),
                "train_ids": r.array(f"{where}/train_ids", [(n,)], kinds="iu").astype(np.int64),
                "query_ids": r.array(f"{where}/query_ids", [(q,)], kinds="iu").astype(np.int64),
                "segments": r.array(f"{where}/segments", [(s,)], kinds="iu").astype(np.int64),
                "steps": r.array(f"{where}/steps", [(s, 2)], kinds="iu").astype(np.int64),
                "epochs": r.array(f"{where}/epochs", [(s, 2)], kinds="iu").astype(np.int64),
                "learning_rates": r.array(f"{where}/learning_rates", [(s,)], kinds="f"),
            }
            for key in ("values", "totals", "learning_rates"):
                if not np.isfinite(arrays[key]).all():
                    raise r.error(f"{where}/{key}", "holds values that are not finite")
            try:
                return cls(
                    **arrays,
                    phases=phases,
                    trace_segments=trace_segments,
                    method=method,
                    config=config,
                    kept=kept,
                )
            except (ValueError, OverflowError) as err:
                raise r.error(where, str(err).rstrip(".")) from err

    @staticmethod
    def available(path: str | os.PathLike) -> list[str]:
        """Names of the timelines stored in ``path``."""
        return [name for name, kind in stored_results(path).items() if kind == TIMELINE_KIND]


# ------------------------------------------------------------------------------ the segments


@dataclass(frozen=True)
class SegmentSpans:
    """Where the segments lie in training, read from the trace's step log (``(S, …)`` arrays as in
    :class:`Timeline`)."""

    segments: np.ndarray
    steps: np.ndarray
    epochs: np.ndarray
    learning_rates: np.ndarray
    phases: list[str]
    trace_segments: int


def learning_rate_phase(rates: np.ndarray) -> str:
    """One of :data:`PHASES` for a segment's learning rates ``(steps,)`` in step order: warm-up if the
    rate rises from its first to its last step, decay if it falls, both if it peaks inside the segment,
    constant otherwise (changes under 1% of the peak count as constant)."""
    rates = np.asarray(rates, dtype=np.float64)
    if rates.size == 0:
        return "constant rate"
    tolerance = _PHASE_TOLERANCE * float(np.abs(rates).max())
    rises = float(rates.max() - rates[0]) > tolerance
    falls = float(rates.max() - rates[-1]) > tolerance
    if rises and falls:
        return "warm-up and decay"
    return "warm-up" if rises else "decay" if falls else "constant rate"


def segment_spans(trace: Trace, segments: Sequence[int]) -> SegmentSpans:
    """The steps, epochs, mean learning rate and phase of each of ``segments`` from ``trace``'s step log."""
    log = trace.steps()
    count = max(len(trace.segments), max(segments, default=-1) + 1)
    steps, epochs, rates, phases = [], [], [], []
    for s in segments:
        rows = np.nonzero(log.segment == s)[0]
        if not len(rows):
            raise TraceError(f"Segment {s} of {trace.path} has no optimizer steps in the step log; it has no timeline.")
        steps.append((int(log.step[rows].min()), int(log.step[rows].max())))
        epochs.append((int(log.epoch[rows].min()), int(log.epoch[rows].max())))
        lr = log.lr[rows, 0] if log.lr.ndim == 2 else log.lr[rows]
        rates.append(float(np.mean(lr)))
        phases.append(learning_rate_phase(lr))
    return SegmentSpans(
        np.asarray(segments, dtype=np.int64).reshape(-1),
        np.asarray(steps, dtype=np.int64).reshape(-1, 2),
        np.asarray(epochs, dtype=np.int64).reshape(-1, 2),
        np.asarray(rates, dtype=np.float64),
        phases,
        count,
    )


# ------------------------------------------------------------------------------ one pass


class ScoreSums:
    """The running sums of one scoring pass: the ``(Q, N)`` float64 scores and, for a timeline, each
    segment's part of them.

    A method announces the segment it is in with :meth:`enter` (segments in the order given, each
    once; every process of a distributed run announces the same ones) and adds batches of scores
    with :meth:`add`. Without segments only the total is kept, so ``attribute`` costs what it did.
    With segments the current segment's sum is kept on the device and, once the pass leaves the
    segment, summed across processes (``reduce``) into the total and stored as float32: in memory
    up to ``max_bytes`` (``S·Q·N·4``), else in a temporary file.

    Args:
        n_queries, n_train: ``Q`` and ``N``.
        device: where the sums live (the method's device).
        scale: multiplies every score (the method's per-example unit, e.g. ``1/N``).
        reduce: sums a partial result across processes (identity when ``None``).
        segments: the trace segments of the pass for a timeline; ``None`` for scores only.
        max_bytes: the bound on the per-segment slices kept in memory.
    """

    def __init__(
        self,
        n_queries: int,
        n_train: int,
        device: torch.device,
        *,
        scale: float = 1.0,
        reduce: Callable[[Tensor], Tensor] | None = None,
        segments: Sequence[int] | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.total = torch.zeros(n_queries, n_train, dtype=torch.float64, device=device)
        self.scale = scale
        self.reduce = reduce or (lambda tensor: tensor)
        self.segments = None if segments is None else [int(s) for s in segments]
        self.max_bytes = max_bytes
        self._current: Tensor | None = None
        self._position = -1
        self._file = None
        if self.segments is None:
            self._slices: Any = None
        elif len(self.segments) * n_queries * n_train * 4 <= max_bytes:
            self._slices = np.zeros((len(self.segments), n_queries, n_train), dtype=np.float32)
        else:
            self._file = tempfile.TemporaryFile(prefix="lightning_tda_timeline_")
            self._slices = np.memmap(
                self._file, dtype=np.float32, mode="w+", shape=(len(self.segments), n_queries, n_train)
            )

    def enter(self, segment: int) -> None:
        """The pass is now in ``segment`` (a no-op when it already is, or without a timeline)."""
        if self.segments is None or (self._position >= 0 and self.segments[self._position] == segment):
            return
        if segment not in self.segments[self._position + 1 :]:
            raise RuntimeError(
                f"Segment {segment} entered out of order: the pass covers segments {self.segments} in that order "
                f"and has left {self.segments[: self._position + 1]}."
            )
        self._close()
        self._position = self.segments.index(segment)
        self._current = torch.zeros_like(self.total)

    def add(self, columns: Tensor, values: Tensor) -> None:
        """Add ``values`` ``(Q, B)`` to the scores of the training columns ``columns`` ``(B,)``."""
        if self.segments is None:
            self.total[:, columns] += values
            return
        if self._current is None:
            raise RuntimeError("ScoreSums.add before enter(segment): say which segment the scores belong to.")
        self._current[:, columns] += values

    def _close(self) -> None:
        if self._current is None:
            return
        part = self.reduce(self._current) * self.scale
        self.total += part
        self._slices[self._position] = part.float().cpu().numpy()
        self._current = None

    def scores(self) -> Tensor:
        """``(Q, N)`` float64: the complete scores, summed across processes and scaled."""
        if self.segments is None:
            return self.reduce(self.total) * self.scale
        self._close()
        if self._position != len(self.segments) - 1:
            raise RuntimeError(f"The pass ended before it entered segment {self.segments[self._position + 1]}.")
        return self.total

    def timeline(
        self,
        spans: SegmentSpans,
        train_ids: Tensor,
        query_ids: Tensor,
        method: str,
        config: dict[str, Any],
        keep: int | None = None,
    ) -> Timeline:
        """The :class:`Timeline` of the pass. ``keep``: proponents and opponents kept per query (each); ``None``
        keeps every example while ``S·Q·N·4 ≤ max_bytes`` and :data:`DEFAULT_KEEP` beyond."""
        if self.segments is None:
            raise RuntimeError("These sums were accumulated without segments; pass segments= for a timeline.")
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise ValueError(f"keep={keep!r}: use a positive number of examples per query and side, or None.")
        totals = self.scores()
        n_queries, n_train = totals.shape
        if keep is None and self._file is None:
            keep = n_train
        keep = DEFAULT_KEEP if keep is None else keep
        kept = None
        if 2 * keep >= n_train and self._file is None:
            values = torch.from_numpy(self._slices)
        else:
            order = totals.argsort(dim=1, descending=True, stable=True).cpu()
            kept = order if 2 * keep >= n_train else torch.cat([order[:, :keep], order[:, -keep:]], dim=1)
            rows = kept.numpy()
            values = torch.from_numpy(
                np.stack([np.take_along_axis(np.asarray(part), rows, axis=1) for part in self._slices])
            )
        if self._file is not None:
            self._file.close()
        return Timeline(
            values,
            totals.float().cpu(),
            train_ids,
            query_ids,
            spans.segments,
            spans.steps,
            spans.epochs,
            spans.learning_rates,
            spans.phases,
            spans.trace_segments,
            method,
            config,
            kept,
        )
