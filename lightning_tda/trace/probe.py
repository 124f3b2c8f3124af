"""Parse a file's HDF5 metadata in a forked child first, so that the HDF5 library hanging or crashing on a
damaged file ends the child, not this process.

:class:`~lightning_tda.trace.checks.TraceReader` checks everything lightning_tda reads, but the HDF5 C library
parses the file's metadata (object headers, B-trees, heaps) itself, and a damaged file can make it loop
forever: the trace fuzzer found a flipped bit in the global heap that made reading a string attribute hang
(``tests/test_trace_hostile.py``, found by the fuzzer). Python cannot interrupt a C loop, so before a file
from elsewhere is opened, a forked child (a copy of this process, started in milliseconds) touches every
piece of metadata lightning_tda could read: links, object headers, attributes, dataset types, shapes,
filters and chunk indexes, strings (the global heap) and small datasets. It runs under an alarm and a
memory cap; a child that is killed by a signal makes the file a :class:`TraceError`.

A file is parsed once per version (device, inode, size, modification time): files this process wrote
itself (the callback's trace, scores, caches) are not parsed again. Where ``fork`` does not exist
(Windows) nothing is parsed in advance. The child uses only h5py, so threads of the parent (PyTorch's)
cannot deadlock it; it never returns into the caller (``os._exit``). Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import sys
from pathlib import Path

import h5py

from lightning_tda.trace.checks import MAX_ATTRIBUTE_BYTES, MAX_DEPTH, MAX_OBJECTS, TraceError

PARSE_SECONDS = 20  # far above any real file's parse (milliseconds to a second)
CHILD_MEMORY = 2 << 30  # bytes the child may allocate beyond what it inherits
SMALL_DATASET = 1 << 20  # datasets up to this many declared bytes are read in full
MAX_CHUNKS = 100_000  # chunk index entries visited per dataset

_parsed: set[tuple[int, int, int, int]] = set()


def _version(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def mark_parsed(path: str | os.PathLike) -> None:
    """Record that ``path``, as it is now, needs no parsing in a child (this process wrote it)."""
    version = _version(Path(path))
    if version is not None:
        _parsed.add(version)


def is_parsed(path: str | os.PathLike) -> bool:
    return _version(Path(path)) in _parsed


def parse_in_child(path: str | os.PathLike) -> None:
    """Let a forked child parse ``path``'s HDF5 metadata first; raises :class:`TraceError` if the HDF5
    library hung (``PARSE_SECONDS``) or crashed on it. Errors it reports are left to the checked reads."""
    path = Path(path)
    if not hasattr(os, "fork") or is_parsed(path):
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    pid = os.fork()
    if pid == 0:  # the child: touch everything, then leave without running any of the parent's cleanup
        try:
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(PARSE_SECONDS)
            _cap_memory()
            _touch_everything(path)
        except BaseException:  # noqa: BLE001 - errors are the checked reader's business; only hangs and crashes count
            pass
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        what = f"hung (stopped after {PARSE_SECONDS} s)" if number == signal.SIGALRM else f"crashed (signal {number})"
        raise TraceError(
            f"{path}: the HDF5 library {what} parsing this file, in a separate process, so this one is unharmed. "
            f"The file is damaged; record the trace again or use an intact copy."
        )
    mark_parsed(path)


def _cap_memory() -> None:
    """Let the child allocate at most ``CHILD_MEMORY`` beyond the address space it inherited (Linux)."""
    try:
        with open("/proc/self/status") as status:
            size = next(int(line.split()[1]) << 10 for line in status if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError):
        return
    resource.setrlimit(resource.RLIMIT_AS, (size + CHILD_MEMORY, size + CHILD_MEMORY))


def _touch_everything(path: Path) -> None:
    """Visit what a checked read could make HDF5 parse: every hard-linked object's header and attributes,
    every dataset's type, shape, filters and chunk index, its strings and, when small, its data."""
    with h5py.File(path, "r") as f:
        seen: set[int] = set()
        stack: list[tuple[h5py.Group, int]] = [(f, 0)]
        count = 0
        while stack and count < MAX_OBJECTS:
            group, depth = stack.pop()
            with contextlib.suppress(Exception):
                address = h5py.h5o.get_info(group.id).addr
                if address in seen:
                    continue
                seen.add(address)
                _touch_attributes(group)
                for name in group:
                    count += 1
                    with contextlib.suppress(Exception):
                        if group.id.links.get_info(name.encode()).type != h5py.h5l.TYPE_HARD:
                            continue
                        kind = h5py.h5o.get_info(group.id, name.encode()).type
                        if kind == h5py.h5o.TYPE_GROUP and depth < MAX_DEPTH:
                            stack.append((group[name], depth + 1))
                        elif kind == h5py.h5o.TYPE_DATASET:
                            _touch_dataset(group[name])


def _touch_attributes(item: h5py.HLObject) -> None:
    for name in item.attrs:
        with contextlib.suppress(Exception):
            attribute = item.attrs.get_id(name)
            if len(attribute.shape) <= 1 and attribute.get_storage_size() <= MAX_ATTRIBUTE_BYTES:
                item.attrs[name]


def _touch_dataset(dataset: h5py.Dataset) -> None:
    _touch_attributes(dataset)
    plist = dataset.id.get_create_plist()
    if plist.get_layout() == h5py.h5d.VIRTUAL or plist.get_external_count():
        return  # never read: the checked reader refuses both
    for index in range(plist.get_nfilters()):
        plist.get_filter(index)
    dtype, shape = dataset.dtype, dataset.shape
    if shape is None:
        return
    if dataset.chunks is not None:
        for index in range(min(dataset.id.get_num_chunks(), MAX_CHUNKS)):
            dataset.id.get_chunk_info(index)
    elements = 1
    for n in shape:
        elements *= n
    stored = dataset.id.get_storage_size()
    if h5py.check_vlen_dtype(dtype) is not None or h5py.check_string_dtype(dtype) is not None:
        if stored <= SMALL_DATASET:
            dataset[()]  # strings live in the global heap
    elif elements * dtype.itemsize <= min(SMALL_DATASET, max(stored, 1) * 1100):
        dataset[()]
