"""When in training did it matter: the cost of a timeline, and what two timelines show.

* ``cost``: ``attribute_over_time`` against ``attribute`` for SOURCE and TracInCP, in one process,
  interleaved (the order alternates every round; the first call of each method, which fits SOURCE's
  curvature, is not timed). Digits MLP 64-128-128-10 (26k parameters) and a wider 64-256-256-10
  (85k), each trained 8 epochs with ``TDACallback`` (3 segments x 2 checkpoints; every K-FAC factor
  recorded, ``max_factor_ratio=None``, which the wide model's head needs), 50 test queries
  against the 1,438 training examples. The ratio is the median over rounds of the within-round ratio.
* ``main-job``: ``lightning-tda run --config configs/digits.yaml --baselines true`` (5% flipped labels);
  when SOURCE's and TracInCP's timelines say the flipped examples hurt their queries.
* ``two-stage``: digits split in halves A and B; 6 epochs on A (warm-up + cosine), then 6 epochs on B
  with a fresh warm-up + cosine schedule, 2 segments per stage. SOURCE's timeline of the final model's
  queries against the same training stopped after stage 1: does A's influence survive stage 2? Each
  example is scored only in the segments of its own stage (the segments it was trained in).

    python benchmarks/bench_timeline.py          # writes the "timeline" section of BENCHMARKS.md
    python benchmarks/bench_timeline.py --results DIR --part cost   # one part at a time, kept in DIR
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import tempfile
import time
from html import unescape as html_unescape
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

N_QUERIES = 50
PARTS = ("cost", "main-job", "two-stage")
STAGE_EPOCHS = 6


def train_digits(path: Path, sizes: list[int], **callback_kwargs) -> None:
    import lightning as L
    from conftest import quiet_trainer

    from lightning_tda import ClassificationTask, TDACallback
    from lightning_tda.demo import DigitsDataModule, MLPClassifier

    L.seed_everything(0, verbose=False)
    callback = TDACallback(str(path), task=ClassificationTask(), **callback_kwargs)
    trainer = quiet_trainer(max_epochs=8, callbacks=[callback])
    trainer.fit(MLPClassifier(sizes=sizes, lr=0.1, momentum=0.9), DigitsDataModule(batch_size=64, seed=0))


def cost(rounds: int) -> list[list[object]]:
    from torch.utils.data import Subset

    from lightning_tda import ClassificationTask, Trace
    from lightning_tda.demo import DigitsDataModule, MLPClassifier
    from lightning_tda.methods import SOURCE, MethodOptions, TracInCP

    dm = DigitsDataModule(batch_size=64, seed=0)
    dm.setup()
    queries, train = Subset(dm.test_set, range(N_QUERIES)), dm.train_set
    rows = []
    for label, sizes in (
        ("MLP 64-128-128-10 (26k)", [64, 128, 128, 10]),
        ("MLP 64-256-256-10 (85k)", [64, 256, 256, 10]),
    ):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "trace.h5"
            # the wide model's 10-class head has a 257x257 input factor, above the default max_factor_ratio
            train_digits(path, sizes, max_factor_ratio=None)
            trace = Trace.open(path)
            for cls in (SOURCE, TracInCP):
                method = cls(
                    trace, MLPClassifier(sizes=sizes), ClassificationTask(), options=MethodOptions(batch_size=256)
                )
                method.attribute(queries, train)  # fits SOURCE's curvature (cached in the sidecar); not timed
                times: dict[str, list[float]] = {"attribute": [], "over_time": []}
                worst = 0.0
                for round_ in range(rounds):
                    order = ["attribute", "over_time"] if round_ % 2 == 0 else ["over_time", "attribute"]
                    results = {}
                    for kind in order:
                        start = time.perf_counter()
                        results[kind] = (method.attribute if kind == "attribute" else method.attribute_over_time)(
                            queries, train
                        )
                        times[kind].append(time.perf_counter() - start)
                    total = results["over_time"].total().values
                    worst = max(
                        worst,
                        float(
                            (total - results["attribute"].values).abs().max() / results["attribute"].values.abs().max()
                        ),
                    )
                ratios = [b / a for a, b in zip(times["attribute"], times["over_time"])]
                rows.append(
                    [
                        label,
                        cls.__name__,
                        statistics.median(times["attribute"]),
                        statistics.median(times["over_time"]),
                        statistics.median(ratios),
                        f"{worst:.1e}",
                    ]
                )
                print(rows[-1], flush=True)
    return rows


# ------------------------------------------------------------------------------ the main job


def main_job() -> dict[str, object]:
    """Run the main job with the baselines; return what the timelines say about the flipped labels."""
    from lightning_tda import Timeline
    from lightning_tda.cli import main
    from lightning_tda.demo import DigitsDataModule

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "digits"
        args = ["run", "--config", str(ROOT / "configs/digits.yaml"), "--output_dir", str(out)]
        args += ["--baselines", "true", "--trainer.logger", "false", "--report.wandb", "false"]
        assert main(args) == 0
        timelines = {name: Timeline.load(out / "trace.h5", f"{name}-timeline") for name in ("source", "tracin")}
        html = (out / "report.html").read_text()
        sentence = re.search(r'<p class="timeline"[^>]*>([^<]*)</p>', html).group(1)
    dm = DigitsDataModule(batch_size=64, flip_fraction=0.05)
    dm.setup()
    flipped = dm.flipped
    found = {}
    for name, timeline in timelines.items():
        values = timeline.values.double()  # (S, Q, N), every example kept
        harm = (-values).clamp(min=0)  # the hurting part of each segment's score
        flipped_harm = harm[:, :, flipped].sum(dim=(1, 2))
        clean_harm = harm[:, :, ~flipped].sum(dim=(1, 2))
        totals = timeline.totals.double()
        opponents = totals.topk(10, dim=1, largest=False).indices  # (Q, 10)
        is_flipped = flipped[opponents]
        # for each flipped top-10 opponent: the segment where it hurt its query most
        worst = [
            int(values[:, q, m].argmin())
            for q in range(totals.shape[0])
            for m, f in zip(opponents[q].tolist(), is_flipped[q].tolist())
            if f
        ]
        early_help = ((values[0] > 0) & (values[-1] < 0))[:, flipped].double().mean()
        found[name] = {
            "labels": [timeline.label(s) for s in range(len(timeline.segments))],
            "flipped_share": (flipped_harm / flipped_harm.sum()).tolist(),
            "clean_share": (clean_harm / clean_harm.sum()).tolist(),
            "per_example_ratio": ((flipped_harm / int(flipped.sum())) / (clean_harm / int((~flipped).sum()))).tolist(),
            "flipped_in_top10": float(is_flipped.double().mean()),
            "worst_segment_counts": np.bincount(worst, minlength=len(timeline.segments)).tolist(),
            "early_help_late_harm": float(early_help),
        }
        print(name, found[name], flush=True)
    found["sentence"] = html_unescape(sentence)
    return found


# ------------------------------------------------------------------------------ two stages


def two_stage() -> dict[str, float]:
    import lightning as L
    import torch
    from conftest import quiet_trainer
    from scipy.stats import spearmanr
    from torch.utils.data import DataLoader, Subset, SubsetRandomSampler

    from lightning_tda import ClassificationTask, TDACallback, Trace
    from lightning_tda.demo import DigitsDataModule, MLPClassifier
    from lightning_tda.methods import SOURCE, MethodOptions

    dm = DigitsDataModule(batch_size=64, seed=0)
    dm.setup()
    n = len(dm.train_set)
    stage_a, stage_b = list(range(n // 2)), list(range(n // 2, 2 * (n // 2)))
    steps_per_epoch = math.ceil(len(stage_a) / 64)
    stage_steps = STAGE_EPOCHS * steps_per_epoch

    class TwoStageData(L.LightningDataModule):
        """Stage 1 draws its batches from A, stage 2 from B (dataloaders are rebuilt every epoch)."""

        def train_dataloader(self):
            epoch = self.trainer.current_epoch
            chosen = stage_a if epoch < STAGE_EPOCHS else stage_b
            sampler = SubsetRandomSampler(chosen, generator=torch.Generator().manual_seed(epoch))
            return DataLoader(dm.train_set, batch_size=64, sampler=sampler)

    class FreshSchedule(MLPClassifier):
        """SGD with momentum; each stage warms up for 8 steps, then decays with a cosine to 10% of the peak."""

        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

            def factor(step: int) -> float:
                t = step % stage_steps
                if t < 8:
                    return (t + 1) / 8
                return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (t - 8) / (stage_steps - 8)))

            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    queries = Subset(dm.test_set, range(N_QUERIES))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, epochs, boundaries in (
            ("stage1", STAGE_EPOCHS, [stage_steps // 2]),
            ("final", 2 * STAGE_EPOCHS, [stage_steps // 2, stage_steps, stage_steps + stage_steps // 2]),
        ):
            L.seed_everything(0, verbose=False)
            path = Path(tmp) / f"{name}.h5"
            callback = TDACallback(str(path), task=ClassificationTask(), segments=boundaries, dataset_size=len(stage_a))
            trainer = quiet_trainer(max_epochs=epochs, callbacks=[callback], reload_dataloaders_every_n_epochs=1)
            trainer.fit(FreshSchedule(), TwoStageData())
            trace = Trace.open(path)
            method = SOURCE(trace, FreshSchedule(), ClassificationTask(), options=MethodOptions(batch_size=256))
            results[name] = method.attribute_over_time(queries, dm.train_set)
            print(name, [results[name].label(s) for s in range(len(results[name].segments))], flush=True)
    final, stage1 = results["final"], results["stage1"]
    assert final.steps[:2].tolist() == stage1.steps.tolist(), "the two runs must share stage 1"
    a_final = final.values[:2][:, :, stage_a].double().sum(0)  # A's influence on the final model (Q, |A|)
    a_stage1 = stage1.values[:, :, stage_a].double().sum(0)  # on the model at the end of stage 1
    b_final = final.values[2:][:, :, stage_b].double().sum(0)
    rho = [spearmanr(x, y).statistic for x, y in zip(a_final.numpy(), a_stage1.numpy())]
    top_overlap = np.mean(
        [
            len(set(x.topk(20).indices.tolist()) & set(y.topk(20).indices.tolist())) / 20
            for x, y in zip(a_final, a_stage1)
        ]
    )
    found = {
        "labels": [final.label(s) for s in range(len(final.segments))],
        "survival": float(a_final.abs().mean() / a_stage1.abs().mean()),
        "rank_correlation": float(np.mean(rho)),
        "top20_overlap": float(top_overlap),
        "share_a": float(a_final.abs().sum() / (a_final.abs().sum() + b_final.abs().sum())),
        "b_over_a": float(b_final.abs().mean() / a_final.abs().mean()),
        "segment_mass": [float(final.values[s][:, stage_a if s < 2 else stage_b].abs().sum()) for s in range(4)],
    }
    print(found, flush=True)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--results",
        type=Path,
        help="directory keeping each part's result (<part>.json): a part found there is not run again, so the "
        "parts can run one at a time (--part) and the section is written from them",
    )
    parser.add_argument("--part", choices=PARTS, help="run only this part (and keep it in --results)")
    args = parser.parse_args()
    import torch
    from report import markdown_table, write_section

    torch.set_num_threads(1)
    runs = {"cost": lambda: cost(args.rounds), "main-job": main_job, "two-stage": two_stage}
    found = {}
    for part in [args.part] if args.part else PARTS:
        kept = args.results / f"{part}.json" if args.results else None
        if kept is not None and kept.exists():
            found[part] = json.loads(kept.read_text())
            continue
        found[part] = runs[part]()
        if kept is not None:
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept.write_text(json.dumps(found[part]))
    if args.part:
        print(found[args.part])
        return
    cost_rows, job, stages = found["cost"], found["main-job"], found["two-stage"]

    body = [
        "`attribute_over_time` against `attribute` (one process, interleaved, median of "
        f"{args.rounds} rounds; 50 queries x 1,438 training examples; the first call, which fits SOURCE's "
        "curvature, untimed). The timeline's `total()` equals `attribute` to the largest relative difference shown.",
        "",
        markdown_table(
            [
                "model",
                "method",
                "attribute (s)",
                "attribute_over_time (s)",
                "ratio",
                "max abs(total − attribute) / max abs(attribute)",
            ],
            cost_rows,
        ),
        "",
        "**Main job** (`configs/digits.yaml`, 5% flipped labels, 16 queries, 3 segments of constant rate 0.1). Share "
        "of the flipped examples' harm (the negative parts of their per-segment scores, summed over queries) per "
        "segment, against the clean examples' share; 'per example' is a flipped example's harm per segment over a "
        "clean one's:",
        "",
    ]
    sentence = job.pop("sentence")
    for name, found in job.items():
        rows = [
            [found["labels"][s], found["flipped_share"][s], found["clean_share"][s], found["per_example_ratio"][s]]
            for s in range(len(found["labels"]))
        ]
        body += [
            f"*{name}*: flipped examples are {found['flipped_in_top10']:.0%} of the queries' top-10 opponents "
            f"(5% of the data); the segment where each of those hurt its query most: "
            f"{found['worst_segment_counts']} (segments 1..3). {found['early_help_late_harm']:.1%} of the "
            "(query, flipped example) pairs help in segment 1 and hurt in segment 3.",
            "",
            markdown_table(
                ["segment", "flipped: share of harm", "clean: share of harm", "per example, flipped/clean"], rows
            ),
            "",
        ]
    source, tracin = job["source"], job["tracin"]
    body += [
        f"What it shows: per example, a flipped label hurts its queries {source['per_example_ratio'][0]:.1f}x as "
        f"much as a clean example in segment 1 and {source['per_example_ratio'][-1]:.1f}x as much in the last "
        f"(TracInCP: {tracin['per_example_ratio'][0]:.1f}x, then {tracin['per_example_ratio'][-1]:.1f}x): the flipped "
        "examples turn harmful as training goes on, once the model has learned the digits and starts fitting the "
        f"wrong labels. SOURCE puts {source['flipped_share'][-1]:.0%} of the flipped examples' harm in the last "
        f"segment (clean examples: {source['clean_share'][-1]:.0%}); TracInCP, which does not discount early steps "
        "by what later training undoes, puts most of every example's score, harmful or not, in the first segment "
        f"({tracin['flipped_share'][0]:.0%} of the flipped examples' harm).",
        "",
        f'The HTML report says of SOURCE\'s first query: "{sentence}"',
        "",
        "**Two stages** (digits halves A then B, 6 epochs each, a fresh warm-up + cosine schedule in stage 2, "
        "SOURCE at its defaults, 50 queries; segments: " + "; ".join(stages["labels"]) + "). A's influence on the "
        "final model (its stage-1 segments, propagated through stage 2) against its influence on the model at the "
        "end of stage 1 (the same run stopped there):",
        "",
        markdown_table(
            [
                "mean abs τ_final(A) / mean abs τ_stage1(A)",
                "Spearman (per query, mean)",
                "top-20 overlap",
                "A's share of the final abs influence",
                "mean abs τ(B) / mean abs τ_final(A)",
            ],
            [
                [
                    stages["survival"],
                    stages["rank_correlation"],
                    stages["top20_overlap"],
                    stages["share_a"],
                    stages["b_over_a"],
                ]
            ],
        ),
        "",
        "Per-segment |influence| of each stage's own data on the final model: "
        + ", ".join(f"{m:.3g}" for m in stages["segment_mass"])
        + ".",
        "",
        f"What it shows: stage 1's influence survives fine-tuning in part. Stage 2 shrinks it to "
        f"{stages['survival']:.0%} of what it was on the stage-1 model, but mostly keeps its ranking (Spearman "
        f"{stages['rank_correlation']:.2f}, {stages['top20_overlap']:.0%} of each query's top 20 stage-1 proponents "
        f"unchanged), and the pre-training data still carries {stages['share_a']:.0%} of the final model's "
        "attributed influence. TracInCP cannot answer this: it does not propagate an early step's effect through "
        "later training, so its stage-1 scores are the same for both models. Each stage's examples are scored in "
        "their own stage's segments only (SOURCE scores every example at every checkpoint, as if it were in every "
        "batch), and `dataset_size` is recorded as one stage's size, so both stages share one per-example scale.",
    ]
    text = "\n".join(body)
    print(text)
    write_section("timeline", "When in training did it matter (timelines)", text, "python benchmarks/bench_timeline.py")


if __name__ == "__main__":
    main()
