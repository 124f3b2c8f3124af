"""What every attribution method shares: run options, checkpoints, per-example gradients.

A method is constructed from a :class:`~lightning_tda.trace.Trace`, an instance of the trained
architecture and a :class:`~lightning_tda.tasks.Task`; ``attribute(queries, train)`` returns a
:class:`~lightning_tda.scores.Scores` of shape ``(n_queries, n_train)``. Training data is streamed
in batches; per-example gradients exist for one batch at a time only, factored per layer
(:class:`~lightning_tda.layers.gradients.LayerGradients`), and are never concatenated across layers.

Units: every method reports, per unit of score, the *predicted change of the query's measurement
(the loss unless the task says otherwise, in its own units) when the training example is removed
from training*: +0.01 means "without this example the query's loss would be about 0.01 higher".
Influence functions carry their 1/N, gradient-step methods the learning rate each example received;
each method's ``unit`` says how it gets there, and ``Scores.config`` records it (``unit``) so
reports can show it. How close each comes to re-training is measured in BENCHMARKS.md.

Distributed attribution: pass a launched ``lightning.fabric.Fabric`` as ``MethodOptions(fabric=...)`` and every
process scores every ``world_size``-th training batch (:meth:`AttributionMethod.train_batches`);
:meth:`AttributionMethod.sum_across_processes` then sums the partial score matrices (or any
partial sums over training examples), so each process ends with the full result.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_tda.batches import Data, as_loader, batches_with_ids, move_to, progress_bar
from lightning_tda.layers.gradients import Gradients, compute_dtype, per_example_rows
from lightning_tda.layers.tracked import TrackedLayer
from lightning_tda.scores import Scores
from lightning_tda.tasks import Task
from lightning_tda.timeline import ScoreSums, Timeline, segment_spans
from lightning_tda.trace.reader import Trace


@dataclass
class MethodOptions:
    """How any attribution method runs (not what it computes): the arguments every method shares.

    Pass one as ``options=`` to any method; in a YAML config it is ``init_args: {options: {...}}``.

    Attributes:
        layers: restrict to these trace layers (fnmatch patterns on module names); default all
            tracked layers.
        batch_size: training examples per batch when streaming the training set.
        query_batch_size: queries per batch.
        device: where to compute; default ``None`` = the device the model's parameters are on.
        progress: show a progress bar (default: when stderr is a terminal).
        fabric: a launched ``lightning.fabric.Fabric`` to shard the training set across processes
            (the command line supplies it with ``attribution.devices``).
    """

    layers: list[str] | None = None
    batch_size: int = 128
    query_batch_size: int = 64
    device: str | None = None
    progress: bool | None = None
    fabric: Any = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "query_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MethodOptions({name}={value!r}): use a positive integer.")
        if isinstance(self.layers, str):
            self.layers = [self.layers]


def optimizer_name(trace: Trace) -> str:
    """The recorded optimizer's name (``"SGD"``, ``"Adam"``, ``"AdamW"``, ...), from the trace's record or class."""
    return str(trace.optimizer.get("name", trace.optimizer_class.rsplit(".", 1)[-1]))


def _momentum_factors(trace: Trace, groups: int) -> np.ndarray:
    """``(groups,)``: how far one unit of learning rate moves the parameters in steady state per
    optimizer param group, ``(1 − dampening)/(1 − β)`` for SGD with momentum β, 1 otherwise (Adam's
    preconditioner is not modelled)."""
    factors = np.ones(groups)
    if optimizer_name(trace) == "SGD":
        for index, group in enumerate(trace.optimizer.get("param_groups", [])[:groups]):
            beta = float(group.get("momentum", 0.0) or 0.0)
            if 0 < beta < 1:
                factors[index] = (1.0 - float(group.get("dampening", 0.0) or 0.0)) / (1.0 - beta)
    return factors


def learning_rate_mass(trace: Trace) -> float:
    """``Σ_t η_t`` over the recorded optimizer steps, with momentum's steady-state factor;
    the largest over param groups. Divided by N, it is the learning rate each training example
    received over training (it is in a batch of B with probability B/N and weighs 1/B there)."""
    lrs = trace.steps().lr
    if not len(lrs):
        return 0.0
    return float((lrs.sum(axis=0) * _momentum_factors(trace, lrs.shape[1])).max())


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model without tensors."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


class AttributionMethod:
    """Base class of the attribution methods.

    Args:
        trace: the recorded trace (:meth:`Trace.open`).
        model: an instance of the trained architecture; checkpoints are loaded into it.
        task: how to get per-example losses and measurements from a batch.
        options: the shared :class:`MethodOptions` (layers, batch sizes, device, progress, Fabric).

    Attributes:
        device: where everything is computed (``options.device`` or the model's).
        dtype: the dtype of gradient products (the model's, at least float32); their results are
            accumulated in float64.
    """

    name = "base"
    #: What one unit of score means; see the module docstring. Subclasses say how they get there.
    unit = "predicted change of the query's measurement when the training example is removed"

    def __init__(self, trace: Trace, model: nn.Module, task: Task, *, options: MethodOptions | None = None) -> None:
        self.options = options = options if options is not None else MethodOptions()
        self.device = torch.device(options.device) if options.device is not None else model_device(model)
        self.trace = trace
        self.model = model.to(self.device)
        self.dtype = compute_dtype(next(iter(model.parameters()), torch.empty(0)).dtype)
        self.task = task
        self.batch_size = options.batch_size
        self.query_batch_size = options.query_batch_size
        self.progress = options.progress
        self.fabric = options.fabric
        tracked = trace.tracked_layers(self.model)
        if options.layers is not None:
            tracked = [la for la in tracked if any(fnmatch.fnmatchcase(la.name, p) for p in options.layers)]
            if not tracked:
                raise ValueError(
                    f"options.layers={list(options.layers)} matches none of the trace's layers {trace.layer_names}."
                )
        self.layers: list[TrackedLayer] = tracked

    # --- to implement ---------------------------------------------------------------------------
    def attribute(self, queries: Data, train: Data) -> Scores:
        """Scores ``(n_queries, n_train)``; positive = the training example helped the query."""
        raise NotImplementedError

    @classmethod
    def has_time_axis(cls) -> bool:
        """Whether the method splits its scores over training time (:meth:`attribute_over_time`)."""
        return cls.attribute_over_time is not AttributionMethod.attribute_over_time

    def attribute_over_time(self, queries: Data, train: Data, *, keep: int | None = None) -> Timeline:
        """The scores split over the trace's segments (:class:`~lightning_tda.timeline.Timeline`), in the one
        pass ``attribute`` makes; ``keep`` bounds the examples kept per query (see ``ScoreSums.timeline``)."""
        raise NotImplementedError(
            f"{type(self).__name__} has no time axis: it scores with the final model only. SOURCE and TracInCP "
            f"sum over the training trajectory; use their attribute_over_time for when in training examples mattered."
        )

    def config(self) -> dict[str, Any]:
        """Hyper-parameters recorded with the scores (and the unit of the scores)."""
        return {"layers": [la.name for la in self.layers], "batch_size": self.batch_size, "unit": self.unit}

    def training_set_size(self, n_train: int) -> int:
        """N, the number of examples the model was trained on: the trace's record, else ``n_train``
        (the size of the training set being scored)."""
        return self.trace.dataset_size or n_train

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

    def gradient_rows(self, batch: Any, role: str) -> Gradients:
        """Per-example gradients of the batch, factored per layer: ``{layer: LayerGradients}``.

        ``role="train"`` differentiates the training loss, ``role="query"`` the task's measurement.
        Products with them (:mod:`lightning_tda.layers.gradients`) are computed one layer at a time, so
        memory stays bounded by the largest layer.
        """
        values = self.task.measurement if role == "query" else self.task.train_loss
        try:
            return per_example_rows(self.model, self.layers, lambda m: values(m, batch))
        except RuntimeError as err:
            raise ValueError(
                f"The model could not be evaluated on a {role} batch ({str(err).splitlines()[0]}). Check that "
                f"the {role} examples have the shape and type the model was trained on."
            ) from err

    def gradients(self, batch: Any, role: str) -> dict[str, Tensor]:
        """Dense per-example gradients of the batch: ``{layer: (B, out, a_dim)}`` in the model's dtype
        (at least float32). For the few query examples; stream training batches with :meth:`gradient_rows`."""
        return {name: g.dense() for name, g in self.gradient_rows(batch, role).items()}

    def query_matrices(
        self,
        queries: Data,
        desc: str = "query gradients",
        transform: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
    ) -> dict[str, Tensor]:
        """Every query's gradient per layer, ``{layer: (Q, out, a_dim)}`` in :attr:`dtype`.

        ``transform`` maps each query batch's dense gradients first (e.g. preconditions them in float64).
        """
        parts: dict[str, list[Tensor]] = {}
        for _, batch in self.batches(queries, "query", desc):
            grads = self.gradients(batch, "query")
            for name, g in (transform(grads) if transform is not None else grads).items():
                parts.setdefault(name, []).append(g.to(self.dtype))
        return {name: torch.cat(chunks) for name, chunks in parts.items()}

    def score_sums(
        self, n_queries: int, n_train: int, scale: float, segments: Sequence[int] | None = None
    ) -> ScoreSums:
        """The running ``(Q, N)`` sums of one scoring pass on this method's device, summed across processes
        at the end; with ``segments``, also each segment's part (for :meth:`attribute_over_time`)."""
        return ScoreSums(
            n_queries, n_train, self.device, scale=scale, reduce=self.sum_across_processes, segments=segments
        )

    def timeline(self, sums: ScoreSums, keep: int | None = None) -> Timeline:
        """The :class:`~lightning_tda.timeline.Timeline` of a finished pass with segments."""
        n_queries, n_train = sums.total.shape
        spans = segment_spans(self.trace, sums.segments or [])
        return sums.timeline(spans, torch.arange(n_train), torch.arange(n_queries), self.name, self.config(), keep)

    def scores(self, values: Tensor, n_queries: int | None, n_train: int, kind: str = "pairwise") -> Scores:
        query_ids = None if kind == "self" else torch.arange(n_queries)
        return Scores(values.float().cpu(), torch.arange(n_train), query_ids, self.name, self.config(), kind)
