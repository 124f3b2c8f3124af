"""Trace and cache sizes over repeated attribution calls on a ResNet, for each cache location.

A ResNet of basic blocks (``lightning_tda.demo.ResNet``) is trained once on synthetic images with
TDACallback. Then, for each cache location (``sidecar``, the default; ``trace``; ``none``), a fresh copy
of the trace goes through the same sequence of attribution calls, each saving its scores into the
trace as ``lightning-tda attribute`` does: EK-FAC, SOURCE, both again with the same options, both with
another correction subset (a refit of every cached slot), both again. Reported: the trace's and the
sidecar's size after every call, and the cache entries left at the end.

    python benchmarks/bench_trace_size.py            # ResNet width 16, blocks [1, 1, 1, 1], 8x8 images
    python benchmarks/bench_trace_size.py --quick    # width 8, no BENCHMARKS.md section
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LOCATIONS = ("sidecar", "trace", "none")


def calls(subset: int) -> list[tuple[str, dict]]:
    """The attribution calls, in order: (label, options shared by EK-FAC and SOURCE)."""
    same, other = {"correction_examples": subset}, {"correction_examples": subset // 2}
    return [
        ("1: EK-FAC", {"ekfac": same}),
        ("2: SOURCE", {"source": same}),
        ("3: both again", {"ekfac": same, "source": same}),
        ("4: both, other subset", {"ekfac": other, "source": other}),
        ("5: both again", {"ekfac": other, "source": other}),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller model and data; print only")
    args = parser.parse_args()

    import h5py
    import lightning as L
    import torch
    from torch.utils.data import Subset

    from benchmarks.report import markdown_table, write_section
    from lightning_tda import ClassificationTask, TDACallback, Trace
    from lightning_tda.demo import ResNet, SyntheticImageDataModule, headless_trainer
    from lightning_tda.methods import SOURCE, EKFACInfluence, MethodOptions
    from lightning_tda.trace.cache import sidecar_path

    torch.set_num_threads(1)
    size, examples, width = 8, 300, (8 if args.quick else 16)
    subset, queries = 64, 4
    options = MethodOptions(batch_size=32)  # per-example conv gradients of 32 examples at a time: under 3 GB
    L.seed_everything(0, verbose=False)
    data = SyntheticImageDataModule(num_examples=examples, size=size, batch_size=32, test_fraction=0.2)
    task = ClassificationTask()

    def model() -> ResNet:
        return ResNet(width=width, blocks=[1, 1, 1, 1])

    with tempfile.TemporaryDirectory() as tmp:
        recorded = Path(tmp) / "recorded.h5"
        callback = TDACallback(str(recorded), task=task, segments=3, checkpoints_per_segment=1)
        headless_trainer(max_epochs=3, limit_val_batches=0, callbacks=[callback]).fit(model(), data)
        train, query_set = data.train_set, Subset(data.test_set, range(queries))
        rows, finals = [], []
        sizes = {"recorded": recorded.stat().st_size}
        for location in LOCATIONS:
            path = Path(tmp) / location / "trace.h5"
            path.parent.mkdir()
            shutil.copy(recorded, path)
            for label, methods in calls(subset):
                start = time.perf_counter()
                for name, settings in methods.items():
                    cls = EKFACInfluence if name == "ekfac" else SOURCE
                    method = cls(Trace.open(path), model(), task, cache=location, options=options, **settings)
                    method.attribute(query_set, train).save(path)
                    method.self_influence(train).save(path)
                sidecar = sidecar_path(path)
                rows.append(
                    [
                        location,
                        label,
                        f"{path.stat().st_size / 1e6:.2f}",
                        f"{sidecar.stat().st_size / 1e6:.2f}" if sidecar.exists() else "-",
                        f"{time.perf_counter() - start:.1f}",
                    ]
                )
                print(*rows[-1], sep="  |  ", flush=True)
            cache_file = sidecar_path(path) if location == "sidecar" else path
            with h5py.File(cache_file, "r") if cache_file.exists() else nullcontext() as f:
                finals.append(f"{location}: {sorted(f['cache']) if f is not None else []}")
    table = markdown_table(["cache", "after call", "trace MB", "sidecar MB", "seconds"], rows)
    print(table, *finals, sep="\n")
    if args.quick:
        return
    body = (
        f"ResNet(width={width}, blocks=[1, 1, 1, 1]) on {examples} synthetic {size}x{size} images, 3 epochs, 3 "
        f"segments x 1 checkpoint: the recorded trace is {sizes['recorded'] / 1e6:.2f} MB. Each call saves its "
        f"scores and self-influence into the trace ({queries} queries); calls 4-5 use another correction subset "
        f"({subset // 2} instead of {subset} examples), which refits every cached slot.\n\n"
        f"{table}\n\nCache entries left at the end (one per slot, replaced on refit): "
        + "; ".join(finals)
        + ".\n\nThe trace grows on the first call only (by the results); with the default sidecar it never holds "
        "caches, and with cache='trace' refits overwrite their slot in place."
    )
    write_section("trace-size", "Trace and cache sizes over repeated attribution calls", body)


if __name__ == "__main__":
    main()
