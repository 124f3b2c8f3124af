"""Writing a trace durably: the writer the callback uses, and short writes (scores, caches) into a trace.

Every write first reserves on disk the space it will need (:func:`reserve_space`), so a full disk fails
before the write touches the file, which then keeps every write completed before it and still opens.
One process writes a trace at a time (:mod:`lightning_tda.trace.lock`). Nothing here imports Lightning.
"""

from __future__ import annotations

import errno
import functools
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor

from lightning_tda.layers.covariances import FACTORS
from lightning_tda.layers.tracked import TrackedLayer
from lightning_tda.trace.checks import TraceError, TraceReader
from lightning_tda.trace.lock import TraceLock
from lightning_tda.trace.objects import new_dataset, new_extendable_dataset, new_group, set_new_attributes
from lightning_tda.trace.probe import is_parsed, mark_parsed
from lightning_tda.trace.reader import Trace
from lightning_tda.trace.records import loss_check_records, recording_cost_records
from lightning_tda.trace.schema import (
    FORMAT,
    INT_COLUMNS,
    LIBVER,
    SCHEMA_VERSION,
    STEP_COLUMNS,
    library_version,
    segment_name,
    to_json,
)

WRITE_LOCK_TIMEOUT = 30.0  # seconds a short write (scores, caches) waits for another writer
WRITE_MARGIN = 64 << 10  # bytes reserved beyond each write's estimate (HDF5's own bookkeeping)
OBJECT_OVERHEAD = 4 << 10  # bytes reserved per group or dataset a write creates


class TraceWriteError(TraceError):
    """Writing the trace failed (a full disk, an I/O error); the file keeps every write completed before."""


def _store_array(group: h5py.Group, name: str, tensor: Tensor, dtype: str) -> None:
    """Store a tensor as a dataset; bfloat16 is stored as its uint16 bit pattern."""
    tensor = tensor.detach().cpu()
    if dtype == "bfloat16" and tensor.is_floating_point():
        data = tensor.to(torch.bfloat16).view(torch.uint16).numpy()
    elif dtype in ("float16", "float32") and tensor.is_floating_point():
        data = tensor.to(getattr(torch, dtype)).numpy()
    else:
        data = tensor.numpy()
    dataset = new_dataset(group, name, data)
    if dtype == "bfloat16" and tensor.is_floating_point():  # every other dtype is numpy's own
        set_new_attributes(h5py.Dataset(dataset), {"dtype": dtype})


def storage_alias(tensor: Tensor) -> tuple:
    """What two names of one tensor (tied parameters) have in common: the same data, dtype, shape and strides."""
    return tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride()


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
        run_id: with ``"append"``, the run the existing trace must belong to (a resumed run continues its own
            trace); a trace of another run is refused.
    """

    def __init__(self, path: str | os.PathLike, mode: str = "create", run_id: str | None = None) -> None:
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
            if mode == "append" and run_id is not None and not exists:
                raise TraceError(
                    f"The trace of run {run_id} at {self.path} is gone (moved or deleted). Resume (or continue) with "
                    f"the trace path of the original run."
                )
            if mode == "create" and exists:
                raise TraceError(
                    f"A trace already exists at {self.path}; it is not overwritten. Pass a new path, "
                    f"if_exists='overwrite' to replace it, or if_exists='append' to continue it."
                )
            if mode == "append" and exists:
                Trace.validated(self.path)  # format, schema and records checked before writing into it
                self.file = h5py.File(self.path, "a", libver=LIBVER)
                self.created = False
                if run_id is not None and self.run_id != run_id:
                    found = self.run_id
                    self.file.close()
                    raise TraceError(
                        f"The trace at {self.path} belongs to run {found}, but this callback recorded run {run_id}. "
                        f"Resume (or continue) with the trace path of the original run."
                    )
            else:
                self.file = h5py.File(self.path, "w", libver=LIBVER)
                self.created = True
        except BaseException:
            self.lock.release()
            raise
        self._step_datasets: dict[str, tuple[h5py.Dataset, int, int]] | None = None
        self._groups: dict[str, h5py.Group] = {}  # looking a group up costs as much as creating a dataset in it
        self._records: dict[str, list[dict[str, Any]]] = {}  # meta/<name>'s JSON records, as written

    def _group(self, name: str) -> h5py.Group:
        """The top-level group ``name`` (``meta``, ``steps``, ``segments``, ``checkpoints``), looked up once."""
        if name not in self._groups:
            self._groups[name] = self.file[name]
        return self._groups[name]

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
        optimizer_json, config_json = to_json(optimizer), to_json(config)
        reserve_space(f, len(optimizer_json) + len(config_json) + OBJECT_OVERHEAD * (2 * len(layers) + 20))
        created = datetime.now(timezone.utc).isoformat()
        set_new_attributes(
            f,
            {
                "format": FORMAT,
                "schema_version": SCHEMA_VERSION,
                "library_version": library_version(),
                "created": created,
                "run_id": run_id,
            },
        )
        meta_group = new_group(f, "meta")
        set_new_attributes(meta_group, meta)
        new_dataset(meta_group, "optimizer", optimizer_json)
        new_dataset(meta_group, "config", config_json)
        layer_group = new_group(f, "layers")
        layer_group.create_dataset("names", data=[layer.name for layer in layers], dtype=h5py.string_dtype())
        for layer in layers:
            set_new_attributes(
                new_group(layer_group, layer.name),
                {
                    "kind": layer.kind,
                    "in_features": layer.in_features,
                    "out_features": layer.out_features,
                    "has_bias": layer.has_bias,
                    "param_group": (layer_groups or {}).get(layer.name, 0),
                    "A_recorded": (recorded or {}).get(layer.name, (True, True))[0],
                    "S_recorded": (recorded or {}).get(layer.name, (True, True))[1],
                },
            )
        steps = new_group(f, "steps")
        for column in STEP_COLUMNS:
            new_extendable_dataset(steps, column, np.int64 if column in INT_COLUMNS else np.float64, (0,), (4096,))
        new_extendable_dataset(steps, "lr", np.float64, (0, num_param_groups), (1024, num_param_groups))
        for name in ("segments", "checkpoints", "results", "cache"):
            new_group(f, name)
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
                dataset = self._group("steps")[column]
                chunk_bytes = math.prod(dataset.chunks) * dataset.dtype.itemsize
                self._step_datasets[column] = (dataset, dataset.chunks[0], chunk_bytes)
        start = self._step_datasets["step"][0].shape[0]
        new_chunks = 0
        for _, rows_per_chunk, chunk_bytes in self._step_datasets.values():
            new_chunks += (-(-(start + n) // rows_per_chunk) - (-(-start // rows_per_chunk))) * chunk_bytes
        reserve_space(self.file, new_chunks)
        for column, (dataset, _, _) in self._step_datasets.items():
            values = np.ascontiguousarray(rows[column], dtype=dataset.dtype)
            # HDF5's own resize and write of the new rows: a third of h5py's resize and slice assignment's time
            dataset.id.set_extent((start + n, *values.shape[1:]))
            rows_in_file = dataset.id.get_space()
            rows_in_file.select_hyperslab((start,) + (0,) * (values.ndim - 1), values.shape)
            dataset.id.write(h5py.h5s.create_simple(values.shape), rows_in_file, values)

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
        group = new_group(self._group("segments"), segment_name(index))
        set_new_attributes(group, attrs)
        kfac_group = new_group(group, "kfac")
        for layer, sums in kfac.items():
            layer_group = new_group(kfac_group, layer)
            for key in FACTORS:
                value = sums.get(key)
                if value is None or (key.endswith("_sum") and value.numel() == 0):
                    continue
                a_dtype, s_dtype = (dtypes or {}).get(layer, (torch.float64, torch.float64))
                dtype = {"A_sum": a_dtype, "S_sum": s_dtype}.get(key, torch.float64)
                new_dataset(layer_group, key, value.detach().to(device="cpu", dtype=dtype).numpy())
        if preconditioner:
            pre_group = new_group(group, "preconditioner")
            for layer, (v_mean, count) in preconditioner.items():
                g = new_group(pre_group, layer)
                v_dtype = (dtypes or {}).get(layer, (torch.float64, torch.float64))[0]  # as wide layers' factors
                new_dataset(g, "v_mean", v_mean.detach().to(device="cpu", dtype=v_dtype).numpy())
                set_new_attributes(g, {"count": count})

    @_write_guarded
    def write_checkpoint(
        self,
        name: str,
        state: Mapping[str, Tensor],
        attrs: Mapping[str, Any],
        dtype: str,
        second_moments: Mapping[str, Tensor] | None = None,
    ) -> None:
        """Write a model state (``name`` = ``"initial"`` or a zero-padded index), and with it the optimizer's
        bias-corrected second moments ``v̂`` of each tracked layer (``(out, a_dim)``, float32; Adam-family
        optimizers only) under ``second_moments/<name>/<layer>``.

        Keys naming the same tensor (tied parameters: GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``)
        are stored once and hard-linked, so every name reads back the same values.
        """
        stored = {"bfloat16": 2, "float16": 2, "float32": 4}.get(dtype, 8)
        second_moments = second_moments or {}
        arrays = list(second_moments.values())
        reserve_space(
            self.file,
            _nbytes(state.values(), len(state) + 1, itemsize=stored) + _nbytes(arrays, len(arrays) + 2, itemsize=4),
        )
        checkpoints = self._group("checkpoints")
        if name in checkpoints:
            del checkpoints[name]
        group = new_group(checkpoints, name)
        set_new_attributes(group, attrs)
        stored: dict[tuple, str] = {}
        for key, tensor in state.items():
            alias = storage_alias(tensor)
            if tensor.numel() and alias in stored:
                group[key] = group[stored[alias]]
                continue
            _store_array(group, key, tensor, dtype)
            stored[alias] = key
        if second_moments:
            moments = self.file.require_group("second_moments")
            if name in moments:
                del moments[name]
            moments_group = new_group(moments, name)
            for layer, matrix in second_moments.items():
                new_dataset(moments_group, layer, matrix.detach().to(device="cpu", dtype=torch.float32).numpy())

    @_write_guarded
    def record_loss_check(self, record: Mapping[str, Any]) -> None:
        """Add the result of the callback's loss check (:mod:`lightning_tda.recording.loss_check`) to
        ``meta/loss_check``, replacing an earlier record of the same first step (a resumed fit that checked again)."""
        self._replace_record("loss_check", loss_check_records, record)

    @_write_guarded
    def record_cost(self, record: Mapping[str, Any]) -> None:
        """Add what recording one fit cost (``first_step``, ``last_step``, ``training_seconds``, ``seconds`` per
        kind) to ``meta/recording_cost``, replacing an earlier record of the same first step (a resumed fit)."""
        self._replace_record("recording_cost", recording_cost_records, record)

    def _replace_record(
        self, name: str, read: Callable[[TraceReader], list[dict[str, Any]]], record: Mapping[str, Any]
    ) -> None:
        """Write the JSON list ``meta/<name>`` with ``record`` in place of an earlier one of its ``first_step``. The
        earlier records are read from the file once (none in a file this writer created)."""
        if name not in self._records:
            self._records[name] = [] if self.created else read(TraceReader(self.file, self.path))
        records = [r for r in self._records[name] if r.get("first_step") != record.get("first_step")]
        records.append(dict(record))
        meta, text = self._group("meta"), to_json(records)
        reserve_space(self.file, len(text) + OBJECT_OVERHEAD)
        if name in meta:
            del meta[name]
        new_dataset(meta, name, text)
        self._records[name] = records

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
                if name in self.file.get("second_moments", {}):
                    del self.file["second_moments"][name]

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
