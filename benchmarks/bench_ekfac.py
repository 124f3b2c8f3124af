"""EK-FAC influence accuracy against exact per-layer Gauss-Newton influence, and its cost, on digits.

Trains the 64-128-128-10 digits MLP (26k parameters) for 8 epochs with :class:`TDACallback` (3
segments, true Fisher), then scores 50 test queries against the 1,437 training examples with

* the reference: influence with the exact per-layer (block-diagonal) Gauss-Newton Hessian
  (``curvature="gauss-newton"``, dense float64 blocks up to 16,512², Cholesky solves);
* our EK-FAC variants and kronfluence-style one-sample corrections, all with the reference's
  per-layer damping (0.1 × mean Gauss-Newton eigenvalue),

and reports the mean over queries of the Pearson and Spearman correlations with the reference,
plus the wall time of fitting and scoring. ``--kronfluence PYTHON`` also runs kronfluence (installed
in a separate environment) on the same model through ``benchmarks/kronfluence_digits.py``.

Run: ``.venv/bin/python benchmarks/bench_ekfac.py`` (about 15-30 minutes on 2 CPU cores, most of it
the exact reference).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import markdown_table, write_section  # noqa: E402


def train_digits(path: Path, sizes: list[int], epochs: int) -> tuple:
    import lightning as L

    from lightning_tda import ClassificationTask, TDACallback
    from lightning_tda.demo import DigitsDataModule, MLPClassifier

    L.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=64, seed=0)
    model = MLPClassifier(sizes=sizes, lr=0.1, momentum=0.9)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[TDACallback(str(path), task=ClassificationTask())],
    )
    trainer.fit(model, dm)
    return dm, model


def per_query_correlations(estimate: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    pearson = [pearsonr(e, r)[0] for e, r in zip(estimate, reference)]
    spearman = [spearmanr(e, r)[0] for e, r in zip(estimate, reference)]
    return float(np.mean(pearson)), float(np.mean(spearman))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 128, 10])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--kronfluence", default=None, help="python of a venv with kronfluence installed")
    parser.add_argument("--no-report", action="store_true", help="print only, do not write BENCHMARKS.md")
    args = parser.parse_args()

    from lightning_tda import ClassificationTask
    from lightning_tda.demo import MLPClassifier
    from lightning_tda.methods import EKFACInfluence
    from lightning_tda.trace import Trace

    torch.manual_seed(0)
    workdir = Path(tempfile.mkdtemp(prefix="bench_ekfac_"))
    path = workdir / "trace.h5"
    start = time.perf_counter()
    dm, _ = train_digits(path, args.sizes, args.epochs)
    train_time = time.perf_counter() - start
    trace = Trace.open(path)
    queries = torch.utils.data.Subset(dm.test_set, range(args.queries))
    task = ClassificationTask()

    def run(**options):
        method = EKFACInfluence(trace, MLPClassifier(sizes=args.sizes), task, cache=False, **options)
        start = time.perf_counter()
        scores = method.attribute(queries, dm.train_set)
        return scores.values.double().numpy(), time.perf_counter() - start, method

    reference, reference_time, exact = run(curvature="gauss-newton")
    damping = exact.dampings
    print(f"reference done in {reference_time:.1f}s; damping {damping}", flush=True)

    variants = [
        ("EK-FAC, streamed covariances, exact-expectation correction (default)", {}),
        ("EK-FAC, recomputed covariances, exact-expectation correction", {"covariances": "recompute"}),
        ("EK-FAC, streamed covariances, 1-sample correction", {"samples": 1}),
        ("EK-FAC, recomputed covariances, 1 sample (kronfluence-style)", {"covariances": "recompute", "samples": 1}),
        ("K-FAC, streamed covariances", {"curvature": "kfac"}),
        ("K-FAC, recomputed covariances, 1 sample", {"curvature": "kfac", "covariances": "recompute", "samples": 1}),
    ]
    rows = []
    default_time = None
    for label, options in variants:
        values, seconds, _ = run(damping=damping, **options)
        pearson, spearman = per_query_correlations(values, reference)
        rows.append([label, pearson, spearman, seconds])
        default_time = default_time or seconds
        print(f"{label}: pearson {pearson:.4f} spearman {spearman:.4f} ({seconds:.1f}s)", flush=True)
    heuristic_values, heuristic_time, heuristic = run()  # its own damping heuristic, end to end
    pearson, spearman = per_query_correlations(heuristic_values, reference)
    rows.append(["EK-FAC default, own heuristic damping (end to end)", pearson, spearman, heuristic_time])

    kron_lines = ""
    if args.kronfluence:
        kron_lines = run_kronfluence(args, path, dm, queries, reference, damping, rows)

    n_params = sum(p.numel() for p in MLPClassifier(sizes=args.sizes).parameters())
    body = (
        f"Digits MLP {args.sizes} ({n_params:,} parameters), trained {args.epochs} epochs with TDACallback "
        f"(3 segments, true Fisher; {train_time:.0f} s including recording), {len(dm.train_set):,} training "
        f"examples, {args.queries} test queries. Reference: influence with the exact per-layer (block-diagonal) "
        f"Gauss-Newton Hessian at the final checkpoint (`EKFACInfluence(curvature='gauss-newton')`, float64, "
        f"{reference_time:.0f} s). Every row uses the reference's per-layer damping (0.1 × mean Gauss-Newton "
        f"eigenvalue: {', '.join(f'{k}: {v:.3g}' for k, v in damping.items())}) except the last of ours. "
        f"Correlations are per query over the training examples, then averaged over queries. Time = fitting "
        f"(curvature pass at the final checkpoint; no cache) plus scoring.\n\n"
        + markdown_table(["estimator", "mean Pearson", "mean Spearman", "fit + score time (s)"], rows)
        + "\n\n"
        "'Exact-expectation correction' back-propagates all 10 output-Hessian factors per example "
        "(`task.fisher_factors`), so the EK-FAC eigenvalue correction carries no sampling noise; the 1-sample "
        "rows draw one label per example from the model, as kronfluence does.\n" + kron_lines
    )
    print(body)
    if not args.no_report:
        write_section(
            "ekfac-accuracy",
            "EK-FAC influence vs exact per-layer Gauss-Newton influence (digits MLP)",
            body,
            command=".venv/bin/python benchmarks/bench_ekfac.py"
            + (f" --kronfluence {args.kronfluence}" if args.kronfluence else ""),
        )


def run_kronfluence(args, path, dm, queries, reference, damping, rows) -> str:
    """Score with kronfluence in its own venv on the same final model; add its row; return notes."""
    from lightning_tda.trace import Trace

    workdir = path.parent
    trace = Trace.open(path)
    state = trace.checkpoint_state(trace.final_checkpoint.index)
    torch.save({k.removeprefix("net."): v for k, v in state.items()}, workdir / "final.pt")
    train_x, train_y = dm.train_set.tensors
    query_x, query_y = (torch.stack([queries[i][j] for i in range(len(queries))]) for j in range(2))
    torch.save({"train": (train_x, train_y), "query": (query_x, query_y)}, workdir / "data.pt")
    script = Path(__file__).resolve().parent / "kronfluence_digits.py"
    command = [args.kronfluence, str(script), str(workdir), json.dumps(args.sizes)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        return f"\nkronfluence failed to run: `{result.stderr.strip().splitlines()[-1]}`\n"
    report = json.loads(result.stdout.strip().splitlines()[-1])
    notes = []
    for label, key in (("kronfluence EK-FAC, damping 0.1 × mean eigenvalue (its heuristic)", "heuristic"),):
        values = np.load(workdir / f"kronfluence_{key}.npy")
        pearson, spearman = per_query_correlations(values, reference)
        rows.append([label, pearson, spearman, report[f"{key}_seconds"]])
    notes.append(f"\nkronfluence {report['version']} ran in a separate venv on the same final parameters.\n")
    return "".join(notes)


if __name__ == "__main__":
    main()
