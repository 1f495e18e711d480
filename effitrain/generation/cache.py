"""The request cache: answers kept by their request's key (backend, model content, sampling parameters, prompt).

One SQLite file (``$EFFITRAIN_CACHE/generation/requests.sqlite``) shared by every run: a stage killed mid-chunk
finds the answers it already had, and a second run with the same inputs sends nothing.  SQLite, because a commit
is atomic and durable through a SIGKILL (its journal), several processes may use the file at once, and it is in
the standard library.  Answers are written one group at a time (a batch of one ``generate`` call, or one HTTP
request), in one transaction each.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Optional

from effitrain.generation.backends import Answer

FILE = "requests.sqlite"


class RequestCache:
    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / FILE
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), timeout=60, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a commit that returned survives a kill of the process
        self._db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, texts TEXT NOT NULL, "
                         "tokens INTEGER NOT NULL)")

    def get(self, key: str) -> Optional[Answer]:
        with self._lock:
            row = self._db.execute("SELECT texts, tokens FROM answers WHERE key = ?", (key,)).fetchone()
        return None if row is None else Answer(tuple(json.loads(row[0])), int(row[1]))

    def put_many(self, pairs: list[tuple[str, Answer]]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT OR REPLACE INTO answers (key, texts, tokens) VALUES (?, ?, ?)",
                                     [(k, json.dumps(list(a.texts), ensure_ascii=False), a.tokens) for k, a in pairs])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()


class NoCache:
    """``cache_requests: false``: every request is sent (the chunk files still make a resume lose nothing)."""

    def get(self, key: str) -> Optional[Answer]:
        return None

    def put_many(self, pairs: list[tuple[str, Answer]]) -> None:
        pass

    def close(self) -> None:
        pass
