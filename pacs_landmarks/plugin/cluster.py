"""The plugin in the distributed mode (``"Queue": "postgres"``): Orthanc only enqueues.

No model and no torch inside Orthanc: a stable series (STABLE_SERIES or the change-log catch-up, exactly as
in the embedded mode) becomes a queued job in PostgreSQL plus a procrastinate ``analyse`` task
(``pacs_landmarks.jobs.distributed.Cluster.enqueue``) that refers to the series by WADO-RS on this Orthanc;
the results come back with STOW-RS. Every Orthanc of a cluster may fire for the same series (measured: a
series split over two Orthancs fires STABLE_SERIES on both): the series' queueing lock coalesces them, and
the worker reads the instance list when the job starts. ``/pacs-landmarks/jobs`` lists the cluster's jobs.

Cephalograms (``"Cephalograms": true``, the default): as in the embedded mode, each stored X-ray image that
``jobs.steps.starts_image_job`` accepts is an image job as soon as it is stored (NEW_INSTANCE: one image is
the whole input), with the same STAT rule as a series; the worker reads that one instance by WADO-RS
(``job.details["sop_instance_uid"]``) and loads the 2D model itself (``pacs-landmarks worker --ceph-model``):
``CephModel`` is not read here. The same image again (a re-run) is a new job whose results replace the
image's earlier ones only. Whether an image or series was "processed already" compares the model version
its job recorded (the worker records it) with the one the workers announce (``Cluster.current_model``).
"""
from __future__ import annotations

from typing import Any

from pacs_landmarks.jobs.distributed import Cluster, cluster_jobs
from pacs_landmarks.jobs.priority import dataset_facts, is_stat
from pacs_landmarks.jobs.logs import log_event
from pacs_landmarks.jobs.store import Job, UNFINISHED
from pacs_landmarks.plugin.app import LandmarkPlugin


class ClusterPlugin(LandmarkPlugin):
    analyses_images = True  # X-ray images become image jobs; the workers load the 2D model

    @property
    def model_identity(self) -> tuple[str | None, str | None]:
        """The CT model the cluster's workers run (no model here): a series analysed by another version is
        analysed again (``LandmarkPlugin.consider_series``)."""
        return self.cluster.current_model("series")

    def _open_store(self) -> Any:
        self.cluster = Cluster(self.settings.cluster_settings())
        return self.cluster.store

    def _start_loading_model(self) -> None:
        self._model_ready.set()  # no model here: the workers have it

    def start(self) -> None:
        if not self._seq_file.exists():
            self._save_change_seq()
        # No resume: other processes of the cluster own running jobs; stalled ones are the sweeper's.
        self._dispatcher.start()
        log_event("plugin.cluster", dsn_host=self.settings.dsn.split("@")[-1] if self.settings.dsn else None,
                  dicomweb=self.settings.dicomweb_url)

    def stop(self) -> None:
        self._stopping.set()
        self.events.put(None)

    def _stat(self, instance_id: str) -> bool:
        """The STAT rule (jobs/priority.py) on an instance: its priority and station, and who sent it."""
        rule = self.settings.cluster.get("stat_rule") or {}
        if not rule:
            return False
        facts: dict[str, Any] = {}
        try:
            facts.update(dataset_facts(self.get_json(f"/instances/{instance_id}/tags?simplify")))
        except Exception:  # deleted meanwhile: the job's loader will say so
            pass
        try:
            remote = self.orthanc.RestApiGet(f"/instances/{instance_id}/metadata/RemoteAET")
            facts["calling_ae_title"] = remote.decode("ascii", "replace").strip()
        except Exception:  # no metadata (uploaded over REST): no calling AE to match
            pass
        return is_stat(rule, facts)

    def _references(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """A job's destinations (STOW-RS back here) and the WADO-RS reference details."""
        destinations = [{"stow_rs": self.settings.dicomweb_url, "stow_rs_peers": list(self.settings.dicomweb_peers),
                         **({"superseded": "delete"} if self.settings.superseded == "delete" else {})}]
        return destinations, {"wado_rs": self.settings.dicomweb_url,
                              "wado_rs_peers": list(self.settings.dicomweb_peers)}

    def _queue_job(self, series: dict, series_uid: str, study_uid: str | None, series_id: str, count: int,
                   force: bool) -> tuple[Job, bool]:
        destinations, refs = self._references()
        job, created = self.cluster.enqueue(
            series_uid, study_uid, series_id, stat=self._stat(series["Instances"][0]), destinations=destinations,
            details={**refs, "orthanc_series": series_id, **self.settings.job_details()},
        )
        if created:
            self.store.record_instances(job.id, count)
            job = self.store.get(job.id)
        return job, created

    def consider_instance(self, instance_id: str, force: bool = False) -> tuple[Job | None, str]:
        """Queue an image job for one stored X-ray image on the cluster (the embedded rule, with the model the
        workers announce instead of one loaded here: ``Cluster.analysed_now``)."""
        header, why = self.image_job_header(instance_id)
        if header is None:
            return None, why
        series_uid, study_uid = str(header.SeriesInstanceUID), str(header.get("StudyInstanceUID", "")) or None
        earlier = self.cluster.analysed_now(self.store.find(series_uid, source=instance_id), "image")
        if not force and self.settings.skip_processed and earlier:
            return earlier[-1], "already processed"
        destinations, refs = self._references()
        job, created = self.cluster.enqueue(
            series_uid, study_uid, instance_id, stat=self._stat(instance_id), destinations=destinations,
            details={**refs, "kind": "image", "sop_instance_uid": str(header.SOPInstanceUID),
                     **self.settings.job_details()},
        )
        if created:
            self.store.record_instances(job.id, 1)
            job = self.store.get(job.id)
        return job, "queued" if created else "already queued"

    def jobs_listing(self, states: list[str] | None, limit: int) -> list[dict[str, Any]]:
        """The cluster's jobs (every Orthanc's and node's), with the worker that ran each."""
        return cluster_jobs(self.store, states, limit)

    def rest_health(self, output: Any, uri: str, **request: Any) -> None:
        if request.get("method") != "GET":
            output.SendMethodNotAllowed("GET")
            return
        counts: dict[str, int] = {}
        try:
            for job in self.store.list(UNFINISHED + ("failed",)):
                counts[job.state] = counts.get(job.state, 0) + 1
            status, error = "ok", self.last_error
        except Exception as exc:  # PostgreSQL unreachable: series wait in Orthanc, the catch-up queues them
            status, error = "degraded", f"job store: {type(exc).__name__}: {exc}"
        self._answer(output, {
            "status": status, "queue": "postgres", "model": None, "worker": {"enabled": False, "alive": None},
            "queue_depth": counts.get("queued", 0) + counts.get("running", 0) + self.events.qsize(),
            "pending_events": self.events.qsize(), "jobs": counts, "last_error": error,
        })
