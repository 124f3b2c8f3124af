"""Write one benchmark's section of ``BENCHMARKS.md`` without touching the other sections.

Each benchmark script owns the text between ``<!-- BEGIN name -->`` and ``<!-- END name -->``;
calling :func:`write_section` again replaces only that text, so scripts can run in any order.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEach section was written by the script named in it; re-run that command to reproduce it.\n"


def machine() -> str:
    """One line naming the machine, Python and torch versions."""
    import torch

    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}, {datetime.now(timezone.utc):%Y-%m-%d}"
    )


def write_section(name: str, title: str, body: str, command: str | None = None, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) the section ``name`` of ``path`` with ``title``, the command and ``body``."""
    command = command or "python " + " ".join(sys.argv)
    block = (
        f"<!-- BEGIN {name} -->\n## {title}\n\nCommand: `{command}`  \nMachine: {machine()}\n\n"
        f"{body.strip()}\n<!-- END {name} -->"
    )
    text = path.read_text() if path.exists() else HEADER
    pattern = re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->", re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table; floats printed with 4 significant digits."""

    def cell(value: object) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
