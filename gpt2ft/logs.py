"""Reading and writing what a run records: JSON and JSONL files, and the numbers inside them.

    logs/metrics.json, logs/train_log.jsonl, logs/system.jsonl     written by training, read by charts and the card

One copy of each small piece the stages share: files appear whole or not at all (written aside, then renamed), a
full disk said in one line (`space_for`: which folder, how much was needed), a JSONL reader that skips the line a
crash cut short, NaN-safe number parsing, and the percentile the charts mark.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import DiskFullError

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How the writers that are not Python's own say it: safetensors' Rust writer ("StorageFull"), the C library's text.
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "StorageFull")


def is_disk_full(error: BaseException) -> bool:
    """True when the error, or one it was raised from, is a full disk (or quota)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return True
        if any(text in str(current) for text in DISK_FULL_TEXTS):
            return True
        current = current.__cause__ or current.__context__
    return False


def free_bytes(folder: str | Path) -> int | None:
    """Free space on the disk that holds `folder` (or would: its nearest existing parent); None if unknown."""
    path = Path(folder).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def format_bytes(count: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} bytes"


@contextlib.contextmanager
def space_for(
    folder: str | Path,
    needed: int | Callable[[], int],
    what: str,
    kept: str = "",
    cleanup: Callable[[], None] | None = None,
) -> Iterator[None]:
    """Turn a full disk while writing `what` into `folder` into one line (DiskFullError), with the space it needed.

    A write that fails while less space is free than it needs counts as a full disk too: torch's writer turns
    ENOSPC into a message without it.

    Args:
        needed: the bytes being written (or a function that estimates them, called only on failure).
        kept: what is still safe, said in the message ("the last complete checkpoint ... is kept").
        cleanup: removes what the failed write left (called once the free space is measured).
    """
    try:
        yield
    except DiskFullError:
        raise
    except Exception as error:
        free = free_bytes(folder)
        size = needed() if callable(needed) else needed
        if not (is_disk_full(error) or (free is not None and free < size)):
            raise
        if cleanup is not None:
            cleanup()
        room = f", {format_bytes(free)} free" if free is not None else ""
        raise DiskFullError(
            f"{folder}: no space left on its disk: writing {what} needs about {format_bytes(size)}{room}; "
            f"{kept + '; ' if kept else ''}free some space and run the same command again"
        ) from None


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a file under a temporary name, then rename it over `path`: readers see the old or the new file."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    with space_for(path.parent, len(text.encode("utf-8")), path.name, cleanup=lambda: partial.unlink(missing_ok=True)):
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(text, encoding="utf-8")
        partial.replace(path)
    return path


def write_json(path: str | Path, payload: Any) -> Path:
    return write_text_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    return write_text_atomic(path, "".join(json.dumps(record, default=str) + "\n" for record in records))


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    path = Path(path)
    line = json.dumps(record, default=str) + "\n"
    with space_for(path.parent, len(line.encode("utf-8")), path.name):
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as out:
            out.write(line)


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
