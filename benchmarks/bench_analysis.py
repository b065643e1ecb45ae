"""The written part of RESULTS.md: what each target's result means, what was profiled and fixed."""

from __future__ import annotations

from typing import Any

from bench_common import Row


def analysis(rows: list[Row], context: dict[str, Any]) -> str:
    """Markdown sections that explain the rows (targets met or not, and why)."""
    return ""
