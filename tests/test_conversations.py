"""gpt2ft.conversations: the conversation record and its reader table, one layout at a time, on records made here.

    pytest tests/test_conversations.py

Whole sources (files, DailyDialog's layouts, the Hub) read through these readers are tested in test_sources.py and
test_data.py; here each reader alone: what it returns, which labels it names, and the one-line errors.
"""

from __future__ import annotations

import pytest

from gpt2ft.conversations import (
    LABELS,
    READERS,
    TURN_FIELDS,
    Conversation,
    DataError,
    Layout,
    message_layout,
    messages_from_turns,
    read_conversation,
)


def test_the_label_names_are_dailydialogs_in_the_order_of_its_ids():
    assert TURN_FIELDS == ("emotion", "act")
    assert LABELS["emotion"][0] == "no emotion" and LABELS["emotion"][4] == "happiness" and len(LABELS["emotion"]) == 7
    assert LABELS["act"] == ("inform", "question", "directive", "commissive")  # release ids 1..4


def test_every_layout_has_a_reader_and_only_message_layouts_have_roles():
    assert set(READERS) == {"messages", "sharegpt", "turns", "dailydialog"}
    assert [Layout(kind, "c").has_roles for kind in ("messages", "sharegpt", "turns", "dailydialog")] == [
        True,
        True,
        False,
        False,
    ]


def test_messages_are_read_stripped_with_their_labels_kept():
    record = {
        "messages": [
            {"role": "system", "content": " Be kind. "},
            {"role": "user", "content": "Hi", "emotion": "happiness", "act": "question"},
            {"role": "assistant", "content": "Hello.", "emotion": None},  # a null label (Arrow fills missing keys)
        ]
    }
    assert READERS["messages"](record, "messages", "r") == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi", "emotion": "happiness", "act": "question"},
        {"role": "assistant", "content": "Hello."},
    ]


def test_sharegpt_roles_become_gpt2fts():
    record = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}
    messages = READERS["sharegpt"](record, "conversations", "r")
    assert messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert message_layout(record["conversations"][0]) == "sharegpt" and message_layout({"role": "user"}) == "messages"


def test_plain_turns_have_no_role():
    assert READERS["turns"]({"dialogue": [" Hi ", "Yo"]}, "dialogue", "r") == [
        {"role": "", "content": "Hi"},
        {"role": "", "content": "Yo"},
    ]


def test_dailydialog_ids_become_label_names_on_each_turn():
    record = {"dialog": ["Hi .", "Hello ?", "Go !", "OK ."], "act": [1, 2, 3, 4], "emotion": [0, 6, 4, 1]}
    messages = READERS["dailydialog"](record, "dialog", "r")
    assert [m["act"] for m in messages] == ["inform", "question", "directive", "commissive"]
    assert [m["emotion"] for m in messages] == ["no emotion", "surprise", "happiness", "anger"]
    assert all(m["role"] == "" for m in messages)


@pytest.mark.parametrize(
    "kind, record, message",
    [
        (
            "dailydialog",
            {"dialog": ["a", "b"], "act": [1, 5], "emotion": [0, 0]},
            "r: turn 2: act 5 is not a DailyDialog act",
        ),
        (
            "dailydialog",
            {"dialog": ["a", "b"], "act": [0, 1], "emotion": [0, 0]},
            "r: turn 1: act 0 is not",  # the release numbers acts from 1
        ),
        ("dailydialog", {"dialog": ["a", "b"], "act": [1, 2], "emotion": [0, 7]}, "r: turn 2: emotion 7 is not"),
        ("dailydialog", {"dialog": ["a", "b"], "act": [1], "emotion": [0, 0]}, "r: 2 turns but 1 act labels"),
        (
            "messages",
            {"m": [{"role": "user", "content": "a", "act": "greeting"}]},
            "r: message 1 (user): act 'greeting'",
        ),
        ("messages", {"m": [{"role": "user", "content": "a", "emotion": 4}]}, "r: message 1 (user): emotion 4 is not"),
        ("messages", {"m": [{"role": "tool", "content": "a"}]}, "r: message 1 has unknown role 'tool'"),
        ("messages", {"m": "hello"}, "r: 'm' is a str, not a list of turns"),
        ("messages", {"other": 1}, "r: no 'm' in this record (its fields: other)"),
        ("turns", {"m": ["a", " "]}, "r: turn 2 is empty, not text"),
    ],
)
def test_a_malformed_record_is_one_line_naming_it(kind, record, message):
    with pytest.raises(DataError) as raised:
        READERS[kind](record, "dialog" if kind == "dailydialog" else "m", "r")
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


def test_a_conversation_keeps_its_own_id_else_the_default_and_its_source():
    layout = Layout("turns", "dialog")
    own = read_conversation({"dialog": ["a", "b"], "id": 17}, layout, "r", "train-3", "src")
    assert (own.id, own.source, own.turns, own.roles) == ("17", "src", ["a", "b"], ["", ""])
    assert read_conversation({"dialog": ["a", "b"], "id": None}, layout, "r", "train-3").id == "train-3"


def test_a_row_holds_every_label_field_null_where_absent():
    conversation = Conversation(
        [{"role": "", "content": "Hi", "emotion": "fear", "act": "inform"}, {"role": "", "content": "Yo"}], "x-1", "s"
    )
    assert conversation.has_labels and not Conversation(messages_from_turns(["a"], ["user"])).has_labels
    assert conversation.as_row() == {
        "messages": [
            {"role": "", "content": "Hi", "emotion": "fear", "act": "inform"},
            {"role": "", "content": "Yo", "emotion": None, "act": None},
        ],
        "id": "x-1",
        "source": "s",
    }
    assert messages_from_turns(["a", "b"], ["user"]) == [
        {"role": "user", "content": "a"},
        {"role": "", "content": "b"},
    ]
