"""Where SOURCE's error comes from: every variant against the exact unrolled reference and the LDS.

For each LDS setting of ``benchmarks/run.py`` (Concrete and digits MLPs, converged and not; SGD with
momentum 0.9, batch 64) the attributed run is traced with ``TDACallback`` under several segment and
checkpoint layouts (the trajectory is the same: the callback does not touch training, checked) and
scored three ways:

* **exact**: ``lightning_tda.evaluation.UnrolledTraining``, the float64 replay of that very run
  differentiated through every optimizer step with each example weighted in the steps it was in;
* **expected**: the same replay with every example in every step at weight ``1/N`` (the expectation
  over batch membership along this trajectory, the quantity SOURCE's derivation approximates);
* **LDS**: against the re-trained ground truth of ``benchmarks/run.py`` (same subsets, seeds, cache).

Rows: the exact references themselves (and the exact derivative of a second run that differs only
in its batch order), SOURCE as in the paper (``query_gradients="final"``) with one change at a time
(exact per-layer Gauss-Newton curvature, covariances recomputed at the checkpoints, damping, the exact
heavy-ball momentum dynamics instead of the terminal-velocity rate, segments and checkpoints), Fast-SOURCE,
SOURCE at its defaults (query gradients at the checkpoints), TracInCP and EK-FAC influence.

    python benchmarks/bench_source_unrolled.py --workdir /tmp/ltda_bench   # writes section "source-decomposition"
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import markdown_table, write_section  # noqa: E402
from benchmarks.run import CONCRETE, CONCRETE_EARLY, DIGITS, DIGITS_EARLY, Setting, log  # noqa: E402
from lightning_tda import TDACallback, Trace  # noqa: E402
from lightning_tda.evaluation import (  # noqa: E402
    LightningTrainFn,
    UnrolledTraining,
    bootstrap_mean,
    lds,
    lds_ground_truth,
)
from lightning_tda.methods import SOURCE, EKFACInfluence, TracInCP  # noqa: E402
from lightning_tda.methods.base import MethodOptions  # noqa: E402
from lightning_tda.methods.source import LayerDynamics, SegmentOperators  # noqa: E402
from lightning_tda.trace.cache import sidecar_path  # noqa: E402

SETTINGS = {s.name: s for s in (CONCRETE, CONCRETE_EARLY, DIGITS, DIGITS_EARLY)}
DENSE_LIMIT = 5_000  # largest layer (parameters) for the exact Gauss-Newton row; digits' 16,512 needs 2.2 GB per block


# --- diagnostic variants (not library options: the table shows they do not matter) -------------
class DampedSOURCE(SOURCE):
    """SOURCE with a damping ``λ = scale × mean eigenvalue`` added to every segment's curvature."""

    def __init__(self, *args: Any, damping_scale: float = 0.1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.damping_scale = damping_scale

    def operators(self, train: Any) -> dict[int, SegmentOperators]:
        result = {}
        for s, ops in super().operators(train).items():
            dynamics = {
                name: LayerDynamics(
                    d.horizon,
                    d.weight_decay + self.damping_scale * ops.curvature[name].mean_eigenvalue,
                    d.decoupled,
                    d.preconditioner,
                )
                for name, d in ops.dynamics.items()
            }
            result[s] = SegmentOperators(ops.curvature, dynamics)
        return result


class HeavyBallSOURCE(SOURCE):
    """SOURCE with the exact stationary heavy-ball dynamics of each segment instead of the rate η/(1 − β)
    (torch's SGD with momentum β, no dampening or Nesterov: the benchmark's optimizer).

    Per eigenvalue σ the perturbation ``(δθ, δv)`` (parameters, momentum buffer) evolves by
    ``M = [[1 − ησ, −ηβ], [σ, β]]`` per step, an example's gradient entering as ``(−η, 1)``. The query's
    adjoint ``(λ_θ, λ_v)`` starts at ``(∇f, 0)`` and is pulled back through ``M^K`` segment by segment, so
    momentum carried across segment boundaries and an example's gradient still acting through the
    buffer after its step (or after the end of training) are modelled exactly for a stationary segment.
    """

    def _segment(self, segment: int, values: Tensor) -> tuple[Tensor, Tensor]:
        info = self.trace.segment(segment)
        group = self.trace.optimizer["param_groups"][0]
        beta, eta = float(group.get("momentum", 0.0) or 0.0), float(info.mean_lr[0])
        sigma = values.clamp(min=0) + float(group.get("weight_decay", 0.0) or 0.0)
        step = torch.zeros(*sigma.shape, 2, 2, dtype=torch.float64, device=sigma.device)
        step[..., 0, 0], step[..., 0, 1], step[..., 1, 0], step[..., 1, 1] = 1 - eta * sigma, -eta * beta, sigma, beta
        power = torch.eye(2, dtype=torch.float64, device=sigma.device).expand_as(step).clone()
        total = torch.zeros_like(step)  # Σ_{j<K} M^j by binary powering
        square, square_sum, n = step.clone(), power.clone(), info.num_steps
        while n:
            if n & 1:
                total, power = total + power @ square_sum, power @ square
            square_sum, square, n = square_sum + square @ square_sum, square @ square, n >> 1
        response = total @ torch.tensor([eta, -1.0], dtype=torch.float64, device=sigma.device)
        return power, response

    def _pull(self, adjoint: Mapping[str, tuple[Tensor, Tensor]], operators: Any, segment: int, respond: bool):
        pulled, response = {}, {}
        for name, (theta, velocity) in adjoint.items():
            curvature = operators[segment].curvature[name]
            power, r = self._segment(segment, curvature.eigenvalues)
            t, v = curvature.rotate(theta), curvature.rotate(velocity)
            if respond:
                response[name] = curvature.unrotate(r[..., 0] * t + r[..., 1] * v)
            pulled[name] = (
                curvature.unrotate(power[..., 0, 0] * t + power[..., 1, 0] * v),
                curvature.unrotate(power[..., 0, 1] * t + power[..., 1, 1] * v),
            )
        return pulled, response

    def query_vectors(self, gradients: Mapping[str, Tensor], operators: Any) -> dict[int, dict[str, Tensor]]:
        adjoint = {name: (g.double(), torch.zeros_like(g, dtype=torch.float64)) for name, g in gradients.items()}
        result = {}
        for s in reversed(self.needed):
            adjoint, response = self._pull(adjoint, operators, s, s in self.segments)
            if s in self.segments:
                result[s] = response
        return result

    def segment_query_vectors(self, gradients: Mapping[str, Tensor], operators: Any, segment: int):
        adjoint = {name: (g.double(), torch.zeros_like(g, dtype=torch.float64)) for name, g in gradients.items()}
        for s in reversed(self.needed):
            adjoint, response = self._pull(adjoint, operators, s, s == segment)
            if s == segment:
                return response
        raise ValueError(f"segment {segment} is not attributed")


# --- the benchmark -------------------------------------------------------------------------------
@dataclass
class Row:
    group: str
    label: str
    scores: Tensor | None
    seconds: float = float("nan")
    note: str = ""
    per_query: np.ndarray | None = field(default=None, repr=False)


def mean_correlation(a: Tensor, b: Tensor, rank: bool = False) -> float:
    """Mean over queries (rows) of the Pearson (or Spearman) correlation of ``a`` and ``b``."""
    a, b = a.double(), b.double()
    if rank:
        a, b = a.argsort(1).argsort(1).double(), b.argsort(1).argsort(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=1e-300)).mean())


def trace_layouts(setting: Setting, quick: bool) -> list[tuple[int, int]]:
    """``(segments, checkpoints per segment)`` traced: the default, one segment, one per epoch, 10, 30, 3 × 6."""
    if quick:
        return [(3, 2), (1, 6)]
    return list(dict.fromkeys([(3, 2), (1, 6), (setting.epochs, 2), (10, 2), (30, 1), (3, 6)]))


def traced(setting: Setting, train: Any, workdir: Path, segments: int, per_segment: int, seed: int = 0) -> Path:
    path = workdir / f"{setting.name}-{segments}x{per_segment}-seed{seed}.h5"
    fn = LightningTrainFn(setting.module_factory, train, max_epochs=setting.epochs, batch_size=setting.batch_size)
    callback = TDACallback(str(path), task=setting.task, segments=segments, checkpoints_per_segment=per_segment)
    path.unlink(missing_ok=True)
    sidecar_path(path).unlink(missing_ok=True)  # fitted curvature of an earlier run of this script
    fn.fit(np.arange(len(train)), seed, callbacks=[callback])
    return path


def other_order(setting: Setting, train: Any, workdir: Path) -> tuple[Path, Any]:
    """The same initialization trained with another batch order (loader seed 1): its trace and loader."""
    import lightning as L

    from lightning_tda.demo import headless_trainer
    from lightning_tda.evaluation.retrain import quiet_lightning

    path = workdir / f"{setting.name}-other-order.h5"
    path.unlink(missing_ok=True)
    fn = LightningTrainFn(setting.module_factory, train, max_epochs=setting.epochs, batch_size=setting.batch_size)
    with quiet_lightning():
        L.seed_everything(0, verbose=False)
        model = setting.module_factory()
        trainer = headless_trainer(
            max_epochs=setting.epochs,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            callbacks=[TDACallback(str(path), task=setting.task)],
        )
        trainer.fit(model, train_dataloaders=fn.loader(np.arange(len(train)), 1))
    return path, fn.loader(np.arange(len(train)), 1)


def run_setting(setting: Setting, args: argparse.Namespace) -> dict[str, Any]:
    train, test, _ = setting.datasets(None)
    queries = TensorDataset(*test[: args.queries])
    workdir = args.workdir / "source-decomposition"
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"{setting.name}: tracing the run under {len(trace_layouts(setting, args.quick))} segment layouts")
    traces = {layout: traced(setting, train, workdir, *layout) for layout in trace_layouts(setting, args.quick)}
    finals = [Trace.open(p).checkpoint_state(Trace.open(p).final_checkpoint.index) for p in traces.values()]
    for state in finals[1:]:  # the callback must not change training
        assert all(torch.equal(state[k], finals[0][k]) for k in state), "traced runs differ"
    default = traces[(3, 2)]
    fn = LightningTrainFn(setting.module_factory, train, max_epochs=setting.epochs, batch_size=setting.batch_size)
    options = MethodOptions(progress=False)
    rows: list[Row] = []

    def reference(label: str, path: Path, loader: Any, membership: str) -> Tensor:
        start = time.perf_counter()
        replay = UnrolledTraining(
            Trace.open(path), setting.module_factory(), setting.task, train, loader, membership=membership
        )
        check = replay.check()
        scores = replay.scores(queries).values.double()
        rows.append(Row("reference", label, scores, time.perf_counter() - start, f"replay: {check}"))
        log(f"{setting.name}: {label} ({rows[-1].seconds:.0f} s; {check})")
        return scores

    exact = reference("exact unrolled (this run)", default, fn.loader(np.arange(len(train)), 0), "batches")
    expected = reference(
        "exact unrolled, expected membership", default, fn.loader(np.arange(len(train)), 0), "expected"
    )
    path, loader = other_order(setting, train, workdir)
    sidecar_path(path).unlink(missing_ok=True)
    reference("exact unrolled, same init, other batch order", path, loader, "batches")

    def method(group: str, label: str, cls: type, layout: tuple[int, int] = (3, 2), **kwargs: Any) -> None:
        start = time.perf_counter()
        instance = cls(Trace.open(traces[layout]), setting.module_factory(), setting.task, options=options, **kwargs)
        scores = instance.attribute(queries, train).values.double()
        rows.append(Row(group, label, scores, time.perf_counter() - start))
        log(f"{setting.name}: {label} ({rows[-1].seconds:.1f} s)")

    dense = max(la.out_features * la.a_dim for la in Trace.open(default).tracked_layers(setting.module_factory()))
    paper = "SOURCE, paper's pairing (query at θ_T)"
    final = {"query_gradients": "final"}
    method(paper, "3 segments × 2 checkpoints (the old default)", SOURCE, **final)
    if dense <= DENSE_LIMIT:
        method(paper, "+ exact per-layer Gauss-Newton curvature", SOURCE, curvature="gauss-newton", **final)
    method(paper, "+ covariances recomputed at the checkpoints", SOURCE, covariances="recompute", **final)
    method(paper, "+ damping 0.1 × mean eigenvalue", DampedSOURCE, **final)
    method(paper, "+ exact heavy-ball momentum dynamics", HeavyBallSOURCE, **final)
    for layout in traces:
        if layout != (3, 2):
            method(paper, f"{layout[0]} segments × {layout[1]} checkpoints", SOURCE, layout, **final)
    method(paper, "Fast-SOURCE", SOURCE, fast=True, **final)
    new = "SOURCE, default pairing (query at θ_c)"
    method(new, "3 segments × 2 checkpoints", SOURCE)
    if dense <= DENSE_LIMIT:
        method(new, "+ exact per-layer Gauss-Newton curvature", SOURCE, curvature="gauss-newton")
    method(new, "+ exact heavy-ball momentum dynamics", HeavyBallSOURCE)
    for layout in traces:
        if layout != (3, 2):
            method(new, f"{layout[0]} segments × {layout[1]} checkpoints", SOURCE, layout)
    method(new, "Fast-SOURCE", SOURCE, fast=True)
    method("baseline", "TracInCP (6 checkpoints)", TracInCP)
    method("baseline", "EK-FAC IF", EKFACInfluence)

    log(f"{setting.name}: ground truth, {args.subsets} subsets x {args.seeds} seeds")
    truth = lds_ground_truth(
        fn,
        setting.task,
        queries,
        len(train),
        num_subsets=args.subsets,
        num_seeds=args.seeds,
        fraction=0.5,
        cache=args.workdir / "ground_truth.h5",
        tag=setting.recipe(),
        workers=args.workers,
    )
    table = []
    for row in rows:
        result = lds(row.scores, truth)
        row.per_query = result.per_query
        table.append(
            [
                row.group,
                row.label,
                f"{result.mean:.3f} [{result.ci_low:.3f}, {result.ci_high:.3f}]",
                f"{mean_correlation(row.scores, exact):.3f}",
                f"{mean_correlation(row.scores, exact, rank=True):.3f}",
                f"{mean_correlation(row.scores, expected):.3f}",
                f"{mean_correlation(row.scores, expected, rank=True):.3f}",
                f"{row.seconds:.1f}",
            ]
        )
    by_label = {(r.group, r.label): r for r in rows}

    def paired(a: tuple[str, str], b: tuple[str, str]) -> str:
        mean, low, high = bootstrap_mean(by_label[a].per_query - by_label[b].per_query)
        return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"

    default_row, paper_row = (
        (new, "3 segments × 2 checkpoints"),
        (paper, "3 segments × 2 checkpoints (the old default)"),
    )
    verdicts = {
        "SOURCE − TracInCP": paired(default_row, ("baseline", "TracInCP (6 checkpoints)")),
        "SOURCE − EK-FAC IF": paired(default_row, ("baseline", "EK-FAC IF")),
        "SOURCE − paper SOURCE": paired(default_row, paper_row),
    }
    checks = [r.note for r in rows if r.note]
    return {"setting": setting, "table": table, "verdicts": verdicts, "n_train": len(train), "checks": checks}


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    header = [
        "group",
        "variant",
        "LDS [95% CI]",
        "Pearson, exact",
        "Spearman, exact",
        "Pearson, expected",
        "Spearman, expected",
        "time (s)",
    ]
    parts = [
        f"Per setting of `benchmarks/run.py` (SGD momentum 0.9, batch 64), {args.queries} test queries. "
        "**exact** = the exact unrolled derivative of the traced run (`lightning_tda.evaluation.UnrolledTraining`: "
        "float64 replay differentiated through every step, each example weighted in the steps it was in); "
        "**expected** = the same with every example in every step at weight 1/N (the expectation over batch "
        "membership along this trajectory, what SOURCE's derivation approximates); correlations are means over "
        "queries of the per-query correlation across training examples. LDS as in the evaluation section "
        f"(α = 0.5, M = {args.subsets} subsets × R = {args.seeds} seeds, the same cached ground truth), 95% "
        "bootstrap CI over queries. Every row is one run on the same trajectory (the callback's segment layout "
        "does not change training; checked). Times include fitting curvature and are on a shared machine."
    ]
    for result in results:
        setting = result["setting"]
        verdicts = "; ".join(f"{k} = {v}" for k, v in result["verdicts"].items())
        parts.append(
            f"### {setting.title}\n\nn_train = {result['n_train']}; replays: {result['checks'][0]}.\n\n"
            + markdown_table(header, result["table"])
            + f"\n\nPaired over queries (LDS): {verdicts}."
        )
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2, help="processes re-training the ground truth if missing")
    parser.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent.parent / "runs" / "benchmark")
    parser.add_argument("--quick", action="store_true", help="two trace layouts only (a smoke run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = [run_setting(SETTINGS[name], args) for name in args.settings]
    body = report(results, args)
    command = "python benchmarks/bench_source_unrolled.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_section("source-decomposition", "SOURCE against exact unrolling: where the error comes from", body, command)
    print(body)


if __name__ == "__main__":
    main()
