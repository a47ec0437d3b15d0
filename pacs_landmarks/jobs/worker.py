"""The embedded mode's analysis worker: a thread that claims jobs from a local store and runs the shared steps.

A front end (the pynetdicom node, the Orthanc plugin) supplies a JobStore, the model (and the 2D model of
image jobs, ``image_model``, see ``jobs.steps``), a ``loader`` and a
``deliver`` callable (see ``pacs_landmarks.jobs.steps`` for what they do and for what happens to a job); the
distributed mode runs the same steps from procrastinate tasks instead (``pacs_landmarks.jobs.distributed``).

Usage::

    worker = Worker(store, model, loader=my_loader, deliver=my_deliver, results_dir=Path("results"))
    store.resume()          # once at start-up: re-queue jobs a crash left running
    worker.start()          # a daemon thread; worker.wake() after queueing a job for a prompt start
    ...
    worker.stop()
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import Any

from pacs_landmarks.jobs.logs import log_event
from pacs_landmarks.jobs.steps import (  # noqa: F401  (re-exported: front ends import them from here)
    RESULT_FILES, Deliver, JobSteps, Loader, PermanentDeliveryError, fsync_dir, write_results,
)
from pacs_landmarks.jobs.store import Job, JobStore


def freeze_long_lived() -> None:
    """Move every object alive now out of the garbage collector's view (``gc.freeze``), after collecting
    what is garbage already: what a process has loaded by its first job (model, torch, pydicom, highdicom,
    pynetdicom) lives as long as the process. A full collection then looks at new objects only: in the
    node, with ~470,000 objects loaded, 0.44 s -> ~0.001 s, and pynetdicom's server runs one every 60
    turns of its loop, holding the GIL while every receiving thread waits (docs/benchmarks.md, "Node")."""
    import gc

    gc.collect()
    gc.freeze()


class Worker(threading.Thread):
    """A daemon thread running ``run_job`` on every claimable job of ``store``; see the module docstring."""

    def __init__(
        self,
        store: JobStore,
        model: Any,
        *,
        poll_interval_s: float = 1.0,
        name: str = "landmark-worker",
        warm_up: bool = True,
        **steps: Any,
    ):
        """``steps``: the keyword options of ``JobSteps`` (``loader``, ``deliver``, ``results_dir``, the back-off
        and attempt limits, ``process_series``, ``image_model``) but ``owner``: this worker's, one per thread."""
        super().__init__(name=name, daemon=True)
        self.store = store
        self.model = model
        self.poll_interval_s = poll_interval_s
        self.owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.steps = JobSteps(store, model, owner=self.owner, **steps)
        # Only the real pipeline is warmed up: an injected one (tests) is called for jobs only.
        self._warm_up = warm_up and steps.get("process_series") is None
        self._wake = threading.Event()
        self._stopping = threading.Event()

    # The callables live in the steps; a front end (or a test) may swap them between jobs.
    @property
    def loader(self) -> Loader:
        return self.steps.loader

    @loader.setter
    def loader(self, value: Loader) -> None:
        self.steps.loader = value

    @property
    def deliver(self) -> Deliver:
        return self.steps.deliver_to

    @deliver.setter
    def deliver(self, value: Deliver) -> None:
        self.steps.deliver_to = value

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
        freeze_long_lived()  # the warm-up imported the rest of the pipeline's libraries

    def run_once(self) -> bool:
        """Claim one job and work on it; False when there was nothing to claim."""
        job = self.store.claim(self.owner)
        if job is None:
            return False
        self.run_job(job)
        return True

    def run_job(self, job: Job) -> Job:
        """Analyse and deliver one claimed job (``JobSteps.run_job``)."""
        return self.steps.run_job(job)
