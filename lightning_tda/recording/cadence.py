"""Which optimizer steps take K-FAC statistics: a fixed stride, or an overhead budget.

A statistics step costs the recorder extra time (the activations' and gradients' outer products,
and with the true Fisher one more forward and backward pass); how much, relative to a training
step, depends on the architecture far more than on any rule about segment length: on the digits
MLP it is about one step, on a ResNet's 3×3 convolutions (whose input factor is 9·C wide) several.
:class:`BudgetCadence` therefore measures it. It times plain steps and statistics steps, and every
other cost the recorder adds (checkpoints, segment writes, the loss check), and spaces statistics steps
so that the extra time stays within ``budget`` × the training time. Every planned segment gets
``min_per_segment`` statistics steps spread evenly over it even when they cost more than the budget (with
``strict=False``, for SOURCE's streamed covariances), or, with ``strict=True`` (the callback's default), as
many of them as the budget can pay for, none in a segment whose budget affords none (on very short runs, or
where one statistics step costs more than the budget of a whole segment; SOURCE then recomputes that
segment's covariances at its checkpoints). The first statistics step of the run is the one cost allowed past
the budget: it measures what a statistics step costs. It takes its products from a quarter of each
batch (:meth:`BudgetCadence.statistics_share`); its extra time times ``MEASURING_SCALE`` stands for a whole-batch
statistics step's until one has been measured. A whole batch costs more than a quarter by 1.0x (digits MLP),
1.3x (a small CNN), 1.4x (a Llama-style LM) and 2.3x (a width-16 ResNet-18; measured with
``statistics_examples``): the true Fisher's backward and per-layer overheads do not shrink with the batch. On a
run too short for a second statistics step this halves what statistics cost (0.45 → 0.22 s on a 32-step width-16
ResNet). The trace records which steps took statistics.

Decisions are made at statistics steps only (the next optional step, how many statistics steps the
budget affords per step, the rest of the segment's required steps), and at an optional step before it is
taken (costs paid since its plan may move it), so under DDP one broadcast of rank 0's :class:`Plan` per
statistics step, and one per optional step, keeps every rank on the same steps. Nothing here imports
Lightning; time is passed in by the caller, so the rules are testable with a fake clock.
:class:`StepTimer` measures the steps: on a GPU with CUDA events (the host's clock would measure only
kernel launches), read at statistics steps, so plain steps never wait for the device.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from typing import Any, NamedTuple

import torch

PLAIN_WINDOW = 16  # plain-step durations kept for the median
EXTRA_WINDOW = 5  # statistics-step extra costs kept for the median
MEASURING_SHARE = 0.25  # of each batch, the run's first (cost-measuring) statistics step takes its products from
MEASURING_SCALE = 2.0  # its extra time times this estimates a whole-batch statistics step's


class Plan(NamedTuple):
    """What rank 0 decided at a statistics step (broadcast under DDP): the next optional statistics step,
    the statistics steps the budget affords per training step (None before costs are measured), and the
    required statistics steps of the open segment."""

    next_optional: int | None
    affordable_rate: float | None
    required: list[int]


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

    def statistics_share(self, step: int) -> float:
        return 1.0

    def is_optional(self, step: int) -> bool:
        return False

    def record_step(self, step: int, seconds: float, statistics_step: bool) -> None:
        pass

    def spend(self, seconds: float) -> None:
        pass

    def plan_next(self, step: int) -> Plan | None:
        return None

    def follow(self, plan: Plan | None) -> None:
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
    median extra cost; when it comes, :meth:`confirm` moves it if costs paid since the plan took that credit.
    Besides these, each planned segment has *required* steps at the middles of equal parts of it:
    ``min_per_segment`` of them, or with ``strict`` as many as the budget affords over the segment (the
    budget per step less the other costs so far, over the median extra cost, less what was spent past the
    budget), possibly none. Before any statistics step has been timed the first segment plans
    ``min_per_segment``; with ``strict``, after its first statistics step (on a share of each batch, see
    :meth:`statistics_share`) the rest of it is re-planned with the estimated cost.

    Args:
        budget: allowed extra time as a fraction of the training time (0.05 = 5%).
        min_per_segment: statistics steps every planned segment gets (with ``strict``: as many of them as
            the budget affords).
        strict: honour the budget also when the minimum costs more.
    """

    def __init__(self, budget: float = 0.05, min_per_segment: int = 4, strict: bool = False) -> None:
        if not budget > 0:
            raise ValueError(f"overhead budget {budget!r}: use a positive fraction of the training time (e.g. 0.05).")
        if min_per_segment < 1:
            raise ValueError(f"min_statistics_steps={min_per_segment!r}: every segment needs at least 1.")
        self.budget = budget
        self.min_per_segment = min_per_segment
        self.strict = strict
        self.plain: deque[float] = deque(maxlen=PLAIN_WINDOW)
        self.extra: deque[float] = deque(maxlen=EXTRA_WINDOW)
        self.credit = 0.0
        self.next_optional: int | None = None
        self.required: list[int] = []
        self.affordable_rate: float | None = None  # statistics steps the budget pays for per training step
        self.other_seconds = 0.0  # costs of recording besides statistics steps, so far
        self.steps_seen = 0
        self.segment_end: int | None = None
        self.measuring_step: int | None = None  # the statistics step taken on a share of its batch
        self.estimated = False  # ``extra`` holds the measuring step's scaled cost, not a whole-batch one

    # --- segments ---------------------------------------------------------------------------------
    def open_segment(self, start_step: int, planned_steps: int | None) -> None:
        """A segment starts after ``start_step`` steps and is planned to last ``planned_steps`` (None:
        unknown; then only the budget spaces statistics, plus one required step at its start)."""
        if not planned_steps:
            self.required, self.segment_end = [start_step], None
            return
        self.segment_end = start_step + planned_steps
        self.required = spread(start_step, planned_steps, self._required_count(planned_steps, 0))

    def _required_count(self, steps: int, taken: int, debt: float = 0.0) -> int:
        """Required statistics steps among the next ``steps`` of a segment that has ``taken`` already:
        up to ``min_per_segment`` in all, at least one per segment; with ``strict``, once a statistics step has
        been timed, as many as the budget affords after paying the ``debt`` (seconds spent past it), none if it
        affords none."""
        count = min(self.min_per_segment - taken, steps)
        if self.strict and self.affordable_rate is not None:  # measured: no floor, the budget decides
            affordable = self.affordable_rate * steps
            if debt > 0:  # rank 0's plan (plan_next), made right after it set the rate from its own extra cost
                affordable -= debt / self.extra_seconds
            return max(0, min(count, math.floor(affordable)))
        return max(count, 1 if taken == 0 else 0)

    # --- decisions --------------------------------------------------------------------------------
    def is_statistics_step(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) takes statistics."""
        return step in self.required or step == self.next_optional

    def statistics_share(self, step: int) -> float:
        """The share of each batch statistics step ``step`` takes its products from: ``MEASURING_SHARE`` while no
        statistics step has been timed (the run's first, which measures their cost; the step is remembered so
        that :meth:`record_step` scales its cost), else the whole batch."""
        if self.extra:
            return 1.0
        self.measuring_step = step
        return MEASURING_SHARE

    def is_optional(self, step: int) -> bool:
        """Whether ``step`` is the planned optional statistics step and not a required one (:meth:`confirm`)."""
        return step == self.next_optional and step not in self.required

    def confirm(self, step: int) -> Plan:
        """At the optional statistics step ``step``, once the costs and steps since the plan are in: it stays if the
        credit covers a statistics step, else it moves to where the credit will (the costs paid since the plan,
        checkpoints and writes, were not foreseen by it)."""
        earned_per_step = self.budget * self.plain_seconds
        short = self.extra_seconds - self.credit - earned_per_step  # unpaid with this step's own credit, as planned
        if short > 1e-9 * self.extra_seconds and earned_per_step > 0:
            self.next_optional = step + math.ceil(short / earned_per_step)
        return self.plan

    def plan_next(self, step: int) -> Plan:
        """After statistics step ``step``: the next optional statistics step (None before costs are known),
        what the budget affords per step, and the rest of the open segment's required steps re-planned
        with them."""
        if not self.extra or not self.plain:
            self.next_optional = None
            return self.plan
        earned_per_step = self.budget * self.plain_seconds
        wait = math.ceil(max(0.0, self.extra_seconds - self.credit) / earned_per_step) if earned_per_step > 0 else 1
        self.next_optional = step + max(1, wait)
        # what is left per step for statistics once the other costs (checkpoints, writes) are paid, per extra cost
        left = max(0.0, earned_per_step - self.other_seconds / max(1, self.steps_seen))
        self.affordable_rate = left / self.extra_seconds if self.extra_seconds > 0 else None
        if self.segment_end is not None and step + 1 < self.segment_end:  # fewer required steps if unaffordable
            done = [s for s in self.required if s <= step]
            rest = self.segment_end - step - 1
            count = self._required_count(rest, len(done), debt=max(0.0, -self.credit))
            if count < len(self.required) - len(done):
                self.required = done + spread(step + 1, rest, count)
        return self.plan

    @property
    def plan(self) -> Plan:
        return Plan(self.next_optional, self.affordable_rate, list(self.required))

    def follow(self, plan: Plan) -> None:
        """Adopt a plan made elsewhere (rank 0's, under DDP)."""
        self.next_optional, self.affordable_rate, required = plan
        self.required = list(required)

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
                self.credit -= extra
                if step == self.measuring_step:  # on a share of the batch: an estimate for the whole
                    extra, self.estimated = extra * MEASURING_SCALE, True
                elif self.estimated:  # a whole-batch statistics step replaces the estimate
                    self.extra.clear()
                    self.estimated = False
                self.extra.append(extra)
        else:
            self.plain.append(seconds)
        self.steps_seen += 1
        self.credit = min(self.credit + self.budget * self.plain_seconds, self.credit_cap)

    def spend(self, seconds: float) -> None:
        """Another cost of recording (a checkpoint, a segment write, the loss check) is paid from the budget."""
        self.credit -= seconds
        self.other_seconds += seconds

    @property
    def credit_cap(self) -> float:
        """Unused credit is kept up to one statistics step's cost (no bursts after quiet stretches)."""
        return max(self.extra_seconds, self.budget * self.plain_seconds)

    # --- records ----------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {
            "every_n_steps": "auto",
            "overhead_budget": self.budget,
            "min_statistics_steps": self.min_per_segment,
            "strict_budget": self.strict,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "plain": list(self.plain),
            "extra": list(self.extra),
            "credit": self.credit,
            "next_optional": self.next_optional,
            "required": list(self.required),
            "affordable_rate": self.affordable_rate,
            "other_seconds": self.other_seconds,
            "steps_seen": self.steps_seen,
            "segment_end": self.segment_end,
            "measuring_step": self.measuring_step,
            "estimated": self.estimated,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plain = deque(state["plain"], maxlen=PLAIN_WINDOW)
        self.extra = deque(state["extra"], maxlen=EXTRA_WINDOW)
        self.credit = float(state["credit"])
        self.next_optional = state["next_optional"]
        self.required = list(state["required"])
        self.affordable_rate = state.get("affordable_rate")  # absent in states saved before it was planned
        self.segment_end = state.get("segment_end")
        self.other_seconds = float(state.get("other_seconds", 0.0))
        self.steps_seen = int(state.get("steps_seen", 0))
        self.measuring_step = state.get("measuring_step")
        self.estimated = bool(state.get("estimated", False))


def spread(start: int, steps: int, count: int) -> list[int]:
    """``count`` steps at the middles of equal parts of the ``steps`` steps after ``start``."""
    count = min(count, steps)
    return sorted({start + int((i + 0.5) * steps / count) for i in range(count)}) if count > 0 else []


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
