"""The distributed mode end to end with the real model: an Orthanc whose plugin only enqueues, PostgreSQL,
and one `pacs-landmarks worker` process that reads the series with one WADO-RS request and stores the results
back with STOW-RS. Orthanc and the worker share a private network namespace; PostgreSQL is reached over its
Unix socket (a file, so visible from that namespace)."""
from __future__ import annotations

import io
import subprocess

from orthanc_harness import orthanc_factory, start_worker, wait_for  # noqa: F401  (fixture)
from test_orthanc import phantom, series_of  # noqa: F401  (fixture)

from pacs_landmarks.jobs.distributed import stop_workers


def test_plugin_enqueues_worker_analyses_results_come_back(orthanc_factory, pg_server, phantom, tmp_path,
                                                           validate_dicom):
    pg_server.create_database("cluster_orthanc")
    dsn = pg_server.socket_dsn("cluster_orthanc")
    orthanc = orthanc_factory.start(Queue="postgres", Dsn=dsn)
    health = orthanc.get_json("/pacs-landmarks/health")
    assert health["queue"] == "postgres" and health["model"] is None  # no model, no torch inside Orthanc
    worker = start_worker(orthanc, dsn, tmp_path)
    try:
        case_dir, truth = phantom
        orthanc.storescu(sorted(case_dir.glob("*.dcm")))
        series_uid = truth.get("series_instance_uid") or orthanc.get_json(
            f"/series/{series_of(orthanc, 'CT')[0]['ID']}")["MainDicomTags"]["SeriesInstanceUID"]

        def finished():
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            jobs = [j for j in orthanc.get_json("/pacs-landmarks/jobs") if j["series_instance_uid"] == series_uid]
            assert not [j for j in jobs if j["state"] == "failed"], jobs
            return [j for j in jobs if j["state"] == "done"]

        job = wait_for(finished, 300, "the cluster job to be done")[0]
        assert job["worker"] and job["attempts"] == 1 and job["timings"]["cascade"] > 0
        assert job["model_name"] == "craniofacial16-demo" and job["model_version"]  # recorded by the worker
        assert list(job["delivery"].values()) == ["success"]
        # The results are in Orthanc: landmark SR, measurements SR, SEG, valid DICOM.
        results = series_of(orthanc, "SR") + series_of(orthanc, "SEG")
        assert len(results) >= 2
        for s in results:
            for iid in s["Instances"]:
                path = tmp_path / f"{iid}.dcm"
                _, body = orthanc.request("GET", f"/instances/{iid}/file")
                path.write_bytes(body)
                validate_dicom(path)
    finally:
        stop_workers([worker])
    text = (tmp_path / "worker.log").read_text()
    assert text.count("worker.warm_up") == 1  # the model loaded and warmed once
    assert "job.done" in text


def test_superseded_results_are_deleted_in_the_distributed_mode(orthanc_factory, pg_server, phantom, tmp_path):
    """As the embedded plugin with "Superseded": "delete": a series that grows gets a second job; once its
    results are stored (STOW-RS) the worker deletes the first job's results from Orthanc, so one landmark SR,
    measurements SR, SEG and GSPS are left, and the new landmark SR names the one it replaced."""
    import pydicom

    pg_server.create_database("cluster_supersede")
    dsn = pg_server.socket_dsn("cluster_supersede")
    orthanc = orthanc_factory.start(Queue="postgres", Dsn=dsn)  # "Superseded": "delete" is the default
    worker = start_worker(orthanc, dsn, tmp_path)
    case_dir, truth = phantom
    files = sorted(case_dir.glob("*.dcm"),
                   key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))[::-1]
    cut = int(len(files) * 0.6)
    series_uid = truth["series_instance_uid"]

    def done(n):
        def check():
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            jobs = [j for j in orthanc.get_json("/pacs-landmarks/jobs") if j["series_instance_uid"] == series_uid]
            assert not [j for j in jobs if j["state"] == "failed"], jobs
            finished = sorted((j for j in jobs if j["state"] == "done"), key=lambda j: j["id"])
            return len(finished) >= n and finished
        return check

    def result_uids():
        out = {}
        for modality in ("SR", "SEG", "PR"):
            for s in series_of(orthanc, modality):
                for iid in s["Instances"]:
                    out[orthanc.get_json(f"/instances/{iid}/simplified-tags")["SOPInstanceUID"]] = iid
        return out

    try:
        orthanc.storescu(files[:cut])
        first = wait_for(done(1), 300, "the first job")[0]
        before = {u["SOPInstanceUID"] for u in first["details"]["result_uids"].values()}
        assert len(before) == 4 and set(result_uids()) == before
        orthanc.storescu(files[cut:])  # the rest of the head: the series grew, a second job
        second = wait_for(done(2), 300, "the second job")[1]
        after = {u["SOPInstanceUID"] for u in second["details"]["result_uids"].values()}
        assert len(after) == 4 and not after & before
        assert set(second["details"]["supersedes"]) == before
        assert set(wait_for(lambda: set(result_uids()) == after and result_uids(), 60, "the old results gone")) == after
        sr_uid = second["details"]["result_uids"]["landmark-sr"]["SOPInstanceUID"]
        _, body = orthanc.request("GET", f"/instances/{result_uids()[sr_uid]}/file")
        sr = pydicom.dcmread(io.BytesIO(body))
        named = {i.ReferencedSOPInstanceUID for s in sr.PredecessorDocumentsSequence
                 for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
        assert first["details"]["result_uids"]["landmark-sr"]["SOPInstanceUID"] in named
    finally:
        stop_workers([worker])
    assert "results.superseded" in (tmp_path / "worker.log").read_text()


def test_orthanc_killed_while_the_worker_reads_then_back(orthanc_factory, pg_server, phantom, tmp_path):
    """Orthanc killed (SIGKILL) the moment the worker claims the job, i.e. while it reads the series with
    WADO-RS (or, if the read won the race, before it stores the results), and started again on the same
    storage 3 s later: the worker retries (source_retry_s / delivery back-off), the job completes, nothing
    is lost. Orthanc runs in a network namespace held by a sleeping process, so the restarted Orthanc and
    the worker still share one loopback."""
    import time

    from pacs_landmarks.jobs.pgstore import PgJobStore
    from pacs_landmarks.plugin.launch import OrthancProcess, program

    class NamespacedOrthanc(OrthancProcess):
        """An Orthanc started inside an existing network namespace (``holder``'s)."""

        def __init__(self, config, holder, log_path):
            super().__init__(config, private_network=False, log_path=log_path)
            self.holder = holder

        def client_prefix(self):
            return [program("nsenter"), f"--net=/proc/{self.holder.pid}/ns/net", "--"]

        def start(self, timeout=90.0, wait_for_plugin=True):
            with open(self.log_path, "ab") as out:
                self.proc = subprocess.Popen(self.client_prefix() + [program("Orthanc"), str(self.config_path)],
                                             env=self.env(), stdout=out, stderr=subprocess.STDOUT,
                                             start_new_session=True)
            self.wait_ready(timeout, wait_for_plugin)
            return self

    pg_server.create_database("cluster_orthanc_killed")
    dsn = pg_server.socket_dsn("cluster_orthanc_killed")
    config = orthanc_factory.config(Queue="postgres", Dsn=dsn)
    holder = subprocess.Popen([program("unshare"), "-n", "--", "sh", "-c", "ip link set lo up && echo up && exec sleep 900"],
                              stdout=subprocess.PIPE, text=True)
    orthanc = NamespacedOrthanc(config, holder, tmp_path / "orthanc.log")
    workers = []
    store = PgJobStore(dsn)
    try:
        # Until the holder has its namespace, nsenter would join the host's: Orthanc on the host's loopback, out of
        # the worker's reach (seen under load).
        assert holder.stdout.readline() == "up\n"
        orthanc.start()
        workers.append(worker := start_worker(orthanc, dsn, tmp_path))
        wait_for(lambda: "worker.started" in (tmp_path / "worker.log").read_text(), 180, "the worker to start")
        case_dir, truth = phantom
        series_uid = truth["series_instance_uid"]
        orthanc.storescu(sorted(case_dir.glob("*.dcm")))
        deadline = time.monotonic() + 120
        while not any(j.state == "running" for j in store.find(series_uid)):
            assert time.monotonic() < deadline, "the job never ran"
            time.sleep(0.005)
        orthanc.kill()
        time.sleep(3)
        orthanc = NamespacedOrthanc(config, holder, tmp_path / "orthanc.log").start()

        def done():
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            jobs = store.find(series_uid)
            assert not [j for j in jobs if j.state == "failed"], [j.reason for j in jobs]
            return [j for j in jobs if j.state == "done"]

        job = wait_for(done, 300, "the job to be done after the restart")[0]
        text = (tmp_path / "worker.log").read_text()
        assert "read.retry" in text or "delivery.retry" in text, text[-3000:]  # the outage was felt ...
        assert len(job.details["result_uids"]) == 4  # ... and nothing was lost: every result is in Orthanc
        stored = {orthanc.get_json(f"/instances/{iid}/simplified-tags")["SOPInstanceUID"]
                  for modality in ("SR", "SEG", "PR") for s in series_of(orthanc, modality) for iid in s["Instances"]}
        assert stored == {u["SOPInstanceUID"] for u in job.details["result_uids"].values()}
        assert len(orthanc.get_json("/instances")) == len(list(case_dir.glob("*.dcm"))) + 4
    finally:
        stop_workers(workers)
        orthanc.stop()
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_a_multipart_body_cut_short_is_not_taken_for_whole():
    """What a WADO-RS read gets from an Orthanc killed mid-response without a length: no close delimiter."""
    import pytest

    from pacs_landmarks.jobs.references import CutShort, join_multipart, split_multipart

    items = [b"DICM" * 1000, b"\r\n--x\r\n" * 10, b""]
    body, content_type = join_multipart(items)
    assert split_multipart(body, content_type) == items
    for cut in (len(body) - 5, len(body) // 2, 10):
        with pytest.raises(CutShort):
            split_multipart(body[:cut], content_type)
