"""Reading HDF5 that came from someone else: the checks that make opening a trace safe.

Traces travel (W&B artifacts, a colleague's run, a file left by a crashed process), so every byte read
from one is untrusted. All reads go through a :class:`TraceReader`, which

* refuses what would make HDF5 reach outside the file or load code: soft, external and user-defined
  links, virtual datasets, datasets whose data sits in external files, and filters other than deflate,
  shuffle, fletcher32 and lzf (HDF5 looks any other filter up as a plugin library);
* checks each array's type and shape before reading it, and its declared size against the bytes the file
  really holds for it (a dataset can declare 10⁹ × 10⁹ elements in a few bytes of metadata), so reading
  never allocates more than the file could hold, nor more than the caller's expected shapes;
* reads attributes, names and JSON only up to sane sizes and nesting depths, as the types asked for;
* turns every error of the HDF5 library on a damaged file into a :class:`TraceError` naming the part.

It knows HDF5 and the kinds of values a trace holds, not the trace's layout: :mod:`lightning_tda.trace`
says what each part must be. Nothing here imports torch or Lightning.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

MAX_JSON_BYTES = 1 << 20  # a JSON document (optimizer record, configs)
MAX_JSON_DEPTH = 32
MAX_ATTRIBUTE_BYTES = 1 << 16  # HDF5's own limit for attributes in the earliest file format
MAX_ATTRIBUTES = 256  # per object
MAX_STRING_CHARS = 4096  # names and string attributes
MAX_OBJECTS = 500_000  # groups and datasets in one file
MAX_DEPTH = 16  # group nesting
MAX_RANK = 4
MAX_CHUNK_BYTES = 64 << 20
MAX_COMPRESSION_RATIO = 1100  # deflate cannot compress better than about 1032:1
ALLOWED_FILTERS = {
    h5py.h5z.FILTER_DEFLATE: "gzip",
    h5py.h5z.FILTER_SHUFFLE: "shuffle",
    h5py.h5z.FILTER_FLETCHER32: "fletcher32",
    32000: "lzf",
}
_COMPRESSING_FILTERS = {h5py.h5z.FILTER_DEFLATE, 32000}
# What h5py raises on a damaged file (HDF5's error stack is mapped onto these), plus what decoding raises.
READ_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError, OverflowError)
DAMAGED = "The file is damaged or was not written by lightning_tda; record the trace again or use an intact copy."


class TraceError(RuntimeError):
    """A trace file cannot be used as asked (missing, corrupt, too new, or not matching the model)."""


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


class TraceReader:
    """Checked reads from an open HDF5 file. Every error names ``path`` and the part of the file.

    Paths are ``/``-separated from the root (``"segments/0001/kfac/net.0/A_sum"``); attributes are
    addressed by their object's path and their name.
    """

    def __init__(self, file: h5py.File, path: Path) -> None:
        self.file = file
        self.path = path
        self._nodes: dict[str, Any] = {}  # objects looked up so far, by path

    # --- errors ---------------------------------------------------------------------------------
    def error(self, where: str, problem: str, hint: str = DAMAGED) -> TraceError:
        return TraceError(f"{self.path}: {where or '/'}: {problem}. {hint}".rstrip())

    @contextmanager
    def part(self, where: str) -> Iterator[None]:
        """Turn HDF5 and decoding errors raised inside the block into a :class:`TraceError` on ``where``."""
        try:
            yield
        except TraceError:
            raise
        except RecursionError as err:
            raise self.error(where, "is nested too deeply to read") from err
        except READ_ERRORS as err:
            raise self.error(where, f"cannot be read ({type(err).__name__}: {str(err)[:200]})") from err

    # --- structure ------------------------------------------------------------------------------
    def check_structure(self) -> None:
        """Walk every group: refuse links that leave the object tree, cycles, and absurd sizes.

        Only hard links are allowed (the writer creates nothing else); a soft link could loop and an
        external link would make HDF5 open another file. Datasets themselves are checked when read.
        """
        seen: set[int] = set()
        stack = [("", self.file, 0)]
        count = 0
        while stack:
            where, group, depth = stack.pop()
            with self.part(where):
                address = h5py.h5o.get_info(group.id).addr
                if address in seen:
                    raise self.error(where, "is reached twice (a cycle or a shared group)")
                seen.add(address)
                for name in self._names(group, where):
                    child = f"{where}/{name}".lstrip("/")
                    self._check_link(group, name, child)
                    count += 1
                    if count > MAX_OBJECTS:
                        raise self.error(where, f"the file holds more than {MAX_OBJECTS:,} objects")
                    if h5py.h5o.get_info(group.id, name.encode()).type == h5py.h5o.TYPE_GROUP:
                        if depth + 1 > MAX_DEPTH:
                            raise self.error(child, f"groups are nested deeper than {MAX_DEPTH} levels")
                        stack.append((child, group[name], depth + 1))

    def _names(self, group: h5py.Group, where: str) -> list[str]:
        names = []
        for name in group:
            if len(names) >= MAX_OBJECTS:
                raise self.error(where, f"holds more than {MAX_OBJECTS:,} members")
            if not name or len(name) > MAX_STRING_CHARS or "\x00" in name:
                raise self.error(where, f"holds a member with an invalid name {name[:80]!r}")
            names.append(name)
        return names

    def _check_link(self, group: h5py.Group, name: str, where: str) -> None:
        kind = group.id.links.get_info(name.encode()).type
        if kind == h5py.h5l.TYPE_SOFT:
            raise self.error(where, "is a soft link; a trace holds only plain groups and datasets")
        if kind == h5py.h5l.TYPE_EXTERNAL:
            raise self.error(where, "is an external link to another file, which is refused")
        if kind != h5py.h5l.TYPE_HARD:
            raise self.error(where, f"is a user-defined link (type {kind}), which is refused")

    def node(self, where: str) -> h5py.Group | h5py.Dataset | None:
        """The object at ``where`` (``None`` if absent), following hard links only."""
        where = where.strip("/")
        if where in self._nodes:
            return self._nodes[where]
        parent_path, _, name = where.rpartition("/")
        parent = self.node(parent_path) if where else None
        if not where:
            item: Any = self.file
        elif parent is None:
            item = None
        elif not isinstance(parent, h5py.Group):
            raise self.error(parent_path, "is a dataset where a group was expected")
        else:
            with self.part(where):
                if not parent.id.links.exists(name.encode()):
                    item = None
                else:
                    self._check_link(parent, name, where)
                    item = parent[name]
                    if not isinstance(item, (h5py.Group, h5py.Dataset)):
                        raise self.error(where, f"is a {type(item).__name__}, not a group or dataset")
        self._nodes[where] = item
        return item

    def has(self, where: str) -> bool:
        return self.node(where) is not None

    def group(self, where: str) -> h5py.Group:
        return self._object(where, h5py.Group)

    def members(self, where: str) -> list[str]:
        """Names of the members of group ``where``."""
        group = self.group(where)
        with self.part(where):
            return self._names(group, where)

    def dataset(self, where: str) -> h5py.Dataset:
        """Dataset ``where``, refused if its data would come from outside the file or through a plugin."""
        item = self._object(where, h5py.Dataset)
        with self.part(where):
            plist = item.id.get_create_plist()
            if plist.get_layout() == h5py.h5d.VIRTUAL:
                raise self.error(where, "is a virtual dataset (its data would come from other files), which is refused")
            if plist.get_external_count():
                raise self.error(where, "keeps its data in an external file, which is refused")
            for index in range(plist.get_nfilters()):
                code = plist.get_filter(index)[0]
                if code not in ALLOWED_FILTERS:
                    raise self.error(
                        where,
                        f"uses HDF5 filter {code}; only {', '.join(ALLOWED_FILTERS.values())} are read "
                        f"(others would be loaded as plugins)",
                    )
        return item

    # --- arrays ---------------------------------------------------------------------------------
    def shape_of(self, where: str, kinds: str = "fiu") -> tuple[int, ...]:
        """Shape of a numeric dataset, its type checked, nothing read."""
        return self._numeric(where, kinds)[1]

    def _numeric(self, where: str, kinds: str) -> tuple[h5py.Dataset, tuple[int, ...]]:
        dataset = self.dataset(where)
        with self.part(where):
            shape = self._checked_shape(dataset, where)
            dtype = dataset.dtype
            if (
                dtype.kind not in kinds
                or dtype.fields is not None
                or dtype.subdtype is not None
                or dtype.itemsize > 8
                or h5py.check_vlen_dtype(dtype) is not None
            ):
                raise self.error(where, f"has dtype {dtype}, expected {_kinds_text(kinds)}")
        return dataset, shape

    def array(
        self,
        where: str,
        shapes: Collection[tuple[int, ...]] | None = None,
        kinds: str = "fiu",
        finite: bool = False,
    ) -> np.ndarray:
        """Read a numeric dataset after checking its type and shape; native byte order.

        Args:
            where: dataset path.
            shapes: the shapes it may have (``None``: any of rank at most ``MAX_RANK``).
            kinds: allowed numpy kinds (``f`` float, ``i``/``u`` integer, ``b`` bool).
            finite: refuse NaN and Inf.
        """
        dataset, shape = self._numeric(where, kinds)
        with self.part(where):
            if shapes is not None and shape not in {tuple(s) for s in shapes}:
                expected = " or ".join(str(tuple(s)) for s in shapes)
                raise self.error(where, f"has shape {shape}, expected {expected}")
            self._check_storage(dataset, where, shape)
            value = np.asarray(dataset[()])
        if value.dtype.byteorder not in "=|":
            value = value.astype(value.dtype.newbyteorder("="))
        if finite and value.dtype.kind == "f" and not np.isfinite(value).all():
            raise self.error(where, "holds NaN or Inf")
        return value

    def _checked_shape(self, dataset: h5py.Dataset, where: str) -> tuple[int, ...]:
        shape = dataset.shape
        if shape is None:
            raise self.error(where, "has no dataspace (an empty dataset)")
        if len(shape) > MAX_RANK:
            raise self.error(where, f"has {len(shape)} dimensions, at most {MAX_RANK} are expected")
        return tuple(int(n) for n in shape)

    def _check_storage(self, dataset: h5py.Dataset, where: str, shape: tuple[int, ...]) -> None:
        """Refuse a dataset that declares more data than the file holds for it."""
        element = max(dataset.id.get_type().get_size(), dataset.dtype.itemsize)
        declared = math.prod(shape) * element
        if declared == 0:
            return
        plist = dataset.id.get_create_plist()
        if dataset.chunks is not None:
            chunk = math.prod(dataset.chunks) * element
            if chunk > max(MAX_CHUNK_BYTES, declared):
                raise self.error(where, f"has chunks of {chunk:,} bytes for {declared:,} bytes of data")
        filters = {plist.get_filter(i)[0] for i in range(plist.get_nfilters())}
        ratio = MAX_COMPRESSION_RATIO if filters & _COMPRESSING_FILTERS else 1
        stored = dataset.id.get_storage_size()
        if declared > stored * ratio:
            raise self.error(
                where, f"declares shape {shape} ({declared:,} bytes) but the file holds only {stored:,} bytes of it"
            )

    def strings(self, where: str, max_count: int) -> list[str]:
        """A 1-D dataset of at most ``max_count`` strings, each at most ``MAX_STRING_CHARS`` long."""
        dataset = self.dataset(where)
        with self.part(where):
            shape = self._checked_shape(dataset, where)
            if h5py.check_string_dtype(dataset.dtype) is None or len(shape) != 1:
                raise self.error(where, f"has dtype {dataset.dtype} and shape {shape}, expected a list of strings")
            if shape[0] > max_count:
                raise self.error(where, f"holds {shape[0]:,} strings, at most {max_count:,} are expected")
            self._check_storage(dataset, where, shape)
            values = [_decoded(value) for value in dataset[()]]
        for value in values:
            if len(value) > MAX_STRING_CHARS:
                raise self.error(where, f"holds a string of {len(value):,} characters")
        return values

    def text(self, where: str, max_bytes: int = MAX_JSON_BYTES) -> str:
        """A scalar string dataset of at most ``max_bytes`` bytes."""
        dataset = self.dataset(where)
        with self.part(where):
            if h5py.check_string_dtype(dataset.dtype) is None or dataset.shape != ():
                raise self.error(where, f"has dtype {dataset.dtype} and shape {dataset.shape}, expected one string")
            raw = dataset[()]
            raw = raw.encode() if isinstance(raw, str) else bytes(raw)
            if len(raw) > max_bytes:
                raise self.error(where, f"holds {len(raw):,} bytes, at most {max_bytes:,} are expected")
            return raw.decode("utf-8")

    def json(self, where: str, expected: type = dict) -> Any:
        """A JSON document stored as a string dataset: at most ``MAX_JSON_BYTES``, ``MAX_JSON_DEPTH`` deep."""
        text = self.text(where)
        with self.part(where):
            value = json.loads(text)
        if not isinstance(value, expected):
            raise self.error(where, f"holds JSON {type(value).__name__}, expected {expected.__name__}")
        if _depth(value) > MAX_JSON_DEPTH:
            raise self.error(where, f"holds JSON nested deeper than {MAX_JSON_DEPTH} levels")
        return value

    # --- attributes -----------------------------------------------------------------------------
    def attributes(self, where: str) -> dict[str, Any]:
        """All attributes of an object as Python values (str, int, float, bool or a list of numbers)."""
        item = self._object(where)
        with self.part(where):
            names = list(item.attrs)
        if len(names) > MAX_ATTRIBUTES:
            raise self.error(where, f"has {len(names):,} attributes, at most {MAX_ATTRIBUTES} are expected")
        return {name: self._attribute(item, where, name) for name in names}

    def attribute(self, where: str, name: str) -> Any:
        """One attribute as a Python value, or ``None`` if the object has no such attribute."""
        item = self._object(where)
        with self.part(where):
            if name not in item.attrs:
                return None
        return self._attribute(item, where, name)

    def _object(self, where: str, kind: type | None = None) -> Any:
        """The object at ``where``, which must exist (and be a ``kind``: group or dataset, if given)."""
        item = self.node(where)
        if item is None:
            raise self.error(where, "is missing")
        if kind is not None and not isinstance(item, kind):
            expected, found = ("group", "dataset") if kind is h5py.Group else ("dataset", "group")
            raise self.error(where, f"is a {found} where a {expected} was expected")
        return item

    def _attribute(self, item: h5py.HLObject, where: str, name: str) -> Any:
        place = f"{where or '/'} attribute {name!r}"
        with self.part(place):
            attribute = item.attrs.get_id(name)
            shape = attribute.shape
            dtype = attribute.dtype
            if len(shape) > 1 or attribute.get_storage_size() > MAX_ATTRIBUTE_BYTES:
                raise self.error(place, f"has shape {shape}, expected a scalar or a short list")
            string = h5py.check_string_dtype(dtype) is not None
            if not string and (dtype.kind not in "fiub" or dtype.fields is not None or dtype.subdtype is not None):
                raise self.error(place, f"has dtype {dtype}, expected a number, a flag or a string")
            value = item.attrs[name]
            if string:
                if shape != ():
                    raise self.error(place, "is a list of strings, expected one string")
                value = _decoded(value)
                if len(value) > MAX_STRING_CHARS:
                    raise self.error(place, f"is a string of {len(value):,} characters")
                return value
            value = np.asarray(value)
            if value.dtype.byteorder not in "=|":
                value = value.astype(value.dtype.newbyteorder("="))
            return value.tolist()


# --- values read from attributes, checked as the schema expects ----------------------------------
def expect_int(reader: TraceReader, where: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """An integer attribute value in ``[low, high]`` (bools are not integers here)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise reader.error(where, f"is {_shown(value)}, expected an integer")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}" if low is not None else f"≤ {high}"
        raise reader.error(where, f"is {_brief(value)}, expected an integer {bounds}")
    return value


def expect_float(reader: TraceReader, where: str, value: Any, low: float | None = None) -> float:
    """A finite number (at least ``low``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise reader.error(where, f"is {_shown(value)}, expected a number")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number) or (low is not None and number < low):
        raise reader.error(where, f"is {_brief(value)}, expected a finite number{'' if low is None else f' ≥ {low}'}")
    return number


def expect_bool(reader: TraceReader, where: str, value: Any) -> bool:
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise reader.error(where, f"is {_shown(value)}, expected true or false")


def expect_str(reader: TraceReader, where: str, value: Any, choices: Collection[str] | None = None) -> str:
    if not isinstance(value, str):
        raise reader.error(where, f"is {_shown(value)}, expected a string")
    if choices is not None and value not in choices:
        raise reader.error(where, f"is {value!r}, expected one of {', '.join(map(repr, choices))}")
    return value


def expect_floats(reader: TraceReader, where: str, value: Any, length: int, low: float | None = None) -> np.ndarray:
    """A list of ``length`` finite numbers (a scalar counts as a list of one)."""
    values = value if isinstance(value, list) else [value]
    if len(values) != length:
        raise reader.error(where, f"has {_plural(len(values), 'value')}, expected {length}")
    return np.asarray([expect_float(reader, where, v, low) for v in values], dtype=np.float64)


def _shown(value: Any) -> str:
    return f"{type(value).__name__} {_brief(value)}"


def _brief(value: Any) -> str:
    try:
        text = repr(value)
    except ValueError:  # an integer too long to print
        return "a number with thousands of digits"
    return text if len(text) <= 60 else f"{text[:57]}..."


def _decoded(value: Any) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8")
    if isinstance(value, str):
        return value
    raise TypeError(f"expected a string, found {type(value).__name__}")


def _kinds_text(kinds: str) -> str:
    names = {"f": "floats", "i": "integers", "u": "unsigned integers", "b": "booleans"}
    return " or ".join(names[k] for k in kinds)


def _depth(value: Any) -> int:
    """Nesting depth of a JSON value, computed without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth > MAX_JSON_DEPTH:
                break
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest
