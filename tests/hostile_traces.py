"""A small valid trace and the ways a trace file can be broken or made hostile (tests only).

``record_base_trace`` trains a tiny Adam MLP with the callback (2 segments, checkpoints, Adam second
moments), attributes with SOURCE (which caches its curvature in the trace) and saves the scores, so
every group of the schema is present. ``mutate`` applies random mutations of the kinds a damaged or
hostile file has: flipped bytes, deleted or resized datasets, attributes and JSON rewritten with random
values, swapped dtypes, links and virtual datasets pointing out of the file, NaN/Inf and negative
values. ``exercise`` does with a trace what a user does (open, inspect, read every tensor, load every
checkpoint, read scores, attribute) and reports what happened.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import TensorDataset

SIZES = [8, 6, 3]
N_TRAIN, N_QUERIES = 32, 2
DOCUMENTED = (ValueError,)  # besides TraceError: what the library documents for bad input


def model():
    from lightning_tda.demo import MLPClassifier

    torch.manual_seed(0)
    return MLPClassifier(sizes=SIZES, lr=0.05, optimizer="adam")


def task():
    from lightning_tda import ClassificationTask

    return ClassificationTask()


def data() -> tuple[TensorDataset, TensorDataset]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN + N_QUERIES, SIZES[0], generator=generator)
    y = torch.randint(0, SIZES[-1], (N_TRAIN + N_QUERIES,), generator=generator)
    return TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), TensorDataset(x[N_TRAIN:], y[N_TRAIN:])


def attribute(trace: Any, cache: str = "trace") -> Any:
    """Fast SOURCE scores of the queries; the fitted curvature is cached inside the trace (read back if there)."""
    from lightning_tda.methods import SOURCE, MethodOptions

    train, queries = data()
    method = SOURCE(trace, model(), task(), fast=True, samples=1, cache=cache, options=MethodOptions(batch_size=16))
    return method.attribute(queries, train)


def record_base_trace(path: Path) -> Path:
    """Train, attribute (caching curvature in the trace) and save scores into ``path``."""
    import lightning as L
    from torch.utils.data import DataLoader

    from lightning_tda import TDACallback, Trace
    from lightning_tda.demo import headless_trainer

    L.seed_everything(0, verbose=False)
    train, _ = data()
    callback = TDACallback(str(path), task=task(), segments=2, every_n_steps=1, checkpoints_per_segment=2)
    trainer = headless_trainer(max_epochs=2, callbacks=[callback], num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model(), DataLoader(train, batch_size=8))
    scores = attribute(Trace.open(path))
    scores.save(path)
    return path


# ------------------------------------------------------------------------------------ exercising
def exercise(path: Path, with_attribution: bool = True) -> list[tuple[str, str]]:
    """Use the trace as a user would; one ``(operation, outcome)`` per operation.

    Outcome ``"ok"``, ``"error: <type>"`` for a documented error, or ``"UNDOCUMENTED <type>: ..."``.
    The attribution (SOURCE, reading the curvature cached in the trace) is the slowest operation.
    """
    from lightning_tda import Trace, TraceError
    from lightning_tda.scores import Scores

    outcomes: list[tuple[str, str]] = []

    def attempt(name: str, operation: Callable[[], Any]) -> Any:
        try:
            result = operation()
        except (TraceError, *DOCUMENTED) as err:
            outcomes.append((name, f"error: {type(err).__name__}"))
            return None
        except Exception as err:  # noqa: BLE001 - anything else is what the fuzzer hunts for
            outcomes.append((name, f"UNDOCUMENTED {type(err).__name__}: {str(err)[:300]}"))
            return None
        outcomes.append((name, "ok"))
        return result if result is not None else True

    for name in attempt("available", lambda: Scores.available(path)) or []:
        attempt(f"load scores {name}", lambda name=name: Scores.load(path, name))
    trace = attempt("open", lambda: Trace.open(path))
    if trace is None:
        return outcomes
    attempt("summary", trace.summary)
    for segment in trace.segments:
        for layer in trace.layer_names:
            attempt(f"covariances {segment.index} {layer}", lambda s=segment.index, la=layer: trace.covariances(s, la))
            attempt(
                f"preconditioner {segment.index} {layer}", lambda s=segment.index, la=layer: trace.preconditioner(s, la)
            )
    target = model()
    for checkpoint in trace.checkpoints:
        attempt(f"checkpoint {checkpoint.index}", lambda c=checkpoint.index: trace.load_checkpoint(target, c))
    if with_attribution:
        attempt("attribute", lambda: attribute(trace))
    return outcomes


# ------------------------------------------------------------------------------------ mutations
def _objects(f: h5py.File) -> tuple[list[str], list[str]]:
    """Paths of every dataset and group (hard links only)."""
    datasets, groups = [], []

    def visit(name: str, item: Any) -> None:
        (datasets if isinstance(item, h5py.Dataset) else groups).append(name)

    f.visititems(visit)
    return sorted(datasets), sorted(groups)


def _raw_ranges(f: h5py.File) -> list[tuple[int, int]]:
    """Byte ranges of dataset contents (everything else in the file is HDF5 metadata)."""
    ranges = []
    for name in _objects(f)[0]:
        dataset = f[name]
        offset = dataset.id.get_offset()
        if offset is not None:
            ranges.append((offset, offset + dataset.id.get_storage_size()))
        elif dataset.chunks is not None:
            for index in range(dataset.id.get_num_chunks()):
                info = dataset.id.get_chunk_info(index)
                ranges.append((info.byte_offset, info.byte_offset + info.size))
    return ranges


def flip_bytes(path: Path, rng: random.Random) -> str:
    """Flip bits, mostly in HDF5 metadata (flips in raw data only change numbers)."""
    with h5py.File(path, "r") as f:
        raw = _raw_ranges(f)
    data = bytearray(path.read_bytes())
    is_metadata = np.ones(len(data), dtype=bool)
    for start, end in raw:
        is_metadata[start:end] = False
    metadata = np.flatnonzero(is_metadata) if rng.random() < 0.8 else np.arange(len(data))
    flips = rng.randint(1, 12)
    for _ in range(flips):
        data[int(metadata[rng.randrange(len(metadata))])] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return f"flip {flips} bits"


def random_json(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON value, sometimes absurd (huge, deep, non-finite, wrong type)."""
    choice = rng.randrange(12)
    if choice == 0:
        return rng.choice([-1, 0, 1, 2**63, -(2**63), 10**30, 7])
    if choice == 1:
        return rng.choice([float("nan"), float("inf"), -0.5, 1e308, 0.1])
    if choice == 2:
        return "".join(rng.choice("ab/\\\x00é ") for _ in range(rng.choice([0, 5, 3000])))
    if choice == 3:
        return rng.choice([True, False, None])
    if choice in (4, 5) and depth < 4:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if choice in (6, 7) and depth < 4:
        keys = ["lr", "class", "name", "param_groups", "momentum", "betas", "weight_decay", "eps", "x"]
        return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randint(0, 5))}
    if choice == 8:
        return json.loads("[" * 50 + "]" * 50)
    return rng.choice([{}, [], "", 0])


def _json_text(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return "[" * rng.choice([100, 5000, 200_000]) + "]" * 10
    if kind == 1:
        return json.dumps({"class": "x" * rng.choice([10, 2_000_000])})
    if kind == 2:
        return "{" + "not json"
    return json.dumps(random_json(rng))


def _random_attribute(rng: random.Random) -> Any:
    kind = rng.randrange(10)
    if kind == 0:
        return np.int64(rng.choice([-1, -(2**62), 2**62, 0, 10**9]))
    if kind == 1:
        return np.float64(rng.choice([float("nan"), float("inf"), -1.0, 1e300]))
    if kind == 2:
        return "".join(rng.choice("xyz/é\x01") for _ in range(rng.choice([0, 3, 5000])))
    if kind == 3:
        return np.bool_(rng.random() < 0.5)
    if kind == 4:
        return np.arange(rng.choice([0, 2, 7, 2000]), dtype=rng.choice([np.int8, np.float32, np.uint64]))
    if kind == 5:
        return json.dumps(random_json(rng))
    if kind == 6:
        return np.array([b"a", b"bc"])
    if kind == 7:
        return np.zeros((2, 2))
    if kind == 8:
        return np.complex128(1 + 2j)
    return np.float64(rng.choice([0.5, 3.0, -0.0]))


def rewrite_attribute(f: h5py.File, rng: random.Random) -> str:
    datasets, groups = _objects(f)
    target = rng.choice(groups + datasets + ["/"])
    names = list(f[target].attrs)
    name = rng.choice(names) if names and rng.random() < 0.8 else rng.choice(["index", "kind", "x"])
    value = _random_attribute(rng)
    try:
        f[target].attrs[name] = value
    except (TypeError, ValueError, OSError, RuntimeError):  # h5py cannot store it: delete instead
        if name in f[target].attrs:
            del f[target].attrs[name]
        return f"delete attribute {target}:{name}"
    return f"attribute {target}:{name} = {repr(value)[:60]}"


def rewrite_json(f: h5py.File, rng: random.Random) -> str:
    candidates = ["meta/optimizer", "meta/config"] + [p for p in _objects(f)[0] if p.endswith("/config")]
    target = rng.choice(candidates)
    text = _json_text(rng)
    del f[target]
    f.create_dataset(target, data=text)
    return f"json {target} = {text[:60]!r}"


def delete_object(f: h5py.File, rng: random.Random) -> str:
    datasets, groups = _objects(f)
    target = rng.choice(datasets + groups)
    del f[target]
    return f"delete {target}"


def resize_dataset(f: h5py.File, rng: random.Random) -> str:
    target = rng.choice(_objects(f)[0])
    old = f[target]
    dtype = old.dtype if old.dtype.kind in "fiub" else np.float64
    shape = old.shape or ()
    kind = rng.randrange(6)
    del f[target]
    if kind == 0:  # declared huge, nothing stored
        huge = tuple(10**9 for _ in range(max(1, len(shape))))
        f.create_dataset(target, shape=huge, dtype=dtype, chunks=(1,) * len(huge), maxshape=(None,) * len(huge))
        return f"resize {target} to {huge} (unallocated)"
    new = {
        1: tuple(n + 1 for n in shape),
        2: tuple(max(0, n - 1) for n in shape),
        3: shape[::-1],
        4: (),
        5: (*shape, 2),
    }[kind]
    f.create_dataset(target, data=np.ones(new, dtype=dtype))
    return f"resize {target} {shape} -> {new}"


def _small(f: h5py.File) -> list[str]:
    """Datasets small enough to read here (not the huge ones an earlier mutation declared)."""
    return [p for p in _objects(f)[0] if f[p].shape is not None and f[p].size <= 10**6]


def swap_dtype(f: h5py.File, rng: random.Random) -> str:
    target = rng.choice(_small(f))
    old = f[target]
    shape = old.shape or ()
    values = old[()] if old.dtype.kind in "fiub" else np.zeros(shape)
    attrs = dict(old.attrs)
    del f[target]
    kind = rng.randrange(9)
    if kind == 0:
        data = np.asarray(values, dtype=np.float64).astype(">f8")
    elif kind == 1:
        data = np.asarray(values).astype(rng.choice([np.int8, np.uint64, np.float16, np.bool_]))
    elif kind == 2:
        data = np.asarray(values).astype(np.complex64)
    elif kind == 3:
        f.create_dataset(target, shape=shape, dtype=h5py.string_dtype())
        return f"dtype {target} -> vlen str"
    elif kind == 4:
        f.create_dataset(target, shape=shape, dtype=h5py.ref_dtype)
        return f"dtype {target} -> object references"
    elif kind == 5:
        data = np.zeros(shape, dtype=[("a", "f8"), ("b", "i4")])
    elif kind == 6:
        data = np.full(shape, b"12", dtype="S2")
    elif kind == 7:
        f.create_dataset(target, shape=shape, dtype=h5py.vlen_dtype(np.float64))
        return f"dtype {target} -> vlen float"
    else:
        data = np.asarray(values).astype(np.float32)
    f.create_dataset(target, data=data)
    f[target].attrs.update(attrs)
    return f"dtype {target} -> {data.dtype}"


def poison_values(f: h5py.File, rng: random.Random) -> str:
    """NaN/Inf, negative or asymmetric values in a numeric dataset."""
    numeric = [p for p in _small(f) if f[p].dtype.kind in "fi" and f[p].size]
    target = rng.choice(numeric)
    values = np.array(f[target][()], dtype=f[target].dtype)
    flat = values.reshape(-1)
    kind = rng.randrange(3)
    if kind == 0 and values.dtype.kind == "f":
        flat[rng.randrange(flat.size)] = rng.choice([np.nan, np.inf, -np.inf])
    elif kind == 1:
        flat[rng.randrange(flat.size)] = -abs(flat[rng.randrange(flat.size)]) - 1
    elif values.ndim == 2 and values.shape[0] == values.shape[1] and values.shape[0] > 1:
        values[0, 1] += 1.0 + abs(values[0, 1])
    else:
        flat[:] = flat[::-1]
    f[target][...] = values
    return f"values of {target} ({['non-finite', 'negative', 'asymmetric'][kind]})"


def link_outside(f: h5py.File, rng: random.Random, outside: Path) -> str:
    """Replace an object by a link or dataset that reaches outside the file (or loops)."""
    datasets, groups = _objects(f)
    target = rng.choice(datasets + groups)
    old = f[target]
    shape, dtype = (old.shape, old.dtype) if isinstance(old, h5py.Dataset) else ((4,), np.dtype(np.float64))
    del f[target]
    kind = rng.randrange(5)
    if kind == 0:
        f[target] = h5py.ExternalLink(str(outside), "/" + target)
    elif kind == 1:
        f[target] = h5py.SoftLink("/" + target.rsplit("/", 1)[0] if "/" in target else "/")
    elif kind == 2:
        layout = h5py.VirtualLayout(shape=shape or (1,), dtype=dtype if dtype.kind in "fiub" else np.float64)
        layout[...] = h5py.VirtualSource(str(outside), target, shape=shape or (1,))
        f.create_virtual_dataset(target, layout)
    elif kind == 3:
        f.create_dataset(target, shape=(16,), dtype=np.float64, external=[(str(outside), 0, 128)])
    else:
        parent = target.rsplit("/", 1)[0] if "/" in target else ""
        f[target] = f[parent] if parent else f["/"]  # a hard link to its own parent: a cycle
    return (
        f"{['external link', 'soft link', 'virtual dataset', 'external storage', 'hard-link cycle'][kind]} at {target}"
    )


H5_MUTATIONS = (rewrite_attribute, rewrite_json, delete_object, resize_dataset, swap_dtype, poison_values)


def mutate(base: Path, out: Path, seed: int, outside: Path) -> str:
    """Write a mutated copy of ``base`` to ``out``; returns what was done.

    A mutation h5py cannot carry out on what earlier ones left (an object already deleted, a cycle) is
    skipped; whatever it changed before failing stays, which is one more way for a file to be broken.
    """
    rng = random.Random(seed)
    out.write_bytes(base.read_bytes())
    done = []

    def attempt(mutation: Callable[..., str], *args: Any) -> None:
        try:
            done.append(mutation(*args))
        except (KeyError, OSError, RuntimeError, ValueError, TypeError, IndexError) as err:
            done.append(f"{mutation.__name__} skipped ({type(err).__name__})")

    if rng.random() < 0.7:
        with h5py.File(out, "a") as f:
            for _ in range(rng.randint(1, 3)):
                if rng.random() < 0.1:
                    attempt(link_outside, f, rng, outside)
                else:
                    attempt(rng.choice(H5_MUTATIONS), f, rng)
    if not done or rng.random() < 0.25:
        attempt(flip_bytes, out, rng)
    return "; ".join(done)


def main(argv: list[str]) -> None:
    """Child process of the fuzz test: ``hostile_traces.py CASE_DIR FIRST MEMORY_MB SECONDS``.

    Exercises ``CASE_DIR/case_<i>.h5`` for ``i = FIRST, FIRST + 1, ...`` as the parent writes them (it
    writes ``CASE_DIR/all-written`` after the last), printing ``START i`` before and ``DONE i <outcomes as
    JSON>`` after each case; every 5th case is also attributed. The address space may grow by ``MEMORY_MB``
    beyond what the process holds once torch, Lightning and the library are imported (a CUDA build of torch
    alone maps about 3.2 GB, so a fixed cap fits no build; an allocation sized by a number in the file becomes
    a MemoryError) and each case gets ``SECONDS`` (SIGALRM ends a hang, and the process with it).
    """
    import os
    import resource
    import signal
    import time

    directory, first, memory, seconds = Path(argv[1]), int(argv[2]), int(argv[3]) << 20, int(argv[4])
    import lightning_tda.trace.probe

    lightning_tda.trace.probe.PARSE_SECONDS = seconds // 3  # a hang inside HDF5 is reported well before the alarm
    torch.set_num_threads(1)
    model()  # imports Lightning and the library before the first case's alarm starts
    with open("/proc/self/statm") as statm:  # the address space now, in pages
        mapped = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (mapped + memory, mapped + memory))
    index = first
    while True:
        case = directory / f"case_{index:04d}.h5"
        waited = time.monotonic()
        while not case.exists():
            if (directory / "all-written").exists() and not case.exists():
                return
            if time.monotonic() - waited > 120:
                raise SystemExit(f"no case {index} after 120 s: the parent is gone")
            time.sleep(0.01)
        print(f"START {index}", flush=True)
        signal.alarm(seconds)
        outcomes = exercise(case, with_attribution=index % 5 == 0)
        signal.alarm(0)
        print(f"DONE {index} {json.dumps(outcomes)}", flush=True)
        index += 1


if __name__ == "__main__":
    import sys
    import warnings

    warnings.filterwarnings("ignore")
    main(sys.argv)
