"""Sizes and clean-up of what attribution adds to a trace: ``lightning-tda inspect`` lists results and
caches with their sizes (:func:`storage_lines`), ``lightning-tda clean`` removes caches (and, if asked,
results) and compacts the trace by rewriting it (:func:`clean`).
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py

from lightning_tda.trace.cache import FitCache
from lightning_tda.trace.checks import TraceError, TraceReader
from lightning_tda.trace.lock import TraceLock
from lightning_tda.trace.probe import mark_parsed
from lightning_tda.trace.reader import Trace
from lightning_tda.trace.records import stored_bytes
from lightning_tda.trace.schema import LIBVER
from lightning_tda.trace.writer import WRITE_LOCK_TIMEOUT


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.2f} MB"


def storage_lines(trace_path: str | os.PathLike) -> list[str]:
    """What ``lightning-tda inspect`` adds to :meth:`Trace.summary <lightning_tda.trace.Trace.summary>`
    (which lists results and in-trace caches with their sizes): the sidecar's entries and sizes, how much
    of the trace is not data (metadata and the space of deleted objects), and how to remove them."""
    path = Path(trace_path)
    sidecar = FitCache(Trace.open(path), "sidecar")  # the trace is checked before anything else is read
    with h5py.File(path, "r") as f:
        reader = TraceReader(f, path)
        with reader.part(""):
            data = stored_bytes(f)
        has_entries = any(reader.members(name) for name in ("results", "cache") if reader.has(name))
    lines = []
    state = sidecar.sidecar_state()
    if state in ("current", "stale"):
        with h5py.File(sidecar.path, "r") as f:
            reader = TraceReader(f, sidecar.path)
            entries = []
            for name in reader.members("cache"):
                with reader.part(f"cache/{name}"):
                    entries.append((name, stored_bytes(reader.node(f"cache/{name}"))))
        note = "" if state == "current" else "; written for another run, ignored"
        listed = ", ".join(f"{name} {_megabytes(size)}" for name, size in entries) or "empty"
        lines.append(f"  cache sidecar {sidecar.path.name} ({_megabytes(sidecar.path.stat().st_size)}{note}): {listed}")
    size = path.stat().st_size
    if size - data > max(1e6, 0.1 * size):
        lines.append(
            f"  the file is {_megabytes(size)} for {_megabytes(data)} of data: the rest is HDF5 metadata and the "
            f"space of deleted objects, which `lightning-tda clean` reclaims"
        )
    if lines or has_entries:
        lines.append(f"  remove caches with `lightning-tda clean {path}` (with --results true also the results)")
    return lines


# ------------------------------------------------------------------------------------- clean
def clean(trace_path: str | os.PathLike, results: bool = False) -> str:
    """Remove the trace's fitted caches (inside it and its sidecar) and, with ``results``, its scores, then
    compact the trace by rewriting it (HDF5 does not shrink a file when objects are deleted). Everything
    else (meta, steps, segments, checkpoints) is copied unchanged. Returns a one-line account.

    The rewrite goes to a temporary file in the same directory that replaces the trace only when complete,
    so an interruption leaves the original; it needs free space for one copy of what is kept.
    """
    path = Path(trace_path)
    sidecar = FitCache(Trace.open(path), "sidecar")  # opening checks it is a readable trace, not being written
    before = path.stat().st_size
    removed = []
    state = sidecar.sidecar_state()
    if state in ("current", "stale"):
        before += sidecar.path.stat().st_size
        sidecar.path.unlink()
        removed.append(f"sidecar {sidecar.path.name}")
    elif state == "foreign":
        removed.append(f"(left {sidecar.path.name} alone: not a lightning_tda cache)")
    emptied = ("cache", "results") if results else ("cache",)
    temporary = path.with_name(path.name + ".compact.tmp")
    try:
        with TraceLock(path, timeout=WRITE_LOCK_TIMEOUT):
            with h5py.File(path, "r") as old, h5py.File(temporary, "w", libver=LIBVER) as new:
                for name, value in old.attrs.items():
                    new.attrs[name] = value
                for name in old:
                    if name in emptied:
                        count = len(old[name]) if isinstance(old[name], h5py.Group) else 0
                        if count:
                            removed.append(f"{count} {name} entr{'y' if count == 1 else 'ies'}")
                        new.create_group(name)
                    else:
                        old.copy(old[name], new, name=name)
            os.replace(temporary, path)
            mark_parsed(path)  # rewritten here from a trace Trace.open parsed
    except OSError as err:
        raise TraceError(f"Could not compact {path}: {err}. It is unchanged; free disk space and retry.") from err
    finally:
        temporary.unlink(missing_ok=True)
    after = path.stat().st_size
    what = ", ".join(removed) if removed else "no caches"
    return f"{path}: removed {what}; {_megabytes(before)} -> {_megabytes(after)}"
