"""SOURCE: time against EK-FAC influence, peak memory as the training set doubles, and accuracy
against exact unrolled differentiation on linear regression.

Digits MLP (64-128-128-10, 1,437 training examples, 50 test queries) trained 8 epochs with
``TDACallback`` (3 segments x 2 checkpoints, true Fisher). Each measurement runs in a fresh
process (one thread; peak RSS from ``getrusage``) on its own copy of the trace, so no fitted
curvature is shared: "end-to-end" includes the EK-FAC correction passes, "scoring" is a second call
that reuses the fitted curvature. Methods: EK-FAC IF, SOURCE at its defaults, SOURCE with the paper's
query gradient at θ_T, Fast-SOURCE. Times: ``ROUNDS`` interleaved rounds (one process per method per
round, in turn); a ratio is the median over rounds of the within-round ratio. Doubling n repeats the
training set twice (one round, for memory).

    python benchmarks/bench_source.py            # writes the "source" section of BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the exact-unrolling reference lives with its tests

N_QUERIES = 50
ROUNDS = 3
METHODS = ("ekfac", "source", "source-paper", "fast-source")


def train_digits(path: Path) -> None:
    import lightning as L
    from conftest import quiet_trainer

    from lightning_tda import ClassificationTask, TDACallback
    from lightning_tda.demo import DigitsDataModule, MLPClassifier

    L.seed_everything(0, verbose=False)
    trainer = quiet_trainer(max_epochs=8, callbacks=[TDACallback(str(path), task=ClassificationTask())])
    trainer.fit(MLPClassifier(lr=0.1, momentum=0.9), DigitsDataModule(batch_size=64, seed=0))


def child(method: str, trace_path: str, repeat: int) -> dict:
    """One measurement in this (fresh) process: end-to-end time, scoring time, peak RSS."""
    import torch
    from torch.utils.data import ConcatDataset, Subset

    from lightning_tda import ClassificationTask, Trace
    from lightning_tda.demo import DigitsDataModule, MLPClassifier
    from lightning_tda.methods import SOURCE, EKFACInfluence, MethodOptions

    torch.set_num_threads(1)
    dm = DigitsDataModule(batch_size=64, seed=0)
    dm.setup()
    train = ConcatDataset([dm.train_set] * repeat) if repeat > 1 else dm.train_set
    queries = Subset(dm.test_set, range(N_QUERIES))
    trace = Trace.open(trace_path)
    page = resource.getpagesize()
    with open("/proc/self/statm") as statm:
        before_mb = int(statm.read().split()[1]) * page / 2**20  # resident set before attributing

    def build():
        kwargs = {"options": MethodOptions(batch_size=256)}
        if method == "ekfac":
            return EKFACInfluence(trace, MLPClassifier(), ClassificationTask(), **kwargs)
        if method == "source-paper":
            kwargs["query_gradients"] = "final"
        return SOURCE(trace, MLPClassifier(), ClassificationTask(), fast=method == "fast-source", **kwargs)

    start = time.perf_counter()
    scores = build().attribute(queries, train)
    end_to_end = time.perf_counter() - start
    start = time.perf_counter()
    build().attribute(queries, train)
    scoring = time.perf_counter() - start
    return {
        "method": method,
        "n": len(train),
        "end_to_end": end_to_end,
        "scoring": scoring,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "attribution_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before_mb,
        "score_matrix_mb": scores.values.numel() * (8 + 4) / 2**20,  # float64 accumulator + float32 result
        "checkpoints": len(trace.checkpoints),
    }


def run_child(method: str, trace: Path, repeat: int, workdir: Path, round_: int) -> dict:
    copy = workdir / f"{method}-{repeat}-{round_}.h5"  # a fresh copy: no fitted curvature from an earlier round
    shutil.copy(trace, copy)
    out = subprocess.run(
        [sys.executable, __file__, "--child", method, "--trace", str(copy), "--repeat", str(repeat)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def unrolling_accuracy(workdir: Path) -> list[list[object]]:
    """SOURCE vs exact unrolling on full-batch GD linear regression, for more and more segments."""
    import test_source as reference
    import torch

    torch.set_num_threads(1)
    concrete = reference.concrete_data()
    rows = []
    for segments, per_segment in ((1, 1), (1, 2), (3, 2), (10, 2), (30, 2), (50, 3)):
        trace = reference.record(workdir / f"linear-{segments}-{per_segment}.h5", concrete, segments, per_segment)
        lrs = trace.steps().lr[:, 0]
        theta0 = reference.parameters(trace.initial_state())
        trajectory = reference.gradient_descent(concrete, theta0, lrs, torch.ones(1, reference.N_TRAIN).double())
        exact = reference.exact_unrolled_scores(concrete, trajectory, lrs)
        source = reference.source_scores(trace, concrete)
        rows.append(
            [
                segments,
                per_segment,
                f"{reference.mean_pearson(source, exact):.5f}",
                f"{reference.relative_error(source, exact):.4f}",
            ]
        )
    return rows


def main() -> None:
    import numpy as np

    from benchmarks.report import markdown_table, write_section

    workdir = Path(tempfile.mkdtemp(prefix="bench_source_"))
    trace = workdir / "digits.h5"
    train_digits(trace)
    rounds = [{m: run_child(m, trace, 1, workdir, k) for m in METHODS} for k in range(ROUNDS)]
    doubled = {m: run_child(m, trace, 2, workdir, ROUNDS) for m in METHODS}
    n, checkpoints = rounds[0]["ekfac"]["n"], rounds[0]["ekfac"]["checkpoints"]

    def median(method: str, key: str) -> float:
        return float(np.median([r[method][key] for r in rounds]))

    def ratio(method: str, key: str = "end_to_end") -> float:
        return float(np.median([r[method][key] / r["ekfac"][key] for r in rounds]))

    rows = [
        [
            m,
            n,
            round(median(m, "end_to_end"), 2),
            round(median(m, "scoring"), 2),
            round(ratio(m), 2),
            round(ratio(m, "scoring"), 2),
            round(max(r[m]["peak_rss_mb"] for r in rounds), 1),
            round(max(r[m]["attribution_mb"] for r in rounds), 1),
        ]
        for m in METHODS
    ]
    rows += [
        [
            m,
            d["n"],
            round(d["end_to_end"], 2),
            round(d["scoring"], 2),
            round(d["end_to_end"] / doubled["ekfac"]["end_to_end"], 2),
            round(d["scoring"] / doubled["ekfac"]["scoring"], 2),
            round(d["peak_rss_mb"], 1),
            round(d["attribution_mb"], 1),
        ]
        for m, d in doubled.items()
    ]
    growth = {m: doubled[m]["attribution_mb"] - max(r[m]["attribution_mb"] for r in rounds) for m in METHODS}
    more_scores = doubled["source"]["score_matrix_mb"] - rounds[0]["source"]["score_matrix_mb"]
    accuracy = unrolling_accuracy(workdir)
    header = [
        "method",
        "n train",
        "end-to-end s",
        "scoring s (fitted curvature reused)",
        "x EK-FAC IF end-to-end",
        "x EK-FAC IF scoring",
        "peak RSS MB",
        "peak RSS increase while attributing MB",
    ]
    body = f"""
Digits MLP (26k parameters), {n} training examples, {N_QUERIES} queries, {checkpoints} checkpoints
(3 segments x 2); each measurement a fresh process on its own copy of the trace, one thread. `source` is SOURCE
at its defaults (query gradients at the checkpoints), `source-paper` with the paper's query gradient at θ_T. Rows
at n = {n}: median of {ROUNDS} interleaved rounds (ratios: median of the within-round ratios); rows at
n = {2 * n}: one round.

{markdown_table(header, rows)}

Target: SOURCE end-to-end within 3x EK-FAC IF. Measured: SOURCE {ratio("source"):.2f}x end-to-end
({ratio("source", "scoring"):.2f}x for scoring alone), the paper's form {ratio("source-paper"):.2f}x, Fast-SOURCE
{ratio("fast-source"):.2f}x. When n doubles, the peak RSS increase while attributing changes by
{growth["ekfac"]:+.1f} MB (EK-FAC), {growth["source"]:+.1f} MB (SOURCE), {growth["fast-source"]:+.1f} MB
(Fast-SOURCE), against {more_scores:.2f} MB more score matrix: training examples are streamed per batch,
per-example gradients never exist for the whole set.

SOURCE (the paper's query gradient at θ_T) against exact unrolled differentiation (full-batch gradient descent
on linear regression, UCI Concrete, 800 training examples, 12 queries, 150 steps; the reference of
`tests/test_source.py`):

{markdown_table(["segments", "checkpoints / segment", "mean per-query Pearson", "relative error"], accuracy)}
"""
    write_section("source", "SOURCE: time, memory, accuracy against exact unrolling", body)
    print(body)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=METHODS)
    parser.add_argument("--trace")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.trace, args.repeat)))
    else:
        main()
