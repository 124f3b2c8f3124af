"""Influence reports in Weights & Biases.

Per method: a table ``tda/<method>/queries`` with one row per query (the query rendered, its label,
prediction and loss, then its ``k`` most helpful and ``k`` most harmful training examples rendered
the same way, each with its id and score), a histogram ``tda/<method>/scores``, and for
self-influence a ranking table ``tda/<method>/self_influence`` (highest first); after
``lightning-tda evaluate``, a table ``tda/evaluation/lds`` of each method's LDS and a bar chart
``tda/evaluation/lds_chart``. The trace file,
which holds the scores under ``results/``, is logged as an artifact of type ``tda-trace``.

For a method with a timeline: a table ``tda/<method>/timeline`` (one row per query, shown
proponent or opponent and segment, with the segment's steps and score), per query a line chart
``tda/<method>/timeline_query_<id>`` of those scores across the segments, a column
``support_segment`` in the queries table naming the segment that carried most of the query's top
proponents' influence, and a histogram ``tda/<method>/timeline_segment_<n>`` per segment.

Works in the run of Lightning's ``WandbLogger`` when the trainer has one, or in a run of its own.
Without ``WANDB_API_KEY`` (and no explicit ``WANDB_MODE``) the run is offline: nothing needs a
network, and ``wandb sync <run dir>`` uploads it later.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lightning_tda.reporting.content import ExampleView, MethodSection, ReportContent


def default_mode() -> str:
    """``WANDB_MODE`` if set, else ``"online"`` with an API key and ``"offline"`` without one."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def use_offline_by_default() -> None:
    """Set ``WANDB_MODE=offline`` when no API key is configured, so every W&B run stays local."""
    if not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")


@dataclass
class WandbResult:
    """Where the report went: the run id, its local directory, and whether it still needs a sync."""

    run_id: str
    run_dir: Path
    offline: bool

    @property
    def sync_command(self) -> str:
        return f"wandb sync {self.run_dir}"

    def describe(self) -> str:
        if self.offline:
            return f"W&B offline run {self.run_id} in {self.run_dir}; upload it with: {self.sync_command}"
        return f"W&B run {self.run_id} (local files in {self.run_dir})"


def table_columns(k: int, timeline: bool = False) -> list[str]:
    """Column names of the per-query table (with ``support_segment`` last for a method with a timeline)."""
    columns = ["query_id", "query", "label", "prediction", "query_loss"]
    for side in ("helpful", "harmful"):
        for rank in range(1, k + 1):
            columns += [f"{side}_{rank}", f"{side}_{rank}_id", f"{side}_{rank}_score"]
    return columns + ["support_segment"] if timeline else columns


TIMELINE_COLUMNS = ["query_id", "train_id", "role", "segment", "first_step", "last_step", "score"]


def timeline_rows(section: MethodSection) -> list[list[Any]]:
    """Rows of the ``timeline`` table: every shown proponent and opponent of every query, per segment."""
    rows: list[list[Any]] = []
    if section.timeline is None:
        return rows
    timeline = section.timeline
    for view, when in zip(section.queries, timeline.queries):
        for role, ids, values in (
            ("proponent", when.helpful_ids, when.helpful),
            ("opponent", when.harmful_ids, when.harmful),
        ):
            for column, train_id in enumerate(ids):
                for position, segment in enumerate(timeline.segments):
                    first, last = timeline.steps[position]
                    rows.append(
                        [
                            view.query.id,
                            train_id,
                            role,
                            int(segment) + 1,
                            int(first),
                            int(last),
                            float(values[position, column]),
                        ]
                    )
    return rows


def support_segment(section: MethodSection, position: int) -> str:
    """The label of the segment that carried most of query ``position``'s top proponents' influence."""
    timeline = section.timeline
    return timeline.short_label(timeline.queries[position].support_segment) if timeline is not None else ""


LDS_COLUMNS = ["method", "lds", "ci_low", "ci_high", "queries_with_lds", "trusted"]
SELF_COLUMNS = ["rank", "train_id", "example", "label", "prediction", "loss", "self_influence", "noisy_label"]


class WandbReporter:
    """Log a :class:`ReportContent` to W&B.

    Args:
        project: project of a run created here (ignored when logging into an existing run).
        name: display name of a run created here.
        save_dir: directory for a run created here (default ``WANDB_DIR`` or the working directory).
        log_trace: log the trace file (with the scores in it) as an artifact.
        config: extra run config for a run created here.
    """

    def __init__(
        self,
        project: str = "lightning-tda",
        name: str | None = None,
        save_dir: str | None = None,
        log_trace: bool = True,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.project = project
        self.name = name
        self.save_dir = save_dir
        self.log_trace = log_trace
        self.config = config or {}

    def log(self, content: ReportContent, run: Any | None = None) -> WandbResult:
        """Log into ``run`` (e.g. ``WandbLogger.experiment``) or into a new run that is finished here."""
        import wandb

        own_run = run is None
        if own_run:
            if self.save_dir is not None:
                Path(self.save_dir).mkdir(parents=True, exist_ok=True)
            run = wandb.init(
                project=self.project,
                name=self.name,
                dir=self.save_dir,
                mode=default_mode(),
                job_type="attribution",
                config=self.config,
                reinit="create_new",
            )
        data: dict[str, Any] = {}
        for section in content.methods:
            table = wandb.Table(columns=table_columns(content.k, section.timeline is not None))
            for position, view in enumerate(section.queries):
                row = [
                    view.query.id,
                    _cell(view.query, wandb),
                    view.query.label,
                    view.query.prediction,
                    view.query.loss,
                ]
                for examples in (view.helpful, view.harmful):
                    for rank in range(content.k):
                        if rank < len(examples):
                            e = examples[rank]
                            row += [_cell(e, wandb), e.id, e.score]
                        else:
                            row += [None, None, None]
                if section.timeline is not None:
                    row.append(support_segment(section, position))
                table.add_data(*row)
            data[f"tda/{section.method}/queries"] = table
            data[f"tda/{section.method}/scores"] = wandb.Histogram(section.values.reshape(-1), num_bins=64)
            if section.timeline is not None:
                data.update(_timeline_data(section, wandb))
        if content.evaluation is not None:
            data.update(_evaluation_data(content, wandb))
        for section in content.self_influence:
            table = wandb.Table(columns=SELF_COLUMNS)
            for rank, e in enumerate(section.ranking, start=1):
                table.add_data(rank, e.id, _cell(e, wandb), e.label, e.prediction, e.loss, e.score, e.noisy)
            data[f"tda/{section.method}/self_influence"] = table
            data[f"tda/{section.method}/self_influence_scores"] = wandb.Histogram(section.values, num_bins=64)
        run.log(data)
        run.summary.update(content.scalars())
        run.summary.update(content.notes())  # each method's unit and warnings
        if self.log_trace and content.trace_path is not None:
            artifact = wandb.Artifact(
                name=f"tda-trace-{run.id}",
                type="tda-trace",
                description="lightning_tda trace with attribution scores under results/",
                metadata={
                    "methods": [s.method for s in content.methods],
                    "self_influence": [s.method for s in content.self_influence],
                    "shapes": {s.method: list(s.values.shape) for s in content.methods},
                },
            )
            artifact.add_file(str(content.trace_path), name=content.trace_path.name)
            run.log_artifact(artifact)
        result = WandbResult(run_id=run.id, run_dir=Path(run.dir).parent.resolve(), offline=bool(run.offline))
        if own_run:
            run.finish()
        return result


def _timeline_data(section: MethodSection, wandb: Any) -> dict[str, Any]:
    """The timeline table, one line chart per query and one histogram per segment."""
    timeline = section.timeline
    data: dict[str, Any] = {f"tda/{section.method}/timeline": wandb.Table(TIMELINE_COLUMNS, timeline_rows(section))}
    steps = [int(last) for _, last in timeline.steps]
    for view, when in zip(section.queries, timeline.queries):
        ys = [when.helpful[:, j].tolist() for j in range(len(when.helpful_ids))]
        ys += [when.harmful[:, j].tolist() for j in range(len(when.harmful_ids))]
        keys = [f"+#{i}" for i in when.helpful_ids] + [f"-#{i}" for i in when.harmful_ids]
        data[f"tda/{section.method}/timeline_query_{view.query.id}"] = wandb.plot.line_series(
            xs=steps,
            ys=ys,
            keys=keys,
            title=f"{section.method}: query #{view.query.id}, proponents (+) and opponents (−) per segment",
            xname="last step of the segment",
        )
    for position, segment in enumerate(timeline.segments):
        values = timeline.segment_values[position]
        data[f"tda/{section.method}/timeline_segment_{int(segment) + 1}"] = wandb.Histogram(values, num_bins=64)
    return data


def _evaluation_data(content: ReportContent, wandb: Any) -> dict[str, Any]:
    """``tda/evaluation/lds``: one row per evaluated method (its LDS, interval, whether to trust it), and
    ``tda/evaluation/lds_chart``, a bar chart of the LDS per method."""
    evaluation = content.evaluation
    trusted, _ = evaluation.verdict()
    table = wandb.Table(columns=LDS_COLUMNS)
    for m in evaluation.methods:
        mean, low, high = (v if m.defined else None for v in (m.mean, m.ci_low, m.ci_high))
        table.add_data(m.method, mean, low, high, int(np.isfinite(m.per_query).sum()), m.method == trusted)
    chart = wandb.plot.bar(table, "method", "lds", title="LDS per method (higher is better)")
    return {"tda/evaluation/lds": table, "tda/evaluation/lds_chart": chart}


def _cell(example: ExampleView, wandb: Any) -> Any:
    if example.rendered.image is not None:
        return wandb.Image(example.rendered.image, caption=example.caption())
    return example.rendered.text
