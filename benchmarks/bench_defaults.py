"""Every method with its defaults on 16 settings, the hyper-parameters around each default, and two
checks of what the scores claim: their unit (against re-training) and EK-FAC IF's convergence warning.

Settings (``benchmarks/run.py``): digits MLP, digits CNN, UCI Concrete, a synthetic 3-class set, a
synthetic regression and breast cancer, each converged and not (12, on which the defaults and the
convergence check's thresholds were chosen), plus 4 held out to test them: digits trained 30 epochs,
diabetes converged and not, wine. No per-setting tuning: one set of hyper-parameters per row.

For each setting and method: LDS (α = 0.5, ``--subsets`` M × ``--seeds`` R re-trainings, cached in
``<workdir>/ground_truth.h5``, shared with ``run.py``) and the *scale ratio*: per query, the spread
over the M subsets of the predicted effect ``Σ_{m∈S} τ(q, m)`` divided by the spread of the measured
query loss, median over queries. Every method claims one unit, "the predicted change of the query's
measurement when the example is removed", so 1 is a calibrated scale, 100 a hundredfold over-claim.

Run: ``python benchmarks/bench_defaults.py`` (writes the "defaults" section of BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import run  # noqa: E402
from benchmarks.report import BENCHMARKS_MD, markdown_table, write_section  # noqa: E402
from lightning_tda.evaluation import lds  # noqa: E402

TUNED = [run.CONCRETE, run.CONCRETE_EARLY, run.DIGITS, run.DIGITS_EARLY, *run.WIDER]
SETTINGS = [*TUNED, *run.HELD_OUT]


def _scale_lr(factor: float) -> Callable[[Any, Any], None]:
    def prepare(method: Any, train: Any) -> None:
        method.lr *= factor

    return prepare


def _last_lr(method: Any, train: Any) -> None:
    method.lr = float(np.max(method.trace.steps().lr[-1]))


@dataclass(frozen=True)
class Variant:
    """A method (display name in ``run.METHODS``) with hyper-parameters; ``prepare`` runs before attribution."""

    method: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    prepare: Callable[[Any, Any], Any] | None = None
    default: bool = False


OLD_FORWARD_INF = {"steps": 5, "normalize": False}  # its lr default then: the last learning rate
VARIANTS: dict[str, Variant] = {
    "SOURCE": Variant("SOURCE", default=True),
    "TracInCP": Variant("TracInCP", default=True),
    "EK-FAC IF": Variant("EK-FAC IF", default=True),
    "EK-FAC IF, damping 0.01×": Variant("EK-FAC IF", {"damping_scale": 0.01}),
    "EK-FAC IF, damping 1×": Variant("EK-FAC IF", {"damping_scale": 1.0}),
    "EK-FAC IF, damping 10×": Variant("EK-FAC IF", {"damping_scale": 10.0}),
    "DataInf": Variant("DataInf", default=True),
    "DataInf, damping 0.01": Variant("DataInf", {"damping_scale": 0.01}),
    "DataInf, damping 1": Variant("DataInf", {"damping_scale": 1.0}),
    "DataInf, damping 10": Variant("DataInf", {"damping_scale": 10.0}),
    "Forward-INF": Variant("Forward-INF", default=True),
    "Forward-INF, 0.03·‖θ̂‖": Variant("Forward-INF", prepare=_scale_lr(0.3)),
    "Forward-INF, 0.3·‖θ̂‖": Variant("Forward-INF", prepare=_scale_lr(3.0)),
    "Forward-INF, K=5 × 0.1·‖θ̂‖": Variant("Forward-INF", {"steps": 5}),
    "Forward-INF, K=5 plain, α = last lr / 10": Variant("Forward-INF", OLD_FORWARD_INF, _scale_lr(0.1)),
    "Forward-INF before: K=5 plain, α = last lr": Variant("Forward-INF", {**OLD_FORWARD_INF, "backoff": False}),
    "Forward-INF before, with back-off": Variant("Forward-INF", OLD_FORWARD_INF),
    "Forward-INF before, tune()": Variant(
        "Forward-INF", {**OLD_FORWARD_INF, "backoff": False}, lambda method, train: method.tune(train)
    ),
}
DEFAULTS = [name for name, v in VARIANTS.items() if v.default]
BEFORE_AFTER = [
    "Forward-INF before: K=5 plain, α = last lr",
    "Forward-INF before, with back-off",
    "Forward-INF before, tune()",
    "Forward-INF",
]
POOR = 0.7  # EK-FAC IF is "poor" on a setting when its LDS is below this fraction of max(SOURCE, TracInCP)


def scale_ratio(values: np.ndarray, truth: Any) -> float:
    """Median over queries of std over subsets of the predicted group effect / std of the measured loss."""
    predicted = truth.masks() @ values.T  # (M, Q)
    measured = truth.measurements.mean(axis=1)  # (M, Q)
    spread = measured.std(axis=0)
    keep = spread > 0
    return float(np.median(predicted.std(axis=0)[keep] / spread[keep])) if keep.any() else math.nan


def run_setting(setting: run.Setting, cfg: run.Config) -> dict[str, Any]:
    train, test, _ = setting.datasets(None)
    queries = TensorDataset(*test[: cfg.queries])
    trace = cfg.workdir / f"{setting.name}.h5"
    run.log(f"{setting.name}: training the attributed model ({len(train)} examples)")
    run.train_traced(setting, train, trace)
    truth = run.ground_truth(setting, train, queries, cfg)
    out: dict[str, Any] = {"title": setting.title, "n_train": len(train), "trained": truth.num_trained, "runs": {}}
    for label, variant in [*VARIANTS.items(), (run.RANDOM, Variant(run.RANDOM))]:
        result = run.run_method(
            variant.method, cfg, trace, setting, queries, train, extra=variant.kwargs, prepare=variant.prepare
        )
        entry: dict[str, Any] = {"status": result.status, "seconds": result.seconds}
        if result.scores is not None:
            values = result.scores.values.double().numpy()
            score = lds(result.scores, truth)
            entry.update(lds=score.mean, ci=[score.ci_low, score.ci_high], scale=scale_ratio(values, truth))
            entry["top"] = float(np.median(np.abs(values).max(axis=1)))
            config = result.scores.config
            if "convergence" in config:
                entry.update(convergence=config["convergence"], warnings=config["warnings"])
            if "backed_off" in config:
                entry["backed_off"] = len(config["backed_off"])
        out["runs"][label] = entry
        run.log(f"{setting.name}: {label} {result.status} {entry.get('lds', math.nan):.3f} {result.seconds:.1f}s")
    return out


# --- report -------------------------------------------------------------------------------------
def cell(entry: dict[str, Any], best: float | None = None) -> str:
    if "lds" not in entry:
        kind, _, detail = entry["status"].partition(":")  # "failed: FloatingPointError: ..." -> the error type
        return f"{kind} ({detail.split(':')[0].strip()})" if detail else kind
    text = f"{entry['lds']:.2f}"
    return f"**{text}**" if best is not None and entry["lds"] >= best - 1e-12 else text


def _resnet_call(entry: dict[str, Any]) -> str:
    if entry["status"] == "ok":
        return f"finished, finite scores, {entry['backed_off']} of 10 queries backed off"
    named = entry["status"].split("query id(s) [")[-1].split("]")[0].count(",") + 1
    return f"failed: FloatingPointError naming {named} of 10 queries"


def _median_text(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    return f"{np.median(finite):.3g}" if finite else "-"


def mean_rank(results: dict[str, Any], labels: list[str], settings: list[str]) -> dict[str, float]:
    """Mean over settings of each label's rank by LDS among ``labels`` (a failure ranks last)."""
    ranks: dict[str, list[float]] = {label: [] for label in labels}
    for name in settings:
        values = [results[name]["runs"][label].get("lds", -math.inf) for label in labels]
        order = np.argsort(np.argsort(-np.asarray(values)))
        for label, rank in zip(labels, order):
            ranks[label].append(rank + 1)
    return {label: float(np.mean(r)) for label, r in ranks.items()}


def summary(results: dict[str, Any], labels: list[str], settings: list[str]) -> dict[str, dict[str, float]]:
    out = {}
    for label in labels:
        entries = [results[name]["runs"][label] for name in settings]
        values = [e["lds"] for e in entries if "lds" in e]
        out[label] = {
            "mean": float(np.mean(values)) if values else math.nan,
            "worst": float(np.min(values)) if values else math.nan,
            "failed": sum("lds" not in e for e in entries),
        }
    return out


def report(results: dict[str, Any], cfg: run.Config, seconds: float, resnet: dict[str, Any] | None = None) -> str:
    tuned = [s.name for s in TUNED if s.name in results]
    held = [s.name for s in run.HELD_OUT if s.name in results]
    names = tuned + held
    parts = [
        f"LDS at α = 0.5 with M = {cfg.subsets} subsets × R = {cfg.seeds} re-training seeds, {cfg.queries} test "
        f"queries (wine: all 36), every method with one set of hyper-parameters on every setting, one CPU thread. "
        f"Settings 1–12 are the ones the defaults were chosen on; 13–16 were added afterwards to test them. "
        + (f"Total {seconds / 60:.0f} min; " if math.isfinite(seconds) else "")
        + "ground truths from the cache of earlier runs (`run.py --ground-truth-only`) where present.",
    ]
    # 1. The defaults across settings.
    header = ["#", "setting", *DEFAULTS, "random", "best"]
    rows = []
    for i, name in enumerate(names, start=1):
        runs = results[name]["runs"]
        best = max((runs[m].get("lds", -math.inf) for m in DEFAULTS), default=math.nan)
        winner = max(DEFAULTS, key=lambda m: runs[m].get("lds", -math.inf))
        rows.append([i, results[name]["title"], *(cell(runs[m], best) for m in DEFAULTS), cell(runs["random"]), winner])
    for group, members in (("mean, settings 1–12", tuned), ("mean, held-out 13–16", held)):
        stats = summary(results, [*DEFAULTS, "random"], members)
        rows.append(["", f"**{group}**", *(f"{stats[m]['mean']:.3f}" for m in [*DEFAULTS, "random"]), ""])
    ranks = mean_rank(results, DEFAULTS, names)
    rows.append(["", "**mean rank, all 16**", *(f"{ranks[m]:.1f}" for m in DEFAULTS), "", ""])
    parts.append("### LDS of every method with its defaults\n\n" + markdown_table(header, rows))

    # 2. Around each default: which hyper-parameters do best across settings.
    labels = list(VARIANTS)
    quiet = [n for n in tuned if not results[n]["runs"]["EK-FAC IF"].get("warnings", ["?"])]
    stats_tuned, stats_held = summary(results, labels, tuned), summary(results, labels, held)
    stats_quiet = summary(results, labels, quiet)
    families: dict[str, list[str]] = {}
    for label, v in VARIANTS.items():
        families.setdefault(v.method, []).append(label)
    rows = []
    for members in families.values():
        ranks = mean_rank(results, members, tuned)
        for label in members:
            s, h, q = stats_tuned[label], stats_held[label], stats_quiet[label]
            mark = " (default)" if VARIANTS[label].default else ""
            rows.append(
                [
                    f"{label}{mark}",
                    f"{s['mean']:.3f}",
                    f"{ranks[label]:.2f}" if len(members) > 1 else "-",
                    f"{s['worst']:.3f}",
                    s["failed"],
                    f"{q['mean']:.3f}",
                    f"{h['mean']:.3f}",
                    h["failed"],
                ]
            )
    header = [
        "variant",
        "mean LDS 1–12",
        "mean rank in its family 1–12",
        "worst 1–12",
        "failed 1–12",
        f"mean LDS where IF's check is quiet ({len(quiet)} of 1–12)",
        "mean LDS 13–16",
        "failed 13–16",
    ]
    parts.append(
        "### Hyper-parameters around each default\n\nHow the defaults were chosen (on a first run with M = 50 × 2, "
        "the same 12 settings; Forward-INF's step rule after a wider search of 30 rules, plain, normalized, "
        "relative to ‖θ̂‖ or to a target rise of the query loss, K from 1 to 10, whose neighbours of the winner "
        "are the rows here): the variant with the best mean LDS over settings 1–12, unless another is within "
        "0.01 of it and better on the worst setting (robustness first). One exception, EK-FAC IF's damping: it "
        "is judged where IF's own assumption holds (its convergence check is quiet), because more damping helps "
        "only where the check warns, by turning IF into a gradient dot product, and there SOURCE and TracInCP "
        "beat every damping (first table). DataInf's damping scale changes nothing here: with λ far below the "
        "squared gradient norms its r is 1/λ times a vector that does not depend on λ, so no ranking moves. Failures "
        "count as missing from the means and last in the ranks.\n\n" + markdown_table(header, rows)
    )

    # 3. Forward-INF before and after.
    header = ["setting", *BEFORE_AFTER]
    rows = []
    for name in names:
        runs = results[name]["runs"]
        cells = []
        for label in BEFORE_AFTER:
            text = cell(runs[label])
            if runs[label].get("backed_off"):
                text += f" ({runs[label]['backed_off']} backed off)"
            cells.append(text)
        rows.append([results[name]["title"], *cells])
    stats = summary(results, BEFORE_AFTER, names)
    rows.append(["**mean over the settings where it finished**", *(f"{stats[m]['mean']:.3f}" for m in BEFORE_AFTER)])
    rows.append(["**failed**", *(f"{stats[m]['failed']} of {len(names)}" for m in BEFORE_AFTER)])
    rows.append(
        [
            "**median top score**",
            *(_median_text([results[n]["runs"][m].get("top", math.nan) for n in names]) for m in BEFORE_AFTER),
        ]
    )
    parts.append(
        "### Forward-INF before and after\n\nBefore: the paper's plain steps, K = 5, α = the last recorded learning "
        "rate, failing the call when a query diverged (and `tune()` on 32 planted duplicates, the protocol the "
        "evaluation section used). After: one normalized step of 0.1·‖θ̂‖, per-query back-off. "
        "Median top score = median over settings of the median over queries of the largest |score| (the unit "
        "changed too: before, raw loss changes).\n\n" + markdown_table(header, rows)
    )

    if resnet:
        rows = [
            [
                label,
                _resnet_call(r),
                f"{r['alpha']:.3g}" if "alpha" in r else "-",
                f"{r['top']:.3g}" if "top" in r else "-",
                f"{r['seconds']:.0f}",
            ]
            for label, r in resnet.items()
        ]
        parts.append(
            "On a ResNet (width 16, BatchNorm, 0.7M parameters) trained 2 epochs on 1,000 synthetic 32×32 images, "
            "10 test queries against the 1,000 training images. The call no longer fails, but the default step "
            "(0.1·‖θ̂‖) overshoots on every query of this network and is backed off once, and the scores are large: "
            "the model is far from converged (test losses up to 74 nats, query gradients of norm ~10³), so even "
            "first-order influence predicts changes of ~10³ here, and the backed-off step is still nonlinear."
            "\n\n" + markdown_table(["Forward-INF", "call", "first α", "median top score", "s"], rows)
        )

    # 4. Scale: do the scores mean what the unit says?
    header = ["setting", *DEFAULTS]
    rows = [
        [results[n]["title"], *(f"{results[n]['runs'][m].get('scale', math.nan):.2g}" for m in DEFAULTS)] for n in names
    ]
    medians = [np.nanmedian([results[n]["runs"][m].get("scale", np.nan) for n in names]) for m in DEFAULTS]
    rows.append(["**median**", *(f"{v:.2g}" for v in medians)])
    parts.append(
        "### Scale of the scores against re-training\n\nEvery method's unit is the predicted change of the query's "
        "measurement when the example is removed. Per query, the spread (std over the M subsets) of the predicted "
        "effect of each subset, Σ τ(q, m) over its examples, divided by the spread of the query loss actually "
        "measured after re-training on it; median over queries. 1 = the scores have the size of the effects they "
        "predict. Seed noise in the measured loss pulls every ratio down alike.\n\n" + markdown_table(header, rows)
    )

    # 5. EK-FAC IF's convergence check.
    header = [
        "setting",
        "EK-FAC IF",
        "max(SOURCE, TracInCP)",
        "IF / best",
        "IF poor",
        "passes",
        "loss drop",
        "Λ·σ̄",
        "check",
        "agrees",
    ]
    rows, agree = [], {"tuned": 0, "held": 0}
    for name in names:
        runs = results[name]["runs"]
        ekfac, best = runs["EK-FAC IF"], max(runs["SOURCE"].get("lds", -1), runs["TracInCP"].get("lds", -1))
        if "lds" not in ekfac or "convergence" not in ekfac:
            rows.append([results[name]["title"], cell(ekfac), f"{best:.2f}", "-", "-", "-", "-", "-", "-", "-"])
            continue
        poor = ekfac["lds"] < POOR * best
        fires = bool(ekfac["warnings"])
        reasons = "; ".join(
            "stopped early" if w.startswith("Training stopped") else "not settled" for w in ekfac["warnings"]
        )
        ok = poor == fires
        agree["tuned" if name in tuned else "held"] += ok
        c = ekfac["convergence"]
        rows.append(
            [
                results[name]["title"],
                f"{ekfac['lds']:.2f}",
                f"{best:.2f}",
                f"{ekfac['lds'] / best:.2f}",
                "yes" if poor else "no",
                f"{c['passes']:.0f}",
                f"{c['loss_drop']:.3f}",
                f"{c['settled']:.3g}",
                f"warns ({reasons})" if fires else "quiet",
                "yes" if ok else "**no**",
            ]
        )
    parts.append(
        "### EK-FAC IF's convergence check\n\n`EKFACInfluence` warns (in `Scores.config['warnings']`, as a Python "
        "warning and in the reports) when training stopped early (fewer than 5 passes and the loss still falling: "
        "it fell by more than 1% of its initial value from the third to the last quarter of steps) or never "
        "settled along the final curvature (learning-rate mass × mean curvature eigenvalue, median over layers, "
        f"below 0.1). IF is *poor* here when its LDS is below {POOR}× the better of SOURCE and TracInCP. The check "
        f"agrees on {agree['tuned']} of {len(tuned)} settings it was set on and {agree['held']} of {len(held)} "
        "held-out ones.\n\n" + markdown_table(header, rows)
    )
    return "\n\n".join(parts)


def resnet_before_after(cfg: run.Config) -> dict[str, Any]:
    """Forward-INF before and after on a small ResNet (width 16, BatchNorm) trained 2 epochs on 1,000
    synthetic 32×32 images: does the call finish, with what α and how large are the scores."""
    import lightning as L
    from torch.utils.data import DataLoader

    from lightning_tda import ClassificationTask, TDACallback, Trace
    from lightning_tda.demo import ResNet, SyntheticImageDataModule, headless_trainer
    from lightning_tda.methods import ForwardINF, MethodOptions

    L.seed_everything(0, verbose=False)
    dm = SyntheticImageDataModule(num_examples=1250, seed=0)
    dm.setup()
    path, task = cfg.workdir / "resnet.h5", ClassificationTask()
    run.log("resnet: training (width 16, 2 epochs, 1,000 images)")
    callback = TDACallback(str(path), task=task, if_exists="overwrite")
    trainer = headless_trainer(max_epochs=2, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[callback])
    trainer.fit(ResNet(width=16), DataLoader(dm.train_set, batch_size=64, shuffle=True))
    queries = TensorDataset(*dm.test_set[:10])
    out = {}
    for label in BEFORE_AFTER[:2] + BEFORE_AFTER[3:]:
        variant = VARIANTS[label]
        start = time.perf_counter()
        try:
            method = ForwardINF(
                Trace.open(path), ResNet(width=16), task, options=MethodOptions(progress=False), **variant.kwargs
            )
            scores = method.attribute(queries, dm.train_set)
            top = scores.values.abs().amax(dim=1)
            out[label] = {
                "status": "ok",
                "backed_off": len(scores.config["backed_off"]),
                "alpha": method.lr,
                "top": float(top.median()),
                "finite": bool(torch.isfinite(scores.values).all()),
            }
        except FloatingPointError as err:  # the old contract: the call fails, naming the diverged queries
            named = (
                str(err).split("query id(s) [")[1].split("]")[0].count(",") + 1 if "query id(s) [" in str(err) else 0
            )
            out[label] = {"status": f"failed: FloatingPointError, {named} of 10 queries diverged"}
        out[label]["seconds"] = time.perf_counter() - start
        run.log(f"resnet: {label} {out[label]}")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subsets", type=int, default=100, help="LDS subsets M")
    parser.add_argument("--seeds", type=int, default=2, help="re-training seeds R per subset")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2, help="processes re-training in parallel")
    parser.add_argument("--settings", nargs="+", default=[s.name for s in SETTINGS], choices=[s.name for s in SETTINGS])
    parser.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent.parent / "runs" / "benchmark")
    parser.add_argument("--out", type=Path, default=BENCHMARKS_MD)
    parser.add_argument("--no-resnet", dest="resnet", action="store_false", help="skip Forward-INF on the ResNet")
    parser.add_argument("--from-json", type=Path, default=None, help="rewrite the section from a saved defaults.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = run.Config(
        quick=False,
        subsets=args.subsets,
        seeds=args.seeds,
        queries=args.queries,
        max_train=None,
        leaked=0,
        counterfactual_queries=0,
        ks=(),
        workers=args.workers,
        workdir=args.workdir,
        methods=list(run.METHODS),
        experiments=[],
    )
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        given = list(argv if argv is not None else sys.argv[1:])
        flag = given.index("--from-json")
        seconds, resnet = saved.pop("seconds", math.nan), saved.pop("resnet")
        argv = saved.pop("argv", given[:flag] + given[flag + 2 :])
        results = saved
    else:
        start = time.perf_counter()
        resnet = resnet_before_after(cfg) if args.resnet else None
        results = {name: run_setting(run.SETTINGS[name], cfg) for name in args.settings}
        seconds, argv = time.perf_counter() - start, list(argv if argv is not None else sys.argv[1:])
        saved = {**results, "resnet": resnet, "seconds": seconds, "argv": argv}
        (cfg.workdir / "defaults.json").write_text(json.dumps(saved, indent=1, default=float))
    body = report(results, cfg, seconds, resnet)
    command = "python benchmarks/bench_defaults.py " + shlex.join(argv)
    write_section("defaults", "Defaults across settings", body, command=command.strip(), path=args.out)
    return results


if __name__ == "__main__":
    main()
