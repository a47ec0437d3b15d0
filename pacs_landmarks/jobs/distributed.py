"""The distributed mode: job records in PostgreSQL (``PgJobStore``), procrastinate as queue and worker engine.

Front ends (the Orthanc plugin, the node's receivers) only enqueue (``Cluster.enqueue``): a job record
``queued`` plus a procrastinate job ``analyse(job_id)``. Long-lived worker processes (``run_worker``,
``pacs-landmarks worker``) load and warm the model once and run the same steps as the embedded mode
(``pacs_landmarks.jobs.steps``); delivery is its own task on its own queue, so an archive that is down never
holds a GPU worker.

Queues and procrastinate options:

- ``analyse-stat`` / ``analyse``: a job goes to ``analyse-stat`` with priority ``STAT_PRIORITY`` when the
  front end's priority rule says STAT (``is_stat``), else to ``analyse`` with priority 0. A worker started
  with ``--queues analyse-stat,analyse`` takes the highest priority first (procrastinate fetches by priority,
  then age, over its queues); one started with ``--queues analyse-stat`` is dedicated to STAT work.
- ``queueing_lock`` = the series UID: at most one queued analysis per series (procrastinate refuses a second,
  ``AlreadyEnqueued``; several Orthancs firing for one series coalesce). ``lock`` = the series UID: at most
  one running analysis per series, on the whole cluster. An image job (one X-ray image, a cephalogram:
  ``job.details["kind"] == "image"``) locks its image instead (``lock_key``): the images of one series are
  separate jobs and run side by side.
- Image jobs: the worker loads the 2D model (``image_model_loader``) when the first image job comes, once per
  process (or at start, ``warm_image_model``); a worker that never sees a cephalogram never loads it.
- Which model: the worker records on each job the model it ran (``model_name`` / ``model_version``, as the
  embedded front ends do when they queue), and announces the model it loaded (``announce_model``: the series
  model at start, the 2D model when it loads it). A front end, which loads no model, asks
  ``Cluster.current_model`` which model the workers run now: an input analysed by an earlier model version is
  analysed again without ``force`` (``Cluster.analysed_now``), and its new results supersede the old ones.
- No starvation: a routine job older than ``max_routine_wait_s`` is raised to ``STAT_PRIORITY`` by the
  sweeper (ageing), so under a constant STAT load routine work still waits a bounded time.
- A killed worker: procrastinate workers write a heartbeat every ``heartbeat_s``; every worker process runs a
  sweeper that, every ``sweep_interval_s``, retries the jobs of workers whose heartbeat is older than
  ``stalled_after_s`` (procrastinate does not retry stalled jobs on its own). Bound from the kill to the job
  running again: ``stalled_after_s + sweep_interval_s`` (+ a fetch). Delivery is at least once: result UIDs are
  deterministic, so a re-run stores the same objects again (Orthanc: ``AlreadyStored``).
- Infrastructure errors inside a task (PostgreSQL restarted, a transient network error) raise; the task is
  retried with exponential back-off (``RetryStrategy``). Errors of the series itself (unreadable, model
  failure) are recorded on the job (``failed``) and do not retry.

Requires the ``distributed`` extra (procrastinate, psycopg).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pacs_landmarks.jobs.logs import log_event
from pacs_landmarks.jobs.pgstore import PgJobStore
from pacs_landmarks.jobs.priority import is_stat  # noqa: F401  (the front ends' priority rule)
from pacs_landmarks.jobs.steps import JobSteps
from pacs_landmarks.jobs.store import Job

ANALYSE, ANALYSE_STAT, DELIVER = "analyse", "analyse-stat", "deliver"
QUEUES = (ANALYSE_STAT, ANALYSE, DELIVER)
STAT_PRIORITY = 100
ROUTINE_PRIORITY = 0

LOGGER = logging.getLogger("pacs_landmarks.jobs.distributed")


@dataclass
class ClusterSettings:
    """What every process of a cluster must agree on (node.toml ``[cluster]``, orthanc.json ``Cluster``)."""

    dsn: str
    results_dir: str = "cluster-results"  # on shared storage: analysis writes, delivery reads
    heartbeat_s: float = 2.0
    stalled_after_s: float = 10.0
    sweep_interval_s: float = 2.0
    max_routine_wait_s: float = 300.0
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    max_delivery_attempts: int | None = None
    max_attempts: int = 3
    reconcile_after_s: float = 30.0  # a record waiting this long without a task gets its task again
    enqueue_retry_s: float = 60.0  # receivers retry an enqueue this long while PostgreSQL is unreachable
    source_retry_s: float = 60.0  # workers retry a WADO-RS read this long while no Orthanc of it answers
    stat_rule: dict[str, Any] = field(default_factory=dict)  # see priority.is_stat

    @property
    def recovery_bound_s(self) -> float:
        """Kill of a worker -> its job fetched again, at most (plus one fetch poll)."""
        return self.stalled_after_s + self.sweep_interval_s + self.heartbeat_s


# -- the procrastinate app ------------------------------------------------------------------------------------
def build_app(dsn: str, *, sync: bool) -> Any:
    """A procrastinate App with our tasks; ``sync``: a blocking connector (front ends), else asyncio (workers)."""
    import procrastinate

    if sync:
        connector = procrastinate.SyncPsycopgConnector(conninfo=dsn)
    else:
        connector = procrastinate.PsycopgConnector(conninfo=dsn)
    app = procrastinate.App(connector=connector)
    retry = procrastinate.RetryStrategy(max_attempts=20, exponential_wait=1, wait=0)
    app.task(name="analyse", queue=ANALYSE, pass_context=True, retry=retry)(_analyse_task)
    app.task(name="deliver", queue=DELIVER, pass_context=True, retry=retry)(_deliver_task)
    return app


def apply_schema(dsn: str) -> None:
    """Create procrastinate's tables (once per database; a second call finds them and does nothing)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(7468)")
        try:
            exists = conn.execute("SELECT to_regclass('public.procrastinate_jobs')").fetchone()[0]
            if exists is None:
                app = build_app(dsn, sync=True)
                with app.open():
                    app.schema_manager.apply_schema()
        finally:
            conn.execute("SELECT pg_advisory_unlock(7468)")


def retrying(what: str, fn: Callable[[], Any], for_s: float) -> Any:
    """Call ``fn`` until it stops failing with a connection error, for at most ``for_s`` seconds.

    A receiver must not lose a series because PostgreSQL restarts: it keeps the instances (spool, Orthanc)
    and retries the enqueue; the last error is raised when the time is up.
    """
    import psycopg
    from procrastinate.exceptions import ConnectorException

    deadline = time.monotonic() + for_s
    delay = 0.2
    while True:
        try:
            return fn()
        except (psycopg.OperationalError, psycopg.InterfaceError, ConnectorException) as exc:
            if time.monotonic() + delay > deadline:
                raise
            log_event("enqueue.retry", logging.WARNING, what=what, reason=f"{type(exc).__name__}", in_s=delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


class Cluster:
    """A front end's handle on the cluster: enqueue jobs, list them. Thread-safe; open once per process."""

    def __init__(self, settings: ClusterSettings):
        self.settings = settings
        self.store = PgJobStore(settings.dsn)
        apply_schema(settings.dsn)
        self.app = build_app(settings.dsn, sync=True)
        self.app.open()

    def close(self) -> None:
        self.app.close()
        self.store.close()

    def enqueue(
        self,
        series_instance_uid: str,
        study_instance_uid: str | None,
        source: str,
        *,
        stat: bool = False,
        **job_fields: Any,
    ) -> tuple[Job, bool]:
        """The series' open job (``queued``) and its analysis task; returns ``(job, created)``.

        Idempotent: the open job of (series, source) is reused and a second queued task for the series (an
        image job: for the image, ``lock_key``) is refused by procrastinate's queueing lock. Retries while
        PostgreSQL is unreachable (``enqueue_retry_s``).
        """
        details = {**(job_fields.pop("details", None) or {}), **({"stat": True} if stat else {})}

        def once() -> tuple[Job, bool]:
            job, created = self.store.ensure_job(series_instance_uid, study_instance_uid, source, state="queued",
                                                 details=details, **job_fields)
            if job.state == "received":
                job = self.store.transition(job.id, "queued", expect="received")
            self.defer_analyse(job, stat=stat)
            return job, created

        job, created = retrying("enqueue", once, self.settings.enqueue_retry_s)
        if created:
            log_event("job.queued", job=job.id, series=series_instance_uid, stat=stat or None, cluster=True)
        return job, created

    def defer_analyse(self, job: Job, *, stat: bool = False) -> bool:
        """Defer ``analyse(job.id)``; False when the series (image) already has a queued analysis."""
        from procrastinate.exceptions import AlreadyEnqueued

        task = self.app.tasks["analyse"].configure(
            queue=ANALYSE_STAT if stat else ANALYSE,
            priority=STAT_PRIORITY if stat else ROUTINE_PRIORITY,
            lock=lock_key(job),
            queueing_lock=lock_key(job),
        )
        try:
            task.defer(job_id=job.id)
        except AlreadyEnqueued:
            return False
        return True

    def jobs(self, states: list[str] | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """The cluster's jobs (newest first) with their queue facts: which worker, task attempts, timings."""
        return cluster_jobs(self.store, states, limit)

    def current_model(self, kind: str = "series") -> tuple[str | None, str | None]:
        """(name, version) of the model the cluster's workers run for ``kind`` ("series": CT; "image": the 2D
        model): the last one a worker announced (``announce_model``); (None, None) before any did."""
        return self.store.current_model(kind)

    def analysed_now(self, jobs: list[Job], kind: str = "series") -> list[Job]:
        """Of ``jobs`` (earlier jobs of one input), those that count as "analysed already": not failed, and run
        with the model the workers announce now, or not run yet (no model recorded: queued). Every job that did
        not fail counts while no model has been announced."""
        name, version = self.current_model(kind)
        return [j for j in jobs if j.state != "failed" and (
            name is None or j.model_name is None or (j.model_name, j.model_version) == (name, version))]


def announce_model(store: PgJobStore, kind: str, model: Any, worker: str) -> None:
    """``store.announce_model`` for a loaded model (one without a name, e.g. a test's stub, is not announced)."""
    name = getattr(model, "name", None)
    if name is None:
        return
    version = getattr(model, "version", None)
    store.announce_model(kind, str(name), None if version is None else str(version), worker)
    log_event("worker.model", kind=kind, model=str(name), version=version, worker=worker)


def lock_key(job: Job | dict[str, Any]) -> str:
    """procrastinate's lock and queueing lock of a job's analysis: its series, or for an image job its image
    (``series/source``: the images of a series are separate jobs)."""
    get = job.get if isinstance(job, dict) else lambda key: getattr(job, key)
    details = get("details") or {}
    if details.get("kind") == "image":
        return f"{get('series_instance_uid')}/{get('source')}"
    return str(get("series_instance_uid"))


class RetryingStore:
    """A store whose calls retry while PostgreSQL is unreachable (``retrying``), for receivers: the node's
    threads (C-STORE handlers, series completion) then wait out a restart instead of losing a series.

    Only connection errors are retried; a state-machine error (JobStateError) is raised at once. A write
    whose commit reached the server just before the connection broke may run twice: of the store's writes
    only ``record_instances`` is not idempotent, and it is bookkeeping (the worker counts the files itself).
    """

    def __init__(self, store: PgJobStore, retry_s: float):
        self._store = store
        self._retry_s = retry_s

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            return retrying(f"store.{name}", lambda: attr(*args, **kwargs), self._retry_s)

        return call


def cluster_jobs(store: PgJobStore, states: list[str] | None = None, limit: int | None = None) -> list[dict]:
    out = []
    for job in store.list(states, limit=limit):
        row = job.to_json()
        row["worker"] = job.owner or job.details.get("worker")
        out.append(row)
    return out


# -- the worker process -----------------------------------------------------------------------------------------
@dataclass
class _Runtime:
    """What the tasks of this worker process use: loaded once, before the first job."""

    settings: ClusterSettings
    store: PgJobStore
    steps: JobSteps
    name: str
    app: Any = None
    runs: int = 0
    # Held while a task runs: after a lost connection the worker loop restarts only once the task thread
    # has finished, so one process never runs two jobs.
    busy: threading.Lock = field(default_factory=threading.Lock)


_RUNTIME: _Runtime | None = None


def _runtime() -> _Runtime:
    if _RUNTIME is None:
        raise RuntimeError("a cluster task ran outside run_worker")
    return _RUNTIME


def _analyse_task(context: Any, job_id: int) -> None:
    rt = _runtime()
    with rt.busy:
        _analyse(rt, context, job_id)


def _analyse(rt: _Runtime, context: Any, job_id: int) -> None:
    job = rt.store.get(job_id)
    if job.state == "running":
        # procrastinate's lock lets one analysis of the series run at a time: a record still "running" is
        # one whose worker died (its procrastinate job was swept and retried). Take it over.
        job = rt.store.transition(job_id, "queued", expect="running", reason=f"worker {job.owner} stopped; re-run")
    if job.state == "delivering":  # analysed by an earlier run of this task that died before deferring
        _defer_deliver(context.app, job)
        return
    claimed = rt.store.claim(rt.name, job_id=job_id) if job.state == "queued" else None
    if claimed is None:  # done or failed already: a coalesced duplicate
        return
    if claimed.state != "running":  # cannot happen (queued -> running), but never deliver from here
        rt.store.transition(job_id, "delivering", expect="delivering", next_attempt_at=claimed.next_attempt_at)
        _defer_deliver(context.app, claimed)
        return
    rt.store.record_instances(job_id, 0, details={"worker": rt.name, "procrastinate_job": context.job.id})
    rt.runs += 1
    job = rt.steps.analyse(claimed)
    if job.state == "delivering":  # released: a deliver worker claims it
        job = rt.store.transition(job_id, "delivering", expect="delivering")
        _defer_deliver(context.app, job)


def _defer_deliver(app: Any, job: Job) -> None:
    """Defer ``deliver(job.id)``: one queued and one running delivery per job (its locks)."""
    from datetime import datetime, timezone

    from procrastinate.exceptions import AlreadyEnqueued

    options: dict[str, Any] = {"lock": f"deliver:{job.id}", "queueing_lock": f"deliver:{job.id}"}
    if job.next_attempt_at and job.next_attempt_at > time.time():
        options["schedule_at"] = datetime.fromtimestamp(job.next_attempt_at, timezone.utc)
    try:
        app.tasks["deliver"].configure(**options).defer(job_id=job.id)
    except AlreadyEnqueued:
        pass


def _deliver_task(context: Any, job_id: int) -> None:
    rt = _runtime()
    with rt.busy:
        _deliver(rt, context, job_id)


def _deliver(rt: _Runtime, context: Any, job_id: int) -> None:
    job = rt.store.get(job_id)
    if job.state != "delivering":
        return  # delivered by an earlier run, or retried/failed by an operator
    # The task's lock makes this the only delivery of the job running: an owner still set is a dead
    # worker's (or one that lost its connection before releasing it).
    job = rt.store.transition(job_id, "delivering", expect="delivering", owner=rt.name,
                              next_attempt_at=job.next_attempt_at)
    job = rt.steps.deliver(job)
    if job.state == "delivering":  # a destination is down: the same back-off as the embedded mode
        _defer_deliver(context.app, job)


_ORPHANS = """
SELECT j.id, j.state, j.details FROM pacs_landmarks.jobs j
 WHERE ((j.state = 'queued' AND j.owner IS NULL) OR j.state = 'delivering')
   AND j.next_attempt_at <= %(now)s AND j.updated_at < %(before)s
   AND NOT EXISTS (SELECT 1 FROM procrastinate_jobs p WHERE p.status IN ('todo', 'doing')
                   AND (p.args->>'job_id')::bigint = j.id)
 LIMIT 100
"""


async def _reconcile(app: Any, settings: ClusterSettings) -> None:
    """Job records waiting without a task (an enqueue or a delivery deferral that a lost connection cut
    short after the record was written): defer the task again."""
    import json as _json

    now = time.time()
    rows = await app.connector.execute_query_all_async(_ORPHANS, now=now, before=now - settings.reconcile_after_s)
    for row in rows:
        details = _json.loads(row["details"] or "{}")
        if row["state"] == "queued":
            from procrastinate.exceptions import AlreadyEnqueued

            stat = bool(details.get("stat"))
            series = await app.connector.execute_query_one_async(
                "SELECT series_instance_uid, source FROM pacs_landmarks.jobs WHERE id = %(id)s", id=row["id"])
            key = lock_key({**series, "details": details})
            try:
                await app.tasks["analyse"].configure(
                    queue=ANALYSE_STAT if stat else ANALYSE, priority=STAT_PRIORITY if stat else ROUTINE_PRIORITY,
                    lock=key, queueing_lock=key,
                ).defer_async(job_id=row["id"])
            except AlreadyEnqueued:
                continue
        else:
            await asyncio.to_thread(_defer_deliver, app, _runtime().store.get(row["id"]))
        log_event("job.reconciled", logging.WARNING, job=row["id"], state=row["state"])


async def _sweep(app: Any, settings: ClusterSettings, stop: asyncio.Event, worker: Any) -> None:
    """Retry the jobs of stalled workers; raise the priority of routine jobs waiting too long.

    Also beats this worker's heart: procrastinate's own heartbeat task ends at the first database error and
    the worker then stops gracefully, finishing its job; without a heartbeat meanwhile, other workers would
    take that job over while it still runs.
    """
    while not stop.is_set():
        try:
            if worker.worker_id is not None:
                await app.job_manager.update_heartbeat(worker.worker_id)
            for job in await app.job_manager.get_stalled_jobs(seconds_since_heartbeat=settings.stalled_after_s):
                try:
                    await app.job_manager.retry_job(job)
                    log_event("job.stalled_retry", logging.WARNING, task=job.task_name,
                              job=job.task_kwargs.get("job_id"), procrastinate_job=job.id)
                except Exception:  # another worker's sweeper was first
                    pass
            await app.connector.execute_query_async(
                "UPDATE procrastinate_jobs SET priority = %(stat)s WHERE status = 'todo' AND priority < %(stat)s"
                " AND task_name = 'analyse' AND id IN (SELECT job_id FROM procrastinate_events"
                " WHERE type = 'deferred' AND at < now() - make_interval(secs => %(wait)s))",
                stat=STAT_PRIORITY, wait=float(settings.max_routine_wait_s),
            )
            await _reconcile(app, settings)
        except Exception as exc:  # PostgreSQL away: the worker itself reconnects; try again next round
            LOGGER.warning("sweep failed: %s: %s", type(exc).__name__, exc)
        try:
            await asyncio.wait_for(stop.wait(), settings.sweep_interval_s)
        except asyncio.TimeoutError:
            pass


def run_worker(
    settings: ClusterSettings,
    queues: list[str],
    *,
    model: Any = None,
    loader: Callable[[Job], Any],
    deliver: Callable[[Job, dict, list[Path]], None],
    process_series: Callable | None = None,
    name: str | None = None,
    warm_up: bool = True,
    on_ready: Callable[[], None] | None = None,
    image_model: Any = None,
    image_model_loader: Callable[[], Any] | None = None,
    warm_image_model: bool = False,
) -> None:
    """Run one worker process until SIGTERM/SIGINT: ``model`` (loaded once by the caller) serves every job.

    ``queues``: which of ``QUEUES`` to take jobs from. Analysis queues need a model; a deliver-only worker
    does not. Image jobs (cephalograms) use ``image_model``, else what ``image_model_loader()`` returns,
    called once, at the first image job (``warm_image_model``: at start); without either, the shipped ceph19
    model (``JobSteps.load_image_model``). A loader that fails fails that image job with the reason and is
    tried again at the next one.
    """
    global _RUNTIME
    unknown = set(queues) - set(QUEUES)
    if unknown:
        raise ValueError(f"unknown queue(s) {', '.join(sorted(unknown))}; use {', '.join(QUEUES)}")
    name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
    store = PgJobStore(settings.dsn)
    apply_schema(settings.dsn)
    steps = JobSteps(
        store, model, loader=loader, deliver=deliver, results_dir=Path(settings.results_dir), owner=name,
        backoff_base_s=settings.backoff_base_s, backoff_max_s=settings.backoff_max_s,
        max_delivery_attempts=settings.max_delivery_attempts, max_attempts=settings.max_attempts,
        process_series=process_series, image_model=image_model,
    )
    shipped = functools.partial(JobSteps.load_image_model, steps)  # the shipped ceph19 model
    steps.load_image_model = _lazy_image_model(steps, image_model_loader or shipped, store, name)  # type: ignore[method-assign]
    if model is not None and set(queues) & {ANALYSE, ANALYSE_STAT}:
        announce_model(store, "series", model, name)
    if (warm_image_model or image_model is not None) and set(queues) & {ANALYSE, ANALYSE_STAT}:
        steps.load_image_model()  # (a given one is only announced)
    if warm_up and model is not None and process_series is None and set(queues) & {ANALYSE, ANALYSE_STAT}:
        from pacs_landmarks.pipeline import warm_up as warm

        log_event("worker.warm_up", seconds=warm(model))
    _RUNTIME = _Runtime(settings, store, steps, name)
    asyncio.run(_run_async(settings, queues, name, on_ready))


def stop_workers(procs: Iterable[subprocess.Popen], grace_s: float = 30.0) -> None:
    """Stop worker processes (``run_worker`` in each) as SIGTERM asks, all at once: each finishes the job it
    is running first; one that is still running after ``grace_s`` is killed (its job is the sweeper's)."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _lazy_image_model(steps: JobSteps, loader: Callable[[], Any], store: PgJobStore,
                      worker: str) -> Callable[[], Any]:
    """``JobSteps.load_image_model`` for a worker: ``loader()`` once, at the first image job (tasks run one at
    a time in a worker process: ``_Runtime.busy``), then announced (``announce_model``)."""

    announced: list[Any] = []

    def load() -> Any:
        if steps.image_model is None:
            t = time.perf_counter()
            steps.image_model = loader()
            log_event("worker.image_model_loaded", model=getattr(steps.image_model, "name", None),
                      version=getattr(steps.image_model, "version", None), seconds=time.perf_counter() - t)
        if not announced:
            try:
                announce_model(store, "image", steps.image_model, worker)
                announced.append(steps.image_model)
            except Exception as exc:  # PostgreSQL away: not this job's fault; announced at the next image job
                log_event("worker.model_not_announced", logging.WARNING, reason=f"{type(exc).__name__}: {exc}")
        return steps.image_model

    return load


async def _run_async(settings: ClusterSettings, queues: list[str], name: str,
                     on_ready: Callable[[], None] | None) -> None:
    """procrastinate's worker stops on a database error (PostgreSQL restarted or down; its fetch loop raises,
    or its heartbeat task fails and stops it): run it again, with back-off, until SIGTERM/SIGINT. The job
    that was running is finished (or has failed) first."""
    import signal

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    current: list[Any] = []

    def on_signal() -> None:
        stopping.set()
        for worker in current:
            worker.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    delay = 0.5
    while not stopping.is_set():
        started = time.monotonic()
        try:
            await _run_once(settings, queues, name, on_ready, current)
        except Exception as exc:  # ConnectorException, psycopg errors, OSError: the database went away
            log_event("worker.reconnect", logging.WARNING, worker=name, reason=type(exc).__name__, in_s=delay)
        else:
            if not stopping.is_set():
                log_event("worker.reconnect", logging.WARNING, worker=name, reason="worker stopped", in_s=delay)
        on_ready = None
        current.clear()
        if stopping.is_set():
            break
        await asyncio.to_thread(_runtime().busy.acquire)
        _runtime().busy.release()
        try:
            await asyncio.wait_for(stopping.wait(), delay)
        except asyncio.TimeoutError:
            pass
        delay = 0.5 if time.monotonic() - started > 30 else min(delay * 2, 10.0)
    log_event("worker.stopped", worker=name)


async def _run_once(settings: ClusterSettings, queues: list[str], name: str,
                    on_ready: Callable[[], None] | None, current: list[Any]) -> None:
    from procrastinate.worker import Worker as ProcrastinateWorker

    app = build_app(settings.dsn, sync=False)
    stop = asyncio.Event()
    async with app.open_async():
        _runtime().app = app
        worker = ProcrastinateWorker(
            app=app, queues=list(queues), name=name, concurrency=1, wait=True, install_signal_handlers=False,
            update_heartbeat_interval=settings.heartbeat_s, stalled_worker_timeout=settings.stalled_after_s,
            fetch_job_polling_interval=1.0, shutdown_graceful_timeout=None,
        )
        current.append(worker)
        log_event("worker.started", worker=name, queues=",".join(queues), pid=os.getpid())
        if on_ready is not None:
            on_ready()
        sweeper = asyncio.create_task(_sweep(app, settings, stop, worker))
        try:
            await worker.run()
        finally:
            stop.set()
            await sweeper
