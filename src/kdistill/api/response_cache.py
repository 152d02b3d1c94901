"""A durable cache of teacher API answers: SQLite, one row per request, written as each answer arrives.

A run that is killed resumes without paying twice: every finished answer was committed in its own
transaction before the next one was asked for, and WAL mode with ``synchronous=FULL`` keeps a
committed row through a crash. The key is the sha256 of the canonical JSON of what was asked (the
endpoint, the full request body with model and sampling settings, and the candidate index), so the
same question is one row however often it is asked. Only request bodies and response bodies are
stored: the API key travels in a header and never reaches this file.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from kdistill.errors import CheckpointError

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key      TEXT PRIMARY KEY,   -- request_key(endpoint, body, candidate)
    endpoint TEXT NOT NULL,      -- e.g. /chat/completions
    request  TEXT NOT NULL,      -- the JSON body that was sent
    response TEXT NOT NULL,      -- the JSON body that came back
    created  REAL NOT NULL       -- unix time the answer arrived
)
"""


def canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def request_key(endpoint: str, body: dict, candidate: int = 0) -> str:
    """The cache key of one request. ``candidate`` tells several samples of the same request apart
    (temperature > 0): each is its own row, while asking again for candidate i returns the cached one."""
    return hashlib.sha256(canonical_json({"endpoint": endpoint, "body": body, "candidate": candidate})
                          .encode("utf-8")).hexdigest()


class ResponseCache:
    """``cache.get(key)`` -> the response dict or None; ``cache.put(key, endpoint, request, response)``.
    Thread safe (one connection behind a lock); several processes may share a file (SQLite locking)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            # autocommit (isolation_level=None): each INSERT is its own transaction, committed at once
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(SCHEMA)
        except sqlite3.DatabaseError as err:
            raise CheckpointError(f"response cache {self.path} is not a usable SQLite file ({err}): "
                                  "move it away or point cache_path elsewhere") from None

    def get(self, key: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, endpoint: str, request: dict, response: dict) -> bool:
        """Store one answer; False when the key was already there (the first answer wins)."""
        with self._lock:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO responses (key, endpoint, request, response, created) VALUES (?, ?, ?, ?, ?)",
                (key, endpoint, canonical_json(request), canonical_json(response), time.time()))
        return cursor.rowcount == 1

    def discard(self, key: str) -> None:
        """Forget one answer (one that parsed but is unusable to its caller), so that it is asked again."""
        with self._lock:
            self._db.execute("DELETE FROM responses WHERE key = ?", (key,))

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM responses WHERE key = ?", (key,)).fetchone() is not None

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def rows(self) -> Iterator[dict]:
        """Every cached answer with its request, oldest first (provenance for synthesized data)."""
        with self._lock:
            rows = self._db.execute("SELECT key, endpoint, request, response, created FROM responses "
                                    "ORDER BY created").fetchall()
        for key, endpoint, request, response, created in rows:
            yield {"key": key, "endpoint": endpoint, "request": json.loads(request),
                   "response": json.loads(response), "created": created}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ResponseCache({str(self.path)!r})"
