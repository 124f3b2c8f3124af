"""Training overhead of TDACallback: wall time, trace size and peak memory with and without it, in one run.

Each (case, configuration, repeat) trains in a fresh subprocess with one torch thread, so peak RSS is
its own; repeats are interleaved across configurations (A B A B ...) so slow phases of a shared
machine hit all of them alike, and the reported ratio is the median over repeats of each repeat's
ratio to training without the callback.

Three suites, each writing its own section of BENCHMARKS.md:

* ``digits`` (the default): the digits MLP and SmallCNN for ``--epochs`` epochs, the defaults against
  statistics on every step;
* ``real``: the models of issue 10 at the defaults: ResNet-18 at half width (2.8M parameters) on
  synthetic 32×32×3 images at n = 8,000 and 2,000, a width-16 ResNet-18 on 1,024 images, a
  Llama-style and a GPT-2 language model (4 layers, width 256, vocabulary 1,000, 64-token blocks;
  the demo ``CausalLanguageModel`` trained on the Hugging Face loss, ``LanguageModelingTask``), and the
  digits MLP for 10 epochs;
* ``sizes``: the trace's size at the defaults against every factor, and every factor in float64, for the
  ResNet and a LoRA-adapted GPT-2.

    python benchmarks/bench_callback.py                          # digits, 20 epochs, 5 repeats
    python benchmarks/bench_callback.py --suite real --repeats 3 # the real models (hours on a busy machine)
    python benchmarks/bench_callback.py --suite sizes            # trace sizes (minutes)
    python benchmarks/bench_callback.py --quick                  # digits, 3 epochs, 1 repeat
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIGS = {
    "without callback": None,
    "defaults": {},
    "empirical Fisher, every step": {"fisher": "empirical", "every_n_steps": 1},
    "true Fisher, every step": {"fisher": "true", "every_n_steps": 1},
    "every factor (max_factor_ratio=None)": {"max_factor_ratio": None},
    "every factor in float64 (as schema v1 stored)": {"max_factor_ratio": None, "factor_dtype": "float64"},
    "statistics from 16 examples per batch": {"statistics_examples": 16},
    "strict budget": {"strict_budget": True},
    "strict budget and statistics from 16 examples": {"strict_budget": True, "statistics_examples": 16},
}
# the defaults of the library at another checkout (--baseline ROOT): the same child run from that tree's code
BEFORE = "defaults, before (--baseline)"
SIZE_CONFIGS = ["defaults", "every factor (max_factor_ratio=None)", "every factor in float64 (as schema v1 stored)"]

# name: (description, default training examples (None: the data set's own), batch size)
MODELS = {
    "mlp": ("digits MLP 64-128-128-10 (26k parameters)", None, 64),
    "cnn": ("digits SmallCNN", None, 64),
    "resnet": ("ResNet-18, half width (2.8M parameters), 32x32x3 synthetic images", 8_000, 64),
    "resnet16": ("ResNet-18, width 16 (0.7M parameters), 32x32x3 synthetic images", 1_024, 64),
    "llama": ("Llama-style LM (CausalLanguageModel), 4 layers, width 256, vocabulary 1,000, 64 tokens", 1_024, 16),
    "gpt2": ("GPT-2 LM (CausalLanguageModel), 4 layers, width 256, vocabulary 1,000, 64 tokens", 1_024, 16),
    "gpt2-lora": (
        "GPT-2 LM, 4 layers, width 256, vocabulary 1,000, LoRA rank 8 on c_attn/c_proj/c_fc (layers='lora')",
        256,
        16,
    ),
}

# (model, training examples, epochs) of the trace-size suite: sizes depend on segments and checkpoints, not steps
SIZE_CASES = [("resnet", 640, 1), ("gpt2-lora", 256, 1)]
# (model, training examples, epochs) of the real-models suite
REAL_CASES = [
    ("resnet", 8_000, 2),
    ("resnet", 2_000, 2),
    ("resnet16", 1_024, 2),
    ("llama", 1_024, 2),
    ("gpt2", 1_024, 2),
    ("mlp", 0, 10),
]
SEQUENCE_LENGTH = 64
VOCABULARY = 1_000


def token_blocks(n: int, seed: int = 0):
    """``n`` blocks of ``SEQUENCE_LENGTH`` tokens from a random sparse Markov chain (each token has 4
    likely successors), as Hugging Face-style examples: learnable structure without a download."""
    import numpy as np
    import torch

    from lightning_tda.demo.language import TokenBlocks

    rng = np.random.default_rng(seed)
    successors = rng.integers(0, VOCABULARY, size=(VOCABULARY, 4))
    tokens = np.empty((n, SEQUENCE_LENGTH), dtype=np.int64)
    tokens[:, 0] = rng.integers(0, VOCABULARY, size=n)
    for t in range(1, SEQUENCE_LENGTH):
        choice = successors[tokens[:, t - 1], rng.integers(0, 4, size=n)]
        tokens[:, t] = np.where(rng.random(n) < 0.9, choice, rng.integers(0, VOCABULARY, size=n))
    return TokenBlocks(torch.from_numpy(tokens))


def build(model_name: str, n: int):
    """``(model, train dataloader or data module, task, callback arguments)`` for one case."""
    from torch.utils.data import DataLoader

    from lightning_tda import LanguageModelingTask
    from lightning_tda.demo import DigitsDataModule, MLPClassifier, ResNet, SmallCNN, SyntheticImageDataModule

    batch = MODELS[model_name][2]
    if model_name in ("mlp", "cnn"):
        images = model_name == "cnn"
        return SmallCNN() if images else MLPClassifier(), DigitsDataModule(batch_size=batch, images=images), None, {}
    if model_name in ("resnet", "resnet16"):
        data = SyntheticImageDataModule(batch_size=batch, num_examples=round(n / 0.8), test_fraction=0.2)
        return ResNet(width=32 if model_name == "resnet" else 16), data, None, {}
    from lightning_tda.demo.language import CausalLanguageModel

    lora = model_name == "gpt2-lora"
    model = CausalLanguageModel(
        "gpt2" if lora else model_name, VOCABULARY, 256, 4, 4, SEQUENCE_LENGTH, lora_rank=8 if lora else 0
    )
    loader = DataLoader(token_blocks(n), batch_size=batch, shuffle=True)
    return model, loader, LanguageModelingTask(), {"layers": "lora"} if lora else {}


def child(model_name: str, config: str, epochs: int, n: int) -> None:
    """Train once and print the measurements as JSON."""
    print(json.dumps(train(model_name, config, epochs, n)))


def child_in_process(model_name: str, configs: list[str], epochs: int, n: int, repeats: int) -> None:
    """Train every configuration ``repeats`` times in this one process, interleaved (A B A B ...), after one unmeasured
    fit of each, and print the measurements as JSON (a list per configuration). The fits then leave out what a fresh
    process pays once, at its first fit: the first use of HDF5, of torch's kernels and of Lightning's loops."""
    for config in configs:
        train(model_name, config, epochs, n)
    runs: dict[str, list[dict]] = {config: [] for config in configs}
    for _ in range(repeats):
        for config in configs:
            runs[config].append(train(model_name, config, epochs, n))
    print(json.dumps(runs))


def train(model_name: str, config: str, epochs: int, n: int) -> dict:
    """Train once: the fit's seconds, peak RSS (the process's) and, with the callback, the trace's measurements."""
    import lightning as L
    import torch

    from lightning_tda import ClassificationTask, TDACallback, Trace
    from lightning_tda.demo import headless_trainer

    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    model, data, task, options = build(model_name, n)
    kwargs = CONFIGS[config]
    callbacks = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.h5"
        if kwargs is not None:
            callbacks.append(TDACallback(path, task=task or ClassificationTask(), **options, **kwargs))
        trainer = headless_trainer(max_epochs=epochs, limit_val_batches=0, callbacks=callbacks)
        start = time.perf_counter()
        trainer.fit(model, data)
        seconds = time.perf_counter() - start
        result = {"seconds": seconds, "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        result["steps"] = int(trainer.global_step)
        if callbacks:
            trace = Trace.open(path)
            result["trace_mb"] = path.stat().st_size / 1e6
            result["stats_steps"] = [s.stats_steps for s in trace.segments]
            result["segment_steps"] = [s.num_steps for s in trace.segments]
            result["statistics_mb"] = callbacks[0].stats.nbytes() / 1e6
            result["checkpoint_mb"] = _checkpoint_bytes(path) / 1e6
            result["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            if hasattr(trace, "recording_costs") and trace.recording_costs():  # measured by the callback itself
                (cost,) = trace.recording_costs()
                result["cost"] = cost["seconds"]
    return result


def _checkpoint_bytes(path: Path) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        sizes = []
        f["checkpoints"].visititems(
            lambda _, item: sizes.append(item.nbytes) if isinstance(item, h5py.Dataset) else None
        )
    return sum(sizes)


def run_child(model_name: str, config: str, epochs: int, n: int, baseline: Path | None = None) -> dict:
    script, child_config = Path(__file__), config
    if config == BEFORE:
        script, child_config = baseline / "benchmarks" / "bench_callback.py", "defaults"
    return _run([str(script), "--child", model_name, child_config], epochs, n, f"{model_name} / {config}")


def _run(arguments: list[str], epochs: int, n: int, what: str) -> Any:
    out = subprocess.run(
        [sys.executable, *arguments, "--epochs", str(epochs), "--n", str(n)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    if out.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(
    cases: list[tuple[str, int, int]],
    configs: list[str],
    repeats: int,
    baseline: Path | None = None,
    save: Path | None = None,
    in_process: bool = False,
) -> dict:
    """Interleaved repeats: every repeat runs every case and configuration once, in the same order, each fit in a
    fresh process (with ``in_process``, every fit of a case in one process: :func:`child_in_process`). With
    ``save``, the results so far are written there as JSON after every run (read back with ``--load``)."""
    results: dict[tuple, list[dict]] = {}
    if in_process:
        for model_name, n, epochs in cases:
            arguments = [__file__, "--child-in-process", model_name, ";".join(configs), "--repeats", str(repeats)]
            for config, runs in _run(arguments, epochs, n, f"{model_name} in one process").items():
                results[(model_name, n, epochs, config)] = runs
                print(f"{model_name} n={n} {epochs} epochs, {config}, in one process: "
                      f"{statistics.median(r['seconds'] for r in runs):.2f} s (median)", flush=True)  # fmt: skip
            if save:
                save.write_text(json.dumps([[list(key), runs] for key, runs in results.items()]))
        return results
    for repeat in range(repeats):
        for model_name, n, epochs in cases:
            for config in configs:
                result = run_child(model_name, config, epochs, n, baseline)
                results.setdefault((model_name, n, epochs, config), []).append(result)
                own = f", callback's own {own_share(result):.1f}%" if "cost" in result else ""
                print(f"repeat {repeat + 1}: {model_name} n={n} {epochs} epochs, {config}: "
                      f"{result['seconds']:.1f} s{own}", flush=True)  # fmt: skip
                if save:
                    save.write_text(json.dumps([[list(key), runs] for key, runs in results.items()]))
    return results


def load_results(paths: list[Path]) -> dict:
    """The results saved by ``--save`` in one or more runs, merged (each key's runs in the order given)."""
    results: dict[tuple, list[dict]] = {}
    for path in paths:
        for key, runs in json.loads(path.read_text()):
            model_name, n, epochs, config = key
            results.setdefault((model_name, int(n), int(epochs), config), []).extend(runs)
    return results


def own_share(result: dict) -> float:
    """The callback's own measured seconds, in percent of the fit's seconds without them."""
    spent = sum(result["cost"].values())
    return 100 * spent / (result["seconds"] - spent)


def paired_ratios(results: dict, case: tuple, config: str) -> list[float]:
    """Per repeat: this configuration's time / the time without the callback in the same repeat."""
    runs, base = results[(*case, config)], results[(*case, "without callback")]
    return [r["seconds"] / b["seconds"] for r, b in zip(runs, base)]


def paired_ratio(results: dict, case: tuple, config: str) -> float:
    """Median over repeats of (this configuration's time / the time without the callback, same repeat)."""
    return statistics.median(paired_ratios(results, case, config))


def describe_case(model_name: str, n: int, epochs: int) -> str:
    size = f", n = {n:,}" if n else ""
    return f"{MODELS[model_name][0]}{size}, {epochs} epochs, batch {MODELS[model_name][2]}"


def table(results: dict, cases: list[tuple[str, int, int]], configs: list[str]) -> tuple[str, dict]:
    from benchmarks.report import markdown_table

    rows, ratios = [], {}
    for case in cases:
        base = results[(*case, "without callback")]
        base_rss = statistics.median(r["max_rss_mb"] for r in base)
        for config in configs:
            if (*case, config) not in results:  # a configuration measured for other cases only
                continue
            runs = results[(*case, config)]
            seconds = statistics.median(r["seconds"] for r in runs)
            rss = statistics.median(r["max_rss_mb"] for r in runs)
            ratio = paired_ratio(results, case, config)
            if config == "defaults":
                ratios[case] = (ratio, runs[0]["steps"])
            has_trace = "trace_mb" in runs[0]
            costs = [r["cost"] for r in runs if "cost" in r]
            cost = {kind: statistics.median(c[kind] for c in costs) for kind in costs[0]} if costs else None
            own = [own_share(r) for r in runs if "cost" in r]
            spread = paired_ratios(results, case, config)
            rows.append(
                [
                    describe_case(*case),
                    f"{config}" + ("" if not has_trace else ""),
                    runs[0]["steps"],
                    "/".join(str(s) for s in runs[0]["stats_steps"]) if has_trace else "-",
                    f"{seconds:.2f}",
                    f"{ratio:.3f}x",
                    f"{min(spread):.3f}-{max(spread):.3f} ({len(spread)})",
                    f"{runs[0]['trace_mb']:.1f}" if has_trace else "-",
                    f"{runs[0]['checkpoint_mb']:.1f}" if has_trace else "-",
                    f"{rss:.0f} (+{rss - base_rss:.0f})",
                    "-" if not own else f"{statistics.median(own):.1f}% ({min(own):.1f}-{max(own):.1f})",
                    "-" if cost is None else f"{cost['statistics']:.2f} / {cost['checkpoints']:.2f} / {cost['io']:.2f}",
                    "-"
                    if cost is None
                    else f"{cost['trace_creation']:.2f} / {cost['initial_checkpoint']:.2f} / {cost['loss_check']:.2f}",
                ]
            )
    header = [
        "case",
        "configuration",
        "steps",
        "statistics steps per segment",
        "fit s (median)",
        "vs without (median of paired ratios)",
        "paired ratios min-max (repeats)",
        "trace MB",
        "of which checkpoints MB",
        "peak RSS MB",
        "callback's own measurement: % on top of training, median (min-max)",
        "measured s: statistics / checkpoints / I/O",
        "fixed s: trace creation / initial checkpoint / loss check",
    ]
    return markdown_table(header, rows), ratios


def sizes_section() -> str:
    """Trace size at the defaults against recording every factor, and every factor in float64 (what schema v1
    stored), for the ResNet and a LoRA-adapted GPT-2 (one run each: sizes do not vary)."""
    from benchmarks.report import markdown_table

    rows = []
    for model_name, n, epochs in SIZE_CASES:
        for config in SIZE_CONFIGS:
            result = run_child(model_name, config, epochs, n)
            parameters = result["trainable_parameters"]
            rows.append(
                [
                    MODELS[model_name][0],
                    config,
                    f"{parameters:,}",
                    f"{result['trace_mb']:.1f}",
                    f"{result['checkpoint_mb']:.1f}",
                    f"{result['trace_mb'] / result['checkpoint_mb']:.1f}x",
                    f"{result['statistics_mb']:.1f}",
                ]
            )
    header = ["model", "configuration", "trainable parameters", "trace MB", "of which checkpoints MB",
              "trace / checkpoints", "statistics in memory MB (float64)"]  # fmt: skip
    return (
        "Each trace: 3 segments, 2 checkpoints per segment (7 stored model states with the initial one); the size "
        "depends on these, not on the number of steps. `factor_dtype='auto'` (the default) stores factors at "
        "least 256 wide in float32; `max_factor_ratio=16` (the default) leaves out a factor with more than 16 "
        "times as many entries as its layer has parameters (and more than 2^18 entries): for the LoRA adapters "
        "of GPT-2 the `d x d` factor of each adapter's wide side. The ResNet-18 trace at the defaults of the "
        "first version of the callback (float64, every factor) was 614 MB at n = 2,000.\n\n"
        + markdown_table(header, rows)
    )


def target(steps: int) -> float:
    """Issue 24's target: at most 1.05x on runs of 128 steps or more, 1.10x on shorter ones."""
    return 1.05 if steps >= 128 else 1.10


def verdict(ratios: dict) -> str:
    return ", ".join(
        f"{describe_case(*case).split(',')[0]}{f' n={case[1]:,}' if case[1] else ''} {case[2]} epochs "
        f"({steps} steps): {ratio:.2f}x ({'met' if ratio <= target(steps) else 'missed'} {target(steps):.2f}x)"
        for case, (ratio, steps) in ratios.items()
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--suite", choices=("digits", "real", "sizes"), default="digits")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--n", type=int, default=0, help="training examples (child runs)")
    parser.add_argument("--cases", default=None, help="real suite: model:n:epochs,... instead of all cases")
    parser.add_argument("--child", nargs=2, default=None)
    parser.add_argument("--child-in-process", nargs=2, default=None)
    parser.add_argument(
        "--in-process", action="store_true", help="every fit of a case in one process, after a warm-up fit of each"
    )
    parser.add_argument(
        "--defaults-only", action="store_true", help="only without the callback vs its defaults (for long runs)"
    )
    parser.add_argument("--no-write", action="store_true", help="print the table instead of writing BENCHMARKS.md")
    parser.add_argument("--baseline", type=Path, default=None, help="a checkout whose defaults run as 'before'")
    parser.add_argument(
        "--configs", default=None, help="real suite: configurations after 'without', separated by a comma without space"
    )
    parser.add_argument("--save", type=Path, default=None, help="write the raw results as JSON after every run")
    parser.add_argument("--load", type=Path, nargs="+", default=None, help="build the table from --save files")
    parser.add_argument("--section", default=None, help="real suite: the BENCHMARKS.md section key to write")
    args = parser.parse_args()
    epochs = args.epochs or (3 if args.quick else 20)
    if args.child:
        child(args.child[0], args.child[1], epochs, args.n)
        return
    repeats = args.repeats or (1 if args.quick else 5 if args.suite == "digits" else 3)
    if args.child_in_process:
        child_in_process(args.child_in_process[0], args.child_in_process[1].split(";"), epochs, args.n, repeats)
        return
    if args.in_process and args.baseline:
        parser.error("--in-process runs this checkout's code only: leave out --baseline")
    from benchmarks.report import write_section

    if args.suite == "sizes":
        body = sizes_section()
        if not args.no_write:
            write_section("callback-trace-size", "Trace size: factor precision and factors left out", body)
        print(body)
        return

    if args.suite == "real":
        cases = REAL_CASES
        if args.cases:
            cases = [(m, int(n), int(e)) for m, n, e in (c.split(":") for c in args.cases.split(","))]
        configs = ["without callback", "defaults"]
        if args.configs:
            configs = ["without callback", *re.split(r",(?! )", args.configs)]  # names may hold ", "
        if args.baseline and BEFORE not in configs:
            configs.insert(1, BEFORE)
    else:
        cases = [("mlp", 0, epochs), ("cnn", 0, epochs)]
        configs = list(CONFIGS)[:2] if args.defaults_only else list(CONFIGS)
    if args.load:
        results = load_results(args.load)
        cases = list(dict.fromkeys(key[:3] for key in results))
        configs = list(dict.fromkeys(key[3] for key in results))
        repeats = max(len(runs) for runs in results.values())
    else:
        results = measure(cases, configs, repeats, args.baseline, args.save, args.in_process)
    text, ratios = table(results, cases, configs)
    where = (
        "every fit of a case in one process, after a warm-up fit of each"
        if args.in_process
        else "each in a fresh process"
    )
    if args.suite == "real":
        body = (
            f"Target: at most 1.05x the wall time of training without the callback on runs of 128 steps or more, "
            f"1.10x on shorter ones, at the callback's defaults (true Fisher, every_n_steps='auto' within a 5% "
            f"overhead budget, up to 4 statistics steps per segment as the budget affords them (strict_budget), "
            f"3 segments, 2 checkpoints per segment, factor_dtype='auto'): {verdict(ratios)}.\n\n"
            f"Median of up to {repeats} interleaved repeats (the count is in the spread column), {where} with one "
            f"torch thread; the ratio "
            f"is the median of each repeat's ratio to the run without the callback just before it. Trace MB is "
            f"the whole file; checkpoints are the initial state plus float32 trainable parameters and buffers. "
            f"The last two columns are the callback's own measurement (`Trace.recording_costs()`, median over "
            f"repeats; the code before it did not measure). '{BEFORE}' is the same child run from the code "
            f"before issue 24.\n\n"
            f"{text}"
        )
        name, title = "callback-overhead-real-models", "Training overhead of TDACallback on real models"
        if args.section:
            name, title = args.section, f"{title} ({args.section})"
    else:
        body = (
            f"Target: at most 1.10x on short runs, 1.05x from 128 steps, with the defaults: "
            f"{verdict(ratios)}.\n\n{epochs} epochs of digits (1,438 training examples, batch 64, 23 steps/epoch, "
            f"3 segments, 2 checkpoints per segment), median of {repeats} interleaved repeats, each in a fresh "
            f"process with one torch thread.\n\n{text}"
        )
        name = "callback-overhead" + (f"-{epochs}-epochs" if args.defaults_only else "")
        title = f"Training overhead of TDACallback ({epochs} epochs)"
    if args.no_write:
        print(body)
    else:
        write_section(name, title, body)
        print(body)


if __name__ == "__main__":
    main()
