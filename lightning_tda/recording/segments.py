"""Segmentation policies: where the recorder closes one segment of training and opens the next.

SOURCE treats each segment as stationary (one mean learning rate, one mean curvature), so segment
ends should fall where training changes: equal fractions of the run by default (the paper uses
thirds), explicit steps or epochs for multi-stage runs, or an adaptive rule that closes a segment
when the curvature drifts. Steps are optimizer steps counted by the recorder (1-based).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from lightning_tda.recording.optimizer import SecondMomentMean


@dataclass
class OpenSegment:
    """The segment being recorded: what the callback writes when it closes (the K-FAC sums are kept by
    :class:`~lightning_tda.layers.covariances.KFACStatistics`)."""

    index: int
    start_step: int
    num_steps: int = 0
    stats_steps: int = 0
    lr_sum: list[float | Tensor] = field(default_factory=list)  # per param group over the segment's steps, float64
    second_moments: SecondMomentMean = field(default_factory=SecondMomentMean)  # Adam's v̂ on statistics steps
    last_checkpoint_step: int = -1

    def add_step(self, lrs: Sequence[float | Tensor], statistics: bool) -> None:
        self.num_steps += 1
        self.stats_steps += int(statistics)
        self.lr_sum = [a + b for a, b in zip(self.lr_sum, lrs)] if self.lr_sum else list(lrs)

    def state_dict(self) -> dict[str, Any]:
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        return state | {"lr_sum": list(self.lr_sum), "second_moments": self.second_moments.state_dict()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], device: torch.device) -> OpenSegment:
        restored = dict(state)
        restored["second_moments"] = SecondMomentMean.from_state_dict(state["second_moments"], device)
        return cls(**restored)


class SegmentPolicy:
    """Base policy: planned boundaries for a fit, plus an optional dynamic rule.

    ``plan`` returns the steps after which a segment closes (the last is the fit's end);
    ``should_close`` may close a segment early; ``observe`` sees each statistics step's K-FAC sums.
    """

    reason = "planned"

    def plan(self, first_step: int, total_steps: int, steps_per_epoch: int | None) -> list[int]:
        return [first_step + total_steps]

    def observe(self, step_sums: Mapping[str, Mapping[str, Tensor]]) -> None:
        """See one statistics step's staged sums (``A_sum``, ``A_count``, ``S_sum``, ``S_count`` per layer)."""

    def should_close(self, steps_in_segment: int) -> bool:
        return False

    def segment_closed(self) -> None:
        """Called after each segment closes."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class EqualSegments(SegmentPolicy):
    """``n`` segments of (nearly) equal numbers of planned optimizer steps (SOURCE's default, n=3)."""

    def __init__(self, n: int = 3) -> None:
        if n < 1:
            raise ValueError(f"EqualSegments(n={n}): the number of segments must be at least 1.")
        self.n = n

    def plan(self, first_step: int, total_steps: int, steps_per_epoch: int | None) -> list[int]:
        ends = {first_step + round(total_steps * k / self.n) for k in range(1, self.n + 1)}
        return sorted(e for e in ends if e > first_step)


class StepBoundaries(SegmentPolicy):
    """Segments end after the given optimizer steps (counted from the start of this fit), and at the end."""

    def __init__(self, steps: Sequence[int]) -> None:
        if any(s <= 0 for s in steps) or list(steps) != sorted(set(steps)):
            raise ValueError(f"StepBoundaries({list(steps)}): give increasing positive step counts.")
        self.steps = list(steps)

    def plan(self, first_step: int, total_steps: int, steps_per_epoch: int | None) -> list[int]:
        inside = [first_step + s for s in self.steps if s < total_steps]
        return [*inside, first_step + total_steps]


class EpochBoundaries(SegmentPolicy):
    """A new segment starts at each of the given epochs (0-based, counted within this fit)."""

    def __init__(self, epochs: Sequence[int]) -> None:
        if any(e <= 0 for e in epochs) or list(epochs) != sorted(set(epochs)):
            raise ValueError(f"EpochBoundaries({list(epochs)}): give increasing positive epoch numbers.")
        self.epochs = list(epochs)

    def plan(self, first_step: int, total_steps: int, steps_per_epoch: int | None) -> list[int]:
        if not steps_per_epoch:
            raise ValueError(
                "EpochBoundaries needs a finite number of optimizer steps per epoch; with an iterable or "
                "unsized dataloader use StepBoundaries instead."
            )
        inside = [first_step + e * steps_per_epoch for e in self.epochs if e * steps_per_epoch < total_steps]
        return [*inside, first_step + total_steps]


class CurvatureDrift(SegmentPolicy):
    """Close a segment when the curvature drifts from the segment's mean (adaptive segmentation).

    For every tracked layer the factors of recent statistics steps (an exponential moving average
    with weight ``decay``) are compared with the segment's running mean; both trace-normalized, so
    only the *shape* of the curvature counts. The drift is the largest relative Frobenius distance
    over layers and both factors. A segment closes when drift exceeds ``threshold`` and it has at
    least ``min_steps`` steps. The SOURCE paper leaves adaptive segmentation open; this is ours.
    """

    reason = "drift"

    def __init__(self, threshold: float = 0.3, min_steps: int = 50, decay: float = 0.9) -> None:
        if threshold <= 0 or min_steps < 1 or not 0 < decay < 1:
            raise ValueError("CurvatureDrift needs threshold > 0, min_steps >= 1 and 0 < decay < 1.")
        self.threshold, self.min_steps, self.decay = threshold, min_steps, decay
        self.segment_mean: dict[str, Tensor] = {}
        self.segment_weight = 0
        self.recent: dict[str, Tensor] = {}
        self.last_drift = 0.0

    @staticmethod
    def _normalized(sums: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for key in ("A_sum", "S_sum"):
            if key not in sums:  # a factor the callback does not record
                continue
            trace = sums[key].trace()
            if trace > 0:
                out[key] = sums[key] / trace
        return out

    def observe(self, step_sums: Mapping[str, Mapping[str, Tensor]]) -> None:
        self.segment_weight += 1
        drifts = []
        for layer, sums in step_sums.items():
            for key, value in self._normalized(sums).items():
                name = f"{layer}/{key}"
                mean = self.segment_mean.get(name)
                self.segment_mean[name] = value if mean is None else mean + (value - mean) / self.segment_weight
                recent = self.recent.get(name)
                self.recent[name] = value if recent is None else self.decay * recent + (1 - self.decay) * value
                reference = self.segment_mean[name]
                drifts.append(float(torch.linalg.norm(self.recent[name] - reference) / torch.linalg.norm(reference)))
        self.last_drift = max(drifts, default=0.0)

    def should_close(self, steps_in_segment: int) -> bool:
        return steps_in_segment >= self.min_steps and self.last_drift > self.threshold

    def segment_closed(self) -> None:
        self.segment_mean, self.recent, self.segment_weight, self.last_drift = {}, {}, 0, 0.0

    def state_dict(self) -> dict:
        return {
            "segment_mean": self.segment_mean,
            "recent": self.recent,
            "segment_weight": self.segment_weight,
            "last_drift": self.last_drift,
        }

    def load_state_dict(self, state: dict) -> None:
        self.segment_mean = dict(state["segment_mean"])
        self.recent = dict(state["recent"])
        self.segment_weight = int(state["segment_weight"])
        self.last_drift = float(state["last_drift"])


def as_policy(segments: int | Sequence[int] | SegmentPolicy) -> SegmentPolicy:
    """Turn the callback's ``segments`` argument into a policy."""
    if isinstance(segments, SegmentPolicy):
        return segments
    if isinstance(segments, int):
        return EqualSegments(segments)
    if isinstance(segments, Sequence) and not isinstance(segments, str):
        return StepBoundaries(list(segments))
    raise TypeError(
        f"segments={segments!r}: give a number of equal segments, a list of step boundaries, or a "
        f"SegmentPolicy (EqualSegments, StepBoundaries, EpochBoundaries, CurvatureDrift)."
    )


def checkpoint_steps(start: int, end: int, per_segment: int) -> list[int]:
    """Evenly spaced checkpoint steps in ``(start, end]``, the last at ``end``."""
    length = end - start
    steps = {start + max(1, round(length * (j + 1) / per_segment)) for j in range(per_segment)}
    return sorted(s for s in steps if start < s <= end)
