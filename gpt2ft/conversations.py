"""One record for a conversation, and the one table of readers that make it from any source's records.

    python -m gpt2ft prepare --data conversations.jsonl     # data.prepare_dialogs reads every record through here

A `Conversation` is its messages, each {"role", "content"} plus, where the data has them, per-turn labels
(DailyDialog's `emotion` and `act`, by the dataset's own label names), with the conversation's id and source. Every
source (sources.py: DailyDialog in any of its layouts, files, Hub datasets) is read by `read_conversation`, which
takes the reader of the record's layout from READERS; preferences.py reads its prompts and replies with the same
readers, so a message means the same thing everywhere. Light on purpose (no torch, no datasets): the notebook, the
web page and the preference code import it.

Layouts (sources.detect_layout finds them, or --dialog-column names the column):
    messages     [{"role": "system"|"user"|"assistant", "content": "...", "emotion": "...", "act": "..."}, ...]
                 (OpenAI / TRL; emotion and act are optional, by the names in LABELS)
    sharegpt     [{"from": "system"|"human"|"gpt"|"user"|"assistant", "value": "..."}, ...]
    turns        a list of strings under "dialog", "dialogue" or "turns" (SODA): no roles, role "" each
    dailydialog  turns under "dialog" with per-turn integer labels under "act" and "emotion" (the release's ids)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import DataError

# DailyDialog's per-turn labels by their names in the release (its readme): emotion ids 0..6, act ids 1..4 in the
# text files; the Hub's parquet conversion uses the same integers.
LABELS = {
    "emotion": ("no emotion", "anger", "disgust", "fear", "happiness", "sadness", "surprise"),
    "act": ("inform", "question", "directive", "commissive"),
}
TURN_FIELDS = tuple(LABELS)
FIRST_LABEL_ID = {"emotion": 0, "act": 1}  # the release numbers acts from 1 (its 0 was a dummy class)

ROLES = ("system", "user", "assistant")
TURN_COLUMNS = ("dialog", "dialogue", "turns")
# Role names of each message layout -> gpt2ft's three roles.
ROLE_NAMES = {
    "messages": {"system": "system", "user": "user", "assistant": "assistant"},
    "sharegpt": {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"},
}
MESSAGE_KEYS = {"messages": ("role", "content"), "sharegpt": ("from", "value")}


@dataclass(frozen=True)
class Layout:
    """How a record holds its conversation: `kind` (a key of READERS) under `column`."""

    kind: str
    column: str

    @property
    def has_roles(self) -> bool:
        return self.kind in ROLE_NAMES


@dataclass
class Conversation:
    """One conversation as every stage sees it.

    messages: {"role": "system"|"user"|"assistant" ("" for plain turns without roles, DailyDialog), "content": str},
        plus "emotion"/"act" (names from LABELS) on the turns that have them.
    id: the record's own `id`, else `<split>-<n>`: for DailyDialog n is the release's line (text files) or row
        (parquet), from 1; for files the record's index in its split.
    source: where it was read from (the --data source).
    """

    messages: list[dict[str, str]]
    id: str = ""
    source: str = ""

    @property
    def turns(self) -> list[str]:
        return turns_of(self.messages)

    @property
    def roles(self) -> list[str]:
        return roles_of(self.messages)

    @property
    def has_labels(self) -> bool:
        return any(message.get(name) is not None for message in self.messages for name in TURN_FIELDS)

    def as_row(self) -> dict[str, Any]:
        """The record as a prepared row: every message with every TURN_FIELDS key (None where it has no label), so
        all rows share one Arrow schema (data.DIALOG_FEATURES)."""
        messages = [
            {"role": m["role"], "content": m["content"], **{name: m.get(name) for name in TURN_FIELDS}}
            for m in self.messages
        ]
        return {"messages": messages, "id": self.id, "source": self.source}


def turns_of(messages: Sequence[Mapping[str, Any]]) -> list[str]:
    """The text of each message."""
    return [message["content"] for message in messages]


def roles_of(messages: Sequence[Mapping[str, Any]]) -> list[str]:
    """The role of each message ("" for plain turns)."""
    return [message["role"] or "" for message in messages]


def speaker_labels(roles: Sequence[str], count: int) -> list[str]:
    """How a dialogue's `count` turns are named for a reader, the same in the notebook and the model card: by their
    roles ("user", "assistant", ...) where the data has them, else as speakers A and B, alternating from A."""
    if any(roles):
        return [role or "?" for role in list(roles) + [""] * (count - len(roles))]
    return ["AB"[index % 2] for index in range(count)]


def messages_from_turns(turns: Sequence[str], roles: Sequence[str] = ()) -> list[dict[str, str]]:
    """Plain turns (and their roles; "" where there is none) as a record's messages."""
    padded = list(roles) + [""] * (len(turns) - len(roles))
    return [{"role": role, "content": turn} for turn, role in zip(turns, padded)]


def message_layout(message: Any) -> str:
    """ "sharegpt" for a {"from", "value"} message, else "messages": what a message holds decides, whatever the
    column is called."""
    return "sharegpt" if isinstance(message, Mapping) and ("from" in message or "value" in message) else "messages"


# --------------------------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------------------------


def label_error(name: str, value: Any, where: str) -> DataError:
    return DataError(f"{where}: {name} {value!r} is not a DailyDialog {name} label ({', '.join(LABELS[name])})")


def label_of_id(name: str, value: Any, where: str) -> str:
    """A release label id (or already its name) -> its name in LABELS.

    Raises:
        DataError: an id outside the release's range, or an unknown name.
    """
    names = LABELS[name]
    if isinstance(value, int) and not isinstance(value, bool):
        index = value - FIRST_LABEL_ID[name]
        if 0 <= index < len(names):
            return names[index]
    elif isinstance(value, str) and value in names:
        return value
    raise label_error(name, value, where)


# --------------------------------------------------------------------------------------------------------------
# The readers: one a layout, each (record, column, where) -> messages
# --------------------------------------------------------------------------------------------------------------


def conversation_value(record: Mapping[str, Any], column: str, where: str) -> list:
    """The list under `column`.

    Raises:
        DataError: it is missing or not a list; `where` names the record.
    """
    value = record.get(column)
    if value is None:
        present = ", ".join(key for key, item in record.items() if item is not None) or "none"
        raise DataError(
            f"{where}: no {column!r} in this record (its fields: {present}); "
            "name the conversation's column with --dialog-column"
        )
    if not isinstance(value, list):
        raise DataError(f"{where}: {column!r} is a {type(value).__name__}, not a list of turns")
    return value


def read_turns(record: Mapping[str, Any], column: str, where: str) -> list[dict[str, str]]:
    """Plain turns (stripped), role "" each.

    Raises:
        DataError: a turn that is empty or not text.
    """
    messages = []
    for number, turn in enumerate(conversation_value(record, column, where), 1):
        if not isinstance(turn, str) or not turn.strip():
            raise DataError(
                f"{where}: turn {number} is {'empty' if isinstance(turn, str) else type(turn).__name__}, not text"
            )
        messages.append({"role": "", "content": turn.strip()})
    return messages


def read_labelled_turns(record: Mapping[str, Any], column: str, where: str) -> list[dict[str, str]]:
    """DailyDialog's turns, each with its emotion and act by name (the record holds the ids, one per turn).

    Raises:
        DataError: a bad turn, a label list of another length than the turns, or an unknown label.
    """
    messages = read_turns(record, column, where)
    for name in TURN_FIELDS:
        ids = record.get(name)
        if not isinstance(ids, list) or len(ids) != len(messages):
            count = len(ids) if isinstance(ids, list) else "no"
            raise DataError(f"{where}: {len(messages)} turns but {count} {name} labels")
        for number, (message, value) in enumerate(zip(messages, ids), 1):
            message[name] = label_of_id(name, value, f"{where}: turn {number}")
    return messages


def read_message_list(value: list, kind: str, where: str) -> list[dict[str, str]]:
    """Messages of layout `kind` ("messages" or "sharegpt") as gpt2ft's: roles mapped, contents stripped, and
    emotion/act kept where a message has them (names from LABELS).

    Raises:
        DataError: a message that is not a mapping, an unknown role, a content that is not text or is empty, or a
            label outside LABELS.
    """
    role_key, content_key = MESSAGE_KEYS[kind]
    known = ROLE_NAMES[kind]
    messages = []
    for number, message in enumerate(value, 1):
        if not isinstance(message, dict):
            raise DataError(
                f"{where}: message {number} is a {type(message).__name__}, "
                f"not an object with {role_key!r} and {content_key!r}"
            )
        role, content = message.get(role_key), message.get(content_key)
        if role not in known:
            raise DataError(
                f"{where}: message {number} has unknown {role_key} {role!r} (gpt2ft knows {', '.join(known)})"
            )
        if not isinstance(content, str):
            raise DataError(f"{where}: message {number} ({role}): {content_key} is {type(content).__name__}, not text")
        if not content.strip():
            raise DataError(f"{where}: message {number} ({role}): {content_key} is empty")
        read = {"role": known[role], "content": content.strip()}
        for name in TURN_FIELDS:
            label = message.get(name)
            if label is not None:
                if label not in LABELS[name]:
                    raise label_error(name, label, f"{where}: message {number} ({role})")
                read[name] = label
        messages.append(read)
    return messages


def read_messages(record: Mapping[str, Any], column: str, where: str) -> list[dict[str, str]]:
    """{"role", "content"} messages (OpenAI / TRL)."""
    return read_message_list(conversation_value(record, column, where), "messages", where)


def read_sharegpt(record: Mapping[str, Any], column: str, where: str) -> list[dict[str, str]]:
    """ShareGPT's {"from", "value"} messages (human -> user, gpt -> assistant)."""
    return read_message_list(conversation_value(record, column, where), "sharegpt", where)


READERS: dict[str, Callable[[Mapping[str, Any], str, str], list[dict[str, str]]]] = {
    "messages": read_messages,
    "sharegpt": read_sharegpt,
    "turns": read_turns,
    "dailydialog": read_labelled_turns,
}


def read_conversation(
    record: Mapping[str, Any], layout: Layout, where: str, default_id: str = "", source: str = ""
) -> Conversation:
    """One record of a source as a Conversation, by its layout's reader; its id is the record's own `id` field when
    it has one, else `default_id`.

    Raises:
        DataError: a malformed record (see the readers); `where` names it.
    """
    messages = READERS[layout.kind](record, layout.column, where)
    own = record.get("id")
    return Conversation(messages, default_id if own is None or own == "" else str(own), source)
