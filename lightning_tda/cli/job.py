"""One run of a subcommand: the objects a config names (model, data, task, renderer, methods), built once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser, Namespace

from lightning_tda.cli.options import METHODS, SUPPLIED, CLIError, MethodSpec, one_line


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
        self.trace_path = trace_path(config)
        report = config.report
        self.renderer = _instantiate_renderer(report.renderer) or _default_renderer(self.data)
        self.trainer_kwargs = plain(init.trainer)
        self.callback_kwargs = plain(config.callback)

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


def trace_path(config: Namespace) -> Path:
    """``--trace``, else ``<output_dir>/trace.h5``."""
    return Path(config.trace).resolve() if config.trace else Path(config.output_dir).resolve() / "trace.h5"


def plain(value: Any) -> dict[str, Any]:
    return value.as_dict() if isinstance(value, Namespace) else dict(value or {})


def _instantiate_renderer(spec: Any) -> Any:
    """``report.renderer``: a class_path/init_args mapping (or an instance), or None for automatic."""
    if spec is None or callable(spec):
        return spec
    spec = plain(spec)
    if "class_path" not in spec:
        raise CLIError("report.renderer: give class_path (e.g. lightning_tda.reporting.ImageRenderer) and init_args.")
    from jsonargparse import ArgumentParser as Parser

    from lightning_tda.reporting import AutoRenderer, ImageRenderer, TabularRenderer, TextRenderer

    parser = Parser(exit_on_error=False)
    parser.add_argument("--renderer", type=ImageRenderer | TextRenderer | TabularRenderer | AutoRenderer)
    try:
        return parser.instantiate_classes(parser.parse_object({"renderer": spec})).renderer
    except Exception as err:  # jsonargparse reports type problems as several exception types
        raise CLIError(f"report.renderer: {one_line(err)}") from err


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
    parser.add_class_arguments(cls, "args", skip=SUPPLIED, fail_untyped=False, instantiate=False)
    try:
        parsed = parser.parse_object({"args": dict(spec.init_args)})
        values = plain(parser.instantiate_classes(parsed).args)
    except Exception as err:  # jsonargparse reports type problems as several exception types
        problem = one_line(err).replace('key "args.', 'key "')
        raise CLIError(f"methods[{spec.name}].init_args: {problem}") from err
    return {key: values[key] for key in spec.init_args}


def method_spec(entry: dict[str, Any], position: int) -> MethodSpec:
    entry = plain(entry)
    unknown = set(entry) - {"name", "init_args", "baseline"}
    if "name" not in entry or unknown:
        problem = f"unknown keys {sorted(unknown)}" if unknown else "no name"
        raise CLIError(
            f"methods[{position}] has {problem}; give name (one of {', '.join(METHODS)}), init_args, baseline."
        )
    if entry["name"] not in METHODS:
        raise CLIError(f"methods[{position}]: unknown method {entry['name']!r}; choose one of: {', '.join(METHODS)}.")
    init_args = plain(entry.get("init_args"))
    baseline = entry.get("baseline", False)
    if not isinstance(baseline, bool):
        raise CLIError(f"methods[{position}].baseline must be true or false, got {baseline!r}.")
    return MethodSpec(entry["name"], init_args, baseline)


def selected_methods(config: Namespace) -> list[MethodSpec]:
    specs = [method_spec(entry, i) for i, entry in enumerate(config.methods)]
    chosen = config.get("method")
    if chosen is not None:
        if chosen not in METHODS:
            raise CLIError(f"--method {chosen!r} is not a method; choose one of: {', '.join(METHODS)}.")
        return [s for s in specs if s.name == chosen] or [MethodSpec(chosen)]
    selected = [s for s in specs if not s.baseline or config.get("baselines")]
    if not selected:
        raise CLIError("No methods to run: list some under `methods:` in the config, or pass --method NAME.")
    return selected
