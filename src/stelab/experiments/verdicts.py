"""Claims and their verdicts as markdown: one format for every part and for the report.

A claim is ``{"id", "text", "verdict", "evidence"}``; ``verdict`` is ``reproduced``,
``partly`` or ``not``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["cell", "verdict_rows", "verdict_table"]


def cell(text: Any) -> str:
    """``text`` as one markdown table cell: whitespace collapsed, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def verdict_rows(claims: Iterable[Mapping[str, Any]], part: str | None = None) -> list[str]:
    """One table row per claim: ``| (id) text | **verdict** | evidence |`` (with a first
    column ``part`` when given)."""
    first = f"| {part} " if part is not None else ""
    return [
        f"{first}| ({c.get('id', '')}) {cell(c.get('text', ''))} | "
        f"**{c.get('verdict', '?')}** | {cell(c.get('evidence', ''))} |"
        for c in claims
    ]


def verdict_table(claims: Iterable[Mapping[str, Any]]) -> list[str]:
    """The header and the rows of a claims table (markdown lines)."""
    return ["| claim | verdict | evidence |", "|---|---|---|", *verdict_rows(claims)]
