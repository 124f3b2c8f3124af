"""The trace store: one HDF5 file per run holding everything attribution needs.

Schema (version 2; see ``docs/trace-schema.md`` for the full description)::

    /                    attrs: format, schema_version, library_version, created, run_id
    /meta                attrs: model_class, task_class, fisher, every_n_steps ("auto" or n),
                                overhead_budget, min_statistics_steps, world_size, dataset_size
                                (-1 = unknown), checkpoint_dtype, factor_dtype, max_factor_ratio
                                (-1 = every factor), sequence_mode
    /meta/optimizer      JSON string: optimizer class and per-group hyper-parameters
    /meta/config         JSON string: the callback's configuration
    /meta/loss_check     JSON string: list of the callback's Task-vs-training_step loss checks, one per fit
    /layers/names        tracked layer names, in order; /layers/<name> attrs: kind, in/out features,
                         has_bias, param_group (optimizer group of its weight), A_recorded,
                         S_recorded (whether its K-FAC factors are in the segments)
    /steps/<column>      one row per optimizer step: step, global_step, epoch, segment, batch_size,
                         loss, statistics (1 if K-FAC statistics were taken), lr (n, param groups)
    /segments/<i>        attrs: index, start_step, end_step, num_steps, stats_steps, skipped_steps,
                                mean_lr, reason; kfac/<layer>/{A_sum, A_count, S_sum, S_count}
                                (float32 or float64 sums; an unrecorded factor's sum is absent);
                                preconditioner/<layer>/v_mean (Adam second moments), attr count
    /checkpoints/initial full model state at the start of recording (step 0 of the trace)
    /checkpoints/<i>     trainable parameters and buffers; attrs: index, step, segment, epoch
    /results/<name>      attribution scores (written by :class:`lightning_tda.scores.Scores`)
    /cache/<slot>        fitted factors cached by attribution methods with cache="trace" (see storage.py)

Steps are counted by the recorder itself: ``step`` = number of optimizer steps completed when
the row was written (the first row has step 1); checkpoint ``step`` = parameters after that many
steps. Version 1 traces (float64 sums, every factor, no recorded-factor attributes) still read.
The file is written with ``libver=("earliest", "v110")`` and flushed after every segment
close and checkpoint, so a killed process leaves a file that opens and holds everything flushed.
One process writes a trace at a time (:mod:`lightning_tda.trace_lock`); a write that fails (a full
disk) is detected before it touches the file, which keeps every write completed before it.

A trace is untrusted input: :class:`Trace` reads it only through
:class:`~lightning_tda.trace_checks.TraceReader`, validates the metadata, layer records, segments,
checkpoint records and step-log shapes when it opens, and each tensor's shape, type and values before
using it, against the layer records (and the model when one is given). Anything else is a
:class:`TraceError` naming the part of the file. This module does not import Lightning.
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
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
from lightning_tda.trace_checks import (
    TraceError,
    TraceReader,
    expect_bool,
    expect_float,
    expect_floats,
    expect_int,
    expect_str,
)
from lightning_tda.trace_lock import TraceLock, writer_of
from lightning_tda.trace_probe import is_parsed, mark_parsed, parse_in_child

FORMAT = "lightning_tda.trace"
SCHEMA_VERSION = 2
LIBVER = ("earliest", "v110")
STEP_COLUMNS = ("step", "global_step", "epoch", "segment", "batch_size", "loss", "statistics")
_INT_COLUMNS = {"step", "global_step", "epoch", "segment", "batch_size", "statistics"}


MAX_LAYERS = 100_000
MAX_PARAM_GROUPS = 10_000
MAX_FEATURES = 2**31 - 1
ARCHITECTURE = "Pass an instance of the architecture the trace was recorded with (its meta attribute model_class)."
WRITE_LOCK_TIMEOUT = 30.0  # seconds a short write (scores, caches) waits for another writer
WRITE_MARGIN = 64 << 10  # bytes reserved beyond each write's estimate (HDF5's own bookkeeping)
OBJECT_OVERHEAD = 4 << 10  # bytes reserved per group or dataset a write creates


class TraceWriteError(TraceError):
    """Writing the trace failed (a full disk, an I/O error); the file keeps every write completed before."""


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
    if dtype == "bfloat16" and tensor.is_floating_point():  # every other dtype is numpy's own
        dataset.attrs["dtype"] = dtype


def _load_array(reader: TraceReader, where: str, shape: tuple[int, ...] | None) -> Tensor:
    """A stored state tensor (bfloat16 from its uint16 bit pattern), its shape checked before it is read."""
    bfloat16 = reader.attribute(where, "dtype") == "bfloat16"
    with reader.part(where):
        stored = reader.dataset(where).dtype
    if bfloat16 and stored != np.uint16:
        raise reader.error(where, f"is marked bfloat16 but stored as {stored}, expected its uint16 bit pattern")
    data = torch.from_numpy(reader.array(where, None if shape is None else [shape], kinds="u" if bfloat16 else "fiub"))
    if bfloat16:
        return data.view(torch.bfloat16).float()
    if data.dtype == torch.float16:
        return data.float()
    return data


def _write_guarded(method: Callable) -> Callable:
    """Turn an I/O failure of a :class:`TraceWriter` method into :class:`TraceWriteError`, after closing
    the file with every write completed before the failure (see :meth:`TraceWriter.abandon`)."""

    @functools.wraps(method)
    def guarded(self: TraceWriter, *args: Any, **kwargs: Any) -> Any:
        if self.failed is not None:
            raise TraceWriteError(
                f"The trace {self.path} is no longer written (an earlier write failed: {self.failed})."
            )
        try:
            return method(self, *args, **kwargs)
        except TraceError:
            raise
        except (OSError, RuntimeError) as err:  # what h5py raises for write errors (ENOSPC, EIO, ...)
            self.failed = err
            kept = "nothing (it is removed)" if self.abandon() else "every write completed before the fault"
            raise TraceWriteError(
                f"Writing the trace {self.path} failed ({str(err)[:300]}); the file keeps {kept}."
            ) from err

    return guarded


def reserve_space(file: h5py.File, extra: int = 0) -> None:
    """Allocate on disk the space HDF5 has assigned in ``file`` plus ``extra`` bytes, before it writes.

    HDF5 assigns an object's space when it creates it and writes the bytes then or at the next flush.
    A write that fails halfway (a full disk) leaves a superblock pointing past the end of the file,
    which then no longer opens (measured: ``truncated file: eof < stored_eof``). With the space taken
    first, a full disk fails here, before this write touches the file. Each write reserves an estimate
    of what it adds (data, plus ``OBJECT_OVERHEAD`` per object and ``WRITE_MARGIN``); only the blocks
    past the file's current end are allocated (everything before it was reserved or written already),
    which keeps this cheap even where the C library emulates ``posix_fallocate`` block by block.
    """
    if not hasattr(os, "posix_fallocate"):
        return
    descriptor = file.id.get_vfd_handle()
    end, target = os.fstat(descriptor).st_size, file.id.get_filesize() + extra + WRITE_MARGIN
    if target <= end:
        return
    try:
        os.posix_fallocate(descriptor, end, target - end)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # a file system without it
            raise


def release_reserve(file: h5py.File) -> None:
    """After a flush, give back the reserved space HDF5 did not use: the file ends where HDF5's allocation
    does, so rewriting results in place leaves its size unchanged."""
    descriptor, end = file.id.get_vfd_handle(), file.id.get_filesize()
    if os.fstat(descriptor).st_size > end:
        os.ftruncate(descriptor, end)


def close_after_failure(file: h5py.File) -> None:
    """Close ``file`` after a failed write, ignoring further errors.

    A failure from :func:`reserve_space` comes before its write touched the file, and everything HDF5
    has allocated is already reserved, so closing writes the earlier, completed writes into reserved
    space: the file holds each of them whole and opens. A failure inside HDF5 itself (an I/O error no
    reservation foresees, or a file system without ``posix_fallocate``) can leave a file that no
    longer opens. (Redirecting the descriptor to ``/dev/null`` instead made HDF5 crash on close.)
    """
    if file.id.valid:
        try:
            file.close()
        except (OSError, RuntimeError, ValueError):
            pass


@contextmanager
def writing(path: str | os.PathLike, estimate: int) -> Iterator[h5py.File]:
    """``path`` opened for a short write (scores, caches): under the writer lock, ``estimate`` bytes
    reserved first (a full disk fails there, before anything is written), flushed and closed at the end.
    An I/O error, including one from HDF5 closing a damaged file, raises :class:`TraceWriteError`."""
    path = Path(path)
    with TraceLock(path, timeout=WRITE_LOCK_TIMEOUT):
        known = is_parsed(path) or not path.exists()  # a file we parsed or create: still known after our write
        try:
            file = h5py.File(path, "a", libver=LIBVER)
        except (OSError, RuntimeError) as err:
            raise TraceWriteError(f"{path} could not be opened for writing ({str(err)[:300]}).") from err
        try:
            reserve_space(file, estimate)
            yield file
            reserve_space(file)
            file.flush()
            release_reserve(file)
            file.close()
            if known:
                mark_parsed(path)
        except TraceError:
            close_after_failure(file)
            raise
        except (OSError, RuntimeError) as err:
            close_after_failure(file)
            raise TraceWriteError(f"Writing into {path} failed ({str(err)[:300]}).") from err
        except BaseException:
            close_after_failure(file)
            raise


def _nbytes(arrays: Iterable[Tensor | np.ndarray], objects: int, itemsize: int | None = None) -> int:
    """Bytes a write adds: the arrays' data (at ``itemsize`` bytes per element if given) and object headers."""
    total = 0
    for array in arrays:
        count = array.numel() if isinstance(array, Tensor) else array.size
        size = itemsize or (array.element_size() if isinstance(array, Tensor) else array.itemsize)
        total += count * size
    return total + OBJECT_OVERHEAD * objects


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
        self.failed: BaseException | None = None
        self.flushed = False
        directory = self.path.parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TraceError(f"Cannot create the trace directory {directory}: {err}. Choose a writable path.") from err
        if not os.access(directory, os.W_OK):
            raise TraceError(f"The trace directory {directory} is not writable. Choose a writable path.")
        self.lock = TraceLock(self.path)
        self.lock.acquire(timeout=2.0)  # before anything opens (and "w" truncates) the file
        try:
            exists = self.path.exists()
            if mode == "create" and exists:
                raise TraceError(
                    f"A trace already exists at {self.path}; it is not overwritten. Pass a new path, "
                    f"if_exists='overwrite' to replace it, or if_exists='append' to continue it."
                )
            if mode == "append" and exists:
                Trace.validated(self.path)  # format, schema and records checked before writing into it
                self.file = h5py.File(self.path, "a", libver=LIBVER)
                self.created = False
            else:
                self.file = h5py.File(self.path, "w", libver=LIBVER)
                self.created = True
        except BaseException:
            self.lock.release()
            raise
        self._step_datasets: dict[str, tuple[h5py.Dataset, int, int]] | None = None

    # --- skeleton -------------------------------------------------------------------------------
    @_write_guarded
    def write_header(
        self,
        run_id: str,
        meta: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        config: Mapping[str, Any],
        layers: Iterable[TrackedLayer],
        num_param_groups: int,
        layer_groups: Mapping[str, int] | None = None,
        recorded: Mapping[str, tuple[bool, bool]] | None = None,
    ) -> None:
        """Create the file's skeleton and flush it. ``recorded[name]`` says whether the layer's ``(A, S)``
        factors are recorded (default both)."""
        f = self.file
        layers = list(layers)
        reserve_space(f, len(to_json(optimizer)) + len(to_json(config)) + OBJECT_OVERHEAD * (2 * len(layers) + 20))
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
        layer_group.create_dataset("names", data=[layer.name for layer in layers], dtype=h5py.string_dtype())
        for layer in layers:
            g = layer_group.create_group(layer.name)
            g.attrs.update(
                kind=layer.kind,
                in_features=layer.in_features,
                out_features=layer.out_features,
                has_bias=layer.has_bias,
                param_group=(layer_groups or {}).get(layer.name, 0),
                A_recorded=(recorded or {}).get(layer.name, (True, True))[0],
                S_recorded=(recorded or {}).get(layer.name, (True, True))[1],
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
    @_write_guarded
    def append_steps(self, rows: Mapping[str, np.ndarray]) -> None:
        """Append step-log rows (a block: every column an array of the same length)."""
        n = len(rows["step"])
        if n == 0:
            return
        if self._step_datasets is None:  # looking datasets and their layout up costs as much as writing a block
            self._step_datasets = {}
            for column in (*STEP_COLUMNS, "lr"):
                dataset = self.file["steps"][column]
                chunk_bytes = math.prod(dataset.chunks) * dataset.dtype.itemsize
                self._step_datasets[column] = (dataset, dataset.chunks[0], chunk_bytes)
        start = self._step_datasets["step"][0].shape[0]
        new_chunks = 0
        for _, rows_per_chunk, chunk_bytes in self._step_datasets.values():
            new_chunks += (-(-(start + n) // rows_per_chunk) - (-(-start // rows_per_chunk))) * chunk_bytes
        reserve_space(self.file, new_chunks)
        for column, (dataset, _, _) in self._step_datasets.items():
            dataset.resize(start + n, axis=0)
            dataset[start:] = np.asarray(rows[column])

    @_write_guarded
    def write_segment(
        self,
        index: int,
        attrs: Mapping[str, Any],
        kfac: Mapping[str, Mapping[str, Tensor]],
        preconditioner: Mapping[str, tuple[Tensor, int]] | None = None,
        dtypes: Mapping[str, tuple[torch.dtype, torch.dtype]] | None = None,
    ) -> None:
        """Write a closed segment: attributes, K-FAC sums per layer (``A_sum``/``S_sum`` in ``dtypes[layer]``,
        default float64, left out when absent or empty: an unrecorded factor; counts float64), Adam
        second-moment means (in the layer's ``A_sum`` dtype: Adam keeps them in the parameters' precision)."""
        preconditioner = preconditioner or {}
        arrays = [t for sums in kfac.values() for t in sums.values()] + [v for v, _ in preconditioner.values()]
        reserve_space(self.file, _nbytes(arrays, len(arrays) + 2 * len(kfac) + len(preconditioner) + 3, itemsize=8))
        group = self.file["segments"].create_group(_segment_name(index))
        group.attrs.update(dict(attrs))
        kfac_group = group.create_group("kfac")
        for layer, sums in kfac.items():
            layer_group = kfac_group.create_group(layer)
            for key in FACTORS:
                value = sums.get(key)
                if value is None or (key.endswith("_sum") and value.numel() == 0):
                    continue
                a_dtype, s_dtype = (dtypes or {}).get(layer, (torch.float64, torch.float64))
                dtype = {"A_sum": a_dtype, "S_sum": s_dtype}.get(key, torch.float64)
                layer_group.create_dataset(key, data=value.detach().to(device="cpu", dtype=dtype).numpy())
        if preconditioner:
            pre_group = group.create_group("preconditioner")
            for layer, (v_mean, count) in preconditioner.items():
                g = pre_group.create_group(layer)
                v_dtype = (dtypes or {}).get(layer, (torch.float64, torch.float64))[0]  # as wide layers' factors
                g.create_dataset("v_mean", data=v_mean.detach().to(device="cpu", dtype=v_dtype).numpy())
                g.attrs["count"] = count

    @_write_guarded
    def write_checkpoint(self, name: str, state: Mapping[str, Tensor], attrs: Mapping[str, Any], dtype: str) -> None:
        """Write a model state (``name`` = ``"initial"`` or a zero-padded index).

        Keys naming the same tensor (tied parameters: GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``)
        are stored once and hard-linked, so every name reads back the same values.
        """
        stored = {"bfloat16": 2, "float16": 2, "float32": 4}.get(dtype, 8)
        reserve_space(self.file, _nbytes(state.values(), len(state) + 1, itemsize=stored))
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

    @_write_guarded
    def record_loss_check(self, record: Mapping[str, Any]) -> None:
        """Add the result of the callback's loss check (:mod:`lightning_tda.loss_check`) to ``meta/loss_check``,
        replacing an earlier record of the same first step (a resumed fit that checked again)."""
        meta = self.file["meta"]
        earlier = _loss_check_records(TraceReader(self.file, self.path))
        records = [r for r in earlier if r.get("first_step") != record.get("first_step")]
        records.append(dict(record))
        reserve_space(self.file, len(to_json(records)) + OBJECT_OVERHEAD)
        if "loss_check" in meta:
            del meta["loss_check"]
        meta.create_dataset("loss_check", data=to_json(records))

    # --- resume ---------------------------------------------------------------------------------
    @_write_guarded
    def truncate(self, num_rows: int, num_segments: int, last_step: int) -> None:
        """Drop what was written after a Lightning checkpoint that a resumed run restarts from."""
        reserve_space(self.file)
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

    @_write_guarded
    def flush(self) -> None:
        reserve_space(self.file)
        self.file.flush()
        self.flushed = True

    def close(self) -> None:
        """Flush and close (a no-op after a failed write, which already closed the file)."""
        if self.failed is None:
            self._close()

    @_write_guarded
    def _close(self) -> None:
        if self.file.id.valid:
            self.flush()
            release_reserve(self.file)
            self.file.close()
        mark_parsed(self.path)  # written here (or, when appending, parsed before)
        self.lock.release()

    def abandon(self) -> bool:
        """Stop writing after a failure (see :func:`close_after_failure`) and release the lock; a file
        whose skeleton was never flushed is removed. Returns whether it was removed."""
        close_after_failure(self.file)
        removed = self.created and not self.flushed
        if removed:
            self.path.unlink(missing_ok=True)
        self.lock.release()
        return removed


# ----------------------------------------------------------------------------------------- reader


@dataclass(frozen=True)
class LayerInfo:
    """A tracked layer as recorded: gradient matrix shape is ``(out_features, in_features + has_bias)``;
    ``param_group`` is the optimizer param group holding its weight (its learning rate column);
    ``A_recorded``/``S_recorded`` say whether the segments hold its input and output K-FAC factors."""

    name: str
    kind: str
    in_features: int
    out_features: int
    has_bias: bool
    param_group: int = 0
    A_recorded: bool = True
    S_recorded: bool = True

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features + int(self.has_bias))

    @property
    def input_factor_shape(self) -> tuple[int, ...]:
        """Shape of the recorded ``A_sum``: ``(a_dim,)`` (the diagonal) for embeddings, else ``(a_dim, a_dim)``."""
        a_dim = self.shape[1]
        return (a_dim,) if self.kind in DIAGONAL_INPUT_KINDS else (a_dim, a_dim)

    def factor_shapes(self) -> dict[str, tuple[tuple[int, ...], ...]]:
        """The shapes each stored K-FAC sum of this layer may have (checked before it is read)."""
        return {
            "A_sum": (self.input_factor_shape,),
            "A_count": ((),),
            "S_sum": ((self.out_features,) * 2,),
            "S_count": ((),),
        }


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
    """Read-only view of a trace file. Metadata is read and validated at open; tensors on demand.

    Each accessor opens the file briefly, so results can be written into the same file by another
    handle (``Scores.save``) while a ``Trace`` object exists. Use :meth:`open`.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        with self._read(check_run=False) as r:
            self._read_header(r)
            r.check_structure()
            self.num_steps, self.num_param_groups = _step_log_shape(r)
            self.optimizer = _read_optimizer(r, self.num_param_groups)
            self.config = r.json("meta/config", dict)
            self.layers = _read_layers(r, self.num_param_groups)
            segments = _read_segments(r, self.num_steps, self.num_param_groups)
            self.checkpoints = _read_checkpoints(r, segments, self.num_steps)
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
        self.meta = _read_meta(r)

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
        :class:`lightning_tda.loss_check.LossCheckResult`. Empty for traces recorded without it."""
        with self._read() as r:
            return _loss_check_records(r)

    def steps(self) -> StepLog:
        """The full step log, its values checked (steps 1..n, non-negative finite learning rates...)."""
        n, groups = self.num_steps, self.num_param_groups
        with self._read() as r:
            columns = {
                column: r.array(f"steps/{column}", [(n,)], kinds="iu" if column in _INT_COLUMNS else "fiu")
                for column in STEP_COLUMNS
            }
            columns["lr"] = r.array("steps/lr", [(n, groups)], kinds="fiu")
        columns = {k: v.astype(np.int64 if k in _INT_COLUMNS else np.float64, copy=False) for k, v in columns.items()}
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
        (they are stored as float32 or float64); the sum of a factor the callback did not record is absent."""
        info = self.layer(layer)
        shapes = info.factor_shapes()
        self.segment(segment)
        where = f"segments/{_segment_name(segment)}/kfac/{layer}"
        keys = [k for k in FACTORS if (k, False) not in (("A_sum", info.A_recorded), ("S_sum", info.S_recorded))]
        with self._read() as r:
            if not r.has(where):
                raise r.error(where, f"is missing: segment {segment} holds no K-FAC sums for layer {layer!r}")
            sums = {key: r.array(f"{where}/{key}", shapes[key], kinds="f", finite=True) for key in keys}
        for key, value in sums.items():
            if key.endswith("_count") and value < 0:
                raise r.error(f"{where}/{key}", f"is {float(value)}, expected a non-negative count")
            if key.endswith("_sum"):
                _check_covariance(r, f"{where}/{key}", value)
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
                f"Segment {segment} has no K-FAC statistics for layer {layer!r} (no statistics step fell "
                f"inside it). Record with a smaller every_n_steps, or use fewer segments."
            )
        return sums["A_sum"] / sums["A_count"], sums["S_sum"] / sums["S_count"]

    def preconditioner(self, segment: int, layer: str) -> Tensor | None:
        """Segment-mean Adam second moment ``v̂`` as a ``(out, a_dim)`` float64 matrix, or None."""
        shape = self.layer(layer).shape
        where = f"segments/{_segment_name(segment)}/preconditioner/{layer}/v_mean"
        with self._read() as r:
            if not r.has(where):
                return None
            v_mean = r.array(where, [shape], kinds="f", finite=True)
        if (v_mean < 0).any():
            raise r.error(where, "holds negative second moments")
        return torch.from_numpy(v_mean.astype(np.float64, copy=False))

    def initial_state(self, like: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The full model state at the start of recording (``like``: see :meth:`checkpoint_state`)."""
        with self._read() as r:
            shapes = _state_shapes(r, like)
            return {key: _load_array(r, f"checkpoints/initial/{key}", shape) for key, shape in shapes.items()}

    def checkpoint_state(self, index: int, like: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Full model state of checkpoint ``index`` (initial state overlaid with its stored tensors).

        Every stored tensor's key and shape are checked before it is read: against ``like`` (a model's
        ``state_dict()``) when given, else against the initial state's.
        """
        if index not in {c.index for c in self.checkpoints}:
            raise TraceError(f"Checkpoint {index} is not in {self.path}; it has {[c.index for c in self.checkpoints]}.")
        where = f"checkpoints/{_checkpoint_name(index)}"
        with self._read() as r:
            shapes = _state_shapes(r, like)
            state = {key: _load_array(r, f"checkpoints/initial/{key}", shape) for key, shape in shapes.items()}
            for key in r.members(where):
                if key not in shapes:
                    owner = "the given model" if like is not None else "the initial state"
                    raise r.error(
                        f"{where}/{key}", f"does not fit {owner}, which has no such tensor", hint=ARCHITECTURE
                    )
                state[key] = _load_array(r, f"{where}/{key}", shapes[key]).to(state[key].dtype)
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


def stored_bytes(item: h5py.Group | h5py.Dataset) -> int:
    """Bytes the datasets below ``item`` occupy in the file (HDF5 metadata not counted), each stored
    dataset once; only hard links are followed."""
    total, seen, stack = 0, set(), [item]
    while stack:
        node = stack.pop()
        address = h5py.h5o.get_info(node.id).addr
        if address in seen:
            continue
        seen.add(address)
        if isinstance(node, h5py.Dataset):
            total += node.id.get_storage_size()
            continue
        for name in node:
            if node.id.links.get_info(name.encode()).type == h5py.h5l.TYPE_HARD:
                child = node[name]
                if isinstance(child, (h5py.Group, h5py.Dataset)):
                    stack.append(child)
    return total


def _loss_check_records(r: TraceReader) -> list[dict[str, Any]]:
    """The JSON list ``meta/loss_check`` (records that are not JSON objects are dropped)."""
    if not r.has("meta/loss_check"):
        return []
    return [record for record in r.json("meta/loss_check", list) if isinstance(record, dict)]


# --- validation of the records read at open (one place: what each part of the file must be) --------
def _read_meta(r: TraceReader) -> dict[str, Any]:
    meta = r.attributes("meta")

    def where(key: str) -> str:
        return f"meta attribute {key!r}"

    if "fisher" not in meta:
        raise r.error("meta", "has no 'fisher' attribute")
    expect_str(r, where("fisher"), meta["fisher"], ("true", "empirical"))
    for key in ("model_class", "task_class", "checkpoint_dtype", "sequence_mode", "precision"):
        if key in meta:
            expect_str(r, where(key), meta[key])
    for key, low in (("world_size", 1), ("dataset_size", -1), ("accumulate_grad_batches", 1)):
        if key in meta:
            expect_int(r, where(key), meta[key], low)
    if isinstance(meta.get("every_n_steps"), str):  # v2: "auto", spaced by an overhead budget
        expect_str(r, where("every_n_steps"), meta["every_n_steps"], ("auto",))
        expect_float(r, where("overhead_budget"), meta.get("overhead_budget"), 0.0)
        expect_int(r, where("min_statistics_steps"), meta.get("min_statistics_steps"), 1)
    elif "every_n_steps" in meta:
        expect_int(r, where("every_n_steps"), meta["every_n_steps"], 1)
    if "factor_dtype" in meta:
        expect_str(r, where("factor_dtype"), meta["factor_dtype"], ("auto", "float32", "float64"))
    if "max_factor_ratio" in meta:
        expect_float(r, where("max_factor_ratio"), meta["max_factor_ratio"], -1.0)
    return meta


def _step_log_shape(r: TraceReader) -> tuple[int, int]:
    """Rows and param groups of the step log, from its datasets' shapes and types (nothing read)."""
    lengths = set()
    for column in STEP_COLUMNS:
        shape = r.shape_of(f"steps/{column}", "iu" if column in _INT_COLUMNS else "fiu")
        if len(shape) != 1:
            raise r.error(f"steps/{column}", f"has shape {shape}, expected one value per optimizer step")
        lengths.add(shape[0])
    if len(lengths) != 1:
        raise r.error("steps", f"columns have different lengths {sorted(lengths)}, expected one row per step in each")
    (rows,) = lengths
    shape = r.shape_of("steps/lr", "fiu")
    if len(shape) != 2 or shape[0] != rows or not 1 <= shape[1] <= MAX_PARAM_GROUPS:
        raise r.error("steps/lr", f"has shape {shape}, expected ({rows}, param groups)")
    return rows, shape[1]


def _read_optimizer(r: TraceReader, groups: int) -> dict[str, Any]:
    where = "meta/optimizer"
    record = r.json(where, dict)
    expect_str(r, f"{where} 'class'", record.get("class"))
    if "name" in record:
        expect_str(r, f"{where} 'name'", record["name"])
    param_groups = record.get("param_groups")
    if not isinstance(param_groups, list) or len(param_groups) != groups:
        count = len(param_groups) if isinstance(param_groups, list) else param_groups
        raise r.error(where, f"lists param groups {_short(count)}, expected {groups} (the columns of steps/lr)")
    for index, group in enumerate(param_groups):
        place = f"{where} param group {index}"
        if not isinstance(group, dict):
            raise r.error(place, f"is {_short(group)}, expected an object of hyper-parameters")
        for key in ("lr", "momentum", "dampening", "weight_decay", "eps"):
            if group.get(key) is not None:
                expect_float(r, f"{place} {key!r}", group[key], low=0.0)
        for key in ("momentum", "dampening"):
            if group.get(key) is not None and group[key] >= 1:
                raise r.error(f"{place} {key!r}", f"is {group[key]}, expected a value below 1")
        if group.get("betas") is not None:
            betas = expect_floats(r, f"{place} 'betas'", group["betas"], 2, low=0.0)
            if (betas >= 1).any():
                raise r.error(f"{place} 'betas'", f"is {group['betas']}, expected two values below 1")
        for key in ("maximize", "nesterov", "amsgrad"):
            if group.get(key) is not None:
                expect_bool(r, f"{place} {key!r}", group[key])
    return record


def _read_layers(r: TraceReader, groups: int) -> list[LayerInfo]:
    names = r.strings("layers/names", MAX_LAYERS)
    layers = []
    for name in names:
        if not name or "/" in name or name in (".", ".."):
            raise r.error("layers/names", f"holds the invalid layer name {name!r}")
        where = f"layers/{name}"
        attrs = r.attributes(where)
        layers.append(
            LayerInfo(
                name=name,
                kind=expect_str(r, f"{where} attribute 'kind'", attrs.get("kind")),
                in_features=expect_int(
                    r, f"{where} attribute 'in_features'", attrs.get("in_features"), 1, MAX_FEATURES
                ),
                out_features=expect_int(
                    r, f"{where} attribute 'out_features'", attrs.get("out_features"), 1, MAX_FEATURES
                ),
                has_bias=expect_bool(r, f"{where} attribute 'has_bias'", attrs.get("has_bias")),
                param_group=expect_int(
                    r, f"{where} attribute 'param_group'", attrs.get("param_group", 0), 0, groups - 1
                ),
                A_recorded=expect_bool(r, f"{where} attribute 'A_recorded'", attrs.get("A_recorded", True)),
                S_recorded=expect_bool(r, f"{where} attribute 'S_recorded'", attrs.get("S_recorded", True)),
            )
        )
    if len({layer.name for layer in layers}) != len(layers):
        raise r.error("layers/names", "names a layer twice")
    return layers


def _read_segments(r: TraceReader, num_steps: int, groups: int) -> list[dict[str, Any]]:
    """The closed segments' fields, checked to tile steps ``0 < step <= end`` of the step log in order."""
    segments = []
    for name in r.members("segments"):
        where = f"segments/{name}"
        if not (name.isascii() and name.isdigit()):
            raise r.error(where, "is not named by a segment index")
        attrs = r.attributes(where)

        def field(key: str, low: int, high: int | None = None, where: str = where, attrs: dict = attrs) -> int:
            return expect_int(r, f"{where} attribute {key!r}", attrs.get(key), low, high)

        index, start = field("index", int(name), int(name)), field("start_step", 0)
        end = field("end_step", start + 1)
        num = field("num_steps", end - start, end - start)
        stats = field("stats_steps", 0, num)
        segments.append(
            {
                "index": index,
                "start_step": start,
                "end_step": end,
                "num_steps": num,
                "stats_steps": stats,
                "skipped_steps": field("skipped_steps", 0, stats),
                "mean_lr": expect_floats(r, f"{where} attribute 'mean_lr'", attrs.get("mean_lr"), groups, low=0.0),
                "reason": expect_str(r, f"{where} attribute 'reason'", attrs.get("reason")),
            }
        )
    segments.sort(key=lambda s: s["index"])
    previous_end = 0
    for position, segment in enumerate(segments):
        where = f"segments/{_segment_name(segment['index'])}"
        if segment["index"] != position:
            raise r.error(where, f"has index {segment['index']}, expected {position} (segments are numbered 0, 1, ...)")
        if segment["start_step"] != previous_end:
            raise r.error(
                where,
                f"covers steps {segment['start_step'] + 1}-{segment['end_step']}, expected it to start right after "
                f"step {previous_end} (segments tile the steps in order, without overlap)",
            )
        previous_end = segment["end_step"]
    if previous_end > num_steps:
        raise r.error("segments", f"end at step {previous_end}, but the step log has {num_steps} rows")
    return segments


def _read_checkpoints(r: TraceReader, segments: list[dict[str, Any]], num_steps: int) -> list[CheckpointInfo]:
    checkpoints = []
    for name in r.members("checkpoints"):
        if name == "initial":
            continue
        where = f"checkpoints/{name}"
        if not (name.isascii() and name.isdigit()):
            raise r.error(where, "is not named by a checkpoint index")
        attrs = r.attributes(where)
        info = CheckpointInfo(
            index=expect_int(r, f"{where} attribute 'index'", attrs.get("index"), int(name), int(name)),
            step=expect_int(r, f"{where} attribute 'step'", attrs.get("step"), 1, num_steps),
            segment=expect_int(r, f"{where} attribute 'segment'", attrs.get("segment"), 0, len(segments)),
            epoch=expect_int(r, f"{where} attribute 'epoch'", attrs.get("epoch"), 0),
        )
        if info.segment < len(segments):
            low, high = segments[info.segment]["start_step"], segments[info.segment]["end_step"]
        else:  # taken in the segment that was open when the file was last flushed
            low, high = (segments[-1]["end_step"] if segments else 0), num_steps
        if not low < info.step <= high:
            raise r.error(where, f"is at step {info.step}, outside its segment {info.segment} (steps {low + 1}-{high})")
        checkpoints.append(info)
    return sorted(checkpoints, key=lambda c: c.index)


def _state_shapes(r: TraceReader, like: Mapping[str, Tensor] | None) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the initial state (checked against ``like`` when given), nothing read."""
    shapes = {}
    for key in r.members("checkpoints/initial"):
        where = f"checkpoints/initial/{key}"
        shape = r.shape_of(where, "fiub")
        if like is not None:
            if key not in like:
                raise r.error(where, "does not fit the given model, which has no such tensor", hint=ARCHITECTURE)
            if tuple(like[key].shape) != shape:
                found = tuple(like[key].shape)
                raise r.error(where, f"has shape {shape}: it does not fit the given model's {found}", hint=ARCHITECTURE)
        shapes[key] = shape
    return shapes


def _check_covariance(r: TraceReader, where: str, matrix: np.ndarray) -> None:
    """A covariance sum: symmetric (to rounding) with a diagonal that is non-negative (to rounding).

    Symmetry is tested as ``M v = Mᵀ v`` for two random vectors ``v`` (two matrix-vector products, where
    comparing ``M`` with ``Mᵀ`` entry by entry reads ``Mᵀ`` against the memory order and took 4x longer
    than reading the factors): an asymmetry ``δ`` in one entry moves a product by ``δ·v_j``, far above the
    rounding of symmetric sums (the tolerance is 1e-9 of the largest entry). Rounding also lets a variance
    that is zero in exact arithmetic come out slightly negative: a float32 factor of a stride-1 convolution
    is formed from shifted products with the border rows subtracted (measured: -3.7e-4 against a largest
    entry of 2.9e3 on a ResNet-18's layer-4 convolution, -1.3e-7 relative), so the diagonal may dip to
    ``-64·eps`` of the largest entry (eps of the stored dtype; 7.6e-6 in float32, 1.4e-14 in float64).
    """
    scale = max(float(matrix.max(initial=0.0)), -float(matrix.min(initial=0.0)))
    if matrix.ndim == 2:
        probes = np.random.default_rng().standard_normal((matrix.shape[0], 2))
        gap = float(np.abs(matrix @ probes - matrix.T @ probes).max(initial=0.0))
        if gap > 1e-9 * scale * float(np.abs(probes).sum(axis=0).max(initial=0.0)):
            raise r.error(where, "is not symmetric, expected a covariance sum")
        diagonal = np.diagonal(matrix)
    else:
        diagonal = matrix
    rounding = 64 * float(np.finfo(matrix.dtype).eps) * scale  # read with kinds='f': always a float dtype
    if (diagonal < -rounding).any():
        raise r.error(where, "has negative variances on its diagonal, expected a covariance sum")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
