"""The registry's SQL layer: one small dialect surface under one implementation of the logic.

``Storage`` writes its SQL once, with ``?`` placeholders and SQL that SQLite (>= 3.24) and
PostgreSQL both accept (``INSERT ... ON CONFLICT ... DO UPDATE SET x = excluded.x``); a database
here supplies only what differs:

* ``tx()``: one write transaction, serialized against every other writer of the same database.
  SQLite: ``BEGIN IMMEDIATE`` (one writer at a time, readers go on). PostgreSQL: ``BEGIN`` then
  ``pg_advisory_xact_lock(WRITE_LOCK)``, taken by every write transaction of every replica and
  released at COMMIT/ROLLBACK: the same single-writer order as SQLite, across processes and
  machines. Publish, blob commits, gc and quota checks all run inside it, so their read-check-write
  sequences never interleave.
* ``read()``: one statement outside a write transaction (a consistent snapshot of that statement).
* rows answer both ``row[0]`` and ``row["column"]``.
* schema version (SQLite ``PRAGMA user_version``; PostgreSQL a ``soppu_meta`` row), ``has_table``.

Set-based checks (one statement for many keys, not one per key) go through ``select_in``.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

WRITE_LOCK = 0x50505055  # pg_advisory_xact_lock key of the registry's write transactions ("SOPPU")


class Tx(Protocol):
    """What the logic calls inside a transaction (sqlite3.Connection has exactly this)."""

    def execute(self, sql: str, args: Sequence[Any] = ...) -> Any: ...
    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Any: ...


class Database(Protocol):
    url: str

    def tx(self) -> Any: ...  # context manager yielding a Tx
    def read(self, sql: str, args: Sequence[Any] = ()) -> list[Any]: ...
    def schema_version(self) -> int: ...
    def set_schema_version(self, db: Tx, version: int) -> None: ...
    def create_schema(self, schema: str) -> None: ...
    def integrity_check(self) -> str: ...
    def has_table(self, db: Tx, table: str) -> bool: ...


IN_CHUNK = 900  # keys per statement: below SQLite's oldest variable limit (999), a few round trips at most


def select_in(db: Tx | Database, sql: str, args: Sequence[Any], keys: Sequence[Any],
              chunk: int = IN_CHUNK) -> list[Any]:
    """Rows of ``sql`` whose ``IN (?*)`` marker is bound to ``keys`` (after ``args``), run once per
    ``chunk`` distinct keys and concatenated: ``ceil(len(keys) / chunk)`` round trips on every backend.
    ``db``: a transaction, or a Database (each chunk then a ``read`` outside any write transaction)."""
    if "IN (?*)" not in sql:
        raise ValueError("select_in: the SQL needs an 'IN (?*)' marker")
    unique = list(dict.fromkeys(keys))
    out: list[Any] = []
    for i in range(0, len(unique), chunk):
        part = unique[i:i + chunk]
        stmt, bound = sql.replace("IN (?*)", "IN (" + ",".join("?" * len(part)) + ")"), (*args, *part)
        out.extend(db.read(stmt, bound) if hasattr(db, "read") else db.execute(stmt, bound).fetchall())
    return out


class SqliteDatabase:
    """SQLite in WAL mode, ``synchronous=FULL``; one connection per thread."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.url = f"sqlite:{self.path}"
        self._local = threading.local()

    def _conn(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
        return db

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def read(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        return self._conn().execute(sql, tuple(args)).fetchall()

    def create_schema(self, schema: str) -> None:
        self._conn().executescript(schema)  # idempotent; executescript commits on its own

    def schema_version(self) -> int:
        return int(self.read("PRAGMA user_version")[0][0])

    def set_schema_version(self, db: Tx, version: int) -> None:
        db.execute(f"PRAGMA user_version = {int(version)}")

    def integrity_check(self) -> str:
        return str(self.read("PRAGMA integrity_check")[0][0])

    def has_table(self, db: Tx, table: str) -> bool:
        row = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()
        return row is not None


class Row(tuple):  # noqa: SLOT001
    """A result row answering ``row[i]`` and ``row["name"]`` (as sqlite3.Row does)."""

    _index: dict[str, int]

    def __new__(cls, index: dict[str, int], values: Sequence[Any]) -> Row:
        row = super().__new__(cls, values)
        row._index = index
        return row

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        return tuple.__getitem__(self, self._index[key] if isinstance(key, str) else key)

    def keys(self) -> list[str]:
        return list(self._index)


def _row_factory(cursor: Any) -> Any:
    index = {c.name: i for i, c in enumerate(cursor.description or [])}
    return lambda values: Row(index, values)


_PLACEHOLDER = re.compile(r"\?")


def _pg(sql: str) -> str:
    """``?`` placeholders -> ``%s`` (the logic's SQL has no other ``?`` and no ``%``)."""
    return _PLACEHOLDER.sub("%s", sql)


class _PgTx:
    def __init__(self, conn: Any):
        self.conn = conn

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any:
        return self.conn.execute(_pg(sql), tuple(args))

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Any:
        with self.conn.cursor() as cur:
            cur.executemany(_pg(sql), [tuple(r) for r in rows])
            return cur


def redact(url: str) -> str:
    """A database or store URL with any password replaced by ``***`` (for messages and logs)."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


class PostgresDatabase:
    """PostgreSQL through psycopg 3: a small pool of autocommit connections (explicit BEGIN/COMMIT),
    at most ``max_connections`` open; a broken connection is dropped, not reused."""

    def __init__(self, url: str, max_connections: int = 16, connect_timeout: float = 10.0):
        import psycopg  # the registry's dependency; imported here so sqlite+dir never needs it

        self.url = url
        self._psycopg = psycopg
        self._timeout = connect_timeout
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_connections)
        with self._conn() as conn:  # reachable and authenticated, or a clear error now
            conn.execute("SELECT 1")

    def _connect(self) -> Any:
        try:
            return self._psycopg.connect(self.url, autocommit=True, row_factory=_row_factory,
                                         connect_timeout=max(1, int(self._timeout)))
        except self._psycopg.Error as e:
            first = (str(e).strip().splitlines() or ["connection failed"])[-1]
            raise ConnectionError(f"cannot connect to PostgreSQL at {redact(self.url)}: {first}") from None

    @contextmanager
    def _conn(self) -> Iterator[Any]:
        self._slots.acquire()
        conn = None
        try:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None or conn.closed:
                conn = self._connect()
            yield conn
        finally:
            if conn is not None:
                healthy = not conn.closed and not conn.broken and \
                    conn.info.transaction_status == self._psycopg.pq.TransactionStatus.IDLE
                if healthy:
                    with self._lock:
                        self._idle.append(conn)
                else:
                    conn.close()
            self._slots.release()

    @contextmanager
    def tx(self) -> Iterator[_PgTx]:
        with self._conn() as conn:
            conn.execute("BEGIN")
            try:
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
                yield _PgTx(conn)
            except BaseException:
                if not conn.broken and not conn.closed:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def read(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        with self._conn() as conn:
            return conn.execute(_pg(sql), tuple(args)).fetchall()

    def create_schema(self, schema: str) -> None:
        """Create the tables under the write lock (replicas starting together would race on
        PostgreSQL's catalog otherwise)."""
        with self.tx() as db:
            for stmt in (s.strip() for s in re.sub(r"--[^\n]*", "", schema).split(";")):
                if stmt:
                    db.execute(stmt)
            db.execute("CREATE TABLE IF NOT EXISTS soppu_meta (k TEXT PRIMARY KEY, v BIGINT NOT NULL)")

    def schema_version(self) -> int:
        rows = self.read("SELECT v FROM soppu_meta WHERE k = 'schema_version'")
        return int(rows[0][0]) if rows else 0

    def set_schema_version(self, db: Tx, version: int) -> None:
        db.execute("INSERT INTO soppu_meta(k, v) VALUES ('schema_version', ?) "
                   "ON CONFLICT(k) DO UPDATE SET v = excluded.v", (int(version),))

    def integrity_check(self) -> str:
        """PostgreSQL keeps its own consistency; "ok" once a query answers."""
        self.read("SELECT 1")
        return "ok"

    def has_table(self, db: Tx, table: str) -> bool:
        return db.execute("SELECT 1 FROM information_schema.tables WHERE table_schema = current_schema() "
                          "AND table_name = ?", (table,)).fetchone() is not None

    def close(self) -> None:
        with self._lock:
            for conn in self._idle:
                conn.close()
            self._idle.clear()


def open_database(url: str, max_connections: int = 16) -> Database:
    """``postgresql://user:pass@host:port/db`` (or ``postgres://``) -> PostgresDatabase."""
    if not re.match(r"^postgres(ql)?://", url):
        raise ValueError(f"--database {redact(url)!r} must be a postgresql://user:password@host:port/dbname URL")
    return PostgresDatabase(url, max_connections=max_connections)
