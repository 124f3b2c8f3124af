"""What :class:`~lightning_tda.recording.callback.TDACallback` records and how: its options as one dataclass.

``TDACallback(path, task, segments=3, ...)`` keeps its flat keyword arguments (what configs and
``LightningCLI`` read); they are collected into a :class:`RecordingOptions`, which validates them in one place
and serialises them into the trace (``meta/config``), in the manner of kronfluence's argument dataclasses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lightning_tda.layers.covariances import FACTOR_DTYPE_CHOICES
from lightning_tda.recording.segments import SegmentPolicy

IF_EXISTS = {"error": "create", "overwrite": "overwrite", "append": "append"}  # -> TraceWriter mode
CHECKPOINT_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class RecordingOptions:
    """Everything the callback records, and how.

    Args:
        segments: number of equal segments (default 3), a list of step boundaries (steps after which
            a segment ends, counted from the start of this fit), or a
            :class:`~lightning_tda.recording.segments.SegmentPolicy` (``EpochBoundaries``, ``CurvatureDrift``...).
        checkpoints_per_segment: model states saved per segment, evenly spaced, the last at its end.
        fisher: ``"true"`` (targets sampled from the model; one extra forward and backward on
            statistics steps) or ``"empirical"`` (the training gradients; no extra pass).
        every_n_steps: take K-FAC statistics on every n-th optimizer step, or ``"auto"``: spaced by
            measured cost within ``overhead_budget`` (see :mod:`lightning_tda.recording.cadence`).
        layers: which layers to track: ``None`` (all supported layers with trainable parameters),
            ``"lora"`` (peft LoRA adapters) or fnmatch patterns on module names.
        exclude: fnmatch patterns of modules not to track.
        checkpoint_dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` for stored checkpoints.
        if_exists: an existing trace at ``path`` is refused (``"error"``), replaced (``"overwrite"``)
            or continued (``"append"``, e.g. a second training stage). A run resumed with
            ``ckpt_path`` always continues its own trace.
        dataset_size: number of training examples, recorded in the trace (default: the length of the
            training dataset when it has one).
        seed: seed of the generator that samples true-Fisher targets.
        exact_fisher_outputs: with ``fisher="true"``, models whose output Hessian has at most this many
            square-root factors (output dimensions; classes for classifiers) get the exact expectation
            over the predictive distribution, one backward per factor, instead of one sampled target.
            The default 1 makes scalar regression exact at the cost of the sampled estimate.
        loss_check_steps: on this many optimizer steps at the start of each fit, compare the batch mean of
            ``task.train_loss`` with the loss ``training_step`` returned (one extra forward per batch, no
            backward); the result is warned about when they differ and recorded in the trace. 0 turns it off.
        overhead_budget: with ``every_n_steps="auto"``, the extra time statistics, checkpoints, segment
            writes and the loss check may add, as a fraction of the training time.
        min_statistics_steps: with ``every_n_steps="auto"``, statistics steps every planned segment gets when
            the budget affords them, or always with ``strict_budget=False``.
        strict_budget: with ``every_n_steps="auto"`` (default True), honour ``overhead_budget`` also where the
            minimum costs more: a segment then gets as many of its ``min_statistics_steps`` as the budget
            affords, none if it affords none (the run's first statistics step, which measures their cost on a
            quarter of each batch, is the one cost allowed past the budget). Where a segment ends up with fewer
            than 4, SOURCE recomputes its covariances at the segment's checkpoints when attributing
            (``covariances="auto"``), within 0.02 LDS of 4 streamed steps on 17 of 18 settings
            (BENCHMARKS.md, "What cheaper recording costs attribution"); EK-FAC IF recomputes its own by
            default. ``False`` always takes the minimum, past the budget on short runs.
        factor_dtype: precision of each step's K-FAC products and of the sums stored in the trace (they are
            accumulated in float64 either way): ``"float32"``, ``"float64"``, or ``"auto"``: float32 for
            factors at least 256 wide (a convolution's or a transformer's), where it halves the trace and
            the products' time, float64 for narrower ones.
        statistics_examples: take each statistics step's K-FAC products from the first this many examples of
            each micro-batch (per rank) instead of all of it: a statistics step then costs that fraction of
            the products (the true Fisher's extra backward still runs over the whole batch), and the budget
            affords more of them. ``None`` (the default) uses the whole batch. The counts are those of the
            examples used, so the factors stay means; with a shuffled loader the first examples are a
            random subset.
        max_factor_ratio: a K-FAC factor with more than this many times as many entries as its layer has
            parameters (and more than 2^18 entries) is not recorded, e.g. a LoRA adapter's ``d × d`` output
            factor; DataInf and recomputing methods do not need it. ``None`` records every factor.
    """

    segments: int | Sequence[int] | SegmentPolicy = 3
    checkpoints_per_segment: int = 2
    fisher: str = "true"
    every_n_steps: int | str = "auto"
    layers: str | Sequence[str] | None = None
    exclude: Sequence[str] | None = None
    checkpoint_dtype: str = "float32"
    if_exists: str = "error"
    dataset_size: int | None = None
    seed: int = 0
    exact_fisher_outputs: int = 1
    loss_check_steps: int = 4
    overhead_budget: float = 0.05
    min_statistics_steps: int = 4
    strict_budget: bool = True
    factor_dtype: str = "auto"
    max_factor_ratio: float | None = 16.0
    statistics_examples: int | None = None

    def __post_init__(self) -> None:
        def refuse(name: str, fix: str) -> None:
            raise ValueError(f"TDACallback({name}={getattr(self, name)!r}): {fix}")

        if self.fisher not in ("true", "empirical"):
            refuse("fisher", "use 'true' or 'empirical'.")
        if self.every_n_steps != "auto" and (not _is_int(self.every_n_steps) or self.every_n_steps < 1):
            refuse("every_n_steps", "use a positive integer or 'auto'.")
        if not _is_int(self.checkpoints_per_segment) or self.checkpoints_per_segment < 1:
            refuse("checkpoints_per_segment", "use at least 1 (the segment end).")
        if self.checkpoint_dtype not in CHECKPOINT_DTYPES:
            refuse("checkpoint_dtype", "use 'float32', 'float16' or 'bfloat16'.")
        if not _is_int(self.loss_check_steps) or self.loss_check_steps < 0:
            refuse("loss_check_steps", "use a non-negative integer.")
        if not _is_int(self.exact_fisher_outputs) or self.exact_fisher_outputs < 0:
            refuse("exact_fisher_outputs", "use a non-negative integer (0 always samples targets).")
        if not (isinstance(self.overhead_budget, (int, float)) and 0 <= self.overhead_budget < 1):
            refuse("overhead_budget", "use a fraction of the training time in [0, 1), e.g. 0.05.")
        if not _is_int(self.min_statistics_steps) or self.min_statistics_steps < 1:
            refuse("min_statistics_steps", "use a positive integer.")
        if not isinstance(self.strict_budget, bool):
            refuse("strict_budget", "use True or False.")
        if self.factor_dtype not in FACTOR_DTYPE_CHOICES:
            refuse("factor_dtype", "use 'auto' (float32 from 256 wide), 'float32' or 'float64'.")
        if self.max_factor_ratio is not None and not self.max_factor_ratio > 0:
            refuse("max_factor_ratio", "use a positive ratio, or None to record every factor.")
        if self.statistics_examples is not None and (
            not _is_int(self.statistics_examples) or self.statistics_examples < 1
        ):
            refuse("statistics_examples", "use a positive number of examples, or None for the whole batch.")
        if self.if_exists not in IF_EXISTS:
            refuse("if_exists", "use 'error', 'overwrite' or 'append'.")

    def to_config(self, policy: SegmentPolicy) -> dict[str, Any]:
        """The options as recorded in the trace's ``meta/config`` (JSON), with the segment policy resolved."""
        recorded = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        recorded["segments"] = type(policy).__name__
        recorded["policy"] = {k: v for k, v in vars(policy).items() if isinstance(v, (int, float, str, list))}
        for transient in ("if_exists", "dataset_size"):  # how this fit met the file, not what it records
            del recorded[transient]
        if self.every_n_steps != "auto":  # the budget does not apply to a fixed stride
            del recorded["overhead_budget"], recorded["min_statistics_steps"], recorded["strict_budget"]
        return recorded

    def run_meta(self, trainer: Any, model: Any, task: Any, cadence: dict[str, Any]) -> dict[str, Any]:
        """What the trace's ``/meta`` attributes record about this run: the classes that ran, the cadence
        (``cadence``: the statistics cadence's description), the trainer's world size, accumulation and precision,
        and the options that shape what was stored."""
        size = self.dataset_size
        if size is None:
            try:
                size = len(trainer.train_dataloader.dataset)
            except (AttributeError, TypeError):
                size = -1
        return {
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "task_class": f"{type(task).__module__}.{type(task).__qualname__}",
            "fisher": self.fisher,
            **cadence,
            "world_size": trainer.world_size,
            "dataset_size": size,
            "checkpoint_dtype": self.checkpoint_dtype,
            "factor_dtype": self.factor_dtype,
            "max_factor_ratio": -1.0 if self.max_factor_ratio is None else float(self.max_factor_ratio),
            "sequence_mode": "expand",
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "precision": str(trainer.precision),
        }


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
