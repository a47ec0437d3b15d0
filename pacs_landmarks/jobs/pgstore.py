"""The job store on PostgreSQL (the distributed mode): the same states, events and methods as the SQLite
``JobStore`` (``pacs_landmarks.jobs.store.SqlJobStore``), in the schema ``pacs_landmarks`` of the database
that also holds Orthanc's index and procrastinate's queue (docs/scale-out.md).

Concurrency: one connection per thread, autocommit outside explicit transactions; a state change locks the
job's row (``SELECT ... FOR UPDATE``), a claim skips rows other workers are claiming (``FOR UPDATE SKIP
LOCKED``), ``ensure_job`` for one series and source is serialised by a transaction-scoped advisory lock, so
any number of processes on any number of hosts may share the store.

A lost connection (PostgreSQL restarted) raises ``psycopg.OperationalError`` from the call that saw it; the
next call opens a new connection. Callers that must not lose an event (receivers) retry; see
``pacs_landmarks.jobs.distributed.retrying``.

Requires the ``distributed`` extra (psycopg 3).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pacs_landmarks.jobs.store import SqlJobStore, schema_sql

SCHEMA = "pacs_landmarks"

# The SQLite store's schema with PostgreSQL types: BIGSERIAL ids, DOUBLE PRECISION times (REAL would be
# float4 and lose the milliseconds of a UNIX time), an explicit event order (SQLite's rowid), in SCHEMA.
_SCHEMA_SQL = f"\nCREATE SCHEMA IF NOT EXISTS {SCHEMA};" + schema_sql(
    job_id="BIGSERIAL PRIMARY KEY", time="DOUBLE PRECISION", job_ref="BIGINT",
    event_order="seq BIGSERIAL PRIMARY KEY", tables=f"{SCHEMA}.",
) + f"""
CREATE TABLE IF NOT EXISTS {SCHEMA}.worker_models (
    kind TEXT PRIMARY KEY, name TEXT NOT NULL, version TEXT, worker TEXT NOT NULL, at DOUBLE PRECISION NOT NULL
);
"""
# Any constant: concurrent first starts must not race on CREATE TABLE IF NOT EXISTS (it is not atomic).
_SCHEMA_LOCK = 0x6C616E64


class _Connection:
    """A psycopg connection that takes the SQLite store's ``?`` placeholders."""

    def __init__(self, conn: Any):
        self.conn = conn

    def execute(self, sql: str, args: Any = ()) -> Any:
        return self.conn.execute(sql.replace("?", "%s"), tuple(args))


class PgJobStore(SqlJobStore):
    """PostgreSQL job store; ``dsn``: a libpq connection string (``postgresql://user@host:port/db``)."""

    _FOR_UPDATE = " FOR UPDATE"
    _SKIP_LOCKED = " FOR UPDATE SKIP LOCKED"
    _EVENT_ORDER = "seq"

    def __init__(self, dsn: str, *, connect_timeout_s: float = 10.0):
        self.dsn = dsn
        self._connect_timeout_s = connect_timeout_s
        self._local = threading.local()
        with self._write() as db:
            db.execute("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK,))
            for statement in _SCHEMA_SQL.split(";"):
                if statement.strip():
                    db.execute(statement)

    def _db(self) -> _Connection:
        import psycopg
        from psycopg.rows import dict_row

        db = getattr(self._local, "db", None)
        if db is None or db.conn.closed or db.conn.broken:
            conn = psycopg.connect(self.dsn, autocommit=True, row_factory=dict_row,
                                   connect_timeout=max(1, int(self._connect_timeout_s)))
            conn.execute(f"SET search_path TO {SCHEMA}")
            db = self._local.db = _Connection(conn)
        return db

    def announce_model(self, kind: str, name: str, version: str | None, worker: str) -> None:
        """Record that ``worker`` runs model ``name`` ``version`` for ``kind`` ("series" or "image"): the last
        announcement is the cluster's current model (a new version is rolled out by starting workers with it
        and stopping the old ones). Only the distributed mode has workers that are not the front end."""
        with self._write() as db:
            db.execute("INSERT INTO worker_models (kind, name, version, worker, at) VALUES (?,?,?,?,?) ON CONFLICT"
                       " (kind) DO UPDATE SET name = EXCLUDED.name, version = EXCLUDED.version,"
                       " worker = EXCLUDED.worker, at = EXCLUDED.at", (kind, name, version, worker, time.time()))

    def current_model(self, kind: str) -> tuple[str | None, str | None]:
        """(name, version) last announced for ``kind``; (None, None) when none was."""
        row = self._db().execute("SELECT name, version FROM worker_models WHERE kind = ?", (kind,)).fetchone()
        return (row["name"], row["version"]) if row else (None, None)

    @contextmanager
    def _write(self) -> Iterator[_Connection]:
        db = self._db()
        with db.conn.transaction():
            yield db

    def _serialize(self, db: _Connection, key: str) -> None:
        db.execute("SELECT pg_advisory_xact_lock(hashtextextended(?, 0))", (key,))

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.conn.close()
            self._local.db = None
