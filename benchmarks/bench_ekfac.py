"""EK-FAC influence accuracy against exact per-layer Gauss-Newton influence, and its cost, on digits.

Trains the 64-128-128-10 digits MLP (26k parameters) for 8 epochs with :class:`TDACallback` (3
segments, true Fisher; the ``digits_run`` test fixture's settings), then scores 50 test queries
against the 1,438 training examples at the final checkpoint with

* the reference: the exact per-layer (block-diagonal) Gauss-Newton Hessian (dense float64 blocks up
  to 16,512², Cholesky solves), i.e. ``EKFACInfluence(curvature="gauss-newton")``;
* EK-FAC / K-FAC variants: eigenbasis recomputed at the final parameters (ours, default) or from the
  last segment's streamed covariances (traces recorded with statistics every ``"auto"``-th step and
  on every step; true and empirical Fisher); eigenvalue correction with the exact expectation over
  the predictive distribution (ours, default) or one sampled label per example (kronfluence's estimator);
* the ceiling of any EK-FAC: the eigenbasis of the nearest Kronecker product ``S̃ ⊗ Ã`` of each exact
  block (Van Loan-Pitsianis, by power iteration) with the exact diagonal of the block in that basis,

every estimator with the same per-layer damping ``c × mean Gauss-Newton eigenvalue`` for
``c ∈ {0.1, 1, 10}`` (0.1 is kronfluence's heuristic and our default), and kronfluence's default
absolute damping 1e-8. Reports mean over queries of
the per-query Pearson and Spearman correlations with the reference, and the end-to-end time of
``EKFACInfluence`` (fit + score). ``--kronfluence PYTHON`` also runs kronfluence (installed in a
separate venv) on the same final model through ``benchmarks/kronfluence_digits.py``.

Run: ``.venv/bin/python benchmarks/bench_ekfac.py`` (about 10 minutes on 2 CPU cores, most of it the
exact reference).
"""

from __future__ import annotations

import argparse
import json
import os
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

DAMPING_SCALES = (0.1, 1.0, 10.0)  # × the layer's mean Gauss-Newton eigenvalue
ABSOLUTE_DAMPING = 1e-8  # kronfluence's default damping
VARIANTS = [
    # label, trace ("auto": the default cadence with strict_budget=False, 4 statistics steps per segment, since the
    # streamed rows need statistics in every segment; "every": statistics on every step), curvature,
    # covariances, fisher of the fit (None: the trace's), samples
    ("EK-FAC, recomputed basis, expectation correction (ours, default)", "auto", "ekfac", "recompute", None, None),
    ("EK-FAC, recomputed basis, 1 sample (kronfluence's estimator)", "auto", "ekfac", "recompute", None, 1),
    ("EK-FAC, streamed basis (every_n_steps={every}, auto), expectation", "auto", "ekfac", "stream", None, None),
    ("EK-FAC, streamed basis (every_n_steps=1), expectation", "every", "ekfac", "stream", None, None),
    ("EK-FAC, streamed basis (every_n_steps={every}, auto), 1 sample", "auto", "ekfac", "stream", None, 1),
    ("EK-FAC, streamed empirical-Fisher basis (every step), empirical", "empirical", "ekfac", "stream", None, None),
    ("EK-FAC, streamed empirical-Fisher basis (every step), expectation", "empirical", "ekfac", "stream", "true", None),
    ("K-FAC, recomputed, expectation", "auto", "kfac", "recompute", None, None),
    ("K-FAC, streamed (every_n_steps={every}, auto)", "auto", "kfac", "stream", None, None),
    ("K-FAC, streamed (every_n_steps=1)", "every", "kfac", "stream", None, None),
]
IDEAL = "EK-FAC in an ideal Kronecker basis (nearest Kronecker product of each exact block), exact diagonal"


def nearest_kronecker_basis(name: str, matrix: torch.Tensor, shape: tuple[int, int], iterations: int = 30):
    """:class:`LayerEigenbasis` of the nearest Kronecker product ``S̃ ⊗ Ã`` of a dense block (Frobenius norm,
    Van Loan-Pitsianis: the top singular pair of the rearranged block), eigenvalues = the exact diagonal of the
    block in that basis: the best any EK-FAC built on a Kronecker eigenbasis can do."""
    from lightning_tda.curvature.eigen import LayerEigenbasis

    out, a_dim = shape
    blocks = matrix.reshape(out, a_dim, out, a_dim)
    rearranged = blocks.permute(0, 2, 1, 3).reshape(out * out, a_dim * a_dim)
    right = torch.eye(a_dim, dtype=matrix.dtype).reshape(-1)
    for _ in range(iterations):
        left = rearranged @ right
        left /= left.norm()
        right = rearranged.T @ left
        right /= right.norm()
    del rearranged
    s, a = left.reshape(out, out), right.reshape(a_dim, a_dim)
    q_s, q_a = torch.linalg.eigh((s + s.T) / 2)[1], torch.linalg.eigh((a + a.T) / 2)[1]
    rotated = torch.einsum("iajb,bq->iajq", blocks, q_a)
    rotated = torch.einsum("iajq,jp->iapq", rotated, q_s)
    diagonal = torch.einsum("ip,aq,iapq->pq", q_s, q_a, rotated)  # diag((Q_S ⊗ Q_A)ᵀ H (Q_S ⊗ Q_A))
    return LayerEigenbasis(name, q_a, q_s, diagonal)


def train_digits(path: Path, epochs: int, **callback_options):
    import lightning as L

    from lightning_tda import ClassificationTask, TDACallback
    from lightning_tda.demo import DigitsDataModule, MLPClassifier, headless_trainer

    L.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=64, seed=0)
    trainer = headless_trainer(
        max_epochs=epochs,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[TDACallback(str(path), task=ClassificationTask(), **callback_options)],
    )
    trainer.fit(MLPClassifier(lr=0.1, momentum=0.9), dm)
    dm.setup()
    return dm


def mean_correlations(estimate: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Mean over queries (rows) of the Pearson and Spearman correlations with the reference."""
    pearson = [pearsonr(e, r)[0] for e, r in zip(estimate, reference)]
    spearman = [spearmanr(e, r)[0] for e, r in zip(estimate, reference)]
    return float(np.mean(pearson)), float(np.mean(spearman))


def stacked_gradients(method, data, role: str) -> dict[str, torch.Tensor]:
    parts: dict[str, list[torch.Tensor]] = {}
    for _, batch in method.batches(data, role):
        for name, g in method.gradients(batch, role).items():
            parts.setdefault(name, []).append(g.double())
    return {name: torch.cat(p) for name, p in parts.items()}


def influence(curv, dampings, queries, train) -> np.ndarray:
    return sum(
        (curv[name].damped_inverse(queries[name], dampings[name]).flatten(1) @ train[name].flatten(1).T)
        for name in curv
    ).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--trace", default=None, help="reuse a trace recorded with these settings")
    parser.add_argument("--kronfluence", default=None, help="python of a venv with kronfluence installed")
    parser.add_argument("--no-report", action="store_true", help="print only, do not write BENCHMARKS.md")
    args = parser.parse_args()

    from lightning_tda import ClassificationTask
    from lightning_tda.curvature.fit import fit_curvature
    from lightning_tda.curvature.passes import PassData
    from lightning_tda.demo import DigitsDataModule, MLPClassifier
    from lightning_tda.methods import EKFACInfluence
    from lightning_tda.trace import Trace

    torch.manual_seed(0)
    workdir = Path(tempfile.mkdtemp(prefix="bench_ekfac_"))
    if args.trace:
        path = Path(args.trace)
        dm = DigitsDataModule(batch_size=64, seed=0)
        dm.setup()
    else:
        path = workdir / "trace.h5"
        dm = train_digits(path, args.epochs, strict_budget=False)
    trace = Trace.open(path)
    traces = {"auto": trace}
    for label, options in (("every", {"every_n_steps": 1}), ("empirical", {"every_n_steps": 1, "fisher": "empirical"})):
        train_digits(workdir / f"{label}.h5", args.epochs, **options)  # the same seed trains the same model
        traces[label] = Trace.open(workdir / f"{label}.h5")
        state, other = (t.checkpoint_state(t.final_checkpoint.index) for t in (trace, traces[label]))
        assert all(torch.equal(state[k], other[k]) for k in state), "recording changed the training run"
    stats_every = trace.meta.get("every_n_steps")
    train = dm.train_set
    queries = torch.utils.data.Subset(dm.test_set, range(args.queries))
    task = ClassificationTask()

    # Shared per-example gradients at the final parameters (the benchmark can afford to keep them).
    method = EKFACInfluence(trace, MLPClassifier(), task)
    final = trace.final_checkpoint
    method.load_checkpoint(final.index)
    query_grads = stacked_gradients(method, queries, "query")
    train_grads = stacked_gradients(method, train, "train")
    data = PassData(train, batch_size=256)

    def fit(curvature: str, covariances: str = "stream", samples: int | None = None, source=trace, fisher=None):
        return fit_curvature(
            source,
            method.model,
            task,
            method.layers,
            [final.index],
            data,
            segment=final.segment,
            curvature=curvature,
            covariances=covariances,
            samples=samples,
            fisher=fisher,
            cache=False,
        )

    start = time.perf_counter()
    exact = fit("gauss-newton")
    dampings = {f"{c:g}×": {name: c * block.mean_eigenvalue for name, block in exact.items()} for c in DAMPING_SCALES}
    dampings[f"{ABSOLUTE_DAMPING:g}"] = {name: ABSOLUTE_DAMPING for name in exact}
    degenerate = {}
    for name, block in exact.items():
        eigenvalues = torch.linalg.eigvalsh(block.matrix) if block.matrix.shape[0] <= 9000 else None
        if eigenvalues is not None:
            degenerate[name] = float((eigenvalues < 0.1 * eigenvalues.mean()).double().mean())
    references = {}
    for scale in dampings:
        references[scale] = influence(exact, dampings[scale], query_grads, train_grads)
        for block in exact.values():
            block._cholesky.clear()  # one factorisation (up to 2 GB) at a time
    reference_time = time.perf_counter() - start
    ideal = {name: nearest_kronecker_basis(name, block.matrix, block.shape) for name, block in exact.items()}
    del exact
    print(f"reference: {reference_time:.0f} s", flush=True)

    rows = []
    default_scale_scores = {}
    for label, recording, curvature, covariances, fisher, samples in [*VARIANTS, (IDEAL, *[None] * 5)]:
        curv = ideal if label == IDEAL else fit(curvature, covariances, samples, traces[recording], fisher)
        label = label.format(every=stats_every)
        row: list[object] = [label]
        for scale in dampings:
            estimate = influence(curv, dampings[scale], query_grads, train_grads)
            row += mean_correlations(estimate, references[scale])
            if scale == "0.1×":
                default_scale_scores[label] = estimate
        rows.append(row)
        print(row, flush=True)

    if args.kronfluence:
        save_for_kronfluence(workdir, trace, train, queries)
    timings, kron_note = time_estimators(trace, train, queries, task, args.kronfluence, workdir)
    if any(label == "kronfluence EK-FAC" for label, _ in timings):
        pearson, spearman = mean_correlations(np.load(workdir / "kronfluence_scores.npy"), references["0.1×"])
        rows.append(["kronfluence EK-FAC (1 sample per example, its heuristic damping)", pearson, spearman] + [""] * 6)

    header = ["estimator"] + [f"{kind} @ {scale}" for scale in dampings for kind in ("Pearson", "Spearman")]
    n_params = sum(p.numel() for p in MLPClassifier().parameters())
    body = (
        f"Digits MLP 64-128-128-10 ({n_params:,} parameters), trained {args.epochs} epochs (SGD, lr 0.1, momentum 0.9) "
        f"with TDACallback (3 segments, true Fisher), {len(train):,} training examples, {args.queries} test queries, "
        f"measurement = cross-entropy loss. Reference: influence with the exact per-layer (block-diagonal) "
        f"Gauss-Newton Hessian at the final checkpoint (float64; {reference_time:.0f} s for the blocks and four "
        f"dampings). Every estimator uses the same per-layer damping c × mean Gauss-Newton eigenvalue "
        f"(c = 0.1 is kronfluence's heuristic and our default) or kronfluence's default 1e-8. "
        f"Mean over queries of the per-query correlation "
        f"across the training examples:\n\n"
        + markdown_table(header, rows)
        + "\n\nEnd-to-end time, one CPU thread each, best of 3 interleaved runs (fit at the final checkpoint with "
        "no cache, then "
        f"score {args.queries} queries × {len(train):,} training examples; kronfluence: its own fit + score "
        f"time inside its process, imports excluded):\n\n"
        + markdown_table(["estimator", "seconds"], timings)
        + "\n\n"
        + reading(rows, default_scale_scores, degenerate, stats_every)
        + kron_note
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


def reading(rows, scores_at_default, degenerate, stats_every) -> str:
    """The verdict under the table, with the measured numbers."""
    pearson = {row[0]: row[1] for row in rows}
    tiny = {row[0]: row[7] for row in rows}

    def find(prefix: str) -> str:
        return next(label for label in pearson if label.startswith(prefix))

    ours, sampled = find("EK-FAC, recomputed basis, expectation"), find("EK-FAC, recomputed basis, 1 sample")
    stream_auto, stream_every = (
        find(f"EK-FAC, streamed basis (every_n_steps={stats_every}"),
        find("EK-FAC, streamed basis (every_n_steps=1)"),
    )
    kron = next((label for label in pearson if label.startswith("kronfluence")), None)
    noise_only = mean_correlations(scores_at_default[sampled], scores_at_default[ours])[0]
    kfac = find("K-FAC, recomputed")
    return (
        f"Reading. **Target (clearly above kronfluence's ~0.5) not reached.** Our default (recomputed basis, "
        f"exact-expectation correction) reaches mean Pearson {pearson[ours]:.2f} at 0.1×"
        + (f", kronfluence {pearson[kron]:.2f}" if kron else "")
        + f". The gap is the Kronecker approximation itself, not our estimation of it: EK-FAC in an ideal "
        f"Kronecker eigenbasis (the nearest Kronecker product of each exact block) with the exact diagonal reaches "
        f"only {pearson[IDEAL]:.2f}, and K-FAC with the same recomputed factors {pearson[kfac]:.2f}, so on this "
        f"model at this damping no Kronecker-factored estimator we could build gets clearly above 0.5. The "
        f"Gauss-Newton blocks of this confident model are very degenerate "
        f"({', '.join(f'{name}: {100 * f:.0f}%' for name, f in degenerate.items())} of the eigenvalues below "
        f"0.1 × the mean), so at small damping the inverse is dominated by directions that no Kronecker "
        f"eigenbasis captures; with more damping every estimator agrees better (ours {rows[0][3]:.2f} at 1×, "
        f"{rows[0][5]:.2f} at 10×). "
        f"Sampling noise: one sampled label per example instead of the exact expectation drops ours to "
        f"{pearson[sampled]:.2f} (the two estimates, same basis, correlate {noise_only:.2f} with each other). "
        f"Streamed basis: {pearson[stream_auto]:.2f} with statistics every {stats_every} steps (the callback's "
        f"auto), {pearson[stream_every]:.2f} on every step, so the number of statistics steps is not what limits "
        f"it; the last segment's covariances average over a third of training while the model became confident, "
        f"and differ from the final Gauss-Newton matrix. Hence `EKFACInfluence` recomputes the covariances at the "
        f"final parameters by default (one extra pass, see the times above); SOURCE keeps the streamed ones. "
        f"An empirical-Fisher trace gives no better basis, and its empirical correction is worse. At "
        f"kronfluence's default absolute damping 1e-8 every estimator falls further (ours {tiny[ours]:.2f}, ideal "
        f"basis {tiny[IDEAL]:.2f}), so the claim that noiseless EK-FAC reaches ~0.99 against exact per-layer "
        f"Gauss-Newton influence is not reproduced here under any reading we tried (damping 0.1×, 1×, 10×, "
        f"1e-8; noise-free correction; ideal Kronecker basis).\n"
    )


def save_for_kronfluence(workdir: Path, trace, train, queries) -> None:
    """Save the final parameters and the data for ``kronfluence_digits.py``."""
    state = trace.checkpoint_state(trace.final_checkpoint.index)
    torch.save({k.removeprefix("net."): v for k, v in state.items()}, workdir / "final.pt")
    query_x, query_y = (torch.stack([queries[i][j] for i in range(len(queries))]) for j in range(2))
    torch.save({"train": train.tensors, "query": (query_x, query_y)}, workdir / "data.pt")


def run_kronfluence(python: str, workdir: Path) -> dict:
    """Run kronfluence in its venv on the saved model: ``{"version", "seconds"}`` (its own fit + score time)."""
    script = Path(__file__).resolve().parent / "kronfluence_digits.py"
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # one thread, as ours in time_estimators
    result = subprocess.run([python, str(script), str(workdir)], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"kronfluence failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def time_estimators(trace, train, queries, task, kronfluence: str | None, workdir: Path, repeats: int = 3):
    """Best-of-``repeats`` end-to-end seconds (fit with no cache + score), runs interleaved so that the
    load of a shared machine hits every estimator alike; and a note if kronfluence failed to run."""
    from lightning_tda.demo import MLPClassifier
    from lightning_tda.methods import EKFACInfluence

    runs = {
        "EK-FAC, recomputed basis (ours, default)": {},
        "EK-FAC, streamed basis": {"covariances": "stream"},
        "K-FAC, streamed": {"curvature": "kfac", "covariances": "stream"},
    }
    best = {label: float("inf") for label in runs} | ({"kronfluence EK-FAC": float("inf")} if kronfluence else {})
    version = None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread each: on a shared 2-core machine more threads only add contention
    for _ in range(repeats):
        for label, options in runs.items():
            method = EKFACInfluence(trace, MLPClassifier(), task, cache=False, **options)
            start = time.perf_counter()
            method.attribute(queries, train)
            best[label] = min(best[label], time.perf_counter() - start)
        if kronfluence:
            try:
                report = run_kronfluence(kronfluence, workdir)
                version = report["version"]
                best["kronfluence EK-FAC"] = min(best["kronfluence EK-FAC"], report["seconds"])
            except RuntimeError as err:
                best.pop("kronfluence EK-FAC")
                return [[label, seconds] for label, seconds in best.items()], f"\n{err}\n"
    torch.set_num_threads(threads)
    print(best, flush=True)
    note = f"\nkronfluence {version} ran in a separate venv on the same final parameters.\n" if kronfluence else ""
    return [[label, seconds] for label, seconds in best.items()], note


if __name__ == "__main__":
    main()
