"""Reading a trace: :class:`Trace`, a read-only view that validates a file when it opens and each tensor
before it is used. It knows nothing about Lightning; ``lightning-tda inspect`` prints :meth:`Trace.summary`.

A trace from elsewhere is first parsed by a forked child (:mod:`lightning_tda.trace.probe`), so that HDF5
hanging or crashing on a hostile file cannot take this process along; then every record is checked
(:mod:`lightning_tda.trace.records`) before anything is allocated from it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor, nn

from lightning_tda.layers.covariances import FACTORS
from lightning_tda.layers.tracked import TrackedLayer, layers_by_name
from lightning_tda.trace.checks import TraceError, TraceReader, expect_int, expect_str
from lightning_tda.trace.lock import writer_of
from lightning_tda.trace.probe import parse_in_child
from lightning_tda.trace.records import (
    CheckpointInfo,
    LayerInfo,
    SegmentInfo,
    StepLog,
    check_covariance,
    describe_cost,
    load_array,
    loss_check_records,
    read_checkpoints,
    read_layers,
    read_meta,
    read_optimizer,
    read_segments,
    recording_cost_records,
    state_shapes,
    step_log_shape,
    stored_bytes,
)
from lightning_tda.trace.schema import (
    ARCHITECTURE,
    FORMAT,
    INT_COLUMNS,
    SCHEMA_VERSION,
    STEP_COLUMNS,
    checkpoint_name,
    segment_name,
)


class Trace:
    """Read-only view of a trace file. Metadata is read and validated at open; tensors on demand.

    Each accessor opens the file briefly, so results can be written into the same file by another
    handle (``Scores.save``) while a ``Trace`` object exists. Use :meth:`open`.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        with self._read(check_run=False) as r:
            self._read_header(r)
            r.check_structure()
            self.num_steps, self.num_param_groups = step_log_shape(r)
            self.optimizer = read_optimizer(r, self.num_param_groups)
            self.config = r.json("meta/config", dict)
            self.layers = read_layers(r, self.num_param_groups)
            segments = read_segments(r, self.num_steps, self.num_param_groups)
            self.checkpoints = read_checkpoints(r, segments, self.num_steps)
        self.segments = [
            SegmentInfo(**fields, checkpoints=tuple(c.index for c in self.checkpoints if c.segment == fields["index"]))
            for fields in segments
        ]

    def _read_header(self, r: TraceReader) -> None:
        root = r.attributes("")
        if root.get("format") != FORMAT:
            raise TraceError(
                f"{self.path} is an HDF5 file but not a lightning_tda trace (format attribute {root.get('format')!r})."
            )
        version = expect_int(r, "/ attribute 'schema_version'", root.get("schema_version"), 1)
        if version > SCHEMA_VERSION:
            raise TraceError(
                f"{self.path} has trace schema version {version}, newer than this lightning_tda supports "
                f"({SCHEMA_VERSION}). Upgrade lightning_tda to read it."
            )
        self.schema_version = version
        self.run_id = expect_str(r, "/ attribute 'run_id'", root.get("run_id"))
        self.library_version = expect_str(r, "/ attribute 'library_version'", root.get("library_version"))
        self.meta = read_meta(r)

    @classmethod
    def open(cls, path: str | os.PathLike) -> Trace:
        """Open and validate a trace; raises :class:`TraceError` naming the problem and the fix."""
        path = Path(path)
        if not path.exists():
            raise TraceError(f"No trace at {path}. Check the path, or record one with TDACallback.")
        holder = writer_of(path)
        if holder is not None:
            raise TraceError(
                f"The trace {path} is being written by {holder}. It cannot be read until that process "
                f"finishes (a file being written is not consistent); open it after training ends."
            )
        return cls.validated(path)

    @classmethod
    def validated(cls, path: str | os.PathLike) -> Trace:
        """Open and validate without checking for a writer (for the writer itself, which holds the lock)."""
        path = Path(path)
        if not path.is_file() or not h5py.is_hdf5(path):
            raise TraceError(
                f"{path} is not an HDF5 file (truncated, or not a trace). Record a trace with TDACallback."
            )
        parse_in_child(path)  # a file from elsewhere: HDF5 hanging or crashing on it must not take us along
        return cls(path)

    @contextmanager
    def _read(self, check_run: bool = True) -> Iterator[TraceReader]:
        """The file, open for checked reads; refuses a file replaced by another run since it was opened."""
        try:
            file = h5py.File(self.path, "r")
        except (OSError, RuntimeError, ValueError) as err:
            holder = writer_of(self.path)
            reason = f"it is being written by {holder}" if holder else "it may be truncated, or still open for writing"
            raise TraceError(
                f"{self.path} could not be opened ({str(err)[:300]}); {reason}. A trace being written can be "
                f"read once training ends."
            ) from err
        try:
            reader = TraceReader(file, self.path)
            if check_run:
                run_id = reader.attribute("", "run_id")
                if run_id != self.run_id:
                    raise TraceError(
                        f"{self.path} now holds run {run_id!r}, not the run {self.run_id!r} it held when opened "
                        f"(the file was replaced). Open it again."
                    )
            yield reader
        finally:
            try:
                file.close()
            except (OSError, RuntimeError, ValueError):
                pass

    # --- metadata -------------------------------------------------------------------------------
    @property
    def fisher(self) -> str:
        return str(self.meta["fisher"])

    @property
    def dataset_size(self) -> int | None:
        size = int(self.meta.get("dataset_size", -1))
        return None if size < 0 else size

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def optimizer_class(self) -> str:
        return str(self.optimizer["class"])

    @property
    def final_checkpoint(self) -> CheckpointInfo:
        if not self.checkpoints:
            raise TraceError(f"{self.path} holds no checkpoints; training recorded no optimizer step.")
        return max(self.checkpoints, key=lambda c: c.step)

    def loss_checks(self) -> list[dict[str, Any]]:
        """The callback's loss checks, one record per fit (``verdict``, ``message``, numbers); see
        :class:`lightning_tda.recording.loss_check.LossCheckResult`. Empty for traces recorded without it."""
        with self._read() as r:
            return loss_check_records(r)

    def recording_costs(self) -> list[dict[str, Any]]:
        """What recording cost, one record per fit: ``first_step``, ``last_step``, ``training_seconds`` and
        ``seconds`` per kind (:data:`~lightning_tda.trace.schema.COST_KINDS`), checked. Empty for traces
        recorded before the cost was."""
        with self._read() as r:
            return recording_cost_records(r)

    def steps(self) -> StepLog:
        """The full step log, its values checked (steps 1..n, non-negative finite learning rates...)."""
        n, groups = self.num_steps, self.num_param_groups
        with self._read() as r:
            columns = {
                column: r.array(f"steps/{column}", [(n,)], kinds="iu" if column in INT_COLUMNS else "fiu")
                for column in STEP_COLUMNS
            }
            columns["lr"] = r.array("steps/lr", [(n, groups)], kinds="fiu")
        columns = {k: v.astype(np.int64 if k in INT_COLUMNS else np.float64, copy=False) for k, v in columns.items()}
        problems = {
            "step": ("counts 1, 2, ..., n", not np.array_equal(columns["step"], np.arange(1, n + 1))),
            "lr": (
                "holds finite, non-negative learning rates",
                not (np.isfinite(columns["lr"]).all() and (columns["lr"] >= 0).all()),
            ),
            "segment": (
                "holds non-decreasing segment indices from 0",
                bool(n) and (columns["segment"][0] < 0 or (np.diff(columns["segment"]) < 0).any()),
            ),
            "statistics": ("holds 0 or 1", not np.isin(columns["statistics"], (0, 1)).all()),
        }
        for column in ("global_step", "epoch", "batch_size"):
            problems[column] = ("holds non-negative integers", bool((columns[column] < 0).any()))
        for column, (expected, wrong) in problems.items():
            if wrong:
                raise r.error(f"steps/{column}", f"is not as recorded: expected a column that {expected}")
        return StepLog(**columns)

    def segment(self, index: int) -> SegmentInfo:
        for segment in self.segments:
            if segment.index == index:
                return segment
        raise TraceError(f"Segment {index} is not in {self.path}; it has segments {[s.index for s in self.segments]}.")

    def layer(self, name: str) -> LayerInfo:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise TraceError(f"Layer {name!r} is not tracked in {self.path}; it tracks {self.layer_names}.")

    # --- tensors --------------------------------------------------------------------------------
    def kfac_sums(self, segment: int, layer: str) -> dict[str, Tensor]:
        """Raw sums ``A_sum, A_count, S_sum, S_count`` of ``layer`` in ``segment``, checked (shapes from the
        layer record, finite, symmetric, non-negative counts and variances to rounding) and returned as float64
        (they are stored as float32 or float64); the sum of a factor the callback did not record is absent. A
        segment without statistics steps stores none: its sums and counts are zeros."""
        info = self.layer(layer)
        shapes = info.factor_shapes()
        statistics_steps = self.segment(segment).stats_steps
        where = f"segments/{segment_name(segment)}/kfac/{layer}"
        keys = [k for k in FACTORS if (k, False) not in (("A_sum", info.A_recorded), ("S_sum", info.S_recorded))]
        with self._read() as r:
            if not r.has(where):
                if statistics_steps == 0:  # not written: every sum is zero
                    return {key: torch.zeros(shapes[key][0], dtype=torch.float64) for key in keys}
                raise r.error(where, f"is missing: segment {segment} holds no K-FAC sums for layer {layer!r}")
            sums = {key: r.array(f"{where}/{key}", shapes[key], kinds="f", finite=True) for key in keys}
        for key, value in sums.items():
            if key.endswith("_count") and value < 0:
                raise r.error(f"{where}/{key}", f"is {float(value)}, expected a non-negative count")
            if key.endswith("_sum"):
                check_covariance(r, f"{where}/{key}", value)
        return {key: torch.from_numpy(value.astype(np.float64, copy=False)) for key, value in sums.items()}

    def covariances(self, segment: int, layer: str) -> tuple[Tensor, Tensor]:
        """K-FAC factors ``(A, S)`` of ``layer`` in ``segment``: float64, ``(a_dim, a_dim)`` (its diagonal
        ``(a_dim,)`` for an embedding layer) and ``(out, out)``.

        Raises :class:`TraceError` naming the option to record them when the trace does not hold both
        (a factor far larger than its layer is left out by default: ``TDACallback(max_factor_ratio=...)``).
        """
        sums = self.kfac_sums(segment, layer)
        missing = [factor for factor in ("A", "S") if f"{factor}_sum" not in sums]
        if missing:
            info = next((la for la in self.layers if la.name == layer), None)
            shape = f" (gradient matrix {info.shape[0]}x{info.shape[1]})" if info is not None else ""
            raise TraceError(
                f"The trace {self.path} holds no K-FAC factor {' or '.join(missing)} for layer {layer!r}{shape}: "
                f"it has far more entries than the layer has parameters, so the callback did not record it "
                f"(max_factor_ratio={self.meta.get('max_factor_ratio')}). Methods that need recorded factors "
                f"(SOURCE, EK-FAC with covariances='stream') cannot use this layer: record with "
                f"TDACallback(max_factor_ratio=None) to keep every factor, leave the layer out (layers=/exclude=), "
                f"or use a method that recomputes or does not need them (EK-FAC covariances='recompute', DataInf)."
            )
        if sums["A_count"] == 0 or sums["S_count"] == 0:
            raise TraceError(
                f"Segment {segment} has no K-FAC statistics for layer {layer!r} (no statistics step fell inside "
                f"it: the overhead budget afforded none, or every_n_steps was larger than the segment). Recompute "
                f"them at the checkpoints (covariances='recompute'; SOURCE's default 'auto' does), or record with "
                f"TDACallback(strict_budget=False), a smaller every_n_steps or fewer segments."
            )
        return sums["A_sum"] / sums["A_count"], sums["S_sum"] / sums["S_count"]

    def preconditioner(self, segment: int, layer: str) -> Tensor | None:
        """Segment-mean Adam second moment ``v̂`` as a ``(out, a_dim)`` float64 matrix, or None."""
        return self._second_moments(f"segments/{segment_name(segment)}/preconditioner/{layer}/v_mean", layer)

    def checkpoint_preconditioner(self, index: int, layer: str) -> Tensor | None:
        """Adam's bias-corrected second moment ``v̂`` of ``layer`` behind checkpoint ``index`` (the state after
        that step's update, from which its preconditioner ``1/(√v̂ + ε)`` follows), as a float64 ``(out, a_dim)``
        matrix in the layer's gradient-matrix layout; ``None`` for optimizers without second moments and for
        traces recorded before they were stored."""
        if index not in {c.index for c in self.checkpoints}:
            raise TraceError(f"Checkpoint {index} is not in {self.path}; it has {[c.index for c in self.checkpoints]}.")
        return self._second_moments(f"second_moments/{checkpoint_name(index)}/{layer}", layer)

    def _second_moments(self, where: str, layer: str) -> Tensor | None:
        """The ``v̂`` matrix stored at ``where`` (checked: the layer's shape, finite, non-negative) as float64."""
        shape = self.layer(layer).shape
        with self._read() as r:
            if not r.has(where):
                return None
            v_hat = r.array(where, [shape], kinds="f", finite=True)
        if (v_hat < 0).any():
            raise r.error(where, "holds negative second moments")
        return torch.from_numpy(v_hat.astype(np.float64, copy=False))

    def initial_state(self, like: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The full model state at the start of recording (``like``: see :meth:`checkpoint_state`)."""
        with self._read() as r:
            shapes = state_shapes(r, like)
            return {key: load_array(r, f"checkpoints/initial/{key}", shape) for key, shape in shapes.items()}

    def checkpoint_state(self, index: int, like: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Full model state of checkpoint ``index`` (initial state overlaid with its stored tensors).

        Every stored tensor's key and shape are checked before it is read: against ``like`` (a model's
        ``state_dict()``) when given, else against the initial state's.
        """
        if index not in {c.index for c in self.checkpoints}:
            raise TraceError(f"Checkpoint {index} is not in {self.path}; it has {[c.index for c in self.checkpoints]}.")
        where = f"checkpoints/{checkpoint_name(index)}"
        with self._read() as r:
            shapes = state_shapes(r, like)
            state = {key: load_array(r, f"checkpoints/initial/{key}", shape) for key, shape in shapes.items()}
            for key in r.members(where):
                if key not in shapes:
                    owner = "the given model" if like is not None else "the initial state"
                    raise r.error(
                        f"{where}/{key}", f"does not fit {owner}, which has no such tensor", hint=ARCHITECTURE
                    )
                state[key] = load_array(r, f"{where}/{key}", shapes[key]).to(state[key].dtype)
        return state

    def load_checkpoint(self, model: nn.Module, index: int) -> nn.Module:
        """Load checkpoint ``index`` into ``model`` (strictly: keys must match) and return it."""
        state = self.checkpoint_state(index, like=model.state_dict())
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise TraceError(
                f"Checkpoint {index} of {self.path} does not fit the given model "
                f"({type(model).__name__}): {str(err).splitlines()[0]} Pass an instance of the trained "
                f"architecture ({self.meta.get('model_class')})."
            ) from err
        return model

    def tracked_layers(self, model: nn.Module) -> list[TrackedLayer]:
        """The trace's layers on ``model``; raises :class:`TraceError` if they do not match."""
        try:
            layers = layers_by_name(model, self.layer_names)
        except ValueError as err:
            raise TraceError(
                f"{err} The trace {self.path} was recorded for {self.meta.get('model_class')}; pass that architecture."
            ) from err
        for layer, info in zip(layers, self.layers):
            if layer.shape != info.shape or layer.kind != info.kind:
                raise TraceError(
                    f"Layer {info.name!r} has shape {layer.shape} ({layer.kind}) in the model but "
                    f"{info.shape} ({info.kind}) in the trace {self.path}; pass the trained architecture."
                )
        return layers

    def _cadence_summary(self) -> str:
        every = self.meta.get("every_n_steps")
        dtype = self.meta.get("factor_dtype", "float64")
        dtype = "float32 factors from 256 wide, float64 below" if dtype == "auto" else f"{dtype} factors"
        if every == "auto":
            return (
                f"statistics steps within a {float(self.meta['overhead_budget']):.0%} overhead budget (at least "
                f"{self.meta.get('min_statistics_steps')} per segment), {dtype}"
            )
        return f"statistics every {every} step(s), {dtype}"

    def summary(self) -> str:
        """A human-readable summary (what ``lightning-tda inspect`` prints)."""
        steps = self.steps()
        lines = [
            f"trace {self.path}  ({self.path.stat().st_size / 1e6:.2f} MB)",
            f"  run {self.run_id}, schema v{self.schema_version}, written by lightning_tda {self.library_version}",
            f"  model {self.meta.get('model_class')}, task {self.meta.get('task_class')}, "
            f"fisher={self.fisher}, {self._cadence_summary()}, world size {self.meta.get('world_size')}",
            f"  optimizer {self.optimizer_class}, dataset size {self.dataset_size or 'unknown'}",
            f"  {len(steps)} optimizer steps",
        ]
        if len(steps):
            lr = steps.lr
            lines.append(
                f"  learning rate from {lr.min():.4g} to {lr.max():.4g}; "
                f"loss {steps.loss[0]:.4g} -> {steps.loss[-1]:.4g}"
            )
        lines.append(f"  {len(self.segments)} segment(s):")
        for s in self.segments:
            lines.append(
                f"    #{s.index}: steps {s.start_step + 1}-{s.end_step} ({s.num_steps}), mean lr "
                f"{np.array2string(s.mean_lr, precision=4)}, {s.stats_steps} statistics steps"
                f"{f' ({s.skipped_steps} skipped: non-finite)' if s.skipped_steps else ''}, "
                f"checkpoints {list(s.checkpoints)}, closed: {s.reason}"
            )
        lines.append(f"  {len(self.layers)} tracked layer(s):")
        for layer in self.layers:
            missing = [factor for factor, kept in (("A", layer.A_recorded), ("S", layer.S_recorded)) if not kept]
            note = f" (factor {' and '.join(missing)} not recorded: too large for max_factor_ratio)" if missing else ""
            lines.append(f"    {layer.name}: {layer.kind} {layer.shape[0]}x{layer.shape[1]}{note}")
        checks = self.loss_checks()
        if not checks:
            lines.append("  loss check: not recorded (a trace from before the check, or loss_check_steps=0)")
        for check in checks:
            verdict, message = check.get("verdict"), check.get("message")
            lines.append(f"  loss check (from step {check.get('first_step')}): {verdict}: {message}")
        for cost in self.recording_costs():
            covered = f"steps {cost['first_step'] + 1}-{cost['last_step']}"
            lines.append(f"  recording cost ({covered}): {describe_cost(cost)}")
        with self._read() as r:
            for title, name in (("results", "results"), ("cache inside the trace", "cache")):
                keys = r.members(name) if r.has(name) else []
                entries = []
                for key in keys:
                    with r.part(f"{name}/{key}"):
                        entries.append((key, stored_bytes(r.node(f"{name}/{key}"))))
                if entries:
                    listed = ", ".join(f"{key} {size / 1e6:.2f} MB" for key, size in entries)
                    lines.append(f"  {title}: {listed} ({sum(size for _, size in entries) / 1e6:.2f} MB in all)")
        return "\n".join(lines)
