"""gpt2ft.preferences: preference data from votes databases (written by gpt2ft's own votes code) and from TRL's
layouts in every file type, folders and a Hub-style repository; the held-out split; what is skipped; bad input.

    pytest tests/test_preferences.py

The records are small and made here: questions from conftest's EXCHANGES, answered politely ("Of course. ...",
preferred) or rudely ("Ugh. ...", rejected), so every record's expected reading is known.
"""

from __future__ import annotations

import json
import random
import sqlite3
from pathlib import Path

import pytest
from conftest import EXCHANGES, write_records

from gpt2ft.data import clean_turn, key_share
from gpt2ft.preferences import (
    SKIP_BOTH_BAD_DPO,
    SKIP_SAME,
    SKIP_TIE,
    SKIP_UNREADABLE,
    Skips,
    conversation_key,
    read_preferences,
    shared_text_prefix,
)
from gpt2ft.sources import DataError
from gpt2ft.votes import init_votes_db, record_vote

QA = [(clean_turn(question), clean_turn(answer)) for question, answer in EXCHANGES]
POLITE, RUDE = "Of course.", "Ugh."


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def pairs(n: int, seed: int = 0) -> list[tuple[list[dict[str, str]], str, str]]:
    """n (prompt messages, polite reply, rude reply); a third of the prompts carry an earlier exchange, so many
    conversations differ and the hash split has something to split."""
    rng = random.Random(seed)
    made = []
    for index in range(n):
        question, answer = rng.choice(QA)
        earlier = []
        if index % 3 == 0:
            q0, a0 = rng.choice(QA)
            earlier = [user(q0), assistant(f"{POLITE} {a0}")]
        made.append((earlier + [user(question)], f"{POLITE} {answer}", f"{RUDE} {answer}"))
    return made


def explicit_conversational(n: int = 60) -> list[dict]:
    return [
        {"prompt": prompt, "chosen": [assistant(good)], "rejected": [assistant(bad)]} for prompt, good, bad in pairs(n)
    ]


def read(source, **options):
    options.setdefault("cache_dir", None)
    return read_preferences(str(source), **options)


def all_records(data) -> list[dict]:
    return data.records["train"] + data.records["validation"]


# --------------------------------------------------------------------------------------------------------------
# TRL's layouts, in every file type
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_explicit_conversational_pairs_in_every_file_type(tmp_path, suffix):
    made = pairs(60)
    path = write_records(tmp_path / f"prefs{suffix}", explicit_conversational(60))
    data = read(path)
    assert data.layout == "explicit" and data.unit == "pairs" and data.counts["read"] == 60
    records = all_records(data)
    assert len(records) == 60
    expected = {json.dumps(prompt): (good, bad) for prompt, good, bad in made}
    for record in records:
        good, bad = expected[json.dumps(record["prompt"])]
        assert record["chosen"] == [assistant(good)] and record["rejected"] == [assistant(bad)]
        assert record["key"] == conversation_key(record["prompt"])


def test_standard_text_pairs_become_chat_messages(tmp_path):
    records = [
        {"prompt": f"  {prompt[-1]['content']} ", "chosen": good, "rejected": bad} for prompt, good, bad in pairs(30)
    ]
    data = read(write_records(tmp_path / "text.json", records))
    record = data.records["train"][0]
    # The text prompt is the user's turn and each reply the assistant's: the model's chat template renders them.
    assert record["prompt"] == [
        user(records[[r["prompt"].strip() for r in records].index(record["prompt"][0]["content"])]["prompt"].strip())
    ]
    assert record["chosen"][0]["role"] == "assistant" and record["chosen"][0]["content"].startswith(POLITE)


def test_implicit_conversational_prompt_is_the_turns_both_share(tmp_path):
    records = [
        {"chosen": prompt + [assistant(good)], "rejected": prompt + [assistant(bad)]} for prompt, good, bad in pairs(40)
    ]
    data = read(write_records(tmp_path / "implicit.parquet", records))
    assert data.layout == "implicit"
    for record in all_records(data):
        assert record["prompt"][-1]["role"] == "user"
        assert len(record["chosen"]) == len(record["rejected"]) == 1
        assert record["chosen"][0]["content"].startswith(POLITE) and record["rejected"][0]["content"].startswith(RUDE)


def test_implicit_text_prompt_ends_on_a_word_boundary(tmp_path):
    # hh-rlhf's raw layout: both texts hold the whole exchange. The replies share their first letter ("S"), which
    # TRL's character-level extract_prompt would put into the prompt.
    chosen = "\n\nHuman: Can you help me?\n\nAssistant: Sure, what do you need?"
    rejected = "\n\nHuman: Can you help me?\n\nAssistant: Sorry, no."
    assert chosen[: shared_text_prefix(chosen, rejected)].endswith("Assistant: ")
    data = read(
        write_records(
            tmp_path / "hh.jsonl",
            [{"chosen": chosen, "rejected": rejected}] * 2
            + [{"chosen": f"Q: {q}\nA: {POLITE} {a}", "rejected": f"Q: {q}\nA: {RUDE} {a}"} for q, a in QA],
        )
    )
    hh = next(record for record in all_records(data) if "Human" in record["prompt"][0]["content"])
    assert hh["prompt"] == [user("Human: Can you help me?\n\nAssistant:")]
    assert hh["chosen"] == [assistant("Sure, what do you need?")] and hh["rejected"] == [assistant("Sorry, no.")]


def test_a_text_prompt_beside_message_replies_is_implicit(tmp_path):
    # Some hh-rlhf copies keep a text summary in `prompt` and the whole conversation in chosen/rejected (TRL's
    # maybe_extract_prompt takes the prompt from the replies then); here too.
    records = [
        {"prompt": prompt[-1]["content"], "chosen": prompt + [assistant(good)], "rejected": prompt + [assistant(bad)]}
        for prompt, good, bad in pairs(30)
    ]
    for record in all_records(read(write_records(tmp_path / "mixed.jsonl", records))):
        assert len(record["chosen"]) == 1 and record["prompt"][-1]["role"] == "user"


def test_unpaired_records_are_kto_examples_and_refused_for_dpo(tmp_path):
    records = [
        {"prompt": [user(q)], "completion": [assistant(f"{style} {a}")], "label": style == POLITE}
        for q, a in QA
        for style in (POLITE, RUDE)
    ] * 3
    path = write_records(tmp_path / "unpaired.jsonl", records)
    data = read(path, algorithm="kto")
    assert data.layout == "unpaired" and data.unit == "examples"
    for record in all_records(data):
        assert record["label"] == record["completion"][0]["content"].startswith(POLITE)
    with pytest.raises(DataError, match="unpaired.*--algorithm kto"):
        read(path, algorithm="dpo")


def test_pairs_become_two_kto_examples(tmp_path):
    data = read(write_records(tmp_path / "prefs.jsonl", explicit_conversational(30)), algorithm="kto")
    records = all_records(data)
    assert len(records) == 60 and sum(record["label"] for record in records) == 30
    for record in records:
        assert record["completion"][0]["content"].startswith(POLITE if record["label"] else RUDE)


# --------------------------------------------------------------------------------------------------------------
# Splits: the source's own, or held out by the conversation's hash
# --------------------------------------------------------------------------------------------------------------


def test_held_out_conversations_follow_their_hash_and_keep_duplicates_together(tmp_path):
    records = explicit_conversational(200)
    records += records[:50]  # the same conversations, voted on again
    data = read(write_records(tmp_path / "prefs.jsonl", records), validation_fraction=0.2)
    train_keys = {record["key"] for record in data.records["train"]}
    held_keys = {record["key"] for record in data.records["validation"]}
    assert held_keys and not train_keys & held_keys
    assert all(key_share(key) < 0.2 for key in held_keys) and all(key_share(key) >= 0.2 for key in train_keys)
    assert len(data.records["train"]) + len(data.records["validation"]) == 250
    again = read(write_records(tmp_path / "copy.jsonl", records), validation_fraction=0.2)
    assert again.records == data.records  # the same split on every run and machine


def test_few_conversations_still_hold_one_out_and_one_conversation_is_refused(tmp_path):
    few = explicit_conversational(3)
    data = read(write_records(tmp_path / "few.jsonl", few), validation_fraction=0.01)
    assert len(data.records["validation"]) >= 1 and len(data.records["train"]) >= 1
    lowest = min(all_records(data), key=lambda record: key_share(record["key"]))
    assert all(record["key"] == lowest["key"] for record in data.records["validation"])
    with pytest.raises(DataError, match="two different conversations"):
        read(write_records(tmp_path / "one.jsonl", few[:1] * 4))


def test_a_folder_uses_its_validation_split_else_its_test_split(tmp_path):
    records = explicit_conversational(40)
    folder = tmp_path / "folder"
    write_records(folder / "train.jsonl", records[:30])
    write_records(folder / "test.jsonl", records[30:])
    data = read(folder)
    assert len(data.records["train"]) == 30 and len(data.records["validation"]) == 10
    assert data.counts["held_out"] == "the source's test split"
    write_records(folder / "validation.jsonl", records[30:35])
    assert len(read(folder).records["validation"]) == 5


def test_a_hub_dataset_like_trl_lib_hh_rlhf_helpful_base(tmp_path):
    # trl-lib/hh-rlhf-helpful-base's layout: data/{train,test}-*.parquet, conversational, implicit prompt.
    repo = tmp_path / "trl-lib__hh"
    rows = [
        {"chosen": prompt + [assistant(good)], "rejected": prompt + [assistant(bad)]} for prompt, good, bad in pairs(30)
    ]
    write_records(repo / "data" / "train-00000-of-00001.parquet", rows[:24])
    write_records(repo / "data" / "test-00000-of-00001.parquet", rows[24:])
    data = read_preferences(f"hub:{repo}", cache_dir=tmp_path / "cache")  # datasets resolves a local repository alike
    assert (len(data.records["train"]), len(data.records["validation"])) == (24, 6) and data.layout == "implicit"


def test_limits_apply_after_the_split(tmp_path):
    data = read(
        write_records(tmp_path / "prefs.jsonl", explicit_conversational(100)), max_train_pairs=7, max_eval_pairs=2
    )
    assert (len(data.records["train"]), len(data.records["validation"])) == (7, 2)
    assert data.counts["train"]["available"] > 7 and data.counts["train"]["used"] == 7


# --------------------------------------------------------------------------------------------------------------
# Votes databases, written by gpt2ft's own votes code
# --------------------------------------------------------------------------------------------------------------


def write_votes(path: Path, verdicts: list[str]) -> Path:
    """One vote a verdict, on distinct conversations; the polite reply is shown as A on even votes, as B on odd ones,
    and `a`/`b` mean "the polite side won" (a vote for the other side is written as its opposite)."""
    init_votes_db(path)
    for index, verdict in enumerate(verdicts):
        question, answer = QA[index % len(QA)]
        conversation = [{"role": "user", "content": f"{question} ({index})"}]
        polite, rude = f"{POLITE} {answer}", f"{RUDE} {answer}"
        a, b = (polite, rude) if index % 2 == 0 else (rude, polite)
        winner = {"polite": "a" if index % 2 == 0 else "b"}.get(verdict, verdict)
        record_vote(
            path, conversation, a, b, "gpt2_finetuned", "gpt2", winner, {"model": "gpt2_finetuned", "temperature": 0.8}
        )
    return path


def test_votes_make_dpo_pairs_and_count_what_teaches_nothing(tmp_path):
    db = write_votes(tmp_path / "votes.sqlite", ["polite"] * 20 + ["tie"] * 3 + ["both_bad"] * 2)
    data = read(db)
    assert data.layout == "votes" and data.counts["winners"] == {"votes": 25, "a": 10, "b": 10, "tie": 3, "both_bad": 2}
    records = all_records(data)
    assert len(records) == 20
    for record in records:
        assert record["chosen"][0]["content"].startswith(POLITE) and record["rejected"][0]["content"].startswith(RUDE)
        assert record["prompt"][0]["role"] == "user"
    assert data.counts["skipped"] == {SKIP_TIE: 3, SKIP_BOTH_BAD_DPO: 2}
    assert any("3 tie votes" in line and "vote 21" in line for line in data.skipped)  # the first one is named


def test_votes_make_kto_examples_with_both_bad_as_two_undesirable_replies(tmp_path):
    db = write_votes(tmp_path / "votes.sqlite", ["polite"] * 10 + ["tie"] * 2 + ["both_bad"] * 4)
    records = all_records(read(db, algorithm="kto"))
    assert len(records) == 2 * 10 + 2 * 4
    assert sum(record["label"] for record in records) == 10
    assert read(db, algorithm="kto").counts["skipped"] == {SKIP_TIE: 2}


def test_equal_replies_and_unreadable_rows_are_skipped_not_fatal(tmp_path):
    db = write_votes(tmp_path / "votes.sqlite", ["polite"] * 8)
    record_vote(db, [user("Hello?")], "Same.", "Same.", "m", "o", "a", {"model": "m"})
    record_vote(db, [user("Hi?")], "", "Ugh.", "m", "o", "b", {"model": "m"})  # an empty reply is a reply
    with sqlite3.connect(db) as connection:  # a row another tool wrote, with a conversation that is not JSON
        connection.execute(
            "INSERT INTO votes (created_at, conversation, reply_a, reply_b, model_a, model_b, winner, settings) "
            "VALUES ('2025-01-01', 'not json', 'x', 'y', 'm', 'o', 'a', '{}')"
        )
    data = read(db)
    assert data.counts["skipped"] == {SKIP_SAME: 1, SKIP_UNREADABLE: 1}
    empty = next(record for record in all_records(data) if record["prompt"] == [user("Hi?")])
    assert empty["rejected"] == [assistant("")] and empty["chosen"] == [assistant("Ugh.")]
    file_pairs = explicit_conversational(10)
    file_pairs[3] = {**file_pairs[3], "rejected": file_pairs[3]["chosen"]}
    assert read(write_records(tmp_path / "same.jsonl", file_pairs)).counts["skipped"] == {SKIP_SAME: 1}


def test_skips_name_where_each_reason_first_happened():
    skips = Skips()
    skips.add("tie votes", "db: vote 3")
    skips.add("tie votes", "db: vote 9")
    assert skips.lines() == ["2 tie votes skipped (first: db: vote 3)"]


# --------------------------------------------------------------------------------------------------------------
# Bad input: one clear DataError naming the file and record
# --------------------------------------------------------------------------------------------------------------


def test_a_votes_database_without_a_decisive_vote(tmp_path):
    db = write_votes(tmp_path / "votes.sqlite", ["tie"] * 3 + ["both_bad"] * 2)
    with pytest.raises(DataError, match=r"no decisive vote to learn from \(5 votes: 2 both_bad, 3 tie\)"):
        read(db)
    assert len(all_records(read(db, algorithm="kto"))) == 4  # KTO learns from the both-bad votes


def test_a_database_that_is_not_sqlite_or_has_no_votes_table(tmp_path):
    fake = tmp_path / "votes.sqlite"
    fake.write_text("not a database\n")
    with pytest.raises(DataError, match="not an SQLite database"):
        read(fake)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as connection:
        connection.execute("CREATE TABLE scores (id INTEGER)")
    with pytest.raises(DataError, match="no such table: votes"):
        read(other)


def test_an_empty_conversation_in_a_vote_is_an_error(tmp_path):
    db = write_votes(tmp_path / "votes.sqlite", ["polite"] * 4)
    record_vote(db, [], "A.", "B.", "m", "o", "a", {"model": "m"})
    with pytest.raises(DataError, match="vote 5: empty prompt"):
        read(db)


def test_records_in_no_layout_list_the_columns_found(tmp_path):
    path = write_records(tmp_path / "chats.jsonl", [{"question": "Hi", "answer": "Hello", "score": 1}] * 3)
    with pytest.raises(
        DataError,
        match=r"chats.jsonl: no preference records: columns question, answer, score; expected prompt/chosen/rejected",
    ):
        read(path)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "", "chosen": "A.", "rejected": "B."}, "prefs.jsonl:3: prompt is empty"),
        ({"prompt": [], "chosen": "A.", "rejected": "B."}, "prefs.jsonl:3: prompt is an empty list"),
        ({"chosen": "Yes, sure.", "rejected": "No way."}, "prefs.jsonl:3: prompt is missing"),
        ({"prompt": "Hi", "chosen": 5, "rejected": "B."}, "prefs.jsonl:3: chosen is a int"),
        (
            {"prompt": [{"role": "robot", "content": "Hi"}], "chosen": "A.", "rejected": "B."},
            "prefs.jsonl:3: prompt: message 1 has unknown role 'robot'",
        ),
    ],
    ids=["empty text prompt", "empty message prompt", "missing prompt", "reply not text", "unknown role"],
)
def test_a_bad_record_names_its_file_and_line(tmp_path, record, message):
    good = {"prompt": "Hello?", "chosen": "Hi!", "rejected": "Go away."}
    path = write_records(tmp_path / "prefs.jsonl", [good, good, record, good])
    with pytest.raises(DataError) as raised:
        read(path)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_an_implicit_pair_without_a_shared_prompt(tmp_path):
    good = {"chosen": "Q: Hi?\nA: Hello.", "rejected": "Q: Hi?\nA: Go."}
    path = write_records(tmp_path / "implicit.jsonl", [good, {"chosen": "Yes, sure.", "rejected": "No way."}])
    with pytest.raises(DataError, match="implicit.jsonl:2: empty prompt: chosen and rejected share no words"):
        read(path)


def test_missing_and_unsupported_paths(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        read(tmp_path / "nowhere.jsonl")
    (tmp_path / "prefs.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(DataError, match="not a votes database \\(SQLite\\) or a .jsonl"):
        read(tmp_path / "prefs.csv")


@pytest.mark.parametrize("source", ["dailydialog", "broken json"])
def test_prefer_on_data_it_cannot_use_prints_one_line_saying_what_it_expects(
    source, tiny_model_dir, dailydialog_dir, tmp_path
):
    """`python -m gpt2ft prefer --data` on a DailyDialog folder (conversations, not preferences), or on a preference
    file with a line that is not JSON: exit 2 and exactly one line on stderr (not the datasets library's own log
    line above gpt2ft's)."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    if source == "dailydialog":
        data = dailydialog_dir
    else:
        data = tmp_path / "prefs"
        data.mkdir()
        (data / "train.jsonl").write_text(
            json.dumps({"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go."}) + "\nnot json\n"
        )
    command = [sys.executable, "-m", "gpt2ft", "prefer", "--model", str(tiny_model_dir), "--data", str(data)]
    for flag, folder in (
        ("--output-dir", "out"),
        ("--logs-dir", "logs"),
        ("--images-dir", "images"),
        ("--cache-dir", "cache"),
    ):
        command += [flag, str(tmp_path / folder)]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=environment, timeout=300)
    lines = done.stderr.splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    if source == "dailydialog":
        assert lines[0].startswith(f"error: --data {data}: DailyDialog conversations, not preferences; prefer expects")
        assert all(word in lines[0] for word in ("votes database", "prompt/chosen/rejected", "hub:OWNER/NAME"))
    else:
        assert lines[0] == f"error: {data / 'train.jsonl'}:2: not JSON (Expecting value: line 1 column 1 (char 0))"
    assert not (tmp_path / "out").exists()
