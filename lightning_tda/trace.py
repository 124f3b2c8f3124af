"""The trace store: one HDF5 file per run holding everything attribution needs.

Schema (version 1; see ``docs/trace-schema.md`` for the full description)::

    /                    attrs: format, schema_version, library_version, created, run_id
    /meta                attrs: model_class, task_class, fisher, every_n_steps, world_size,
                                dataset_size (-1 = unknown), checkpoint_dtype, sequence_mode
    /meta/optimizer      JSON string: optimizer class and per-group hyper-parameters
    /meta/config         JSON string: the callback's configuration
    /meta/loss_check     JSON string: list of the callback's Task-vs-training_step loss checks, one per fit
    /layers/names        tracked layer names, in order; /layers/<name> attrs: kind, in/out features,
                         has_bias, param_group (optimizer group of its weight)
    /steps/<column>      one row per optimizer step: step, global_step, epoch, segment, batch_size,
                         loss, statistics (1 if K-FAC statistics were taken), lr (n, param groups)
    /segments/<i>        attrs: index, start_step, end_step, num_steps, stats_steps, skipped_steps,
                                mean_lr, reason; kfac/<layer>/{A_sum, A_count, S_sum, S_count};
                                preconditioner/<layer>/v_mean (Adam second moments), attr count
    /checkpoints/initial full model state at the start of recording (step 0 of the trace)
    /checkpoints/<i>     trainable parameters and buffers; attrs: index, step, segment, epoch
    /results/<name>      attribution scores (written by :class:`lightning_tda.scores.Scores`)
    /cache/<slot>        fitted factors cached by attribution methods with cache="trace" (see storage.py)

Steps are counted by the recorder itself: ``step`` = number of optimizer steps completed when
the row was written (the first row has step 1); checkpoint ``step`` = parameters after that many
steps. The file is written with ``libver=("earliest", "v110")`` and flushed after every segment
close and checkpoint, so a killed process leaves a file that opens and holds everything flushed.
This module does not import Lightning.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor, nn

from lightning_tda.capture import DIAGONAL_INPUT_KINDS, TrackedLayer, layers_by_name
from lightning_tda.statistics import FACTORS

FORMAT = "lightning_tda.trace"
SCHEMA_VERSION = 1
LIBVER = ("earliest", "v110")
STEP_COLUMNS = ("step", "global_step", "epoch", "segment", "batch_size", "loss", "statistics")
_INT_COLUMNS = {"step", "global_step", "epoch", "segment", "batch_size", "statistics"}


class TraceError(RuntimeError):
    """A trace file cannot be used as asked (missing, corrupt, too new, or not matching the model)."""


def library_version() -> str:
    from lightning_tda import __version__

    return __version__


def _checkpoint_name(index: int) -> str:
    return f"{index:06d}"


def _segment_name(index: int) -> str:
    return f"{index:04d}"


def _json_default(value: Any) -> Any:
    if isinstance(value, (Tensor, np.ndarray)):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    return repr(value)


def to_json(value: Any) -> str:
    return json.dumps(value, default=_json_default, sort_keys=True)


def _store_array(group: h5py.Group, name: str, tensor: Tensor, dtype: str) -> None:
    """Store a tensor as a dataset; bfloat16 is stored as its uint16 bit pattern."""
    tensor = tensor.detach().cpu()
    if dtype == "bfloat16" and tensor.is_floating_point():
        data = tensor.to(torch.bfloat16).view(torch.uint16).numpy()
    elif dtype in ("float16", "float32") and tensor.is_floating_point():
        data = tensor.to(getattr(torch, dtype)).numpy()
    else:
        data = tensor.numpy()
    dataset = group.create_dataset(name, data=data)
    dataset.attrs["dtype"] = dtype if tensor.is_floating_point() and dtype != "native" else str(data.dtype)


def _load_array(dataset: h5py.Dataset) -> Tensor:
    data = torch.from_numpy(np.asarray(dataset[()]))
    if dataset.attrs.get("dtype") == "bfloat16":
        return data.view(torch.bfloat16).float()
    if data.is_floating_point() and data.dtype == torch.float16:
        return data.float()
    return data


# ----------------------------------------------------------------------------------------- writer


class TraceWriter:
    """Writes one trace file (rank 0 only). Knows nothing about Lightning.

    Args:
        path: file to create or continue.
        mode: ``"create"`` (refuse an existing file), ``"overwrite"`` or ``"append"`` (continue an
            existing trace; it must be a valid trace).
    """

    def __init__(self, path: str | os.PathLike, mode: str = "create") -> None:
        self.path = Path(path)
        directory = self.path.parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TraceError(f"Cannot create the trace directory {directory}: {err}. Choose a writable path.") from err
        if not os.access(directory, os.W_OK):
            raise TraceError(f"The trace directory {directory} is not writable. Choose a writable path.")
        exists = self.path.exists()
        if mode == "create" and exists:
            raise TraceError(
                f"A trace already exists at {self.path}; it is not overwritten. Pass a new path, "
                f"if_exists='overwrite' to replace it, or if_exists='append' to continue it."
            )
        if mode == "append" and exists:
            Trace.open(self.path)  # validates format and schema before writing into it
            self.file = h5py.File(self.path, "a", libver=LIBVER)
            self.created = False
        else:
            self.file = h5py.File(self.path, "w", libver=LIBVER)
            self.created = True

    # --- skeleton -------------------------------------------------------------------------------
    def write_header(
        self,
        run_id: str,
        meta: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        config: Mapping[str, Any],
        layers: Iterable[TrackedLayer],
        num_param_groups: int,
        layer_groups: Mapping[str, int] | None = None,
    ) -> None:
        """Create the file's skeleton and flush it."""
        f = self.file
        f.attrs.update(
            format=FORMAT,
            schema_version=SCHEMA_VERSION,
            library_version=library_version(),
            created=datetime.now(timezone.utc).isoformat(),
            run_id=run_id,
        )
        meta_group = f.create_group("meta")
        meta_group.attrs.update({k: v for k, v in meta.items()})
        meta_group.create_dataset("optimizer", data=to_json(optimizer))
        meta_group.create_dataset("config", data=to_json(config))
        layer_group = f.create_group("layers")
        layers = list(layers)
        layer_group.create_dataset("names", data=[layer.name for layer in layers], dtype=h5py.string_dtype())
        for layer in layers:
            g = layer_group.create_group(layer.name)
            g.attrs.update(
                kind=layer.kind,
                in_features=layer.in_features,
                out_features=layer.out_features,
                has_bias=layer.has_bias,
                param_group=(layer_groups or {}).get(layer.name, 0),
            )
        steps = f.create_group("steps")
        for column in STEP_COLUMNS:
            dtype = np.int64 if column in _INT_COLUMNS else np.float64
            steps.create_dataset(column, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(4096,))
        steps.create_dataset(
            "lr",
            shape=(0, num_param_groups),
            maxshape=(None, num_param_groups),
            dtype=np.float64,
            chunks=(1024, num_param_groups),
        )
        for name in ("segments", "checkpoints", "results", "cache"):
            f.create_group(name)
        self.flush()

    # --- appends --------------------------------------------------------------------------------
    def append_steps(self, rows: Mapping[str, np.ndarray]) -> None:
        """Append step-log rows (a block: every column an array of the same length)."""
        n = len(rows["step"])
        if n == 0:
            return
        steps = self.file["steps"]
        start = steps["step"].shape[0]
        for column in (*STEP_COLUMNS, "lr"):
            dataset = steps[column]
            dataset.resize(start + n, axis=0)
            dataset[start:] = np.asarray(rows[column])

    def write_segment(
        self,
        index: int,
        attrs: Mapping[str, Any],
        kfac: Mapping[str, Mapping[str, Tensor]],
        preconditioner: Mapping[str, tuple[Tensor, int]] | None = None,
    ) -> None:
        """Write a closed segment: attributes, K-FAC sums per layer, Adam second-moment means."""
        group = self.file["segments"].create_group(_segment_name(index))
        group.attrs.update(dict(attrs))
        kfac_group = group.create_group("kfac")
        for layer, sums in kfac.items():
            layer_group = kfac_group.create_group(layer)
            for key in FACTORS:
                layer_group.create_dataset(key, data=sums[key].detach().cpu().double().numpy())
        if preconditioner:
            pre_group = group.create_group("preconditioner")
            for layer, (v_mean, count) in preconditioner.items():
                g = pre_group.create_group(layer)
                g.create_dataset("v_mean", data=v_mean.detach().cpu().double().numpy())
                g.attrs["count"] = count

    def write_checkpoint(self, name: str, state: Mapping[str, Tensor], attrs: Mapping[str, Any], dtype: str) -> None:
        """Write a model state (``name`` = ``"initial"`` or a zero-padded index).

        Keys naming the same tensor (tied parameters: GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``)
        are stored once and hard-linked, so every name reads back the same values.
        """
        checkpoints = self.file["checkpoints"]
        if name in checkpoints:
            del checkpoints[name]
        group = checkpoints.create_group(name)
        group.attrs.update(dict(attrs))
        stored: dict[tuple, str] = {}
        for key, tensor in state.items():
            alias = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
            if tensor.numel() and alias in stored:
                group[key] = group[stored[alias]]
                continue
            _store_array(group, key, tensor, dtype)
            stored[alias] = key

    def record_loss_check(self, record: Mapping[str, Any]) -> None:
        """Add the result of the callback's loss check (:mod:`lightning_tda.loss_check`) to ``meta/loss_check``,
        replacing an earlier record of the same first step (a resumed fit that checked again)."""
        meta = self.file["meta"]
        records = [r for r in _json_records(meta, "loss_check") if r.get("first_step") != record.get("first_step")]
        records.append(dict(record))
        if "loss_check" in meta:
            del meta["loss_check"]
        meta.create_dataset("loss_check", data=to_json(records))

    # --- resume ---------------------------------------------------------------------------------
    def truncate(self, num_rows: int, num_segments: int, last_step: int) -> None:
        """Drop what was written after a Lightning checkpoint that a resumed run restarts from."""
        steps = self.file["steps"]
        for column in (*STEP_COLUMNS, "lr"):
            if steps[column].shape[0] > num_rows:
                steps[column].resize(num_rows, axis=0)
        for name in list(self.file["segments"]):
            if int(name) >= num_segments:
                del self.file["segments"][name]
        for name in list(self.file["checkpoints"]):
            if name != "initial" and int(self.file["checkpoints"][name].attrs["step"]) > last_step:
                del self.file["checkpoints"][name]

    @property
    def run_id(self) -> str | None:
        run_id = self.file.attrs.get("run_id")
        return None if run_id is None else str(run_id)

    @property
    def num_checkpoints(self) -> int:
        return sum(1 for name in self.file["checkpoints"] if name != "initial")

    @property
    def num_segments(self) -> int:
        return len(self.file["segments"])

    @property
    def num_rows(self) -> int:
        return int(self.file["steps"]["step"].shape[0])

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        if self.file.id.valid:
            self.file.flush()
            self.file.close()


# ----------------------------------------------------------------------------------------- reader


@dataclass(frozen=True)
class LayerInfo:
    """A tracked layer as recorded: gradient matrix shape is ``(out_features, in_features + has_bias)``;
    ``param_group`` is the optimizer param group holding its weight (its learning rate column)."""

    name: str
    kind: str
    in_features: int
    out_features: int
    has_bias: bool
    param_group: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features + int(self.has_bias))

    @property
    def input_factor_shape(self) -> tuple[int, ...]:
        """Shape of the recorded ``A_sum``: ``(a_dim,)`` (the diagonal) for embeddings, else ``(a_dim, a_dim)``."""
        a_dim = self.shape[1]
        return (a_dim,) if self.kind in DIAGONAL_INPUT_KINDS else (a_dim, a_dim)


@dataclass(frozen=True)
class SegmentInfo:
    """A closed segment covering optimizer steps ``start_step < step <= end_step``.

    ``mean_lr`` has one entry per optimizer param group; ``checkpoints`` lists the indices of the
    checkpoints taken inside the segment (the last one at ``end_step`` when recorded normally).
    """

    index: int
    start_step: int
    end_step: int
    num_steps: int
    stats_steps: int
    skipped_steps: int
    mean_lr: np.ndarray
    reason: str
    checkpoints: tuple[int, ...]


@dataclass(frozen=True)
class CheckpointInfo:
    """A stored model state: the parameters after ``step`` optimizer steps."""

    index: int
    step: int
    segment: int
    epoch: int


@dataclass(frozen=True)
class StepLog:
    """The per-optimizer-step log; every array has one entry per step (``lr``: ``(steps, groups)``)."""

    step: np.ndarray
    global_step: np.ndarray
    epoch: np.ndarray
    segment: np.ndarray
    batch_size: np.ndarray
    loss: np.ndarray
    statistics: np.ndarray
    lr: np.ndarray

    def __len__(self) -> int:
        return len(self.step)


class Trace:
    """Read-only view of a trace file. Small metadata is read at open; tensors on demand.

    Each accessor opens the file briefly, so results can be written into the same file by another
    handle (``Scores.save``) while a ``Trace`` object exists. Use :meth:`open`.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        with self._file() as f:
            attrs = dict(f.attrs)
            self.run_id = str(attrs["run_id"])
            self.schema_version = int(attrs["schema_version"])
            self.library_version = str(attrs["library_version"])
            self.meta = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f["meta"].attrs.items()}
            self.optimizer = json.loads(f["meta/optimizer"][()])
            self.config = json.loads(f["meta/config"][()])
            self.layers = [
                LayerInfo(
                    name=name,
                    kind=str(f["layers"][name].attrs["kind"]),
                    in_features=int(f["layers"][name].attrs["in_features"]),
                    out_features=int(f["layers"][name].attrs["out_features"]),
                    has_bias=bool(f["layers"][name].attrs["has_bias"]),
                    param_group=int(f["layers"][name].attrs.get("param_group", 0)),
                )
                for name in (n.decode() if isinstance(n, bytes) else n for n in f["layers/names"][()])
            ]
            self.checkpoints = sorted(
                (
                    CheckpointInfo(
                        index=int(g.attrs["index"]),
                        step=int(g.attrs["step"]),
                        segment=int(g.attrs["segment"]),
                        epoch=int(g.attrs["epoch"]),
                    )
                    for name, g in f["checkpoints"].items()
                    if name != "initial"
                ),
                key=lambda c: c.index,
            )
            self.segments = [self._segment_info(g) for _, g in sorted(f["segments"].items())]
            self.num_steps = int(f["steps/step"].shape[0])

    def _segment_info(self, group: h5py.Group) -> SegmentInfo:
        attrs = group.attrs
        index = int(attrs["index"])
        return SegmentInfo(
            index=index,
            start_step=int(attrs["start_step"]),
            end_step=int(attrs["end_step"]),
            num_steps=int(attrs["num_steps"]),
            stats_steps=int(attrs["stats_steps"]),
            skipped_steps=int(attrs["skipped_steps"]),
            mean_lr=np.asarray(attrs["mean_lr"], dtype=np.float64),
            reason=str(attrs["reason"]),
            checkpoints=tuple(c.index for c in self.checkpoints if c.segment == index),
        )

    @classmethod
    def open(cls, path: str | os.PathLike) -> Trace:
        """Open and validate a trace; raises :class:`TraceError` naming the problem and the fix."""
        path = Path(path)
        if not path.exists():
            raise TraceError(f"No trace at {path}. Check the path, or record one with TDACallback.")
        if not h5py.is_hdf5(path):
            raise TraceError(
                f"{path} is not an HDF5 file (truncated, or not a trace). Record a trace with TDACallback."
            )
        try:
            with h5py.File(path, "r") as f:
                fmt = f.attrs.get("format")
                version = f.attrs.get("schema_version")
        except OSError as err:
            raise TraceError(
                f"{path} could not be opened ({err}). It may be truncated, or still open for writing by a "
                f"running training process (HDF5 locks files being written); wait for training to end."
            ) from err
        if fmt != FORMAT:
            raise TraceError(f"{path} is an HDF5 file but not a lightning_tda trace (format attribute {fmt!r}).")
        if version is None or int(version) > SCHEMA_VERSION:
            raise TraceError(
                f"{path} has trace schema version {version}, newer than this lightning_tda supports "
                f"({SCHEMA_VERSION}). Upgrade lightning_tda to read it."
            )
        try:
            return cls(path)
        except (KeyError, OSError) as err:
            raise TraceError(
                f"{path} is an incomplete trace ({err}); it was probably cut off before its first flush."
            ) from err

    def _file(self) -> h5py.File:
        return h5py.File(self.path, "r")

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
        :class:`lightning_tda.loss_check.LossCheckResult`. Empty for traces recorded without it."""
        with self._file() as f:
            return _json_records(f["meta"], "loss_check")

    def steps(self) -> StepLog:
        """The full step log."""
        with self._file() as f:
            g = f["steps"]
            return StepLog(**{column: g[column][()] for column in (*STEP_COLUMNS, "lr")})

    def segment(self, index: int) -> SegmentInfo:
        for segment in self.segments:
            if segment.index == index:
                return segment
        raise TraceError(f"Segment {index} is not in {self.path}; it has segments {[s.index for s in self.segments]}.")

    # --- tensors --------------------------------------------------------------------------------
    def kfac_sums(self, segment: int, layer: str) -> dict[str, Tensor]:
        """Raw float64 sums ``A_sum, A_count, S_sum, S_count`` of ``layer`` in ``segment``."""
        with self._file() as f:
            group = f[f"segments/{_segment_name(segment)}/kfac/{layer}"]
            return {key: torch.from_numpy(np.asarray(group[key][()])) for key in FACTORS}

    def covariances(self, segment: int, layer: str) -> tuple[Tensor, Tensor]:
        """K-FAC factors ``(A, S)`` of ``layer`` in ``segment``: float64, ``(a_dim, a_dim)`` (its diagonal
        ``(a_dim,)`` for an embedding layer) and ``(out, out)``."""
        sums = self.kfac_sums(segment, layer)
        if sums["A_count"] == 0 or sums["S_count"] == 0:
            raise TraceError(
                f"Segment {segment} has no K-FAC statistics for layer {layer!r} (no statistics step fell "
                f"inside it). Record with a smaller every_n_steps, or use fewer segments."
            )
        return sums["A_sum"] / sums["A_count"], sums["S_sum"] / sums["S_count"]

    def preconditioner(self, segment: int, layer: str) -> Tensor | None:
        """Segment-mean Adam second moment ``v̂`` as a ``(out, a_dim)`` float64 matrix, or None."""
        with self._file() as f:
            key = f"segments/{_segment_name(segment)}/preconditioner/{layer}/v_mean"
            return torch.from_numpy(np.asarray(f[key][()])) if key in f else None

    def initial_state(self) -> dict[str, Tensor]:
        """The full model state at the start of recording."""
        with self._file() as f:
            return {key: _load_array(ds) for key, ds in f["checkpoints/initial"].items()}

    def checkpoint_state(self, index: int) -> dict[str, Tensor]:
        """Full model state of checkpoint ``index`` (initial state overlaid with its stored tensors)."""
        state = self.initial_state()
        with self._file() as f:
            name = _checkpoint_name(index)
            if name not in f["checkpoints"]:
                raise TraceError(f"Checkpoint {index} is not in {self.path}.")
            for key, ds in f["checkpoints"][name].items():
                reference = state.get(key)
                value = _load_array(ds)
                state[key] = value.to(reference.dtype) if reference is not None else value
        return state

    def load_checkpoint(self, model: nn.Module, index: int) -> nn.Module:
        """Load checkpoint ``index`` into ``model`` (strictly: keys must match) and return it."""
        state = self.checkpoint_state(index)
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

    def summary(self) -> str:
        """A human-readable summary (what ``lightning-tda inspect`` prints)."""
        steps = self.steps()
        lines = [
            f"trace {self.path}  ({self.path.stat().st_size / 1e6:.2f} MB)",
            f"  run {self.run_id}, schema v{self.schema_version}, written by lightning_tda {self.library_version}",
            f"  model {self.meta.get('model_class')}, task {self.meta.get('task_class')}, "
            f"fisher={self.fisher}, statistics every {self.meta.get('every_n_steps')} step(s), "
            f"world size {self.meta.get('world_size')}",
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
            lines.append(f"    {layer.name}: {layer.kind} {layer.shape[0]}x{layer.shape[1]}")
        checks = self.loss_checks()
        if not checks:
            lines.append("  loss check: not recorded (a trace from before the check, or loss_check_steps=0)")
        for check in checks:
            verdict, message = check.get("verdict"), check.get("message")
            lines.append(f"  loss check (from step {check.get('first_step')}): {verdict}: {message}")
        with self._file() as f:
            for title, name in (("results", "results"), ("cache inside the trace", "cache")):
                entries = [(key, stored_bytes(item)) for key, item in f[name].items()] if name in f else []
                if entries:
                    listed = ", ".join(f"{key} {size / 1e6:.2f} MB" for key, size in entries)
                    lines.append(f"  {title}: {listed} ({sum(size for _, size in entries) / 1e6:.2f} MB in all)")
        return "\n".join(lines)


def _json_records(group: h5py.Group, name: str) -> list[dict[str, Any]]:
    """A JSON list of records stored as a string dataset; records that are not JSON objects are dropped."""
    if name not in group or not isinstance(group[name], h5py.Dataset):
        return []
    raw = group[name][()]
    try:
        value = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
    except ValueError as err:
        raise TraceError(f"{group.file.filename}: {group.name}/{name} is not valid JSON ({err}).") from err
    return [record for record in value if isinstance(record, dict)] if isinstance(value, list) else []


def stored_bytes(item: h5py.Group | h5py.Dataset) -> int:
    """Bytes the datasets of ``item`` (recursively) occupy in the file (HDF5 metadata not counted)."""
    if isinstance(item, h5py.Dataset):
        return item.id.get_storage_size()
    return sum(stored_bytes(child) for child in item.values() if isinstance(child, (h5py.Group, h5py.Dataset)))
