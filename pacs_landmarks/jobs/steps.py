"""The step functions both modes run for a job, and the state changes around them.

One job = load the series (``loader``), analyse (``process_series`` + ``write_results``), deliver (``deliver``
per destination). A job whose input is one single-frame X-ray image (SOP Class DX For Presentation / For
Processing, CR or Secondary Capture, ``dicom.xray.XRAY_CLASSES``: a cephalogram) is an *image job*: the same
steps run ``process_image`` with the 2D model (``image_model``) instead, and ``job.details["kind"]`` is
``"image"``. The steps decide this from the SOP Class of what the loader returned, not from the front end. The embedded mode's ``Worker`` thread (worker.py) calls ``JobSteps.run_job`` on what it
claims from a local store; the distributed mode's procrastinate tasks (distributed.py) call
``JobSteps.analyse`` and ``JobSteps.deliver`` on the job the queue handed them, so both modes share every
state change and every timing.

A front end supplies:

- ``loader(job) -> Iterable[Dataset | str | Path]``: the series' instances, found through the opaque
  ``job.source``; passed as they are to ``process_series`` (which reads paths itself). Raise any exception for
  an unreadable series: the job fails with that message as its reason.
- ``deliver(job, destination, paths) -> None``: send the result files (``paths``: landmark SR, measurements
  SR, SEG, GSPS, in that order) to one destination (an item of ``job.destinations``). Return only when the
  destination answered Success for every file; raise any exception otherwise, and the job is retried with
  exponential back-off (``backoff_base_s * 2**n``, at most ``backoff_max_s``). Raise
  ``PermanentDeliveryError`` when retrying cannot help: the job fails at once.

Per job:

1. ``queued -> running`` (``JobStore.claim``, by the caller); a job claimed more than ``max_attempts`` times
   (the process died while analysing it each time) fails instead of crashing the node again. The job's
   ``model_name`` / ``model_version`` become those of the model it runs with (the 2D model for an image job):
   the distributed mode's front ends load no model and queue jobs without them.
2. ``loader`` + ``pacs_landmarks.pipeline.process_series(datasets, model, predecessors)`` (an image job:
   ``process_image(dataset, image_model, predecessors)``; an image that is not a lateral cephalogram,
   ``pipeline.NotACephalogram``, makes no results: the job ends ``done`` with the reason, e.g. "not analysed:
   a panoramic radiograph (Modality PX), not a lateral cephalogram", and ``details["not_analysed"]``) (``predecessors``: the
   results of earlier jobs of the same series and model, ``jobs/supersede.py``, which the new SRs name as
   replaced) with the model loaded once by the
   front end and kept warm. No landmark found: no result objects, unless the front end put
   ``"store_when_nothing_found": true`` in ``job.details`` (node.toml / orthanc.json setting): then the landmark
   SR and measurements SR that say so are made and delivered (``results_when_nothing_found``).
3. The result objects and ``landmarks.json`` are written to ``results_dir/job-<id>-<attempt>/``
   atomically (temp dir, fsync, rename) BEFORE any delivery: ``running -> delivering`` with ``job.results``
   = ``{"landmark_sr", "measurements_sr", "seg", "gsps", "landmarks_json"}`` -> path, and ``job.details``
   gets ``result_uids`` and ``instances_read`` (``jobs/supersede.py``).
4. Each destination without a Success yet gets ``deliver``; ``delivering -> done`` only when every one
   answered Success. Otherwise the job stays ``delivering``, unowned until ``next_attempt_at``, so a worker
   goes on with other jobs meanwhile; the results stay on disk.

``job.timings`` (seconds) gets ``queue_wait``, ``read`` (the loader), the pipeline's own timings (``process_series``
``Results.timings``), ``write_results`` and ``delivery``; front ends add their own (e.g. ``completion_wait``).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from pacs_landmarks.jobs.logs import log_event
from pacs_landmarks.jobs.store import Job, JobStateError, SqlJobStore, destination_key
from pacs_landmarks.jobs.supersede import predecessors, result_uids
from pacs_landmarks.pipeline import input_kind, starts_image_job  # noqa: F401  (front ends import them here)

Loader = Callable[[Job], Iterable[Any]]
Deliver = Callable[[Job, dict[str, Any], list[Path]], None]

RESULT_FILES = (
    ("landmark_sr", "landmarks-sr.dcm"),
    ("measurements_sr", "measurements-sr.dcm"),
    ("seg", "seg.dcm"),
    ("gsps", "gsps.dcm"),
)
# A series whose slices differ in rescale gets no presentation state (sr_templates/gsps.py).
OPTIONAL_RESULTS = ("gsps",)
# What an image job must have written (a 2D image has no SEG).
IMAGE_RESULTS = ("landmark_sr", "measurements_sr")



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
    """Write the result objects (``RESULT_FILES``) and ``landmarks.json`` atomically; return kind -> path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    final = results_dir / f"job-{job.id}-{job.attempts}"
    if final.exists():  # an earlier run of this very attempt died after the rename: its files are complete
        shutil.rmtree(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".job-{job.id}-", dir=results_dir))
    try:
        paths: dict[str, str] = {}
        for kind, name in RESULT_FILES:
            ds: Dataset | None = getattr(results, kind, None)
            if ds is None:  # not made: nothing found (pipeline.Results), or no GSPS for this series
                continue
            _write_synced(tmp / name, lambda fh, ds=ds: ds.save_as(fh, enforce_file_format=True))
            paths[kind] = str(final / name)
        if getattr(results, "image", None) is not None:
            from pacs_landmarks.pipeline import image_landmarks_json

            doc = image_landmarks_json(results, job.model_name, job.model_version)
        else:
            doc = _series_landmarks_json(results, job)
        _write_synced(tmp / "landmarks.json", lambda fh: fh.write(json.dumps(doc, indent=2).encode()))
        paths["landmarks_json"] = str(final / "landmarks.json")
        fsync_dir(tmp)
        os.rename(tmp, final)
        fsync_dir(results_dir)
        return paths
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _series_landmarks_json(results: Any, job: Job) -> dict:
    """The landmarks.json of a series job (3D: LPS mm)."""
    return {
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




class JobSteps:
    """Load, analyse and deliver one claimed job, with its state changes; see the module docstring."""

    def __init__(
        self,
        store: SqlJobStore,
        model: Any,
        *,
        loader: Loader,
        deliver: Deliver,
        results_dir: Path,
        owner: str,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
        max_delivery_attempts: int | None = None,
        max_attempts: int = 3,
        process_series: Callable[[list[Dataset], Any], Any] | None = None,
        image_model: Any = None,
    ):
        self.store = store
        self.model = model
        self.image_model = image_model  # the 2D model of image jobs; None: the shipped ceph19 model, when needed
        self.loader = loader
        self.deliver_to = deliver
        self.results_dir = Path(results_dir)
        self.owner = owner
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.max_delivery_attempts = max_delivery_attempts
        self.max_attempts = max_attempts
        self._process_series = process_series

    def run_job(self, job: Job) -> Job:
        """Analyse (if ``running``) and deliver (``delivering``) one claimed job; returns its new state."""
        if job.state == "running":
            job = self.analyse(job)
        if job.state == "delivering":
            job = self.deliver(job)
        return job

    def fail(self, job: Job, reason: str) -> Job:
        job = self.store.transition(job.id, "failed", reason=reason)
        log_event("job.failed", logging.WARNING, job=job.id, series=job.series_instance_uid, reason=reason)
        return job

    def pipeline(self) -> Callable[[list[Dataset], Any], Any]:
        if self._process_series is None:
            from pacs_landmarks.pipeline import process_series

            self._process_series = process_series
        return self._process_series

    def load_image_model(self) -> Any:
        """The 2D model of image jobs: the one given, else the shipped ceph19 model (loaded once)."""
        if self.image_model is None:
            from pacs_landmarks.inference.model import LandmarkModel

            self.image_model = LandmarkModel.load(landmark_set="ceph19")
        return self.image_model

    def load_series(self, job: Job) -> list[Any]:
        """Step 1: the series' instances, read when the job starts (not when it was queued)."""
        datasets = list(self.loader(job))
        if not datasets:
            raise ValueError("no instances to analyse")
        return datasets

    def analyse(self, job: Job) -> Job:
        """Steps 1-3 for a ``running`` job: ``delivering`` with results on disk, or ``failed``."""
        log_event("job.running", job=job.id, series=job.series_instance_uid, attempt=job.attempts, worker=self.owner)
        if job.attempts > self.max_attempts:
            return self.fail(job, f"gave up after {job.attempts - 1} attempts that did not finish")
        try:
            model = self.load_image_model() if job.details.get("kind") == "image" else self.model
        except Exception as exc:  # a 2D model file that cannot be read: this job fails with the reason
            return self.fail(job, f"{type(exc).__name__}: {exc}")
        # Read from the job store before the series' own work: a store that is down (PostgreSQL restarting) is
        # not the series' fault and must not fail the job; the error goes to the worker, which retries.
        job = self._record_model(job, model)
        replaced = predecessors(self.store, job)
        from pacs_landmarks.pipeline import NotACephalogram

        try:
            datasets, results, paths, timings = self._analyse(job, replaced)
        except JobStateError:
            raise  # the job changed under us (an operator, a sweeper): not the series' fault
        except NotACephalogram as exc:  # not for us: no results, a clear end state, the image stays stored
            return self._not_analysed(job, str(exc))
        except Exception as exc:  # bad input or a model error: recorded, nothing received is lost
            return self.fail(job, f"{type(exc).__name__}: {exc}")
        # Outside the try for the same reason as above: a store error here is retried, not the series' failure.
        return self._record_analysis(job, datasets, results, paths, timings, replaced)

    def _record_model(self, job: Job, model: Any) -> Job:
        """The job's record names the model it runs with, as the embedded front ends record it when they queue
        it: the distributed mode's front ends load no model, so the worker does (before ``predecessors``, which
        compares model names, and so that a front end can tell which model version analysed an input)."""
        name, version = getattr(model, "name", None), getattr(model, "version", None)
        if name is None or (job.model_name, job.model_version) == (str(name), str(version)):
            return job
        return self.store.record_model(job.id, str(name), None if version is None else str(version))

    def _analyse(self, job: Job, replaced: dict[str, list[Dataset]]) -> tuple[list, Any, dict[str, str], dict]:
        """Read, run the pipeline, write the results: the series' own work."""
        timings: dict[str, float] = {}
        if job.queued_at:
            timings["queue_wait"] = max(0.0, (job.started_at or time.time()) - job.queued_at)
        t = time.perf_counter()
        datasets = self.load_series(job)
        timings["read"] = time.perf_counter() - t
        # A front end that wants a report saying "nothing found" (store_when_nothing_found, default off) says so
        # in the job: the pipeline then makes the two SRs that state it (no SEG, no GSPS).  Image jobs
        # (cephalograms) make no report: nothing found there is the same "no result objects".
        if input_kind(datasets) == "image":
            from pacs_landmarks.pipeline import process_image

            results = process_image(datasets[0], self.load_image_model(), predecessors=replaced)
        else:
            report = {"results_when_nothing_found": True} if job.details.get("store_when_nothing_found") else {}
            results = self.pipeline()(datasets, self.model, predecessors=replaced, **report)
        timings.update({k: float(v) for k, v in (getattr(results, "timings", None) or {}).items()})
        t = time.perf_counter()
        paths = write_results(results, job, self.results_dir)
        timings["write_results"] = time.perf_counter() - t
        return datasets, results, paths, timings

    def _not_analysed(self, job: Job, reason: str) -> Job:
        """An input that is not what the model is for: ``done`` without results, ``reason`` said."""
        job = self.store.transition(job.id, "delivering", expect="running", expect_owner=self.owner,
                                    owner=self.owner, results={}, details={"kind": "image", "not_analysed": reason})
        log_event("job.not_analysed", job=job.id, series=job.series_instance_uid, reason=reason)
        return job

    def _record_analysis(self, job: Job, datasets: list, results: Any, paths: dict[str, str],
                         timings: dict[str, float], replaced: dict[str, list[Dataset]]) -> Job:
        from pacs_landmarks.pipeline import RESULT_KINDS

        nothing = bool(getattr(results, "nothing_found", False))
        uids = result_uids(results, RESULT_KINDS)
        # What a destination that deletes replaced results removes once these are stored (jobs/references.py);
        # the same input again gives the same UIDs, which stay.
        current = {u["SOPInstanceUID"] for u in uids.values()}
        supersedes = sorted({str(r.SOPInstanceUID) for refs in replaced.values() for r in refs} - current)
        job = self.store.transition(
            job.id, "delivering", expect="running", expect_owner=self.owner, owner=self.owner, results=paths,
            timings=timings,
            details={"instances_read": len(datasets), "result_uids": uids,
                     **({"nothing_found": True} if nothing else {}),
                     **({"supersedes": supersedes} if supersedes else {}),
                     **({"kind": "image"} if getattr(results, "image", None) is not None else {})},
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

    def deliver(self, job: Job) -> Job:
        """Step 4 for a ``delivering`` job: ``done``, ``failed``, or ``delivering`` with a back-off."""
        paths = [Path(job.results[kind]) for kind, _ in RESULT_FILES if kind in job.results]
        missing = [str(p) for p in paths if not p.exists()]
        if job.details.get("not_analysed") and not paths:
            reason = f"not analysed: {job.details['not_analysed']}"
            job = self.store.transition(job.id, "done", reason=reason)
            log_event("job.done", job=job.id, series=job.series_instance_uid, destinations=0, not_analysed=True)
            return job
        if job.details.get("nothing_found") and not paths:
            # no landmark found: nothing goes to the archive (pipeline.Results.nothing_found)
            job = self.store.transition(job.id, "done", reason="no landmark found: no result objects")
            log_event("job.done", job=job.id, series=job.series_instance_uid, destinations=0, nothing_found=True)
            return job
        # "nothing found" reported (store_when_nothing_found): the SRs only, there is no landmark for a SEG
        optional = OPTIONAL_RESULTS + (("seg",) if job.details.get("nothing_found") else ())
        required = list(IMAGE_RESULTS) if job.details.get("kind") == "image" else \
            [kind for kind, _ in RESULT_FILES if kind not in optional]
        if any(kind not in job.results for kind in required) or missing:
            return self.fail(job, f"result files missing: {', '.join(missing) or 'none recorded'}")
        answers: dict[str, str] = {}
        permanent = None
        t = time.perf_counter()
        for dest in job.destinations:
            key = destination_key(dest)
            if job.delivery.get(key) == "success":
                continue
            try:
                self.deliver_to(job, dest, paths)
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
            return self.fail(job, f"delivery failed: {failed}")
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
