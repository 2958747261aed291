"""Blind A/B votes between two models: stored in SQLite, counted per pair with a 95% Wilson interval.

    python -m gpt2ft serve --model gpt2_finetuned --votes-db logs/votes.sqlite   # the web page casts the votes
    python -m gpt2ft votes --db logs/votes.sqlite                               # one JSON line of results

One row a vote, in table `votes`: `id`, `created_at` (UTC, ISO 8601), `conversation` (JSON list of the messages
{"role", "content"} before the two replies), `reply_a`, `reply_b`, `model_a`, `model_b` (the models as the page
showed them, after the random shuffle), `winner` (`a`, `b`, `tie` or `both_bad`) and `settings` (JSON: the decoding
settings both models used, the labels asked for under `controls` (serve.asked_controls), plus `model`, the model that
was `serve --model` when the vote was cast; results are counted from its side) and `comparison` (the id the page gave
the two replies: one vote a comparison, enforced by a unique index, so two requests racing to vote on the same
replies store one row).

Rows another tool wrote whose winner, models or replies are not text (NULL, numbers) are skipped and counted, never
fatal (`load_votes`). A table from before the comparison id gets the column and its index when `serve` next opens
it; duplicate votes it already holds (the same replies voted on again within seconds: the race the key now
prevents) are moved to table `duplicate_votes`, the first of each kept.

The database is in WAL mode and every write is one short transaction on its own connection, so several browser
sessions (threads of one server, or several servers) can vote at once: a writer that finds the file locked waits
for it (up to `BUSY_TIMEOUT_S`) instead of failing.
"""

from __future__ import annotations

import json
import math
import sqlite3
import uuid
from collections.abc import Iterable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .config import VOTES_DB
from .errors import Gpt2ftError

DEFAULT_VOTES_DB = VOTES_DB  # also `prefer --data`'s default: the page's votes are what preference tuning learns from
WINNERS = ("a", "b", "tie", "both_bad")
BUSY_TIMEOUT_S = 30.0
Z_95 = 1.959963984540054  # the standard normal quantile for a two-sided 95% interval

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at TEXT NOT NULL,
    conversation TEXT NOT NULL,
    reply_a TEXT NOT NULL,
    reply_b TEXT NOT NULL,
    model_a TEXT NOT NULL,
    model_b TEXT NOT NULL,
    winner TEXT NOT NULL CHECK (winner IN ({", ".join(repr(w) for w in WINNERS)})),
    settings TEXT NOT NULL,
    comparison TEXT
)
"""
# NULLs are distinct in a unique index: rows stored before the comparison id existed keep NULL.
COMPARISON_INDEX = "CREATE UNIQUE INDEX IF NOT EXISTS votes_one_per_comparison ON votes (comparison)"
COLUMNS = (
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
)
REQUIRED_COLUMNS = COLUMNS[:-1]  # what a votes table must have; `comparison` is added to older ones
DUPLICATE_WINDOW_S = 10.0  # a vote without a comparison id on the same replies this soon after another is a duplicate


class VotesError(Gpt2ftError, ValueError):
    """The votes database cannot be opened, written or read; the message names the file."""


class VoteAlreadyCounted(VotesError):
    """The comparison already has its vote (another request for it was stored first)."""


def connect(path: str | Path) -> sqlite3.Connection:
    """A connection to the votes database that waits for a lock instead of failing (autocommit off)."""
    connection = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S)
    connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    return connection


def init_votes_db(path: str | Path) -> Path:
    """Create the database (and its folder) if needed, switch it to WAL mode and make sure table `votes` exists.

    Returns:
        The database path.
    Raises:
        VotesError: the file cannot be created or is not an SQLite database.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with closing(connect(path)) as connection:
            # WAL: readers never block the writer and a writer never blocks readers; the mode is stored in the file,
            # so every later connection (other sessions, other processes) uses it too.
            mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            with connection:
                connection.execute(SCHEMA)
            missing = [name for name in REQUIRED_COLUMNS if name not in table_columns(connection)]
            if not missing:
                add_comparison_key(connection)
    except (OSError, sqlite3.Error) as error:
        raise VotesError(f"votes database {path}: cannot be opened ({error})") from None
    if str(mode).lower() != "wal":
        raise VotesError(f"votes database {path}: cannot switch to WAL mode (the filesystem may not support it)")
    if missing:
        raise VotesError(f"votes database {path}: table votes lacks the columns {', '.join(missing)}")
    return path


def table_columns(connection: sqlite3.Connection) -> list[str]:
    return [row[1] for row in connection.execute("PRAGMA table_info(votes)")]


def add_comparison_key(connection: sqlite3.Connection) -> int:
    """Make sure the table has the `comparison` column and its unique index; a table from before them gets both in
    one transaction (under the write lock, so two servers starting at once migrate once), its duplicate votes
    (duplicate_vote_ids) moved to table `duplicate_votes`, the first of each kept.

    Returns:
        The number of duplicate votes moved.
    """
    connection.execute("BEGIN IMMEDIATE")
    try:
        moved: list[int] = []
        if "comparison" not in table_columns(connection):
            connection.execute("ALTER TABLE votes ADD COLUMN comparison TEXT")
            rows = connection.execute(f"SELECT {', '.join(COLUMNS)} FROM votes ORDER BY id").fetchall()
            moved = duplicate_vote_ids([dict(zip(COLUMNS, row)) for row in rows])
            if moved:
                connection.execute("CREATE TABLE IF NOT EXISTS duplicate_votes AS SELECT * FROM votes WHERE 0")
                ids = [(row_id,) for row_id in moved]
                connection.executemany("INSERT INTO duplicate_votes SELECT * FROM votes WHERE id = ?", ids)
                connection.executemany("DELETE FROM votes WHERE id = ?", ids)
        connection.execute(COMPARISON_INDEX)
        connection.commit()
    except BaseException:
        connection.rollback()
        raise
    return len(moved)


def stored_within(first: Any, second: Any, seconds: float) -> bool:
    """Two created_at values at most `seconds` apart (equal, when either is not an ISO 8601 time)."""
    try:
        return abs(datetime.fromisoformat(first).timestamp() - datetime.fromisoformat(second).timestamp()) <= seconds
    except (TypeError, ValueError):
        return first == second


def duplicate_vote_ids(rows: Iterable[Mapping[str, Any]]) -> list[int]:
    """The ids of readable votes, among those without a comparison id (stored before it existed), that repeat an earlier
    vote: the same conversation, replies, models and settings, stored within DUPLICATE_WINDOW_S of it. That is two
    requests racing to vote on one comparison; the same comparison shown again takes a new round of generation, and
    a person reading it, so it comes later. Rows in id order; the first of each is kept."""
    kept: dict[tuple, list[Any]] = {}
    duplicates = []
    for row in rows:
        if row.get("comparison") is not None or not readable_vote(row):
            continue
        key = tuple(row.get(name) for name in ("conversation", "reply_a", "reply_b", "model_a", "model_b", "settings"))
        earlier = kept.setdefault(key, [])
        if any(stored_within(when, row.get("created_at"), DUPLICATE_WINDOW_S) for when in earlier):
            duplicates.append(row["id"])
        else:
            earlier.append(row.get("created_at"))
    return duplicates


def utc_now() -> str:
    """The current time, UTC, ISO 8601 with seconds (e.g. 2025-01-31T12:00:00+00:00)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def record_vote(
    path: str | Path,
    conversation: Sequence[Mapping[str, Any]],
    reply_a: str,
    reply_b: str,
    model_a: str,
    model_b: str,
    winner: str,
    settings: Mapping[str, Any],
    created_at: str | None = None,
    comparison: str | None = None,
) -> int:
    """Store one vote in its own transaction; the table must exist (init_votes_db).

    Args:
        conversation: the messages before the two replies, oldest first.
        reply_a, reply_b, model_a, model_b: the replies and their models in the order the page showed them.
        winner: "a", "b", "tie" or "both_bad".
        settings: the decoding settings, and `model` (the served model) whose side the results are counted from.
        comparison: the id of the two replies shown (the page makes one each round); at most one vote is stored for
            it. None: a new id (the vote is its own comparison).

    Returns:
        The new row's id.
    Raises:
        ValueError: `winner` is not one of WINNERS.
        VoteAlreadyCounted: the comparison already has a vote (stored by a request that came first).
        VotesError: the database cannot be written.
    """
    if winner not in WINNERS:
        raise ValueError(f"winner must be one of {', '.join(WINNERS)}, got {winner!r}")
    row = (
        created_at or utc_now(),
        json.dumps(list(conversation), ensure_ascii=False),
        reply_a,
        reply_b,
        model_a,
        model_b,
        winner,
        json.dumps(dict(settings), ensure_ascii=False, sort_keys=True),
        comparison or uuid.uuid4().hex,
    )
    try:
        with closing(connect(path)) as connection, connection:
            # One statement: the unique index decides which of two racing requests stores its vote, inside SQLite's
            # write lock, so no check-then-insert can interleave.
            cursor = connection.execute(
                "INSERT INTO votes (created_at, conversation, reply_a, reply_b, model_a, model_b, winner, settings, "
                "comparison) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (comparison) DO NOTHING",
                row,
            )
            if cursor.rowcount == 0:
                raise VoteAlreadyCounted(f"votes database {path}: comparison {row[-1]} already has its vote")
            return int(cursor.lastrowid)
    except sqlite3.Error as error:
        raise VotesError(f"votes database {path}: cannot store the vote ({error})") from None


@dataclass
class VotesRead:
    """The votes of a database, and the rows left out: ids of rows whose winner, models or replies are not text
    (`unreadable`: written by another tool), and of duplicate votes on one comparison from before the comparison id
    existed (`duplicates`: see duplicate_vote_ids; a database `serve` has opened since holds none)."""

    votes: list[dict[str, Any]]
    unreadable: list[int] = field(default_factory=list)
    duplicates: list[int] = field(default_factory=list)

    def skipped(self) -> dict[str, int]:
        return {"unreadable": len(self.unreadable), "duplicates": len(self.duplicates)}


def readable_vote(vote: Mapping[str, Any]) -> bool:
    """A winner of WINNERS, two model names and two replies, all text (an empty reply is a reply)."""
    return (
        isinstance(vote["winner"], str)
        and vote["winner"] in WINNERS
        and all(isinstance(vote[name], str) and vote[name] for name in ("model_a", "model_b"))
        and all(isinstance(vote[name], str) for name in ("reply_a", "reply_b"))
    )


def load_votes(path: str | Path) -> VotesRead:
    """Every readable vote, oldest first, with `conversation` and `settings` parsed from JSON, and the ids of the
    rows left out (VotesRead).

    Raises:
        VotesError: no such file, or not a votes database.
    """
    path = Path(path)
    if not path.is_file():
        raise VotesError(f"votes database {path}: no such file")
    try:
        # Read-only (mode=ro): counting votes must never create or change the file.
        with closing(
            sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
        ) as connection:
            present = set(table_columns(connection))
            names = [name for name in COLUMNS if name in present] if present else list(COLUMNS)
            rows = connection.execute(f"SELECT {', '.join(names)} FROM votes ORDER BY id").fetchall()
    except sqlite3.Error as error:
        raise VotesError(f"votes database {path}: cannot be read ({error})") from None
    missing = [name for name in REQUIRED_COLUMNS if name not in names]
    if missing:
        raise VotesError(f"votes database {path}: table votes lacks the columns {', '.join(missing)}")
    read = VotesRead([])
    raw = [{"comparison": None, **dict(zip(names, row))} for row in rows]
    duplicates = set(duplicate_vote_ids(raw))
    for vote in raw:
        if vote["id"] in duplicates:
            read.duplicates.append(vote["id"])
            continue
        if not readable_vote(vote):
            read.unreadable.append(vote["id"])
            continue
        for key in ("conversation", "settings"):
            try:
                vote[key] = json.loads(vote[key])
            except (TypeError, ValueError):
                vote[key] = None  # a row written by another tool: kept, its unreadable JSON field dropped
        read.votes.append(vote)
    return read


def read_votes(path: str | Path) -> list[dict[str, Any]]:
    """Every readable vote, oldest first (load_votes, without the ids of the rows left out).

    Raises:
        VotesError: no such file, or not a votes database.
    """
    return load_votes(path).votes


def wilson_interval(successes: float, total: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion (Wilson, 1927): unlike the normal approximation it stays inside [0, 1]
    and is sensible for few votes or a rate near 0 or 1.

    Args:
        successes: successes out of `total` (may be fractional: a tie counts half).
        total: trials; 0 gives the uninformative (0, 1).
        z: the normal quantile (1.96 for 95%).
    """
    if total <= 0:
        return 0.0, 1.0
    p = successes / total
    z2 = z * z
    centre = (p + z2 / (2 * total)) / (1 + z2 / total)
    half = z / (1 + z2 / total) * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total))
    return max(0.0, centre - half), min(1.0, centre + half)


def served_side(vote: Mapping[str, Any]) -> tuple[str, str, str | None]:
    """(model, opponent, result for model) of one vote: result is "win", "loss", "tie" or "both_bad".

    The model is the one that was `serve --model` (settings["model"]); for a row without it, the name that sorts
    first, so a pair is still counted from one consistent side.
    """
    model_a, model_b = vote["model_a"], vote["model_b"]
    settings = vote.get("settings") if isinstance(vote.get("settings"), Mapping) else {}
    model = settings.get("model")
    if model not in (model_a, model_b) or model_a == model_b:
        model = min(model_a, model_b)
    opponent = model_b if model == model_a else model_a
    winner = vote["winner"]
    if winner in ("tie", "both_bad"):
        return model, opponent, winner
    if winner not in ("a", "b"):
        return model, opponent, None
    won = (winner == "a") == (model == model_a)
    return model, opponent, "win" if won else "loss"


def tally_votes(votes: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Results per (model, opponent) pair, counted from the served model's side, most votes first.

    win_rate = (wins + half of the ties and both-bad votes) / votes: "both are bad" is a tie in the models'
    comparison (as in Chatbot Arena), but counted separately so it stays visible. ci95_low/ci95_high: its 95% Wilson
    interval.
    """
    counts: dict[tuple[str, str], dict[str, int]] = {}
    for vote in votes:
        model, opponent, result = served_side(vote)
        if result is None:
            continue
        pair = counts.setdefault((model, opponent), {"wins": 0, "losses": 0, "ties": 0, "both_bad": 0})
        pair[{"win": "wins", "loss": "losses", "tie": "ties", "both_bad": "both_bad"}[result]] += 1
    pairs = []
    for (model, opponent), pair in counts.items():
        total = sum(pair.values())
        score = pair["wins"] + 0.5 * (pair["ties"] + pair["both_bad"])
        low, high = wilson_interval(score, total)
        pairs.append(
            {
                "model": model,
                "opponent": opponent,
                "votes": total,
                **pair,
                "win_rate": round(score / total, 4),
                "ci95_low": round(low, 4),
                "ci95_high": round(high, 4),
            }
        )
    return sorted(pairs, key=lambda row: (-row["votes"], row["model"], row["opponent"]))


def summarize_votes(path: str | Path) -> dict[str, Any]:
    """What `python -m gpt2ft votes` prints: {"pairs": tally_votes(...), "skipped": {"unreadable": n,
    "duplicates": n}} (the rows left out, see load_votes)."""
    read = load_votes(path)
    return {"pairs": tally_votes(read.votes), "skipped": read.skipped()}
