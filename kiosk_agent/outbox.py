"""The durable outbox: every reliable message waits on disk until the bridge commits.

A message leaves the outbox only when the bridge's commit confirmation covers its
sequence numbers; a broker PUBACK proves nothing (amqtt acknowledges publishes its
ACL then drops). Messages published but not confirmed within a timeout are sent
again, and after a reconnect or restart everything pending is replayed in order.

The store is SQLite in WAL mode with ``synchronous=FULL``, so a committed append
survives power loss. Sequence numbers come from a counter in the same file and
never repeat, across restarts included.

Bounds: at most ``max_messages`` rows and ``max_age_seconds`` of age. Past either,
the oldest rows are dropped, logged at warning level and counted in ``dropped``; the
next message's ``floor`` tells the bridge those seqs are not coming.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiosk_agent.errors import AgentError

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    first_seq  INTEGER PRIMARY KEY,
    last_seq   INTEGER NOT NULL,
    leaf       TEXT    NOT NULL,
    body       TEXT    NOT NULL,
    created_at REAL    NOT NULL,
    sent_at    REAL,
    sends      INTEGER NOT NULL DEFAULT 0
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('next_seq', 0), ('dropped', 0);
"""


@dataclass(frozen=True, slots=True)
class Pending:
    """One outbox row: a message covering seqs ``first_seq..last_seq``."""

    first_seq: int
    last_seq: int
    leaf: str
    body: Any  # a list of reading dicts, or one event dict
    sends: int


class Outbox:
    """A persistent FIFO keyed by sequence number; safe to share between threads."""

    def __init__(
        self,
        path: Path,
        *,
        max_messages: int = 100_000,
        max_age_seconds: float = 7 * 24 * 3600,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.max_messages = max_messages
        self.max_age_seconds = max_age_seconds
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            (count,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
            self._count = int(count)
        except sqlite3.Error as exc:
            raise AgentError(f"cannot open outbox {path}: {exc}") from exc

    def close(self) -> None:
        """Close the database file."""
        with self._lock:
            self._db.close()

    # -- append ---------------------------------------------------------------

    def add_readings(self, readings: Sequence[dict[str, Any]]) -> list[int]:
        """Store readings as one message; return the seqs given to them."""
        return self._add("readings", list(readings), as_list=True)

    def add_event(self, event: dict[str, Any]) -> int:
        """Store one scan event; return its seq."""
        return self._add("events", [event], as_list=False)[0]

    def _add(
        self, leaf: str, items: list[dict[str, Any]], *, as_list: bool
    ) -> list[int]:
        if not items:
            raise ValueError("nothing to add")
        now = time.time()
        with self._lock, self._transaction():
            first = self._meta("next_seq")
            seqs = list(range(first, first + len(items)))
            numbered = [{**item, "seq": s} for item, s in zip(items, seqs, strict=True)]
            body = json.dumps(
                numbered if as_list else numbered[0], separators=(",", ":")
            )
            self._db.execute(
                "INSERT INTO outbox (first_seq, last_seq, leaf, body, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (first, seqs[-1], leaf, body, now),
            )
            self._count += 1
            self._db.execute(
                "UPDATE meta SET value = ? WHERE key = 'next_seq'", (seqs[-1] + 1,)
            )
            self._enforce_bounds(now)
        return seqs

    def _enforce_bounds(self, now: float) -> None:
        """Drop the oldest rows past the size or age bound; log and count them."""
        excess = max(0, self._count - self.max_messages)
        cutoff = now - self.max_age_seconds
        oldest = self._db.execute(
            "SELECT created_at FROM outbox ORDER BY first_seq LIMIT 1"
        ).fetchone()
        if not excess and (oldest is None or oldest[0] >= cutoff):
            return  # the common case: two index lookups, no scan
        # Rows are appended in time order, so the doomed ones are a prefix.
        doomed: list[tuple[int, int]] = []
        for first, last, created in self._db.execute(
            "SELECT first_seq, last_seq, created_at FROM outbox ORDER BY first_seq"
        ):
            if len(doomed) >= excess and created >= cutoff:
                break
            doomed.append((first, last))
        dropped_seqs = sum(last - first + 1 for first, last in doomed)
        self._db.executemany(
            "DELETE FROM outbox WHERE first_seq = ?", [(first,) for first, _ in doomed]
        )
        self._count -= len(doomed)
        self._db.execute(
            "UPDATE meta SET value = value + ? WHERE key = 'dropped'", (dropped_seqs,)
        )
        log.warning(
            "outbox over its bounds (%d messages, %.0f s): dropped %d oldest seqs %d..%d",
            self.max_messages,
            self.max_age_seconds,
            dropped_seqs,
            doomed[0][0],
            doomed[-1][1],
        )

    # -- publish side -----------------------------------------------------------

    def due(self, resend_after_seconds: float, limit: int = 100) -> list[Pending]:
        """Return unsent rows and rows whose confirmation is overdue, oldest first."""
        cutoff = time.time() - resend_after_seconds
        with self._lock:
            rows = self._db.execute(
                "SELECT first_seq, last_seq, leaf, body, sends FROM outbox"
                " WHERE sent_at IS NULL OR sent_at < ? ORDER BY first_seq LIMIT ?",
                (cutoff, limit),
            ).fetchall()
        return [
            Pending(f, last, leaf, json.loads(body), n)
            for f, last, leaf, body, n in rows
        ]

    def mark_sent(self, first_seqs: Sequence[int]) -> None:
        """Record that these rows were handed to the broker now."""
        now = time.time()
        with self._lock, self._transaction():
            self._db.executemany(
                "UPDATE outbox SET sent_at = ?, sends = sends + 1 WHERE first_seq = ?",
                [(now, s) for s in first_seqs],
            )

    def replay_all(self) -> None:
        """Mark every row unsent, so the next pass republishes all in seq order."""
        with self._lock:
            self._db.execute("UPDATE outbox SET sent_at = NULL")

    def release(self, through: int) -> int:
        """Delete every row wholly at or below ``through``; return how many."""
        with self._lock:
            cur = self._db.execute("DELETE FROM outbox WHERE last_seq <= ?", (through,))
            self._count -= cur.rowcount
        if cur.rowcount:
            log.debug("released %d messages through seq %d", cur.rowcount, through)
        return cur.rowcount

    # -- introspection ----------------------------------------------------------

    def floor(self) -> int:
        """Return the lowest seq still held (or the next seq when empty)."""
        with self._lock:
            (lowest,) = self._db.execute("SELECT MIN(first_seq) FROM outbox").fetchone()
            return int(lowest) if lowest is not None else self._meta("next_seq")

    def depth(self) -> int:
        """Return the number of messages waiting for confirmation."""
        with self._lock:
            return self._count

    @property
    def dropped(self) -> int:
        """Return how many seqs the bounds policy has dropped, ever."""
        with self._lock:
            return self._meta("dropped")

    @property
    def next_seq(self) -> int:
        """Return the seq the next message will get."""
        with self._lock:
            return self._meta("next_seq")

    def _meta(self, key: str) -> int:
        (value,) = self._db.execute(
            "SELECT value FROM meta WHERE key = ?", (key,)
        ).fetchone()
        return int(value)

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on error."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")
