"""Training overhead of TDACallback: wall time and peak memory with and without it, in one run.

Each (model, configuration, repeat) trains in a fresh subprocess so peak RSS is its own; repeats are
interleaved across configurations so slow phases of a noisy machine hit all of them alike. Reported:
median fit time per configuration, its ratio to training without the callback, peak RSS, and the
bytes of float64 covariance sums the callback keeps (the memory it should cost).

    python benchmarks/bench_callback.py            # 20 epochs, 5 repeats
    python benchmarks/bench_callback.py --quick    # 3 epochs, 1 repeat
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIGS = {
    "without callback": None,
    "defaults (true Fisher, every_n_steps='auto')": {},
    "empirical Fisher, every step": {"fisher": "empirical", "every_n_steps": 1},
    "true Fisher, every step": {"fisher": "true", "every_n_steps": 1},
}


def child(model_name: str, config: str, epochs: int) -> None:
    """Train once and print ``{"seconds", "max_rss_mb", "every_n_steps", "covariance_bytes"}`` as JSON."""
    import lightning as L
    import torch

    from lightning_tda import ClassificationTask, TDACallback
    from lightning_tda.demo import DigitsDataModule, MLPClassifier, SmallCNN, headless_trainer

    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    images = model_name == "cnn"
    model = SmallCNN() if images else MLPClassifier()
    data = DigitsDataModule(batch_size=64, images=images)
    kwargs = CONFIGS[config]
    callbacks = []
    with tempfile.TemporaryDirectory() as tmp:
        if kwargs is not None:
            callbacks.append(TDACallback(f"{tmp}/trace.h5", task=ClassificationTask(), **kwargs))
        trainer = headless_trainer(max_epochs=epochs, limit_val_batches=0, callbacks=callbacks)
        start = time.perf_counter()
        trainer.fit(model, data)
        seconds = time.perf_counter() - start
    tda = callbacks[0] if callbacks else None
    covariance_bytes = sum(t.numel() * 8 for t in tda.stats.flat_tensors()) if tda else 0
    print(
        json.dumps(
            {
                "seconds": seconds,
                "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "every_n_steps": tda.every_n_steps if tda else None,
                "covariance_bytes": covariance_bytes,
            }
        )
    )


def run_child(model_name: str, config: str, epochs: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", model_name, config, "--epochs", str(epochs)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--child", nargs=2, default=None)
    parser.add_argument(
        "--defaults-only", action="store_true", help="only without the callback vs its defaults (for long runs)"
    )
    parser.add_argument("--no-write", action="store_true", help="print the table instead of writing BENCHMARKS.md")
    args = parser.parse_args()
    epochs = args.epochs or (3 if args.quick else 20)
    if args.child:
        child(args.child[0], args.child[1], epochs)
        return
    repeats = args.repeats or (1 if args.quick else 5)
    configs = list(CONFIGS)[:2] if args.defaults_only else list(CONFIGS)
    results: dict[tuple[str, str], list[dict]] = {}
    for _ in range(repeats):
        for model_name in ("mlp", "cnn"):
            for config in configs:
                results.setdefault((model_name, config), []).append(run_child(model_name, config, epochs))

    rows = []
    for model_name in ("mlp", "cnn"):
        base = statistics.median(r["seconds"] for r in results[(model_name, "without callback")])
        base_rss = statistics.median(r["max_rss_mb"] for r in results[(model_name, "without callback")])
        for config in configs:
            runs = results[(model_name, config)]
            seconds = statistics.median(r["seconds"] for r in runs)
            rss = statistics.median(r["max_rss_mb"] for r in runs)
            rows.append(
                [
                    "digits MLP 64-128-128-10" if model_name == "mlp" else "digits SmallCNN",
                    config,
                    runs[0]["every_n_steps"] or "-",
                    f"{seconds:.2f}",
                    f"{seconds / base:.3f}x",
                    f"{rss:.0f} (+{rss - base_rss:.0f})",
                    f"{runs[0]['covariance_bytes'] / 1e6:.2f}",
                ]
            )
    from benchmarks.report import markdown_table, write_section

    table = markdown_table(
        ["model", "configuration", "every n steps", "fit s (median)", "vs without", "peak RSS MB", "covariances MB"],
        rows,
    )
    default = "defaults (true Fisher, every_n_steps='auto')"
    ratios = {
        model_name: statistics.median(r["seconds"] for r in results[(model_name, default)])
        / statistics.median(r["seconds"] for r in results[(model_name, "without callback")])
        for model_name in ("mlp", "cnn")
    }
    verdict = ", ".join(
        f"{name} {ratio:.2f}x ({'met' if ratio <= 1.10 else 'missed'})" for name, ratio in ratios.items()
    )
    body = (
        f"Target: at most 1.10x the wall time of training without the callback, with the defaults: {verdict}.\n\n"
        f"{epochs} epochs of digits (1,438 training examples, batch 64, 23 steps/epoch, 3 segments, 2 checkpoints "
        f"per segment), median of {repeats} interleaved repeats, each in a fresh process with one torch thread. "
        f"Peak RSS is the child's maximum resident set; the covariance column is the float64 K-FAC sums the "
        f"callback keeps (it stages one step's sums besides them).\n\n{table}"
    )
    if args.no_write:
        print(body)
    else:
        name = "callback-overhead" + (f"-{epochs}-epochs" if args.defaults_only else "")
        write_section(name, f"Training overhead of TDACallback ({epochs} epochs)", body)
        print(body)


if __name__ == "__main__":
    main()
