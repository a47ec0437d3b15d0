"""The standalone node: listener + receiver processes + series completion + job store + one warm worker +
C-STORE delivery. The associations run in receiver processes (receivers.py); everything else in this one.

Storage layout (``storage`` setting)::

    jobs.sqlite                    the durable job store (jobs/store.py)
    series/<SeriesUID>/<SOP>.dcm   received CT / Enhanced CT instances (a job's ``source`` is this directory)
    images/<SeriesUID>/<SOP>.dcm   received X-ray images (cephalograms): one job each, ``source`` = the file
    other/<SeriesUID>/<SOP>.dcm    everything else a PACS sent (kept, no job)
    results/job-<id>-<attempt>/    landmarks-sr.dcm, measurements-sr.dcm, seg.dcm, landmarks.json
    incomplete/<SeriesUID>/<SOP>.dcm  never-acknowledged files a power loss cut short (set aside at start)

Distributed mode (``queue = "postgres"``, docs/scale-out.md): ``storage`` is shared storage (the same path
on every worker host); the job records live in PostgreSQL and a completed series is queued there with its
folder as reference (``Cluster.defer_analyse``); an X-ray image (a cephalogram) is queued at once with its
file ``images/<SeriesUID>/<SOP>.dcm`` as reference, STAT rule as for a series. No model is loaded here and no
worker thread runs: ``pacs-landmarks worker`` processes analyse (loading the 2D model at their first image
job) and deliver. Calls to PostgreSQL retry while it is unreachable.

Start-up resumes what a crash left: ``running`` jobs are re-queued, ``delivering`` ones are retried now, and
``received`` ones (series still arriving when the node died) complete after the idle timeout from start; their
folders are first checked for files a power loss cut short (``set_aside_incomplete``).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pacs_landmarks.node.config import NodeConfig
from pacs_landmarks.jobs.delivery import StoreSCU
from pacs_landmarks.jobs.store import JobStore
from pacs_landmarks.jobs.logs import log_event
from pacs_landmarks.node.intake import Intake, SeriesTracker
from pacs_landmarks.node.receivers import ReceiverPool
from pacs_landmarks.node.scp import Refused, check_pixel_data, series_files
from pacs_landmarks.jobs.worker import Worker, freeze_long_lived


def set_aside_incomplete(folder: str | Path, aside: Path) -> list[Path]:
    """Move instance files that are not whole (empty, cut short) from ``folder`` to ``aside/<folder name>/``.

    Only a power loss can leave such a file (node/receive.py: a new instance is renamed into place before its
    flush), and only for an instance whose Success was never sent: every acknowledged file was checked
    whole and flushed. The sender retries those; moving them aside keeps them out of the series' analysis
    without deleting anything.
    """
    import pydicom

    moved = []
    for path in series_files(folder):
        try:
            ds = pydicom.dcmread(path, defer_size="4 KB")
            check_pixel_data(ds)
            reason = None
        except Refused as exc:
            reason = str(exc)
        except Exception as exc:  # pydicom raises many types on a cut-off file
            reason = f"not a whole DICOM file ({type(exc).__name__})"
        if reason:
            target = aside / Path(folder).name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            moved.append(target)
            log_event("instance.set_aside", logging.WARNING, file=path.name, series=Path(folder).name, reason=reason)
    return moved


class ModelLoadError(Exception):
    """The configured model cannot be loaded (the node does not start)."""


def load_model(path: str | None, device: str | None, landmark_set: str | None = None) -> Any:
    from pacs_landmarks.inference.model import LandmarkModel

    try:
        if landmark_set is None:
            return LandmarkModel.load(path, device=device)
        return LandmarkModel.load(path, device=device, landmark_set=landmark_set)
    except Exception as exc:
        raise ModelLoadError(f"cannot load model {path or '(shipped demo model)'}: {exc}") from exc


def load_job_sources(job: Any) -> list[Path]:
    """The node's loader: the image file of an image job, else the series folder's instances."""
    if job.details.get("kind") == "image":
        path = Path(job.source)
        if not path.is_file():
            raise FileNotFoundError(f"image {path.name} is no longer in storage")
        return [path]
    return series_files(job.source)


class Node:
    def __init__(self, cfg: NodeConfig, model: Any = None,
                 process_series: Callable[[list, Any], Any] | None = None, image_model: Any = None):
        self.cfg = cfg
        self.model = model
        self.image_model = image_model  # the 2D model of cephalogram jobs (None: loaded at start if enabled)
        self._process_series = process_series
        self.address: tuple[str, int] | None = None
        self.worker: Worker | None = None

    def start(self) -> tuple[str, int]:
        # The receiver processes import their libraries while this one loads the models.
        self.receivers = ReceiverPool(self.cfg, verbose=logging.getLogger().isEnabledFor(logging.DEBUG))
        self.receivers.spawn()
        try:
            return self._start()
        except BaseException:
            self.receivers.stop()
            raise

    def _start(self) -> tuple[str, int]:
        cfg = self.cfg
        root = cfg.storage_path
        root.mkdir(parents=True, exist_ok=True)
        if cfg.queue == "postgres":
            unfinished, on_queued = self._start_cluster()
        else:
            if self.model is None:  # loaded once, before listening: a bad model path fails the start
                self.model = load_model(cfg.model, cfg.device)
            if self.image_model is None and cfg.cephalograms:
                try:
                    self.image_model = load_model(cfg.ceph_model, cfg.device, landmark_set="ceph19")
                except ModelLoadError as exc:
                    if cfg.ceph_model:  # asked for by name: a bad path fails the start, as for the CT model
                        raise
                    # the shipped one is missing: CT works, X-ray images are kept, not analysed
                    log_event("node.warning", logging.WARNING, reason=f"cephalograms not analysed: {exc}")
            self.store = JobStore(root / "jobs.sqlite")
            unfinished = self.store.resume()
            self.worker = Worker(
                self.store, self.model, loader=load_job_sources, deliver=StoreSCU(cfg.ae_title),
                results_dir=root / "results", backoff_base_s=cfg.backoff_base_s, backoff_max_s=cfg.backoff_max_s,
                max_delivery_attempts=cfg.max_delivery_attempts, process_series=self._process_series,
                image_model=self.image_model,
            )
            on_queued = lambda job_id: self.worker.wake()  # noqa: E731
        self.tracker = SeriesTracker(self.store, cfg.idle_timeout, on_queued=on_queued)
        arriving = [job for job in unfinished if job.state == "received"]  # series arriving when the node stopped
        for job in arriving:
            set_aside_incomplete(job.source, root / "incomplete")
        job_defaults = {
            "model_name": getattr(self.model, "name", None),
            "model_version": getattr(self.model, "version", None),
            "destinations": [d.to_job() for d in cfg.destinations],
        }
        if cfg.store_when_nothing_found:  # the job steps read it from the job (jobs/steps.py), in both modes
            job_defaults["details"] = {"store_when_nothing_found": True}
        # Cephalograms: one image job per X-ray image. Distributed mode: no model here (the workers load the 2D
        # model), so every such image is queued; the job refers to its file on the shared storage.
        image_defaults = None
        if cfg.cephalograms and (self.image_model is not None or cfg.queue == "postgres"):
            image_defaults = {"model_name": getattr(self.image_model, "name", None),
                              "model_version": getattr(self.image_model, "version", None),
                              "destinations": job_defaults["destinations"]}
        self.intake = Intake(self.store, self.tracker, job_defaults, image_defaults)
        # What is loaded by now lives as long as the node: out of the collector's scans (jobs/worker.py
        # freeze_long_lived; the worker freezes again after its warm-up).
        freeze_long_lived()
        if self.worker is not None:
            self.worker.start()
        self.tracker.start()
        self.address = self.receivers.start(self.intake, image_jobs=image_defaults is not None)
        for job in arriving:  # their idle timeout counts from now, when the node can receive their rest
            self.tracker.adopt(job.id, job.series_instance_uid, len(series_files(job.source)))
        if not cfg.allow:
            log_event("node.warning", logging.WARNING, reason="no allowed calling AE titles configured: any is accepted")
        if not cfg.destinations:
            log_event("node.warning", logging.WARNING, reason="no destinations: results stay in storage/results")
        log_event(
            "node.started", ae_title=cfg.ae_title, address=f"{self.address[0]}:{self.address[1]}",
            model=job_defaults["model_name"], model_version=job_defaults["model_version"],
            ceph_model=f"{image_defaults['model_name']} {image_defaults['model_version']}" if image_defaults else None,
            resumed=len(unfinished), tls=bool(cfg.tls_cert) or None, receivers=self.receivers.processes,
        )
        return self.address

    def _start_cluster(self) -> tuple[list, Callable[[int], None]]:
        """The distributed mode: PostgreSQL store (retrying), enqueue on completion; see the module docstring."""
        from pacs_landmarks.jobs.distributed import Cluster, RetryingStore, retrying

        # Workers on other hosts find a series by its folder: record absolute paths.
        self.cfg.storage = str(self.cfg.storage_path.resolve())
        settings = self.cfg.cluster_settings()
        self.cluster = Cluster(settings)
        self.store = RetryingStore(self.cluster.store, settings.enqueue_retry_s)
        self.worker = None
        spool = str(self.cfg.storage_path.resolve())
        # Only this node's series (its spool folder); running jobs belong to workers, not to us.
        unfinished = [j for j in self.store.unfinished() if j.source.startswith(spool)]
        for job in unfinished:
            if job.state == "queued":  # a crash between completion and enqueue; the queueing lock dedups
                self.cluster.defer_analyse(job, stat=bool(job.details.get("stat")))

        def on_queued(job_id: int) -> None:
            job = self.store.get(job_id)
            stat = bool(job.details.get("stat"))  # set by the receiver's STAT rule ([cluster] stat_rule)
            retrying("enqueue", lambda: self.cluster.defer_analyse(job, stat=stat), settings.enqueue_retry_s)
            if stat:
                log_event("job.stat", job=job_id, series=job.series_instance_uid, queue="analyse-stat")

        return unfinished, on_queued

    def stop(self) -> None:
        self.receivers.stop()
        self.tracker.stop()
        if self.worker is not None:
            self.worker.stop()
        log_event("node.stopped", ae_title=self.cfg.ae_title)
