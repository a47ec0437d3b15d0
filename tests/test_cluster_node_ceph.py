"""Cephalograms through the node in the distributed mode, with real processes: `pacs-landmarks serve`
(queue = "postgres") stores each X-ray image in its spool and queues one image job for it in PostgreSQL at
once (the STAT rule applies as for a series); a `pacs-landmarks worker` reads the file from the spool,
analyses it with the 2D model (loaded at start: ``--warm-ceph``), and C-STOREs the results to a dcmtk storescp
archive. A panoramic image is stored, not analysed, and its job says why."""
from __future__ import annotations

import subprocess

import pydicom
from ceph_helpers import ceph, report_all_model, write_ceph_variant  # noqa: F401  (fixture)
from test_node import CLI, ENV, Archive, NodeProc, storescu, wait_for

from pacs_landmarks.jobs.distributed import stop_workers
from pacs_landmarks.jobs.pgstore import PgJobStore


def test_node_queues_ceph_image_jobs_worker_analyses_from_the_spool(pg_dsn, ceph, tmp_path,  # noqa: F811
                                                                     validate_dicom):
    import psycopg

    from pacs_landmarks.jobs.distributed import ANALYSE, ANALYSE_STAT, STAT_PRIORITY

    model = report_all_model(tmp_path / "ceph19-report-all.pt")
    archive = Archive(tmp_path / "archive").start()
    config = tmp_path / "node.toml"
    config.write_text(f'queue = "postgres"\ndsn = "{pg_dsn}"\n[cluster]\n'
                      'stat_rule = { calling_ae_titles = ["ER-CEPH"] }\n')
    node = NodeProc(tmp_path / "spool", "--config", str(config), "--destination", archive.destination).start()
    log_path = tmp_path / "worker.log"
    worker = subprocess.Popen(
        [CLI, "worker", "--config", str(config), "--storage", str(tmp_path / "spool"),
         "--queues", "analyse-stat,analyse,deliver", "--ceph-model", str(model), "--warm-ceph"],
        env=ENV, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    store = PgJobStore(pg_dsn)

    def finished(header):
        def check():
            assert worker.poll() is None, log_path.read_text()[-3000:]
            jobs = store.find(str(header.SeriesInstanceUID))
            assert not [j for j in jobs if j.state == "failed"], [j.reason for j in jobs]
            return [j for j in jobs if j.state == "done"]
        return check

    try:
        header = pydicom.dcmread(ceph, stop_before_pixels=True)
        px = write_ceph_variant(ceph, tmp_path / "px.dcm", Modality="PX", PositionerType="PANORAMIC")
        px_header = pydicom.dcmread(px, stop_before_pixels=True)
        # A second image of the same series: a job of its own, not coalesced with the first.
        second = write_ceph_variant(ceph, tmp_path / "second.dcm", SeriesInstanceUID=header.SeriesInstanceUID)
        second_uid = str(pydicom.dcmread(second, stop_before_pixels=True).SOPInstanceUID)
        storescu(node.port, [ceph, second], aet="ER-CEPH")  # STAT by the calling AE title
        storescu(node.port, [px])
        jobs = wait_for(lambda: len(finished(header)()) == 2 and finished(header)(), 300, "the two images' jobs")
        spool = (tmp_path / "spool").resolve()
        folder = spool / "images" / str(header.SeriesInstanceUID)
        assert sorted(j.source for j in jobs) == sorted(str(folder / f"{uid}.dcm")
                                                        for uid in (str(header.SOPInstanceUID), second_uid))
        for job in jobs:
            assert job.details["kind"] == "image" and job.details["stat"] and job.attempts == 1
        job = jobs[0]
        files = archive.files()
        assert len(files) == 6, files  # per image: landmark SR, measurements SR, presentation state
        for f in files:
            validate_dicom(f)
        px_job = wait_for(finished(px_header), 120, "the panoramic image's job")[0]
        assert px_job.reason.startswith("not analysed: ") and "panoramic" in px_job.reason, px_job.reason
        assert "stat" not in px_job.details and len(archive.files()) == 6
        assert (spool / "images" / str(px_header.SeriesInstanceUID) / f"{px_header.SOPInstanceUID}.dcm").is_file()
        with psycopg.connect(pg_dsn) as conn:
            rows = conn.execute("SELECT queue_name, priority, args, lock FROM procrastinate_jobs"
                                " WHERE task_name = 'analyse'").fetchall()
        tasks = {int(args["job_id"]): (queue, priority) for queue, priority, args, _ in rows}
        locks = {int(args["job_id"]): lock for _, _, args, lock in rows}
        assert tasks[job.id] == (ANALYSE_STAT, STAT_PRIORITY) and tasks[px_job.id][0] == ANALYSE
        assert locks[jobs[0].id] != locks[jobs[1].id]  # one lock per image, not per series
        # The node loaded no model: it only received and queued.
        assert not [e for e in node.events() if "model" in str(e.get("event"))]
    finally:
        node.kill(15)
        stop_workers([worker])
        archive.stop()
    text = log_path.read_text()
    # --warm-ceph: loaded once, at start, before the worker takes jobs (tests/test_cluster_orthanc_ceph.py: lazily)
    assert text.count("worker.image_model_loaded") == 1
    assert text.index("worker.image_model_loaded") < text.index("worker.started")
