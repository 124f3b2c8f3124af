"""TDACallback: record what training data attribution needs while a Lightning model trains.

During ``fit`` the callback

* logs every optimizer step (learning rate of each param group, batch size, loss, epoch),
* splits training into segments (SOURCE's stationary pieces) by a :mod:`~lightning_tda.recording.segments`
  policy and saves ``checkpoints_per_segment`` model states in each (the last at its end),
* streams per-layer K-FAC covariances of each segment in float64 on statistics steps (true
  Fisher from targets sampled from the model, or the empirical Fisher of the training gradients),
  and for Adam-family optimizers the segment mean of the second moments,

* on the first ``loss_check_steps`` optimizer steps, checks that the Task's loss is the loss
  ``training_step`` optimises (:mod:`~lightning_tda.recording.loss_check`, from the training forward's outputs
  where the Task recognises the call); a scale or reduction mismatch, or an extra term, is warned about with the fix,

all into one HDF5 trace (:mod:`lightning_tda.trace`). Only global rank 0 writes; statistics are
summed across ranks first. The callback's own state is saved in Lightning checkpoints under a
:attr:`~TDACallback.state_key` naming its trace, so ``trainer.fit(..., ckpt_path=...)`` continues the same
trace, also with several recorders in one Trainer. Its options are one
:class:`~lightning_tda.recording.options.RecordingOptions`.

Cost: a statistics step costs the outer products of every tracked layer's rows plus, with the true Fisher,
one more backward (and a forward when the training graph cannot be reused). ``every_n_steps="auto"`` spaces
statistics steps within ``overhead_budget`` of the training time by measuring them
(:mod:`~lightning_tda.recording.cadence`); what recording cost is measured by kind
(:mod:`~lightning_tda.recording.cost`), printed at the end of ``fit``, kept in the trace and put into the W&B
summary. Pass an integer ``every_n_steps`` for a trace that is reproducible step for step.

Devices and precision: sums, the NaN/Inf check and the loss column stay on the model's device until written; a
step without statistics makes no host-device synchronisation. Under bf16/fp16 autocast the products are computed
outside autocast in at least float32 and summed in float64. One device or DDP (a write failure stops only the
writing: every rank keeps every collective); sharded strategies are refused at ``setup``
(:func:`~lightning_tda.recording.trainer.check_trainer`). Factors are stored as ``factor_dtype``; a factor far
larger than its layer (``max_factor_ratio``) is not recorded, and a method that needs it says so.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.rank_zero import WarningCache
from torch import Tensor

from lightning_tda.layers.capture import LayerCapture
from lightning_tda.layers.covariances import KFACStatistics, recorded_factors
from lightning_tda.layers.fisher import FisherOptions
from lightning_tda.layers.tracked import TrackedLayer, find_layers, selection_warnings
from lightning_tda.recording.cadence import BudgetCadence, FixedCadence, StepTimer
from lightning_tda.recording.checkpoints import HeldCheckpoints, checkpoint_state
from lightning_tda.recording.cost import RecordingCost, report_cost
from lightning_tda.recording.loss_check import TrainingLossCheck
from lightning_tda.recording.optimizer import AdamSecondMoments, layer_param_groups, optimizer_record
from lightning_tda.recording.options import IF_EXISTS, RecordingOptions
from lightning_tda.recording.segments import OpenSegment, SegmentPolicy, as_policy, checkpoint_steps
from lightning_tda.recording.step_log import StepLogBuffer, host_values, learning_rates, loss_value
from lightning_tda.recording.trainer import check_trainer, per_example_scale, planned_steps, summed_over_ranks
from lightning_tda.recording.training_forward import TrainingForward
from lightning_tda.recording.true_fisher import TrainingGraphFisher
from lightning_tda.tasks import Task
from lightning_tda.trace.writer import TraceWriteError, TraceWriter


class TDACallback(L.Callback):
    """Record the training trajectory and curvature into an HDF5 trace for attribution.

    Args:
        path: trace file to write (its directory is created).
        task: how to get per-example losses from a batch (e.g. ``ClassificationTask()``); used for
            the true Fisher's sampled targets and for batch sizes.
        segments, checkpoints_per_segment, fisher, every_n_steps, layers, exclude, checkpoint_dtype, if_exists,
        dataset_size, seed, exact_fisher_outputs, loss_check_steps, overhead_budget, min_statistics_steps,
        strict_budget, factor_dtype, max_factor_ratio, statistics_examples: what is recorded and how; collected
        into ``self.options``, a :class:`~lightning_tda.recording.options.RecordingOptions`, which documents
        each and checks them.
    """

    def __init__(
        self,
        path: str,
        task: Task,
        segments: int | Sequence[int] | SegmentPolicy = 3,
        checkpoints_per_segment: int = 2,
        fisher: str = "true",
        every_n_steps: int | str = "auto",
        layers: str | Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        checkpoint_dtype: str = "float32",
        if_exists: str = "error",
        dataset_size: int | None = None,
        seed: int = 0,
        exact_fisher_outputs: int = 1,
        loss_check_steps: int = 4,
        overhead_budget: float = 0.05,
        min_statistics_steps: int = 4,
        strict_budget: bool = True,
        factor_dtype: str = "auto",
        max_factor_ratio: float | None = 16.0,
        statistics_examples: int | None = None,
    ) -> None:
        self.options = RecordingOptions(
            segments=segments,
            checkpoints_per_segment=checkpoints_per_segment,
            fisher=fisher,
            every_n_steps=every_n_steps,
            layers=layers,
            exclude=exclude,
            checkpoint_dtype=checkpoint_dtype,
            if_exists=if_exists,
            dataset_size=dataset_size,
            seed=seed,
            exact_fisher_outputs=exact_fisher_outputs,
            loss_check_steps=loss_check_steps,
            overhead_budget=overhead_budget,
            min_statistics_steps=min_statistics_steps,
            strict_budget=strict_budget,
            factor_dtype=factor_dtype,
            max_factor_ratio=max_factor_ratio,
            statistics_examples=statistics_examples,
        )
        self.path = str(path)
        self._state_key = self._generate_state_key(path=self.path)  # read at every hook Lightning calls
        self.task = task
        self.policy = as_policy(segments)
        self.fisher = FisherOptions(fisher, seed=seed, exact_outputs=exact_fisher_outputs, fallback_samples=1)
        self.cadence = (
            BudgetCadence(overhead_budget, min_statistics_steps, strict=strict_budget)
            if every_n_steps == "auto"
            else FixedCadence(int(every_n_steps))
        )

        self.layers: list[TrackedLayer] = []
        self.stats: KFACStatistics | None = None
        self.writer: TraceWriter | None = None
        self.run_id: str | None = None
        self.step = 0  # optimizer steps recorded in this trace
        self.boundaries: list[int] = []
        self.checkpoint_plan: list[int] = []
        self.num_segments_closed = 0
        self.num_checkpoints = 0
        self._segment = OpenSegment(index=0, start_step=0)
        self._step_log = StepLogBuffer()
        self._held = HeldCheckpoints()  # a small model's checkpoints of the open segment, written at its close
        self._restored: dict[str, Any] | None = None
        self._new_segment_requested = False
        self._warnings = WarningCache()
        self._stopped = False  # a write failed (disk full): recording stopped, training goes on
        self._capture: LayerCapture | None = None
        self._fisher_done = False
        self._generator: torch.Generator | None = None
        self._true_fisher: TrainingGraphFisher | None = None
        self._forward: TrainingForward | None = None
        self._keep_forward = False  # this micro-batch's forward output is wanted (statistics or the loss check)
        self._trainer_for_state: L.Trainer | None = None
        self._loss_check: TrainingLossCheck | None = None
        self._second_moments: AdamSecondMoments | None = None
        self._cost = RecordingCost()
        self._timer: StepTimer | None = None
        self._paid = 0.0  # of the recording's seconds besides statistics, those the cadence was told about
        self._world_size = 1
        self._reset_micro_batch()

    @property
    def state_key(self) -> str:
        """Where Lightning keeps this callback's resume state: one per trace, so two recorders in one Trainer
        (two traces, e.g. of different layers) resume independently."""
        return self._state_key

    # ----------------------------------------------------------------------------------- set-up
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        for message in check_trainer(trainer, pl_module):
            self._warnings.warn(message)
        self.layers, skipped, tied = find_layers(pl_module, self.options.layers, self.options.exclude)
        for message in selection_warnings(skipped, tied):
            self._warnings.warn(f"TDACallback {message}")
        self.recorded = {layer.name: recorded_factors(layer, self.options.max_factor_ratio) for layer in self.layers}
        self._second_moments = AdamSecondMoments(self.layers)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise RuntimeError(f"TDACallback records exactly one optimizer; this run has {len(trainer.optimizers)}.")
        optimizer = trainer.optimizers[0]
        self._world_size = trainer.world_size
        self._cost = RecordingCost()
        self._paid = 0.0
        with self._cost.timed("trace_creation"):
            self._start_recording(trainer, pl_module, optimizer)
        self._cost.first_step = self.step
        self.run_id = trainer.strategy.broadcast(self.run_id, src=0)
        # statistics steps capture the training forward itself (rows reduced to products at once; true Fisher below);
        # the hooks are on only for the micro-batches that need them
        self._capture = LayerCapture(
            self.layers,
            on_gradient=self._on_gradient_rows if self.fisher.kind == "empirical" else None,
            keep_outputs=self.fisher.kind == "true",
            on_inputs=self._on_layer_inputs,
        )
        self._forward = TrainingForward(pl_module)
        if self.fisher.kind == "true":
            self._true_fisher = TrainingGraphFisher(self.layers, self.task, self.fisher, self._generator)

    def _start_recording(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        """Statistics, the trace (created with its header and initial checkpoint, or opened to continue), the plan
        of segments and the loss check."""
        self._device = pl_module.device
        # only the budget cadence reads step durations (on a GPU from CUDA events, read at statistics steps)
        self._timer = StepTimer(pl_module.device) if isinstance(self.cadence, BudgetCadence) else None
        self.stats = KFACStatistics(
            self.layers,
            device=pl_module.device,
            recorded=self.recorded,
            factor_dtype=self.options.factor_dtype,
        )
        self._generator = torch.Generator(device=pl_module.device)
        self._generator.manual_seed(self.options.seed + trainer.global_rank)
        restored, self._restored = self._restored, None
        if trainer.is_global_zero:
            self._open_writer(resuming=restored is not None)
        self._broadcast_counters(trainer)
        if restored is not None:
            self._apply_restored(restored, trainer)
        else:
            total, steps_per_epoch = planned_steps(trainer)
            self.boundaries = self.policy.plan(self.step, total, steps_per_epoch)
            self._open_segment()
        # every rank replays its own batches (a replayed forward may hold collectives); rank 0 warns and records
        saved = (restored or {}).get("loss_check")
        self._loss_check = TrainingLossCheck.for_fit(
            self.task, self.options.loss_check_steps, str(trainer.precision), self.step + 1, saved
        )
        if self.writer is not None and self.writer.created:
            self.run_id = uuid.uuid4().hex[:12]
            with self._recording():
                self.writer.write_header(
                    run_id=self.run_id,
                    meta=self.options.run_meta(trainer, pl_module, self.task, self.cadence.describe()),
                    optimizer=optimizer_record(optimizer),
                    config=self.options.to_config(self.policy),
                    layers=self.layers,
                    num_param_groups=len(optimizer.param_groups),
                    layer_groups=layer_param_groups(optimizer, self.layers),
                    recorded=self.recorded,
                )
                with self._cost.timed("initial_checkpoint"):
                    self.writer.write_checkpoint("initial", pl_module.state_dict(), {"step": 0}, "native")
                    self.writer.flush()

    def _open_writer(self, resuming: bool) -> None:
        if resuming or self.run_id is not None:  # the trace of this run, continued
            self.writer = TraceWriter(self.path, "append", run_id=self.run_id)
            return
        self.writer = TraceWriter(self.path, IF_EXISTS[self.options.if_exists])
        if not self.writer.created:  # append to a trace written by another callback (a later stage)
            self.run_id, self.step = self.writer.run_id, self.writer.num_rows
            self.num_segments_closed, self.num_checkpoints = self.writer.num_segments, self.writer.num_checkpoints

    def _broadcast_counters(self, trainer: L.Trainer) -> None:
        """Give every rank rank 0's view of the trace (it differs only when appending to a file)."""
        if trainer.world_size > 1:
            counters = trainer.strategy.broadcast(
                (self.run_id, self.step, self.num_segments_closed, self.num_checkpoints), src=0
            )
            self.run_id, self.step, self.num_segments_closed, self.num_checkpoints = counters

    # ------------------------------------------------------------------------------- per batch
    def _reset_micro_batch(self) -> None:
        self._capturing = False
        self._stats_step = False
        self._checked = False  # the step is one of the loss check's
        self._stepped = False
        self._lrs: list[float | Tensor] = []  # this step's, per param group
        self._loss_sum: Tensor | None = None
        self._examples = 0
        self._step_open = False

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        with self._cost.timed("bookkeeping"):
            if not self._step_open:  # the first micro-batch of an optimizer step
                self._open_step(trainer)
            self._batch = batch
            self._batch_size = self.task.batch_size(batch)
            self._examples += self._batch_size
            if self._stats_step or self._checked:
                self._prepare_batch(trainer, pl_module, batch)

    def _open_step(self, trainer: L.Trainer) -> None:
        self._step_open = True
        # after a write failure a single process stops taking statistics; under DDP every rank keeps taking
        # (and reducing) them, so every collective still matches on every rank
        self._stats_step = self.cadence.is_statistics_step(self.step) and not (self._stopped and self._world_size == 1)
        if self._stats_step and self.cadence.is_optional(self.step):  # the costs since its plan may move it
            self._plan_statistics(trainer, confirming=True)
            self._stats_step = self.cadence.is_statistics_step(self.step)
        self._stats_share = self.cadence.statistics_share(self.step) if self._stats_step else 1.0
        self._checked = self._loss_check is not None and self._loss_check.covers(self.step)
        if self._timer is not None:  # after the cadence's own work: the step's time is the training's
            self._timer.start()

    def _prepare_batch(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any) -> None:
        """Hooks and state for a micro-batch of a statistics step or of the loss check."""
        self._capturing = self._stats_step
        self._fisher_done = False
        if self._checked:
            with self._cost.timed("loss_check"):
                self._loss_check.before_training_step(pl_module.device)
        self._keep_forward = self._checked or (self._capturing and self._true_fisher is not None)
        self._forward.forget()  # a batch whose training_step returned no loss had no backward to forget its calls
        if self._keep_forward:
            self._forward.watch()
        if self._capturing:
            self._capture.attach()
            self._capture.row_mask = self.task.row_mask(batch)
            self._capture.batch_size = self._batch_size
            examples = math.ceil(self._batch_size * self._stats_share)  # the products' examples, first of the batch
            self.stats.max_examples = min(examples, self.options.statistics_examples or examples)
            if self.fisher.kind == "empirical":
                self._grad_scale = per_example_scale(trainer, self._batch_size)

    def _on_gradient_rows(self, layer: TrackedLayer, rows: Tensor) -> None:
        with self._cost.timed("statistics"):
            self.stats.stage_gradients(layer.name, rows, self._grad_scale)

    def _on_layer_inputs(self, layer: TrackedLayer, inputs: Tensor, row_mask: Tensor | None) -> None:
        with self._cost.timed("statistics"):
            self.stats.stage_inputs(layer, inputs, row_mask)

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        """True Fisher from the training graph, before the training backward (:mod:`~.true_fisher`)."""
        if not (self._stats_step and self._true_fisher is not None and self._capturing):
            return
        with self._cost.timed("statistics"):
            outputs = self._forward.outputs(self.task, self._batch)
            if outputs is not None:
                rows = self._true_fisher.from_training_graph(self._capture, outputs, self._batch)
                for layer, layer_rows in rows.items():
                    self.stats.stage_gradients(layer, layer_rows)
                self._fisher_done = True

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """True Fisher by a second forward pass, when it could not use the training graph."""
        if not (self._stats_step or self._keep_forward):
            return
        self._release_hooks()  # the training forward of this micro-batch is over
        if self._checked:  # parameters not updated yet: the Task's loss there
            with self._cost.timed("loss_check"):
                outputs, precision = self._forward.outputs(self.task, self._batch), trainer.precision_plugin
                self._loss_check.after_backward(pl_module, self._batch, precision.train_step_context(), outputs)
        self._forward.forget()
        if not (self._stats_step and self._true_fisher is not None) or self._fisher_done:
            return
        with self._cost.timed("statistics"):
            autocast = trainer.precision_plugin.train_step_context()  # the training step's autocast, if any
            rows = self._true_fisher.by_second_forward(pl_module, self._batch, self._batch_size, autocast)
            for layer, layer_rows in rows.items():
                self.stats.stage_gradients(layer, layer_rows)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        with self._cost.timed("bookkeeping"):
            self._stepped = True
            self._lrs = learning_rates(optimizer)  # tensors stay on their device: no sync

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        with self._cost.timed("bookkeeping"):
            loss = loss_value(outputs, self._device)
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            if self._stats_step or self._checked or self._keep_forward:
                self._end_batch(trainer, loss, batch)
            if self._stepped:
                if self._timer is not None:
                    self._timer.stop(self.step, self._stats_step)
                if self._stats_step:
                    self._plan_statistics(trainer)
                self._finish_optimizer_step(trainer, pl_module)

    def _end_batch(self, trainer: L.Trainer, loss: Tensor, batch: Any) -> None:
        """The end of a micro-batch of a statistics step or of the loss check."""
        if self._checked:  # float() syncs: the first steps only
            with self._cost.timed("loss_check"):
                self._loss_check.after_batch(float(loss), trainer.accumulate_grad_batches, batch)
        if self._stats_step:
            with self._cost.timed("statistics"):
                self._capture.clear()
                observes = type(self.policy).observe is not SegmentPolicy.observe
                self.stats.commit(keep_step=observes)
                if observes and bool(self.stats.last_step_finite):
                    self.policy.observe(self.stats.last_step())  # an adaptive policy reads the step (one host sync)
        self._release_hooks()  # off already, unless training_step returned no loss: no backward released them

    def _release_hooks(self) -> None:
        """Take the capture's and the training forward's hooks off (what they kept stays until it is read)."""
        self._capturing = self._keep_forward = False
        self._capture.release()
        self._forward.release()

    def _plan_statistics(self, trainer: L.Trainer, confirming: bool = False) -> None:
        """After a statistics step (or before an optional one, ``confirming`` it): the cadence's next plan, from the
        step timings and the costs paid so far."""
        self._pay_recording_costs()
        self._record_step_times()
        planned = self.cadence.confirm(self.step) if confirming else self.cadence.plan_next(self.step)
        if self._world_size > 1:  # every rank takes statistics on rank 0's steps
            self.cadence.follow(trainer.strategy.broadcast(planned, src=0))

    def _pay_recording_costs(self) -> None:
        """Pay from the budget what recording cost since the last payment, besides statistics (the cadence measures
        those from the step timings): the trace's creation, checkpoints, writes, the loss check and bookkeeping.
        Paid before the cadence plans (its plans alone read the budget), not at every step."""
        spent = self._cost.total - self._cost.seconds["statistics"]
        self.cadence.spend(spent - self._paid)
        self._paid = spent

    def _record_step_times(self) -> None:
        """Hand the steps timed since the last call to the cadence (at statistics steps: on a GPU this waits)."""
        for step, seconds, statistics_step in self._timer.take() if self._timer is not None else ():
            self.cadence.record_step(step, seconds, statistics_step)

    def _finish_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.step += 1
        seg = self._segment
        seg.add_step(self._lrs, self._stats_step)
        if self._stats_step:
            with self._cost.timed("statistics"):
                seg.second_moments.add(self._second_moments.read(trainer.optimizers[0]))
        examples, statistics = self._examples * self._world_size, int(self._stats_step)
        row = (self.step, trainer.global_step, trainer.current_epoch, seg.index, examples, self._loss_sum, statistics)
        self._step_log.append((*row, self._lrs))
        self._reset_micro_batch()
        if self._loss_check is not None and not self._loss_check.done and not self._loss_check.covers(self.step):
            self._finish_loss_check()
        reason = self._close_reason(trainer)
        if self.step in self.checkpoint_plan and reason is None:  # a closing segment writes its last checkpoint
            self._write_checkpoint(trainer, pl_module)
        if reason is not None:
            with self._cost.timed("io"):
                self._close_segment(trainer, pl_module, reason)
                self._open_segment()

    def _close_reason(self, trainer: L.Trainer) -> str | None:
        """Why the open segment closes after this step (``"manual"``, ``"planned"`` or the policy's), or None."""
        if self._new_segment_requested or self.step in self.boundaries:
            return "manual" if self._new_segment_requested else "planned"
        if type(self.policy).should_close is SegmentPolicy.should_close:  # planned boundaries only
            return None
        decision = self.policy.should_close(self._segment.num_steps)
        if self._world_size > 1:
            decision = bool(trainer.strategy.broadcast(decision, src=0))
        return self.policy.reason if decision else None

    def new_segment(self) -> None:
        """Close the open segment after the current optimizer step (e.g. when the data changes). Not needed between
        two ``fit`` calls: every fit ends its last segment. Under DDP call it on every rank."""
        self._new_segment_requested = True

    # ---------------------------------------------------------------------------- segments
    def _open_segment(self) -> None:
        self._new_segment_requested = False
        self._segment = OpenSegment(index=self.num_segments_closed, start_step=self.step)
        self.stats.reset()
        upcoming = [b for b in self.boundaries if b > self.step]
        end = upcoming[0] if upcoming else self.step + 1
        self.checkpoint_plan = checkpoint_steps(self.step, end, self.options.checkpoints_per_segment)
        self.cadence.open_segment(self.step, end - self.step)

    def _close_segment(self, trainer: L.Trainer, pl_module: L.LightningModule, reason: str) -> None:
        seg = self._segment
        if seg.num_steps == 0:
            return
        with self._recording():  # first: a checkpoint's step must be in it, also when a write after it fails
            self._write_step_log()
        if self._segment.last_checkpoint_step != self.step:
            self._write_checkpoint(trainer, pl_module, closing=True)  # flushed with the segment
        # a segment without statistics steps (on every rank alike: they follow one plan) has only zero sums
        sums = summed_over_ranks(self.stats, trainer) if seg.stats_steps else {"__skipped__": 0}
        skipped = int(sums.pop("__skipped__"))
        if skipped:
            self._warnings.warn(
                f"TDACallback: NaN/Inf in the K-FAC statistics of {skipped} step(s) of segment {seg.index}; "
                f"those steps are left out of the statistics (counted in the segment's skipped_steps). Check the "
                f"loss and learning rate.",
            )
        if seg.stats_steps == 0 and not self._stopped and self.options.every_n_steps != "auto":
            self._warnings.warn(
                f"TDACallback: segment {seg.index} ({seg.num_steps} steps) got no K-FAC statistics "
                f"(every_n_steps={self.options.every_n_steps}). Lower every_n_steps or use fewer segments.",
            )
        if self.writer is not None:
            attrs = {
                "index": seg.index,
                "start_step": seg.start_step,
                "end_step": self.step,
                "num_steps": seg.num_steps,
                "stats_steps": seg.stats_steps,
                "skipped_steps": skipped,
                "mean_lr": host_values([seg.lr_sum])[0] / seg.num_steps,
                "reason": reason,
            }
            precond = seg.second_moments.means()
            with self._recording():
                self.writer.write_segment(seg.index, attrs, sums, precond, dtypes=self.stats.dtypes)
                self.writer.flush()
        self.num_segments_closed += 1
        self.policy.segment_closed()

    # ----------------------------------------------------------------------------- checkpoints
    def _write_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, closing: bool = False) -> None:
        """Save the model state after this step: with the segment's close (``closing``, the caller wrote the step
        log and flushes), held until then (a small model inside a segment), or written and flushed at once."""
        self._segment.last_checkpoint_step = self.step
        self.num_checkpoints += 1
        if self.writer is None:
            return
        with self._cost.timed("checkpoints"):
            state, index = checkpoint_state(pl_module), self.num_checkpoints - 1
            name, attrs = f"{index:06d}", {"index": index, "step": self.step, "segment": self._segment.index}
            attrs["epoch"] = trainer.current_epoch
            moments = self._second_moments.read(trainer.optimizers[0])  # Adam's v̂ behind this state
            if not closing and self._held.hold(name, state, attrs, moments):
                return
            with self._recording():
                if not closing:  # the step log first: a checkpoint's step must be in it, also when this write fails
                    self._write_step_log()
                self.writer.write_checkpoint(name, state, attrs, self.options.checkpoint_dtype, moments)
                if not closing:
                    self.writer.flush()

    def _write_step_log(self) -> None:
        """Append the buffered step rows, then the checkpoints held for the close (unflushed, failures raised)."""
        with self._cost.timed("io"):
            self._step_log.flush(self.writer)
            if self.writer is not None and self._held.checkpoints:
                with self._cost.timed("checkpoints"):
                    self._held.write(self.writer, self.options.checkpoint_dtype)

    # ------------------------------------------------------------------------------ endings
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish_loss_check()
        with self._cost.timed("io"):
            self._close_segment(trainer, pl_module, "end")
            self._open_segment()
        if self.step != self._cost.first_step:  # what recording this fit cost: in the trace, a line, W&B's summary
            record = self._cost.record(self.step)
            if self.writer is not None:
                with self._recording():
                    self.writer.record_cost(record)
            report_cost(record, trainer)
        if self.step == 0:
            self._warnings.warn(
                f"TDACallback: training made no optimizer step, so the trace {self.path} has no segments or "
                f"checkpoints to attribute with. Train for at least one step.",
            )
        self._teardown_capture()
        if self.writer is not None:
            with self._recording():
                self.writer.close()
            if self.writer is None:
                return
            self.writer = None
            rank_zero_info(
                f"TDACallback: trace {self.path}: {self.step} steps, {self.num_segments_closed} segments, "
                f"{self.num_checkpoints} checkpoints."
            )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.run_id is None:
            self._warnings.warn(
                f"TDACallback: training made no optimizer step (max_steps=0, limit_train_batches=0 or an empty "
                f"dataloader?), so no trace was written at {self.path}. Train for at least one step.",
            )

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Keep everything flushed so far; the open segment is lost (a resume recomputes it)."""
        self._teardown_capture()
        if self.writer is not None:
            with self._recording():
                self._write_step_log()
                self.writer.close()
            self.writer = None

    def _teardown_capture(self) -> None:
        if self._capture is not None:
            self._capture.__exit__(None, None, None)
            self._capture = None
        if self._forward is not None:
            self._forward.detach()
            self._forward = None
        self._true_fisher = None

    # ------------------------------------------------------------------------ state for resume
    def state_dict(self) -> dict[str, Any]:
        if self.stats is None or self.run_id is None:
            return {}
        trainer = self._trainer_for_state
        flat = summed_over_ranks(self.stats, trainer) if trainer is not None else None
        self._pay_recording_costs()  # the costs and steps so far belong to the saved cadence
        self._record_step_times()
        with self._recording():
            self._write_step_log()
            if self.writer is not None:
                self.writer.flush()
        return {
            "run_id": self.run_id,
            "step": self.step,
            "cadence": self.cadence.state_dict(),
            "boundaries": list(self.boundaries),
            "checkpoint_plan": list(self.checkpoint_plan),
            "num_segments_closed": self.num_segments_closed,
            "num_checkpoints": self.num_checkpoints,
            "segment": self._segment.state_dict(),
            "kfac": flat,
            "policy": self.policy.state_dict(),
            "generator": self._generator.get_state() if self._generator is not None else None,
            "loss_check": self._loss_check.state_dict() if self._loss_check is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)
        self.run_id = state_dict["run_id"]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._trainer_for_state = trainer

    def _apply_restored(self, state: dict[str, Any], trainer: L.Trainer) -> None:
        self.step = int(state["step"])
        self.cadence.load_state_dict(state["cadence"])
        self.boundaries = list(state["boundaries"])
        self.checkpoint_plan = list(state["checkpoint_plan"])
        self.num_segments_closed = int(state["num_segments_closed"])
        self.num_checkpoints = int(state["num_checkpoints"])
        self._segment = OpenSegment.from_state_dict(state["segment"], self._device)
        self.policy.load_state_dict(state["policy"])
        if state["generator"] is not None:
            self._generator.set_state(state["generator"])
        self.stats.reset()
        sums = state["kfac"]
        if trainer.is_global_zero:  # the saved sums are global: give them to one rank only
            self.stats.skipped_steps = sums.pop("__skipped__").to(device=self._device, dtype=torch.float64)
            self.stats.load_flat_tensors(
                [sums[name][key] for name in sorted(sums) for key in ("A_sum", "A_count", "S_sum", "S_count")]
            )
        if self.writer is not None and self.writer.num_rows < self.step:
            self._stop_recording(
                f"the trace holds {self.writer.num_rows} steps but the run resumes from step {self.step}: its "
                f"last steps were lost (recording stopped early in the original run, e.g. on a full disk)."
            )
        with self._recording():
            if self.writer is not None:
                self.writer.truncate(self.step, self.num_segments_closed, self.step)
                self.writer.flush()

    # ---------------------------------------------------------------------------- write faults
    @contextmanager
    def _recording(self) -> Iterator[None]:
        """Write to the trace; if a write fails (a full disk), stop recording and let training go on."""
        try:
            yield
        except TraceWriteError as err:
            self._stop_recording(str(err))

    def _stop_recording(self, reason: str) -> None:
        """Training continues; the trace keeps every write completed before the fault, nothing more is written.

        Only writing stops (only rank 0 writes). Under DDP every rank, this one included, keeps taking and
        reducing statistics and following the cadence's broadcasts, so every collective still matches (rank 0
        skipping one would leave the others waiting in it); a single process stops taking statistics.
        """
        if self.writer is not None:
            self.writer.abandon()  # a no-op on a writer whose failure already abandoned the file
        self.writer = None
        self._held.clear()
        self._stopped = True
        kept = self.num_segments_closed
        self._warnings.warn(
            f"TDACallback STOPPED RECORDING at optimizer step {self.step}: {reason} Training continues without "
            f"the callback; the trace holds {kept} closed segment{'s' if kept != 1 else ''}. Attribute with it as it "
            f"is, or free space and record again with a new trace path.",
        )

    # ------------------------------------------------------------------------------ loss check
    def _finish_loss_check(self) -> None:
        if self._loss_check is None or self._loss_check.done:
            return
        with self._cost.timed("loss_check"):
            result = self._loss_check.finish()
            (rank_zero_warn if result.warns else rank_zero_info)(f"TDACallback loss check: {result.message}")
            if self.writer is not None:
                with self._recording():  # flushed with the next checkpoint or segment
                    self.writer.record_loss_check(result.record())
