"""SOURCE's automatic choices, each made from what the trace shows and recorded with its reason in ``Scores.config``.

* ``segments="auto"``: which segments to attribute to (:func:`settled_segments`);
* ``response="auto"``: the unrolled response or its first-order limit (:func:`chosen_response`);
* ``covariances="auto"``: per segment, the eigenbasis from the covariances streamed during training or
  recomputed at the segment's checkpoints (:func:`chosen_covariances`).

Each rule and the measurements behind it are in ``docs/source.md``; the thresholds were set on the benchmark
suites of ``benchmarks/run.py`` (BENCHMARKS.md).
"""

from __future__ import annotations

import math

import numpy as np

from lightning_tda.methods.base import optimizer_name
from lightning_tda.methods.convergence import check_convergence
from lightning_tda.trace.reader import Trace

INTERPOLATED = 0.01  # final segment's mean loss below this fraction of the first 10 % of steps' = interpolation
PLATEAU = 10.0  # ... then segments whose mean loss is above this multiple of the final segment's are left out


def settled_segments(trace: Trace) -> tuple[list[int], str]:
    """The segments ``segments="auto"`` attributes to, and why (a sentence for ``Scores.config``).

    All of them, unless an Adam/AdamW run drove its training loss to zero: its last segment's mean logged
    loss is below ``INTERPOLATED`` of the first 10 % of steps'. Then the segments before the loss reached
    its plateau (mean loss above ``PLATEAU`` × the last segment's) are left out. Their gradients are
    orders of magnitude larger than the rest, so their terms dominate the sum, while Adam's normalised
    steps keep reshaping the model through the hundreds of steps at zero loss that follow; on the modern
    suite's interpolating MLP SOURCE's LDS was 0.17 with them and 0.43 without (EK-FAC IF 0.42;
    BENCHMARKS.md, "Methods that follow the optimizer"). Under SGD a step at zero loss barely moves the
    parameters, so nothing is left out: on the two SGD runs driven to almost zero loss (digits trained 30
    epochs, wine), leaving out the first segment cost 0.09 and 0.24 LDS (docs/source.md).
    """
    available = [info.index for info in trace.segments]
    steps = trace.steps()
    losses, owners = np.asarray(steps.loss, dtype=np.float64), np.asarray(steps.segment)
    means = {s: float(losses[owners == s].mean()) if (owners == s).any() else math.nan for s in available}
    start = losses[: max(1, len(losses) // 10)].mean() if len(losses) else math.nan
    last = means[available[-1]]
    if optimizer_name(trace) not in ("Adam", "AdamW"):
        return available, f"all segments: the run used {optimizer_name(trace)} (only Adam/AdamW runs are trimmed)"
    if not (math.isfinite(start) and math.isfinite(last) and start > 0 and last < INTERPOLATED * start):
        return available, (
            f"all segments: the last segment's mean training loss is {last / start:.3g} of the first steps' "
            f"(not below {INTERPOLATED:g}, so the run did not interpolate)"
        )
    kept = [s for s in available if means[s] <= PLATEAU * last]
    dropped = [s for s in available if s not in kept]
    if not dropped:
        return available, (
            f"all segments: the loss fell to {last / start:.3g} of its start, and every segment's mean loss is "
            f"within {PLATEAU:g}x the last one's"
        )
    ratios = ", ".join(f"{means[s] / last:.3g}x" for s in dropped)
    return kept, (
        f"segments {kept}: the Adam run interpolated (last segment's mean training loss {last / start:.3g} of the "
        f"first steps'); segments {dropped} come before the plateau (mean loss {ratios} the last segment's, above "
        f"{PLATEAU:g}x) and are left out"
    )


def chosen_response(trace: Trace, n_train: int) -> tuple[str, str]:
    """The response ``response="auto"`` uses, and why (a sentence for ``Scores.config``).

    ``"first-order"`` when an SGD run stopped early (the convergence check's signal: fewer than 5 passes over
    the data while the loss still fell), else ``"unrolled"``. On the 7 runs of the benchmark suites stopped
    after 2-3 epochs of SGD, the curvature terms lowered SOURCE's LDS on 5 (by up to 0.36: diabetes) and raised
    it on 2 by at most 0.05, while they raised it on all 9 longer SGD runs and on 8 of 9 AdamW runs, the two
    stopped early included (BENCHMARKS.md, "SOURCE: unrolled or first-order response"; docs/source.md).
    """
    check = check_convergence(trace, None, n_train)
    detail = f"{check.passes:.3g} passes over the data, loss drop over the last quarter {check.loss_drop:.3g}"
    name = optimizer_name(trace)
    if name != "SGD":
        return "unrolled", f"unrolled: the run used {name} (first-order only for SGD runs stopped early; {detail})"
    if check.stopped_early:
        return "first-order", f"first-order: the SGD run stopped early, its loss still falling ({detail})"
    return "unrolled", f"unrolled: the SGD run did not stop early ({detail})"


STREAMED_STATISTICS_STEPS = 4  # statistics steps from which a segment's streamed covariances are used


def chosen_covariances(trace: Trace, segment: int) -> tuple[str, str]:
    """Where ``covariances="auto"`` takes ``segment``'s K-FAC covariances from, and why.

    ``"stream"`` (recorded during training, no pass) when the callback took at least
    ``STREAMED_STATISTICS_STEPS`` statistics steps in the segment, else ``"recompute"`` (one pass over the
    training data at the segment's checkpoints, a disjoint share at each). The callback's budget can leave a
    segment with one or two statistics steps (``strict_budget``, the default). On 18 settings of the benchmark
    suites, covariances streamed from those cost SOURCE up to 0.05 LDS (0.25 on a run driven to almost zero
    loss), while the recomputed ones came within 0.02 of four streamed steps per segment on 17, higher on 12
    (0.066 below on that run; BENCHMARKS.md, "What cheaper recording costs attribution").
    """
    steps = trace.segment(segment).stats_steps
    if steps >= STREAMED_STATISTICS_STEPS:
        return "stream", f"stream: {steps} statistics steps recorded in segment {segment}"
    return "recompute", (
        f"recompute: segment {segment} holds {steps} statistics step(s), fewer than {STREAMED_STATISTICS_STEPS}"
    )
