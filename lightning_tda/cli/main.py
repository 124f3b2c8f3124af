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

import importlib
import os
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from lightning_tda.cli.evaluate import evaluate
from lightning_tda.cli.job import Job, trace_path
from lightning_tda.cli.options import CLIError, build_parser, one_line
from lightning_tda.cli.steps import attribute, finish_wandb_runs, fit, report

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
        raise CLIError(_class_path_problem(err) or one_line(err)) from err
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
        trains = subcommand in ("fit", "run") or (subcommand == "evaluate" and not trace_path(sub).exists())
        job = Job(sub, parser._subcommands_action._name_parser_map[subcommand], trains=trains)
    except CLIError:
        raise
    except Exception as err:  # constructor errors of the configured classes
        problem = _class_path_problem(err) or one_line(err)
        raise CLIError(f"Could not create the configured objects: {problem}") from err
    try:
        if subcommand == "fit":
            finish_wandb_runs(fit(job).loggers)
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
            finish_wandb_runs(loggers)
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
