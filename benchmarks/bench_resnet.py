"""Attribution on a real model: every method on a ResNet-18 at half width, time and peak memory, and
kronfluence's EK-FAC on the same weights.

ResNet-18 at half width in torchvision's layout (2.8M parameters, ``demo.ResNet(stem="imagenet")``: 20
convolutions and the head tracked, batch norm not), trained 2 epochs at batch 64 on synthetic 32×32×3
images (:class:`~lightning_tda.demo.SyntheticImageDataModule`, 10 classes) with
``TDACallback`` at its defaults. Every method then scores 10 test queries against the n training
examples at its defaults, each run in a fresh process (peak RSS from ``getrusage`` is its own) with no
cached curvature; runs are interleaved across methods when repeated. kronfluence runs in its own venv
on the same final weights and data through ``benchmarks/kronfluence_resnet.py``.

    python benchmarks/bench_resnet.py --kronfluence /work/kfenv/bin/python   # n = 2,000, 2 threads
    python benchmarks/bench_resnet.py --quick                                 # width 8, 16×16, n = 128
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {
    "full": {"width": 32, "size": 32, "n": 2000, "queries": 10},
    "quick": {"width": 8, "size": 16, "n": 128, "queries": 4},
}
METHODS = ("ekfac", "ekfac-exact", "source", "source-full-correction", "tracin", "datainf", "forward-inf")
COMPARED = {"ekfac-exact": "ekfac", "source-full-correction": "source", "kronfluence": "ekfac"}
LABELS = {
    "ekfac": "EK-FAC IF (defaults)",
    "ekfac-exact": "EK-FAC IF, exact-expectation correction (`samples='exact'`)",
    "source": "SOURCE (defaults)",
    "source-full-correction": "SOURCE, correction over all examples at every checkpoint",
    "tracin": "TracInCP (all 6 checkpoints)",
    "datainf": "DataInf (all layers)",
    "forward-inf": "Forward-INF (defaults)",
    "kronfluence": "kronfluence EK-FAC",
}


def data_module(size: dict):
    from lightning_tda.demo import SyntheticImageDataModule

    return SyntheticImageDataModule(
        batch_size=64, num_examples=int(size["n"] / 0.8), size=size["size"], test_fraction=0.2
    )


def prepare(workdir: Path, size: dict, threads: int) -> dict:
    """Train the ResNet with the callback (once per workdir) and save what kronfluence needs."""
    info_path = workdir / "training.json"
    if info_path.exists():
        return json.loads(info_path.read_text())
    import lightning as L
    import torch

    from lightning_tda import ClassificationTask, TDACallback
    from lightning_tda.demo import ResNet, headless_trainer

    torch.set_num_threads(threads)
    L.seed_everything(0, verbose=False)
    data, model = data_module(size), ResNet(width=size["width"], stem="imagenet")
    callback = TDACallback(str(workdir / "trace.h5"), task=ClassificationTask(), if_exists="overwrite")
    trainer = headless_trainer(max_epochs=2, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[callback])
    start = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        x, y = data.test_set.tensors
        accuracy = float((model(x).argmax(1) == y).float().mean())
    kron = workdir / "kronfluence"
    kron.mkdir(exist_ok=True)
    state = {k.removeprefix("net."): v for k, v in model.state_dict().items()}
    torch.save({"config": {"width": size["width"], "stem": "imagenet"}, "state": state}, kron / "model.pt")
    train_x, train_y = data.train_set.tensors
    torch.save(
        {"train": (train_x[: size["n"]], train_y[: size["n"]]), "query": (x[: size["queries"]], y[: size["queries"]])},
        kron / "data.pt",
    )
    info = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "fit_seconds": seconds,
        "test_accuracy": accuracy,
        "trace_mb": (workdir / "trace.h5").stat().st_size / 2**20,
    }
    info_path.write_text(json.dumps(info))
    return info


def child(method: str, workdir: Path, size: dict, threads: int) -> dict:
    """One method, end to end, in this fresh process: scores saved, time, CPU time and peak RSS returned."""
    import torch
    from torch.utils.data import Subset

    from lightning_tda import ClassificationTask, Trace
    from lightning_tda.demo import ResNet
    from lightning_tda.methods import SOURCE, DataInf, EKFACInfluence, ForwardINF, TracInCP

    torch.set_num_threads(threads)
    data = data_module(size)
    data.setup()
    n = size.get("n_scored", size["n"])
    train, queries = Subset(data.train_set, range(n)), Subset(data.test_set, range(size["queries"]))
    trace, task = Trace.open(workdir / "trace.h5"), ClassificationTask()
    model = ResNet(width=size["width"], stem="imagenet")
    build = {
        "ekfac": lambda: EKFACInfluence(trace, model, task, cache=False),
        "ekfac-exact": lambda: EKFACInfluence(trace, model, task, cache=False, samples="exact"),
        "source": lambda: SOURCE(trace, model, task, cache=False),
        "source-full-correction": lambda: SOURCE(trace, model, task, cache=False, split_correction=False),
        "tracin": lambda: TracInCP(trace, model, task),
        "datainf": lambda: DataInf(trace, model, task),
        "forward-inf": lambda: ForwardINF(trace, model, task),
    }[method]
    start, cpu = time.perf_counter(), time.process_time()
    result = {"method": method}
    try:
        scores = build().attribute(queries, train)
        np.save(workdir / f"scores-{method}.npy", scores.values.double().numpy())
    except Exception as err:  # reported in the table, e.g. Forward-INF diverging on some queries
        result["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    result["seconds"], result["cpu_seconds"] = time.perf_counter() - start, time.process_time() - cpu
    result["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def digits_checks(workdir: Path) -> list[list[object]]:
    """Do the new defaults change results on the digits MLP (3 segments x 2 checkpoints, 50 queries)?

    SOURCE's split correction against the correction over all examples at every checkpoint, and EK-FAC
    IF (exact-expectation correction there) with products in float32 against the same model in float64.
    """
    import lightning as L
    import torch
    from torch.utils.data import Subset, TensorDataset

    from lightning_tda import ClassificationTask, TDACallback, Trace
    from lightning_tda.demo import DigitsDataModule, MLPClassifier, headless_trainer
    from lightning_tda.methods import SOURCE, EKFACInfluence

    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    data, path, task = DigitsDataModule(batch_size=64, seed=0), workdir / "digits.h5", ClassificationTask()
    callback = TDACallback(str(path), task=task, if_exists="overwrite")
    headless_trainer(max_epochs=8, limit_val_batches=0, callbacks=[callback]).fit(MLPClassifier(), data)
    trace, queries = Trace.open(path), Subset(data.test_set, range(50))

    def scores(method, model, train=data.train_set, query_set=queries) -> np.ndarray:
        return method(trace, model, task, cache=False).attribute(query_set, train).values.double().numpy()

    split = scores(SOURCE, MLPClassifier())
    full = scores(lambda *a, **k: SOURCE(*a, split_correction=False, **k), MLPClassifier())
    (x, y), (x_q, y_q) = data.train_set[:], data.test_set[:50]
    single = scores(EKFACInfluence, MLPClassifier())
    double = scores(EKFACInfluence, MLPClassifier().double(), TensorDataset(x.double(), y), (x_q.double(), y_q))
    return [
        ["SOURCE: split correction (default) vs all examples at each checkpoint", *per_query_correlations(split, full)],
        ["EK-FAC IF: float32 products (default) vs a float64 model", *per_query_correlations(single, double)],
    ]


def run_child(method: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", method, "--workdir", args.workdir, "--threads", str(args.threads)]
    command += (["--quick"] if args.quick else []) + ([f"--n={args.n}"] if args.n else [])
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        return {"method": method, "error": out.stderr.strip().splitlines()[-1][:160]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_kronfluence(python: str, args: argparse.Namespace) -> dict:
    script = str(ROOT / "benchmarks" / "kronfluence_resnet.py")
    out = subprocess.run([python, script, args.workdir, str(args.threads)], capture_output=True, text=True)
    if out.returncode != 0:
        return {"method": "kronfluence", "error": out.stderr.strip().splitlines()[-1][:160]}
    return {"method": "kronfluence", **json.loads(out.stdout.strip().splitlines()[-1])}


def per_query_correlations(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean over queries of Pearson and Spearman correlation across training examples."""
    from scipy.stats import spearmanr

    pearson = np.mean([np.corrcoef(x, y)[0, 1] for x, y in zip(a, b)])
    spearman = np.mean([spearmanr(x, y).statistic for x, y in zip(a, b)])
    return float(pearson), float(spearman)


BEFORE = [  # issue 10, measured on this machine before this benchmark's changes (one thread)
    ["EKFACInfluence (defaults)", "crashed: linalg.eigh did not converge on a recomputed factor", ""],
    ["EKFACInfluence(covariances='stream', samples=1)", "350", "8.1 GB"],
    ["SOURCE (defaults; also curvature='kfac')", "crashed: the same eigh failure", ""],
    ["SOURCE(fast=True), widest layer-4 convolutions excluded", "284", "3.7 GB"],
    ["TracInCP, last checkpoint only", "148", "7.6 GB"],
    ["DataInf", "473", "8.0 GB"],
    ["ForwardINF (defaults)", "FloatingPointError for 7 of 10 queries", ""],
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", default=None)
    parser.add_argument("--workdir", default="/tmp/bench_resnet")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--kronfluence", default=None, help="python of a venv with kronfluence installed")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n", type=int, default=None, help="score this many training examples (default: all)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the section from the saved runs")
    args = parser.parse_args()
    size = SIZES["quick" if args.quick else "full"] | ({"n_scored": args.n} if args.n else {})
    workdir = Path(args.workdir)
    if args.child:
        print(json.dumps(child(args.child, workdir, size, args.threads)))
        return
    workdir.mkdir(parents=True, exist_ok=True)
    training = prepare(workdir, size, args.threads)
    saved = workdir / "runs.json"
    if args.report_only:
        runs, digits = (json.loads(saved.read_text())[key] for key in ("runs", "digits"))
    else:
        runs = {}
        for _ in range(args.repeats):  # interleaved: a slow phase of the machine hits every method alike
            for method in args.methods:
                runs.setdefault(method, []).append(run_child(method, args))
                print(json.dumps(runs[method][-1]), flush=True)
            if args.kronfluence:
                runs.setdefault("kronfluence", []).append(run_kronfluence(args.kronfluence, args))
                print(json.dumps(runs["kronfluence"][-1]), flush=True)
        digits = digits_checks(workdir)
        saved.write_text(json.dumps({"runs": runs, "digits": digits}))
    report(runs, digits, training, size, args, workdir)


def report(
    runs: dict[str, list[dict]],
    digits: list[list[object]],
    training: dict,
    size: dict,
    args: argparse.Namespace,
    workdir: Path,
) -> None:
    from benchmarks.report import markdown_table, write_section

    def median(method: str, key: str) -> float | None:
        values = [r[key] for r in runs.get(method, []) if "error" not in r]
        return statistics.median(values) if values else None

    def scores(method: str) -> np.ndarray | None:
        path = workdir / ("kronfluence/scores.npy" if method == "kronfluence" else f"scores-{method}.npy")
        return np.load(path) if path.exists() and median(method, "seconds") is not None else None

    ekfac_wall, ekfac_cpu = median("ekfac", "seconds"), median("ekfac", "cpu_seconds")
    rows = []
    for method, results in runs.items():
        errors = [r["error"] for r in results if "error" in r]
        seconds, cpu, rss = median(method, "seconds"), median(method, "cpu_seconds"), median(method, "max_rss_mb")
        if seconds is None:
            rows.append([LABELS[method], "failed: " + errors[0], "", "", "", "", ""])
            continue
        agreement = ""
        if method in COMPARED and scores(method) is not None and scores(COMPARED[method]) is not None:
            pearson, spearman = per_query_correlations(scores(method), scores(COMPARED[method]))
            agreement = f"{pearson:.3f} / {spearman:.3f} with {LABELS[COMPARED[method]]}"
        wall_ratio, cpu_ratio = (seconds / ekfac_wall, cpu / ekfac_cpu) if ekfac_wall else ("", "")
        rows.append([LABELS[method], seconds, cpu, rss, wall_ratio, cpu_ratio, agreement])
    header = ["method", "wall s", "CPU s", "peak RSS MB", "x EK-FAC IF (wall)", "x EK-FAC IF (CPU)"]

    def met(ok: bool) -> str:
        return "met" if ok else "**missed**"

    peaks = {m: median(m, "max_rss_mb") for m in runs if m != "kronfluence" and median(m, "max_rss_mb")}
    targets = [
        [
            "peak memory of every method <= 2 GB",
            f"largest: {max(peaks, key=peaks.get)} {max(peaks.values()):.0f} MB" if peaks else "-",
            met(bool(peaks) and max(peaks.values()) <= 2048),
        ],
        [
            "EK-FAC IF end to end <= 60 s on 2 cores",
            f"{ekfac_wall:.0f} s wall ({args.threads} threads), {ekfac_cpu:.0f} s CPU" if ekfac_wall else "-",
            met(bool(ekfac_wall) and ekfac_wall <= 60),
        ],
    ]
    for method in ("datainf", "source"):
        if median(method, "seconds") and ekfac_wall:
            wall, cpu = median(method, "seconds") / ekfac_wall, median(method, "cpu_seconds") / ekfac_cpu
            targets.append(
                [f"{LABELS[method]} within 3x EK-FAC IF", f"{wall:.2f}x wall, {cpu:.2f}x CPU", met(max(wall, cpu) <= 3)]
            )
    body = [
        f"ResNet-18 at half width in torchvision's layout ({training['parameters']:,} parameters; 20 Conv2d + 1 "
        f"Linear tracked, 20 BatchNorm2d untracked), synthetic {size['size']}x{size['size']}x3 images in 10 "
        f"classes, trained 2 epochs at batch 64 with `TDACallback` at its defaults (test accuracy "
        f"{training['test_accuracy']:.2f}, trace {training['trace_mb']:.0f} MB). n = {size['n']:,} training "
        f"examples, {size['queries']} queries, {args.threads} torch thread(s); each method at its defaults in a "
        f"fresh process without cached curvature (peak RSS from getrusage), median of {args.repeats} interleaved "
        f"run(s). Wall time includes any wait for a CPU on this shared machine; CPU time does not.",
        "",
        markdown_table(header + ["per-query Pearson / Spearman"], rows),
        "",
        markdown_table(["target (issue 10)", "measured", ""], targets),
    ]
    kron = runs.get("kronfluence", [{}])[0]
    if kron.get("seconds") and ekfac_wall:
        body += [
            "",
            f"kronfluence {kron['version']} (its defaults: one sampled label per example, recomputed covariances in "
            f"{kron['covariance_dtype']}, heuristic damping) on the same weights and data took "
            f"{kron['seconds'] / ekfac_wall:.1f}x our EK-FAC IF's wall time ({kron['cpu_seconds'] / ekfac_cpu:.1f}x "
            f"its CPU time) in the same run.",
        ]
    body += [
        "",
        "Before (issue 10, this machine, the same model size; peak memory was about 21 bytes x parameters x "
        "batch size, from concatenating every layer's per-example gradients in float64):",
        "",
        markdown_table(["method", "seconds", "peak memory"], BEFORE),
        "",
        "Do the changed defaults change results? On the digits MLP (26k parameters, 3 segments x 2 checkpoints, "
        "50 queries, the exact-expectation correction there), mean per-query correlation:",
        "",
        markdown_table(["comparison", "Pearson", "Spearman"], digits),
    ]
    write_section(
        "real-models-attribution",
        "Attribution on a real model: ResNet-18 (half width), every method, kronfluence side by side",
        "\n".join(body),
        command="python benchmarks/bench_resnet.py"
        + (f" --kronfluence {args.kronfluence}" if args.kronfluence else "")
        + (f" --repeats {args.repeats}" if args.repeats > 1 else ""),
    )


if __name__ == "__main__":
    main()
