"""Forward-INF next to TracInCP and EK-FAC influence: leakage detection, mislabel detection, speed.

All on scikit-learn digits with the 64-128-128-10 MLP (26k parameters, SGD momentum 0.9, lr 0.1,
8 epochs) recorded by :class:`TDACallback` (3 segments, 6 checkpoints):

* **Leakage** (the paper's §4.2): copies of 50 test points are planted in the training set
  (1,437 + 50 examples) before training; each test point is a query and we report how often its
  own copy is ranked first / in the top 5 / top 10 of the 1,487 training examples.
* **Mislabels** (§4.4): 10% of the training labels flipped to another class; training examples
  ranked by self-influence (each example as its own query), and by harm to 100 clean test points
  (the negated Forward-INF joint score, the negated mean score of the others); ROC AUC and the
  fraction of flipped labels found in the top 10% of the ranking.
* **Speed**: wall time to score n training examples for Q queries, all methods in one run on one
  CPU thread, n from 359 to 5,748 (the training set tiled) and Q from 1 to 64.

Run: ``.venv/bin/python benchmarks/bench_forward_inf.py`` (about 10 minutes on 2 busy CPU cores).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import markdown_table, write_section  # noqa: E402


def train(path: Path, train_set: TensorDataset, epochs: int = 8, seed: int = 0):
    """Train the digits MLP on ``train_set`` with the callback; return the opened trace."""
    import lightning as L

    from lightning_tda import ClassificationTask, TDACallback, Trace
    from lightning_tda.demo import MLPClassifier, headless_trainer

    L.seed_everything(seed, verbose=False)
    loader = DataLoader(train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    trainer = headless_trainer(max_epochs=epochs, callbacks=[TDACallback(str(path), task=ClassificationTask())])
    trainer.fit(MLPClassifier(lr=0.1, momentum=0.9), loader)
    return Trace.open(path)


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def methods(trace, tune_train: TensorDataset | None) -> dict[str, Callable[[], Any]]:
    """Name -> factory of a ready method (Forward-INF variants tuned on ``tune_train`` if given)."""
    from lightning_tda import ClassificationTask
    from lightning_tda.demo import MLPClassifier
    from lightning_tda.methods import EKFACInfluence, ForwardINF, TracInCP

    task = ClassificationTask()
    final = trace.final_checkpoint.index

    def forward_inf(tune: bool, **kwargs: Any) -> Callable[[], Any]:
        def make() -> Any:
            method = ForwardINF(trace, MLPClassifier(), task, **kwargs)
            if tune and tune_train is not None:
                method.tune(tune_train, **TUNE_GRIDS[bool(kwargs.get("normalize"))])
            return method

        return make

    return {
        "Forward-INF, defaults": forward_inf(False),
        "Forward-INF, the paper's plain steps, K=5, α = last lr": forward_inf(False, normalize=False, steps=5),
        "Forward-INF, plain steps, tuned": forward_inf(True, normalize=False),
        "Forward-INF, normalized steps, tuned": forward_inf(True, normalize=True),
        "TracInCP, 6 checkpoints": lambda: TracInCP(trace, MLPClassifier(), task),
        "TracInCP, final checkpoint": lambda: TracInCP(trace, MLPClassifier(), task, checkpoints=[final]),
        "EK-FAC IF": lambda: EKFACInfluence(trace, MLPClassifier(), task, cache=False),
    }


TUNE_GRIDS = {
    False: {"steps": (1, 3, 5, 10), "lrs": (0.01, 0.03, 0.1, 0.3, 1.0)},
    True: {"steps": (1, 3, 10, 30), "lrs": (0.1, 0.3, 1.0, 3.0)},
}


def describe(method: Any) -> str:
    if method.name != "forward-inf":
        return ""
    return f"K={method.steps}, α={method.lr:g}"


# --------------------------------------------------------------------------------------- leakage


def leakage(workdir: Path, n_leaked: int) -> str:
    from lightning_tda.demo import DigitsDataModule

    dm = DigitsDataModule(seed=0)
    dm.setup()
    (x, y), (xq, yq) = dm.train_set.tensors, dm.test_set.tensors
    train_set = TensorDataset(torch.cat([x, xq[:n_leaked]]), torch.cat([y, yq[:n_leaked]]))
    queries = TensorDataset(xq[:n_leaked], yq[:n_leaked])
    copies = torch.arange(len(x), len(x) + n_leaked)
    trace = train(workdir / "leak.h5", train_set)
    rows = []
    for name, make in methods(trace, train_set).items():
        method, setup_time = timed(make)
        try:
            scores, seconds = timed(method.attribute, queries, train_set)
        except FloatingPointError as err:
            rows.append([name, describe(method), "diverged", "", "", "", str(err).split("(")[0]])
            continue
        own = scores.values[torch.arange(n_leaked), copies]
        ranks = (scores.values >= own[:, None]).sum(1)  # ties count against the copy
        rates = [f"{float((ranks <= k).float().mean()):.0%}" for k in (1, 5, 10)]
        rows.append(
            [name, describe(method), *rates, f"{float(ranks.float().median()):.0f}", f"{seconds / n_leaked:.3f}"]
            + [f"{setup_time:.1f}"]
        )
        print(name, rows[-1], flush=True)
    header = ["method", "hyper-parameters", "top-1", "top-5", "top-10", "median rank", "s / query", "setup s"]
    return (
        f"### Leakage detection\n\n{n_leaked} test points copied into the 1,437 training examples before "
        f"training; each test point's rank of its own copy among {len(train_set)} (ties count against it). "
        f"Setup = tuning (Forward-INF `tune()` on 32 planted training examples, grids {TUNE_GRIDS}) or "
        f"nothing; EK-FAC fits inside `attribute`.\n\n" + markdown_table(header, rows)
    )


# -------------------------------------------------------------------------------------- mislabels


def auc_and_recall(scores: np.ndarray, flipped: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import roc_auc_score

    top = np.argsort(-scores)[: int(round(0.1 * len(scores)))]
    return float(roc_auc_score(flipped, scores)), float(flipped[top].mean() * len(top) / flipped.sum())


def mislabels(workdir: Path, n_clean: int) -> str:
    from lightning_tda.demo import DigitsDataModule

    dm = DigitsDataModule(seed=0, flip_fraction=0.1)
    dm.setup()
    flipped = dm.flipped.numpy()
    clean = TensorDataset(*[t[:n_clean] for t in dm.test_set.tensors])
    trace = train(workdir / "mislabel.h5", dm.train_set)
    rows = []
    for name, make in methods(trace, dm.train_set).items():
        method, _ = timed(make)
        try:
            own, own_time = timed(method.self_influence, dm.train_set)
            own = own.values.numpy()
            if method.name == "forward-inf":
                harm, harm_time = timed(method.attribute, clean, dm.train_set, joint=True)
                harm = -harm.values[0].numpy()
            else:
                harm, harm_time = timed(method.attribute, clean, dm.train_set)
                harm = -harm.values.mean(0).numpy()
        except FloatingPointError as err:
            rows.append([name, describe(method), "diverged", "", "", "", "", str(err).split("(")[0]])
            continue
        self_auc, self_recall = auc_and_recall(own, flipped)
        harm_auc, harm_recall = auc_and_recall(harm, flipped)
        rows.append(
            [name, describe(method), self_auc, f"{self_recall:.0%}", f"{own_time:.1f}"]
            + [harm_auc, f"{harm_recall:.0%}", f"{harm_time:.1f}"]
        )
        print(name, rows[-1], flush=True)
    header = ["method", "hyper-parameters", "self AUC", "self: found in top 10%", "self s"]
    header += ["harm AUC", "harm: found in top 10%", "harm s"]
    return (
        f"### Mislabel detection\n\n{int(flipped.sum())} of {len(flipped)} training labels flipped (10%). "
        f"*self*: rank by self-influence (largest first). *harm*: rank by harm to {n_clean} clean test points "
        f"(Forward-INF: one joint step set on all of them, `joint=True`; the others: mean score over the "
        f"queries), most harmful first. Found in top 10% = recall of flipped labels among the top 10% "
        f"(at most 100%).\n\n" + markdown_table(header, rows)
    )


# ------------------------------------------------------------------------------------------ speed


def speed(workdir: Path, sizes: list[int], query_counts: list[int], steps: int) -> str:
    from lightning_tda import ClassificationTask
    from lightning_tda.demo import DigitsDataModule, MLPClassifier
    from lightning_tda.methods import EKFACInfluence, ForwardINF, TracInCP

    dm = DigitsDataModule(seed=0)
    dm.setup()
    trace = train(workdir / "speed.h5", dm.train_set)
    task = ClassificationTask()
    x, y = dm.train_set.tensors
    reps = -(-max(sizes) // len(x))
    big_x, big_y = x.repeat(reps, 1), y.repeat(reps)
    rows = []
    for n in sizes:
        train_set = TensorDataset(big_x[:n], big_y[:n])
        for q in query_counts:
            queries = TensorDataset(*[t[:q] for t in dm.test_set.tensors])
            fi = ForwardINF(trace, MLPClassifier(), task, steps=steps, lr=0.01, normalize=False)
            tracin = TracInCP(trace, MLPClassifier(), task)
            ekfac = EKFACInfluence(trace, MLPClassifier(), task, cache=False)
            best: dict[str, float] = {}
            for _ in range(2):  # best of two: the machine is shared
                for name, method in (("fi", fi), ("tracin", tracin)):
                    best[name] = min(best.get(name, np.inf), timed(method.attribute, queries, train_set)[1])
                best["ekfac_fit"] = min(best.get("ekfac_fit", np.inf), timed(ekfac.fit, train_set)[1])
                best["ekfac"] = min(best.get("ekfac", np.inf), timed(ekfac.attribute, queries, train_set)[1])
            rows.append(
                [n, q, best["fi"], best["tracin"], best["ekfac"], best["ekfac_fit"]]
                + [best["tracin"] / best["fi"], best["ekfac"] / best["fi"]]
            )
            print(rows[-1], flush=True)
    header = ["n train", "Q", "Forward-INF s", "TracInCP s", "EK-FAC s (fit + score)", "of which EK-FAC fit s"]
    header += ["TracInCP / Forward-INF", "EK-FAC / Forward-INF"]
    ratios = np.array([row[-2:] for row in rows])
    summary = (
        f"\n\nForward-INF was {ratios[:, 0].min():.1f}–{ratios[:, 0].max():.1f}× faster than TracInCP and "
        f"{ratios[:, 1].min():.1f}–{ratios[:, 1].max():.1f}× faster than EK-FAC over this grid; the advantage is "
        f"largest for few queries and many training examples (its forward reads cost ∝ Q·n, the others' "
        f"gradient passes ∝ n, independent of Q)."
    )
    return (
        f"### Speed\n\nWall time (best of 2, one CPU thread) to score n training examples (the digits training "
        f"set tiled) for Q queries. Forward-INF K={steps}, query_batch_size 64, batch_size 128: K·Q "
        f"backward passes on the queries, then (1 + ceil(Q/64)) forward reads of the training set under Q "
        f"parameter sets at once. TracInCP: per-example gradients of every training example at each of the 6 "
        f"checkpoints. EK-FAC: fit (eigendecomposition of the recorded factors + one correction pass over the "
        f"training set; `attribute` always fits) and scoring (one gradient pass).\n\n"
        + markdown_table(header, rows)
        + summary
    )


NOTES = """\
Reading the tables: plain Forward-INF (the paper's Algorithm 1, `normalize=False`) steps by α·∇f. A
leaked test point is fitted, so its loss gradient is tiny and the step barely moves the parameters;
the raw loss differences then favour uncertain training examples over the copy (median rank in the
hundreds). With `normalize=True` every query moves the same distance α per step and the copy comes
out first or near it far more often; that option is ours, not the paper's, and the default since it
did best by LDS across settings (one step of 0.1·‖θ̂‖, section "Defaults across settings"). The paper's 100% top-1
(CIFAR-10/ResNet-18) is not reached on digits, where many training images are near-copies of each
other. For the *harm* ranking Forward-INF takes one joint step set on all clean queries
(`joint=True`) with the K, α tuned for single queries, which is too large a move for the joint
objective; the defaults do better there."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for checking the script")
    parser.add_argument("--no-write", action="store_true", help="print instead of writing BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    quick = args.quick
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        sections = [
            leakage(workdir, n_leaked=10 if quick else 50),
            mislabels(workdir, n_clean=20 if quick else 100),
            speed(workdir, [359, 1437] if quick else [359, 1437, 5748], [1, 8] if quick else [1, 8, 64], steps=5),
        ]
    body = "\n\n".join([NOTES, *sections])
    if args.no_write or quick:
        print(body)
        return
    write_section("forward-inf", "Forward-INF vs TracInCP and EK-FAC IF (digits MLP)", body)


if __name__ == "__main__":
    main()
