"""Text-embedding cache: an in-memory LRU, optionally in front of a SQLite file (WAL) shared by processes.

Keys are the prompt's token ids up to its first <|endoftext|> (all the causal text tower pools over),
namespaced by the artifacts' fingerprint and precision, so re-exported or re-quantised towers never
get old vectors. A corrupt cache file is moved aside with a warning and rebuilt; a damaged row is a miss.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
import warnings
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

log = logging.getLogger("pickscore")

SCHEMA = """
CREATE TABLE IF NOT EXISTS embeddings (
    namespace TEXT NOT NULL, key BLOB NOT NULL, vector BLOB NOT NULL, PRIMARY KEY (namespace, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS stats (namespace TEXT PRIMARY KEY, hits INTEGER NOT NULL, misses INTEGER NOT NULL);
"""


def token_key(ids: np.ndarray) -> bytes:
    """The cache key of one (padded) row of input ids: the ids through the first end token."""
    end = int(np.argmax(ids))  # argmax = first <|endoftext|>, the token the tower pools at
    return ids[: end + 1].astype("<i4").tobytes()


class CacheCorruptWarning(UserWarning):
    pass


class SqliteVectorStore:
    """float32 vectors by (namespace, key) in one SQLite file; safe for several processes."""

    def __init__(self, path: str | Path, dim: int):
        self.path, self.dim = Path(path), dim
        self._lock = threading.Lock()
        self._pending_stats: dict[str, list[int]] = {}
        self._conn = self._open()
        weakref.finalize(self, SqliteVectorStore._close_conn, self._conn, self._pending_stats)

    def _open(self) -> sqlite3.Connection:
        try:
            return self._connect()
        except sqlite3.DatabaseError as e:
            return self._recover(e)

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=60, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA busy_timeout = 60000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.executescript(SCHEMA)
        conn.execute("SELECT count(*) FROM embeddings LIMIT 1").fetchone()
        return conn

    def _recover(self, error: Exception) -> sqlite3.Connection:
        aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        warnings.warn(f"text cache {self.path} is unreadable ({error}); moved to {aside.name} and rebuilt. "
                      "Results are unaffected; cached prompts will be recomputed.", CacheCorruptWarning, stacklevel=3)
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                src.replace(Path(str(aside) + suffix))
        return self._connect()

    def get_many(self, namespace: str, keys: list[bytes]) -> dict[bytes, np.ndarray]:
        found: dict[bytes, np.ndarray] = {}
        with self._lock:
            for start in range(0, len(keys), 500):  # SQLite's variable limit
                chunk = keys[start : start + 500]
                try:
                    rows = self._conn.execute(
                        f"SELECT key, vector FROM embeddings WHERE namespace = ? AND key IN ({','.join('?' * len(chunk))})",
                        [namespace, *chunk]).fetchall()
                except sqlite3.DatabaseError as e:
                    self._conn = self._recover(e)
                    return {}
                for key, blob in rows:
                    if len(blob) == self.dim * 4:  # a damaged row is a miss, never a wrong vector
                        found[bytes(key)] = np.frombuffer(blob, dtype="<f4").copy()
        return found

    def put_many(self, namespace: str, items: dict[bytes, np.ndarray]) -> None:
        rows = [(namespace, k, np.asarray(v, dtype="<f4").tobytes()) for k, v in items.items()]
        with self._lock:
            try:
                with self._transaction():
                    self._conn.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?)", rows)
                    self._flush_stats()
            except sqlite3.DatabaseError as e:
                self._conn = self._recover(e)

    def count(self, namespace: str, hits: int, misses: int) -> None:
        pending = self._pending_stats.setdefault(namespace, [0, 0])
        pending[0] += hits
        pending[1] += misses

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        # IMMEDIATE takes the write lock up front, so concurrent writers queue on busy_timeout
        # instead of failing at commit.
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def _flush_stats(self) -> None:
        SqliteVectorStore._write_stats(self._conn, self._pending_stats)

    @staticmethod
    def _write_stats(conn: sqlite3.Connection, pending: dict[str, list[int]]) -> None:
        for namespace, (hits, misses) in pending.items():
            conn.execute("INSERT INTO stats VALUES (?, ?, ?) ON CONFLICT(namespace) DO UPDATE SET "
                         "hits = hits + excluded.hits, misses = misses + excluded.misses", (namespace, hits, misses))
        pending.clear()

    @staticmethod
    def _close_conn(conn: sqlite3.Connection, pending: dict[str, list[int]]) -> None:
        try:
            if pending:
                SqliteVectorStore._write_stats(conn, pending)
            conn.close()
        except sqlite3.Error:
            pass

    def close(self) -> None:
        with self._lock:
            self._close_conn(self._conn, self._pending_stats)


class TextEmbeddingCache:
    """LRU in memory (capacity entries), backed by an optional SqliteVectorStore."""

    def __init__(self, namespace: str, dim: int, capacity: int = 4096, path: str | Path | None = None):
        self.namespace, self.capacity = namespace, capacity
        self._lru: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.store = SqliteVectorStore(path, dim) if path is not None else None
        self.hits = self.misses = 0

    def get_many(self, keys: Iterable[bytes]) -> dict[bytes, np.ndarray]:
        keys = list(dict.fromkeys(keys))
        found: dict[bytes, np.ndarray] = {}
        with self._lock:
            for k in keys:
                if k in self._lru:
                    self._lru.move_to_end(k)
                    found[k] = self._lru[k]
        missing = [k for k in keys if k not in found]
        if missing and self.store is not None:
            from_disk = self.store.get_many(self.namespace, missing)
            self._remember(from_disk)
            found.update(from_disk)
        hits, misses = len(found), len(keys) - len(found)
        self.hits, self.misses = self.hits + hits, self.misses + misses
        if self.store is not None:
            self.store.count(self.namespace, hits, misses)
        return found

    def put_many(self, items: dict[bytes, np.ndarray]) -> None:
        self._remember(items)
        if self.store is not None and items:
            self.store.put_many(self.namespace, items)

    def _remember(self, items: dict[bytes, np.ndarray]) -> None:
        with self._lock:
            for k, v in items.items():
                self._lru[k] = v
                self._lru.move_to_end(k)
            while len(self._lru) > self.capacity:
                self._lru.popitem(last=False)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def cache_stats(path: str | Path) -> dict:
    """What `pickscore cache stats PATH` prints: per namespace, entries, hits and misses."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no text cache at {path}")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
    try:
        entries = dict(conn.execute("SELECT namespace, count(*) FROM embeddings GROUP BY namespace").fetchall())
        counts = {ns: (h, m) for ns, h, m in conn.execute("SELECT namespace, hits, misses FROM stats").fetchall()}
    finally:
        conn.close()
    namespaces = sorted(set(entries) | set(counts))
    return {"path": str(path), "bytes": path.stat().st_size, "namespaces": [
        {"namespace": ns, "entries": entries.get(ns, 0), "hits": counts.get(ns, (0, 0))[0],
         "misses": counts.get(ns, (0, 0))[1]} for ns in namespaces]}
