"""Which optimizer steps take K-FAC statistics: a fixed stride, or an overhead budget.

A statistics step costs the recorder extra time (the activations' and gradients' outer products,
and with the true Fisher one more forward and backward pass); how much, relative to a training
step, depends on the architecture far more than on any rule about segment length: on the digits
MLP it is about one step, on a ResNet's 3×3 convolutions (whose input factor is 9·C wide) several.
:class:`BudgetCadence` therefore measures it. It times plain steps and statistics steps, and every
other cost the recorder adds (checkpoints, segment writes), and spaces statistics steps so that the
extra time stays within ``budget`` × the training time, while every planned segment still gets at
least ``min_per_segment`` statistics steps, spread evenly over it. When the minimum alone costs
more than the budget, the minimum wins (the statistics are needed; the trace records which steps
took them).

Decisions are made at statistics steps only (the next optional one is planned there), so under
DDP one broadcast of rank 0's plan per statistics step keeps every rank on the same steps. Nothing
here imports Lightning; time is passed in by the caller, so the rules are testable with a fake clock.
:class:`StepTimer` measures the steps: on a GPU with CUDA events (the host's clock would measure only
kernel launches), read at statistics steps, so plain steps never wait for the device.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from typing import Any

import torch

PLAIN_WINDOW = 16  # plain-step durations kept for the median
EXTRA_WINDOW = 5  # statistics-step extra costs kept for the median


class FixedCadence:
    """Statistics on every ``every``-th optimizer step of the run (steps 0, every, 2·every, ... counted
    from the trace's first step)."""

    def __init__(self, every: int) -> None:
        self.every = every

    def open_segment(self, start_step: int, planned_steps: int | None) -> None:
        pass

    def is_statistics_step(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based: ``step`` steps done before it) takes statistics."""
        return step % self.every == 0

    def record_step(self, step: int, seconds: float, statistics_step: bool) -> None:
        pass

    def spend(self, seconds: float) -> None:
        pass

    def plan_next(self, step: int) -> int | None:
        return None

    def follow(self, next_optional: int | None) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"every_n_steps": self.every}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class BudgetCadence:
    """Statistics steps spaced by measured cost: extra time ≤ ``budget`` × training time, and at least
    ``min_per_segment`` statistics steps in each planned segment.

    The caller reports every optimizer step's duration (:meth:`record_step`; the time the step itself
    took, without the recorder's own writes) and every other cost of recording (:meth:`spend`). A
    statistics step's extra cost is its duration minus the median plain step. Each plain step earns
    ``budget`` × the median plain step of credit; costs are paid from it. At each statistics step
    :meth:`plan_next` picks the next optional one: the first step at which the credit will cover the
    median extra cost. Besides these, the ``min_per_segment`` *required* steps sit at the middles of
    equal parts of the planned segment. Before any statistics step has been timed only required
    steps are taken.

    Args:
        budget: allowed extra time as a fraction of the training time (0.05 = 5%).
        min_per_segment: statistics steps every planned segment gets regardless of cost.
    """

    def __init__(self, budget: float = 0.05, min_per_segment: int = 4) -> None:
        if not budget > 0:
            raise ValueError(f"overhead budget {budget!r}: use a positive fraction of the training time (e.g. 0.05).")
        if min_per_segment < 1:
            raise ValueError(f"min_statistics_steps={min_per_segment!r}: every segment needs at least 1.")
        self.budget = budget
        self.min_per_segment = min_per_segment
        self.plain: deque[float] = deque(maxlen=PLAIN_WINDOW)
        self.extra: deque[float] = deque(maxlen=EXTRA_WINDOW)
        self.credit = 0.0
        self.next_optional: int | None = None
        self.required: list[int] = []

    # --- segments ---------------------------------------------------------------------------------
    def open_segment(self, start_step: int, planned_steps: int | None) -> None:
        """A segment starts after ``start_step`` steps and is planned to last ``planned_steps`` (None:
        unknown; then only the budget spaces statistics, plus one required step at its start)."""
        if not planned_steps:
            self.required = [start_step]
            return
        count = min(self.min_per_segment, planned_steps)
        self.required = sorted({start_step + int((i + 0.5) * planned_steps / count) for i in range(count)})

    # --- decisions --------------------------------------------------------------------------------
    def is_statistics_step(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) takes statistics."""
        return step in self.required or step == self.next_optional

    def plan_next(self, step: int) -> int | None:
        """After statistics step ``step``: the next optional statistics step (None before costs are known)."""
        if not self.extra or not self.plain:
            self.next_optional = None
            return None
        earned_per_step = self.budget * self.plain_seconds
        wait = math.ceil(max(0.0, self.extra_seconds - self.credit) / earned_per_step) if earned_per_step > 0 else 1
        self.next_optional = step + max(1, wait)
        return self.next_optional

    def follow(self, next_optional: int | None) -> None:
        """Adopt a plan made elsewhere (rank 0's, under DDP)."""
        self.next_optional = next_optional

    # --- measurements -----------------------------------------------------------------------------
    @property
    def plain_seconds(self) -> float:
        return statistics.median(self.plain) if self.plain else 0.0

    @property
    def extra_seconds(self) -> float:
        return statistics.median(self.extra) if self.extra else 0.0

    def record_step(self, step: int, seconds: float, statistics_step: bool) -> None:
        """Optimizer step ``step`` took ``seconds`` (statistics included when ``statistics_step``)."""
        if statistics_step:
            if self.plain:
                extra = max(0.0, seconds - self.plain_seconds)
                self.extra.append(extra)
                self.credit -= extra
        else:
            self.plain.append(seconds)
        self.credit = min(self.credit + self.budget * self.plain_seconds, self.credit_cap)

    def spend(self, seconds: float) -> None:
        """Another cost of recording (a checkpoint, a segment write) is paid from the budget."""
        self.credit -= seconds

    @property
    def credit_cap(self) -> float:
        """Unused credit is kept up to one statistics step's cost (no bursts after quiet stretches)."""
        return max(self.extra_seconds, self.budget * self.plain_seconds)

    # --- records ----------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {"every_n_steps": "auto", "overhead_budget": self.budget, "min_statistics_steps": self.min_per_segment}

    def state_dict(self) -> dict[str, Any]:
        return {
            "plain": list(self.plain),
            "extra": list(self.extra),
            "credit": self.credit,
            "next_optional": self.next_optional,
            "required": list(self.required),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plain = deque(state["plain"], maxlen=PLAIN_WINDOW)
        self.extra = deque(state["extra"], maxlen=EXTRA_WINDOW)
        self.credit = float(state["credit"])
        self.next_optional = state["next_optional"]
        self.required = list(state["required"])


class StepTimer:
    """Durations of optimizer steps, measured without a host synchronisation per step.

    On a CUDA device each step is bracketed by two CUDA events recorded on the current stream: their
    interval is the device's time for the step's work, which the host's clock cannot see (kernels are
    launched asynchronously). The events are read by :meth:`take`, which waits for the last one (one
    synchronisation, done at statistics steps, where the statistics synchronise anyway). Elsewhere
    (CPU) ``time.perf_counter`` measures the step as it runs.

    Args:
        device: the model's device.
    """

    def __init__(self, device: torch.device) -> None:
        self.events = torch.device(device).type == "cuda"
        self._started: Any = None
        self._pending: list[tuple[int, Any, Any, bool]] = []

    def _now(self) -> Any:
        if not self.events:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self) -> None:
        """An optimizer step begins (its first micro-batch)."""
        self._started = self._now()

    def stop(self, step: int, statistics_step: bool) -> None:
        """Optimizer step ``step`` ended (whether it took statistics is kept with its duration)."""
        self._pending.append((step, self._started, self._now(), statistics_step))
        self._started = None

    def take(self) -> list[tuple[int, float, bool]]:
        """``(step, seconds, statistics_step)`` of every step stopped since the last call, in order."""
        pending, self._pending = self._pending, []
        if not pending:
            return []
        if self.events:
            pending[-1][2].synchronize()
            return [(step, start.elapsed_time(end) / 1000.0, stats) for step, start, end, stats in pending]
        return [(step, end - start, stats) for step, start, end, stats in pending]
