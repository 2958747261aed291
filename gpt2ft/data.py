"""Conversations, ready to train on: read each record, clean, split, de-duplicate, tokenise, batch.

    python -m gpt2ft prepare --data SRC     # these stages alone (sources.py reads SRC), cached for train
    python -m gpt2ft train --data SRC ...   # runs them before training

`prepare_dialogs` turns any source (sources.load_source) into train/validation/test dialogues, one
conversations.Conversation a row (DIALOG_FEATURES: messages with role, content and DailyDialog's emotion and act,
id, source, and the de-duplication key); `tokenize_prepared` turns them into training rows (input_ids, labels) in
the chat template's format; `DialogueCollator` batches rows, packed or padded. The labels ride along unused: what is
trained is the turns and roles alone.

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

import bisect
import functools
import hashlib
import math
import os
import random
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from datasets import Dataset, DatasetDict

from .chat_format import (
    RenderedConversation,
    as_messages,
    end_of_turn,
    find_spans,
    render_text,
    split_into_turns,
    template_of,
)
from .controls import LABEL_DROPOUT, controls_of, labelled_messages
from .conversations import TURN_FIELDS, Conversation, messages_from_turns, read_conversation, roles_of
from .sources import SPLITS, DataError, load_source, locate, quiet_datasets

IGNORE_INDEX = -100
NORMALIZE_VERSION = 2  # bump when reading, cleaning or keying records changes, so old caches are not reused

# A prepared split: one Conversation a row (Conversation.as_row), with its de-duplication key. A turn without a
# label (any source but DailyDialog) has null emotion and act.
MESSAGE_FEATURES = {
    "role": datasets.Value("string"),
    "content": datasets.Value("string"),
    **{name: datasets.Value("string") for name in TURN_FIELDS},
}
DIALOG_FEATURES = datasets.Features(
    {
        "messages": datasets.List(MESSAGE_FEATURES),
        "id": datasets.Value("string"),
        "source": datasets.Value("string"),
        "key": datasets.Value("string"),
    }
)

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


def normalize_dialog(turns: Sequence[str], roles: Sequence[str] = ()) -> str:
    """The text used to find duplicates: cleaned, lower-cased, whitespace collapsed, turns joined by newlines (each
    after its role, when the data has roles)."""
    texts = (" ".join(clean_turn(turn).lower().split()) for turn in turns)
    return "\n".join(f"{role}: {text}" if role else text for role, text in zip(list(roles) + [""] * len(turns), texts))


def dialog_key(turns: Sequence[str], roles: Sequence[str] = ()) -> str:
    """A short fixed-size key of `normalize_dialog`: equal keys are duplicates (80 bits: no collision in 10**9).
    Only the turns and roles count: labels never make two conversations different."""
    return hashlib.blake2b(normalize_dialog(turns, roles).encode(), digest_size=10).hexdigest()


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
    batch: dict[str, list],
    indices: list[int],
    layout: Any,
    origin: str,
    clean: bool,
    loss_on: str,
    split: str,
    source: str,
) -> dict[str, list]:
    """Records of any layout -> prepared rows (DIALOG_FEATURES), and why a record is skipped ("" when kept).

    A record without an `id` of its own gets `<split>-<index>` (its place in the source's split).

    Raises:
        DataError: a malformed record, named by file and line (or record index).
    """
    out: dict[str, list] = {name: [] for name in (*DIALOG_FEATURES, "skip")}
    records = [dict(zip(batch, values)) for values in zip(*batch.values())]
    for index, record in zip(indices, records):
        try:
            conversation = read_conversation(record, layout, "", f"{split}-{index}", source)
        except DataError as error:
            raise DataError(f"{locate(origin, index)}{error}") from None
        if clean:
            for message in conversation.messages:
                message["content"] = clean_turn(message["content"])
        turns, roles = conversation.turns, conversation.roles
        skip = ""
        if sum(role != "system" for role in roles) < 2:
            skip = "fewer than two turns"
        elif loss_on == "assistant" and "assistant" not in roles:
            skip = "no assistant turn"
        for name, value in conversation.as_row().items():
            out[name].append(value)
        out["key"].append(dialog_key(turns, roles))
        out["skip"].append(skip)
    return out


def dialogs_dataset(conversations: Sequence[Conversation | Sequence[str] | Sequence[dict[str, str]]]) -> Dataset:
    """Conversations (or lists of messages, or plain lists of turns without roles) as a prepared split, as
    `prepare_dialogs` makes them: for tokenising, sampling or scoring dialogues that come from elsewhere (tests,
    benchmarks)."""
    rows: dict[str, list] = {name: [] for name in DIALOG_FEATURES}
    for index, item in enumerate(conversations):
        if isinstance(item, Conversation):
            conversation = item
        elif item and isinstance(item[0], dict):
            conversation = Conversation([dict(message) for message in item])
        else:
            conversation = Conversation(messages_from_turns(list(item)))
        for name, value in conversation.as_row().items():
            rows[name].append(value)
        rows["id"][-1] = conversation.id or str(index)
        rows["key"].append(dialog_key(conversation.turns, conversation.roles))
    return Dataset.from_dict(rows, features=DIALOG_FEATURES)


@dataclass
class PreparedDialogs:
    """Dialogues ready to tokenise (DIALOG_FEATURES: messages, id, source, key), with what was done to them."""

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

    - Records become Conversations (conversations.read_conversation): messages with roles ("" for plain turns)
      and, for DailyDialog, each turn's emotion and act by name; a malformed one is an error naming its file and
      line.
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
    raw = load_source(source, cache_dir, dialog_column)
    clean = raw.is_dailydialog if clean_text is None else clean_text
    loss_on = resolve_loss_on(loss_on, raw.layout.has_roles)
    identity = fingerprint(raw.identity, raw.layout, clean, loss_on, NORMALIZE_VERSION)
    normalized, skipped, skipped_count = {}, list(raw.skipped), {split: 0 for split in SPLITS}
    with quiet_datasets():
        for split, dataset in raw.splits.items():
            rows = dataset.map(
                normalize_batch,
                batched=True,
                with_indices=True,
                remove_columns=dataset.column_names,
                features=datasets.Features({**DIALOG_FEATURES, "skip": datasets.Value("string")}),
                fn_kwargs={
                    "layout": raw.layout,
                    "origin": raw.origins[split],
                    "clean": clean,
                    "loss_on": loss_on,
                    "split": split,
                    "source": raw.source,
                },
                num_proc=parallel_workers(len(dataset)),
                new_fingerprint=fingerprint(identity, split, "normalize"),
                desc=f"reading {split}",
            )
            reasons = column(rows, "skip")
            for reason in sorted(set(reasons) - {""}):
                first = reasons.index(reason)
                skipped.append(
                    f"{split}: {reasons.count(reason):,} conversation(s) with {reason} skipped "
                    f"(first: {locate(raw.origins[split], first)})"
                )
            skipped_count[split] = sum(1 for reason in reasons if reason)
            rows = rows.remove_columns("skip")
            normalized[split] = (
                rows.select([i for i, reason in enumerate(reasons) if not reason]) if skipped_count[split] else rows
            )
        held_out = hold_out_splits(normalized, validation_fraction, test_fraction)
        kept = held_out if keep_overlap else remove_overlap(held_out)
    # "release": what the source holds for a split (validation/test held out from train: what was moved there).
    release = {split: len(raw.splits[split]) if split in raw.splits else len(held_out[split]) for split in SPLITS}
    release["train"] -= sum(len(held_out[split]) for split in SPLITS if split not in raw.splits)
    limits = {"train": max_train_dialogs, "validation": max_eval_dialogs, "test": max_eval_dialogs}
    dialogs, counts = {}, {}
    for split in SPLITS:
        limit = limits[split]
        dialogs[split] = (
            kept[split].select(range(limit)) if limit is not None and limit < len(kept[split]) else kept[split]
        )
        counts[split] = {
            "release": release[split],
            **({"skipped": skipped_count[split]} if skipped_count[split] else {}),
            "removed": len(held_out[split]) - len(kept[split]),
            "kept": len(kept[split]),
            "used": len(dialogs[split]),
        }
        if not len(dialogs[split]):
            raise DataError(
                f"{raw.source}: the {split} split has no conversations left (after skipping and de-duplication)"
            )
    unlimited = fingerprint(identity, keep_overlap, validation_fraction, test_fraction)
    cut = {split: limit for split, limit in limits.items() if limit is not None and limit < len(kept[split])}
    return PreparedDialogs(
        dialogs=DatasetDict(dialogs),
        counts=counts,
        skipped=skipped,
        source=raw.source,
        has_roles=raw.layout.has_roles,
        loss_on=loss_on,
        is_dailydialog=raw.is_dailydialog,
        identity=fingerprint(unlimited, sorted(cut.items())) if cut else unlimited,
        unlimited_identity=unlimited,
        limits=cut,
    )


def prepare_from_config(config: Any) -> PreparedDialogs:
    """prepare_dialogs with a run's data settings (a TrainConfig: train's, `prepare`'s, or the one a saved model
    records, which eval, compare and prefer read)."""
    return prepare_dialogs(
        source=config.data,
        cache_dir=config.cache_dir,
        clean_text=config.clean_text,
        keep_overlap=config.keep_overlap,
        max_train_dialogs=config.max_train_dialogs,
        max_eval_dialogs=config.max_eval_dialogs,
        loss_on=config.loss_on,
        dialog_column=config.dialog_column,
        validation_fraction=config.validation_fraction,
        test_fraction=config.test_fraction,
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
    conversation: RenderedConversation, max_length: int, targets: Sequence[bool]
) -> list[tuple[list[int], list[int], int]]:
    """Token ids and labels of one dialogue, split into windows of at most `max_length` tokens at turn boundaries.

    The tokens are the chat template's (chat_format.render_conversation): the head (gpt2ft's leading EOS, a
    template's default system message), then each turn: its header, content and end-of-turn token. Each window starts
    with the head; windows after the first repeat the most recent earlier turns that fit in half the window as
    context (labels -100), so every target token is predicted exactly once and always with context. A single turn
    longer than the window is cut into pieces so nothing is dropped.

    Args:
        conversation: the head and turns of tokens.
        max_length: most tokens in one window.
        targets: per turn, whether its content and end-of-turn token are training targets (`turn_targets`).

    Returns:
        A list of (input_ids, labels, target content bytes) triples.
    """
    head = list(conversation.head)
    room = max_length - len(head)
    piece_limit = max(1, room // 2)
    pieces: list[tuple[list[int], list[int], list[int]]] = []  # ids, labels, content bytes of the labelled tokens
    for turn, target in zip(conversation.turns, targets):
        labels = [i if target and t else IGNORE_INDEX for i, t in zip(turn.ids, turn.trainable)]
        counted = [b if target and t else 0 for b, t in zip(turn.content_bytes, turn.trainable)]
        if len(turn.ids) > room:  # a turn longer than the window: cut it so it fits with some context
            for start in range(0, len(turn.ids), piece_limit):
                part = slice(start, start + piece_limit)
                pieces.append((turn.ids[part], labels[part], counted[part]))
        else:
            pieces.append((turn.ids, labels, counted))

    windows = []
    first = 0
    while first < len(pieces):
        context: list[int] = []
        for previous in range(first - 1, -1, -1):
            if len(head) + len(pieces[previous][0]) + len(context) > max_length // 2:
                break
            context = pieces[previous][0] + context
        if len(head) + len(context) + len(pieces[first][0]) > max_length:  # a long turn takes the whole window
            context = []
        input_ids = head + context
        labels = [IGNORE_INDEX] * len(input_ids)
        target_bytes = 0
        end = first
        while end < len(pieces) and len(input_ids) + len(pieces[end][0]) <= max_length:
            input_ids += pieces[end][0]
            labels += pieces[end][1]
            target_bytes += sum(pieces[end][2])
            end += 1
        windows.append((input_ids, labels, target_bytes))
        first = end
    return windows


ROW_FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "length": datasets.Value("int32"),
        "n_targets": datasets.Value("int32"),
        "target_bytes": datasets.Value("int64"),  # UTF-8 bytes of the target turns' text (bits per byte)
        "dialog_index": datasets.Value("int64"),
    }
)


def tokenize_batch(
    batch: dict[str, list], indices: list[int], tokenizer: Any, max_length: int, loss_on: str, labels: str = "all"
) -> dict[str, list]:
    """Training rows (one a window) of a batch of dialogues: each rendered by the chat template, all of them
    tokenised in one call of the fast tokenizer, then cut into turns by their character offsets.

    A template that takes controls (controls.conditioned_template) gets each turn's labels: "all" of them (held-out
    rows), all but the turns controls.dropped picks ("dropout": training rows), or "none" (a model asked for
    nothing)."""
    end_token = end_of_turn(tokenizer)
    fields = controls_of(template_of(tokenizer)) if labels != "none" else ()
    if fields:
        keys = batch["key"] if labels == "dropout" else [None] * len(batch["messages"])
        conversations = [labelled_messages(m, fields, key) for m, key in zip(batch["messages"], keys)]
    else:
        conversations = [as_messages(messages) for messages in batch["messages"]]
    texts = [render_text(tokenizer, messages) for messages in conversations]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True) if texts else None
    rows: dict[str, list] = {name: [] for name in ROW_FEATURES}
    for number, (index, messages, text) in enumerate(zip(indices, conversations, texts)):
        spans = find_spans(text, messages, end_token)
        rendered = split_into_turns(text, spans, encoded["input_ids"][number], encoded["offset_mapping"][number])
        targets = turn_targets(roles_of(batch["messages"][number]), loss_on)
        for input_ids, labels, target_bytes in window_dialog(rendered, max_length, targets):
            rows["input_ids"].append(input_ids)
            rows["labels"].append(labels)
            rows["length"].append(len(input_ids))
            rows["n_targets"].append(sum(label != IGNORE_INDEX for label in labels))
            rows["target_bytes"].append(target_bytes)
            rows["dialog_index"].append(index)
    return rows


def tokenizer_hash(tokenizer: Any) -> str:
    """A key of what decides the rows: the vocabulary and merges, EOS, and the chat template rows are rendered in."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return fingerprint(vocabulary, tokenizer.eos_token_id, template_of(tokenizer))


def tokenize_dialogs(
    dialogs: Dataset,
    tokenizer: Any,
    max_length: int,
    loss_on: str = "all",
    key: str | None = None,
    cache_file: str | Path | None = None,
    labels: str = "all",
) -> Dataset:
    """Tokenise dialogues into training rows (one per window), in the chat template's format, with a batched
    `Dataset.map` (several processes for large data).

    Args:
        dialogs: a prepared split (DIALOG_FEATURES; `dialogs_dataset` makes one from plain turns).
        loss_on: "all", "responses" or "assistant" (see turn_targets).
        key: a fingerprint of the dialogues (PreparedDialogs.identity), naming the result for datasets' cache.
        cache_file: write the rows to this Arrow file (one per worker process: `<stem>_00000_of_00002.arrow`, ...).
        labels: with a template that takes controls, which labels the turns carry (see tokenize_batch).

    Returns:
        Dataset with input_ids, labels (-100 where no loss), length (tokens), n_targets (tokens with a label) and
        dialog_index (the source dialogue).
    """
    with quiet_datasets():
        return dialogs.map(
            tokenize_batch,
            batched=True,
            with_indices=True,
            remove_columns=dialogs.column_names,
            features=ROW_FEATURES,
            fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "loss_on": loss_on, "labels": labels},
            num_proc=parallel_workers(len(dialogs)),
            cache_file_name=str(cache_file) if cache_file else None,
            load_from_cache_file=cache_file is None,
            new_fingerprint=fingerprint(
                key, tokenizer_hash(tokenizer), max_length, loss_on, labels, LABEL_DROPOUT, TOKENIZED_FORMAT_VERSION
            )
            if key
            else None,
            desc="tokenising",
        )


def tokenize_splits(
    dialogs: DatasetDict, tokenizer: Any, max_length: int, loss_on: str = "all", key: str | None = None
) -> DatasetDict:
    """`tokenize_dialogs` of every split, without a cache folder (training rows with the label dropout)."""
    return DatasetDict(
        {
            split: tokenize_dialogs(
                dialogs[split], tokenizer, max_length, loss_on, key and fingerprint(key, split), labels=labels_of(split)
            )
            for split in dialogs
        }
    )


def labels_of(split: str) -> str:
    """Which labels a split's rows carry under a template that takes controls: the training rows drop some
    (controls.LABEL_DROPOUT), the held-out ones keep all, as the true labels of what they score."""
    return "dropout" if split == "train" else "all"


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


# --------------------------------------------------------------------------------------------------------------
# Batching: a few fixed shapes, packed rows, no host reads on the model's side
# --------------------------------------------------------------------------------------------------------------

# Packed rows are ROW_TOKENS wide: SDPA with a mask computes the whole row-by-row attention matrix, so one
# 2,000-token row would spend most of its attention on masked-out pairs, while 512 keeps that share small and the
# matrix multiplications large. A window longer than a row gets a row twice (four times, ...) as wide.
ROW_TOKENS = 512
# `--batching pad` widths: each dialogue is padded to the next of these (multiples of 64 for the tensor cores), so
# a split is fed in at most eight widths however its lengths vary.
PAD_WIDTHS = (64, 128, 192, 256, 384, 512, 768, 1024)
# Windows packed together are chosen within chunks of this many (best fit, longest first): rows come out ~98% full
# while packing a million dialogues stays a few seconds of Python.
PACK_CHUNK = 4096


def round_up(value: float, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


@functools.lru_cache(maxsize=16)
def causal_mask(width: int) -> np.ndarray:
    """(width, width) booleans, True where a position may attend: itself and the positions before it."""
    return np.tri(width, dtype=bool)


def doubling_widths(base: int, longest: int) -> list[int]:
    """`base`, twice it, four times it ... up to the first width that holds `longest` tokens."""
    widths = [base]
    while widths[-1] < longest:
        widths.append(widths[-1] * 2)
    return widths


@dataclass(frozen=True)
class BatchShapes:
    """The shapes a split is fed to the model in: a few row widths, and how many rows a batch of each width has.

    Every batch of a width has the same number of rows (the last one is topped up with empty rows), so a whole
    epoch uses len(widths) input shapes: one kernel plan per shape on the GPU, and a handful of graphs under
    torch.compile. With packing, a batch is a token budget: `rows[0]` rows of `widths[0]` slots hold about
    `batch_size` dialogues; a wider row counts as several narrow ones.
    """

    widths: tuple[int, ...]
    rows: tuple[int, ...]

    def width_for(self, tokens: int) -> int:
        """The narrowest width that holds `tokens`."""
        for width in self.widths:
            if width >= tokens:
                return width
        raise ValueError(f"a row of {tokens} tokens is wider than the widest batch shape ({self.widths[-1]})")

    def rows_for(self, width: int) -> int:
        return self.rows[self.widths.index(width)]


def plan_shapes(lengths: Sequence[int], batch_size: int, batching: str, row_tokens: int = ROW_TOKENS) -> BatchShapes:
    """The batch shapes of a split whose windows have `lengths` tokens, `batch_size` dialogues a batch.

    - "pad": one dialogue a row, `batch_size` rows, widths from PAD_WIDTHS up to the longest window.
    - "pack": rows of `row_tokens` (or of the whole budget, when a batch holds fewer tokens than a row), as many as
      `batch_size` dialogues of the split's mean length fill; rows twice, four times ... as wide for longer windows,
      each batch of them holding the same number of slots.
    """
    if not lengths:
        raise ValueError("no rows to batch")
    longest = max(lengths)
    if batching == "pad":
        widths = [width for width in PAD_WIDTHS if width < longest]
        widths.append(next((width for width in PAD_WIDTHS if width >= longest), round_up(longest, 64)))
        return BatchShapes(tuple(widths), (batch_size,) * len(widths))
    budget = batch_size * sum(lengths) / len(lengths)  # tokens in `batch_size` dialogues of the mean length
    base = min(row_tokens, round_up(budget, 64))
    widths = doubling_widths(base, longest)
    base_rows = max(1, round(budget / base))
    return BatchShapes(tuple(widths), tuple(max(1, base_rows * base // width) for width in widths))


def pack_rows(
    lengths: Sequence[int],
    widths: Sequence[int],
    order: Sequence[int] | None = None,
    chunk: int = PACK_CHUNK,
    longest_first: bool = True,
) -> list[list[int]]:
    """Pack windows into rows: best fit, within chunks of `chunk` windows taken in `order`.

    A window goes into the open row with the least room that holds it; when none does, into a new row of the
    narrowest width in `widths` that holds it. No window is ever split or dropped. Longest first packs tightest but
    gives rows of like lengths (the longest dialogues together, the shortest together): right for evaluation, wrong
    for training, where a batch of rows should be a random sample; there windows go in `order` as they come.

    Returns:
        Lists of indices into `lengths`, one list a row.
    """
    order = range(len(lengths)) if order is None else order
    rows: list[list[int]] = []
    for start in range(0, len(order), chunk):
        room: list[tuple[int, int]] = []  # (free slots, row), sorted: bisect finds the best fit
        part = order[start : start + chunk]
        for index in sorted(part, key=lambda i: -lengths[i]) if longest_first else part:
            size = lengths[index]
            at = bisect.bisect_left(room, (size, -1))
            if at < len(room):
                free, row = room.pop(at)
            else:
                free = next((width for width in widths if width >= size), None)
                if free is None:
                    raise ValueError(f"a window of {size} tokens is wider than the widest row ({max(widths)})")
                row = len(rows)
                rows.append([])
            rows[row].append(index)
            if free > size:
                bisect.insort(room, (free - size, row))
    return rows


class DialogueBatchSampler(torch.utils.data.Sampler):
    """Batches of packed rows, all rows of a batch of one width (BatchShapes); each row is a tuple of window indices
    (what PackedRows reads).

    The packing is a layout: which window lengths share a row, fixed for the run, so every epoch has the same rows,
    widths and number of batches (the Trainer knows the step count up front) and the same padding. With `shuffle`,
    each epoch deals the windows of each length out to that length's places in the layout at random, then shuffles
    the rows into batches: dialogues meet different neighbours every epoch, as with unpacked shuffling, instead of
    being trained in the same groups each time. All of it is drawn from (seed, epoch): the same on every process and
    after a resume, which the Trainer reaches by skipping batches.
    """

    def __init__(
        self, rows: list[list[int]], lengths: Sequence[int], shapes: BatchShapes, shuffle: bool = False, seed: int = 0
    ) -> None:
        self.rows, self.shapes, self.shuffle, self.seed, self.epoch = rows, shapes, shuffle, seed, 0
        widths = [shapes.width_for(sum(lengths[i] for i in row)) for row in rows]
        self.by_width = {width: [r for r, w in enumerate(widths) if w == width] for width in shapes.widths}
        # Every place in the layout, ordered by the length of the window it holds, and the runs of equal length in
        # that order (a run of one has nothing to trade with).
        self.places = sorted(
            ((r, p) for r, row in enumerate(rows) for p in range(len(row))),
            key=lambda place: lengths[rows[place[0]][place[1]]],
        )
        place_lengths = [lengths[rows[r][p]] for r, p in self.places]
        starts = [0] + [i for i in range(1, len(place_lengths)) if place_lengths[i] != place_lengths[i - 1]]
        self.runs = [(start, end) for start, end in zip(starts, starts[1:] + [len(place_lengths)]) if end - start > 1]
        # accelerate reaches the epoch of a batch sampler it wraps for several processes (BatchSamplerShard) only
        # through `.batch_sampler.sampler.set_epoch`: this sampler is its own `.sampler`.
        self.sampler = self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def layout(self, rng: random.Random) -> list[list[int]]:
        """This epoch's rows: the windows of each length dealt at random to that length's places."""
        if not self.shuffle:
            return self.rows
        rows = [list(row) for row in self.rows]
        windows = [rows[r][p] for r, p in self.places]
        for start, end in self.runs:
            dealt = windows[start:end]
            rng.shuffle(dealt)
            windows[start:end] = dealt
        for (r, p), window in zip(self.places, windows):
            rows[r][p] = window
        return rows

    def batches(self) -> list[list[tuple[int, ...]]]:
        rng = random.Random(f"{self.seed}:{self.epoch}")
        rows = self.layout(rng)
        batches: list[list[tuple[int, ...]]] = []
        for width, members in self.by_width.items():
            members = list(members)
            if self.shuffle:
                rng.shuffle(members)
            per = self.shapes.rows_for(width)
            batches.extend(
                [tuple(rows[r]) for r in members[start : start + per]] for start in range(0, len(members), per)
            )
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return sum(math.ceil(len(rows) / self.shapes.rows_for(width)) for width, rows in self.by_width.items())


class PackedRows(torch.utils.data.Dataset):
    """The windows of a tokenised split, read a packed row at a time: the item of a row (a tuple of window indices,
    as DialogueBatchSampler yields them) is the list of its windows (input_ids, labels).

    A batch is read with one columnar lookup (`__getitems__`), not one per window; a `datasets.Dataset` stays
    memory-mapped (and pickles by file name to DataLoader workers).
    """

    def __init__(self, windows: Any) -> None:
        self.windows = windows.select_columns(["input_ids", "labels"]) if isinstance(windows, Dataset) else windows
        self.batch_sampler: DialogueBatchSampler | None = None

    def set_epoch(self, epoch: int) -> None:
        """accelerate's last way to an epoch: a resumed run on several processes wraps the batch sampler twice
        (SkipBatchSampler over BatchSamplerShard), and only the dataset is still reachable."""
        if self.batch_sampler is not None:
            self.batch_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, row: tuple[int, ...]) -> list[dict[str, list[int]]]:
        return self.__getitems__([row])[0]

    def __getitems__(self, rows: Sequence[tuple[int, ...]]) -> list[list[dict[str, list[int]]]]:
        flat = [window for row in rows for window in row]
        if isinstance(self.windows, Dataset):
            columns = self.windows[flat]
            read = [
                {"input_ids": ids, "labels": labels} for ids, labels in zip(columns["input_ids"], columns["labels"])
            ]
        else:
            read = [self.windows[window] for window in flat]
        out, at = [], 0
        for row in rows:
            out.append(read[at : at + len(row)])
            at += len(row)
        return out


def window_lengths(rows: Any) -> list[int]:
    if isinstance(rows, Dataset) and "length" in rows.column_names:
        return column(rows, "length")
    return [len(row["input_ids"]) for row in rows]


class DialogueCollator:
    """Turns tokenised windows into model-ready batches, packed or padded, in a few fixed shapes.

    - "pack" (default): several dialogues a row (`pack_rows`); `position_ids` restart at 0 for each dialogue.
    - "pad": one dialogue a row, padded (labels -100; never masked by token id: GPT-2's pad *is* its EOS).

    Every batch carries its attention mask as a 4-D boolean tensor (rows, 1, width, width): causal, and within one
    dialogue only; padding is a segment of its own. It is built here, on the host (in the DataLoader's workers on a
    GPU), because the library's own mask building inspects the batch on the device every step (the packed-sequence
    test in masking_utils, the padding warning in modeling_utils), and each inspection waits for the GPU. A 4-D mask
    is used by transformers as it is.

    `loader()` is how training and evaluation read a split: packed rows, a few shapes (`plan_shapes`), batches in
    seeded order. Called directly on a list of windows, the collator packs (or pads) just those, to a multiple of
    `pad_to_multiple_of`.
    """

    def __init__(
        self, tokenizer: Any, batching: str = "pack", pad_to_multiple_of: int = 8, row_tokens: int = ROW_TOKENS
    ):
        """
        Args:
            tokenizer: supplies the pad id.
            batching: "pack" or "pad".
            pad_to_multiple_of: widths of batches made from a list of windows are rounded up to this.
            row_tokens: width of a packed row.
        """
        if batching not in ("pack", "pad"):
            raise ValueError(f"batching must be 'pack' or 'pad', got {batching!r}")
        self.batching = batching
        self.multiple = pad_to_multiple_of
        self.row_tokens = row_tokens
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def group(
        self, lengths: Sequence[int], widths: Sequence[int], order: Sequence[int] | None = None
    ) -> list[list[int]]:
        """Windows into rows: packed (`pack_rows`; in `order` when one is given, for training), or one a row."""
        if self.batching == "pad":
            return [[index] for index in (range(len(lengths)) if order is None else order)]
        return pack_rows(lengths, widths, order, longest_first=order is None)

    def __call__(self, features: list) -> dict[str, torch.Tensor]:
        """A batch of windows (dicts with input_ids and labels), or of packed rows (lists of such dicts)."""
        if features and isinstance(features[0], dict):
            lengths = [len(f["input_ids"]) for f in features]
            groups = self.group(lengths, doubling_widths(self.row_tokens, max(lengths)))
            features = [[features[i] for i in row] for row in groups]
        return self.collate_rows(features)

    def collate_rows(self, rows: list[list[dict]], shapes: BatchShapes | None = None) -> dict[str, torch.Tensor]:
        """Tensors for rows of windows: the width and row count from `shapes` (the narrowest width that holds the
        fullest row; empty rows added up to its row count), else the fullest row rounded up to the multiple."""
        fullest = max(sum(len(w["input_ids"]) for w in row) for row in rows)
        width = shapes.width_for(fullest) if shapes else round_up(fullest, self.multiple)
        count = max(len(rows), shapes.rows_for(width)) if shapes else len(rows)
        # numpy, not torch: these small host-side operations would otherwise wait on torch's thread pool.
        input_ids = np.full((count, width), self.pad_id, dtype=np.int64)
        labels = np.full((count, width), IGNORE_INDEX, dtype=np.int64)
        positions = np.zeros((count, width), dtype=np.int64)
        segments = np.zeros((count, width), dtype=np.int32)
        for r, row in enumerate(rows):
            at = 0
            for number, window in enumerate(row):
                size = len(window["input_ids"])
                input_ids[r, at : at + size] = window["input_ids"]
                labels[r, at : at + size] = window["labels"]
                positions[r, at : at + size] = np.arange(size)
                segments[r, at : at + size] = number
                at += size
            segments[r, at:] = len(row)  # padding: a segment of its own, attending only within itself
        mask = (segments[:, :, None] == segments[:, None, :]) & causal_mask(width)
        return {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(positions),
            "attention_mask": torch.from_numpy(mask[:, None]),
        }

    def loader(
        self, rows: Any, batch_size: int, shuffle: bool = False, seed: int = 0, **dataloader_options: Any
    ) -> torch.utils.data.DataLoader:
        """A DataLoader over a tokenised split: windows packed into rows (in a seeded random order when `shuffle`,
        so each row holds unrelated dialogues), batches of one shape each (`plan_shapes`), dealt and reshuffled
        every epoch (DialogueBatchSampler).

        Args:
            rows: a tokenised split (datasets.Dataset with a `length` column, or a list of dicts).
            batch_size: dialogues a batch (a token budget when packing, see plan_shapes).
            dataloader_options: passed to torch's DataLoader (num_workers, pin_memory, ...).
        """
        lengths = window_lengths(rows)
        shapes = plan_shapes(lengths, batch_size, self.batching, self.row_tokens)
        order = random.Random(seed).sample(range(len(lengths)), len(lengths)) if shuffle else None
        dataset = PackedRows(rows)
        dataset.batch_sampler = DialogueBatchSampler(
            self.group(lengths, shapes.widths, order), lengths, shapes, shuffle, seed
        )
        return torch.utils.data.DataLoader(
            dataset,
            batch_sampler=dataset.batch_sampler,
            collate_fn=partial(self.collate_rows, shapes=shapes),
            **dataloader_options,
        )


TOKENIZED_FORMAT_VERSION = 3  # bump when the format or labels change, so old caches are not reused


def tokenize_prepared(
    prepared: PreparedDialogs,
    tokenizer: Any,
    max_length: int,
    cache_dir: str | Path | None = "data",
    write: bool = True,
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

    def key_of(identity: str) -> str:
        return fingerprint(
            identity, tokenizer_hash(tokenizer), max_length, prepared.loss_on, LABEL_DROPOUT, TOKENIZED_FORMAT_VERSION
        )

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
                split: tokenize_dialogs(
                    dialogs,
                    tokenizer,
                    max_length,
                    prepared.loss_on,
                    fingerprint(key, split),
                    folder / f"{split}.arrow",
                    labels=labels_of(split),
                )
                for split, dialogs in prepared.dialogs.items()
            }
        )
        (folder / "complete").write_text(key + "\n", encoding="utf-8")
    return rows


def limit_rows(rows: DatasetDict, limits: dict[str, int]) -> DatasetDict:
    """The rows of the first `limits[split]` dialogues of each split (rows are in dialogue order)."""
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
