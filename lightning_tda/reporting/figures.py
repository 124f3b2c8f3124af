"""Matplotlib figures for the reports: one per query (its top proponents and opponents), a score
histogram per method, and for a method with a timeline one line chart per query (its proponents'
and opponents' scores across the segments) and the per-segment score histograms. Uses the
object-oriented API (no pyplot state, no display needed)."""

from __future__ import annotations

import io
import textwrap

import numpy as np
from matplotlib.figure import Figure

from lightning_tda.reporting.content import ExampleView, QueryTimeline, QueryView, TimelineSection

HELPFUL_COLOR = "#1a7f37"
HARMFUL_COLOR = "#cf222e"


def query_figure(view: QueryView, method: str) -> Figure:
    """Images: the query, then a row of helpful and a row of harmful training examples.
    Other data: a horizontal bar chart of the helpful and harmful scores, labelled by example."""
    if view.query.rendered.image is not None:
        return _image_grid(view, method)
    return _score_bars(view, method)


def _show(ax, example: ExampleView, title: str, color: str) -> None:
    ax.imshow(example.rendered.image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=7, color=color)
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(2 if example.noisy else 1)


def _image_grid(view: QueryView, method: str) -> Figure:
    k = max(len(view.helpful), len(view.harmful))
    fig = Figure(figsize=(1.25 * (k + 1), 3.4), dpi=90)
    axes = fig.subplots(2, k + 1, squeeze=False)
    fig.subplots_adjust(left=0.03, right=0.97, top=0.86, bottom=0.02, wspace=0.2, hspace=0.55)
    q = view.query
    _show(axes[0, 0], q, f"query #{q.id}\nlabel {q.label}\npred {q.prediction}", "black")
    axes[1, 0].axis("off")
    axes[1, 0].text(0.5, 0.5, f"{method}\nrow 1: helpful\nrow 2: harmful", ha="center", va="center", fontsize=7)
    for row, (examples, color) in enumerate(((view.helpful, HELPFUL_COLOR), (view.harmful, HARMFUL_COLOR))):
        for col in range(k):
            ax = axes[row, col + 1]
            if col >= len(examples):
                ax.axis("off")
                continue
            e = examples[col]
            noisy = " (noisy)" if e.noisy else ""
            _show(ax, e, f"#{e.id} y={e.label}{noisy}\n{e.score:+.3g}", color)
    return fig


def _score_bars(view: QueryView, method: str) -> Figure:
    examples = view.helpful + view.harmful[::-1]
    height = 0.32 * len(examples) + 1.2
    fig = Figure(figsize=(7.5, height), dpi=90)
    ax = fig.subplots()
    fig.subplots_adjust(left=0.5, right=0.97, top=1 - 0.45 / height, bottom=0.6 / height)
    labels = [textwrap.shorten(f"#{e.id} y={e.label}: {e.rendered.text}", 60) for e in examples]
    values = [e.score for e in examples]
    colors = [HELPFUL_COLOR if v >= 0 else HARMFUL_COLOR for v in values]
    positions = np.arange(len(examples))[::-1]
    ax.barh(positions, values, color=colors)
    ax.set_yticks(positions, labels, fontsize=7)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("score (positive = helped the query)", fontsize=8)
    q = view.query
    ax.set_title(textwrap.shorten(f"{method}: query #{q.id} (label {q.label}, pred {q.prediction})", 80), fontsize=8)
    return fig


def histogram_figure(values: np.ndarray, method: str, title: str = "pairwise scores") -> Figure:
    fig = Figure(figsize=(5, 2.6), dpi=90)
    ax = fig.subplots()
    fig.subplots_adjust(left=0.13, right=0.97, top=0.88, bottom=0.2)
    ax.hist(np.asarray(values, dtype=np.float64).reshape(-1), bins=60, color="#0969da")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_title(f"{method}: {title}", fontsize=9)
    ax.set_xlabel("score", fontsize=8)
    ax.set_ylabel("count", fontsize=8)
    ax.set_yscale("log")
    return fig


def timeline_figure(section: TimelineSection, query: QueryTimeline, query_id: int, method: str) -> Figure:
    """Lines across the segments (x: each segment's last step): the per-segment scores of the query's
    proponents (green) and opponents (red), each labelled by training id."""
    fig = Figure(figsize=(6.4, 3.0), dpi=90)
    ax = fig.subplots()
    fig.subplots_adjust(left=0.12, right=0.78, top=0.88, bottom=0.17)
    x = section.steps[:, 1]
    for ids, values, color in (
        (query.helpful_ids, query.helpful, HELPFUL_COLOR),
        (query.harmful_ids, query.harmful, HARMFUL_COLOR),
    ):
        for column, train_id in enumerate(ids):
            ax.plot(x, values[:, column], marker="o", markersize=3, linewidth=1, color=color, label=f"#{train_id}")
    ax.axhline(0, color="black", linewidth=0.8)
    every = -(-len(x) // 6)  # at most 6 tick labels
    ticks = list(range(0, len(x), every))
    ax.set_xticks(x[ticks], [f"{section.steps[i][0]}–{section.steps[i][1]}" for i in ticks], fontsize=7)
    ax.set_xlabel("segment (optimizer steps)", fontsize=8)
    ax.set_ylabel("score in the segment", fontsize=8)
    ax.set_title(f"{method}: query #{query_id} over training", fontsize=9)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return fig


def timeline_histogram_figure(section: TimelineSection, method: str) -> Figure:
    """The score distribution of each segment (every query, the kept examples), overlaid."""
    fig = Figure(figsize=(5, 2.6), dpi=90)
    ax = fig.subplots()
    fig.subplots_adjust(left=0.13, right=0.97, top=0.88, bottom=0.2)
    values = [np.asarray(v, dtype=np.float64) for v in section.segment_values]
    bins = np.histogram_bin_edges(np.concatenate(values), bins=60)
    for position, segment_values in enumerate(values):
        ax.hist(segment_values, bins=bins, histtype="step", label=section.short_label(position))
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_title(f"{method}: scores per segment", fontsize=9)
    ax.set_xlabel("score in the segment", fontsize=8)
    ax.set_ylabel("count", fontsize=8)
    ax.set_yscale("log")
    ax.legend(fontsize=6)
    return fig


def png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
