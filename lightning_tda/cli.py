"""The ``lightning-tda`` command: train with the callback, attribute, report, all from one YAML config.

Configs look like LightningCLI's (jsonargparse reads them): ``model``, ``data`` and ``task`` are
``class_path`` + ``init_args``; ``trainer`` holds ``Trainer`` keyword arguments; ``callback`` holds
:class:`~lightning_tda.TDACallback` arguments; ``methods`` lists attribution methods by name with
their hyper-parameters; ``queries``, ``attribution`` and ``report`` set what is asked and shown.
See ``configs/digits.yaml``.

Subcommands::

    lightning-tda fit --config configs/digits.yaml           # train, writing <output_dir>/trace.h5
    lightning-tda attribute --config ... --method source     # score queries, save into the trace
    lightning-tda report --config ... [--trace PATH]         # W&B (offline unless an API key is set) + HTML
    lightning-tda run --config ...                           # all three
    lightning-tda evaluate --config ...                      # measure each method's LDS on this model
    lightning-tda inspect TRACE                              # summary of a trace, with result and cache sizes
    lightning-tda clean TRACE [--results true]               # remove fitted caches (and results), compact

Like ``python main.py`` with LightningCLI, the command finds the user's own modules in the current
working directory (it is put first on ``sys.path``), so ``class_path: mymodule.MyModel`` works when
``mymodule.py`` sits where the command runs. Errors in the config (missing key, wrong type, a class_path
that does not import, unknown method, missing trace) are one line naming the problem and the fix, with
exit status 2. Unlike LightningCLI, the trainer has no logger unless the config
names one, and ``fit`` replaces an existing trace at the same path (``callback.if_exists``).
With ``attribution.devices > 1`` Fabric starts the extra processes by running the same command
again; in ``run`` they skip training and join attribution, and only rank 0 writes.
"""

from __future__ import annotations

import copy
import importlib
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

METHODS = {  # the order reports follow: the three methods, then the baselines
    "source": "SOURCE",
    "datainf": "DataInf",
    "forward-inf": "ForwardINF",
    "ekfac": "EKFACInfluence",
    "tracin": "TracInCP",
    "exact": "ExactInfluence",
    "lissa": "LiSSA",
    "hessian-free": "HessianFree",
}
# Arguments the command supplies itself, never read from the config.
_SUPPLIED = {"trace", "model", "task"}


class CLIError(Exception):
    """A problem with the command line or config; printed as one line, exit status 2."""


@dataclass
class MethodSpec:
    """One attribution method: its name (``source``, ``datainf``...) and constructor arguments.
    ``baseline: true`` methods run only when asked (``--baselines true`` or ``--method``)."""

    name: str
    init_args: dict[str, Any] = field(default_factory=dict)
    baseline: bool = False


@dataclass
class QueryOptions:
    """Which examples are the queries: the first ``count`` of ``split`` (``test`` or ``val``), or ``ids``."""

    split: str = "test"
    count: int = 16
    ids: list[int] | None = None


@dataclass
class AttributionOptions:
    """``self_influence``: also score each training example against itself (mislabel ranking).
    ``devices``: CPU processes sharding the training set (Lightning Fabric, gloo)."""

    self_influence: bool = True
    devices: int = 1


@dataclass
class EvaluationOptions:
    """``lightning-tda evaluate``: the LDS of each method on this model.

    ``subsets`` random subsets holding ``fraction`` of the training set are each re-trained ``seeds`` times
    with the config's recipe (model, data loader, trainer arguments) in ``workers`` processes; the ground
    truth is cached in ``cache`` (default ``<trace dir>/ground_truth.h5``), so an interrupted evaluation
    resumes without repeating a finished fit. ``queries`` (default: the config's) are scored by
    ``methods`` (names of configured methods; default every configured method, baselines included).
    ``replay_steps``: optimizer steps replayed first to check that training is reproducible.
    ``subset_seed``: seed of the subset draw."""

    subsets: int = 20
    seeds: int = 1
    fraction: float = 0.5
    workers: int = 2
    queries: QueryOptions | None = None
    methods: list[str] | None = None
    replay_steps: int = 20
    cache: str | None = None
    subset_seed: int = 0


@dataclass
class ReportOptions:
    """What the reports show and where they go.

    ``k`` helpful and harmful examples per query; ``self_top`` rows of the self-influence ranking;
    ``html``: write ``<output_dir>/report.html``; ``wandb``: log to W&B (the trainer's
    ``WandbLogger`` run in ``run``, otherwise a run of its own under ``<output_dir>``, offline
    without an API key); ``label_names`` by class id; ``renderer``: how an example is shown
    (``lightning_tda.reporting.ImageRenderer``, ``TextRenderer``, ``TabularRenderer``; default: chosen
    from the data, token ids decoded with the data module's ``tokenizer`` if it has one);
    ``noisy_labels``: mark training labels the data module flipped on purpose (its ``flipped`` mask);
    ``timeline``: methods with a time axis (SOURCE, TracInCP) also record when in training each example
    mattered (``attribute_over_time``, the same single pass) and the reports show it."""

    k: int = 5
    self_top: int = 50
    html: bool = True
    wandb: bool = True
    project: str = "lightning-tda"
    run_name: str | None = None
    label_names: list[str] | None = None
    renderer: Any = None
    noisy_labels: bool = True
    timeline: bool = True


# ----------------------------------------------------------------------------------- the parser
def _job_parser(subcommand: str) -> ArgumentParser:
    import lightning as L

    from lightning_tda.recording.callback import TDACallback
    from lightning_tda.tasks import Task

    parser = ArgumentParser(exit_on_error=False, description=f"lightning-tda {subcommand}")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config (LightningCLI style).")
    parser.add_argument("--seed_everything", type=int, default=0, help="Seed for training and sampling.")
    parser.add_argument("--output_dir", type=str, default="runs/lightning-tda", help="Where outputs go.")
    parser.add_argument("--trace", type=str | None, default=None, help="Trace path (default <output_dir>/trace.h5).")
    parser.add_subclass_arguments(L.LightningModule, "model", required=True)
    parser.add_subclass_arguments(L.LightningDataModule, "data", required=True)
    parser.add_subclass_arguments(Task, "task", required=True)
    parser.add_class_arguments(L.Trainer, "trainer", instantiate=False, fail_untyped=False, sub_configs=True)
    parser.add_class_arguments(TDACallback, "callback", instantiate=False, skip={"path", "task"})
    parser.set_defaults({"callback.if_exists": "overwrite", "trainer.logger": False})
    parser.add_argument(
        "--methods",
        type=list[dict[str, Any]],
        default=[],
        help="Attribution methods: a list of {name, init_args, baseline}.",
    )
    parser.add_argument("--queries", type=QueryOptions, default=QueryOptions())
    parser.add_argument("--attribution", type=AttributionOptions, default=AttributionOptions())
    parser.add_argument("--report", type=ReportOptions, default=ReportOptions())
    parser.add_argument("--evaluation", type=EvaluationOptions, default=EvaluationOptions())
    if subcommand in ("attribute", "run"):
        parser.add_argument("--method", type=str | None, default=None, help=f"Only this method: {', '.join(METHODS)}.")
        parser.add_argument("--baselines", type=bool, default=False, help="Also run the baseline methods.")
    return parser


def build_parser(only: str | None = None) -> ArgumentParser:
    """The command's parser. With ``only``, the other job subcommands get a bare parser: reading the
    Trainer's signature for each costs about a second, and a command line uses one of them."""
    parser = ArgumentParser(prog="lightning-tda", exit_on_error=False, description=__doc__.split("\n\n")[0])
    subcommands = parser.add_subcommands(required=True, dest="subcommand")
    helps = {
        "fit": "Train the model with TDACallback, writing the trace.",
        "attribute": "Score the queries against the training set with each method; save into the trace.",
        "report": "Render the scores in the trace: W&B run (offline without an API key) and HTML.",
        "run": "fit, attribute and report: the main job.",
        "evaluate": "Measure each method's LDS on this model by re-training subsets; report which to trust.",
    }
    for name, text in helps.items():
        full = only is None or name == only
        job = _job_parser(name) if full else ArgumentParser(exit_on_error=False, description=text)
        subcommands.add_subcommand(name, job, help=text)
    inspect = ArgumentParser(exit_on_error=False, description="Print a summary of a trace.")
    inspect.add_argument("trace", type=str, help="Path of a trace file.")
    subcommands.add_subcommand("inspect", inspect, help="Print a summary of a trace.")
    clean = ArgumentParser(
        exit_on_error=False,
        description="Remove a trace's fitted caches (inside it and its sidecar file) and compact the trace.",
    )
    clean.add_argument("trace", type=str, help="Path of a trace file.")
    clean.add_argument("--results", type=bool, default=False, help="Also remove the attribution results.")
    subcommands.add_subcommand("clean", clean, help="Remove fitted caches (and results) and compact the trace.")
    return parser


# ------------------------------------------------------------------------------------- the job
class Job:
    """A parsed config with its objects instantiated (model, data module, task, renderer)."""

    def __init__(self, config: Namespace, parser: ArgumentParser, trains: bool) -> None:
        self.config = config
        if not trains:  # do not create the trainer's logger (it makes directories and runs) just to read
            config = config.clone()
            config.trainer.logger = False
            config.trainer.callbacks = None
        init = parser.instantiate_classes(config)
        self.model, self.data, self.task = init.model, init.data, init.task
        self.parser = parser
        self.output_dir = Path(config.output_dir).resolve()
        self.trace_path = _trace_path(config)
        report = config.report
        self.renderer = _instantiate_renderer(report.renderer) or _default_renderer(self.data)
        self.trainer_kwargs = _plain(init.trainer)
        self.callback_kwargs = _plain(config.callback)

    # --- data ------------------------------------------------------------------------------------
    def datasets(self) -> tuple[Any, Any]:
        """(training set, query split) as map-style datasets, ids = positions."""
        self.data.setup("fit")
        train = _dataset_of(self.data, "train")
        split = self.config.queries.split
        if split not in ("test", "val", "train"):
            raise CLIError(f"queries.split={split!r}: use 'test', 'val' or 'train'.")
        if split == "test" and getattr(self.data, "test_set", None) is None:
            self.data.setup("test")
        return train, _dataset_of(self.data, split)

    def query_ids(self, queries: Any) -> list[int]:
        options = self.config.queries
        ids = list(options.ids) if options.ids is not None else list(range(min(options.count, len(queries))))
        bad = [i for i in ids if not 0 <= i < len(queries)]
        if bad or not ids:
            raise CLIError(
                f"queries: ids {bad or ids} are not in the {options.split} split of {len(queries)} examples."
            )
        return ids


def _trace_path(config: Namespace) -> Path:
    """``--trace``, else ``<output_dir>/trace.h5``."""
    return Path(config.trace).resolve() if config.trace else Path(config.output_dir).resolve() / "trace.h5"


def _plain(value: Any) -> dict[str, Any]:
    return value.as_dict() if isinstance(value, Namespace) else dict(value or {})


def _instantiate_renderer(spec: Any) -> Any:
    """``report.renderer``: a class_path/init_args mapping (or an instance), or None for automatic."""
    if spec is None or callable(spec):
        return spec
    spec = _plain(spec)
    if "class_path" not in spec:
        raise CLIError("report.renderer: give class_path (e.g. lightning_tda.reporting.ImageRenderer) and init_args.")
    from jsonargparse import ArgumentParser as Parser

    from lightning_tda.reporting import AutoRenderer, ImageRenderer, TabularRenderer, TextRenderer

    parser = Parser(exit_on_error=False)
    parser.add_argument("--renderer", type=ImageRenderer | TextRenderer | TabularRenderer | AutoRenderer)
    try:
        return parser.instantiate_classes(parser.parse_object({"renderer": spec})).renderer
    except Exception as err:  # jsonargparse reports type problems as several exception types
        raise CLIError(f"report.renderer: {_one_line(err)}") from err


def _default_renderer(data: Any) -> Any:
    """Without ``report.renderer``: chosen per example, decoding token ids with the data module's ``tokenizer``
    when it has one (anything with ``decode``)."""
    from lightning_tda.reporting import AutoRenderer

    tokenizer = getattr(data, "tokenizer", None)
    return AutoRenderer(tokenizer=tokenizer if callable(getattr(tokenizer, "decode", None)) else None)


def _dataset_of(data: Any, split: str) -> Any:
    dataset = getattr(data, f"{split}_set", None)
    if dataset is None:
        loader = getattr(data, f"{split}_dataloader")()
        dataset = loader.dataset
    return dataset


def method_class(name: str) -> type:
    """The attribution class for a method name; a clear error if unknown or not installed."""
    if name not in METHODS:
        raise CLIError(f"Unknown method {name!r}; choose one of: {', '.join(METHODS)}.")
    import lightning_tda.methods as methods

    try:
        return getattr(methods, METHODS[name])
    except (ImportError, AttributeError) as err:
        raise CLIError(f"Method {name!r} ({METHODS[name]}) is not available in this installation: {err}.") from err


def method_kwargs(cls: type, spec: MethodSpec) -> dict[str, Any]:
    """Validate ``spec.init_args`` against the method's signature (names and types)."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "args", skip=_SUPPLIED, fail_untyped=False, instantiate=False)
    try:
        parsed = parser.parse_object({"args": dict(spec.init_args)})
        values = _plain(parser.instantiate_classes(parsed).args)
    except Exception as err:  # jsonargparse reports type problems as several exception types
        problem = _one_line(err).replace('key "args.', 'key "')
        raise CLIError(f"methods[{spec.name}].init_args: {problem}") from err
    return {key: values[key] for key in spec.init_args}


def _method_spec(entry: dict[str, Any], position: int) -> MethodSpec:
    entry = _plain(entry)
    unknown = set(entry) - {"name", "init_args", "baseline"}
    if "name" not in entry or unknown:
        problem = f"unknown keys {sorted(unknown)}" if unknown else "no name"
        raise CLIError(
            f"methods[{position}] has {problem}; give name (one of {', '.join(METHODS)}), init_args, baseline."
        )
    if entry["name"] not in METHODS:
        raise CLIError(f"methods[{position}]: unknown method {entry['name']!r}; choose one of: {', '.join(METHODS)}.")
    init_args = _plain(entry.get("init_args"))
    baseline = entry.get("baseline", False)
    if not isinstance(baseline, bool):
        raise CLIError(f"methods[{position}].baseline must be true or false, got {baseline!r}.")
    return MethodSpec(entry["name"], init_args, baseline)


def selected_methods(config: Namespace) -> list[MethodSpec]:
    specs = [_method_spec(entry, i) for i, entry in enumerate(config.methods)]
    chosen = config.get("method")
    if chosen is not None:
        if chosen not in METHODS:
            raise CLIError(f"--method {chosen!r} is not a method; choose one of: {', '.join(METHODS)}.")
        return [s for s in specs if s.name == chosen] or [MethodSpec(chosen)]
    selected = [s for s in specs if not s.baseline or config.get("baselines")]
    if not selected:
        raise CLIError("No methods to run: list some under `methods:` in the config, or pass --method NAME.")
    return selected


# ------------------------------------------------------------------------------------- steps
def fit(job: Job) -> Any:
    """Train with TDACallback; returns the trainer (its loggers receive the report in ``run``)."""
    import lightning as L

    from lightning_tda.recording.callback import TDACallback

    kwargs = dict(job.trainer_kwargs)
    kwargs.setdefault("default_root_dir", str(job.output_dir))
    callbacks = list(kwargs.pop("callbacks", None) or [])
    callbacks.append(TDACallback(str(job.trace_path), task=job.task, **job.callback_kwargs))
    trainer = L.Trainer(callbacks=callbacks, **kwargs)
    trainer.fit(job.model, datamodule=job.data)
    if trainer.is_global_zero:
        print(f"trace: {job.trace_path}")
    return trainer


def attribute(job: Job) -> list[str]:
    """Run the selected methods; rank 0 saves their Scores into the trace. Returns the result names."""
    import torch
    from torch.utils.data import Subset

    from lightning_tda.methods import MethodOptions
    from lightning_tda.reporting import global_rank
    from lightning_tda.trace.reader import Trace

    specs = selected_methods(job.config)
    classes = [(spec, method_class(spec.name)) for spec in specs]
    kwargs = [method_kwargs(cls, spec) for spec, cls in classes]
    trace = Trace.open(job.trace_path)
    train, split = job.datasets()
    ids = job.query_ids(split)
    queries = Subset(split, ids)
    fabric = _launch_fabric(job.config.attribution.devices)
    saved = []
    for (spec, cls), extra in zip(classes, kwargs):
        if fabric is not None:
            extra = {**extra, "options": replace(extra.get("options") or MethodOptions(), fabric=fabric)}
        try:
            method = cls(trace, model=job.model, task=job.task, **extra)
        except ValueError as err:  # a hyper-parameter value the method refuses (its message names the fix)
            raise CLIError(f"methods[{spec.name}].init_args: {str(err).splitlines()[0]}") from err
        start = time.perf_counter()
        timeline = None
        if job.config.report.timeline and method.has_time_axis():
            timeline = method.attribute_over_time(queries, train)
            timeline.query_ids = torch.as_tensor(ids, dtype=torch.int64)
            scores = timeline.total()
        else:
            scores = method.attribute(queries, train)
        seconds = time.perf_counter() - start
        scores.query_ids = torch.as_tensor(ids, dtype=torch.int64)
        line = f"{spec.name}: scores {tuple(scores.shape)} in {seconds:.1f} s"
        results: list[Any] = [scores]
        if timeline is not None:
            line += f" (with a timeline over {len(timeline.segments)} segments)"
            results.append(timeline)
        if job.config.attribution.self_influence and hasattr(method, "self_influence"):
            start = time.perf_counter()
            try:
                results.append(method.self_influence(train))
                line += f"; self-influence in {time.perf_counter() - start:.1f} s"
            except (NotImplementedError, ValueError) as err:  # e.g. DataInf's d×d self-influence on big layers
                line += f"; no self-influence ({str(err).splitlines()[0]})"
        if global_rank() == 0:
            saved += [result.save(job.trace_path) for result in results]
            print(line)
        if fabric is not None:  # the other ranks must not open the trace while rank 0 writes into it
            fabric.barrier()
    return saved


def _finish_wandb_runs(loggers: Sequence[Any] | None) -> None:
    """End the WandbLogger's run so its offline log is complete when the command returns
    (``WandbLogger.finalize`` leaves the run open)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers or []:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


def _launch_fabric(devices: int) -> Any:
    if devices < 1:
        raise CLIError(f"attribution.devices={devices}: use at least 1.")
    if devices == 1:
        return None
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=devices, strategy="ddp")
    fabric.launch()
    return fabric


def report(job: Job, loggers: Sequence[Any] | None = None) -> Any:
    """Build the report from every result in the trace and write it (rank 0 only)."""
    import torch

    from lightning_tda.evaluation.record import Evaluation
    from lightning_tda.reporting import WandbReporter, build_report, global_rank, write_reports
    from lightning_tda.scores import Scores
    from lightning_tda.timeline import Timeline
    from lightning_tda.trace.reader import Trace

    if global_rank() != 0:
        return None
    trace = Trace.open(job.trace_path)
    evaluation = Evaluation.load(job.trace_path)
    names = Scores.available(job.trace_path)
    if not names:
        raise CLIError(f"The trace {job.trace_path} holds no scores yet; run `lightning-tda attribute` first.")
    order = list(METHODS)
    names.sort(key=lambda n: (order.index(n.removesuffix("-self")) if n.removesuffix("-self") in order else 99, n))
    scores = [Scores.load(job.trace_path, name) for name in names]
    timelines = []
    if job.config.report.timeline:
        pairwise = {s.method: s for s in scores if s.kind == "pairwise"}
        for name in Timeline.available(job.trace_path):
            timeline = Timeline.load(job.trace_path, name)
            shown = pairwise.get(timeline.method)
            if shown is not None and torch.equal(timeline.totals, shown.values):
                timelines.append(timeline)
            else:  # scores computed again without a timeline since: the stored timeline is not theirs
                print(f"timeline {name!r} left out: it does not add up to the stored {timeline.method!r} scores")
    train, split = job.datasets()
    trace.load_checkpoint(job.model, trace.final_checkpoint.index)
    options = job.config.report
    noisy = getattr(job.data, "flipped", None) if options.noisy_labels else None
    if noisy is not None and (len(noisy) != len(train) or not bool(noisy.any())):
        noisy = None
    content = build_report(
        scores,
        split,
        train,
        model=job.model,
        task=job.task,
        k=options.k,
        renderer=job.renderer,
        label_names=options.label_names,
        self_top=options.self_top,
        noisy=noisy,
        trace_path=job.trace_path,
        title=f"Training data attribution: {type(job.model).__name__} on {type(job.data).__name__}",
        evaluation=evaluation,
        timelines=timelines,
    )
    wandb: Any = False
    if options.wandb:
        wandb = WandbReporter(project=options.project, name=options.run_name, save_dir=str(job.output_dir))
    written = write_reports(
        content,
        loggers=list(loggers or []),
        html=job.output_dir / "report.html" if options.html else None,
        wandb=wandb,
    )
    if evaluation is not None:
        print(evaluation.verdict()[1])
    print(written.describe())
    return written


# ------------------------------------------------------------------------------------ evaluate
# Trainer arguments a re-training on a subset does not take from the config: outputs, logging, validation
# (which does not change training) and the device layout (each fit runs in one worker process).
_NOT_RETRAINED = {
    "logger",
    "callbacks",
    "enable_checkpointing",
    "enable_progress_bar",
    "enable_model_summary",
    "default_root_dir",
    "devices",
    "num_nodes",
    "strategy",
    "limit_val_batches",
    "num_sanity_val_steps",
    "val_check_interval",
    "check_val_every_n_epoch",
    "log_every_n_steps",
    "profiler",
    "enable_autolog_hparams",
    "model_registry",
    "limit_test_batches",
    "limit_predict_batches",
}


@dataclass(frozen=True)
class ConfiguredModule:
    """A fresh LightningModule from the config's ``model`` section (``class_path`` + ``init_args``), built
    like ``fit`` builds it; picklable, with a ``repr`` that names the configuration (re-training cache keys)."""

    config: dict[str, Any]

    def __call__(self) -> Any:
        import lightning as L

        parser = ArgumentParser(exit_on_error=False)
        parser.add_subclass_arguments(L.LightningModule, "model", required=True)
        return parser.instantiate_classes(parser.parse_object({"model": self.config})).model


class FitProgress:
    """``progress(done, total)`` for the re-training: a tqdm bar on a terminal, else a plain line per fit,
    each with the time per fit and the estimated time left."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.started = time.perf_counter()
        self.bar: Any = None
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=None, desc=description, unit="fit")

    def __call__(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.total = total
            self.bar.update(done - self.bar.n)
            return
        elapsed = time.perf_counter() - self.started
        left = elapsed / done * (total - done)
        print(
            f"{self.description}: {done}/{total} fits, {elapsed / done:.1f} s per fit, ETA {_duration(left)}",
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def _check_evaluation_options(config: Namespace) -> None:
    options = config.evaluation
    problems = [
        (
            options.subsets < 2,
            f"evaluation.subsets={options.subsets}: use at least 2 (20+ for a tight interval)",
        ),
        (options.seeds < 1, f"evaluation.seeds={options.seeds}: use at least 1"),
        (not 0 < options.fraction < 1, f"evaluation.fraction={options.fraction}: use a fraction between 0 and 1"),
        (options.workers < 1, f"evaluation.workers={options.workers}: use at least 1"),
        (options.replay_steps < 1, f"evaluation.replay_steps={options.replay_steps}: replay at least 1 step"),
        (
            options.queries is not None and options.queries.split != config.queries.split,
            f"evaluation.queries.split={options.queries.split if options.queries else None!r} differs from "
            f"queries.split={config.queries.split!r}: the report shows scores against queries.split, so keep them "
            f"the same (choose the evaluation's queries with evaluation.queries.count or ids)",
        ),
    ]
    if config.attribution.devices != 1:
        problems.append(
            (
                True,
                f"attribution.devices={config.attribution.devices}: evaluate attributes in one process (its extra "
                "processes would re-run the evaluation); pass --attribution.devices 1",
            )
        )
    devices = config.trainer.get("devices")
    if (isinstance(devices, int) and devices > 1) or (isinstance(devices, list) and len(devices) > 1):
        problems.append(
            (
                True,
                f"trainer.devices={devices}: evaluate replays and re-trains in single processes; record the trace "
                "with devices: 1 to evaluate on this model",
            )
        )
    for wrong, message in problems:
        if wrong:
            raise CLIError(message + ".")


def _evaluation_job(job: Job) -> Job:
    """The job with the evaluation's queries and methods (every configured one unless named, baselines
    included) and no self-influence (the LDS does not measure it): what ``attribute`` scores."""
    options = job.config.evaluation
    specs = [_method_spec(entry, i) for i, entry in enumerate(job.config.methods)]
    if options.methods is not None:
        unknown = [name for name in options.methods if name not in METHODS]
        if unknown:
            raise CLIError(f"evaluation.methods: unknown {unknown}; choose from: {', '.join(METHODS)}.")
        specs = [next((s for s in specs if s.name == name), MethodSpec(name)) for name in options.methods]
    if not specs:
        raise CLIError("No methods to evaluate: list some under `methods:` or `evaluation.methods:` in the config.")
    config = job.config.clone()
    config.methods = [{"name": s.name, "init_args": s.init_args, "baseline": False} for s in specs]
    if options.queries is not None:
        config.queries = options.queries
    config.attribution.self_influence = False
    scoring = copy.copy(job)
    scoring.config = config
    return scoring


def _config_train_fn(job: Job, train: Any) -> Any:
    """``train_fn(subset, seed)`` re-training the config's recipe: its model, its data module's training loader
    (batch size, collate function, shuffling) and its trainer arguments, on a subset of the training set."""
    from lightning_tda.evaluation import LightningTrainFn

    trainer = {key: value for key, value in _plain(job.config.trainer).items() if value is not None}
    trainer = {key: value for key, value in trainer.items() if key not in _NOT_RETRAINED}
    max_epochs = trainer.pop("max_epochs", None)
    if max_epochs is None:  # Lightning's rule: 1000 epochs unless max_steps ends training first
        max_epochs = 1000 if trainer.get("max_steps", -1) == -1 else 10**9
    loader = job.data.train_dataloader()
    if getattr(loader, "dataset", None) is not train:
        raise CLIError(
            f"{type(job.data).__name__}.train_dataloader() does not load its train_set; evaluate re-trains on "
            f"subsets of train_set, so make train_dataloader() a DataLoader over self.train_set."
        )
    try:
        return LightningTrainFn.like(loader, ConfiguredModule(_plain(job.config.model)), max_epochs, trainer)
    except ValueError as err:
        raise CLIError(str(err)) from err


def _check_reproducible(job: Job) -> int:
    """Replay the config's first ``evaluation.replay_steps`` optimizer steps with its seed (a fresh model, data
    module and trainer, as ``fit`` builds them) and compare the losses with the trace's step log."""
    import tempfile

    import lightning as L

    from lightning_tda.evaluation.reproducibility import NotReproducibleError, StepLossRecorder, check_replay
    from lightning_tda.evaluation.retrain import quiet_lightning
    from lightning_tda.trace.reader import Trace

    recorded = Trace.open(job.trace_path).steps().loss
    if len(recorded) == 0:
        raise CLIError(f"The trace {job.trace_path} recorded no training step; re-run `lightning-tda fit`.")
    seed = job.config.seed_everything
    L.seed_everything(seed, verbose=False)  # then build everything in the order `fit` does
    replay = Job(job.config, job.parser, trains=False)
    recorder = StepLossRecorder(min(job.config.evaluation.replay_steps, len(recorded)))
    kwargs = {key: value for key, value in replay.trainer_kwargs.items() if key != "default_root_dir"}
    kwargs.update(callbacks=[recorder], logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with tempfile.TemporaryDirectory() as root, quiet_lightning():
        L.Trainer(default_root_dir=root, **kwargs).fit(replay.model, datamodule=replay.data)
    configs = job.config.get("config") or []
    where = f"The config {configs[-1]}" if configs else "The config"
    try:
        return check_replay(recorded, recorder.losses, seed, where, recorder.planned_steps)
    except NotReproducibleError as err:
        raise CLIError(str(err)) from err


def evaluate(job: Job) -> Any:
    """``lightning-tda evaluate``: each method's LDS on this model, saved into the trace and reported.

    Trains with the callback first when the trace is missing, checks that training is reproducible, scores
    the queries with every evaluated method, re-trains the subsets (cached, resumable, in worker processes),
    then writes the :class:`~lightning_tda.evaluation.record.Evaluation` into the trace and the report
    (HTML and W&B) with the method to trust. Returns the evaluation."""
    from torch.utils.data import Subset

    from lightning_tda.evaluation import lds, lds_ground_truth
    from lightning_tda.evaluation.record import Evaluation, MethodLDS
    from lightning_tda.scores import Scores

    _check_evaluation_options(job.config)
    options = job.config.evaluation
    scoring = _evaluation_job(job)
    loggers = None
    if not job.trace_path.exists():
        print(f"evaluate: no trace at {job.trace_path}; training with the callback first", flush=True)
        loggers = fit(job).loggers
    steps = _check_reproducible(job)
    print(f"evaluate: replayed {steps} steps with seed_everything={job.config.seed_everything}; losses match the trace")
    names = [spec["name"] for spec in scoring.config.methods]
    attribute(scoring)
    train, split = scoring.datasets()
    ids = scoring.query_ids(split)
    cache = Path(options.cache).resolve() if options.cache else job.trace_path.parent / "ground_truth.h5"
    total = options.subsets * options.seeds
    progress = FitProgress("ground truth")
    try:
        truth = lds_ground_truth(
            _config_train_fn(job, train),
            job.task,
            Subset(split, ids),
            len(train),
            num_subsets=options.subsets,
            fraction=options.fraction,
            num_seeds=options.seeds,
            seed=options.subset_seed,
            cache=cache,
            workers=options.workers,
            progress=progress,
        )
    except ValueError as err:  # an unreadable cache or a subset draw the training set cannot give
        raise CLIError(str(err)) from err
    finally:
        progress.close()
    print(f"ground truth: {truth.num_trained} fits trained now, {total - truth.num_trained} read from {cache}")
    measured, confidence = [], None
    for name in names:
        scores = Scores.load(job.trace_path, name)
        result = lds(scores, truth)
        measured.append(MethodLDS.of(scores, result))
        confidence = result.confidence
        print(f"LDS {measured[-1].describe()}")
    split_name = scoring.config.queries.split
    evaluation = Evaluation(
        measured, options.subsets, options.seeds, options.fraction, split_name, ids, confidence, str(cache)
    )
    evaluation.save(job.trace_path)
    report(scoring, loggers)
    _finish_wandb_runs(loggers)
    return evaluation


# ---------------------------------------------------------------------------------------- main
def _one_line(err: BaseException) -> str:
    """jsonargparse messages span lines (one per candidate type of a union); keep the problem in one line:
    for a class given by class_path, the nested key and what was wrong with it."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1 and "Does not validate against any of the Union subtypes" in lines[1]:
        start = next((i for i, line in enumerate(lines) if line.startswith("- Problem with given class_path")), None)
        if start is not None:
            end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("- ")), len(lines))
            lines = [lines[0], lines[start].removeprefix("- ")] + lines[start + 1 : end]
    text = " ".join(lines) if lines else type(err).__name__
    return text if len(text) <= 400 else text[:397] + "..."


_PARSER_KEY = re.compile(r'Parser key "(?P<key>[\w.]+)"')
_CLASS_PATH = re.compile(r"class_path'?:? '(?P<path>[\w.]+)'")


def _class_path_problem(err: BaseException) -> str | None:
    """Why a configured ``class_path`` does not import, with the fix; None when it imports (the problem is
    elsewhere, e.g. a wrong ``init_args`` type, and jsonargparse's message says it)."""
    text = str(err)
    key, found = _PARSER_KEY.search(text), _CLASS_PATH.search(text)
    if found is None:
        return None
    path = found.group("path")
    where = f"{key.group('key')}.class_path {path!r}" if key else f"class_path {path!r}"
    module_name, _, name = path.rpartition(".")
    if not module_name:
        return f"{where}: give the full import path, module and class (e.g. mymodule.{path})."
    directory = os.getcwd()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as missing:
        top = module_name.split(".")[0]
        if missing.name and (module_name == missing.name or module_name.startswith(missing.name + ".")):
            return (
                f"{where}: no module {missing.name!r} in the working directory {directory} or on the Python path. "
                f"Run lightning-tda from the directory that holds {top}.py (or the package {top}/), or add that "
                f"directory to PYTHONPATH."
            )
        return (
            f"{where}: module {module_name!r} was found but importing it failed: No module named "
            f"{missing.name!r}. Install the package that provides {missing.name!r} in this environment."
        )
    except Exception as failed:  # the user's module raised while being imported
        problem = str(failed).splitlines()[0] if str(failed) else ""
        return f"{where}: importing {module_name!r} raised {type(failed).__name__}: {problem} (fix that module)."
    if not hasattr(module, name):
        source = getattr(module, "__file__", None) or module_name
        return f"{where}: module {module_name!r} ({source}) has no {name!r}. Check the class name."
    return None


@contextmanager
def _working_directory_on_path() -> Iterator[None]:
    """Put the working directory first on ``sys.path`` while the command runs, as ``python main.py``
    puts its script's directory there: a config's ``class_path: mymodule.MyModel`` then finds
    ``./mymodule.py`` without PYTHONPATH (a console script's own directory is the venv's ``bin``)."""
    directory = os.getcwd()
    if any(os.path.abspath(entry or ".") == directory for entry in sys.path):
        yield
        return
    sys.path.insert(0, directory)
    try:
        yield
    finally:
        if directory in sys.path:
            sys.path.remove(directory)


def _launched_by_fabric() -> bool:
    """True in the extra processes Fabric starts for ``attribution.devices > 1`` (they skip training)."""
    return int(os.environ.get("LOCAL_RANK", "0")) > 0


def run(argv: Sequence[str] | None = None) -> int:
    from lightning_tda.reporting import use_offline_by_default
    from lightning_tda.trace.checks import TraceError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(only=argv[0] if argv and not argv[0].startswith("-") else None)
    try:
        config = parser.parse_args(argv)
    except Exception as err:  # ArgumentError and the type errors jsonargparse raises while parsing
        raise CLIError(_class_path_problem(err) or _one_line(err)) from err
    subcommand = config.subcommand
    if subcommand in ("inspect", "clean"):
        from lightning_tda.trace.maintenance import clean, storage_lines
        from lightning_tda.trace.reader import Trace

        path = config[subcommand].trace
        try:
            if subcommand == "inspect":
                print("\n".join([Trace.open(path).summary(), *storage_lines(path)]))
            else:
                print(clean(path, results=config.clean.results))
        except TraceError as err:
            raise CLIError(str(err)) from err
        return 0
    use_offline_by_default()
    sub = config[subcommand]
    import lightning as L

    L.seed_everything(sub.seed_everything, verbose=False)  # before the model is built, as LightningCLI does
    try:
        trains = subcommand in ("fit", "run") or (subcommand == "evaluate" and not _trace_path(sub).exists())
        job = Job(sub, parser._subcommands_action._name_parser_map[subcommand], trains=trains)
    except CLIError:
        raise
    except Exception as err:  # constructor errors of the configured classes
        problem = _class_path_problem(err) or _one_line(err)
        raise CLIError(f"Could not create the configured objects: {problem}") from err
    try:
        if subcommand == "fit":
            _finish_wandb_runs(fit(job).loggers)
        elif subcommand == "attribute":
            attribute(job)
        elif subcommand == "report":
            report(job)
        elif subcommand == "evaluate":
            evaluate(job)
        else:
            loggers = None
            if not (sub.attribution.devices > 1 and _launched_by_fabric()):
                loggers = fit(job).loggers
            attribute(job)
            report(job, loggers)
            _finish_wandb_runs(loggers)
    except TraceError as err:
        raise CLIError(str(err)) from err
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-tda`` console script."""
    try:
        with _working_directory_on_path():
            return run(argv)
    except CLIError as err:
        print(f"lightning-tda: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
