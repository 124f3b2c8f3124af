"""A local, self-contained HTML report: readable without any account or network.

One file, no scripts, no external resources: images (example thumbnails, one figure per query,
one histogram per method) are inline base64 PNGs. Every query names its id and lists its ``k``
proponents (most helpful) and opponents (most harmful) with ids, labels, predictions and scores.
For a method with a timeline, each query also gets a line chart of its proponents' and opponents'
scores across the training segments and a sentence saying when its support came.
"""

from __future__ import annotations

import base64
import io
import json
import os
from datetime import datetime, timezone
from html import escape
from pathlib import Path

import numpy as np
from matplotlib.image import imsave

from lightning_tda.evaluation.record import Evaluation, MethodLDS
from lightning_tda.reporting.content import ExampleView, MethodSection, ReportContent, SelfInfluenceSection
from lightning_tda.reporting.figures import (
    histogram_figure,
    png_bytes,
    query_figure,
    timeline_figure,
    timeline_histogram_figure,
)

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1100px;
       color: #1f2328; padding: 0 1rem; }
h1 { margin-bottom: 0.2rem; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: 0.3rem; margin-top: 2.5rem; }
.meta { color: #59636e; font-size: 0.9rem; }
.query { border: 1px solid #d0d7de; border-radius: 6px; padding: 0.8rem 1rem; margin: 1rem 0; }
.query h3 { margin: 0 0 0.5rem 0; font-size: 1.05rem; }
.columns { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; }
ol { padding-left: 1.5rem; margin: 0.3rem 0; } li { margin: 0.25rem 0; font-size: 0.88rem; }
li img, td img, h3 img { vertical-align: middle; margin-right: 0.4rem; border: 1px solid #d0d7de; }
.helpful h4 { color: #1a7f37; } .harmful h4 { color: #cf222e; } h4 { margin: 0.3rem 0; font-size: 0.95rem; }
.score { font-family: ui-monospace, monospace; }
.noisy { background: #fff8c5; padding: 0 0.25rem; border-radius: 3px; }
.warning { background: #fff8c5; border: 1px solid #d4a72c; border-radius: 6px; padding: 0.5rem 0.8rem; }
table { border-collapse: collapse; font-size: 0.88rem; }
th, td { border: 1px solid #d0d7de; padding: 0.25rem 0.5rem; text-align: left; }
img.figure { max-width: 100%; height: auto; }
.timeline { margin: 0.3rem 0; font-size: 0.92rem; }
pre { background: #f6f8fa; padding: 0.5rem; overflow-x: auto; font-size: 0.8rem; }
"""


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _thumbnail(pixels: np.ndarray, size: int = 40) -> str:
    buffer = io.BytesIO()
    kwargs = {"cmap": "gray", "vmin": 0, "vmax": 255} if pixels.ndim == 2 else {}
    imsave(buffer, pixels, format="png", **kwargs)
    return f'<img src="{_data_uri(buffer.getvalue())}" width="{size}" height="{size}" alt="example">'


def _example_html(example: ExampleView, css_class: str) -> str:
    thumb = _thumbnail(example.rendered.image) if example.rendered.image is not None else ""
    text = "" if example.rendered.image is not None else f" — {escape(example.rendered.text)}"
    noisy = ' <span class="noisy">noisy label</span>' if example.noisy else ""
    prediction = f", pred {escape(example.prediction)}" if example.prediction else ""
    return (
        f'<li class="{css_class}" data-train-id="{example.id}">{thumb}'
        f'<span class="score">{example.score:+.4g}</span> train #{example.id} '
        f"(label {escape(example.label)}{prediction}){noisy}{text}</li>"
    )


def _notes_html(section: MethodSection | SelfInfluenceSection) -> str:
    """The unit of the scores and any warning the method raised about its own assumptions."""
    unit = f'<p class="meta unit">Unit: {escape(section.unit)}.</p>' if section.unit else ""
    return unit + "".join(f'<p class="warning">⚠ {escape(w)}</p>' for w in section.warnings)


def _lds_html(section: MethodSection) -> str:
    """The method's LDS measured on this model, beside its scores."""
    if section.lds is not None:
        text = escape(_lds_text(section.lds))
        return f'<p class="lds" data-method="{escape(section.method)}">Measured LDS on this model: {text}.</p>'
    return f'<p class="warning">{escape(section.lds_note)}</p>' if section.lds_note else ""


def _lds_text(measured: MethodLDS) -> str:
    if not measured.defined:
        return "undefined (no query's re-trained loss varied)"
    return f"{measured.mean:.3f} [{measured.ci_low:.3f}, {measured.ci_high:.3f}]"


def _evaluation_html(evaluation: Evaluation) -> str:
    """Which method to trust: each method's LDS with its interval, and the verdict."""
    trusted, sentence = evaluation.verdict()
    rows = "".join(
        f'<tr class="lds-row" data-method="{escape(m.method)}"><td>{escape(m.method)}'
        f'{" (trust)" if m.method == trusted else ""}</td><td class="score">{escape(_lds_text(m))}</td>'
        f"<td>{int(np.isfinite(m.per_query).sum())} of {len(m.per_query)}</td></tr>"
        for m in sorted(evaluation.methods, key=lambda m: -m.mean if m.defined else np.inf)
    )
    return (
        '<h2 id="evaluation">Which method to trust on this model</h2>'
        f'<p class="verdict">{escape(sentence)}</p>'
        f'<p class="meta">Linear datamodeling score (LDS): Spearman correlation between the scores\' predicted and '
        f"the measured effect of training on {evaluation.num_subsets} random subsets of "
        f"{evaluation.fraction:.0%} of the training set ({evaluation.num_seeds} seed(s) each), averaged over "
        f"{len(evaluation.query_ids)} {escape(evaluation.query_split)} queries, with a {evaluation.confidence:.0%} "
        f"bootstrap interval. Higher is better; 0 predicts nothing.</p>"
        "<table><thead><tr><th>method</th><th>LDS [interval]</th><th>queries with an LDS</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )


def _method_html(section: MethodSection) -> str:
    parts = [
        f'<h2 id="method-{escape(section.method)}">{escape(section.method)}: {len(section.queries)} queries</h2>',
        f'<p class="meta">Scores matrix {section.values.shape[0]} queries × {section.values.shape[1]} training '
        f"examples; {np.mean(section.values > 0):.1%} positive.</p>",
        _lds_html(section),
        _notes_html(section),
        f'<img class="figure" alt="{escape(section.method)} score histogram" '
        f'src="{_data_uri(png_bytes(histogram_figure(section.values, section.method)))}">',
        f"<details><summary>hyper-parameters</summary><pre>{escape(json.dumps(section.config, indent=1))}</pre>"
        f"</details>",
    ]
    if section.timeline is not None:
        figure = _data_uri(png_bytes(timeline_histogram_figure(section.timeline, section.method)))
        parts.append(
            f'<p class="meta">Over training: {len(section.timeline.labels)} segments, '
            f"{escape('; '.join(section.timeline.labels))}.</p>"
            f'<img class="figure timeline" alt="{escape(section.method)} scores per segment" src="{figure}">'
        )
    for position, view in enumerate(section.queries):
        q = view.query
        thumb = _thumbnail(q.rendered.image, 56) if q.rendered.image is not None else ""
        text = "" if q.rendered.image is not None else f"<p>{escape(q.rendered.text)}</p>"
        prediction = f", predicted {escape(q.prediction)}" if q.prediction else ""
        loss = f", loss {q.loss:.3g}" if np.isfinite(q.loss) else ""
        figure = _data_uri(png_bytes(query_figure(view, section.method)))
        over_time = ""
        if section.timeline is not None:
            when = section.timeline.queries[position]
            chart = _data_uri(png_bytes(timeline_figure(section.timeline, when, q.id, section.method)))
            over_time = (
                f'<p class="timeline" data-support-segment="{int(section.timeline.segments[when.support_segment])}">'
                f"{escape(when.sentence)}</p>"
                f'<img class="figure timeline" alt="query {q.id} influence over training" src="{chart}">'
            )
        parts.append(
            f'<section class="query" data-method="{escape(section.method)}" data-query-id="{q.id}">'
            f"<h3>{thumb}Query #{q.id}: label {escape(q.label)}{prediction}{loss}</h3>{text}"
            f'<img class="figure" alt="query {q.id} proponents and opponents" src="{figure}">{over_time}'
            '<div class="columns"><div class="helpful">'
            f"<h4>{len(view.helpful)} most helpful (proponents)</h4><ol>"
            + "".join(_example_html(e, "proponent") for e in view.helpful)
            + f'</ol></div><div class="harmful"><h4>{len(view.harmful)} most harmful (opponents)</h4><ol>'
            + "".join(_example_html(e, "opponent") for e in view.harmful)
            + "</ol></div></div></section>"
        )
    return "\n".join(parts)


def _self_html(section: SelfInfluenceSection) -> str:
    found = ""
    if section.noisy_in_top is not None:
        found = (
            f" {section.noisy_in_top} of the top {len(section.ranking)} have a known noisy label "
            f"({section.noisy_total} noisy labels in the training set)."
        )
    rows = []
    for rank, e in enumerate(section.ranking, start=1):
        shown = _thumbnail(e.rendered.image, 32) if e.rendered.image is not None else escape(e.rendered.text)
        noisy = '<span class="noisy">yes</span>' if e.noisy else ("no" if e.noisy is not None else "")
        rows.append(
            f'<tr class="self-row" data-train-id="{e.id}"><td>{rank}</td><td>#{e.id}</td><td>{shown}</td>'
            f"<td>{escape(e.label)}</td><td>{escape(e.prediction)}</td>"
            f'<td class="score">{e.score:.4g}</td><td>{noisy}</td></tr>'
        )
    return (
        f'<h2 id="self-{escape(section.method)}">{escape(section.method)}: self-influence ranking</h2>'
        f'<p class="meta">Training examples with the highest self-influence first: those the model could '
        f"least explain from the rest of the data (mislabeled or atypical).{found}</p>"
        + _notes_html(section)
        + f'<img class="figure" alt="{escape(section.method)} self-influence histogram" '
        f'src="{_data_uri(png_bytes(histogram_figure(section.values, section.method, "self-influence")))}">'
        "<table><thead><tr><th>rank</th><th>id</th><th>example</th><th>label</th><th>prediction</th>"
        "<th>self-influence</th><th>noisy label</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )


def render_html(content: ReportContent) -> str:
    """The report as one HTML string."""
    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    trace = f" from trace <code>{escape(str(content.trace_path))}</code>" if content.trace_path else ""
    links = ['<a href="#evaluation">which method to trust</a>'] if content.evaluation is not None else []
    links += [f'<a href="#method-{escape(s.method)}">{escape(s.method)}</a>' for s in content.methods]
    links += [
        f'<a href="#self-{escape(s.method)}">{escape(s.method)} self-influence</a>' for s in content.self_influence
    ]
    body = [
        f"<h1>{escape(content.title)}</h1>",
        f'<p class="meta">Written {created}{trace}. Positive score = the training example helped the query '
        f"(removing it would raise the query's loss); negative = it hurt. Top {content.k} each way.</p>",
        f"<p>{' · '.join(links)}</p>",
    ]
    if content.evaluation is not None:
        body.append(_evaluation_html(content.evaluation))
    body += [_method_html(s) for s in content.methods]
    body += [_self_html(s) for s in content.self_influence]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<link rel="icon" href="data:,"><title>{escape(content.title)}</title><style>{STYLE}</style></head>'
        "<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_html_report(content: ReportContent, path: str | os.PathLike) -> Path:
    """Write the self-contained HTML report to ``path`` (directories are created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(content), encoding="utf-8")
    return path
