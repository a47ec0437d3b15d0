"""Durable job store shared by both front ends (the pynetdicom node and the Orthanc plugin).

One job = one series to analyse and deliver. The store knows nothing about DICOM networking or Orthanc:
``source`` is an opaque string that the front end's loader understands (the node: the series' storage
directory; the plugin: an Orthanc series ID), and ``destinations`` are opaque JSON objects that the front
end's deliver callable understands.

State machine (``TRANSITIONS``)::

    received -> queued -> running -> delivering -> done
                  ^          |            |
                  |          +-> failed <-+        (failed/done -> queued: ``retry``)
                  +-- running (``resume`` after a crash)

- ``received``: instances are arriving; the series is not complete yet.
- ``queued``: complete, waiting for a worker (``claim`` moves it to ``running`` atomically).
- ``running``: a worker is loading the series and running the cascade.
- ``delivering``: results are on disk (``results``); some destination has not answered Success yet.
  Between delivery attempts the job is unowned with ``next_attempt_at`` in the future, so a worker is never
  blocked by a destination that is down.
- ``done``: every destination answered Success. ``failed``: gave up, ``reason`` says why.

Two stores share this state machine and every method (``SqlJobStore``): ``JobStore`` (SQLite, the embedded
mode's default) and ``pacs_landmarks.jobs.pgstore.PgJobStore`` (PostgreSQL, the distributed mode). The SQL
is written once with ``?`` placeholders; a store supplies its connection, its write transaction and its row
locks. tests/test_jobs.py runs one contract suite against both.

Concurrency (SQLite): WAL mode, one connection per thread (``threading.local``), writes in
``BEGIN IMMEDIATE`` transactions, so one store file is safe across threads and processes on a local disk.

Example (what a front end does)::

    store = JobStore("/var/lib/node/jobs.sqlite")
    job = store.ensure_job(series_uid, study_uid, source="/var/lib/node/series/1.2.3",
                           model_name=model.name, model_version=model.version,
                           destinations=[{"ae_title": "PACS", "host": "127.0.0.1", "port": 104}])
    store.record_instances(job.id, 1)          # optional bookkeeping while instances arrive
    store.transition(job.id, "queued")          # the series is complete; a Worker picks it up
"""
from __future__ import annotations

import json
import os
import sqlite3
import string
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATES = ("received", "queued", "running", "delivering", "done", "failed")
UNFINISHED = ("received", "queued", "running", "delivering")

# Allowed state changes; anything else raises JobStateError (a bug in a front end, not bad input).
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "received": ("queued", "failed"),
    "queued": ("running", "failed"),
    "running": ("delivering", "failed", "queued"),
    "delivering": ("done", "failed", "delivering"),
    "done": ("queued",),
    "failed": ("queued",),
}

# The schema once for both stores; the dialects differ only in what the placeholders say (``schema_sql``).
_SCHEMA_TEMPLATE = string.Template("""
CREATE TABLE IF NOT EXISTS ${tables}jobs (
    id $job_id,
    series_instance_uid TEXT NOT NULL,
    study_instance_uid TEXT,
    source TEXT NOT NULL,
    model_name TEXT,
    model_version TEXT,
    state TEXT NOT NULL,
    reason TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    delivery_attempts INTEGER NOT NULL DEFAULT 0,
    instances INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    next_attempt_at $time NOT NULL DEFAULT 0,
    created_at $time NOT NULL,
    updated_at $time NOT NULL,
    queued_at $time,
    started_at $time,
    finished_at $time,
    timings TEXT NOT NULL DEFAULT '{}',
    results TEXT NOT NULL DEFAULT '{}',
    destinations TEXT NOT NULL DEFAULT '[]',
    delivery TEXT NOT NULL DEFAULT '{}',
    details TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_series ON ${tables}jobs (series_instance_uid, source);
CREATE INDEX IF NOT EXISTS jobs_state ON ${tables}jobs (state, next_attempt_at);
CREATE TABLE IF NOT EXISTS ${tables}job_events (${event_order}
    job_id $job_ref NOT NULL REFERENCES ${tables}jobs(id),
    at $time NOT NULL,
    state TEXT NOT NULL,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS job_events_job ON ${tables}job_events (job_id);
""")


def schema_sql(*, job_id: str, time: str, job_ref: str, event_order: str = "", tables: str = "") -> str:
    """The jobs and job_events tables in one SQL dialect: ``job_id`` the id column's type and key,
    ``time`` the type of a UNIX time, ``job_ref`` the type of a job id in events, ``event_order`` a leading
    events column that orders them (none where the database has one: SQLite's rowid), ``tables`` a schema
    prefix of the table names."""
    order = f"\n    {event_order}," if event_order else ""
    return _SCHEMA_TEMPLATE.substitute(job_id=job_id, time=time, job_ref=job_ref, event_order=order,
                                       tables=tables)


_SCHEMA = schema_sql(job_id="INTEGER PRIMARY KEY AUTOINCREMENT", time="REAL", job_ref="INTEGER")

_JSON_FIELDS = ("timings", "results", "destinations", "delivery", "details")
_EVENT_INSERT = "INSERT INTO job_events (job_id, at, state, reason) VALUES (?,?,?,?)"


class JobStateError(Exception):
    """A state change that the state machine does not allow, or an unknown job id."""


@dataclass
class Job:
    """One row of the store. JSON columns are decoded; times are UNIX seconds (float)."""

    id: int
    series_instance_uid: str
    study_instance_uid: str | None
    source: str
    model_name: str | None
    model_version: str | None
    state: str
    reason: str | None
    attempts: int  # processing attempts (claims of a queued job)
    delivery_attempts: int
    instances: int  # instances received so far (front-end bookkeeping)
    owner: str | None  # the worker that holds it, None when nobody does
    next_attempt_at: float
    created_at: float
    updated_at: float
    queued_at: float | None
    started_at: float | None
    finished_at: float | None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step
    results: dict[str, str] = field(default_factory=dict)  # kind -> file path
    destinations: list[dict[str, Any]] = field(default_factory=list)
    delivery: dict[str, str] = field(default_factory=dict)  # destination key -> "success" or last error
    details: dict[str, Any] = field(default_factory=dict)  # free-form front-end facts (e.g. "aborted")

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed")

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (used by ``pacs-landmarks jobs --json``)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def destination_key(destination: dict[str, Any]) -> str:
    """Stable name of a destination in ``Job.delivery``: its ``name``, else ``AE@host:port`` (or its STOW-RS
    root, or its folder)."""
    if destination.get("name"):
        return str(destination["name"])
    if destination.get("stow_rs"):  # the distributed mode's destinations (jobs/references.py)
        return f"STOW-RS {destination['stow_rs']}"
    if destination.get("directory"):
        return f"folder {destination['directory']}"
    return f"{destination.get('ae_title')}@{destination.get('host')}:{destination.get('port')}"


class SqlJobStore:
    """The state machine over SQL; subclasses supply the database (see ``JobStore``, ``PgJobStore``).

    A subclass implements ``_db()`` (this thread's connection; ``execute(sql, args)`` returns a cursor whose
    rows ``dict()`` accepts), ``_write()`` (a context manager: one transaction, yields that connection),
    ``close()``, and sets the row-lock suffixes: ``_FOR_UPDATE`` (lock the row read before updating it) and
    ``_SKIP_LOCKED`` (claim without waiting for rows other workers are claiming); ``_serialize(db, key)``
    serialises ``ensure_job`` for one series and source.
    """

    _FOR_UPDATE = ""
    _SKIP_LOCKED = ""
    _EVENT_ORDER = "rowid"

    def _db(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _write(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _serialize(self, db: Any, key: str) -> None:
        """Make concurrent ``ensure_job`` calls for ``key`` run one after the other (SQLite: the write lock)."""

    def close(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- reading -------------------------------------------------------------------------------------------
    @staticmethod
    def _job(row: Any) -> Job:
        data = dict(row)
        for k in _JSON_FIELDS:
            data[k] = json.loads(data[k])
        return Job(**data)

    def get(self, job_id: int) -> Job:
        row = self._db().execute("SELECT * FROM jobs WHERE id = ?", (int(job_id),)).fetchone()
        if row is None:
            raise JobStateError(f"no job {job_id}")
        return self._job(row)

    def find(self, series_instance_uid: str, source: str | None = None) -> list[Job]:
        """Every job for a series (optionally only for one source), oldest first."""
        sql, args = "SELECT * FROM jobs WHERE series_instance_uid = ?", [series_instance_uid]
        if source is not None:
            sql, args = sql + " AND source = ?", args + [source]
        return [self._job(r) for r in self._db().execute(sql + " ORDER BY id", args)]

    def list(self, states: Iterable[str] | None = None, limit: int | None = None) -> list[Job]:
        """Jobs, newest first, optionally only in the given states."""
        sql, args = "SELECT * FROM jobs", []
        if states is not None:
            states = list(states)
            sql += f" WHERE state IN ({','.join('?' * len(states))})"
            args += states
        sql += " ORDER BY id DESC"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [self._job(r) for r in self._db().execute(sql, args)]

    def unfinished(self) -> list[Job]:
        """Jobs not yet done or failed, oldest first (what a restarted front end must take care of)."""
        return list(reversed(self.list(UNFINISHED)))

    def events(self, job_id: int) -> list[tuple[float, str, str | None]]:
        """The job's state history: (time, state, reason), oldest first."""
        rows = self._db().execute(
            f"SELECT at, state, reason FROM job_events WHERE job_id = ? ORDER BY {self._EVENT_ORDER}", (int(job_id),)
        )
        return [(dict(r)["at"], dict(r)["state"], dict(r)["reason"]) for r in rows]

    # -- writing -------------------------------------------------------------------------------------------
    def ensure_job(
        self,
        series_instance_uid: str,
        study_instance_uid: str | None,
        source: str,
        *,
        model_name: str | None = None,
        model_version: str | None = None,
        destinations: list[dict[str, Any]] | None = None,
        state: str = "received",
        details: dict[str, Any] | None = None,
    ) -> tuple[Job, bool]:
        """The open job for this series and source, creating it if needed: returns ``(job, created)``.

        Idempotent: while a job for (series, source) is ``received`` or ``queued`` it is returned unchanged,
        so instances arriving over several associations land in one job. Once the job is running or
        finished, more instances of the series start a new job (the series changed after analysis).
        ``state`` is ``received`` (instances still arriving) or ``queued`` (series known to be complete).
        """
        if state not in ("received", "queued"):
            raise JobStateError(f"a new job starts as received or queued, not {state}")
        with self._write() as db:
            self._serialize(db, f"{series_instance_uid}|{source}")
            row = db.execute(
                "SELECT * FROM jobs WHERE series_instance_uid = ? AND source = ? AND state IN ('received','queued')"
                " ORDER BY id DESC LIMIT 1",
                (series_instance_uid, source),
            ).fetchone()
            if row is not None:
                return self._job(row), False
            now = time.time()
            cur = db.execute(
                "INSERT INTO jobs (series_instance_uid, study_instance_uid, source, model_name, model_version,"
                " state, created_at, updated_at, queued_at, destinations, details)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?) RETURNING id",
                (
                    series_instance_uid, study_instance_uid, source, model_name, model_version, state, now, now,
                    now if state == "queued" else None, json.dumps(destinations or []), json.dumps(details or {}),
                ),
            )
            new_id = dict(cur.fetchone())["id"]
            db.execute(_EVENT_INSERT, (new_id, now, state, None))
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (new_id,)).fetchone()
            return self._job(row), True

    def record_model(self, job_id: int, name: str | None, version: str | None) -> Job:
        """Record the model a job runs with (the worker's; a front end without a model queues jobs without)."""
        with self._write() as db:
            db.execute("UPDATE jobs SET model_name = ?, model_version = ?, updated_at = ? WHERE id = ?",
                       (name, version, time.time(), int(job_id)))
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (int(job_id),)).fetchone()
        if row is None:
            raise JobStateError(f"no job {job_id}")
        return self._job(row)

    def record_instances(self, job_id: int, count: int = 1, details: dict[str, Any] | None = None) -> None:
        """Add ``count`` received instances to a job, and merge ``details`` into its free-form facts."""
        with self._write() as db:
            row = db.execute(f"SELECT details FROM jobs WHERE id = ?{self._FOR_UPDATE}", (int(job_id),)).fetchone()
            if row is None:
                raise JobStateError(f"no job {job_id}")
            merged = {**json.loads(row["details"]), **(details or {})}
            db.execute(
                "UPDATE jobs SET instances = instances + ?, details = ?, updated_at = ? WHERE id = ?",
                (int(count), json.dumps(merged), time.time(), int(job_id)),
            )

    def transition(
        self,
        job_id: int,
        state: str,
        *,
        reason: str | None = None,
        expect: str | Iterable[str] | None = None,
        expect_owner: str | None = None,
        owner: str | None = None,
        next_attempt_at: float | None = None,
        timings: dict[str, float] | None = None,
        results: dict[str, str] | None = None,
        delivery: dict[str, str] | None = None,
        details: dict[str, Any] | None = None,
        delivery_attempt: bool = False,
    ) -> Job:
        """Move a job to ``state`` (checked against ``TRANSITIONS``) and update its fields in one transaction.

        ``expect``: the state(s) the job must be in now, else JobStateError (guards against a concurrent
        change); ``expect_owner``: the worker that must hold it now (a worker that lost its claim, e.g. to
        the stalled-worker sweeper, cannot complete it). ``timings``, ``delivery`` and ``details`` are merged into what the job has; ``results``
        replaces. ``owner`` is cleared unless given. Entering ``queued`` clears ``reason``.
        """
        if state not in STATES:
            raise JobStateError(f"unknown state {state!r}")
        with self._write() as db:
            row = db.execute(f"SELECT * FROM jobs WHERE id = ?{self._FOR_UPDATE}", (int(job_id),)).fetchone()
            if row is None:
                raise JobStateError(f"no job {job_id}")
            job = self._job(row)
            if expect is not None:
                allowed = (expect,) if isinstance(expect, str) else tuple(expect)
                if job.state not in allowed:
                    raise JobStateError(f"job {job_id} is {job.state}, expected {'/'.join(allowed)}")
            if expect_owner is not None and job.owner != expect_owner:
                raise JobStateError(f"job {job_id} is held by {job.owner}, not {expect_owner}")
            if state not in TRANSITIONS[job.state]:
                raise JobStateError(f"job {job_id}: {job.state} -> {state} is not allowed")
            now = time.time()
            sets: dict[str, Any] = {
                "state": state,
                "owner": owner,
                "updated_at": now,
                "reason": reason if state != "queued" else None,
                "next_attempt_at": next_attempt_at if next_attempt_at is not None else 0.0,
            }
            if state == "queued":  # analysis (re)starts: earlier delivery answers are for earlier results
                sets["queued_at"] = now
                sets["delivery"] = "{}"
            if state in ("done", "failed"):
                sets["finished_at"] = now
            if timings:
                sets["timings"] = json.dumps({**job.timings, **timings})
            if results is not None:
                sets["results"] = json.dumps(results)
            if delivery:
                sets["delivery"] = json.dumps({**job.delivery, **delivery})
            if details:
                sets["details"] = json.dumps({**job.details, **details})
            if delivery_attempt:
                sets["delivery_attempts"] = job.delivery_attempts + 1
            db.execute(
                f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in sets)} WHERE id = ?",
                (*sets.values(), int(job_id)),
            )
            if state != job.state or reason:
                db.execute(_EVENT_INSERT, (int(job_id), now, state, reason))
            return self._job(db.execute("SELECT * FROM jobs WHERE id = ?", (int(job_id),)).fetchone())

    def claim(self, owner: str | None = None, now: float | None = None, job_id: int | None = None) -> Job | None:
        """Atomically take the oldest job that needs a worker, or None.

        That is a ``queued`` job (it becomes ``running``, ``attempts`` + 1, ``started_at`` set) or an unowned
        ``delivering`` job whose back-off has expired (it stays ``delivering``, now owned). The caller checks
        ``job.state`` to know which work to do. No two callers, in any thread or process, get the same job.
        ``job_id``: only that job (a queue engine chose it: the distributed mode's tasks).
        """
        owner = owner or uuid.uuid4().hex
        now = time.time() if now is None else now
        only, args = ("", (now,)) if job_id is None else (" AND id = ?", (now, int(job_id)))
        with self._write() as db:
            row = db.execute(
                "SELECT * FROM jobs WHERE owner IS NULL AND next_attempt_at <= ?"
                f" AND (state = 'queued' OR state = 'delivering'){only} ORDER BY next_attempt_at, id LIMIT 1"
                f"{self._SKIP_LOCKED}",
                args,
            ).fetchone()
            if row is None:
                return None
            row = dict(row)
            if row["state"] == "queued":
                db.execute(
                    "UPDATE jobs SET state = 'running', owner = ?, attempts = attempts + 1, started_at = ?,"
                    " updated_at = ? WHERE id = ?",
                    (owner, now, now, row["id"]),
                )
                db.execute(_EVENT_INSERT, (row["id"], now, "running", None))
            else:
                db.execute("UPDATE jobs SET owner = ?, updated_at = ? WHERE id = ?", (owner, now, row["id"]))
            return self._job(db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone())

    def next_wakeup(self) -> float | None:
        """Earliest ``next_attempt_at`` of a claimable job (for a worker's sleep), or None."""
        row = self._db().execute(
            "SELECT MIN(next_attempt_at) AS t FROM jobs WHERE owner IS NULL AND state IN ('queued','delivering')"
        ).fetchone()
        return dict(row)["t"]

    def retry(self, job_id: int) -> Job:
        """Run a job again: failed/done -> queued (analysis redone); delivering -> deliver now (no back-off)."""
        job = self.get(job_id)
        if job.state == "delivering":
            with self._write() as db:
                db.execute("UPDATE jobs SET next_attempt_at = 0, updated_at = ? WHERE id = ?", (time.time(), job.id))
            return self.get(job_id)
        if job.state not in ("failed", "done"):
            raise JobStateError(f"job {job_id} is {job.state}; only failed, done or delivering jobs can be retried")
        return self.transition(job_id, "queued", expect=("failed", "done"))

    def resume(self) -> list[Job]:
        """After a crash: every ``running`` job goes back to ``queued`` and every owner is released.

        Call once at start-up, before any worker of this store runs (a worker of another live process
        would lose its claim). Returns the unfinished jobs afterwards.
        """
        now = time.time()
        with self._write() as db:
            rows = db.execute(f"SELECT id FROM jobs WHERE state = 'running'{self._FOR_UPDATE}")
            running = [dict(r)["id"] for r in rows]
            for job_id in running:
                db.execute(_EVENT_INSERT, (job_id, now, "queued", "resumed after restart"))
            db.execute(
                "UPDATE jobs SET state = 'queued', queued_at = ?, updated_at = ?, owner = NULL WHERE state = 'running'",
                (now, now),
            )
            db.execute("UPDATE jobs SET owner = NULL, next_attempt_at = 0 WHERE state = 'delivering'")
        return self.unfinished()


class JobStore(SqlJobStore):
    """SQLite (WAL) job store; see the module docstring. All methods are safe from any thread or process."""

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_s: float = 30.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._db().executescript(_SCHEMA)  # idempotent (IF NOT EXISTS); executescript manages its own commit

    # -- connection handling -------------------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            # isolation_level=None: we issue BEGIN ourselves, so a transaction never outlives a method.
            db = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL is durable in WAL mode except for the last transactions at a power cut; a job then
            # reappears in an earlier state and is redone, which loses no received data.
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")  # take the write lock now: read-modify-write without races
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        else:
            db.execute("COMMIT")

    def close(self) -> None:
        """Close this thread's connection (others close when their thread ends)."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
