"""The ``lightning-tda`` command's configuration: the sections of a config beyond LightningCLI's (methods,
queries, attribution, evaluation, report) as dataclasses, and the parser of each subcommand."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

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
DESCRIPTION = (
    "The ``lightning-tda`` command: train with the callback, attribute, report and evaluate, all from one YAML config."
)
# Arguments the command supplies itself, never read from the config.
SUPPLIED = {"trace", "model", "task"}


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


def one_line(err: BaseException) -> str:
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
    parser = ArgumentParser(prog="lightning-tda", exit_on_error=False, description=DESCRIPTION)
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
