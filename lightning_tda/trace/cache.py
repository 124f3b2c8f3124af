"""Where attribution's fitted caches and results live, how big they are, and how to remove them.

EK-FAC and SOURCE cache their fitted curvature so that a second call skips the fitting passes. Every
fit has a *slot*, what was fitted (``curvature-ekfac-stream-segment2``: kind, covariance source, and the
segment whose streamed covariances it used, or ``curvature-ekfac-recompute-checkpoints7``: the checkpoints it was
computed at), and a *key*, a hash of everything the fit depends on (checkpoints, Fisher, samples, seed,
subset, layers, a fingerprint of the training data). A slot holds one entry: a fit with a new key
replaces the old one instead of adding to it, so a cache never holds more than one fit per slot.

Locations (the methods' ``cache=``):

* ``"sidecar"`` (default): a file next to the trace, ``run/trace.h5`` -> ``run/trace.cache.h5``.
  Attribution then never writes caches into the trace, whose size after the first attribution call
  stays put (results of the same shape are overwritten in place, see :meth:`Scores.save
  <lightning_tda.scores.Scores.save>`). A replaced entry of the same shapes is overwritten in place,
  otherwise the sidecar is rewritten without the old entry, so it holds exactly the current fits.
* ``"trace"``: inside the trace under ``cache/<slot>`` (one file to move around). Same-shaped
  replacements are in place; a differently shaped one is deleted and written anew, and HDF5 does not
  give the space of deleted objects back to the file system (measured: a 1 MB dataset deleted in one
  session and written again in the next grows the file by 1 MB), so the trace can grow;
  ``lightning-tda clean`` compacts it.
* ``"none"``: nothing is read or written.

A cache is untrusted input like the trace: an entry is used only when its key matches and every
dataset has the shape and dtype the trace's layers imply (checked before anything is read); a sidecar
written for another run of the same path (a different run id) is ignored and replaced.
:mod:`lightning_tda.trace.maintenance` lists and removes them (``lightning-tda inspect`` and ``clean``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor

from lightning_tda.trace.checks import TraceError, TraceReader
from lightning_tda.trace.lock import TraceLock
from lightning_tda.trace.probe import mark_parsed, parse_in_child
from lightning_tda.trace.reader import Trace
from lightning_tda.trace.schema import LIBVER
from lightning_tda.trace.writer import OBJECT_OVERHEAD, WRITE_LOCK_TIMEOUT, TraceWriteError, writing

CACHE_FORMAT = "lightning_tda.cache"
CACHE_LOCATIONS = ("sidecar", "trace", "none")


def cache_location(value: str | bool) -> str:
    """A method's ``cache=`` argument as a location; ``True`` is the default sidecar, ``False`` is ``"none"``."""
    if value is True:
        return "sidecar"
    if value is False:
        return "none"
    if value not in CACHE_LOCATIONS:
        raise ValueError(
            f"cache={value!r}: use 'sidecar' (a file next to the trace, the default), 'trace' (inside the trace) "
            f"or 'none' (no cache)."
        )
    return value


def sidecar_path(trace_path: str | os.PathLike) -> Path:
    """The sidecar cache of a trace: ``trace.h5`` -> ``trace.cache.h5`` in the same directory."""
    path = Path(trace_path)
    return path.with_name(f"{path.stem}.cache{path.suffix or '.h5'}")


def _datasets(reader: TraceReader, where: str, prefix: str = "") -> Iterator[tuple[str, str]]:
    """``(name relative to where, path)`` of every dataset below group ``where``, following hard links only."""
    for name in reader.members(where):
        path = f"{where}/{name}"
        item = reader.node(path)
        if isinstance(item, h5py.Dataset):
            yield prefix + name, path
        elif isinstance(item, h5py.Group):
            yield from _datasets(reader, path, f"{prefix}{name}/")


def _layout_problem(reader: TraceReader, where: str, expected: Mapping[str, tuple[int, ...]]) -> str | None:
    """Why the datasets of group ``where`` are not exactly ``expected`` (name -> shape, float64), or None."""
    found = dict(_datasets(reader, where))
    if set(found) != set(expected):
        missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        return f"datasets missing {missing[:3]}, unexpected {extra[:3]}"
    for name, shape in expected.items():
        dataset = reader.dataset(found[name])  # refuses virtual datasets, external storage and plugin filters
        if tuple(dataset.shape or ()) != tuple(shape) or dataset.dtype != np.float64:
            return f"{name} is {dataset.dtype} {tuple(dataset.shape or ())}, expected float64 {tuple(shape)}"
    return None


def _same_layout(reader: TraceReader, where: str, arrays: Mapping[str, np.ndarray]) -> bool:
    """Whether group ``where`` holds exactly ``arrays``' names, shapes and dtypes (to overwrite in place); an
    entry that links out of the file or holds virtual datasets is not, and is replaced whole."""
    expected = {name: array.shape for name, array in arrays.items()}
    try:
        same = _layout_problem(reader, where, expected) is None
    except TraceError:
        return False
    return same and all(array.dtype == np.float64 for array in arrays.values())


def _put_entry(reader: TraceReader, slot: str, key: str, arrays: Mapping[str, np.ndarray], description: str) -> None:
    """Write ``arrays`` as entry ``slot`` of the file's ``cache`` group: in place over an entry of the same
    layout, else as a new group. Strings are stored fixed-length (variable-length ones leave their old copies
    in HDF5's global heap). Links out of the file are refused, never written through."""
    cache = reader.group("cache") if reader.has("cache") else reader.file.create_group("cache")
    group = reader.node(f"cache/{slot}")
    if isinstance(group, h5py.Group) and _same_layout(reader, f"cache/{slot}", arrays):
        for name, array in arrays.items():
            group[name][...] = array
    else:
        if group is not None:
            del cache[slot]
        group = cache.create_group(slot)
        for name, array in arrays.items():
            group.create_dataset(name, data=array)
    padded = description.ljust(-(-len(description) // 64) * 64)  # JSON with trailing blanks: sizes change rarely
    for name, text in (("key", key), ("options", padded)):
        value = np.bytes_(text)
        if name in group.attrs and group.attrs[name].dtype == np.asarray(value).dtype:
            group.attrs.modify(name, value)  # in place; deleting and re-adding grows the object header
        else:
            if name in group.attrs:
                del group.attrs[name]
            group.attrs[name] = value


class FitCache:
    """The cache of fitted results of one trace, in one location (see the module docstring).

    Args:
        trace: the trace the fits belong to.
        location: ``"sidecar"``, ``"trace"`` or ``"none"`` (``True``/``False`` as in :func:`cache_location`).

    Under Fabric only the first process should :meth:`store` (every process fitted the same result).
    """

    def __init__(self, trace: Trace, location: str | bool = "sidecar") -> None:
        self.trace = trace
        self.location = cache_location(location)
        self.path = sidecar_path(trace.path) if self.location == "sidecar" else Path(trace.path)

    @property
    def enabled(self) -> bool:
        return self.location != "none"

    def sidecar_state(self) -> str:
        """``"missing"``, ``"current"`` (this run's), ``"stale"`` (a cache of another run) or ``"foreign"``."""
        if not self.path.exists():
            return "missing"
        if not self.path.is_file() or not h5py.is_hdf5(self.path):
            return "foreign"
        try:
            parse_in_child(self.path)
            with h5py.File(self.path, "r") as f:
                reader = TraceReader(f, self.path)
                if reader.attribute("", "format") != CACHE_FORMAT or not isinstance(reader.node("cache"), h5py.Group):
                    return "foreign"
                return "current" if reader.attribute("", "trace_run_id") == self.trace.run_id else "stale"
        except (OSError, TraceError):
            return "foreign"

    def _usable_sidecar(self) -> str:
        """The sidecar's state; a file there that is not a cache is refused before anything is fitted."""
        state = self.sidecar_state()
        if state == "foreign":
            raise TraceError(
                f"{self.path} (where the cache of {self.trace.path} goes) is not a lightning_tda cache; it is left "
                f"alone. Move it away, or pass cache='trace' or cache='none'."
            )
        return state

    def load(self, slot: str, key: str, expected: Mapping[str, tuple[int, ...]]) -> dict[str, Tensor] | None:
        """The cached tensors of ``slot`` if its key is ``key`` and its datasets are exactly ``expected``
        (name -> shape, float64); otherwise None (a mismatching entry is warned about, then refitted)."""
        if not self.enabled or (self.location == "sidecar" and self._usable_sidecar() != "current"):
            return None
        with h5py.File(self.path, "r") as f:
            reader, where = TraceReader(f, self.path), f"cache/{slot}"
            try:
                if not isinstance(reader.node(where), h5py.Group) or reader.attribute(where, "key") != key:
                    return None
                problem = _layout_problem(reader, where, expected)
                if problem is None:
                    tensors = {
                        name: torch.from_numpy(reader.array(f"{where}/{name}", [shape], kinds="f"))
                        for name, shape in expected.items()
                    }
                    if all(bool(t.isfinite().all()) for t in tensors.values()):
                        return tensors
                    problem = "non-finite values"
            except TraceError as err:  # links out of the file, virtual datasets, unreadable parts
                problem = str(err)
        warnings.warn(
            f"The cached fit {slot!r} in {self.path} does not fit the trace's layers ({problem}); it is refitted "
            f"and replaced.",
            stacklevel=2,
        )
        return None

    def store(self, slot: str, key: str, tensors: Mapping[str, Tensor], description: str) -> None:
        """Write the fit of ``slot`` under ``key``, replacing the slot's previous entry. A write that fails
        (a full disk) is warned about and leaves the file as it was; attribution goes on without the cache."""
        if not self.enabled:
            return
        arrays = {name: t.detach().cpu().numpy() for name, t in tensors.items()}
        try:
            self._store(slot, key, arrays, description)
        except (TraceWriteError, OSError) as err:
            warnings.warn(
                f"The fit {slot!r} could not be cached ({err}); attribution goes on without it.", stacklevel=3
            )

    def _store(self, slot: str, key: str, arrays: Mapping[str, np.ndarray], description: str) -> None:
        estimate = sum(array.nbytes for array in arrays.values()) + OBJECT_OVERHEAD * (2 * len(arrays) + 2)
        if self.location == "trace":
            with writing(self.path, estimate) as f:
                _put_entry(TraceReader(f, self.path), slot, key, arrays, description)
            return
        state = self._usable_sidecar()
        if state == "current":
            with writing(self.path, estimate) as f:
                reader = TraceReader(f, self.path)
                current = reader.node(f"cache/{slot}")
                if current is None or (
                    isinstance(current, h5py.Group) and _same_layout(reader, f"cache/{slot}", arrays)
                ):
                    _put_entry(reader, slot, key, arrays, description)
                    return
        self._rewrite_sidecar(slot, key, arrays, description, keep_others=state == "current")

    def _rewrite_sidecar(
        self, slot: str, key: str, arrays: Mapping[str, np.ndarray], description: str, keep_others: bool
    ) -> None:
        """Write a new sidecar holding the other slots' entries (if kept) and this one, then swap it in."""
        temporary = self.path.with_name(self.path.name + ".tmp")
        try:
            with TraceLock(self.path, timeout=WRITE_LOCK_TIMEOUT), h5py.File(temporary, "w", libver=LIBVER) as new:
                new.attrs["format"] = CACHE_FORMAT
                new.attrs["trace_run_id"] = self.trace.run_id
                cache = new.create_group("cache")
                if keep_others:
                    with h5py.File(self.path, "r") as old:
                        reader = TraceReader(old, self.path)
                        for name in reader.members("cache"):
                            if name != slot:
                                old.copy(reader.node(f"cache/{name}"), cache, name=name)
                _put_entry(TraceReader(new, temporary), slot, key, arrays, description)
            os.replace(temporary, self.path)
            mark_parsed(self.path)  # written here
        finally:
            temporary.unlink(missing_ok=True)
