"""Reports for the Lightning loggers other than W&B: each gets what it can hold.

* TensorBoard: tables as Markdown text, per-query figures and histograms as images, scalars; each
  method's unit and warnings (:meth:`ReportContent.notes`) as text; for a method with a timeline its
  table, per-query timeline charts and per-segment histograms.
* CSV: scalars through ``log_metrics``; tables as CSV files, figures as PNG files and the notes as
  ``notes.txt`` in ``<log_dir>/tda/``.
* MLflow: tables as CSV artifacts, figures as PNG artifacts, notes as text, scalars as metrics.
* Any other logger: the scalars through ``log_metrics``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lightning_tda.reporting.content import ExampleView, ReportContent
from lightning_tda.reporting.figures import histogram_figure, query_figure, timeline_figure, timeline_histogram_figure
from lightning_tda.reporting.wandb_report import (
    SELF_COLUMNS,
    TIMELINE_COLUMNS,
    support_segment,
    table_columns,
    timeline_rows,
)


def _text_cell(example: ExampleView) -> str:
    return example.caption() if example.rendered.image is not None else example.rendered.text


def tables(content: ReportContent) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """The report's tables with text cells: ``{name: (columns, rows)}``, names like W&B's keys."""
    out: dict[str, tuple[list[str], list[list[Any]]]] = {}
    for section in content.methods:
        rows = []
        for position, view in enumerate(section.queries):
            q = view.query
            row: list[Any] = [q.id, _text_cell(q), q.label, q.prediction, q.loss]
            for examples in (view.helpful, view.harmful):
                for rank in range(content.k):
                    e = examples[rank] if rank < len(examples) else None
                    row += [_text_cell(e), e.id, e.score] if e is not None else ["", "", ""]
            if section.timeline is not None:
                row.append(support_segment(section, position))
            rows.append(row)
        out[f"{section.method}_queries"] = (table_columns(content.k, section.timeline is not None), rows)
        if section.timeline is not None:
            out[f"{section.method}_timeline"] = (TIMELINE_COLUMNS, timeline_rows(section))
    for section in content.self_influence:
        rows = [
            [rank, e.id, _text_cell(e), e.label, e.prediction, e.loss, e.score, "" if e.noisy is None else e.noisy]
            for rank, e in enumerate(section.ranking, start=1)
        ]
        out[f"{section.method}_self_influence"] = (SELF_COLUMNS, rows)
    return out


def csv_text(columns: list[str], rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    writer.writerows(rows)
    return buffer.getvalue()


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def figures(content: ReportContent, max_queries: int | None = None) -> Iterator[tuple[str, Figure]]:
    """``(name, figure)``: a score histogram per method and one figure per query; for a method with a
    timeline also the per-segment histograms and one timeline chart per query."""
    for section in content.methods:
        yield f"{section.method}/scores_histogram", histogram_figure(section.values, section.method)
        for view in section.queries[:max_queries]:
            yield f"{section.method}/query_{view.query.id}", query_figure(view, section.method)
        timeline = section.timeline
        if timeline is not None:
            yield f"{section.method}/timeline_histogram", timeline_histogram_figure(timeline, section.method)
            for view, when in list(zip(section.queries, timeline.queries))[:max_queries]:
                chart = timeline_figure(timeline, when, view.query.id, section.method)
                yield f"{section.method}/timeline_query_{view.query.id}", chart
    for section in content.self_influence:
        yield (
            f"{section.method}/self_influence_histogram",
            histogram_figure(section.values, section.method, "self-influence"),
        )


def figure_pixels(fig: Figure) -> np.ndarray:
    """``(H, W, 3)`` uint8 pixels of a figure."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def log_to_logger(content: ReportContent, logger: Any, max_figures: int | None = 16) -> str:
    """Log the report into a non-W&B Lightning logger; returns a one-line description of where."""
    from lightning.fabric.loggers import CSVLogger, TensorBoardLogger

    scalars, notes = content.scalars(), content.notes()
    if isinstance(logger, TensorBoardLogger):
        writer = logger.experiment
        for name, (columns, rows) in tables(content).items():
            writer.add_text(f"tda/{name}", markdown_table(columns, rows))
        for key, text in notes.items():
            writer.add_text(key, text)
        for section in content.methods:
            writer.add_histogram(f"tda/{section.method}/scores", section.values.reshape(-1))
            if section.timeline is not None:
                for segment, values in zip(section.timeline.segments, section.timeline.segment_values):
                    writer.add_histogram(f"tda/{section.method}/timeline_segment_{int(segment) + 1}", values)
        for section in content.self_influence:
            writer.add_histogram(f"tda/{section.method}/self_influence", section.values)
        for name, fig in figures(content, max_figures):
            writer.add_image(f"tda/{name}", figure_pixels(fig), dataformats="HWC")
        for key, value in scalars.items():
            writer.add_scalar(key, value)
        writer.flush()
        return f"TensorBoard: {logger.log_dir}"
    if isinstance(logger, CSVLogger):
        logger.log_metrics(scalars)
        logger.save()
        directory = Path(logger.log_dir) / "tda"
        directory.mkdir(parents=True, exist_ok=True)
        for name, (columns, rows) in tables(content).items():
            (directory / f"{name}.csv").write_text(csv_text(columns, rows), encoding="utf-8")
        if notes:
            (directory / "notes.txt").write_text("".join(f"{k}: {v}\n" for k, v in notes.items()), encoding="utf-8")
        for name, fig in figures(content, max_figures):
            fig.savefig(directory / f"{name.replace('/', '_')}.png")
        return f"CSV: {directory}"
    if _is_mlflow(logger):
        client, run_id = logger.experiment, logger.run_id
        for name, (columns, rows) in tables(content).items():
            client.log_text(run_id, csv_text(columns, rows), f"tda/{name}.csv")
        for name, fig in figures(content, max_figures):
            client.log_figure(run_id, fig, f"tda/{name}.png")
        for key, text in notes.items():
            client.log_text(run_id, text, f"{key}.txt")
        for key, value in scalars.items():
            client.log_metric(run_id, key, value)
        return f"MLflow run {run_id}"
    logger.log_metrics(scalars)
    return f"{type(logger).__name__}: summary scalars only"


def _is_mlflow(logger: Any) -> bool:
    try:
        from lightning.pytorch.loggers import MLFlowLogger
    except ImportError:  # pragma: no cover - part of lightning, kept for older versions
        return False
    return isinstance(logger, MLFlowLogger)
