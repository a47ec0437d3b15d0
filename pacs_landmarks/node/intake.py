"""The node's intake: what happens, in the node's main process, to each instance a receiver process stored.

Receiver processes (``receivers.py``) check and write each instance (``scp.py``) and then report it here,
before they answer Success: an acknowledged CT instance always belongs to a job in the job store, and an
acknowledged X-ray image (a cephalogram) is always queued. Here, in one process for all receivers:

- a CT / Enhanced CT instance joins its series' job (one job per series, whichever receiver and association
  sent it) and the :class:`SeriesTracker` decides when the series is complete: when every association that sent
  it has closed (released or aborted) and no instance of it arrived for ``idle_timeout`` seconds; or at once
  when the expected count is known and reached (Images in Acquisition (0020,1002); an Enhanced CT instance with
  Number of Frames > 1 is a whole volume);
- a single-frame X-ray image that starts an image job (``jobs.steps.starts_image_job``) is queued at once;
- anything else was stored under ``other/`` and is logged once per association and series as ignored.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pacs_landmarks.jobs.logs import log_event
from pacs_landmarks.jobs.store import JobStore
from pacs_landmarks.node.scp import Stored, series_files


@dataclass
class _OpenSeries:
    job_id: int
    series_uid: str
    count: int = 0
    last_arrival: float = field(default_factory=time.monotonic)
    associations: set[tuple] = field(default_factory=set)  # open ones that sent instances of the series
    seen: set[tuple] = field(default_factory=set)  # every one that did
    expected: int | None = None
    aborted: bool = False


class SeriesTracker:
    """Decides when a series is complete and queues its job (see the module docstring)."""

    def __init__(self, store: JobStore, idle_timeout: float, on_queued: Callable[[int], None] = lambda j: None):
        self.store = store
        self.idle_timeout = idle_timeout
        self.on_queued = on_queued
        self._open: dict[str, _OpenSeries] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="series-completion", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def open_job(self, series_uid: str) -> int | None:
        with self._lock:
            s = self._open.get(series_uid)
            return s.job_id if s else None

    def adopt(self, job_id: int, series_uid: str, count: int) -> None:
        """Track a job left ``received`` by an earlier run: complete after the idle timeout from now."""
        with self._lock:  # an instance of it may have arrived already: then it is tracked
            self._open.setdefault(series_uid, _OpenSeries(job_id, series_uid, count=count))

    def arrived(self, job_id: int, series_uid: str, assoc: tuple, expected: int | None) -> None:
        with self._lock:
            s = self._open.get(series_uid)
            if s is None or s.job_id != job_id:
                s = self._open[series_uid] = _OpenSeries(job_id, series_uid)
            s.count += 1
            s.last_arrival = time.monotonic()
            s.associations.add(assoc)
            s.seen.add(assoc)
            if expected:
                s.expected = expected
            done = s.expected is not None and s.count >= s.expected
        if done:
            self._complete(series_uid, "expected count reached")

    def closed(self, assoc: tuple, aborted: bool) -> None:
        """An association ended: its series complete after the idle timeout (or now, if idle already)."""
        with self._lock:
            for s in self._open.values():
                if assoc in s.seen:  # EVT_ABORTED may come after the connection closed
                    s.associations.discard(assoc)
                    s.aborted = s.aborted or aborted

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            now = time.monotonic()
            with self._lock:
                ready = [
                    uid for uid, s in self._open.items()
                    if not s.associations and now - s.last_arrival >= self.idle_timeout
                ]
            for uid in ready:
                self._complete(uid, "idle timeout")

    def _complete(self, series_uid: str, why: str) -> None:
        with self._lock:
            s = self._open.pop(series_uid, None)
        if s is None:
            return
        wait = time.monotonic() - s.last_arrival
        # Count what is on disk, not arrivals: a resent instance overwrites its file and must count once.
        job = self.store.get(s.job_id)
        s.count = len(series_files(job.source))
        self.store.record_instances(s.job_id, s.count - job.instances,
                                    details={"aborted": s.aborted} if s.aborted else None)
        try:
            self.store.transition(s.job_id, "queued", expect="received", timings={"completion_wait": wait})
        except Exception:  # retried or failed by an operator meanwhile: nothing to queue
            logging.getLogger(__name__).exception("could not queue job %s", s.job_id)
            return
        log_event("series.complete", job=s.job_id, series=series_uid, instances=s.count, why=why,
                  aborted=s.aborted or None, wait_s=wait)
        log_event("job.queued", job=s.job_id, series=series_uid)
        self.on_queued(s.job_id)


class Intake:
    """Receives the reports of the receiver processes (``receivers.ReceiverPool``): see the module docstring.

    ``job_defaults`` (model name/version, destinations) go into every new series job; ``image_defaults`` into
    every image job (None: X-ray images are stored, not analysed). ``stat_rule``: the distributed mode's STAT
    rule, already applied by the receiver (``Stored.stat``).
    """

    def __init__(self, store: JobStore, tracker: SeriesTracker, job_defaults: dict, image_defaults: dict | None):
        self.store = store
        self.tracker = tracker
        self.job_defaults = job_defaults
        self.image_defaults = image_defaults
        self._series_lock = threading.Lock()
        self._ignored_logged: dict[tuple, set[str]] = {}  # per open association: series logged as ignored
        self._stat_jobs: set[int] = set()

    def stored(self, assoc: tuple, item: Stored) -> None:
        """An instance is durable in storage (``item.path``); ``assoc``: (receiver, association) that sent it."""
        if item.for_job == "image":
            self._queue_image(item)
        elif item.for_job == "series":
            self._track(assoc, item)
        elif item.series_uid not in self._ignored_logged.setdefault(assoc, set()):
            self._ignored_logged[assoc].add(item.series_uid)
            log_event("series.ignored", series=item.series_uid, sop_class=item.sop_class, modality=item.modality,
                      reason="not CT / Enhanced CT Image Storage")

    def closed(self, assoc: tuple, aborted: bool) -> None:
        """An association ended (or its receiver process did: ``aborted``)."""
        self.tracker.closed(assoc, aborted)
        self._ignored_logged.pop(assoc, None)

    def _queue_image(self, item: Stored) -> None:
        """One X-ray image is one job, queued now: the image is durable already. The distributed mode's STAT
        rule applies as to a series."""
        job, created = self.store.ensure_job(item.series_uid, item.study_uid, item.path, state="queued",
                                             details={"kind": "image", **({"stat": True} if item.stat else {})},
                                             **(self.image_defaults or {}))
        if created:
            self.store.record_instances(job.id, 1)
            log_event("job.queued", job=job.id, series=item.series_uid, kind="image")
            self.tracker.on_queued(job.id)

    def _track(self, assoc: tuple, item: Stored) -> None:
        series_uid = item.series_uid
        with self._series_lock:  # one job per series even when several associations send it at once
            job_id = self.tracker.open_job(series_uid)
            if job_id is None:
                job, created = self.store.ensure_job(series_uid, item.study_uid, str(Path(item.path).parent),
                                                     state="received", **self.job_defaults)
                if job.state != "received":  # complete and queued, not yet claimed: it will read this file
                    return
                job_id = job.id
                if created:
                    log_event("job.received", job=job_id, series=series_uid, study=item.study_uid)
            self.tracker.arrived(job_id, series_uid, assoc, item.expected)
            if item.stat and job_id not in self._stat_jobs:
                # In the job record at once, so a restart before completion keeps it; the node queues by it.
                self.store.record_instances(job_id, 0, details={"stat": True})
                self._stat_jobs.add(job_id)
