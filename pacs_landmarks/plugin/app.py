"""The Orthanc plugin proper: Orthanc events and REST routes adapted to the shared job store and worker.

Loaded by ``entry.py`` inside Orthanc's embedded Python. Threads:

- Orthanc's plugin thread calls ``on_change``: it only puts the series ID on a queue (slow work there would
  delay every later Orthanc event);
- the *dispatcher* thread turns a stable series into a job (``JobStore.ensure_job``, state ``queued``) when it
  is a CT image series not yet analysed by this model version; and a stored X-ray image (NEW_INSTANCE, not
  STABLE_SERIES: one image is the whole input) into an image job when its SOP Class says so
  (``jobs.steps.starts_image_job``: DX, CR, Secondary Capture that is not a screen capture) and it was not
  analysed by this version of the 2D model (``CephModel``);
- the shared ``Worker`` (pacs_landmarks.jobs.worker) claims jobs, reads the instances back from Orthanc
  (``/instances/{id}/file``), runs ``process_series`` and stores the SR, measurements SR, SEG and GSPS with
  ``POST /instances``; then, with ``"Superseded": "delete"``, it deletes the results of earlier jobs of the
  same series and model (``delete_superseded``).

A series that grows after its results were made (STABLE_SERIES again, with another instance count than the
last job read: more, mostly) gets a new job; its results have new UIDs and replace the earlier ones.

The job store lives next to Orthanc's storage, so a restart finishes what a crash left pending
(``JobStore.resume`` at ORTHANC_STARTED). REST (under ``/pacs-landmarks/``): ``jobs`` (GET), ``health``
(GET), ``series/{orthanc-id}/run`` (POST, run again even if already analysed; for a series of X-ray images:
each image).
"""
from __future__ import annotations

import io
import json
import logging
import queue
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from pacs_landmarks.dicom.series import CT_CLASSES as CT_IMAGE_SOP_CLASSES
from pacs_landmarks.dicom.xray import XRAY_CLASSES
from pacs_landmarks.jobs.store import Job, JobStore, UNFINISHED
from pacs_landmarks.jobs.logs import log_event
from pacs_landmarks.jobs.supersede import earlier_jobs, instances_used
from pacs_landmarks.plugin.config import PluginSettings

LOGGER = logging.getLogger("pacs_landmarks.plugin")

ORTHANC_DESTINATION = {"name": "orthanc"}
# Modalities of series whose X-ray images are looked at even when "Modalities" lists only CT: what a
# cephalostat, a CR reader or a film scanner writes, and PX / chest so that they end with a reason.
IMAGE_MODALITIES = ("DX", "CR", "PX", "OT", "RG")


class OrthancLogHandler(logging.Handler):
    """Python logging -> Orthanc's log (so `make serve` shows one log stream)."""

    def __init__(self, orthanc: Any):
        super().__init__()
        self.orthanc = orthanc
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if record.levelno >= logging.ERROR:
                self.orthanc.LogError(text)
            elif record.levelno >= logging.INFO:
                # Orthanc prints only warnings unless --verbose: our job events go there so they show.
                self.orthanc.LogWarning(text)
            else:
                self.orthanc.LogInfo(text)
        except Exception:  # logging must never break the plugin
            pass


def prefer_gdcm_for_jpeg_ls() -> None:
    """Decode JPEG-LS with GDCM, not pyjpegls: pyjpegls' CharLS clashes with the one inside Orthanc."""
    try:
        from pydicom.pixels.decoders import JPEGLSLosslessDecoder, JPEGLSNearLosslessDecoder

        for decoder in (JPEGLSLosslessDecoder, JPEGLSNearLosslessDecoder):
            if "pyjpegls" in decoder.available_plugins and "gdcm" in decoder.available_plugins:
                decoder.remove_plugin("pyjpegls")
    except Exception as exc:  # a pydicom without these decoders: nothing to prefer
        LOGGER.warning("could not prefer GDCM for JPEG-LS: %s", exc)


class LandmarkPlugin:
    """State of the plugin inside one Orthanc process."""

    analyses_images = True  # X-ray images (cephalograms) become image jobs here

    def __init__(self, orthanc: Any, settings: PluginSettings):
        self.orthanc = orthanc
        self.settings = settings
        self.store = self._open_store()
        self.events: queue.Queue[tuple[str, bool] | None] = queue.Queue()
        self.model: Any = None
        self.model_error: str | None = None
        self.image_model: Any = None  # the 2D model of cephalograms (settings.ceph_model)
        self.image_model_error: str | None = None
        self.last_error: str | None = None
        self.worker: Any = None
        self._model_ready = threading.Event()  # set once loading was attempted, successfully or not
        self._stopping = threading.Event()
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="landmark-dispatcher", daemon=True)
        self._loader_thread = threading.Thread(target=self._load_model, name="landmark-model", daemon=True)

    def _open_store(self) -> JobStore:
        return JobStore(self.settings.job_store_path)

    # -- life cycle ----------------------------------------------------------------------------------------
    def install(self) -> None:
        o = self.orthanc
        o.RegisterOnChangeCallback(self.on_change)
        o.RegisterRestCallback("/pacs-landmarks/jobs", self.rest_jobs)
        o.RegisterRestCallback("/pacs-landmarks/health", self.rest_health)
        o.RegisterRestCallback("/pacs-landmarks/series/([^/]+)/run", self.rest_run)
        self._start_loading_model()

    def _start_loading_model(self) -> None:
        # Loading torch and the model takes seconds: start now, overlapping Orthanc's own start-up.
        self._loader_thread.start()

    def on_change(self, change_type: Any, level: Any, resource_id: str) -> None:
        """Orthanc's event callback (its single plugin thread): enqueue only."""
        ct = self.orthanc.ChangeType
        if change_type == ct.STABLE_SERIES:
            self.events.put((resource_id, False))
        elif change_type == ct.NEW_INSTANCE and self.analyses_images and self.settings.cephalograms:
            self.events.put((resource_id, "instance"))
        elif change_type == ct.ORTHANC_STARTED:
            self.start()
        elif change_type == ct.ORTHANC_STOPPED:
            self.stop()

    def start(self) -> None:
        if not self._seq_file.exists():  # very first start: from now on, nothing stored is missed
            self._save_change_seq()
        resumed = self.store.resume()  # jobs a crash left running are queued again
        if resumed:
            log_event("plugin.resume", unfinished=len(resumed))
        self._dispatcher.start()
        self._starter = threading.Thread(target=self._start_worker, name="landmark-start", daemon=True)
        self._starter.start()

    def stop(self) -> None:
        self._stopping.set()
        self.events.put(None)
        # Orthanc finalizes its Python interpreter right after ORTHANC_STOPPED; a thread still importing torch or
        # starting the worker then aborts the whole process (SIGABRT). Let them finish first, bounded.
        for thread in (self._loader_thread, getattr(self, "_starter", None)):
            if thread is not None and thread.is_alive():
                thread.join(timeout=60.0)
        if self.worker is not None:
            # The current step finishes or is abandoned: an unfinished job is resumed at the next start.
            self.worker.stop(timeout=10.0)

    # -- model + worker ------------------------------------------------------------------------------------
    def _load_model(self) -> None:
        t = time.perf_counter()
        try:
            from pacs_landmarks.inference.model import LandmarkModel

            self.model = LandmarkModel.load(self.settings.model, device=self.settings.device)
            log_event(
                "plugin.model_loaded", model=self.model.name, version=self.model.version,
                seconds=time.perf_counter() - t,
            )
        except Exception as exc:
            self.model_error = self.last_error = f"model not loaded: {type(exc).__name__}: {exc}"
            LOGGER.error("%s", self.model_error)
        if self.settings.cephalograms:
            try:
                from pacs_landmarks.inference.model import LandmarkModel

                self.image_model = LandmarkModel.load(self.settings.ceph_model, device=self.settings.device,
                                                      landmark_set="ceph19")
                log_event("plugin.model_loaded", model=self.image_model.name, version=self.image_model.version)
            except Exception as exc:  # CT goes on; X-ray images are stored and not analysed
                self.image_model_error = f"cephalograms not analysed: {type(exc).__name__}: {exc}"
                LOGGER.error("%s", self.image_model_error)
        self._model_ready.set()

    def _start_worker(self) -> None:
        self._model_ready.wait()
        if self.model is None or self._stopping.is_set():
            return  # jobs stay queued; health says why
        if not self.settings.worker:
            log_event("plugin.worker_disabled")
            return
        from pacs_landmarks.jobs.worker import Worker

        self.worker = Worker(
            self.store, self.model, loader=self.load_instances, deliver=self.store_results,
            results_dir=self.settings.results_dir, name="landmark-worker", image_model=self.image_model,
        )
        self.worker.start()

    @property
    def model_identity(self) -> tuple[str | None, str | None]:
        if self.model is None:
            return None, None
        return str(self.model.name), str(self.model.version)

    # -- Orthanc access ------------------------------------------------------------------------------------
    def get_json(self, uri: str) -> Any:
        return json.loads(self.orthanc.RestApiGet(uri))

    def load_instances(self, job: Job) -> list[Any]:
        """Worker loader: every instance of the Orthanc series ``job.source`` (an image job: the Orthanc
        instance ``job.source``), as pydicom datasets."""
        import pydicom

        if job.details.get("kind") == "image":
            return [pydicom.dcmread(io.BytesIO(self.orthanc.RestApiGet(f"/instances/{job.source}/file")))]
        series = self.get_json(f"/series/{job.source}")
        return [
            pydicom.dcmread(io.BytesIO(self.orthanc.RestApiGet(f"/instances/{iid}/file")))
            for iid in series["Instances"]
        ]

    def store_results(self, job: Job, destination: dict[str, Any], paths: list[Path]) -> None:
        """Worker deliver: store the result files in this Orthanc (``POST /instances``, PS3.18-like upload),
        then delete the results they supersede (``"Superseded": "delete"``)."""
        ids = []
        for path in paths:
            answer = json.loads(self.orthanc.RestApiPost("/instances", Path(path).read_bytes()))
            if answer.get("Status") not in ("Success", "AlreadyStored"):
                raise RuntimeError(f"Orthanc refused {Path(path).name}: {answer.get('Status')}")
            ids.append(answer["ID"])
        self.store.record_instances(job.id, 0, details={"result_instances": ids})
        if self.settings.superseded == "delete":
            self.delete_superseded(job, ids)

    def delete_superseded(self, job: Job, current: list[str]) -> list[str]:
        """Delete from Orthanc the results stored by earlier jobs of the same series and model (any version),
        except ``current`` (the same input again gives the same instances). Returns the deleted IDs.

        Only after the new results are stored: a failure in between leaves old and new, never neither. A
        deletion that fails raises, so the worker retries the delivery (storing again is a no-op)."""
        keep, deleted = set(current), []
        for earlier in earlier_jobs(self.store, job, with_results=False):
            gone = []
            for iid in earlier.details.get("result_instances") or []:
                if iid in keep or iid in deleted:
                    continue
                try:
                    self.orthanc.RestApiGet(f"/instances/{iid}")
                except Exception:  # deleted already (by a person, or by an earlier supersede)
                    continue
                self.orthanc.RestApiDelete(f"/instances/{iid}")
                gone.append(iid)
            if gone:
                deleted += gone
                self.store.record_instances(earlier.id, 0, details={"superseded_by": job.id})
        if deleted:
            log_event("results.superseded", job=job.id, series=job.series_instance_uid, deleted=len(deleted))
        return deleted

    # -- series -> job -------------------------------------------------------------------------------------
    def _dispatch_loop(self) -> None:
        self._model_ready.wait()  # the model version decides whether a series was analysed already
        try:
            self.catch_up()
        except Exception as exc:
            self.last_error = f"catching up with Orthanc's changes: {type(exc).__name__}: {exc}"
            LOGGER.error("%s", self.last_error)
        while True:
            item = self.events.get()
            if item is None or self._stopping.is_set():
                return
            series_id, force = item
            try:
                if force == "instance":
                    self.consider_instance(series_id)
                else:
                    self.consider(series_id, force=force)
            except Exception as exc:
                self.last_error = f"series {series_id}: {type(exc).__name__}: {exc}"
                LOGGER.error("%s\n%s", self.last_error, traceback.format_exc())
            # Not after each instance event (every CT slice is one): the catch-up from an older sequence number
            # only considers some images again, which finds them analysed or queued.
            if self.events.empty() and force != "instance":
                self._save_change_seq()

    @property
    def _seq_file(self) -> Path:
        return self.settings.work_directory / "orthanc-last-change"

    def _save_change_seq(self) -> None:
        try:
            last = self.get_json("/changes?last")["Last"]
            tmp = self._seq_file.with_suffix(".tmp")
            tmp.write_text(str(last))
            tmp.replace(self._seq_file)
        except Exception as exc:  # only costs a longer catch-up at the next start
            LOGGER.warning("could not save Orthanc's change sequence: %s", exc)

    def catch_up(self) -> int:
        """Queue series that arrived while the plugin was not running (crash, kill, plugin disabled).

        STABLE_SERIES is not fired again after a restart for a series whose StableAge had not passed, nor for
        series stored while the plugin was down; Orthanc's change log (``/changes``) still lists them. From
        the last sequence number handled (none at the very first start: an existing archive is not
        re-analysed), every new or stable series goes through ``consider`` (which skips what is done).
        """
        if not self._seq_file.exists():
            return 0
        since = int(self._seq_file.read_text().strip() or 0)
        series: list[str] = []
        while True:
            page = self.get_json(f"/changes?since={since}&limit=1000")
            for change in page["Changes"]:
                if change["ChangeType"] in ("NewSeries", "StableSeries") and change["ID"] not in series:
                    series.append(change["ID"])
            since = page["Last"]
            if page["Done"] or not page["Changes"]:
                break
        for series_id in series:
            try:
                self.consider(series_id)
            except Exception as exc:  # deleted since, mostly
                LOGGER.warning("catch-up: series %s: %s", series_id, exc)
        if series:
            log_event("plugin.catch_up", series=len(series))
        self._save_change_seq()
        return len(series)

    def consider(self, series_id: str, force: bool = False) -> tuple[Job | None, str]:
        """Queue a job for an Orthanc series if it is a CT image series; returns (job, why)."""
        series = self.get_json(f"/series/{series_id}")
        tags = series.get("MainDicomTags", {})
        modality = str(tags.get("Modality", "")).upper()
        if modality not in self.settings.modalities and not (self.analyses_images and modality in IMAGE_MODALITIES):
            return None, f"skipped: modality {modality or 'none'}"
        if not series.get("Instances"):
            return None, "skipped: no instances"
        if not force and not series.get("IsStable", True):
            return None, "not complete yet (STABLE_SERIES will follow)"
        sop_class = self.orthanc.RestApiGet(f"/instances/{series['Instances'][0]}/content/0008-0016")
        sop_class = sop_class.decode("ascii", "replace").strip("\x00 ")
        if sop_class in XRAY_CLASSES and self.analyses_images:  # (catch-up, a re-run): each image is a job
            answers = [self.consider_instance(iid, force=force) for iid in series["Instances"]]
            jobs = [job for job, _ in answers if job is not None]
            return (jobs[-1] if jobs else None), "; ".join(sorted({why for _, why in answers}))
        if sop_class not in CT_IMAGE_SOP_CLASSES:
            log_event("series.skipped", series=tags.get("SeriesInstanceUID"), sop_class=sop_class)
            return None, f"skipped: SOP class {sop_class} is not a CT image"
        series_uid = tags["SeriesInstanceUID"]
        study_uid = self.get_json(f"/studies/{series['ParentStudy']}")["MainDicomTags"].get("StudyInstanceUID")
        count = len(series["Instances"])
        name, version = self.model_identity
        earlier = [j for j in self.store.find(series_uid, source=series_id)
                   if j.state != "failed" and j.model_version == version]
        if not force and self.settings.skip_processed and earlier and instances_used(earlier[-1]) == count:
            last = earlier[-1]
            log_event("series.already_processed", series=series_uid, job=last.id, state=last.state)
            return last, "already processed"
        job, created = self._queue_job(series, series_uid, study_uid, series_id, count, force)
        return job, "queued" if created else "already queued"

    def image_job_header(self, instance_id: str):
        """(header without pixels, "") of a stored instance that starts an image job, else (None, why)."""
        import pydicom

        from pacs_landmarks.jobs.steps import starts_image_job

        try:
            sop_class = self.orthanc.RestApiGet(f"/instances/{instance_id}/metadata/SopClassUid")
        except Exception:  # deleted meanwhile (a superseded result, mostly)
            return None, "skipped: instance gone"
        if sop_class.decode("ascii", "replace").strip("\x00 ") not in XRAY_CLASSES:
            return None, "skipped: not an X-ray image"
        header = pydicom.dcmread(io.BytesIO(self.orthanc.RestApiGet(f"/instances/{instance_id}/file")),
                                 stop_before_pixels=True)
        if not starts_image_job(header):
            return None, "skipped: a screen capture of another modality"
        return header, ""

    def consider_instance(self, instance_id: str, force: bool = False) -> tuple[Job | None, str]:
        """Queue an image job for one stored X-ray image (module docstring); returns (job, why)."""
        if self.image_model is None:
            return None, f"skipped: {self.image_model_error or 'no model for cephalograms'}"
        header, why = self.image_job_header(instance_id)
        if header is None:
            return None, why
        series_uid, study_uid = str(header.SeriesInstanceUID), str(header.get("StudyInstanceUID", "")) or None
        name, version = str(self.image_model.name), str(self.image_model.version)
        earlier = [j for j in self.store.find(series_uid, source=instance_id)
                   if j.state != "failed" and j.model_version == version and j.model_name == name]
        if not force and self.settings.skip_processed and earlier:
            return earlier[-1], "already processed"
        job, created = self.store.ensure_job(
            series_uid, study_uid, instance_id, model_name=name, model_version=version,
            destinations=[ORTHANC_DESTINATION], state="queued", details={"kind": "image"},
        )
        if created:
            self.store.record_instances(job.id, 1)
            job = self.store.get(job.id)
            log_event("job.queued", job=job.id, series=series_uid, kind="image", forced=force or None)
        if self.worker is not None:
            self.worker.wake()
        return job, "queued" if created else "already queued"

    def _queue_job(self, series: dict, series_uid: str, study_uid: str | None, series_id: str, count: int,
                   force: bool) -> tuple[Job, bool]:
        """A queued job for the series in the local store; the worker thread is woken."""
        name, version = self.model_identity
        job, created = self.store.ensure_job(
            series_uid, study_uid, series_id, model_name=name, model_version=version,
            destinations=[ORTHANC_DESTINATION], state="queued", details=self.settings.job_details(),
        )
        if created:
            self.store.record_instances(job.id, count)
            job = self.store.get(job.id)
            log_event("job.queued", job=job.id, series=series_uid, instances=count, forced=force or None)
        if self.worker is not None:
            self.worker.wake()
        return job, created

    # -- REST ----------------------------------------------------------------------------------------------
    def _answer(self, output: Any, body: Any, status: int = 200) -> None:
        data = json.dumps(body, indent=2, default=str).encode()
        if status == 200:
            output.AnswerBuffer(data, "application/json")
        else:
            output.SendHttpStatus(status, data)

    def rest_jobs(self, output: Any, uri: str, **request: Any) -> None:
        """``GET /pacs-landmarks/jobs?state=queued,running&limit=N``: the jobs (all states, 100 when not said)."""
        if request.get("method") != "GET":
            output.SendMethodNotAllowed("GET")
            return
        args = request.get("get") or {}
        states = [s for s in args.get("state", "").split(",") if s] or None
        limit = int(args["limit"]) if str(args.get("limit", "")).isdigit() else 100
        self._answer(output, self.jobs_listing(states, limit))

    def jobs_listing(self, states: list[str] | None, limit: int) -> list[dict[str, Any]]:
        """What ``/pacs-landmarks/jobs`` lists: this Orthanc's jobs."""
        return [j.to_json() for j in self.store.list(states, limit=limit)]

    def rest_health(self, output: Any, uri: str, **request: Any) -> None:
        if request.get("method") != "GET":
            output.SendMethodNotAllowed("GET")
            return
        counts: dict[str, int] = {}
        for job in self.store.list(UNFINISHED + ("failed",)):
            counts[job.state] = counts.get(job.state, 0) + 1
        name, version = self.model_identity
        failed = self.store.list(["failed"], limit=1)
        last_error = self.last_error or (f"job {failed[0].id}: {failed[0].reason}" if failed else None)
        self._answer(
            output,
            {
                "status": "ok" if self.model is not None and self.worker_alive else "degraded",
                "model": {
                    "loaded": self.model is not None, "name": name, "version": version,
                    "error": self.model_error, "loading": not self._model_ready.is_set(),
                    "torch_threads": self._torch_threads(),
                },
                "ceph_model": {
                    "loaded": self.image_model is not None,
                    "name": getattr(self.image_model, "name", None),
                    "version": getattr(self.image_model, "version", None),
                    "error": self.image_model_error,
                },
                "worker": {"enabled": self.settings.worker, "alive": self.worker_alive},
                "queue_depth": counts.get("queued", 0) + counts.get("running", 0) + self.events.qsize(),
                "pending_events": self.events.qsize(),
                "jobs": counts,
                "last_error": last_error,
            },
        )

    @staticmethod
    def _torch_threads() -> int | None:
        import sys

        torch = sys.modules.get("torch")  # only once the model loaded it: health must stay cheap
        return int(torch.get_num_threads()) if torch is not None else None

    @property
    def worker_alive(self) -> bool:
        return self.worker is not None and self.worker.is_alive()

    def rest_run(self, output: Any, uri: str, **request: Any) -> None:
        if request.get("method") != "POST":
            output.SendMethodNotAllowed("POST")
            return
        series_id = request["groups"][0]
        try:
            job, why = self.consider(series_id, force=True)
        except Exception as exc:  # unknown series, mostly
            self._answer(output, {"error": f"series {series_id}: {type(exc).__name__}: {exc}"}, status=404)
            return
        self._answer(output, {"result": why, "job": job.to_json() if job else None})


_PLUGIN: LandmarkPlugin | None = None


def install(orthanc: Any) -> LandmarkPlugin:
    """Called once by entry.py: read the configuration, register callbacks and routes."""
    global _PLUGIN
    root = logging.getLogger("pacs_landmarks")
    root.addHandler(OrthancLogHandler(orthanc))
    root.setLevel(logging.INFO)
    root.propagate = False
    prefer_gdcm_for_jpeg_ls()
    settings = PluginSettings.from_orthanc_config(json.loads(orthanc.GetConfiguration()))
    if settings.queue == "postgres":  # the distributed mode: this Orthanc only enqueues (plugin/cluster.py)
        from pacs_landmarks.plugin.cluster import ClusterPlugin

        _PLUGIN = ClusterPlugin(orthanc, settings)
    else:
        _PLUGIN = LandmarkPlugin(orthanc, settings)
    _PLUGIN.install()
    log_event("plugin.installed", work_directory=str(settings.work_directory), worker=settings.worker)
    return _PLUGIN
