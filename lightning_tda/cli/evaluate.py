"""``lightning-tda evaluate``: each configured method's LDS on the user's own config (re-training subsets with the
config's recipe after checking that it reproduces the recorded run)."""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser, Namespace

from lightning_tda.cli.job import Job, method_spec, plain
from lightning_tda.cli.options import METHODS, CLIError, MethodSpec
from lightning_tda.cli.steps import attribute, finish_wandb_runs, fit, report

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
    specs = [method_spec(entry, i) for i, entry in enumerate(job.config.methods)]
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

    trainer = {key: value for key, value in plain(job.config.trainer).items() if value is not None}
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
        return LightningTrainFn.like(loader, ConfiguredModule(plain(job.config.model)), max_epochs, trainer)
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
    finish_wandb_runs(loggers)
    return evaluation
