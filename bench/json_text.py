"""Benchmark results as JSON text: the outer levels indented one item per line (readable,
diffable), anything deeper on one line each (a run's per-request samples and timeline
entries: one line per request rather than one per field, about 40% fewer bytes)."""

from __future__ import annotations

import json
from typing import Any

INDENTED_LEVELS = 4
"""Nesting levels laid out one item per line; deeper values are written on one line."""


def dumps(obj: Any, levels: int = INDENTED_LEVELS) -> str:
    """``obj`` as JSON, its first ``levels`` levels indented; ends with a newline."""
    return _dump(obj, 0, levels) + "\n"


def _dump(obj: Any, depth: int, levels: int) -> str:
    if depth >= levels or not isinstance(obj, (dict, list)) or not obj:
        return json.dumps(obj, separators=(", ", ": "))
    pad = "  " * (depth + 1)
    if isinstance(obj, dict):
        items = [f"{pad}{json.dumps(str(k))}: {_dump(v, depth + 1, levels)}"
                 for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + "  " * depth + "}"
    items = [pad + _dump(v, depth + 1, levels) for v in obj]
    return "[\n" + ",\n".join(items) + "\n" + "  " * depth + "]"
