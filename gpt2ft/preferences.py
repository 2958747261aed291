"""Preference data for `python -m gpt2ft prefer`: the blind A/B page's votes, and TRL's preference layouts.

    python -m gpt2ft prefer --data logs/votes.sqlite                 # the votes `serve` stored
    python -m gpt2ft prefer --data prefs.jsonl --algorithm kto       # a file, a folder of split files, hub:OWNER/NAME

`read_preferences` reads a source into `PreferenceData`: train and held-out records in one conversational form,
with what was used and skipped, and why. A DPO record is a pair, a KTO record one judged reply:

    {"prompt": [messages], "chosen": [assistant message], "rejected": [assistant message], "key": str}     DPO
    {"prompt": [messages], "completion": [assistant message], "label": true|false, "key": str}            KTO

Sources (`--data`):
    a votes database     SQLite, table `votes` (written by `serve`): `a`/`b` make a (chosen, rejected) pair after the
                         conversation; `tie` gives nothing to learn; `both_bad` gives two undesirable replies for KTO
                         and nothing for DPO
    records              .jsonl/.json/.parquet, a folder of train.*/validation.*/test.*, or hub:OWNER/NAME, in TRL's
                         layouts: prompt/chosen/rejected (explicit prompt), chosen/rejected (implicit prompt: the
                         turns, or for text the words, both begin with), or prompt/completion/label (unpaired, KTO);
                         each field text ("standard") or a list of {"role", "content"} messages ("conversational")

Text becomes chat messages, so every prompt is rendered with the model's own chat template (the format it was
trained in): a text prompt is the user's turn, a text reply the assistant's. DPO pairs become two KTO examples
(chosen: desirable, rejected: undesirable); unpaired records cannot make DPO pairs.

Held-out records: the source's own validation split (else its test split); otherwise the conversations whose hash
share (data.key_share of the prompt's normalized text, as `train` holds out dialogues) falls below
`validation_fraction`, so a conversation and its duplicates always land in the same split.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets.utils import logging as datasets_logging

from .conversations import READERS, ROLES, message_layout, roles_of, turns_of
from .data import dialog_key, key_share
from .sources import (
    FILE_BUILDERS,
    SPLIT_STEMS,
    DataError,
    file_identity,
    is_dailydialog_folder,
    locate,
    read_file,
    read_hub,
    split_files,
)
from .votes import VotesError, load_votes

SQLITE_HEADER = b"SQLite format 3\x00"
SQLITE_SUFFIXES = (".sqlite", ".sqlite3", ".db")
# Said, on the one line of the error, whenever --data is not something prefer can read.
EXPECTED_SOURCES = (
    "prefer expects a votes database (logs/votes.sqlite, written by serve), a .jsonl/.json/.parquet file or a folder "
    "of train.*/validation.*/test.* files in TRL's layouts (prompt/chosen/rejected, chosen/rejected or "
    "prompt/completion/label), or hub:OWNER/NAME"
)

# Why a vote or record teaches nothing; the counts are printed and stored in metrics.json.
SKIP_TIE = "tie votes (no preference between the replies)"
SKIP_BOTH_BAD_DPO = "both-bad votes (DPO needs a better reply; --algorithm kto learns from them)"
SKIP_SAME = "chosen equals rejected"
SKIP_UNREADABLE = "votes whose conversation is not readable JSON messages"
SKIP_BAD_ROW = "votes whose winner, models or replies are not text"
SKIP_DUPLICATE = "repeated votes on one comparison (the first is used)"
SKIP_TOO_LONG = "reply too long for the context"
SKIP_TURN_TOO_LONG = "latest prompt turn alone too long for the context"


# --------------------------------------------------------------------------------------------------------------
# The data as read
# --------------------------------------------------------------------------------------------------------------


@dataclass
class PreferenceData:
    """Preference records of one run, split into train and validation (held out), with what was done to them.

    records: split -> DPO pairs or KTO examples in the module docstring's form.
    counts: what was read and used: per split the records used, `read` (votes or records in the source),
        `winners` (votes: a, b, tie, both_bad), `skipped` (reason -> count) and `held_out` (how validation was made).
    skipped: one line per reason, with the first place it happened (what the run prints).
    """

    records: dict[str, list[dict[str, Any]]]
    algorithm: str
    source: str
    layout: str  # "votes", "explicit", "implicit" or "unpaired"
    counts: dict[str, Any]
    skipped: list[str] = field(default_factory=list)
    identity: str = ""
    supervised: Any = None  # prefer.SupervisedDialogs: what the perplexity before and after is measured on

    @property
    def unit(self) -> str:
        """What one record is: a pair (DPO) or an example (KTO)."""
        return "pairs" if self.algorithm == "dpo" else "examples"


class Skips:
    """Counts the records skipped per reason, remembering where each reason first happened."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.first: dict[str, str] = {}

    def add(self, reason: str, where: str, count: int = 1) -> None:
        self.counts[reason] += count
        self.first.setdefault(reason, where)

    def lines(self) -> list[str]:
        return [f"{count:,} {reason} skipped (first: {self.first[reason]})" for reason, count in self.counts.items()]


# --------------------------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------------------------


def messages_of(value: Any, column: str, role: str, where: str) -> list[dict[str, str]]:
    """A record's field as chat messages: text becomes one message with `role`; a list of {"role", "content"} (or
    ShareGPT {"from", "value"}) messages is read by the conversation readers (conversations.READERS, as training
    reads them) and kept as role and content.

    Raises:
        DataError: empty, not text or messages, or a malformed message; naming the record and the field.
    """
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: {column} is empty")
        return [{"role": role, "content": value.strip()}]
    if isinstance(value, list):
        if not value:
            raise DataError(f"{where}: {column} is an empty list of messages")
        messages = READERS[message_layout(value[0])]({column: value}, column, f"{where}: {column}")
        return [{"role": message["role"], "content": message["content"]} for message in messages]
    raise DataError(
        f"{where}: {column} is {'missing' if value is None else 'a ' + type(value).__name__}, "
        "not text or a list of messages"
    )


def conversation_key(prompt: Sequence[Mapping[str, str]]) -> str:
    """The key that decides a record's split: the prompt conversation's normalized text (data.dialog_key), so the
    same conversation, voted on again or duplicated, always lands in the same split."""
    return dialog_key(turns_of(prompt), roles_of(prompt))


def shared_text_prefix(chosen: str, rejected: str) -> int:
    """Length of the prompt both texts begin with, ending at a whitespace boundary so no word is split between the
    prompt and a reply (TRL's extract_prompt cuts mid-word: "Assistant: S" + "ure" / "orry")."""
    length = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        length += 1
    if length in (len(chosen), len(rejected)):
        return length
    return max(chosen.rfind(space, 0, length) for space in (" ", "\n", "\t")) + 1


def split_implicit(
    chosen: Any, rejected: Any, where: str
) -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]]]:
    """(prompt, chosen, rejected) of an implicit-prompt pair: the turns (for text, the words) both begin with are the
    prompt.

    Raises:
        DataError: they share no prompt, or one has nothing after it.
    """
    if isinstance(chosen, str) and isinstance(rejected, str):
        cut = shared_text_prefix(chosen, rejected)
        prompt_text, chosen, rejected = chosen[:cut], chosen[cut:], rejected[cut:]
        if not prompt_text.strip():
            raise DataError(
                f"{where}: empty prompt: chosen and rejected share no words at their start "
                "(put the prompt in a prompt column)"
            )
        return (
            messages_of(prompt_text, "prompt", "user", where),
            messages_of(chosen, "chosen", "assistant", where),
            messages_of(rejected, "rejected", "assistant", where),
        )
    chosen_messages = messages_of(chosen, "chosen", "assistant", where)
    rejected_messages = messages_of(rejected, "rejected", "assistant", where)
    shared = 0
    for a, b in zip(chosen_messages, rejected_messages):
        if a != b:
            break
        shared += 1
    if shared == 0:
        raise DataError(
            f"{where}: empty prompt: chosen and rejected share no turns at their start "
            "(put the prompt in a prompt column)"
        )
    for name, messages in (("chosen", chosen_messages), ("rejected", rejected_messages)):
        if len(messages) == shared:
            raise DataError(f"{where}: {name} has no reply after the prompt it shares with the other")
    return chosen_messages[:shared], chosen_messages[shared:], rejected_messages[shared:]


# --------------------------------------------------------------------------------------------------------------
# Records: TRL's layouts
# --------------------------------------------------------------------------------------------------------------


def detect_preference_layout(columns: Sequence[str], origin: str) -> str:
    """ "explicit" (prompt/chosen/rejected), "implicit" (chosen/rejected) or "unpaired" (prompt/completion/label).

    Raises:
        DataError: none of them; the message lists the columns found.
    """
    present = set(columns)
    if {"chosen", "rejected"} <= present:
        return "explicit" if "prompt" in present else "implicit"
    if {"prompt", "completion", "label"} <= present:
        return "unpaired"
    raise DataError(
        f"{origin}: no preference records: columns {', '.join(columns) or '(none)'}; expected prompt/chosen/rejected, "
        "chosen/rejected (the prompt at the start of both) or prompt/completion/label (unpaired, for --algorithm kto)"
    )


def read_label(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise DataError(f"{where}: label is {value!r}, not true or false")


def read_preference_record(record: Mapping[str, Any], layout: str, where: str) -> dict[str, Any]:
    """One record as {"prompt", "chosen", "rejected"} (pairs) or {"prompt", "completion", "label"} (unpaired), in
    messages.

    Raises:
        DataError: an empty prompt, a field that is not text or messages, a malformed message or label.
    """
    if layout == "unpaired":
        return {
            "prompt": messages_of(record.get("prompt"), "prompt", "user", where),
            "completion": messages_of(record.get("completion"), "completion", "assistant", where),
            "label": read_label(record.get("label"), where),
        }
    if layout == "implicit" or (isinstance(record.get("prompt"), str) and isinstance(record.get("chosen"), list)):
        # A text prompt beside message replies (some hh-rlhf copies) is a summary: the replies hold the whole
        # conversation, so the prompt is the turns both begin with, as TRL's maybe_extract_prompt decides.
        prompt, chosen, rejected = split_implicit(record.get("chosen"), record.get("rejected"), where)
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    return {
        "prompt": messages_of(record.get("prompt"), "prompt", "user", where),
        "chosen": messages_of(record.get("chosen"), "chosen", "assistant", where),
        "rejected": messages_of(record.get("rejected"), "rejected", "assistant", where),
    }


def same_replies(chosen: Any, rejected: Any) -> bool:
    """True when a pair's replies are the same (implicit-prompt pairs of equal text, whitespace aside)."""
    if isinstance(chosen, str) and isinstance(rejected, str):
        return chosen.strip() == rejected.strip()
    return chosen == rejected


def as_examples(pair: dict[str, Any]) -> list[dict[str, Any]]:
    """A pair as KTO's two judged replies: the chosen one desirable, the rejected one not."""
    return [
        {"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
        {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False},
    ]


def records_from_dataset(dataset: Any, origin: str, layout: str, algorithm: str, skips: Skips) -> list[dict[str, Any]]:
    """The records of one split in the run's form (pairs for DPO, examples for KTO); pairs whose replies are equal are
    skipped and counted.

    Raises:
        DataError: a malformed record (named by file and line), or unpaired records for DPO.
    """
    if layout == "unpaired" and algorithm == "dpo":
        raise DataError(
            f"{origin}: the records are unpaired (prompt/completion/label): DPO needs pairs of a better and a worse "
            "reply; use --algorithm kto"
        )
    records = []
    for index, record in enumerate(dataset):
        if layout != "unpaired" and same_replies(record.get("chosen"), record.get("rejected")):
            skips.add(SKIP_SAME, locate(origin, index))
            continue
        try:
            parsed = read_preference_record(record, layout, "")
        except DataError as error:
            raise DataError(f"{locate(origin, index)}{error}") from None
        if layout != "unpaired" and parsed["chosen"] == parsed["rejected"]:
            skips.add(SKIP_SAME, locate(origin, index))
            continue
        records.extend(as_examples(parsed) if algorithm == "kto" and layout != "unpaired" else [parsed])
    return records


def read_record_splits(source: str, cache_dir: str | Path | None) -> tuple[dict[str, Any], dict[str, str], str]:
    """The splits of a file, folder or Hub source (sources.py's readers), their origins, and the files' identity.

    Raises:
        DataError: a missing path, an unreadable or empty file, a Hub dataset that cannot be loaded.
    """
    datasets_cache = Path(cache_dir) / "datasets" if cache_dir else None
    if source.startswith("hub:"):
        with errors_not_logged():
            return read_hub(source, datasets_cache)
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(
            f"{path}: no such file or folder "
            "(pass a votes database, a .jsonl/.json/.parquet file, a folder or hub:OWNER/NAME)"
        )
    if path.suffix == ".zip" or path.is_dir() and is_dailydialog_folder(path):
        raise DataError(f"--data {path}: DailyDialog conversations, not preferences; {EXPECTED_SOURCES}")
    if path.is_dir() and not any(
        file.suffix in FILE_BUILDERS for stem in SPLIT_STEMS["train"] for file in path.glob(f"{stem}.*")
    ):
        votes = path / "votes.sqlite"
        hint = f" (did you mean --data {votes}?)" if votes.is_file() else ""
        raise DataError(
            f"--data {path}: no train.jsonl, train.json or train.parquet in this folder{hint}; {EXPECTED_SOURCES}"
        )
    files = {"train": path} if path.is_file() else split_files(path)
    for file in files.values():
        if file.suffix not in FILE_BUILDERS:
            raise DataError(f"{file}: not a votes database (SQLite) or a .jsonl, .json or .parquet file")
    with errors_not_logged():
        splits = {split: read_file(file, datasets_cache) for split, file in files.items()}
    return splits, {split: str(file) for split, file in files.items()}, file_identity(list(files.values()))


@contextmanager
def errors_not_logged() -> Iterator[None]:
    """Keep datasets' own log lines ("Failed to load JSON from file ...") off stderr while a file is read: a file
    that does not load raises a DataError naming its first bad line, which is the one line the user needs."""
    was = datasets_logging.get_verbosity()
    datasets_logging.set_verbosity(datasets_logging.CRITICAL + 10)
    try:
        yield
    finally:
        datasets_logging.set_verbosity(was)


# --------------------------------------------------------------------------------------------------------------
# Votes
# --------------------------------------------------------------------------------------------------------------


def is_sqlite_file(path: Path) -> bool:
    """True for a file that starts with SQLite's header (the votes database `serve` writes)."""
    try:
        with path.open("rb") as handle:
            return handle.read(len(SQLITE_HEADER)) == SQLITE_HEADER
    except OSError:
        return False


def vote_prompt(conversation: Any) -> list[dict[str, str]] | None:
    """A vote's conversation as messages, or None when it is not a list of {"role", "content"} messages (a row another
    tool wrote). Empty turns are kept: an empty assistant turn is a reply that ended at once."""
    if not isinstance(conversation, list):
        return None
    messages = []
    for message in conversation:
        if (
            not isinstance(message, dict)
            or message.get("role") not in ROLES
            or not isinstance(message.get("content"), str)
        ):
            return None
        messages.append({"role": message["role"], "content": message["content"].strip()})
    return messages


def votes_records(path: Path, algorithm: str, skips: Skips) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The learnable records of a votes database, and the votes per verdict.

    `a`/`b`: a (chosen, rejected) pair after the conversation (KTO: one desirable and one undesirable reply). `tie`:
    nothing. `both_bad`: two undesirable replies for KTO, nothing for DPO. An empty reply (the model ended its turn at
    once) is a reply like any other.

    Raises:
        DataError: not a votes database, or a vote with an empty conversation.
    """
    try:
        read = load_votes(path)
    except VotesError as error:
        raise DataError(
            f"--data {path}: {error}; expected a votes database written by python -m gpt2ft serve"
        ) from None
    votes = read.votes
    for reason, ids in ((SKIP_BAD_ROW, read.unreadable), (SKIP_DUPLICATE, read.duplicates)):
        if ids:
            skips.add(reason, f"{path}: vote {ids[0]}", len(ids))
    winners: Counter[str] = Counter(vote["winner"] for vote in votes)
    records: list[dict[str, Any]] = []
    for vote in votes:
        where = f"{path}: vote {vote['id']}"
        prompt = vote_prompt(vote.get("conversation"))
        if prompt is None:
            skips.add(SKIP_UNREADABLE, where)
            continue
        if not any(message["content"] for message in prompt):
            raise DataError(f"{where}: empty prompt (no conversation before the replies)")
        reply_a, reply_b = (str(vote.get(side) or "").strip() for side in ("reply_a", "reply_b"))
        replies = {"a": [{"role": "assistant", "content": reply_a}], "b": [{"role": "assistant", "content": reply_b}]}
        winner = vote["winner"]
        if winner == "tie":
            skips.add(SKIP_TIE, where)
        elif winner == "both_bad":
            if algorithm == "dpo":
                skips.add(SKIP_BOTH_BAD_DPO, where)
            else:
                records += [{"prompt": prompt, "completion": replies[side], "label": False} for side in ("a", "b")]
        elif winner in ("a", "b"):
            if reply_a == reply_b:
                skips.add(SKIP_SAME, where)
                continue
            pair = {"prompt": prompt, "chosen": replies[winner], "rejected": replies["b" if winner == "a" else "a"]}
            records.extend(as_examples(pair) if algorithm == "kto" else [pair])
    if not records:
        verdicts = ", ".join(f"{count} {name}" for name, count in sorted(winners.items())) or "none"
        wanted = "an 'A is better' or 'B is better' vote" if algorithm == "dpo" else "a vote other than a tie"
        raise DataError(
            f"--data {path}: no decisive vote to learn from ({len(votes)} votes: {verdicts}); "
            f"{algorithm.upper()} needs {wanted}"
        )
    return records, {"votes": len(votes), **{name: winners.get(name, 0) for name in ("a", "b", "tie", "both_bad")}}


# --------------------------------------------------------------------------------------------------------------
# Splitting, and the whole read
# --------------------------------------------------------------------------------------------------------------


def hold_out_by_key(
    records: list[dict[str, Any]], validation_fraction: float, source: str
) -> dict[str, list[dict[str, Any]]]:
    """Train and validation records: a record whose conversation key falls below `validation_fraction` (key_share)
    is held out. With few conversations none may fall there: then the one with the lowest share is held out (still
    by its hash, so the same one every run).

    Raises:
        DataError: fewer than two different conversations, so none can be held out and one trained on.
    """
    shares = [key_share(record["key"]) for record in records]
    cut = validation_fraction
    if not any(share < cut for share in shares):
        distinct = sorted(set(shares))
        if len(distinct) < 2:
            raise DataError(
                f"{source}: all records share one conversation; at least two different conversations are needed "
                "(one is held out)"
            )
        cut = distinct[1]  # everything at the lowest share: that conversation and its duplicates
    if all(share < cut for share in shares):
        raise DataError(
            f"{source}: every conversation fell into the held-out share; add more or lower --validation-fraction"
        )
    return {
        "train": [record for record, share in zip(records, shares) if share >= cut],
        "validation": [record for record, share in zip(records, shares) if share < cut],
    }


def with_keys(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**record, "key": conversation_key(record["prompt"])} for record in records]


def read_preferences(
    source: str,
    algorithm: str = "dpo",
    cache_dir: str | Path | None = "data",
    validation_fraction: float = 0.1,
    max_train_pairs: int | None = None,
    max_eval_pairs: int | None = None,
) -> PreferenceData:
    """Read `--data` (see the module docstring) into train and validation records for `algorithm` ("dpo"/"kto").

    Args:
        cache_dir: datasets' Arrow files go under `<cache_dir>/datasets`, Hub downloads too.
        max_train_pairs, max_eval_pairs: keep only the first N records of each split (pairs for DPO, examples for
            KTO), after the split.

    Raises:
        DataError: an unreadable source, a record in no layout, an empty prompt, no decisive vote, too few
            conversations to hold one out; the message names the file and line (or vote, or record).
    """
    skips = Skips()
    path = Path(source).expanduser()
    counts: dict[str, Any] = {}
    if path.is_file() and (is_sqlite_file(path) or path.suffix in SQLITE_SUFFIXES):
        if not is_sqlite_file(path):
            raise DataError(
                f"--data {path}: not an SQLite database (expected a votes database written by python -m gpt2ft serve)"
            )
        records, counts["winners"] = votes_records(path, algorithm, skips)
        by_split, layout = {"train": with_keys(records)}, "votes"
        counts["read"] = counts["winners"]["votes"]
    else:
        splits, origins, _ = read_record_splits(source, cache_dir)
        layouts = {
            split: detect_preference_layout(list(dataset.column_names), origins[split])
            for split, dataset in splits.items()
        }
        if len(set(layouts.values())) > 1:
            raise DataError(
                f"{source}: the splits hold different preference layouts "
                f"({', '.join(f'{s}: {kind}' for s, kind in layouts.items())})"
            )
        layout = layouts["train"]
        by_split = {
            split: with_keys(records_from_dataset(dataset, origins[split], layout, algorithm, skips))
            for split, dataset in splits.items()
        }
        counts["read"] = sum(len(dataset) for dataset in splits.values())
    held_out = next((split for split in ("validation", "test") if by_split.get(split)), None)
    if held_out:
        result = {"train": by_split["train"], "validation": by_split[held_out]}
        counts["held_out"] = f"the source's {held_out} split"
    else:
        result = hold_out_by_key(by_split["train"], validation_fraction, source)
        counts["held_out"] = f"{validation_fraction:.0%} of the conversations, by a hash of each"
    if not result["train"]:
        raise DataError(f"{source}: no training records left (after skipping: {'; '.join(skips.lines()) or 'none'})")
    limits = {"train": max_train_pairs, "validation": max_eval_pairs}
    for split, limit in limits.items():
        counts[split] = {"available": len(result[split])}
        if limit is not None:
            result[split] = result[split][:limit]
        counts[split]["used"] = len(result[split])
    counts["skipped"] = dict(skips.counts)
    # The records' content, not the file's date: a copied or re-downloaded source resumes, changed votes do not.
    digest = hashlib.sha256(json.dumps(result, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]
    return PreferenceData(result, algorithm, str(source), layout, counts, skips.lines(), digest)
