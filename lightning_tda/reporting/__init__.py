"""Influence reports: W&B tables and artifacts, other Lightning loggers, a local HTML page.

Typical use after attribution::

    from lightning_tda.reporting import ImageRenderer, build_report, write_reports

    content = build_report([scores, self_scores], queries=test_set, train=train_set, model=model,
                           task=task, k=5, renderer=ImageRenderer(shape=[8, 8]), trace_path=trace_path)
    written = write_reports(content, loggers=trainer.loggers, html="runs/report.html")
    print(written.describe())

Only global rank 0 writes (under DDP/Fabric every other rank returns ``None``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_tda.reporting.content import (
    ExampleView,
    MethodSection,
    QueryTimeline,
    QueryView,
    ReportContent,
    SelfInfluenceSection,
    TimelineSection,
    build_report,
)
from lightning_tda.reporting.html import render_html, write_html_report
from lightning_tda.reporting.loggers import log_to_logger
from lightning_tda.reporting.render import (
    AutoRenderer,
    ImageRenderer,
    Rendered,
    Renderer,
    TabularRenderer,
    TextRenderer,
)
from lightning_tda.reporting.wandb_report import WandbReporter, WandbResult, use_offline_by_default

__all__ = [
    "AutoRenderer",
    "ExampleView",
    "ImageRenderer",
    "MethodSection",
    "QueryTimeline",
    "QueryView",
    "Rendered",
    "Renderer",
    "ReportContent",
    "ReportPaths",
    "SelfInfluenceSection",
    "TabularRenderer",
    "TextRenderer",
    "TimelineSection",
    "WandbReporter",
    "WandbResult",
    "build_report",
    "global_rank",
    "log_to_logger",
    "render_html",
    "use_offline_by_default",
    "write_html_report",
    "write_reports",
]


@dataclass
class ReportPaths:
    """Where :func:`write_reports` put the report."""

    html: Path | None = None
    wandb: WandbResult | None = None
    loggers: list[str] = field(default_factory=list)

    def describe(self) -> str:
        lines = []
        if self.html is not None:
            lines.append(f"HTML report: {self.html}")
        if self.wandb is not None:
            lines.append(self.wandb.describe())
        lines += [f"logger {entry}" for entry in self.loggers]
        return "\n".join(lines)


def global_rank() -> int:
    """This process's global rank (0 without distributed training)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def write_reports(
    content: ReportContent,
    *,
    loggers: Any | Sequence[Any] | None = None,
    html: str | os.PathLike | None = None,
    wandb: bool | WandbReporter | None = None,
) -> ReportPaths | None:
    """Send a report everywhere it should go; on ranks other than 0 do nothing and return ``None``.

    Args:
        content: from :func:`build_report`.
        loggers: the trainer's logger(s) (``trainer.loggers``). A ``WandbLogger`` among them receives
            the W&B report in its own run; TensorBoard, CSV and MLflow loggers get their share.
        html: path of the local HTML report (``None``: no HTML).
        wandb: ``None`` logs to W&B through a ``WandbLogger`` if there is one, else to a new run;
            ``True`` likewise; ``False`` skips W&B; a :class:`WandbReporter` sets the new run's options.
    """
    if global_rank() != 0:
        return None
    from lightning.pytorch.loggers import WandbLogger

    if loggers is None:
        loggers = []
    elif not isinstance(loggers, (list, tuple)):
        loggers = [loggers]
    paths = ReportPaths()
    wandb_loggers = [lg for lg in loggers if isinstance(lg, WandbLogger)]
    if wandb is not False:
        use_offline_by_default()
        reporter = wandb if isinstance(wandb, WandbReporter) else WandbReporter()
        run = wandb_loggers[0].experiment if wandb_loggers else None
        paths.wandb = reporter.log(content, run=run)
    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            paths.loggers.append(log_to_logger(content, logger))
    if html is not None:
        paths.html = write_html_report(content, html)
    return paths
