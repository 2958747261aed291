"""gpt2ft.votes: the votes table (schema, WAL, concurrent writers, restarts), the statistics, and `votes` command.

pytest tests/test_votes.py
"""

from __future__ import annotations

import json
import multiprocessing
import re
import sqlite3
import threading
from datetime import UTC, datetime

import pytest

from gpt2ft.cli import main
from gpt2ft.votes import (
    COLUMNS,
    VoteAlreadyCounted,
    VotesError,
    init_votes_db,
    load_votes,
    read_votes,
    record_vote,
    summarize_votes,
    tally_votes,
    wilson_interval,
)

CONVERSATION = [{"role": "user", "content": "Hi, how are you?"}]
SETTINGS = {"temperature": 0.8, "top_p": 0.9, "max_new_tokens": 50, "greedy": False}


def vote(path, winner="a", model_a="tuned", model_b="gpt2", served="tuned", reply_a="Fine.", reply_b="Good.") -> int:
    return record_vote(path, CONVERSATION, reply_a, reply_b, model_a, model_b, winner, {**SETTINGS, "model": served})


def write_votes(path: str, writer: int, count: int) -> list[int]:
    """Record `count` votes (a top-level function, so a spawned process can run it)."""
    return [vote(path, winner=("a", "b", "tie", "both_bad")[i % 4], reply_a=f"w{writer}-{i}") for i in range(count)]


# --------------------------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------------------------


def test_schema_has_the_issue_columns_and_wal_mode(tmp_path):
    path = init_votes_db(tmp_path / "logs" / "votes.sqlite")  # the folder is created too
    with sqlite3.connect(path) as connection:
        columns = [row[1] for row in connection.execute("PRAGMA table_info(votes)")]
        mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
    assert (
        columns
        == list(COLUMNS)
        == [
            "id",
            "created_at",
            "conversation",
            "reply_a",
            "reply_b",
            "model_a",
            "model_b",
            "winner",
            "settings",
            "comparison",
        ]
    )
    assert mode == "wal"


def test_a_vote_round_trips_with_utc_time_and_json_fields(tmp_path):
    path = init_votes_db(tmp_path / "votes.sqlite")
    row_id = vote(path, winner="both_bad", reply_a="héllo <b>", reply_b="")
    [stored] = read_votes(path)
    assert stored["id"] == row_id
    assert stored["conversation"] == CONVERSATION
    assert (stored["reply_a"], stored["reply_b"], stored["model_a"], stored["model_b"]) == (
        "héllo <b>",
        "",
        "tuned",
        "gpt2",
    )
    assert stored["winner"] == "both_bad"
    assert stored["settings"] == {**SETTINGS, "model": "tuned"}
    created = datetime.fromisoformat(stored["created_at"])
    assert created.utcoffset() == UTC.utcoffset(None)
    assert abs((datetime.now(UTC) - created).total_seconds()) < 3600
    with sqlite3.connect(path) as connection:  # stored as JSON text, readable by any SQLite tool
        raw = connection.execute("SELECT conversation, settings FROM votes").fetchone()
    assert json.loads(raw[0]) == CONVERSATION and json.loads(raw[1])["top_p"] == 0.9


def test_bad_winner_is_refused_by_the_code_and_by_the_table(tmp_path):
    path = init_votes_db(tmp_path / "votes.sqlite")
    with pytest.raises(ValueError, match="winner"):
        vote(path, winner="A")
    with sqlite3.connect(path) as connection, pytest.raises(sqlite3.IntegrityError):
        connection.execute(
            "INSERT INTO votes (created_at, conversation, reply_a, reply_b, model_a, model_b, winner, settings) "
            "VALUES ('t', '[]', '', '', 'x', 'y', 'left', '{}')"
        )
    assert read_votes(path) == []


def test_restart_keeps_the_votes(tmp_path):
    path = tmp_path / "votes.sqlite"
    init_votes_db(path)
    first = [vote(path), vote(path, winner="tie")]
    init_votes_db(path)  # a new server start on the same file
    third = vote(path, winner="b")
    assert [row["id"] for row in read_votes(path)] == first + [third]
    assert third > max(first)


def test_concurrent_writers_in_threads_lose_nothing(tmp_path):
    path = str(init_votes_db(tmp_path / "votes.sqlite"))
    ids: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def writer(index: int) -> None:
        try:
            start.wait()
            ids.extend(write_votes(path, index, 25))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    stored = read_votes(path)
    assert len(stored) == len(ids) == 200 and len(set(ids)) == 200
    assert {row["reply_a"] for row in stored} == {f"w{w}-{i}" for w in range(8) for i in range(25)}


def test_concurrent_writers_in_processes_lose_nothing(tmp_path):
    path = str(init_votes_db(tmp_path / "votes.sqlite"))
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        results = pool.starmap(write_votes, [(path, writer, 20) for writer in range(3)])
    assert sum(len(ids) for ids in results) == 60
    assert len(read_votes(path)) == 60


def test_concurrent_votes_on_one_comparison_store_one_row(tmp_path):
    """Twenty requests racing to vote on the same two replies (opposite winners): one row, the others are told."""
    path = str(init_votes_db(tmp_path / "votes.sqlite"))
    vote(path, winner="tie")  # another comparison's vote, untouched
    start = threading.Barrier(20)
    stored, refused, errors = [], [], []

    def voter(index: int) -> None:
        try:
            start.wait()
            winner = ("a", "b")[index % 2]
            stored.append(
                record_vote(
                    path,
                    CONVERSATION,
                    "Fine.",
                    "Good.",
                    "tuned",
                    "gpt2",
                    winner,
                    {**SETTINGS, "model": "tuned"},
                    comparison="c1",
                )
            )
        except VoteAlreadyCounted as error:
            refused.append(str(error))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=voter, args=(index,)) for index in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(stored) == 1 and len(refused) == 19
    assert "comparison c1 already has its vote" in refused[0]
    rows = read_votes(path)
    assert len(rows) == 2 and [row["comparison"] for row in rows][1] == "c1" and rows[1]["id"] == stored[0]
    assert summarize_votes(path)["pairs"][0]["votes"] == 2
    with sqlite3.connect(path) as connection, pytest.raises(sqlite3.IntegrityError):  # the table itself refuses
        connection.execute(
            "INSERT INTO votes (created_at, conversation, reply_a, reply_b, model_a, model_b, winner, settings, "
            "comparison) VALUES ('t', '[]', '', '', 'x', 'y', 'a', '{}', 'c1')"
        )


OLD_SCHEMA = """CREATE TABLE votes (id INTEGER PRIMARY KEY AUTOINCREMENT, created_at TEXT NOT NULL,
    conversation TEXT NOT NULL, reply_a TEXT NOT NULL, reply_b TEXT NOT NULL, model_a TEXT NOT NULL,
    model_b TEXT NOT NULL, winner TEXT NOT NULL, settings TEXT NOT NULL)"""


def old_database(path, rows) -> None:
    """A votes database as gpt2ft wrote it before the comparison id: (created_at, reply_a, winner) a row."""
    with sqlite3.connect(path) as connection:
        connection.execute(OLD_SCHEMA)
        connection.executemany(
            "INSERT INTO votes (created_at, conversation, reply_a, reply_b, model_a, model_b, winner, settings) "
            "VALUES (?, ?, ?, 'Good.', 'tuned', 'gpt2', ?, '{}')",
            [(created, json.dumps(CONVERSATION), reply, winner) for created, reply, winner in rows],
        )


def test_a_database_from_before_the_comparison_id_keeps_the_first_of_duplicate_votes(tmp_path):
    path = tmp_path / "votes.sqlite"
    old_database(
        path,
        [
            ("2025-01-31T12:00:00+00:00", "Fine.", "a"),
            ("2025-01-31T12:00:01+00:00", "Fine.", "b"),  # the race: the same replies voted on again at once
            ("2025-01-31T12:00:01+00:00", "Other.", "b"),  # another comparison
            ("2025-01-31T12:05:00+00:00", "Fine.", "b"),  # the same replies shown again minutes later: a new vote
        ],
    )
    before = path.read_bytes()
    read = load_votes(path)  # `votes` and `prefer` read it as it is, never changing it
    assert [v["id"] for v in read.votes] == [1, 3, 4] and read.duplicates == [2] and path.read_bytes() == before
    assert summarize_votes(path)["skipped"] == {"unreadable": 0, "duplicates": 1}

    init_votes_db(path)  # `serve` opens it: the column, its unique index, the duplicate moved aside
    with sqlite3.connect(path) as connection:
        assert "comparison" in [row[1] for row in connection.execute("PRAGMA table_info(votes)")]
        assert connection.execute("SELECT id, winner FROM duplicate_votes").fetchall() == [(2, "b")]
    assert [(v["id"], v["winner"]) for v in read_votes(path)] == [(1, "a"), (3, "b"), (4, "b")]
    vote(path)
    with pytest.raises(VoteAlreadyCounted):
        record_vote(
            path, CONVERSATION, "x", "y", "tuned", "gpt2", "a", SETTINGS, comparison=read_votes(path)[-1]["comparison"]
        )
    init_votes_db(path)  # again: nothing more to do
    assert len(read_votes(path)) == 4


def test_rows_with_null_or_numbers_are_skipped_and_counted_everywhere(tmp_path, capsys):
    """A table another tool wrote (no column types, so numbers stay numbers): `votes` and tally_votes skip and count
    the rows whose winner, models or replies are not text, instead of failing while sorting."""
    path = tmp_path / "foreign.sqlite"
    with sqlite3.connect(path) as connection:
        connection.execute(
            "CREATE TABLE votes (id INTEGER PRIMARY KEY, created_at, conversation, reply_a, reply_b, model_a, "
            "model_b, winner, settings)"
        )
        rows = [("tuned", "gpt2", "a", "Fine."), (None, "gpt2", "a", "x"), (5, "gpt2", "b", "y")]
        rows += [("tuned", "gpt2", None, "z"), ("tuned", "gpt2", 3, "w"), ("tuned", 7.5, "a", "v"), ("t", "g", "a", 1)]
        connection.executemany(
            "INSERT INTO votes (created_at, conversation, reply_a, reply_b, model_a, model_b, winner, settings) "
            "VALUES ('t', ?, ?, '', ?, ?, ?, NULL)",
            [(json.dumps(CONVERSATION), reply, model_a, model_b, winner) for model_a, model_b, winner, reply in rows],
        )
    read = load_votes(path)
    assert [v["id"] for v in read.votes] == [1] and read.unreadable == [2, 3, 4, 5, 6, 7]
    assert main(["votes", "--db", str(path)]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["skipped"] == {"unreadable": 6, "duplicates": 0}
    assert [(p["model"], p["votes"]) for p in payload["pairs"]] == [("gpt2", 1)]

    # Imported here: both load transformers, which the rest of this module does without.
    from gpt2ft.preferences import SKIP_BAD_ROW, Skips, votes_records
    from gpt2ft.serve import results_rows

    shown = [[re.sub("<[^>]+>", "", str(cell)) for cell in row[:3]] for row in results_rows(path, {})]
    assert shown == [["gpt2", "tuned", "1"]]  # serve's Results tab (names in a hover cell)
    skips = Skips()
    records, counts = votes_records(path, "dpo", skips)  # what `prefer --data` learns from
    assert len(records) == 1 and counts["votes"] == 1
    assert skips.counts[SKIP_BAD_ROW] == 6 and skips.first[SKIP_BAD_ROW].endswith("vote 2")


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path):
    path = tmp_path / "votes.sqlite"
    path.write_text("not a database\n" * 100)
    with pytest.raises(VotesError, match="votes.sqlite"):
        init_votes_db(path)
    with pytest.raises(VotesError, match="no such file"):
        read_votes(tmp_path / "missing.sqlite")


# --------------------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "successes, total, low, high",
    [
        # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I, method 3 (Wilson).
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
        (8, 10, 0.4902, 0.9433),
        (10, 10, 0.7225, 1.0),
    ],
)
def test_wilson_interval_matches_published_values(successes, total, low, high):
    assert wilson_interval(successes, total) == pytest.approx((low, high), abs=5e-5)


def test_wilson_interval_without_votes_is_uninformative():
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_tally_counts_from_the_served_models_side_whatever_the_shuffle():
    votes = [
        # (model_a, model_b, winner): "tuned" was serve --model each time, shown as A or B at random.
        ("tuned", "gpt2", "a"),  # tuned wins
        ("gpt2", "tuned", "b"),  # tuned wins
        ("gpt2", "tuned", "a"),  # tuned loses
        ("tuned", "gpt2", "tie"),
        ("gpt2", "tuned", "both_bad"),
        ("tuned", "other", "b"),  # another pair: tuned loses
    ]
    rows = [{"model_a": a, "model_b": b, "winner": w, "settings": {**SETTINGS, "model": "tuned"}} for a, b, w in votes]
    pairs = tally_votes(rows)
    assert [(p["model"], p["opponent"]) for p in pairs] == [("tuned", "gpt2"), ("tuned", "other")]
    main_pair = pairs[0]
    assert {k: main_pair[k] for k in ("votes", "wins", "losses", "ties", "both_bad")} == {
        "votes": 5,
        "wins": 2,
        "losses": 1,
        "ties": 1,
        "both_bad": 1,
    }
    assert main_pair["win_rate"] == pytest.approx(3 / 5)  # 2 wins + half of (1 tie + 1 both bad)
    low, high = wilson_interval(3, 5)
    assert (main_pair["ci95_low"], main_pair["ci95_high"]) == pytest.approx((low, high), abs=1e-4)
    assert pairs[1]["losses"] == 1 and pairs[1]["win_rate"] == 0.0


def test_tally_counts_a_row_without_the_served_model_from_one_consistent_side():
    rows = [
        {"model_a": "b-model", "model_b": "a-model", "winner": "a", "settings": {}},
        {"model_a": "a-model", "model_b": "b-model", "winner": "a", "settings": None},
    ]
    [pair] = tally_votes(rows)
    assert (pair["model"], pair["opponent"], pair["wins"], pair["losses"]) == ("a-model", "b-model", 1, 1)


# --------------------------------------------------------------------------------------------------------------
# `python -m gpt2ft votes`
# --------------------------------------------------------------------------------------------------------------


def test_votes_command_prints_one_json_line(tmp_path, capsys):
    path = init_votes_db(tmp_path / "votes.sqlite")
    vote(path, winner="a")
    vote(path, model_a="gpt2", model_b="tuned", winner="a")
    assert main(["votes", "--db", str(path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    payload = json.loads(lines[0])
    assert payload == summarize_votes(path)
    [pair] = payload["pairs"]
    assert set(pair) == {
        "model",
        "opponent",
        "votes",
        "wins",
        "losses",
        "ties",
        "both_bad",
        "win_rate",
        "ci95_low",
        "ci95_high",
    }
    assert (pair["model"], pair["opponent"], pair["votes"], pair["wins"], pair["losses"]) == ("tuned", "gpt2", 2, 1, 1)
    assert pair["win_rate"] == 0.5 and 0 < pair["ci95_low"] < 0.5 < pair["ci95_high"] < 1


def test_votes_command_on_a_missing_database_is_a_one_line_error(tmp_path, capsys):
    missing = tmp_path / "nope.sqlite"
    assert main(["votes", "--db", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope.sqlite" in err and "Traceback" not in err
    assert not missing.exists()  # reading never creates the file
