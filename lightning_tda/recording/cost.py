"""What recording costs: the callback's own wall time during a fit, by kind, for the user and the trace.

:class:`RecordingCost` adds up the seconds the callback spends in its own code, split into the kinds of
:data:`~lightning_tda.trace.schema.COST_KINDS`: the fixed costs of a fit (creating the trace, writing the
initial checkpoint, the loss check's replayed forwards) and the per-step ones (statistics: the factor
products, the true Fisher's extra backward or forward and the NaN check; checkpoints; I/O: segment and
step-log writes; bookkeeping: the per-step hooks otherwise). Timed sections may nest: a section's time
excludes the sections inside it, so the kinds add up to the callback's total. At the end of the fit
:meth:`record` gives the trace's ``meta/recording_cost`` record.

Times are the host's wall clock (``time.perf_counter``). On a CUDA device the work the callback queues
runs asynchronously, so its time is counted where the host waits for it (the next synchronisation), not
necessarily in the section that queued it. Nothing here imports Lightning.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from lightning_tda.trace.records import cost_percent, describe_cost
from lightning_tda.trace.schema import COST_KINDS


class RecordingCost:
    """Seconds the callback spent in its own code during one fit, per kind (:data:`COST_KINDS`)."""

    def __init__(self, first_step: int = 0) -> None:
        self.first_step = first_step
        self.started = time.perf_counter()
        self.seconds = dict.fromkeys(COST_KINDS, 0.0)
        self._nested = 0.0  # time of the sections inside the one being timed

    def timed(self, kind: str) -> TimedSection:
        """Count the time of the enclosed code (``with cost.timed(kind):``) as ``kind``, minus the timed sections
        nested in it."""
        return TimedSection(self, kind)

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def record(self, last_step: int) -> dict[str, Any]:
        """The trace's record of this fit: steps covered, the fit's wall time so far, seconds per kind."""
        return {
            "first_step": self.first_step,
            "last_step": last_step,
            "training_seconds": time.perf_counter() - self.started,
            "seconds": dict(self.seconds),
        }


class TimedSection:
    """One timed section of :meth:`RecordingCost.timed` (a plain class: entered several times per step, where a
    generator-based context manager would cost several times as much)."""

    __slots__ = ("cost", "kind", "start", "outer")

    def __init__(self, cost: RecordingCost, kind: str) -> None:
        self.cost, self.kind = cost, kind

    def __enter__(self) -> None:
        self.start = time.perf_counter()
        self.outer, self.cost._nested = self.cost._nested, 0.0

    def __exit__(self, *exc: object) -> None:
        elapsed = time.perf_counter() - self.start
        self.cost.seconds[self.kind] += elapsed - self.cost._nested
        self.cost._nested = self.outer + elapsed


def combined_cost(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One record for several fits' (``Trace.recording_costs()``): seconds summed, steps from first to last."""
    return {
        "first_step": min(r["first_step"] for r in records),
        "last_step": max(r["last_step"] for r in records),
        "training_seconds": sum(r["training_seconds"] for r in records),
        "seconds": {kind: sum(r["seconds"].get(kind, 0.0) for r in records) for kind in COST_KINDS},
    }


def cost_scalars(record: dict[str, Any]) -> dict[str, float]:
    """Summary numbers of one fit's cost record for an experiment tracker (keys ``tda/recording/...``)."""
    out = {f"tda/recording/{kind}_seconds": value for kind, value in record["seconds"].items()}
    out["tda/recording/seconds"] = sum(record["seconds"].values())
    out["tda/recording/percent_of_training"] = cost_percent(record)
    return out


def report_cost(record: dict[str, Any], trainer: Any) -> None:
    """Tell the user what recording cost (one info line) and put the numbers into the summary of the trainer's
    W&B run, if it logs to one (global rank 0 only)."""
    rank_zero_info(f"TDACallback: recording cost {describe_cost(record)}.")
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.summary.update(cost_scalars(record))
