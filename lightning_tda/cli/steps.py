"""The subcommands that train, attribute and report (``fit``, ``attribute``, ``report``; ``run`` is all three)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from lightning_tda.cli.job import Job, method_class, method_kwargs, selected_methods
from lightning_tda.cli.options import METHODS, CLIError


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


def finish_wandb_runs(loggers: Sequence[Any] | None) -> None:
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
