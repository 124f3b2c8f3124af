"""Methods that follow the optimizer that ran: each change of issue 20 against what it replaced, by LDS on AdamW runs.

The settings are the modern suite of ``benchmarks/run.py`` (AdamW, weight decay 0.01, 10 % linear warm-up then
cosine decay per step; residual MLPs, a CNN, byte-level GPT-2 from scratch, fine-tuned and LoRA). Each one is
trained once with :class:`~lightning_tda.TDACallback` (3 segments, as ``run.py`` does; the trace holds Adam's
second moments at every checkpoint) and every variant below is scored on a fresh copy of that trace against the
suite's ground truth (M = 50 random halves × 2 seeds, 50 queries), read from ``<workdir>/ground_truth.h5``:
run ``benchmarks/run.py --suite modern --workdir <workdir>`` first, or this script re-trains what is missing.

Variants (the default first, then what the option turns off):

* SOURCE: ``segments="auto"`` (the default) against ``segments=None`` (all), and ``query_gradients="final"``.
* TracInCP: Adam's preconditioner (the default on Adam traces) against ``preconditioned=False``.
* Forward-INF: the step along Adam's direction (the default on Adam traces) against ``preconditioned=False``.
* EK-FAC IF, as the reference, with whether its convergence warning fired.

``--study response`` compares SOURCE's two responses (``response="unrolled"``: the segments' matrix functions
of the curvature; ``"first-order"``: their short-horizon limit, no curvature) and the automatic choice between
them (the default) with EK-FAC IF and TracInCP on every setting of ``run.py``, old (SGD) and modern (AdamW).

Run: ``.venv/bin/python benchmarks/bench_optimizer.py --workdir runs/modern [--study response] [--settings ...]
[--write]``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import run  # noqa: E402
from benchmarks.report import markdown_table, write_section  # noqa: E402
from lightning_tda import methods  # noqa: E402
from lightning_tda.evaluation import lds  # noqa: E402
from lightning_tda.trace import Trace  # noqa: E402
from lightning_tda.trace.cache import sidecar_path  # noqa: E402

# display name -> (class in lightning_tda.methods, keyword arguments)
OPTIMIZER_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "EK-FAC IF": ("EKFACInfluence", {}),
    "SOURCE": ("SOURCE", {}),
    "SOURCE, all segments": ("SOURCE", {"segments": None}),
    "SOURCE, θ_T query": ("SOURCE", {"query_gradients": "final"}),
    "TracInCP": ("TracInCP", {}),
    "TracInCP, plain": ("TracInCP", {"preconditioned": False}),
    "Forward-INF": ("ForwardINF", {}),
    "Forward-INF, plain step": ("ForwardINF", {"preconditioned": False}),
}
RESPONSE_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "SOURCE": ("SOURCE", {}),
    "SOURCE, unrolled": ("SOURCE", {"response": "unrolled"}),
    "SOURCE, first-order": ("SOURCE", {"response": "first-order"}),
    "EK-FAC IF": ("EKFACInfluence", {}),
    "TracInCP": ("TracInCP", {}),
}
RECORDING_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {  # bench_recording_accuracy.py
    "SOURCE, covariances streamed": ("SOURCE", {"covariances": "stream"}),
}
VARIANTS = OPTIMIZER_VARIANTS | RESPONSE_VARIANTS | RECORDING_VARIANTS


INTRO = (
    'Setup: the modern suite of `benchmarks/run.py` (section "Modern training recipes": AdamW, weight decay '
    "0.01, 10% warm-up then cosine decay per step), each setting trained once with TDACallback (3 segments; the "
    "trace holds Adam's bias-corrected second moments at every checkpoint), LDS against its ground truth (M = 50 "
    "halves × 2 seeds, 50 queries). Each column is one variant on a fresh copy of the same trace; the first of each "
    "method is its default, the next ones turn one option off. (warned) = EK-FAC IF's convergence warning fired."
)
NOTES = (
    'Before issue 20 (section "Modern training recipes", same settings and ground truth, the defaults of '
    "then): SOURCE -0.03 on the CNN, -0.03 on the fine-tuned GPT-2, 0.06 on the GPT-2 from scratch and 0.19 on "
    "the interpolating MLP; EK-FAC IF's warning fired on all 9 settings. SOURCE's collapse was numerical: the "
    "diagonal correction of Adam's segment Jacobian amplified by up to 3e19 (now capped at 1; docs/source.md). "
    'The column "SOURCE, all segments" differs from "SOURCE" only where `segments="auto"` left the '
    'descent of an interpolating Adam run out (the reason is in `Scores.config["segments_reason"]`). '
    '`query_gradients="checkpoints"` stays the default: "θ_T query" is the alternative.'
)


RESPONSE_INTRO = (
    'Setup: every setting of `benchmarks/run.py`: the 16 SGD settings of section "Defaults across settings" '
    '(momentum 0.9, constant learning rate) and the 9 AdamW settings of section "Modern training recipes", each '
    "trained once with TDACallback (3 segments), LDS (α = 0.5, 50 queries) against ground truth of M = 50 random "
    'halves × 2 seeds. `SOURCE` is the default (`response="auto"`: first-order for an SGD run that stopped early, '
    "under 5 passes with its loss still falling; unrolled otherwise), then each response forced, then the two "
    "baselines at their defaults. gap = SOURCE − max(EK-FAC IF, TracInCP), the issue-20 target being ≥ −0.03."
)
RESPONSE_NOTES = """Reading (traces recorded at the callback's defaults of the day: statistics within the 5% budget,
SOURCE's covariances recomputed where a segment holds fewer than 4 statistics steps).
- **Target (issue 20: SOURCE at its defaults ≥ max(EK-FAC IF, TracInCP) − 0.03) met on 22 of 25 settings.**
  Missed on digits trained 30 epochs (−0.06 to EK-FAC IF, SGD; no response, segment choice or horizon
  closed it: the unrolled response is SOURCE's best there), the GPT-2 trained from scratch (−0.08 to TracInCP;
  the first-order response gets 0.28 but nothing in the trace tells this run from the fine-tuned ones, where
  it loses 0.09) and penguins converged (−0.04 to EK-FAC IF, inside both CIs).
- **Before this section's two changes** (same ground truth; the first run of this study, recorded with 4
  statistics steps per segment): SOURCE 0.49 on diabetes stopped early, 0.72 on breast cancer stopped early,
  0.32 on the synthetic regression stopped early, 0.78 on the synthetic classification stopped early (now
  0.85, 0.95, 0.47, 0.88: the first-order response), 0.69 on the fine-tuned GPT-2 and 0.72 on LoRA (now 0.77
  and 0.79: the language model's sampled Fisher fixed, docs/algorithms.md §1).
- The first-order response equals TracInCP's LDS to the digit on every SGD setting: with a constant rate
  each segment's mean rate is every checkpoint's rate, so the two score vectors are proportional (SOURCE's
  carries momentum's 1/(1 − β), TracInCP's does not).
- Two recordings of the same model can hold different statistics steps (the budget cadence takes its
  optional ones by measured time), so SOURCE moves by up to about 0.02 between runs of this table (ANES96 0.53
  here, 0.56 in "Modern training recipes"); breast cancer converged moved from 0.63 (4 streamed statistics
  steps per segment) to 0.57 (one per segment, recomputed), see "What cheaper recording costs attribution"."""
STUDIES = {
    "optimizer": (OPTIMIZER_VARIANTS, "optimizer-aware", "Methods that follow the optimizer", INTRO, NOTES),
    "response": (
        RESPONSE_VARIANTS,
        "source-response",
        "SOURCE: unrolled or first-order response",
        RESPONSE_INTRO,
        RESPONSE_NOTES,
    ),
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def prepared(setting_name: str, workdir: Path) -> tuple[Any, Any, Any, Any]:
    """``(setting, train, queries, ground truth)`` of a ``run.py`` setting: 50 queries, ground truth of M = 50
    halves × 2 seeds read from ``<workdir>/ground_truth.h5`` (re-trained where missing)."""
    cfg = run.Config(
        quick=False, subsets=50, seeds=2, queries=50, max_train=None, leaked=0, counterfactual_queries=0, ks=(),
        workers=1, workdir=workdir, methods=[], experiments=[],
    )  # fmt: skip
    setting = run.SETTINGS[setting_name]
    setting.prepare(workdir)
    train, test, _ = setting.datasets(None)
    queries = TensorDataset(*test[: cfg.queries])
    return setting, train, queries, run.ground_truth(setting, train, queries, cfg)


def score(name: str, trace_path: Path, setting: Any, queries: Any, train: Any) -> tuple[Any, list[str]]:
    """Scores of one variant on a fresh copy of the trace (its own fitted curvature) and the warnings it raised."""
    class_name, kwargs = VARIANTS[name]
    copy = trace_path.with_name(f"{trace_path.stem}-copy.h5")
    shutil.copy(trace_path, copy)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            method = getattr(methods, class_name)(Trace.open(copy), setting.module_factory(), setting.task, **kwargs)
            scores = method.attribute(queries, train)
    finally:
        copy.unlink(missing_ok=True)
        sidecar_path(copy).unlink(missing_ok=True)
    return scores, [str(w.message).splitlines()[0] for w in caught]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    modern = [s.name for s in run.MODERN]
    parser.add_argument("--study", choices=list(STUDIES), default="optimizer")
    parser.add_argument("--settings", nargs="+", default=None, choices=list(run.SETTINGS), help="default: the study's")
    parser.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS), help="default: the study's")
    parser.add_argument("--workdir", type=Path, default=Path("runs/modern"))
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args()
    variants, section, title, intro, notes = STUDIES[args.study]
    args.settings = args.settings or (modern if args.study == "optimizer" else list(run.SETTINGS))
    args.variants = args.variants or list(variants)
    torch.set_num_threads(1)
    rows = []
    for setting_name in args.settings:
        setting, train, queries, truth = prepared(setting_name, args.workdir)
        path = args.workdir / "optimizer" / f"{setting_name}.h5"
        log(f"{setting_name}: training the traced model ({len(train)} examples)")
        run.train_traced(setting, train, path)
        row: list[Any] = [setting_name]
        means: dict[str, float] = {}
        for name in args.variants:
            start = time.perf_counter()
            scores, messages = score(name, path, setting, queries, train)
            result = lds(scores, truth)
            warned = " (warned)" if any(m.startswith("EK-FAC IF:") for m in messages) else ""
            log(f"{setting_name} | {name}: LDS {result} ({time.perf_counter() - start:.1f} s){warned}")
            row.append(f"{result.mean:.2f}{warned}")
            means[name] = result.mean
            if name == "SOURCE":
                log(f"  segments {scores.config['segments']}: {scores.config['segments_reason']}")
                if "response" in scores.config:
                    log(f"  response: {scores.config['response_reason']}")
        gap = [means[n] for n in ("EK-FAC IF", "TracInCP") if n in means]
        row += [f"{means['SOURCE'] - max(gap):+.2f}"] if args.study == "response" and gap and "SOURCE" in means else []
        rows.append(row)
    gap_column = ["gap"] if args.study == "response" and len(rows[0]) > len(args.variants) + 1 else []
    table = markdown_table(["setting", *args.variants, *gap_column], rows)
    print(table)
    if args.write:
        write_section(section, title, f"{intro}\n\n{table}\n\n{notes}")


if __name__ == "__main__":
    main()
