"""Reading and writing what a run records: JSON and JSONL files, and the numbers inside them.

    logs/metrics.json, logs/train_log.jsonl, logs/system.jsonl     written by training, read by charts and the card

One copy of each small piece the stages share: files appear whole or not at all (written aside, then renamed), a
JSONL reader that skips the line a crash cut short, NaN-safe number parsing, and the percentile the charts mark.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a file under a temporary name, then rename it over `path`: readers see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)
    return path


def write_json(path: str | Path, payload: Any) -> Path:
    return write_text_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    return write_text_atomic(path, "".join(json.dumps(record, default=str) + "\n" for record in records))


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as out:
        out.write(json.dumps(record, default=str) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file; [] for a missing file. Lines that do not parse are skipped: the last line
    of a log that is still being written (or was cut by a crash) is often incomplete."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return []
    records = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def as_float(value: Any) -> float | None:
    """A finite-or-infinite float from a logged value; None for missing, null, NaN, booleans and text."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return None if math.isnan(value) else value


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The nearest-rank q-quantile (0 < q <= 1) of values sorted ascending: the smallest value with at least a
    share q of the values at or below it."""
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]
