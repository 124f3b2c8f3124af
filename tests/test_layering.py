"""The package's imports run one way (docs/architecture.md): a module imports only from its own stage of the flow or
lower ones, recording and curvature never import each other, nothing imports the demos, and the store, curvature,
layer and method code never import Lightning. Every import counts, including those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_tda"

# the stages, lowest first; a module may import from its own stage or any lower one
STAGES = [
    {"tasks"},
    {"batches", "layers"},
    {"trace"},
    {"scores", "timeline"},
    {"recording", "curvature"},
    {"methods"},
    {"reporting", "evaluation"},
    {"cli", "__init__"},
    {"demo", "demo_language"},  # nothing in the library imports the demos
]
SIBLINGS_APART = [{"recording", "curvature"}]
WITHOUT_LIGHTNING = {"tasks", "batches", "layers", "trace", "scores", "timeline", "curvature", "methods"}


def stage_of(unit: str) -> int:
    return next(i for i, units in enumerate(STAGES) if unit in units)


def unit_of(module: str) -> str:
    """``lightning_tda.trace.reader`` -> ``trace``; the package root is ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(part for part in relative.parts if part != "__init__")
        found[name] = path
    return found


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports (the package uses absolute imports only; a relative one is reported)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(f"relative import at line {node.lineno}" if node.level else node.module)
    return names


def test_every_module_belongs_to_a_stage():
    units = {unit_of(name) for name in modules()}
    staged = set().union(*STAGES)
    assert units <= staged, f"modules outside the stages of docs/architecture.md: {sorted(units - staged)}"


def test_imports_run_one_way():
    wrong = []
    for name, path in sorted(modules().items()):
        unit = unit_of(name)
        for imported in imports_of(path):
            if imported.startswith("relative import"):
                wrong.append(f"{name}: {imported}; import lightning_tda modules by their absolute name")
                continue
            if imported.split(".")[0] == "lightning" and unit in WITHOUT_LIGHTNING:
                wrong.append(f"{name} imports {imported} (this stage must not import Lightning)")
            if not imported.startswith("lightning_tda.") or imported == "lightning_tda":
                continue
            target = unit_of(imported)
            if target == unit:
                continue
            if stage_of(target) > stage_of(unit):
                wrong.append(f"{name} imports {imported}, a higher stage")
            if any({unit, target} == pair for pair in SIBLINGS_APART):
                wrong.append(f"{name} imports {imported}: {unit} and {target} are siblings and stay apart")
    assert not wrong, "\n".join(wrong)


def test_no_module_above_700_lines():
    """One idea per module: a module that grows past 700 lines holds more than one."""
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > 700}
    assert not long, f"split these modules by idea: {long}"
