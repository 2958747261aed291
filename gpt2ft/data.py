"""Conversations, ready to train on: read each record, clean, split, de-duplicate, tokenise, batch.

    python -m gpt2ft prepare --data SRC     # these stages alone (sources.py reads SRC), cached for train
    python -m gpt2ft train --data SRC ...   # runs them before training

`prepare_dialogs` turns any source (sources.load_source) into train/validation/test dialogues with columns dialog
(turns), roles and key; `tokenize_prepared` turns them into training rows (input_ids, labels) in the chat template's
format; `DialogueCollator` batches rows, packed or padded.

Expected DailyDialog counts (measured on the release with `prepare_dialogs`; GPT-2 tokens in the format used here):
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

import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import datasets
from datasets import Dataset, DatasetDict

from .sources import SPLITS, DataError

IGNORE_INDEX = -100
NORMALIZE_VERSION = 1  # bump when reading, cleaning or keying records changes, so old caches are not reused

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


def normalise_dialog(turns: Sequence[str], roles: Sequence[str] = ()) -> str:
    """The text used to find duplicates: cleaned, lower-cased, whitespace collapsed, turns joined by newlines (each
    after its role, when the data has roles)."""
    texts = (" ".join(clean_turn(turn).lower().split()) for turn in turns)
    return "\n".join(f"{role}: {text}" if role else text for role, text in zip(list(roles) + [""] * len(turns), texts))


def dialog_key(turns: Sequence[str], roles: Sequence[str] = ()) -> str:
    """A short fixed-size key of `normalise_dialog`: equal keys are duplicates (80 bits: no collision in 10**9)."""
    return hashlib.blake2b(normalise_dialog(turns, roles).encode(), digest_size=10).hexdigest()


def key_share(key: str) -> float:
    """Where a dialogue's key falls in [0, 1): the same on every machine and run, so held-out splits made from it
    are too, and a dialogue and its duplicates always land in the same split."""
    return int(key[:12], 16) / 16**12


def resolve_loss_on(loss_on: str, has_roles: bool) -> str:
    """`auto` -> "assistant" for data with roles, "all" for plain turns (DailyDialog).

    Raises:
        DataError: "assistant" on data without roles.
    """
    if loss_on == "auto":
        return "assistant" if has_roles else "all"
    if loss_on == "assistant" and not has_roles:
        raise DataError("--loss-on assistant: the data has no roles (plain turns); use --loss-on all or responses")
    return loss_on


def turn_targets(roles: Sequence[str], loss_on: str) -> list[bool]:
    """Which turns are training targets. System messages never are (context only); "all": every other turn;
    "responses": all but the first non-system turn; "assistant": assistant turns only."""
    if loss_on == "assistant":
        return [role == "assistant" for role in roles]
    first = next((index for index, role in enumerate(roles) if role != "system"), None)
    return [role != "system" and not (loss_on == "responses" and index == first) for index, role in enumerate(roles)]


def normalize_batch(
    batch: dict[str, list], indices: list[int], layout: Any, origin: str, clean: bool, loss_on: str
) -> dict[str, list]:
    """Records of any layout -> dialog (turns), roles, key, and why a record is skipped ("" when kept).

    Raises:
        DataError: a malformed record, named by file and line (or record index).
    """
    from .sources import locate, read_record

    out: dict[str, list] = {"dialog": [], "roles": [], "key": [], "skip": []}
    records = [dict(zip(batch, values)) for values in zip(*batch.values())]
    for index, record in zip(indices, records):
        try:
            turns, roles = read_record(record, layout, "")
        except DataError as error:
            raise DataError(f"{locate(origin, index)}{error}") from None
        if clean:
            turns = [clean_turn(turn) for turn in turns]
        skip = ""
        if sum(role != "system" for role in roles) < 2:
            skip = "fewer than two turns"
        elif loss_on == "assistant" and "assistant" not in roles:
            skip = "no assistant turn"
        out["dialog"].append(turns)
        out["roles"].append(roles)
        out["key"].append(dialog_key(turns, roles))
        out["skip"].append(skip)
    return out


@dataclass
class PreparedDialogs:
    """Dialogues ready to tokenise (columns dialog, roles, key), with what was done to them."""

    dialogs: DatasetDict
    counts: dict[str, dict[str, int]]
    skipped: list[str]
    source: str
    has_roles: bool = False
    loss_on: str = "all"
    is_dailydialog: bool = True
    identity: str = ""  # changes whenever the prepared dialogues may differ (keys the tokenised cache)
    unlimited_identity: str = ""  # the same without --max-*-dialogs: a cache of all the data serves any limit
    limits: dict[str, int | None] = field(default_factory=dict)


def column(dataset: Dataset, name: str) -> list:
    """A whole column as a Python list, read column-wise (datasets >= 5 returns a lazy Column that iterating reads
    row by row: a hundred times slower on a million rows)."""
    return dataset[name][:]


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]


def parallel_workers(rows: int) -> int | None:
    """Worker processes for a datasets map: none for small data (starting them costs more than they save)."""
    return min(os.cpu_count() or 1, 8) if rows >= 20_000 else None


def prepare_dialogs(
    source: str,
    cache_dir: str | Path = "data",
    clean_text: bool | None = None,
    keep_overlap: bool = False,
    max_train_dialogs: int | None = None,
    max_eval_dialogs: int | None = None,
    loss_on: str = "auto",
    dialog_column: str | None = None,
    validation_fraction: float = 0.05,
    test_fraction: float = 0.05,
) -> PreparedDialogs:
    """Load a source, read each record's conversation, clean, split, de-duplicate and (for debugging) truncate.

    - Records become turns and roles (sources.read_record); a malformed one is an error naming its file and line.
      Conversations with fewer than two turns (system messages not counted), or with no assistant turn under
      `--loss-on assistant`, are skipped, counted and reported.
    - Text cleaning (CLEANING_RULES) applies to DailyDialog unless `clean_text` is False, to other sources only
      when it is True.
    - Splits: the source's own validation/test when it has them; otherwise held out from train by each
      dialogue's key (`key_share`): `test_fraction` for test, `validation_fraction` for validation.
    - Duplicates inside train and validation/test dialogues that also occur in train are removed (`keep_overlap`
      keeps the splits as they are).
    - `max_eval_dialogs` limits validation and test alike; limits apply after de-duplication.

    Raises:
        DataError: the source cannot be read, or a record is malformed.
    """
    from .sources import load_source, locate, quiet_datasets

    raw = load_source(source, cache_dir, dialog_column)
    clean = raw.is_dailydialog if clean_text is None else clean_text
    loss_on = resolve_loss_on(loss_on, raw.layout.has_roles)
    identity = fingerprint(raw.identity, raw.layout, clean, loss_on, NORMALIZE_VERSION)
    normalized, skipped, skipped_count = {}, list(raw.skipped), {split: 0 for split in SPLITS}
    with quiet_datasets():
        for split, dataset in raw.splits.items():
            rows = dataset.map(
                normalize_batch, batched=True, with_indices=True, remove_columns=dataset.column_names,
                fn_kwargs={"layout": raw.layout, "origin": raw.origins[split], "clean": clean, "loss_on": loss_on},
                num_proc=parallel_workers(len(dataset)), new_fingerprint=fingerprint(identity, split, "normalize"),
                desc=f"reading {split}",
            )
            reasons = column(rows, "skip")
            for reason in sorted(set(reasons) - {""}):
                first = reasons.index(reason)
                skipped.append(
                    f"{split}: {reasons.count(reason):,} conversation(s) with {reason} skipped (first: {locate(raw.origins[split], first)})"
                )
            skipped_count[split] = sum(1 for reason in reasons if reason)
            rows = rows.remove_columns("skip")
            normalized[split] = rows.select([i for i, reason in enumerate(reasons) if not reason]) if skipped_count[split] else rows
        held_out = hold_out_splits(normalized, validation_fraction, test_fraction)
        kept = held_out if keep_overlap else remove_overlap(held_out)
    # "release": what the source holds for a split (validation/test held out from train: what was moved there).
    release = {split: len(raw.splits[split]) if split in raw.splits else len(held_out[split]) for split in SPLITS}
    release["train"] -= sum(len(held_out[split]) for split in SPLITS if split not in raw.splits)
    limits = {"train": max_train_dialogs, "validation": max_eval_dialogs, "test": max_eval_dialogs}
    dialogs, counts = {}, {}
    for split in SPLITS:
        limit = limits[split]
        dialogs[split] = kept[split].select(range(limit)) if limit is not None and limit < len(kept[split]) else kept[split]
        counts[split] = {
            "release": release[split],
            **({"skipped": skipped_count[split]} if skipped_count[split] else {}),
            "removed": len(held_out[split]) - len(kept[split]),
            "kept": len(kept[split]),
            "used": len(dialogs[split]),
        }
        if not len(dialogs[split]):
            raise DataError(f"{raw.source}: the {split} split has no conversations left (after skipping and de-duplication)")
    unlimited = fingerprint(identity, keep_overlap, validation_fraction, test_fraction)
    cut = {split: limit for split, limit in limits.items() if limit is not None and limit < len(kept[split])}
    return PreparedDialogs(
        dialogs=DatasetDict(dialogs), counts=counts, skipped=skipped, source=raw.source, has_roles=raw.layout.has_roles,
        loss_on=loss_on, is_dailydialog=raw.is_dailydialog, identity=fingerprint(unlimited, sorted(cut.items())) if cut else unlimited,
        unlimited_identity=unlimited, limits=cut,
    )


def hold_out_splits(splits: dict[str, Dataset], validation_fraction: float, test_fraction: float) -> dict[str, Dataset]:
    """Validation and test for a source without them: the train dialogues whose key share (`key_share`) falls in
    [0, test_fraction) go to test and in [test_fraction, test_fraction + validation_fraction) to validation."""
    missing = [split for split in ("test", "validation") if split not in splits]
    if not missing:
        return splits
    shares = [key_share(key) for key in column(splits["train"], "key")]
    bounds = {"test": (0.0, test_fraction), "validation": (test_fraction, test_fraction + validation_fraction)}
    held: dict[str, list[int]] = {split: [] for split in missing}
    train: list[int] = []
    for index, share in enumerate(shares):
        target = next((split for split in missing if bounds[split][0] <= share < bounds[split][1]), None)
        (held[target] if target else train).append(index)
    result = dict(splits)
    result["train"] = splits["train"].select(train)
    for split in missing:
        result[split] = splits["train"].select(held[split])
    return result


def remove_overlap(splits: dict[str, Dataset]) -> dict[str, Dataset]:
    """Drop exact duplicates within train and every validation/test dialogue that also occurs in train (equal
    `dialog_key`).

    Measured on DailyDialog: 11,118 train dialogues hold 10,515 distinct ones, and 77 validation and 106 test
    dialogues occur verbatim in train (Wen et al. 2022). Training on the evaluation data would make the reported
    perplexity dishonest.
    """
    seen: set[str] = set()
    keep_train = []
    for index, key in enumerate(column(splits["train"], "key")):
        if key not in seen:
            seen.add(key)
            keep_train.append(index)
    kept = {"train": splits["train"].select(keep_train) if len(keep_train) < len(splits["train"]) else splits["train"]}
    for split in ("validation", "test"):
        keep = [index for index, key in enumerate(column(splits[split], "key")) if key not in seen]
        kept[split] = splits[split].select(keep) if len(keep) < len(splits[split]) else splits[split]
    return kept


# --------------------------------------------------------------------------------------------------------------
# Format and tokenise
# --------------------------------------------------------------------------------------------------------------


def window_dialog(
    turn_ids: Sequence[Sequence[int]], eos_id: int, max_length: int, targets: Sequence[bool]
) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels of one dialogue, split into windows of at most `max_length` tokens at turn boundaries.

    The ids are the chat template's (chat_format.CHAT_TEMPLATE): EOS, then each turn followed by EOS. Each window
    starts with EOS; windows after the first repeat the most recent earlier turns that fit in half the window as
    context (labels -100), so every target token is predicted exactly once and always with context. A single turn
    longer than the window is cut into pieces so nothing is dropped.

    Args:
        turn_ids: token ids of each turn, without EOS.
        eos_id: GPT-2's `<|endoftext|>` id.
        max_length: most tokens in one window.
        targets: per turn, whether its tokens and closing EOS are training targets (`turn_targets`).

    Returns:
        A list of (input_ids, labels) pairs.
    """
    piece_limit = max(1, max_length // 2 - 1)
    pieces: list[list[int]] = []
    is_target: list[bool] = []
    for ids, target in zip(turn_ids, targets):
        piece = list(ids) + [eos_id]
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


ROW_FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "length": datasets.Value("int32"),
        "n_targets": datasets.Value("int32"),
        "dialog_index": datasets.Value("int64"),
    }
)


def tokenize_batch(batch: dict[str, list], indices: list[int], tokenizer: Any, max_length: int, loss_on: str) -> dict[str, list]:
    """Training rows (one a window) of a batch of dialogues: the turns in one call of the fast tokenizer."""
    eos_id = tokenizer.eos_token_id
    all_turns = [turn for turns in batch["dialog"] for turn in turns]
    encoded = tokenizer(all_turns, add_special_tokens=False)["input_ids"] if all_turns else []
    roles_column = batch.get("roles") or [[""] * len(turns) for turns in batch["dialog"]]
    rows: dict[str, list] = {name: [] for name in ROW_FEATURES}
    position = 0
    for index, turns, roles in zip(indices, batch["dialog"], roles_column):
        turn_ids = encoded[position : position + len(turns)]
        position += len(turns)
        for input_ids, labels in window_dialog(turn_ids, eos_id, max_length, turn_targets(roles, loss_on)):
            rows["input_ids"].append(input_ids)
            rows["labels"].append(labels)
            rows["length"].append(len(input_ids))
            rows["n_targets"].append(sum(label != IGNORE_INDEX for label in labels))
            rows["dialog_index"].append(index)
    return rows


def tokenizer_hash(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return fingerprint(backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items()), tokenizer.eos_token_id)


def tokenize_dialogs(
    dialogs: Dataset, tokenizer: Any, max_length: int, loss_on: str = "all", key: str | None = None, cache_file: str | Path | None = None
) -> Dataset:
    """Tokenise dialogues into training rows (one per window), in the chat template's format, with a batched
    `Dataset.map` (several processes for large data).

    Args:
        dialogs: columns dialog (list of turns) and, optionally, roles.
        loss_on: "all", "responses" or "assistant" (see turn_targets).
        key: a fingerprint of the dialogues (PreparedDialogs.identity), naming the result for datasets' cache.
        cache_file: write the rows to this Arrow file (one per worker process: `<stem>_00000_of_00002.arrow`, ...).

    Returns:
        Dataset with input_ids, labels (-100 where no loss), length (tokens), n_targets (tokens with a label) and
        dialog_index (the source dialogue).
    """
    from .sources import quiet_datasets

    with quiet_datasets():
        return dialogs.map(
            tokenize_batch, batched=True, with_indices=True, remove_columns=dialogs.column_names, features=ROW_FEATURES,
            fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "loss_on": loss_on},
            num_proc=parallel_workers(len(dialogs)), cache_file_name=str(cache_file) if cache_file else None,
            load_from_cache_file=cache_file is None,
            new_fingerprint=fingerprint(key, tokenizer_hash(tokenizer), max_length, loss_on, TOKENIZED_FORMAT_VERSION) if key else None,
            desc="tokenising",
        )


def tokenize_splits(dialogs: DatasetDict, tokenizer: Any, max_length: int, loss_on: str = "all", key: str | None = None) -> DatasetDict:
    """`tokenize_dialogs` of every split, without a cache folder."""
    return DatasetDict({split: tokenize_dialogs(dialogs[split], tokenizer, max_length, loss_on, key and fingerprint(key, split)) for split in dialogs})


def token_stats(rows: Dataset) -> dict[str, float]:
    """Sizes of a tokenised split: rows, tokens, target tokens, mean and max row length."""
    lengths = column(rows, "length")
    return {
        "rows": len(rows),
        "tokens": int(sum(lengths)),
        "target_tokens": int(sum(column(rows, "n_targets"))),
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


TOKENIZED_FORMAT_VERSION = 2  # bump when the format or labels change, so old caches are not reused


def tokenize_prepared(
    prepared: PreparedDialogs, tokenizer: Any, max_length: int, cache_dir: str | Path | None = "data", write: bool = True
) -> DatasetDict:
    """`tokenize_splits` of prepared dialogues, cached under `<cache_dir>/tokenized/<key>/` (Arrow files, memory-mapped
    when read back, no pickle), so a re-run and `train` after `prepare` skip it.

    The key covers the prepared dialogues (their identity: source, settings), the tokenizer, `max_length`, the loss
    mode and the format version. The map writes its Arrow files straight into the folder (no second copy); a
    `complete` marker, written last, says they are all there. A cache of all the data (from `prepare`) also serves a
    run with --max-*-dialogs.

    Args:
        write: whether this process builds the cache (under torchrun the main one does while the others wait:
            training.tokenize_data).
    """
    import shutil

    from .sources import quiet_datasets

    def key_of(identity: str) -> str:
        return fingerprint(identity, tokenizer_hash(tokenizer), max_length, prepared.loss_on, TOKENIZED_FORMAT_VERSION)

    key = key_of(prepared.identity)
    if cache_dir is None:
        return tokenize_splits(prepared.dialogs, tokenizer, max_length, prepared.loss_on, key)
    folder = Path(cache_dir) / "tokenized" / key
    unlimited = Path(cache_dir) / "tokenized" / key_of(prepared.unlimited_identity)
    with quiet_datasets():
        for found in (folder, unlimited):
            if (found / "complete").is_file():
                try:
                    rows = DatasetDict({split: read_rows(found, split) for split in prepared.dialogs})
                except Exception:  # a damaged cache is rebuilt, never trusted
                    shutil.rmtree(found, ignore_errors=True)
                    continue
                # All the data is cached (`prepare` without limits): the first N dialogues' rows come first.
                return limit_rows(rows, prepared.limits) if found == unlimited and found != folder else rows
        if not write:
            return tokenize_splits(prepared.dialogs, tokenizer, max_length, prepared.loss_on, key)
        shutil.rmtree(folder, ignore_errors=True)  # what a crashed build left (its shards could mix with these)
        folder.mkdir(parents=True)
        rows = DatasetDict(
            {
                split: tokenize_dialogs(dialogs, tokenizer, max_length, prepared.loss_on, fingerprint(key, split), folder / f"{split}.arrow")
                for split, dialogs in prepared.dialogs.items()
            }
        )
        (folder / "complete").write_text(key + "\n", encoding="utf-8")
    return rows


def limit_rows(rows: DatasetDict, limits: dict[str, int]) -> DatasetDict:
    """The rows of the first `limits[split]` dialogues of each split (rows are in dialogue order)."""
    import bisect

    limited = DatasetDict(rows)
    for split, limit in limits.items():
        limited[split] = rows[split].select(range(bisect.bisect_left(column(rows[split], "dialog_index"), limit)))
    return limited


def read_rows(folder: Path, split: str) -> Dataset:
    """A tokenised split from its Arrow file(s), memory-mapped (a map on several processes writes one per process)."""
    files = sorted(folder.glob(f"{split}.arrow")) or sorted(folder.glob(f"{split}_*_of_*.arrow"))
    if not files:
        raise FileNotFoundError(f"{folder}: no rows for {split}")
    parts = [Dataset.from_file(str(path)) for path in files]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
