"""DailyDialog: load it from any of its layouts, clean the text, remove leakage, format turns and tokenise.

    python -m gpt2ft train --data ../shared/data/dailydialog ...   # runs these stages before training

Expected counts (measured on the release with `prepare_dialogs`; GPT-2 tokens in the DialoGPT format used here):
    train 11,118 lines -> 11,117 parsed (line 7852 has 12 turns but 11 labels: skipped and reported)
          -> 10,359 after removing duplicates (758; exact matching alone finds 603: 10,514 distinct)
    validation 1,000 -> 902 after removing dialogues that also occur in train (98; exact matching: 77)
    test 1,000 -> 873 (127 removed; exact matching: 106)
    1,249,403 tokens a training epoch, mean 120.6 a dialogue, p99 383, longest 898 (< GPT-2's 1,024 context)

The format is DialoGPT's: `<|endoftext|>turn 1<|endoftext|>turn 2<|endoftext|>...turn N<|endoftext|>`. Every turn
ends with EOS, so a generated reply stops at EOS; the leading EOS is context only. Labels are built here, at
tokenisation time, never by masking a token id: GPT-2's pad token *is* its EOS, and masking pad ids (as
`DataCollatorForLanguageModeling` does) would hide every EOS and the model would never learn to stop
(transformers#23530).
"""

from __future__ import annotations

import io
import math
import os
import re
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import datasets
from datasets import Dataset, DatasetDict

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
IGNORE_INDEX = -100

FEATURES = datasets.Features(
    {
        "dialog": datasets.List(datasets.Value("string")),
        "act": datasets.List(datasets.Value("int64")),
        "emotion": datasets.List(datasets.Value("int64")),
    }
)


class DataError(ValueError):
    """The data cannot be read; the message names the file (and line) and what is wrong."""


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
        raise DataError(f"{name}:{line}: not UTF-8 text (byte {raw[error.start]:#04x} at offset {error.start})") from None


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
    dialog_text: str, act_text: str, emotion_text: str, names: Sequence[str], report: LoadReport | None = None
) -> dict[str, list]:
    """Parse one split's three line-aligned files into columns.

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
    columns: dict[str, list] = {"dialog": [], "act": [], "emotion": []}
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
    return parse_split(*texts, names=names, report=report)


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
                    raise DataError(f"{file_path}: missing (each split needs its dialogues, act and emotion files)") from None
                except OSError as error:
                    raise DataError(f"{file_path}: cannot read ({error.strerror})") from None
            return parse_split(*texts, names=[str(p) for p in paths], report=report)
    raise DataError(f"{folder}: no {split}/dialogues_{split}.txt")


def find_parquet(folder: Path, split: str) -> list[Path]:
    for base in (folder / "default" / split, folder / split):
        files = sorted(base.glob("*.parquet")) if base.is_dir() else []
        if files:
            return files
    return []


def read_parquet_split(files: Sequence[Path]) -> dict[str, list]:
    """Read the Hub's parquet conversion (columns dialog, act, emotion), turns stripped as in the text release."""
    import pyarrow.parquet as pq

    columns: dict[str, list] = {"dialog": [], "act": [], "emotion": []}
    for file_path in files:
        try:
            table = pq.read_table(file_path)
        except Exception as error:  # pyarrow raises several unrelated types for corrupt files
            raise DataError(f"{file_path}: not a readable parquet file ({error})") from None
        missing = {"dialog", "act", "emotion"} - set(table.column_names)
        if missing:
            raise DataError(f"{file_path}: missing columns {', '.join(sorted(missing))}")
        for row, (turns, acts, emotions) in enumerate(
            zip(table.column("dialog").to_pylist(), table.column("act").to_pylist(), table.column("emotion").to_pylist())
        ):
            turns = [turn.strip() for turn in turns if turn and turn.strip()]
            if not turns or len(turns) != len(acts) or len(turns) != len(emotions):
                raise DataError(f"{file_path}: row {row}: {len(turns)} turns, {len(acts)} acts, {len(emotions)} emotions")
            columns["dialog"].append(turns)
            columns["act"].append([int(a) for a in acts])
            columns["emotion"].append([int(e) for e in emotions])
    return columns


def read_folder(folder: Path, report: LoadReport) -> dict[str, dict[str, list]]:
    """A folder holding the split zips, extracted split folders, the Hub parquet layout, or the official zip."""
    present = {
        "zip": [s for s in SPLITS if (folder / f"{s}.zip").is_file()],
        "text": [s for s in SPLITS if (folder / s / f"dialogues_{s}.txt").exists() or (folder / f"dialogues_{s}.txt").exists()],
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
            return {split: read_parquet_split(find_parquet(folder, split)) for split in SPLITS}
    if (folder / ZIP_NAME).is_file():
        return read_outer_zip(folder / ZIP_NAME, report)
    partial = {layout: found for layout, found in present.items() if found}
    if partial:
        layout, found = max(partial.items(), key=lambda item: len(item[1]))
        missing = [s for s in SPLITS if s not in found]
        raise DataError(f"{folder}: has {', '.join(found)} but no {', '.join(missing)} ({layout} layout); all three splits are needed")
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
    from huggingface_hub import hf_hub_download

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
    import hashlib

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
                f"{url}: got {received:,} bytes with SHA-256 {digest.hexdigest()[:16]}..., but the release has {size:,} "
                f"bytes and SHA-256 {sha256[:16]}...; not the DailyDialog zip (download it by hand and pass --data)"
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
        return {split: read_parquet_split(find_parquet(folder, split)) for split in SPLITS}
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


def load_dailydialog(source: str = "hub", cache_dir: str | Path = "data", report: LoadReport | None = None) -> DatasetDict:
    """Load DailyDialog as released (no cleaning, no de-duplication).

    Args:
        source: "hub" (the Hub's parquet conversion, falling back to the official zip), or a local path: the
            official zip, a folder of the three split zips, a folder of extracted `<split>/dialogues_<split>.txt`
            (+ act, emotion) files, or a folder in the Hub parquet layout (`[default/]<split>/*.parquet`).
        cache_dir: where downloads are kept.
        report: filled with the source and any skipped lines.

    Returns:
        DatasetDict with train/validation/test and columns dialog (list[str]), act (list[int]), emotion (list[int]).

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
# Cleaning: the release is pre-tokenised ("Say , Jim , how about ... ?", "it ’ s", "right.But")
# --------------------------------------------------------------------------------------------------------------

# Each rule is (name, pattern, replacement); they run in this order and each is unit-tested.
CLEANING_RULES: list[tuple[str, re.Pattern, Any]] = [
    # Curly quotes, primes and CJK punctuation typed into the corpus become their ASCII forms.
    ("ascii_quotes", re.compile(r"[’‘′`´]"), "'"),
    ("ascii_double_quotes", re.compile(r"[“”]"), '"'),
    ("cjk_punctuation", re.compile(r"。"), "."),
    ("cjk_comma", re.compile(r"、"), ","),
    # "it ' s", "I ' Ve", "don ' t" -> "it's", "I've", "don't" (the suffix is lower-cased: "Ve" is a release typo).
    (
        "contractions",
        re.compile(r"(\w) ?' ?(s|t|m|re|ve|ll|d)\b", re.IGNORECASE),
        lambda m: f"{m.group(1)}'{m.group(2).lower()}",
    ),
    # ". . ." -> "..."
    ("ellipsis", re.compile(r"\.(?: \.)+"), lambda m: "." * m.group(0).count(".")),
    # 'Say " cheese " .' -> 'Say "cheese" .' (only paired quotes on one turn).
    ("double_quote_spacing", re.compile(r'"\s*([^"]*?)\s*"'), r'"\1"'),
    # "Jim , how ... ?" -> "Jim, how ...?"
    ("space_before_punctuation", re.compile(r"\s+([.,!?;:%)\]}])"), r"\1"),
    # "( see above )" and "$ 500" -> "(see above)" and "$500"
    ("space_after_opening", re.compile(r"([(\[{$£¥#])\s+"), r"\1"),
    # "right.But" / "Good.Let's" / "Mr.Smith" -> "right. But" (1,233 train lines lost this space in the release).
    ("missing_space_after_sentence", re.compile(r"([a-z])([.?!])([A-Z])"), r"\1\2 \3"),
    ("whitespace", re.compile(r"\s+"), " "),
]


def clean_turn(text: str) -> str:
    """Detokenise one turn into natural text (see CLEANING_RULES)."""
    for _, pattern, replacement in CLEANING_RULES:
        text = pattern.sub(replacement, text)
    return text.strip()


def clean_dialogs(dialogs: DatasetDict) -> DatasetDict:
    """Apply `clean_turn` to every turn of every split."""
    cleaned = {}
    for split, rows in dialogs.items():
        columns = rows.to_dict()
        columns["dialog"] = [[clean_turn(turn) for turn in turns] for turns in columns["dialog"]]
        cleaned[split] = Dataset.from_dict(columns, features=rows.features)
    return DatasetDict(cleaned)


def normalise_dialog(turns: Sequence[str]) -> str:
    """The text used to find duplicates: cleaned, lower-cased, whitespace collapsed, turns joined by newlines."""
    return "\n".join(" ".join(clean_turn(turn).lower().split()) for turn in turns)


def remove_overlap(dialogs: DatasetDict) -> tuple[DatasetDict, dict[str, dict[str, int]]]:
    """Drop exact duplicates within train and every validation/test dialogue that also occurs in train.

    Measured on the release: 11,118 train dialogues hold 10,515 distinct ones, and 77 validation and 106 test
    dialogues occur verbatim in train (Wen et al. 2022). Training on the evaluation data would make the reported
    perplexity dishonest.

    Returns:
        The filtered DatasetDict and per-split counts {"release", "removed", "kept"}.
    """
    seen: set[str] = set()
    keep_train = []
    for index, turns in enumerate(dialogs["train"]["dialog"]):
        key = normalise_dialog(turns)
        if key not in seen:
            seen.add(key)
            keep_train.append(index)
    kept = {"train": dialogs["train"].select(keep_train)}
    for split in ("validation", "test"):
        keep = [i for i, turns in enumerate(dialogs[split]["dialog"]) if normalise_dialog(turns) not in seen]
        kept[split] = dialogs[split].select(keep)
    counts = {
        split: {"release": len(dialogs[split]), "removed": len(dialogs[split]) - len(kept[split]), "kept": len(kept[split])}
        for split in SPLITS
    }
    return DatasetDict(kept), counts


@dataclass
class PreparedDialogs:
    """Dialogues ready to tokenise, with what was done to them."""

    dialogs: DatasetDict
    counts: dict[str, dict[str, int]]
    skipped: list[str]
    source: str


def prepare_dialogs(
    source: str,
    cache_dir: str | Path = "data",
    clean_text: bool = True,
    keep_overlap: bool = False,
    max_train_dialogs: int | None = None,
    max_eval_dialogs: int | None = None,
) -> PreparedDialogs:
    """Load, clean, de-duplicate and (for debugging) truncate the splits.

    `max_eval_dialogs` limits validation and test alike; truncation happens after de-duplication, so the first N
    leakage-free dialogues are used.
    """
    report = LoadReport()
    dialogs = load_dailydialog(source, cache_dir=cache_dir, report=report)
    if clean_text:
        dialogs = clean_dialogs(dialogs)
    if keep_overlap:
        counts = {s: {"release": len(dialogs[s]), "removed": 0, "kept": len(dialogs[s])} for s in SPLITS}
    else:
        dialogs, counts = remove_overlap(dialogs)
    limits = {"train": max_train_dialogs, "validation": max_eval_dialogs, "test": max_eval_dialogs}
    for split, limit in limits.items():
        if limit is not None and limit < len(dialogs[split]):
            dialogs[split] = dialogs[split].select(range(limit))
        counts[split]["used"] = len(dialogs[split])
    return PreparedDialogs(dialogs=dialogs, counts=counts, skipped=report.skipped, source=report.source)


# --------------------------------------------------------------------------------------------------------------
# Format and tokenise
# --------------------------------------------------------------------------------------------------------------


def format_dialog(turns: Sequence[str], eos_token: str) -> str:
    """The training text of a dialogue: EOS first, then each turn followed by EOS."""
    return eos_token + "".join(turn + eos_token for turn in turns)


def window_dialog(
    turn_ids: Sequence[Sequence[int]], eos_id: int, max_length: int, loss_on: str = "all"
) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels of one dialogue, split into windows of at most `max_length` tokens at turn boundaries.

    Each window starts with EOS; windows after the first repeat the most recent earlier turns that fit in half the
    window as context (labels -100), so every target token is predicted exactly once and always with context. A
    single turn longer than the window is cut into pieces so nothing is dropped.

    Args:
        turn_ids: token ids of each turn, without EOS.
        eos_id: GPT-2's `<|endoftext|>` id.
        max_length: most tokens in one window.
        loss_on: "all" (every turn is a target) or "responses" (the first turn is context only).

    Returns:
        A list of (input_ids, labels) pairs.
    """
    piece_limit = max(1, max_length // 2 - 1)
    pieces: list[list[int]] = []
    is_target: list[bool] = []
    for index, ids in enumerate(turn_ids):
        piece = list(ids) + [eos_id]
        target = loss_on == "all" or index > 0
        if len(piece) > max_length - 1:  # a turn longer than the window: cut it so it fits with some context
            for start in range(0, len(piece), piece_limit):
                pieces.append(piece[start : start + piece_limit])
                is_target.append(target)
        else:
            pieces.append(piece)
            is_target.append(target)

    windows = []
    first = 0
    while first < len(pieces):
        context: list[int] = []
        for previous in range(first - 1, -1, -1):
            if 1 + len(pieces[previous]) + len(context) > max_length // 2:
                break
            context = pieces[previous] + context
        if 1 + len(context) + len(pieces[first]) > max_length:  # a long turn takes the whole window
            context = []
        input_ids = [eos_id] + context
        labels = [IGNORE_INDEX] * len(input_ids)
        end = first
        while end < len(pieces) and len(input_ids) + len(pieces[end]) <= max_length:
            input_ids += pieces[end]
            labels += pieces[end] if is_target[end] else [IGNORE_INDEX] * len(pieces[end])
            end += 1
        windows.append((input_ids, labels))
        first = end
    return windows


def tokenize_dialogs(dialogs: Dataset, tokenizer: Any, max_length: int, loss_on: str = "all") -> Dataset:
    """Tokenise dialogues into training rows (one per window), in one batched call of the fast tokenizer.

    Returns:
        Dataset with input_ids, labels (-100 where no loss), length (tokens), n_targets (tokens with a label) and
        dialog_index (the source dialogue).
    """
    eos_id = tokenizer.eos_token_id
    all_turns = [turn for turns in dialogs["dialog"] for turn in turns]
    encoded = tokenizer(all_turns, add_special_tokens=False)["input_ids"] if all_turns else []
    rows: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "n_targets": [], "dialog_index": []}
    position = 0
    for index, turns in enumerate(dialogs["dialog"]):
        turn_ids = encoded[position : position + len(turns)]
        position += len(turns)
        for input_ids, labels in window_dialog(turn_ids, eos_id, max_length, loss_on):
            rows["input_ids"].append(input_ids)
            rows["labels"].append(labels)
            rows["length"].append(len(input_ids))
            rows["n_targets"].append(sum(label != IGNORE_INDEX for label in labels))
            rows["dialog_index"].append(index)
    return Dataset.from_dict(rows)


def tokenize_splits(dialogs: DatasetDict, tokenizer: Any, max_length: int, loss_on: str = "all") -> DatasetDict:
    return DatasetDict({split: tokenize_dialogs(dialogs[split], tokenizer, max_length, loss_on) for split in dialogs})


def token_stats(rows: Dataset) -> dict[str, float]:
    """Sizes of a tokenised split: rows, tokens, target tokens, mean and max row length."""
    lengths = rows["length"]
    return {
        "rows": len(rows),
        "tokens": int(sum(lengths)),
        "target_tokens": int(sum(rows["n_targets"])),
        "mean_length": float(sum(lengths) / max(1, len(lengths))),
        "max_length": int(max(lengths, default=0)),
    }


def iter_dump_records(rows: Dataset) -> Iterable[dict[str, list[int]]]:
    for input_ids, labels in zip(rows["input_ids"], rows["labels"]):
        yield {"input_ids": list(input_ids), "labels": list(labels)}


def balance_rows(lengths: Sequence[int], row_tokens: int, max_row_tokens: int) -> list[list[int]]:
    """Group sequences into packed rows of about `row_tokens` tokens each.

    ceil(total / row_tokens) rows; sequences go longest first into the row with the fewest tokens (the LPT rule),
    so rows end up nearly equal and padding them to one width costs little. If that would make a row longer than
    `max_row_tokens` (the model's context), first-fit-decreasing into rows of at most `max_row_tokens` instead.

    Returns:
        Lists of indices into `lengths`, one list a row.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    count = max(1, math.ceil(sum(lengths) / row_tokens))
    rows: list[list[int]] = [[] for _ in range(count)]
    sizes = [0] * count
    for index in order:
        emptiest = sizes.index(min(sizes))
        rows[emptiest].append(index)
        sizes[emptiest] += lengths[index]
    if max(sizes) > max_row_tokens:
        rows, sizes = [], []
        for index in order:
            fit = next((r for r, size in enumerate(sizes) if size + lengths[index] <= max_row_tokens), None)
            if fit is None:
                rows.append([index])
                sizes.append(lengths[index])
            else:
                rows[fit].append(index)
                sizes[fit] += lengths[index]
    return [row for row in rows if row]


class DialogueCollator:
    """Batches tokenised rows for training and evaluation.

    - "pack" (default): the dialogues of a batch are packed into a few rows of about `row_tokens` tokens
      (`balance_rows`), each row flattened by transformers' DataCollatorWithFlattening: `position_ids` restart at
      0 for every dialogue, and GPT-2's SDPA attention turns the restarts into a block-diagonal mask, so no token
      attends across a dialogue boundary. Rows are padded to one width with a padding segment of its own (positions
      from 0, labels -100). Rows of ~512 tokens rather than one row per batch: SDPA with a mask computes the whole
      row-by-row attention matrix, so one 2,000-token row would spend most of its attention on masked-out pairs.
    - "pad": dynamic padding to the longest row, labels padded with -100 (never masked by token id: GPT-2's pad
      *is* its EOS).
    Both round the width up to a multiple of 8 (tensor cores), or of `bucket` under torch.compile.
    """

    def __init__(
        self,
        tokenizer: Any,
        batching: str = "pack",
        pad_to_multiple_of: int = 8,
        bucket: int | None = None,
        row_tokens: int = 512,
        max_row_tokens: int = 1024,
    ):
        """
        Args:
            tokenizer: supplies the pad id.
            batching: "pack" or "pad".
            pad_to_multiple_of: batch widths are rounded up to this many tokens.
            bucket: round widths up to a multiple of this (e.g. 128) instead, so `torch.compile` sees a few shapes
                rather than a new one each step.
            row_tokens: target length of a packed row.
            max_row_tokens: longest packed row allowed (the model's context).
        """
        from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

        if batching not in ("pack", "pad"):
            raise ValueError(f"batching must be 'pack' or 'pad', got {batching!r}")
        self.batching = batching
        self.multiple = bucket or pad_to_multiple_of
        self.row_tokens = row_tokens
        self.max_row_tokens = max_row_tokens
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad = DataCollatorForSeq2Seq(
            tokenizer, padding="longest", pad_to_multiple_of=self.multiple, label_pad_token_id=IGNORE_INDEX
        )
        self.flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)

    def __call__(self, features: list[dict]) -> dict:
        rows = [{"input_ids": list(f["input_ids"]), "labels": list(f["labels"])} for f in features]
        if self.batching == "pad":
            return self.pad(rows)
        import torch

        groups = balance_rows([len(r["input_ids"]) for r in rows], self.row_tokens, self.max_row_tokens)
        packed = [self.flatten([rows[i] for i in group]) for group in groups]
        width = max(p["input_ids"].shape[1] for p in packed)
        width = math.ceil(width / self.multiple) * self.multiple
        columns: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
        for p in packed:
            extra = width - p["input_ids"].shape[1]
            columns["input_ids"].append(torch.cat([p["input_ids"][0], torch.full((extra,), self.pad_id)]))
            columns["labels"].append(torch.cat([p["labels"][0], torch.full((extra,), IGNORE_INDEX)]))
            columns["position_ids"].append(torch.cat([p["position_ids"][0], torch.arange(extra)]))
        return {key: torch.stack(values) for key, values in columns.items()}


TOKENIZED_FORMAT_VERSION = 1  # bump when the format or labels change, so old caches are not reused


def tokenization_key(dialogs: DatasetDict, tokenizer: Any, max_length: int, loss_on: str) -> str:
    """A key for the tokenised-data cache: everything that changes the token ids or labels."""
    import hashlib

    digest = hashlib.sha256()
    digest.update(f"v{TOKENIZED_FORMAT_VERSION}|{max_length}|{loss_on}|".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend is not None else repr(tokenizer.get_vocab())).encode())
    digest.update(str(tokenizer.eos_token_id).encode())
    for split in sorted(dialogs):
        digest.update(f"|{split}|".encode())
        for turns in dialogs[split]["dialog"]:
            digest.update("\x1e".join(turns).encode())
            digest.update(b"\x1d")
    return digest.hexdigest()[:16]


def tokenize_splits_cached(
    dialogs: DatasetDict, tokenizer: Any, max_length: int, loss_on: str = "all", cache_dir: str | Path | None = "data"
) -> DatasetDict:
    """`tokenize_splits`, cached under `<cache_dir>/tokenized/<key>` (Arrow files, no pickle), so a re-run skips it.

    The key covers the dialogue text, the tokenizer, `max_length`, `loss_on` and the format version. Only the
    main process writes the cache, under a temporary name that is renamed when complete.
    """
    if cache_dir is None:
        return tokenize_splits(dialogs, tokenizer, max_length, loss_on)
    import shutil

    from .modeling import is_main_process

    folder = Path(cache_dir) / "tokenized" / tokenization_key(dialogs, tokenizer, max_length, loss_on)
    with quiet_datasets():
        if (folder / "dataset_dict.json").is_file():
            try:
                return datasets.load_from_disk(str(folder))
            except Exception:  # a damaged cache is rebuilt, never trusted
                shutil.rmtree(folder, ignore_errors=True)
        rows = tokenize_splits(dialogs, tokenizer, max_length, loss_on)
        if is_main_process():
            partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
            try:
                rows.save_to_disk(str(partial))
                partial.replace(folder)
            except OSError:
                shutil.rmtree(partial, ignore_errors=True)
            rows = datasets.load_from_disk(str(folder)) if folder.is_dir() else rows
    return rows


class quiet_datasets:
    """Hide datasets' progress bars for quick internal steps (saving a cache), restoring the setting after."""

    def __enter__(self) -> None:
        from datasets.utils import logging as datasets_logging

        self.was_enabled = datasets_logging.is_progress_bar_enabled()
        datasets_logging.disable_progress_bar()

    def __exit__(self, *exc: Any) -> None:
        from datasets.utils import logging as datasets_logging

        if self.was_enabled:
            datasets_logging.enable_progress_bar()
