"""The generic analysis worker shared by both front ends: claim a job, run the cascade, store, deliver.

A front end (the pynetdicom node, the Orthanc plugin) supplies two callables and a JobStore:

- ``loader(job) -> Iterable[Dataset | str | Path]``: the series' instances, found through the opaque
  ``job.source``; passed as they are to ``process_series`` (which reads paths itself). Raise any exception for an unreadable series: the job
  fails with that message as its reason.
- ``deliver(job, destination, paths) -> None``: send the result files (``paths``: landmark SR, measurements
  SR, SEG, in that order) to one destination (an item of ``job.destinations``). Return only when the
  destination answered Success for every file; raise any exception otherwise, and the worker retries that
  destination with exponential back-off (``backoff_base_s * 2**n``, at most ``backoff_max_s``). Raise
  ``PermanentDeliveryError`` when retrying cannot help: the job fails at once.

Per job (``Worker.run_job``):

1. ``queued -> running`` (``JobStore.claim``); a job claimed more than ``max_attempts`` times (the process
   died while analysing it each time) fails instead of crashing the node again.
2. ``loader`` + ``pacs_landmarks.pipeline.process_series(datasets, model)`` with the model loaded once by the
   front end and kept warm.
3. The three result objects and ``landmarks.json`` are written to ``results_dir/job-<id>-<attempt>/``
   atomically (temp dir, fsync, rename) BEFORE any delivery: ``running -> delivering`` with ``job.results``
   = ``{"landmark_sr", "measurements_sr", "seg", "landmarks_json"}`` -> path.
4. Each destination without a Success yet gets ``deliver``; ``delivering -> done`` only when every one
   answered Success. Otherwise the job stays ``delivering``, unowned until ``next_attempt_at``, so the worker
   goes on with other jobs meanwhile; the results stay on disk.

``job.timings`` (seconds) gets ``queue_wait``, ``read`` (the loader), the pipeline's own timings (``process_series``
``Results.timings``), ``write_results`` and ``delivery``; front ends add their own (e.g. ``completion_wait``).

Usage::

    worker = Worker(store, model, loader=my_loader, deliver=my_deliver, results_dir=Path("results"))
    store.resume()          # once at start-up: re-queue jobs a crash left running
    worker.start()          # a daemon thread; worker.wake() after queueing a job for a prompt start
    ...
    worker.stop()
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from pacs_landmarks.jobs.store import Job, JobStateError, JobStore, destination_key
from pacs_landmarks.jobs.logs import log_event

Loader = Callable[[Job], Iterable[Any]]
Deliver = Callable[[Job, dict[str, Any], list[Path]], None]

RESULT_FILES = (
    ("landmark_sr", "landmarks-sr.dcm"),
    ("measurements_sr", "measurements-sr.dcm"),
    ("seg", "seg.dcm"),
)


class PermanentDeliveryError(Exception):
    """A delivery failure that retrying cannot fix (e.g. the destination refuses the SOP class)."""


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (POSIX: the directory entry lives in the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, write: Callable[[Any], None]) -> None:
    with open(path, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())


def write_results(results: Any, job: Job, results_dir: Path) -> dict[str, str]:
    """Write the three result objects and ``landmarks.json`` atomically; return kind -> path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    final = results_dir / f"job-{job.id}-{job.attempts}"
    if final.exists():  # an earlier run of this very attempt died after the rename: its files are complete
        shutil.rmtree(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".job-{job.id}-", dir=results_dir))
    try:
        paths: dict[str, str] = {}
        for kind, name in RESULT_FILES:
            ds: Dataset | None = getattr(results, kind)
            if ds is None:  # nothing found: no such object (pipeline.Results)
                continue
            _write_synced(tmp / name, lambda fh, ds=ds: ds.save_as(fh, enforce_file_format=True))
            paths[kind] = str(final / name)
        doc = {
            "series_instance_uid": job.series_instance_uid,
            "study_instance_uid": job.study_instance_uid,
            "model": {"name": job.model_name, "version": job.model_version},
            "landmarks": [
                {
                    "name": lm.name,
                    "status": getattr(lm, "status", "found"),
                    "position_lps_mm": ([float(v) for v in lm.position_lps_mm]
                                        if lm.position_lps_mm is not None else None),
                    "confidence": float(lm.confidence),
                }
                for lm in results.landmarks
            ],
        }
        _write_synced(tmp / "landmarks.json", lambda fh: fh.write(json.dumps(doc, indent=2).encode()))
        paths["landmarks_json"] = str(final / "landmarks.json")
        fsync_dir(tmp)
        os.rename(tmp, final)
        fsync_dir(results_dir)
        return paths
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class Worker(threading.Thread):
    """A daemon thread running ``run_job`` on every claimable job of ``store``; see the module docstring."""

    def __init__(
        self,
        store: JobStore,
        model: Any,
        *,
        loader: Loader,
        deliver: Deliver,
        results_dir: Path,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
        max_delivery_attempts: int | None = None,
        max_attempts: int = 3,
        poll_interval_s: float = 1.0,
        process_series: Callable[[list[Dataset], Any], Any] | None = None,
        name: str = "landmark-worker",
        warm_up: bool = True,
    ):
        super().__init__(name=name, daemon=True)
        self.store = store
        self.model = model
        self.loader = loader
        self.deliver = deliver
        self.results_dir = Path(results_dir)
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.max_delivery_attempts = max_delivery_attempts
        self.max_attempts = max_attempts
        self.poll_interval_s = poll_interval_s
        self.owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._process_series = process_series
        # Only the real pipeline is warmed up: an injected one (tests) is called for jobs only.
        self._warm_up = warm_up and process_series is None
        self._wake = threading.Event()
        self._stopping = threading.Event()

    # -- thread control ------------------------------------------------------------------------------------
    def wake(self) -> None:
        """Look for work now (call after queueing a job)."""
        self._wake.set()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish the current job step and end the thread."""
        self._stopping.set()
        self._wake.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)

    def run(self) -> None:
        if self._warm_up:
            self._run_warm_up()
        while not self._stopping.is_set():
            try:
                busy = self.run_once()
            except Exception:  # a bug must not end the worker: log it, the job stays visible in the store
                logging.getLogger(__name__).exception("worker step failed")
                busy = False
            if busy:
                continue
            wait = self.poll_interval_s
            nxt = self.store.next_wakeup()
            if nxt is not None:
                wait = max(0.0, min(wait, nxt - time.time()))
            self._wake.wait(wait)
            self._wake.clear()

    def _run_warm_up(self) -> None:
        """One blank series through the pipeline before the first job (see pipeline.warm_up): a job queued
        meanwhile waits for it, and would otherwise pay the same one-off costs itself."""
        from pacs_landmarks.pipeline import warm_up

        try:
            log_event("worker.warm_up", seconds=warm_up(self.model))
        except Exception as exc:  # the first job then pays the one-off costs itself; nothing else changes
            log_event("worker.warm_up_failed", logging.WARNING, reason=f"{type(exc).__name__}: {exc}")

    def run_once(self) -> bool:
        """Claim one job and work on it; False when there was nothing to claim."""
        job = self.store.claim(self.owner)
        if job is None:
            return False
        self.run_job(job)
        return True

    # -- one job -------------------------------------------------------------------------------------------
    def run_job(self, job: Job) -> Job:
        """Analyse (if ``running``) and deliver (``delivering``) one claimed job; returns its new state."""
        if job.state == "running":
            log_event("job.running", job=job.id, series=job.series_instance_uid, attempt=job.attempts)
            if job.attempts > self.max_attempts:
                return self._fail(job, f"gave up after {job.attempts - 1} attempts that did not finish")
            try:
                job = self._analyse(job)
            except Exception as exc:  # bad input or a model error: recorded, nothing received is lost
                return self._fail(job, f"{type(exc).__name__}: {exc}")
        if job.state == "delivering":
            job = self._deliver(job)
        return job

    def _fail(self, job: Job, reason: str) -> Job:
        job = self.store.transition(job.id, "failed", reason=reason)
        log_event("job.failed", logging.WARNING, job=job.id, series=job.series_instance_uid, reason=reason)
        return job

    def _pipeline(self) -> Callable[[list[Dataset], Any], Any]:
        if self._process_series is None:
            from pacs_landmarks.pipeline import process_series

            self._process_series = process_series
        return self._process_series

    def _analyse(self, job: Job) -> Job:
        timings: dict[str, float] = {}
        if job.queued_at:
            timings["queue_wait"] = max(0.0, (job.started_at or time.time()) - job.queued_at)
        t = time.perf_counter()
        datasets = list(self.loader(job))
        timings["read"] = time.perf_counter() - t
        if not datasets:
            raise ValueError("no instances to analyse")
        results = self._pipeline()(datasets, self.model)
        timings.update({k: float(v) for k, v in (getattr(results, "timings", None) or {}).items()})
        t = time.perf_counter()
        paths = write_results(results, job, self.results_dir)
        timings["write_results"] = time.perf_counter() - t
        nothing = bool(getattr(results, "nothing_found", False))
        job = self.store.transition(
            job.id, "delivering", expect="running", owner=self.owner, results=paths, timings=timings,
            details={"nothing_found": nothing} if nothing else None,
        )
        found = sum(1 for lm in results.landmarks if getattr(lm, "status", "found") == "found")
        log_event(
            "job.delivering", job=job.id, series=job.series_instance_uid, landmarks=len(results.landmarks),
            found=found, **{f"t_{k}": v for k, v in timings.items()},
        )
        if nothing:
            log_event("job.nothing_found", job=job.id, series=job.series_instance_uid,
                      reason="no landmark found: no result objects go to the archive")
        return job

    def _deliver(self, job: Job) -> Job:
        paths = [Path(job.results[kind]) for kind, _ in RESULT_FILES if kind in job.results]
        missing = [str(p) for p in paths if not p.exists()]
        if job.details.get("nothing_found") and not paths:
            # no landmark found: nothing goes to the archive (pipeline.Results.nothing_found)
            job = self.store.transition(job.id, "done", reason="no landmark found: no result objects")
            log_event("job.done", job=job.id, series=job.series_instance_uid, destinations=0, nothing_found=True)
            return job
        if not paths or missing:
            return self._fail(job, f"result files missing: {', '.join(missing) or 'none recorded'}")
        answers: dict[str, str] = {}
        permanent = None
        t = time.perf_counter()
        for dest in job.destinations:
            key = destination_key(dest)
            if job.delivery.get(key) == "success":
                continue
            try:
                self.deliver(job, dest, paths)
            except PermanentDeliveryError as exc:
                answers[key] = permanent = f"{exc}"
            except Exception as exc:
                answers[key] = f"{type(exc).__name__}: {exc}"
            else:
                answers[key] = "success"
            log_event("delivery", job=job.id, destination=key, result=answers[key], attempt=job.delivery_attempts + 1)
        spent = time.perf_counter() - t
        timings = {"delivery": job.timings.get("delivery", 0.0) + spent}
        status = {**job.delivery, **answers}
        if all(status.get(destination_key(d)) == "success" for d in job.destinations):
            job = self.store.transition(job.id, "done", delivery=answers, timings=timings, delivery_attempt=True)
            log_event("job.done", job=job.id, series=job.series_instance_uid, destinations=len(job.destinations))
            return job
        attempts = job.delivery_attempts + 1
        failed = "; ".join(f"{k}: {v}" for k, v in answers.items() if v != "success")
        if permanent is not None or (self.max_delivery_attempts and attempts >= self.max_delivery_attempts):
            self.store.transition(job.id, "delivering", delivery=answers, delivery_attempt=True, owner=self.owner)
            return self._fail(job, f"delivery failed: {failed}")
        delay = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempts - 1))
        try:
            job = self.store.transition(
                job.id, "delivering", reason=f"delivery failed: {failed}", delivery=answers, timings=timings,
                next_attempt_at=time.time() + delay, delivery_attempt=True,
            )
        except JobStateError:  # retried or failed by an operator meanwhile
            return self.store.get(job.id)
        log_event("delivery.retry", job=job.id, in_s=delay, attempt=attempts)
        return job
