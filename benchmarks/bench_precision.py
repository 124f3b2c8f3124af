"""TDACallback's overhead under bf16 mixed precision, before and after issue 22 (the factor products moved out
of autocast into float32 at least, counts in float64), on the digits MLP and a small ResNet.

"Before" is the same code with the products left under the training step's autocast (what the callback did
before: ``full_precision`` replaced by a no-op, so a float32 product of a ≥256-wide factor ran in bf16).
Every fit runs in this one process with one torch thread, the configurations interleaved round by round
(without callback, after, before, ...), so a slow phase of a shared machine hits all of them; the ratio is
the median over rounds of each round's time over the run without the callback in the same round.

    python benchmarks/bench_precision.py                 # 3 rounds, writes BENCHMARKS.md section callback-bf16
    python benchmarks/bench_precision.py --rounds 1 --no-write
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_callback import build  # noqa: E402

CONFIGS = ("without callback", "after: products outside autocast", "before: products under autocast")
# (model, training examples (0: the data set's own), epochs)
CASES = [("mlp", 0, 20), ("resnet16", 1_024, 2)]


def fit_seconds(model_name: str, n: int, epochs: int, config: str) -> tuple[float, int]:
    """Wall seconds of one bf16-mixed fit, and its statistics steps (0 without the callback)."""
    import lightning as L

    import lightning_tda.layers.covariances as covariances
    from lightning_tda import ClassificationTask, TDACallback, Trace
    from lightning_tda.demo import headless_trainer

    L.seed_everything(0, verbose=False)
    model, data, task, options = build(model_name, n)
    original = covariances.full_precision
    if config.startswith("before"):
        covariances.full_precision = lambda device: contextlib.nullcontext()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "trace.h5"
            recording = TDACallback(path, task=task or ClassificationTask(), **options)
            callbacks = [] if config == "without callback" else [recording]
            trainer = headless_trainer(
                max_epochs=epochs, limit_val_batches=0, precision="bf16-mixed", callbacks=callbacks
            )
            start = time.perf_counter()
            trainer.fit(model, data)
            seconds = time.perf_counter() - start
            stats_steps = sum(s.stats_steps for s in Trace.open(path).segments) if callbacks else 0
    finally:
        covariances.full_precision = original
    return seconds, stats_steps


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    times: dict[tuple, list[float]] = {}
    stats: dict[tuple, list[int]] = {}
    for round_ in range(args.rounds):
        for case in CASES:
            for config in CONFIGS:
                seconds, steps = fit_seconds(*case, config)
                times.setdefault((*case, config), []).append(seconds)
                stats.setdefault((*case, config), []).append(steps)
                print(f"round {round_ + 1}: {case} {config}: {seconds:.1f} s, {steps} statistics steps", flush=True)
    rows = ["| model | epochs | configuration | seconds (median) | statistics steps | ratio to no callback |"]
    rows.append("|---|---|---|---|---|---|")
    for model_name, n, epochs in CASES:
        base = times[(model_name, n, epochs, CONFIGS[0])]
        for config in CONFIGS:
            runs = times[(model_name, n, epochs, config)]
            ratio = statistics.median(r / b for r, b in zip(runs, base))
            name = "digits MLP 64-128-128-10" if model_name == "mlp" else f"ResNet-18 width 16, n = {n}, 32x32x3"
            steps = statistics.median(stats[(model_name, n, epochs, config)])
            rows.append(f"| {name} | {epochs} | {config} | {statistics.median(runs):.1f} | {steps:g} | {ratio:.2f}x |")
    body = (
        f'`precision="bf16-mixed"` on the CPU, callback at its defaults (budget cadence, true Fisher); median of '
        f"{args.rounds} interleaved rounds in one process with one torch thread.\n\n" + "\n".join(rows)
    )
    print(body)
    if not args.no_write:
        from benchmarks.report import write_section

        write_section("callback-bf16", "Callback overhead under bf16 mixed precision, before and after issue 22", body)


if __name__ == "__main__":
    main()
