"""DataInf benchmark: mislabel detection and run time against exact influence, LiSSA and Hessian-free.

Setting (the paper's Figure 2 in small): the digits MLP pre-trained on digits 0–4, LoRA-fine-tuned
with peft on digits 5–9 (examples/lora_digits.py) with 20% of the fine-tuning labels flipped.
Every method scores the fine-tuning examples against the mean gradient of the clean test loss
(``mean_query=True``); the AUC ranks the most harmful (most negative) first against the flip mask.
Run times are for ``attribute`` from the trace, per-query mode (Q test queries) and mean mode, all
methods in the same process. A second table does the same on the full digits MLP (all 26k
parameters trained, ``DigitsDataModule(flip_fraction=0.2)``) restricted to its last layer, where
the exact inverse is affordable, plus DataInf on all layers.

Run: ``python benchmarks/bench_datainf.py`` (``--seeds 0 1 2``, ``--ranks 4 16``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))

import lora_digits  # noqa: E402

from benchmarks.report import markdown_table, write_section  # noqa: E402
from lightning_tda import ClassificationTask, TDACallback, Trace  # noqa: E402
from lightning_tda.demo import DigitsDataModule, MLPClassifier  # noqa: E402
from lightning_tda.methods import DataInf, ExactInfluence, HessianFree, LiSSA  # noqa: E402

METHODS = (DataInf, ExactInfluence, LiSSA, HessianFree)
TASK = ClassificationTask()


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def run_methods(make, queries, train, flipped) -> dict[str, dict[str, float]]:
    """AUC (mean query) and times (mean query, per query) of every method; failures recorded as NaN."""
    results = {}
    for cls in METHODS:
        row = {}
        try:
            scores, row["time_mean"] = timed(lambda cls=cls: make(cls, mean_query=True).attribute(queries, train))
            row["auc"] = lora_digits.auc(-scores.values[0], flipped)
            _, row["time_queries"] = timed(lambda cls=cls: make(cls).attribute(queries, train))
        except ValueError as err:
            print(f"{cls.name}: {err}")
            row = {"auc": float("nan"), "time_mean": float("nan"), "time_queries": float("nan")}
        results[cls.name] = row
    return results


def lora_runs(seeds: list[int], rank: int, workdir: Path) -> tuple[list[dict], dict]:
    runs = []
    for seed in seeds:
        data = lora_digits.digits_split(flip_fraction=0.2, seed=seed)
        base = lora_digits.pretrain(data, seed=seed)
        path = workdir / f"lora_r{rank}_s{seed}.h5"
        model = lora_digits.finetune(data, base, path, rank=rank, seed=seed)
        trace = Trace.open(path)

        def make(cls, trace=trace, **kwargs):
            return cls(trace, lora_digits.LoRAClassifier(rank=rank), TASK, modules="lora", **kwargs)

        result = run_methods(make, data.test, data.finetune, data.flipped)
        result["accuracy"] = lora_digits.accuracy(model, data.test)
        runs.append(result)
        print(f"rank {rank} seed {seed}: {result}")
    sizes = {"n": len(data.finetune), "q": len(data.test), "dims": make(DataInf).dims}
    return runs, sizes


def full_mlp_run(seed: int, workdir: Path) -> tuple[dict, dict, int, int]:
    import lightning as L

    L.seed_everything(seed, verbose=False)
    dm = DigitsDataModule(flip_fraction=0.2, seed=seed)
    path = workdir / f"mlp_s{seed}.h5"
    trainer = L.Trainer(
        max_epochs=10,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[TDACallback(str(path), task=TASK)],
    )
    trainer.fit(MLPClassifier(), dm)
    trace = Trace.open(path)

    def make(cls, **kwargs):
        return cls(trace, MLPClassifier(), TASK, layers=["net.4"], **kwargs)

    last_layer = run_methods(make, dm.test_set, dm.train_set, dm.flipped)
    scores, seconds = timed(
        lambda: DataInf(trace, MLPClassifier(), TASK, mean_query=True).attribute(dm.test_set, dm.train_set)
    )
    all_layers = {"auc": lora_digits.auc(-scores.values[0], dm.flipped), "time_mean": seconds}
    return last_layer, all_layers, len(dm.train_set), len(dm.test_set)


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--no-write", action="store_true", help="print only; do not touch BENCHMARKS.md")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    workdir = Path(tempfile.mkdtemp(prefix="bench_datainf_"))

    parts = []
    for rank in args.ranks:
        runs, sizes = lora_runs(args.seeds, rank, workdir)
        rows = []
        for cls in METHODS:
            name = cls.name
            rows.append(
                [
                    name,
                    mean_sd([r[name]["auc"] for r in runs]),
                    mean_sd([r[name]["time_mean"] for r in runs]),
                    mean_sd([r[name]["time_queries"] for r in runs]),
                ]
            )
        base = statistics.mean(r["datainf"]["time_queries"] for r in runs)
        ratios = ", ".join(
            f"{cls.name} {statistics.mean(r[cls.name]['time_queries'] for r in runs) / base:.2f}×"
            for cls in METHODS
            if cls is not DataInf
        )
        parts.append(
            f"### LoRA rank {rank}: n = {sizes['n']} fine-tuning examples, Q = {sizes['q']} test queries, "
            f"layer sizes d_l = {sorted(set(sizes['dims'].values()))}; {len(runs)} seeds "
            f"(test accuracy {mean_sd([r['accuracy'] for r in runs])})\n\n"
            + markdown_table(
                ["method", "mislabel AUC (mean query)", "time mean query (s)", f"time Q={sizes['q']} queries (s)"],
                rows,
            )
            + f"\n\nTime relative to DataInf (Q queries): {ratios}."
        )

    last_layer, all_layers, n, q = full_mlp_run(args.seeds[0], workdir)
    rows = [
        [name, f"{r['auc']:.3f}", f"{r['time_mean']:.2f}", f"{r['time_queries']:.2f}"] for name, r in last_layer.items()
    ]
    rows.append(
        ["datainf, all 4 layers (26k params)", f"{all_layers['auc']:.3f}", f"{all_layers['time_mean']:.2f}", "-"]
    )
    parts.append(
        f"### Full digits MLP, 20% flipped labels (DigitsDataModule), last layer net.4 (d = 1290), seed "
        f"{args.seeds[0]}: n = {n}, Q = {q}\n\n"
        + markdown_table(["method", "mislabel AUC (mean query)", "time mean query (s)", f"time Q={q} (s)"], rows)
    )
    body = (
        "Mislabel detection: AUC of −score (most harmful to the mean clean-test loss first) against the "
        "flipped-label mask. Times are wall-clock seconds of `attribute` from the trace on this shared CPU "
        "(several jobs ran at once, so absolute times are noisy; ratios are within one run). Passes over the "
        "training set: DataInf 3 (squared norms, r, scores), exact 2 (+ a d_l³ Cholesky per layer), LiSSA 11 "
        "(10 iterations + scores), Hessian-free 1.\n\n" + "\n\n".join(parts)
    )
    print(body)
    if not args.no_write:
        write_section(
            "datainf",
            "DataInf: mislabel detection and run time",
            body,
            "python benchmarks/bench_datainf.py " + " ".join(sys.argv[1:]),
        )


if __name__ == "__main__":
    main()
