"""A benchmark's result table: markdown (printed and written) and the rows as JSON beside it."""

from __future__ import annotations

import json
from pathlib import Path


def write_table(head: str, cols: list[str], rows: list[dict], out: str | None) -> str:
    """Markdown ``head`` + a table with a ``row`` column then ``cols``; printed, and written to ``out`` (with
    ``out``'s ``.json`` holding ``rows``) when given. Returns the markdown."""
    lines = [head, "", "| row | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {r['row']} | " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    table = "\n".join(lines)
    print(table)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(table + "\n")
        Path(out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return table


def emit(text: str, out: str | None) -> None:
    """Print a finished markdown report and write it to ``out`` when given."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    print(text)
