"""Where conversations come from: DailyDialog in any of its layouts, files of your own conversations, Hub datasets.

    python -m gpt2ft prepare --data conversations.jsonl          # or train --data ...; see data.prepare_dialogs
    python -m gpt2ft train --data hub:OWNER/NAME@REVISION:CONFIG

`load_source(data)` reads a source into `RawDialogs`: the splits it has, as Arrow tables, and how to read a
conversation from each record (its Layout). Reading each record into a conversations.Conversation (its messages,
with DailyDialog's emotion and act on every turn), cleaning, splitting and de-duplicating happen in data.py, the same
way for every source.

Sources (`--data`):
    hub                      DailyDialog from the Hub (its parquet conversion; the official zip as fallback)
    a DailyDialog copy       the official zip, a folder of train.zip/validation.zip/test.zip, extracted
                             <split>/dialogues_<split>.txt files, or the Hub's parquet layout (dialog, act, emotion)
    FILE                     .jsonl, .json (an array of records, or JSON Lines) or .parquet
    FOLDER                   train.* and optionally validation.* (or valid/val/dev) and test.*, of those types
    hub:OWNER/NAME[@REV][:CONFIG]   a Hub dataset with data files (datasets >= 4 runs no loading scripts)

Record layouts, detected per source (or forced with --dialog-column NAME); conversations.READERS reads each:
    messages        {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}   (OpenAI / TRL)
    sharegpt        {"conversations": [{"from": "system"|"human"|"gpt"|"user"|"assistant", "value": "..."}, ...]}
    turns           a list of strings under "dialog", "dialogue" or "turns" (SODA)
    dailydialog     turns under "dialog" with per-turn "act" and "emotion" ids (every DailyDialog layout above)
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import os
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq
from datasets import Dataset, DatasetDict
from datasets.utils import logging as datasets_logging
from huggingface_hub import hf_hub_download

from .conversations import TURN_COLUMNS, DataError, Layout, message_layout

SPLITS = ("train", "validation", "test")
HUB_REPO = "li2017dailydialog/daily_dialog"
HUB_REVISION = "refs/convert/parquet"
ZIP_URL = "http://yanran.li/files/ijcnlp_dailydialog.zip"
ZIP_NAME = "ijcnlp_dailydialog.zip"
# The release zip's size and SHA-256, as recorded by the datasets library's daily_dialog loader
# (huggingface/datasets, datasets/daily_dialog/dataset_infos.json, "download_checksums").
ZIP_SIZE = 4_475_921
ZIP_SHA256 = "c641e88cbf21fd7c1b57289387f9107d33fe8685a2b37fe8066b82776535ea89"
DATA_LICENSE = "CC BY-NC-SA 4.0 (non-commercial)"
EOU = "__eou__"

# DailyDialog as released: turns, the release's label ids (conversations.LABELS names them) and each dialogue's id,
# `<split>-<line>` (the line of the text files, or the row of the parquet, from 1).
FEATURES = datasets.Features(
    {
        "dialog": datasets.List(datasets.Value("string")),
        "act": datasets.List(datasets.Value("int64")),
        "emotion": datasets.List(datasets.Value("int64")),
        "id": datasets.Value("string"),
    }
)
DAILYDIALOG_COLUMNS = ("dialog", "act", "emotion")


@dataclass
class LoadReport:
    """What loading found: where the data came from and which lines were skipped (turn/label count mismatch)."""

    source: str = ""
    skipped: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------------
# Parsing the release text files
# --------------------------------------------------------------------------------------------------------------


def decode_utf8(raw: bytes, name: str) -> str:
    """Decode bytes as UTF-8, or raise DataError naming the file and line of the first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DataError(
            f"{name}:{line}: not UTF-8 text (byte {raw[error.start]:#04x} at offset {error.start})"
        ) from None


def split_lines(text: str) -> list[str]:
    """Lines of a release file; the final newline does not make an extra line."""
    lines = text.replace("\r\n", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def parse_turns(line: str) -> list[str]:
    """Turns of one dialogue line: split on `__eou__`, stripped, empty pieces dropped."""
    return [turn.strip() for turn in line.split(EOU) if turn.strip()]


def parse_labels(line: str, name: str, number: int) -> list[int]:
    try:
        return [int(value) for value in line.split()]
    except ValueError:
        raise DataError(f"{name}:{number}: expected whitespace-separated integer labels, got {line[:60]!r}") from None


def parse_split(
    dialog_text: str,
    act_text: str,
    emotion_text: str,
    names: Sequence[str],
    report: LoadReport | None = None,
    split: str = "train",
) -> dict[str, list]:
    """Parse one split's three line-aligned files into columns (FEATURES; a dialogue's id is `<split>-<line>`).

    A dialogue whose turn count differs from its act or emotion label count is skipped and counted in `report`
    (the release itself has one such line: train line 7852, 12 turns but 11 labels). Everything else that breaks
    the format is an error.

    Raises:
        DataError: different line counts between the files, an empty line, a line without `__eou__`, or a
            label line that is not integers; the message names the file and line.
    """
    dialog_name, act_name, emotion_name = names
    dialog_lines, act_lines, emotion_lines = split_lines(dialog_text), split_lines(act_text), split_lines(emotion_text)
    # Malformed dialogue lines first: an inserted empty line also shifts the line counts, and naming the line
    # is the more useful message.
    for number, line in enumerate(dialog_lines, start=1):
        if not line.strip():
            raise DataError(f"{dialog_name}:{number}: empty line (every line must be one dialogue)")
        if EOU not in line:
            raise DataError(f"{dialog_name}:{number}: no '{EOU}' turn separator in {line[:60]!r}")
    for other_name, other_lines in ((act_name, act_lines), (emotion_name, emotion_lines)):
        if len(other_lines) != len(dialog_lines):
            raise DataError(
                f"{other_name}: has {len(other_lines)} lines but {dialog_name} has {len(dialog_lines)}; "
                "the files must be line-aligned"
            )
    columns: dict[str, list] = {"dialog": [], "act": [], "emotion": [], "id": []}
    for number, (line, act_line, emotion_line) in enumerate(zip(dialog_lines, act_lines, emotion_lines), start=1):
        turns = parse_turns(line)
        acts = parse_labels(act_line, act_name, number)
        emotions = parse_labels(emotion_line, emotion_name, number)
        if not (len(turns) == len(acts) == len(emotions)):
            if report is not None:
                report.skipped.append(
                    f"{dialog_name}:{number}: {len(turns)} turns but {len(acts)} act and {len(emotions)} emotion labels"
                )
            continue
        columns["dialog"].append(turns)
        columns["act"].append(acts)
        columns["emotion"].append(emotions)
        columns["id"].append(f"{split}-{number}")
    return columns


# --------------------------------------------------------------------------------------------------------------
# Finding the files in each layout
# --------------------------------------------------------------------------------------------------------------


def split_file_names(split: str) -> tuple[str, str, str]:
    return (f"dialogues_{split}.txt", f"dialogues_act_{split}.txt", f"dialogues_emotion_{split}.txt")


def read_split_from_zip(archive: zipfile.ZipFile, label: str, split: str, report: LoadReport) -> dict[str, list]:
    """Read one split's three files from an open split zip (members may sit in any folder)."""
    by_basename = {Path(name).name: name for name in archive.namelist() if not name.endswith("/")}
    texts = []
    for wanted in split_file_names(split):
        if wanted not in by_basename:
            raise DataError(f"{label}: missing member {split}/{wanted}")
        member = by_basename[wanted]
        texts.append(decode_utf8(archive.read(member), f"{label}:{member}"))
    names = [f"{label}:{by_basename[wanted]}" for wanted in split_file_names(split)]
    return parse_split(*texts, names=names, report=report, split=split)


def open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise DataError(f"{path}: not a readable zip file ({error})") from None


def read_outer_zip(path: Path, report: LoadReport) -> dict[str, dict[str, list]]:
    """The official `ijcnlp_dailydialog.zip`: it nests `train.zip`, `validation.zip`, `test.zip`."""
    with open_zip(path) as outer:
        members = {Path(name).name: name for name in outer.namelist()}
        splits = {}
        for split in SPLITS:
            inner_name = members.get(f"{split}.zip")
            if inner_name is not None:
                try:
                    inner = zipfile.ZipFile(io.BytesIO(outer.read(inner_name)))
                except zipfile.BadZipFile:
                    raise DataError(f"{path}:{inner_name}: not a readable zip file") from None
                with inner:
                    splits[split] = read_split_from_zip(inner, f"{path}:{inner_name}", split, report)
            elif f"dialogues_{split}.txt" in members:  # a zip of the extracted files
                splits[split] = read_split_from_zip(outer, str(path), split, report)
            else:
                raise DataError(f"{path}: missing member {split}.zip (expected the official DailyDialog zip)")
        return splits


def read_extracted_split(folder: Path, split: str, report: LoadReport) -> dict[str, list]:
    for base in (folder / split, folder):
        if (base / f"dialogues_{split}.txt").exists():
            paths = [base / name for name in split_file_names(split)]
            texts = []
            for file_path in paths:
                try:
                    texts.append(decode_utf8(file_path.read_bytes(), str(file_path)))
                except FileNotFoundError:
                    raise DataError(
                        f"{file_path}: missing (each split needs its dialogues, act and emotion files)"
                    ) from None
                except OSError as error:
                    raise DataError(f"{file_path}: cannot read ({error.strerror})") from None
            return parse_split(*texts, names=[str(p) for p in paths], report=report, split=split)
    raise DataError(f"{folder}: no {split}/dialogues_{split}.txt")


def find_parquet(folder: Path, split: str) -> list[Path]:
    for base in (folder / "default" / split, folder / split):
        files = sorted(base.glob("*.parquet")) if base.is_dir() else []
        if files:
            return files
    return []


def read_parquet_split(files: Sequence[Path], split: str) -> dict[str, list]:
    """Read the Hub's parquet conversion (columns dialog, act, emotion), turns stripped as in the text release; a
    dialogue's id is `<split>-<row>`, rows counted from 1 across the files (the release's line, when every line is
    there)."""
    columns: dict[str, list] = {"dialog": [], "act": [], "emotion": [], "id": []}
    for file_path in files:
        try:
            table = pq.read_table(file_path)
        except Exception as error:  # pyarrow raises several unrelated types for corrupt files
            raise DataError(f"{file_path}: not a readable parquet file ({error})") from None
        missing = set(DAILYDIALOG_COLUMNS) - set(table.column_names)
        if missing:
            raise DataError(f"{file_path}: missing columns {', '.join(sorted(missing))}")
        for row, (turns, acts, emotions) in enumerate(
            zip(
                table.column("dialog").to_pylist(), table.column("act").to_pylist(), table.column("emotion").to_pylist()
            )
        ):
            turns = [turn.strip() for turn in turns if turn and turn.strip()]
            if not turns or len(turns) != len(acts) or len(turns) != len(emotions):
                raise DataError(
                    f"{file_path}: row {row}: {len(turns)} turns, {len(acts)} acts, {len(emotions)} emotions"
                )
            columns["dialog"].append(turns)
            columns["act"].append([int(a) for a in acts])
            columns["emotion"].append([int(e) for e in emotions])
            columns["id"].append(f"{split}-{len(columns['id']) + 1}")
    return columns


def read_folder(folder: Path, report: LoadReport) -> dict[str, dict[str, list]]:
    """A folder holding the split zips, extracted split folders, the Hub parquet layout, or the official zip."""
    present = {
        "zip": [s for s in SPLITS if (folder / f"{s}.zip").is_file()],
        "text": [
            s
            for s in SPLITS
            if (folder / s / f"dialogues_{s}.txt").exists() or (folder / f"dialogues_{s}.txt").exists()
        ],
        "parquet": [s for s in SPLITS if find_parquet(folder, s)],
    }
    for layout, found in present.items():
        if len(found) == len(SPLITS):
            if layout == "zip":
                splits = {}
                for split in SPLITS:
                    with open_zip(folder / f"{split}.zip") as archive:
                        splits[split] = read_split_from_zip(archive, str(folder / f"{split}.zip"), split, report)
                return splits
            if layout == "text":
                return {split: read_extracted_split(folder, split, report) for split in SPLITS}
            return {split: read_parquet_split(find_parquet(folder, split), split) for split in SPLITS}
    if (folder / ZIP_NAME).is_file():
        return read_outer_zip(folder / ZIP_NAME, report)
    partial = {layout: found for layout, found in present.items() if found}
    if partial:
        layout, found = max(partial.items(), key=lambda item: len(item[1]))
        missing = [s for s in SPLITS if s not in found]
        raise DataError(
            f"{folder}: has {', '.join(found)} but no {', '.join(missing)} ({layout} layout); "
            "all three splits are needed"
        )
    raise DataError(
        f"{folder}: no DailyDialog files found (expected {ZIP_NAME}, train.zip/validation.zip/test.zip, "
        "<split>/dialogues_<split>.txt, or <split>/*.parquet)"
    )


def to_dataset_dict(splits: dict[str, dict[str, list]]) -> DatasetDict:
    return DatasetDict({split: Dataset.from_dict(splits[split], features=FEATURES) for split in SPLITS})


# --------------------------------------------------------------------------------------------------------------
# The Hub, with the original zip as fallback
# --------------------------------------------------------------------------------------------------------------


def download_hub_parquet(cache_dir: Path) -> Path:
    """Download the Hub's parquet conversion of DailyDialog; returns the folder in the Hub layout."""
    target = cache_dir / "daily_dialog_parquet"
    for split in SPLITS:
        hf_hub_download(
            repo_id=HUB_REPO,
            repo_type="dataset",
            revision=HUB_REVISION,
            filename=f"default/{split}/0000.parquet",
            local_dir=target,
        )
    return target


def download_zip(cache_dir: Path, url: str = ZIP_URL, size: int = ZIP_SIZE, sha256: str = ZIP_SHA256) -> Path:
    """Download the official zip into `cache_dir`, streamed to disk and checked against its known size and SHA-256.

    The zip comes over plain http (the only address it has), so its bytes are trusted only when they are the
    release's. Written under a temporary name and renamed when complete and checked.

    Raises:
        DataError: the download's size or checksum is not the release's (nothing is kept).
    """
    target = cache_dir / ZIP_NAME
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".zip.part-{os.getpid()}")  # one per process: ranks may download at once
    digest, received = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            while chunk := response.read(1 << 20):
                received += len(chunk)
                if received > size:
                    raise DataError(f"{url}: more than the release's {size:,} bytes; not the DailyDialog zip")
                digest.update(chunk)
                out.write(chunk)
        if received != size or digest.hexdigest() != sha256:
            raise DataError(
                f"{url}: got {received:,} bytes with SHA-256 {digest.hexdigest()[:16]}..., "
                f"but the release has {size:,} bytes and SHA-256 {sha256[:16]}...; not the DailyDialog zip "
                "(download it by hand and pass --data)"
            )
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def load_from_hub(cache_dir: Path, report: LoadReport) -> dict[str, dict[str, list]]:
    errors = []
    try:
        folder = download_hub_parquet(cache_dir)
        report.source = f"hub:{HUB_REPO}@{HUB_REVISION}"
        return {split: read_parquet_split(find_parquet(folder, split), split) for split in SPLITS}
    except DataError:
        raise
    except Exception as error:  # network, auth, missing repo: fall back to the original zip
        errors.append(f"Hub ({HUB_REPO}): {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
    try:
        path = download_zip(cache_dir)
        report.source = str(path)
        return read_outer_zip(path, report)
    except DataError:
        raise
    except Exception as error:
        errors.append(f"zip ({ZIP_URL}): {type(error).__name__}: {error}")
    raise DataError(
        "could not download DailyDialog (" + "; ".join(errors) + "). "
        f"Download {ZIP_URL} by hand and pass its path: --data path/to/{ZIP_NAME}"
    )


def load_dailydialog(
    source: str = "hub", cache_dir: str | Path = "data", report: LoadReport | None = None
) -> DatasetDict:
    """Load DailyDialog as released (no cleaning, no de-duplication).

    Args:
        source: "hub" (the Hub's parquet conversion, falling back to the official zip), or a local path: the
            official zip, a folder of the three split zips, a folder of extracted `<split>/dialogues_<split>.txt`
            (+ act, emotion) files, or a folder in the Hub parquet layout (`[default/]<split>/*.parquet`).
        cache_dir: where downloads are kept.
        report: filled with the source and any skipped lines.

    Returns:
        DatasetDict with train/validation/test and columns dialog (list[str]), act (list[int]), emotion (list[int])
        and id (`<split>-<line>`).

    Raises:
        DataError: the source is missing, unreadable or not in a DailyDialog layout; the message names the file.
    """
    report = report if report is not None else LoadReport()
    if source == "hub":
        splits = load_from_hub(Path(cache_dir), report)
    else:
        path = Path(source).expanduser()
        report.source = str(path)
        if not path.exists():
            raise DataError(f"{path}: no such file or folder (pass 'hub', the DailyDialog zip, or its folder)")
        if path.is_dir():
            splits = read_folder(path, report)
        else:
            splits = read_outer_zip(path, report)
    for split in SPLITS:
        if not splits[split]["dialog"]:
            raise DataError(f"{report.source}: the {split} split has no dialogues")
    return to_dataset_dict(splits)


# --------------------------------------------------------------------------------------------------------------
# Your own conversations: files, folders and Hub datasets
# --------------------------------------------------------------------------------------------------------------

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# File stems that name each split in a folder (`train.jsonl`, `dev.parquet`, ...).
SPLIT_STEMS = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}


@dataclass
class RawDialogs:
    """A source as read: the splits it has (at least train), how its records hold conversations, and where they
    came from (for error messages and the cache key)."""

    splits: dict[str, Dataset]
    layout: Layout
    source: str
    origins: dict[str, str]  # split -> the file (or Hub split) its records come from
    identity: str  # changes whenever the source's content may have changed
    is_dailydialog: bool = False
    skipped: list[str] = field(default_factory=list)


def detect_layout(dataset: Dataset, origin: str, forced: str | None = None) -> Layout:
    """The record layout of a split (a key of conversations.READERS), from its columns (and, for --dialog-column,
    from what the column holds).

    Raises:
        DataError: no known layout (the message lists the columns found and suggests --dialog-column).
    """
    columns = list(dataset.column_names)
    if forced and forced not in columns:
        raise DataError(f"{origin}: --dialog-column {forced}: no such column (found: {', '.join(columns)})")
    candidates = (
        [forced] if forced else [name for name in ("messages", "conversations", *TURN_COLUMNS) if name in columns]
    )
    if candidates:
        # What the column holds decides the layout: a "conversations" column of role/content messages is the
        # messages layout, a "messages" column of from/value ones is ShareGPT's.
        column = candidates[0]
        sample = next((value for value in dataset[column][:50] if value), None)
        first = sample[0] if isinstance(sample, list) and sample else None
        if isinstance(first, dict):
            return Layout(message_layout(first), column)
        if column == "dialog" and set(DAILYDIALOG_COLUMNS) <= set(columns):  # a copy of DailyDialog: keep its labels
            return Layout("dailydialog", column)
        return Layout("turns", column)
    raise DataError(
        f"{origin}: no conversations found: columns {', '.join(columns) or '(none)'}; "
        "expected 'messages' (role/content), "
        f"'conversations' (ShareGPT from/value) or a list of turns under {', '.join(TURN_COLUMNS)} "
        "(or name the column with --dialog-column NAME)"
    )


def locate(origin: str, index: int) -> str:
    """Where record `index` of a split is, for an error message: `file.jsonl:LINE` for JSON Lines (blank lines
    counted), `file: record N` for a JSON array or parquet, `hub:... train[N]` otherwise."""
    path = Path(origin)
    if path.suffix in (".jsonl", ".json") and path.is_file():
        with path.open("rb") as handle:
            if handle.read(64).lstrip()[:1] != b"[":
                handle.seek(0)
                seen = -1
                for number, line in enumerate(handle, 1):
                    if line.strip():
                        seen += 1
                        if seen == index:
                            return f"{path}:{number}"
    if path.suffix in FILE_BUILDERS:
        return f"{path}: record {index}"
    return f"{origin}[{index}]"


def first_bad_json_line(path: Path) -> str | None:
    """`file:LINE: not JSON (...)` for the first line (or array position) that does not parse, or None."""
    with path.open("rb") as handle:
        start = handle.read(64).lstrip()[:1]
    if start == b"[":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            line = getattr(error, "lineno", "?")
            return f"{path}:{line}: not JSON ({error})"
        return None
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                return f"{path}:{number}: not JSON ({error})"
            if not isinstance(record, dict):
                return f"{path}:{number}: a JSON {type(record).__name__}, not an object (one conversation a line)"
    return None


def file_identity(paths: Sequence[Path]) -> str:
    """A key that changes when any of the files may have changed (path, size, modification time)."""
    digest = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|".encode())
    return digest.hexdigest()[:16]


class quiet_datasets:
    """Hide datasets' progress bars for quick internal steps (loading a small file, saving a cache), restoring the
    setting after."""

    def __enter__(self) -> None:
        self.was_enabled = datasets_logging.is_progress_bar_enabled()
        datasets_logging.disable_progress_bar()

    def __exit__(self, *exc: Any) -> None:
        if self.was_enabled:
            datasets_logging.enable_progress_bar()


def check_utf8(path: Path, block_size: int = 1 << 20) -> None:
    """Refuse a file with bytes that are not UTF-8, naming the line and byte offset of the first (read in blocks: a
    large file is never held whole). JSON must be UTF-8; pyarrow would otherwise read such bytes into the text and
    fail later, far from the file.

    Raises:
        DataError: `file:LINE: not UTF-8 text (byte 0x.. at offset N)`.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines = 0, 1  # bytes before this block, and the line the block starts on
    with path.open("rb") as handle:
        while True:
            block = handle.read(block_size)
            pending = decoder.getstate()[0]  # the start of a character cut by the previous block
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as error:
                data = pending + block
                at = offset - len(pending) + error.start
                line = lines + data[: error.start].count(b"\n")
                raise DataError(
                    f"{path}:{line}: not UTF-8 text (byte {data[error.start]:#04x} at offset {at})"
                ) from None
            if not block:
                return
            offset += len(block)
            lines += block.count(b"\n")


def is_blank(path: Path) -> bool:
    """True for an empty file or one of whitespace only (read in blocks: a large file is never held whole)."""
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            if block.strip():
                return False
    return True


def read_file(path: Path, cache_dir: Path | None) -> Dataset:
    """One .jsonl/.json/.parquet file as an Arrow-backed Dataset (in the datasets cache under `cache_dir`).

    Raises:
        DataError: empty, not UTF-8 or not JSON (naming the first bad line), or not readable.
    """
    if is_blank(path):
        raise DataError(f"{path}: empty file")
    builder = FILE_BUILDERS[path.suffix]
    if builder == "json":
        check_utf8(path)
    try:
        with quiet_datasets():
            dataset = datasets.load_dataset(
                builder, data_files={"train": str(path)}, split="train", cache_dir=cache_dir and str(cache_dir)
            )
    except Exception as error:  # datasets wraps pyarrow's many error types in DatasetGenerationError
        bad = first_bad_json_line(path) if builder == "json" else None
        cause = error.__cause__ or error
        raise DataError(
            bad
            or f"{path}: not readable as {builder} "
            f"({type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''})"
        ) from None
    if len(dataset) == 0:
        raise DataError(f"{path}: holds no records")
    return dataset


def split_files(folder: Path) -> dict[str, Path]:
    """The split files of a folder: train.* and optionally validation.* (or valid/val/dev) and test.*.

    Raises:
        DataError: no train file, or two files for one split.
    """
    found: dict[str, Path] = {}
    for split, stems in SPLIT_STEMS.items():
        matches = [path for stem in stems for path in sorted(folder.glob(f"{stem}.*")) if path.suffix in FILE_BUILDERS]
        if len(matches) > 1:
            raise DataError(
                f"{folder}: {len(matches)} files for the {split} split ({', '.join(p.name for p in matches)}); keep one"
            )
        if matches:
            found[split] = matches[0]
    if "train" not in found:
        raise DataError(
            f"{folder}: no train file (expected train.jsonl, train.json or train.parquet, and optionally "
            "validation.* and test.*), and no DailyDialog files (the official zip, train.zip/validation.zip/test.zip, "
            "<split>/dialogues_<split>.txt, or <split>/*.parquet)"
        )
    return found


def parse_hub_spec(data: str) -> tuple[str, str | None, str | None]:
    """`hub:OWNER/NAME[@REVISION][:CONFIG]` -> (name, revision, config).

    Raises:
        DataError: no dataset name.
    """
    spec = data[len("hub:") :]
    config = None
    if ":" in spec:
        spec, config = spec.rsplit(":", 1)
    revision = None
    if "@" in spec:
        spec, revision = spec.split("@", 1)
    if not spec:
        raise DataError(f"--data {data}: name a Hub dataset: hub:OWNER/NAME[@REVISION][:CONFIG]")
    return spec, revision or None, config or None


def read_hub(data: str, cache_dir: Path | None) -> tuple[dict[str, Dataset], dict[str, str], str]:
    """A Hub dataset's train/validation/test splits (validation also from valid/val/dev), with datasets.load_dataset.

    Raises:
        DataError: no such dataset, a script-only dataset, an unknown config, no network, or no train split.
    """
    name, revision, config = parse_hub_spec(data)
    try:
        with quiet_datasets():
            loaded = datasets.load_dataset(name, config, revision=revision, cache_dir=cache_dir and str(cache_dir))
    except Exception as error:  # noqa: BLE001 - every failure becomes one clear line
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "scripts are no longer supported" in text:
            raise DataError(
                f"--data {data}: this dataset is only a loading script, which datasets >= 4 no longer runs; use a "
                f"revision with data files (many have one: hub:{name}@refs/convert/parquet) or download its files"
            ) from None
        if type(error).__name__ in ("DatasetNotFoundError", "FileNotFoundError", "RepositoryNotFoundError"):
            raise DataError(
                f"--data {data}: no such dataset on the Hub (or it is private or gated: `hf auth login`) ({text})"
            ) from None
        if isinstance(error, ConnectionError) or "offline" in text.lower():
            raise DataError(
                f"--data {data}: cannot reach the Hugging Face Hub ({text}); check the network or pass a local file"
            ) from None
        raise DataError(f"--data {data}: cannot load it ({type(error).__name__}: {text})") from None
    splits: dict[str, Dataset] = {}
    for split, stems in SPLIT_STEMS.items():
        found = next((stem for stem in stems if stem in loaded), None)
        if found is not None:
            splits[split] = loaded[found]
    if "train" not in splits:
        if len(loaded) != 1:
            raise DataError(f"--data {data}: no train split (it has {', '.join(loaded)})")
        splits["train"] = next(iter(loaded.values()))
    origins = {split: f"{data} {split}" for split in splits}
    identity = hashlib.sha256(
        "|".join(f"{s}:{d._fingerprint}" for s, d in sorted(splits.items())).encode()
    ).hexdigest()[:16]
    return splits, origins, identity


def dailydialog_source(data: str, cache_dir: Path) -> RawDialogs:
    report = LoadReport()
    loaded = load_dailydialog(data, cache_dir=cache_dir, report=report)
    digest = hashlib.sha256()  # the labels too: they are kept through preparation, so they are part of the data
    for split in SPLITS:
        for turns, acts, emotions in zip(*(loaded[split][name][:] for name in DAILYDIALOG_COLUMNS)):
            digest.update("\x1e".join(turns).encode() + f"{acts}{emotions}".encode() + b"\x1d")
    return RawDialogs(
        splits={split: loaded[split] for split in SPLITS},
        layout=Layout("dailydialog", "dialog"),
        source=report.source,
        origins={split: f"{report.source} ({split})" for split in SPLITS},
        identity=digest.hexdigest()[:16],
        is_dailydialog=True,
        skipped=report.skipped,
    )


def is_dailydialog_folder(folder: Path) -> bool:
    """True for a folder in one of DailyDialog's layouts (a generic folder holds train.* files instead)."""
    if (folder / ZIP_NAME).is_file() or all((folder / f"{s}.zip").is_file() for s in SPLITS):
        return True
    if any((folder / s / f"dialogues_{s}.txt").exists() or (folder / f"dialogues_{s}.txt").exists() for s in SPLITS):
        return True
    files = find_parquet(folder, "train")
    if files:
        return set(DAILYDIALOG_COLUMNS) <= set(pq.read_schema(files[0]).names)
    return False


def load_source(data: str, cache_dir: str | Path | None = "data", dialog_column: str | None = None) -> RawDialogs:
    """Read `--data` into RawDialogs (see the module docstring for what it accepts).

    Args:
        cache_dir: downloads go here, and datasets' Arrow files under `<cache_dir>/datasets` (None: datasets' own
            cache folder, downloads into ./data).

    Raises:
        DataError: a missing path, an unreadable or empty file, an unknown layout, a Hub dataset that cannot be
            loaded; the message names the file (and line) or the Hub id.
    """
    datasets_cache = Path(cache_dir) / "datasets" if cache_dir else None
    cache_dir = Path(cache_dir or "data")
    if data == "hub":
        raw = dailydialog_source(data, cache_dir)
    elif data.startswith("hub:"):
        splits, origins, identity = read_hub(data, datasets_cache)
        raw = RawDialogs(splits, Layout("turns", "dialog"), data, origins, identity)
    else:
        path = Path(data).expanduser()
        if not path.exists():
            raise DataError(
                f"{path}: no such file or folder "
                "(pass 'hub', 'hub:OWNER/NAME', a .jsonl/.json/.parquet file, or a folder)"
            )
        if path.is_dir() and is_dailydialog_folder(path) or path.suffix == ".zip":
            raw = dailydialog_source(str(path), cache_dir)
        else:
            files = {"train": path} if path.is_file() else split_files(path)
            for file in files.values():
                if file.suffix not in FILE_BUILDERS:
                    raise DataError(f"{file}: not a .jsonl, .json or .parquet file (or a DailyDialog zip)")
            splits = {split: read_file(file, datasets_cache) for split, file in files.items()}
            raw = RawDialogs(
                splits,
                Layout("turns", "dialog"),
                str(path),
                {s: str(f) for s, f in files.items()},
                file_identity(list(files.values())),
            )
    if not raw.is_dailydialog or dialog_column:
        layouts = {detect_layout(dataset, raw.origins[split], dialog_column) for split, dataset in raw.splits.items()}
        if len(layouts) > 1:
            raise DataError(
                f"{raw.source}: the splits hold conversations in different layouts "
                f"({', '.join(sorted(found.kind for found in layouts))})"
            )
        raw.layout = layouts.pop()
    return raw
