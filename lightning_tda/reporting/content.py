"""What a report holds, independent of where it goes (W&B, another tracker, HTML).

:func:`build_report` turns :class:`~lightning_tda.scores.Scores` plus the datasets (and optionally
the trained model and its task, for predictions and losses) into a :class:`ReportContent`: for
each method and query the rendered query with its top-k most helpful (largest positive scores)
and most harmful (most negative) training examples, and for self-influence a ranking of training
examples from the highest score down (likely mislabeled or atypical examples first). Given a
method's :class:`~lightning_tda.timeline.Timeline`, its section also says when in training each
query's proponents and opponents mattered (:class:`TimelineSection`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate

from lightning_tda.recording.cost import combined_cost, cost_scalars
from lightning_tda.reporting.render import AutoRenderer, Rendered, Renderer
from lightning_tda.scores import Scores
from lightning_tda.tasks import ClassificationTask, Task
from lightning_tda.timeline import Timeline
from lightning_tda.trace import Trace

if TYPE_CHECKING:
    from lightning_tda.evaluation.record import Evaluation, MethodLDS


@dataclass
class ExampleView:
    """One example as shown: its id in its dataset, rendering, label, model prediction and loss,
    and (in rankings) its score. ``noisy`` is ``True``/``False`` when the label noise is known."""

    id: int
    rendered: Rendered
    label: str
    prediction: str = ""
    loss: float = math.nan
    score: float | None = None
    noisy: bool | None = None

    def caption(self) -> str:
        parts = [f"#{self.id}", f"label {self.label}"]
        if self.prediction:
            parts.append(f"pred {self.prediction}")
        if self.score is not None:
            parts.append(f"score {self.score:+.3g}")
        if self.noisy:
            parts.append("noisy label")
        return " · ".join(parts)


@dataclass
class QueryView:
    query: ExampleView
    helpful: list[ExampleView]
    harmful: list[ExampleView]


class _MethodNotes:
    """What a section says about its scores beyond the numbers, read from the method's config."""

    config: dict[str, Any]

    @property
    def unit(self) -> str:
        """What one unit of score means (the method's ``config["unit"]``), empty if it did not say."""
        return str(self.config.get("unit", ""))

    @property
    def warnings(self) -> list[str]:
        """The method's warnings about its own assumptions (``config["warnings"]``)."""
        return [str(w) for w in self.config.get("warnings", [])]


@dataclass
class QueryTimeline:
    """When in training one query's shown proponents and opponents mattered.

    ``helpful``/``harmful``: ``(S, k)`` per-segment scores of the query's proponents/opponents (the ids
    of its :class:`QueryView`, in that order). ``support_segment``/``harm_segment``: the position of the
    segment that carried the largest share (``support_share``/``harm_share``) of the proponents' summed
    positive influence and of the opponents' summed negative influence. ``sentence`` says it in words.
    """

    helpful_ids: list[int]
    harmful_ids: list[int]
    helpful: np.ndarray
    harmful: np.ndarray
    support_segment: int
    support_share: float
    harm_segment: int
    harm_share: float
    sentence: str


@dataclass
class TimelineSection:
    """A method's scores over training time: one entry per segment (``labels`` like
    ``"steps 81–120 (segment 3 of 3, during the decay)"``, ``steps`` ``(S, 2)``), ``segment_values``
    the kept per-segment scores of every query (for histograms), and one :class:`QueryTimeline` per
    query in the order of the section's queries."""

    segments: np.ndarray
    steps: np.ndarray
    labels: list[str]
    segment_values: list[np.ndarray]
    queries: list[QueryTimeline]

    def short_label(self, position: int) -> str:
        first, last = self.steps[position]
        return f"segment {int(self.segments[position]) + 1} (steps {first}–{last})"


@dataclass
class MethodSection(_MethodNotes):
    """One method's pairwise scores: ``values`` is the ``(Q, N)`` matrix, ``queries`` its views;
    ``timeline`` when the method has a time axis and its timeline was given."""

    method: str
    config: dict[str, Any]
    values: np.ndarray
    queries: list[QueryView]
    lds: MethodLDS | None = None  # measured by `lightning-tda evaluate` on these very scores
    lds_note: str = ""  # why an evaluated method shows no LDS (its scores changed since)
    timeline: TimelineSection | None = None


@dataclass
class SelfInfluenceSection(_MethodNotes):
    """One method's self-influence: ``values`` ``(N,)``, ``ranking`` highest first."""

    method: str
    values: np.ndarray
    ranking: list[ExampleView]
    noisy_in_top: int | None = None
    noisy_total: int | None = None
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReportContent:
    title: str
    k: int
    methods: list[MethodSection] = field(default_factory=list)
    self_influence: list[SelfInfluenceSection] = field(default_factory=list)
    trace_path: Path | None = None
    images: bool = False
    evaluation: Evaluation | None = None

    def notes(self) -> dict[str, str]:
        """Text every tracker with a summary can hold: each method's unit and warnings (keys
        ``tda/<method>/unit``, ``tda/<method>/warnings``)."""
        out: dict[str, str] = {}
        for section in [*self.methods, *self.self_influence]:
            if section.unit:
                out.setdefault(f"tda/{section.method}/unit", section.unit)
            if section.warnings:
                out[f"tda/{section.method}/warnings"] = " ".join(section.warnings)
        if self.evaluation is not None:
            out["tda/evaluation/verdict"] = self.evaluation.verdict()[1]
        return out

    def scalars(self) -> dict[str, float]:
        """Summary numbers every tracker can hold (keys ``tda/<method>/<what>``)."""
        out: dict[str, float] = {}
        for section in self.methods:
            values = section.values
            out[f"tda/{section.method}/mean_score"] = float(values.mean())
            out[f"tda/{section.method}/mean_abs_score"] = float(np.abs(values).mean())
            out[f"tda/{section.method}/fraction_helpful"] = float((values > 0).mean())
            if section.lds is not None and section.lds.defined:
                out[f"tda/{section.method}/lds"] = section.lds.mean
                out[f"tda/{section.method}/lds_ci_low"] = section.lds.ci_low
                out[f"tda/{section.method}/lds_ci_high"] = section.lds.ci_high
        for section in self.self_influence:
            out[f"tda/{section.method}/self_influence_max"] = float(section.values.max())
            if section.noisy_in_top is not None and section.ranking:
                out[f"tda/{section.method}/noisy_precision_at_{len(section.ranking)}"] = section.noisy_in_top / len(
                    section.ranking
                )
        if self.trace_path is not None:
            costs = Trace.open(self.trace_path).recording_costs()
            if costs:  # what recording cost, over every fit of the trace
                out.update(cost_scalars(combined_cost(costs)))
        return out


def as_dataset(data: Dataset | DataLoader | Sequence[Tensor]) -> Dataset:
    """The map-style dataset behind ``data`` (a dataset, a DataLoader or a tuple of tensors)."""
    if isinstance(data, DataLoader):
        return data.dataset
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, Tensor) for t in data):
        return TensorDataset(*data)
    if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise ValueError(f"Reports need map-style datasets (indexable, with __len__); got {type(data).__name__}.")
    return data


def _format_number(value: float) -> str:
    return f"{value:.3g}"


def _label_text(target: Tensor, label_names: Sequence[str] | None) -> str:
    if target.numel() != 1 and not target.is_floating_point():  # a token sequence: its labelled tokens
        return f"{int((target >= 0).sum())} tokens"
    if target.numel() != 1:
        return f"{target.numel()} targets"
    value = target.item()
    if isinstance(value, int) or not target.is_floating_point():
        value = int(value)
        return label_names[value] if label_names is not None and 0 <= value < len(label_names) else str(value)
    return _format_number(value)


def _prediction_texts(outputs: Tensor, task: Task, label_names: Sequence[str] | None) -> list[str]:
    if isinstance(task, ClassificationTask) and outputs.dim() == 2:
        probs = outputs.float().softmax(dim=-1)
        confidence, predicted = probs.max(dim=-1)
        return [f"{_label_text(p, label_names)} ({c:.0%})" for p, c in zip(predicted, confidence.tolist())]
    if outputs.dim() == 1 or (outputs.dim() == 2 and outputs.shape[1] == 1):
        return [_format_number(v) for v in outputs.reshape(-1).tolist()]
    return ["" for _ in range(outputs.shape[0])]


def describe_examples(
    dataset: Dataset,
    ids: Sequence[int],
    renderer: Renderer,
    task: Task | None = None,
    model: nn.Module | None = None,
    label_names: Sequence[str] | None = None,
    noisy: Tensor | None = None,
    batch_size: int = 256,
) -> dict[int, ExampleView]:
    """Render ``dataset[ids]`` and, given a model and task, add predictions and per-example losses."""
    task = task or ClassificationTask()
    views: dict[int, ExampleView] = {}
    ids = [int(i) for i in ids]
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        batch = default_collate([dataset[i] for i in chunk])
        inputs, targets = task.inputs(batch), task.targets(batch)
        predictions, losses = [""] * len(chunk), [math.nan] * len(chunk)
        if model is not None:
            device = next(model.parameters()).device
            with torch.no_grad():
                on_device = _to(batch, device)
                outputs = task.forward(model, on_device).cpu()
                losses = task.loss(outputs, targets).tolist()
            predictions = _prediction_texts(outputs, task, label_names)
        for j, example_id in enumerate(chunk):
            views[example_id] = ExampleView(
                id=example_id,
                rendered=renderer(inputs[j]),
                label=_label_text(targets[j], label_names),
                prediction=predictions[j],
                loss=float(losses[j]),
                noisy=bool(noisy[example_id]) if noisy is not None else None,
            )
    return views


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {key: _to(value, device) for key, value in batch.items()}
    return batch


def build_report(
    scores: Scores | Sequence[Scores],
    queries: Dataset | DataLoader | Sequence[Tensor] | None,
    train: Dataset | DataLoader | Sequence[Tensor],
    *,
    model: nn.Module | None = None,
    task: Task | None = None,
    k: int = 5,
    renderer: Renderer | None = None,
    label_names: Sequence[str] | None = None,
    self_top: int = 50,
    noisy: Tensor | None = None,
    trace_path: str | os.PathLike | None = None,
    title: str = "Training data attribution",
    evaluation: Evaluation | None = None,
    timelines: Sequence[Timeline] = (),
) -> ReportContent:
    """Gather everything the reporters show.

    Args:
        scores: pairwise ``Scores`` (query ids index ``queries``) and/or self-influence ``Scores``
            (``kind="self"``); train ids index ``train``.
        queries: the query dataset (``None`` when only self-influence is reported).
        train: the training dataset.
        model: the trained model (e.g. its final trace checkpoint) for predictions and losses.
        task: how batches and losses look (default: classification with ``(x, y)`` batches).
        k: helpful and harmful examples shown per query.
        renderer: how to show one example (default :class:`AutoRenderer`).
        label_names: class names by label id.
        self_top: length of the self-influence ranking.
        noisy: ``(N,)`` bool mask of training labels known to be wrong (e.g. flipped on purpose);
            shown next to examples and counted in the self-influence ranking.
        trace_path: the trace the scores came from (logged as a W&B artifact).
        evaluation: the methods' measured LDS (``lightning-tda evaluate``), shown beside the scores it
            was measured on, with the method to trust.
        timelines: :class:`~lightning_tda.timeline.Timeline` of methods among ``scores`` (same method name,
            queries and training examples): their sections say when in training each query's shown
            proponents and opponents mattered.
    """
    scores = [scores] if isinstance(scores, Scores) else list(scores)
    by_method = {t.method: t for t in timelines}
    if not scores:
        raise ValueError("build_report needs at least one Scores.")
    if k < 1:
        raise ValueError(f"build_report(k={k}): show at least one example per side.")
    renderer = renderer or AutoRenderer()
    train = as_dataset(train)
    pairwise = [s for s in scores if s.kind == "pairwise"]
    if pairwise and queries is None:
        raise ValueError("Pairwise scores need the query dataset: pass queries=...")
    queries = as_dataset(queries) if queries is not None else None
    for s in scores:
        if int(s.train_ids.max()) >= len(train):
            raise ValueError(
                f"Scores of {s.method!r} name training example {int(s.train_ids.max())}, but the training set has "
                f"{len(train)} examples; pass the training set the scores were computed on."
            )
        if s.kind == "pairwise" and int(s.query_ids.max()) >= len(queries):
            raise ValueError(
                f"Scores of {s.method!r} name query {int(s.query_ids.max())}, but the query set has {len(queries)} "
                f"examples; pass the query set the scores were computed on."
            )
    if model is not None:
        model = model.eval()

    # Which examples are shown at all, so each is rendered (and predicted) once.
    ranked: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
    train_needed: set[int] = set()
    query_needed: set[int] = set()
    for i, s in enumerate(scores):
        if s.kind == "pairwise":
            top = s.top_k(k)
            bottom = s.bottom_k(k)
            ranked[i] = (*top, *bottom)
            train_needed.update(top[1].reshape(-1).tolist() + bottom[1].reshape(-1).tolist())
            query_needed.update(s.query_ids.tolist())
        else:
            top = s.top_k(self_top)
            ranked[i] = top
            train_needed.update(top[1].tolist())
    describe = dict(renderer=renderer, task=task, model=model, label_names=label_names)
    train_views = describe_examples(train, sorted(train_needed), noisy=noisy, **describe)
    query_views = describe_examples(queries, sorted(query_needed), **describe) if query_needed else {}

    def scored(ids: Tensor, values: Tensor) -> list[ExampleView]:
        return [dataclasses.replace(train_views[int(i)], score=float(v)) for i, v in zip(ids, values)]

    content = ReportContent(
        title=title,
        k=k,
        trace_path=Path(trace_path) if trace_path is not None else None,
        images=any(v.rendered.image is not None for v in train_views.values()),
        evaluation=evaluation,
    )
    for i, s in enumerate(scores):
        if s.kind == "pairwise":
            top_values, top_ids, bottom_values, bottom_ids = ranked[i]
            views = [
                QueryView(
                    query=query_views[int(q)],
                    helpful=scored(top_ids[row], top_values[row]),
                    harmful=scored(bottom_ids[row], bottom_values[row]),
                )
                for row, q in enumerate(s.query_ids)
            ]
            method_section = MethodSection(s.method, dict(s.config), s.values.numpy(), views)
            _attach_lds(method_section, s, evaluation)
            if s.method in by_method:
                method_section.timeline = timeline_section(by_method[s.method], s, views)
            content.methods.append(method_section)
        else:
            top_values, top_ids = ranked[i]
            ranking = scored(top_ids, top_values)
            section = SelfInfluenceSection(s.method, s.values.numpy(), ranking, config=dict(s.config))
            if noisy is not None:
                section.noisy_in_top = sum(bool(v.noisy) for v in ranking)
                section.noisy_total = int(noisy.sum())
            content.self_influence.append(section)
    return content


def _attach_lds(section: MethodSection, scores: Scores, evaluation: Evaluation | None) -> None:
    """Show the method's measured LDS beside its scores only if they are the scores it was measured on."""
    from lightning_tda.evaluation.record import scores_digest

    measured = evaluation.method(scores.method) if evaluation is not None else None
    if measured is None:
        return
    if measured.scores_digest == scores_digest(scores):
        section.lds = measured
    else:
        section.lds_note = (
            "These scores changed since `lightning-tda evaluate` measured this method's LDS; evaluate again to "
            "measure them."
        )


def timeline_section(timeline: Timeline, scores: Scores, views: Sequence[QueryView]) -> TimelineSection:
    """The :class:`TimelineSection` of ``timeline`` for the queries shown from ``scores``."""
    if not torch.equal(timeline.train_ids, scores.train_ids) or not set(scores.query_ids.tolist()) <= set(
        timeline.query_ids.tolist()
    ):
        raise ValueError(
            f"The timeline of {timeline.method!r} covers other queries or training examples than its scores; "
            f"pass the timeline computed with them (attribute_over_time on the same data)."
        )
    row_of = {int(q): row for row, q in enumerate(timeline.query_ids.tolist())}
    labels = [timeline.label(position) for position in range(len(timeline.segments))]
    queries = []
    for view in views:
        row = row_of[view.query.id]
        helpful_ids, harmful_ids = [e.id for e in view.helpful], [e.id for e in view.harmful]
        try:
            helpful = timeline.series(row, helpful_ids).double().numpy()
            harmful = timeline.series(row, harmful_ids).double().numpy()
        except KeyError as err:
            raise ValueError(f"{err.args[0]} The report shows {len(helpful_ids)} per side.") from err
        support, support_share = _dominant(helpful.sum(axis=1))
        harm, harm_share = _dominant(-harmful.sum(axis=1))
        sentence = (
            f"Most of its support came from {labels[support]}: {support_share:.0%} of the influence of its top "
            f"{len(helpful_ids)} proponents. Its opponents hurt it most in {labels[harm]} ({harm_share:.0%})."
        )
        queries.append(
            QueryTimeline(
                helpful_ids, harmful_ids, helpful, harmful, support, support_share, harm, harm_share, sentence
            )
        )
    return TimelineSection(
        timeline.segments.numpy(),
        timeline.steps.numpy(),
        labels,
        [timeline.values[s].numpy().reshape(-1) for s in range(len(timeline.segments))],
        queries,
    )


def _dominant(per_segment: np.ndarray) -> tuple[int, float]:
    """The segment with the largest positive part of ``per_segment`` ``(S,)`` and its share of the positive parts."""
    positive = np.clip(per_segment, 0, None)
    position = int(np.argmax(positive))
    total = float(positive.sum())
    return position, float(positive[position] / total) if total > 0 else 0.0
