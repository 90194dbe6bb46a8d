"""Text-embedding cache: an in-memory LRU, optionally in front of a SQLite file (WAL) shared by processes.

Keys are the prompt's token ids through its first <|endoftext|> (all the causal text tower reads),
namespaced by the artifacts' fingerprint and precision, so re-exported or re-quantised towers never get
old vectors.

A cache file is never lost silently, and no other file is ever touched. Only a file this cache made (its
header carries our application id) that is no longer a readable SQLite database, or that SQLite reports
as corrupt when it is opened, is moved aside (with a `CacheCorruptWarning`) and rebuilt; any other file
that is not a text cache is left exactly as it is (the CLI refuses it outright). A healthy file
that cannot be used as asked (read-only, locked by another process for longer than the busy timeout,
a full disk, another application's database, a directory) is left exactly as it is: the run goes on
with what can still be done (reads only, or the in-memory LRU alone) and says so once with a
`CacheWarning`. A damaged row is a miss, never a wrong vector.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
import urllib.parse
import warnings
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .errors import InputError

log = logging.getLogger("pickscore")

APPLICATION_ID = 0x50534331  # "PSC1" in the SQLite header: marks a file as this cache
SQLITE_MAGIC = b"SQLite format 3\x00"
TABLES = {"embeddings": ["namespace", "key", "vector"], "stats": ["namespace", "hits", "misses"]}
SCHEMA = (  # one statement each: executescript would commit the transaction they run in
    "CREATE TABLE embeddings (namespace TEXT NOT NULL, key BLOB NOT NULL, vector BLOB NOT NULL, "
    "PRIMARY KEY (namespace, key)) WITHOUT ROWID",
    "CREATE TABLE stats (namespace TEXT PRIMARY KEY, hits INTEGER NOT NULL, misses INTEGER NOT NULL)",
    f"PRAGMA application_id = {APPLICATION_ID}",
)
# SQLite primary result codes (extended codes carry them in the low byte)
BUSY, LOCKED, READONLY, IOERR, CORRUPT, FULL, CANTOPEN, NOTADB = 5, 6, 8, 10, 11, 13, 14, 26
SQLITE_VARIABLE_LIMIT = 500


class CacheWarning(UserWarning):
    """The text cache file cannot be used fully; the run goes on, computing what it cannot read or keep."""


class CacheCorruptWarning(CacheWarning):
    """The text cache file was not a readable database: it was moved aside and a new one started."""


def _code(error: sqlite3.Error) -> int:
    return (getattr(error, "sqlite_errorcode", 0) or 0) & 0xFF


def _looks_like_sqlite(path: Path) -> bool:
    """An absent or empty file is a new database to SQLite; anything else must start with its magic."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except FileNotFoundError:
        return True
    return head in (b"", SQLITE_MAGIC)


def _made_by_us(path: Path) -> bool:
    """The file's SQLite header carries our application id (bytes 68-71), even if the rest is damaged."""
    try:
        with open(path, "rb") as f:
            head = f.read(72)
    except OSError:
        return False
    return len(head) == 72 and int.from_bytes(head[68:72], "big") == APPLICATION_ID


def check_cache_file(path: str | Path) -> None:
    """InputError unless `path` is absent, empty, or a text cache (possibly a corrupt one of ours): what a
    caller should refuse before the cache opens it, since SQLite would write into any other file."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"--text-cache {path} is a directory; give a file name")
    if not path.exists() or _made_by_us(path):
        return
    if not path.is_file():
        raise InputError(f"--text-cache {path} is not a regular file")
    if path.stat().st_size == 0:
        return
    if not _looks_like_sqlite(path):
        raise InputError(f"--text-cache {path} is an existing file that is not a text cache (not an SQLite "
                         "database); it was left untouched: give the cache its own file")
    try:
        conn = sqlite3.connect(f"file:{urllib.parse.quote(str(path.absolute()))}?mode=ro", uri=True, timeout=5)
        try:
            state = _schema_state(conn)
        finally:
            conn.close()
    except sqlite3.Error:
        return  # locked or unreadable right now: the store decides what it can do, and never moves it
    if state == "foreign":
        raise InputError(f"--text-cache {path} is another application's SQLite database, not a text cache; it was "
                         "left untouched: give the cache its own file")


def _schema_state(conn: sqlite3.Connection) -> str:
    """'ours', 'empty' (a new database) or 'foreign' (another application's tables)."""
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    if app_id not in (0, APPLICATION_ID):
        return "foreign"
    if not names:
        return "empty"
    columns = {n: [r[1] for r in conn.execute(f"PRAGMA table_info({n!r})")] for n in names}
    return "ours" if columns == TABLES else "foreign"


class SqliteVectorStore:
    """float32 vectors by (namespace, key) in one SQLite file; safe for several processes.

    `readable` / `writable` say what this process can do with the file; both False means the file is
    not used at all (the reason was given in a CacheWarning)."""

    def __init__(self, path: str | Path, dim: int, busy_timeout_s: float = 30.0):
        self.path, self.dim, self.busy_timeout_s = Path(path), dim, busy_timeout_s
        self.readable = self.writable = False
        self._lock = threading.Lock()
        self._pending_stats: dict[str, list[int]] = {}
        self._warned: set[str] = set()
        self._conn = self._open()
        if self._conn is not None:
            weakref.finalize(self, SqliteVectorStore._close_conn, self._conn, self._pending_stats)

    # ---- opening ------------------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection | None:
        if self.path.is_dir():
            return self._give_up("is a directory, not a cache file")
        if not _looks_like_sqlite(self.path):
            if not _made_by_us(self.path):
                return self._give_up("is not an SQLite database, so not a text cache; it was left untouched")
            return self._move_aside("it is no longer an SQLite database")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = self._connect_read_write()
        except OSError as e:
            return self._give_up(f"cannot be created ({e.strerror or e})")
        except sqlite3.Error as e:
            if _code(e) in (CORRUPT, NOTADB):
                if not _made_by_us(self.path):
                    return self._give_up(f"cannot be opened (SQLite reports: {e}) and is not a text cache; it was left untouched")
                return self._move_aside(f"SQLite reports: {e}")
            if _code(e) in (BUSY, LOCKED):
                return self._give_up(f"is locked by another process for more than {self.busy_timeout_s:g} s")
            return self._open_read_only(e)
        return conn

    def _connect_read_write(self) -> sqlite3.Connection | None:
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, check_same_thread=False, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            state = _schema_state(conn)
            if state == "foreign":
                conn.close()
                return self._give_up("belongs to another application (unknown tables); it was left untouched")
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            if state == "empty":
                with _transaction(conn):
                    if _schema_state(conn) == "empty":  # another process may have created it meanwhile
                        for statement in SCHEMA:
                            conn.execute(statement)
        except BaseException:
            conn.close()
            raise
        self.readable = self.writable = True
        return conn

    def _open_read_only(self, why: sqlite3.Error) -> sqlite3.Connection | None:
        base = f"file:{urllib.parse.quote(str(self.path.absolute()))}?mode=ro"
        # A WAL database on a read-only file system cannot get its shared-memory file: read it as immutable
        # (nobody can be writing it there), which skips locking and the WAL.
        errors = []
        for uri in (base, base + "&immutable=1"):
            try:
                conn = sqlite3.connect(uri, uri=True, timeout=self.busy_timeout_s, check_same_thread=False, isolation_level=None)
                state = _schema_state(conn)
            except sqlite3.Error as e:
                errors.append(str(e))
                continue
            if state != "ours":
                conn.close()
                return self._give_up(f"cannot be written ({why}) and holds no text cache")
            self.readable = True
            self._warn_once("read-only", f"text cache {self.path} cannot be written ({why}): it is used read-only, "
                                         "new prompts are computed but not kept")
            return conn
        return self._give_up(f"cannot be opened ({why}; read-only: {errors[-1]})")

    def _move_aside(self, why: str) -> sqlite3.Connection | None:
        aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        try:
            for suffix in ("", "-wal", "-shm"):
                src = Path(f"{self.path}{suffix}")
                if src.is_file():
                    src.replace(Path(f"{aside}{suffix}"))
        except OSError as e:
            return self._give_up(f"is unreadable ({why}) and cannot be moved aside ({e.strerror or e})")
        warnings.warn(f"text cache {self.path} is unreadable ({why}); moved to {aside.name} and started anew. "
                      "Results are unaffected; cached prompts will be recomputed.", CacheCorruptWarning, stacklevel=4)
        try:
            return self._connect_read_write()
        except sqlite3.Error as e:
            return self._give_up(f"cannot be recreated ({e})")

    def _give_up(self, why: str) -> None:
        self.readable = self.writable = False
        self._warn_once("off", f"text cache {self.path} {why}; this run keeps text embeddings in memory only")
        return None

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, CacheWarning, stacklevel=4)

    # ---- use ----------------------------------------------------------------------------------
    def get_many(self, namespace: str, keys: list[bytes]) -> dict[bytes, np.ndarray]:
        found: dict[bytes, np.ndarray] = {}
        with self._lock:
            if not self.readable:
                return found
            try:
                for start in range(0, len(keys), SQLITE_VARIABLE_LIMIT):
                    chunk = keys[start : start + SQLITE_VARIABLE_LIMIT]
                    rows = self._conn.execute(
                        f"SELECT key, vector FROM embeddings WHERE namespace = ? AND key IN ({','.join('?' * len(chunk))})",
                        [namespace, *chunk]).fetchall()
                    for key, blob in rows:
                        if len(blob) == self.dim * 4:  # a damaged row is a miss, never a wrong vector
                            found[bytes(key)] = np.frombuffer(blob, dtype="<f4").copy()
            except sqlite3.Error as e:
                self._failed("read", e)
        return found

    def put_many(self, namespace: str, items: dict[bytes, np.ndarray]) -> None:
        rows = [(namespace, k, np.asarray(v, dtype="<f4").tobytes()) for k, v in items.items()]
        with self._lock:
            if not self.writable:
                return
            try:
                with _transaction(self._conn):
                    self._conn.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?)", rows)
                    self._write_stats(self._conn, self._pending_stats)
            except sqlite3.Error as e:
                self._failed("write", e)

    def _failed(self, what: str, e: sqlite3.Error) -> None:
        code = _code(e)
        if code in (BUSY, LOCKED):  # transient: these entries are not kept, later writes try again
            self._warn_once("busy", f"text cache {self.path} was locked by another process for over "
                                    f"{self.busy_timeout_s:g} s; some entries were not kept (the run goes on)")
        elif code == FULL:
            self.writable = False
            self._warn_once("full", f"text cache {self.path}: the disk is full; no further entries are kept")
        elif code == READONLY:
            self.writable = False
            self._warn_once("read-only", f"text cache {self.path} became read-only; no further entries are kept")
        else:
            self.readable = self.writable = False
            self._warn_once("off", f"text cache {self.path} failed on {what} ({e}); it is not used for the rest "
                                   "of this run and was left as it is")

    def count(self, namespace: str, hits: int, misses: int) -> None:
        with self._lock:
            pending = self._pending_stats.setdefault(namespace, [0, 0])
            pending[0] += hits
            pending[1] += misses

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
                with _transaction(conn):
                    SqliteVectorStore._write_stats(conn, pending)
        except sqlite3.Error:
            pass  # counters only: never worth failing a shutdown for
        finally:
            conn.close()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                pending = self._pending_stats if self.writable else {}
                self._close_conn(self._conn, pending)
                self._conn, self.readable, self.writable = None, False, False


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    # IMMEDIATE takes the write lock up front, so concurrent writers queue on busy_timeout
    # instead of failing at commit.
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class TextEmbeddingCache:
    """LRU in memory (capacity entries), backed by an optional SqliteVectorStore."""

    def __init__(self, namespace: str, dim: int, capacity: int = 4096, path: str | Path | None = None,
                 busy_timeout_s: float = 30.0):
        self.namespace, self.capacity = namespace, capacity
        self._lru: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.store = SqliteVectorStore(path, dim, busy_timeout_s) if path is not None else None
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
        with self._lock:
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
        raise InputError(f"no text cache at {path}")
    if not _looks_like_sqlite(path):
        raise InputError(f"{path} is not an SQLite database, so not a text cache")
    try:
        conn = sqlite3.connect(f"file:{urllib.parse.quote(str(path.absolute()))}?mode=ro", uri=True, timeout=60)
        try:
            if _schema_state(conn) == "foreign":
                raise InputError(f"{path} is another application's SQLite database, not a text cache")
            entries = dict(conn.execute("SELECT namespace, count(*) FROM embeddings GROUP BY namespace").fetchall())
            counts = {ns: (h, m) for ns, h, m in conn.execute("SELECT namespace, hits, misses FROM stats").fetchall()}
        finally:
            conn.close()
    except sqlite3.Error as e:
        raise InputError(f"cannot read text cache {path}: {e}") from None
    namespaces = sorted(set(entries) | set(counts))
    return {"path": str(path), "bytes": path.stat().st_size, "namespaces": [
        {"namespace": ns, "entries": entries.get(ns, 0), "hits": counts.get(ns, (0, 0))[0],
         "misses": counts.get(ns, (0, 0))[1]} for ns in namespaces]}
