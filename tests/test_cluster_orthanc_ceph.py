"""Cephalograms in the distributed mode through Orthanc: the plugin ("Queue": "postgres") queues one image job
per stored X-ray image in the real PostgreSQL, without waiting for the series to be stable; a real
`pacs-landmarks worker` process reads that one instance by WADO-RS, loads the 2D model at its first image job,
and stores the results back with STOW-RS, where dcmtk's findscu finds them. A panoramic image ends ``done``,
not analysed, with the reason, and nothing is added."""
from __future__ import annotations

import sys
from pathlib import Path

import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from ceph_helpers import ceph, report_all_model, write_ceph_variant  # noqa: E402,F401  (fixture)
from orthanc_harness import orthanc_factory, start_worker, wait_for  # noqa: E402,F401  (fixture)

from pacs_landmarks.jobs.distributed import stop_workers  # noqa: E402

STABLE_AGE = 120  # longer than the test waits: an image job must not depend on STABLE_SERIES


def test_cluster_plugin_queues_ceph_image_jobs_worker_analyses_them(orthanc_factory, pg_server, ceph, tmp_path,
                                                                     validate_dicom):
    pg_server.create_database("cluster_ceph")
    dsn = pg_server.socket_dsn("cluster_ceph")
    model = report_all_model(tmp_path / "ceph19-report-all.pt")
    orthanc = orthanc_factory.start({"StableAge": STABLE_AGE}, Queue="postgres", Dsn=dsn)
    log_path = tmp_path / "worker.log"
    worker = start_worker(orthanc, dsn, tmp_path, "--ceph-model", str(model))

    def finished(header):
        def check():
            assert worker.poll() is None, log_path.read_text()[-3000:]
            jobs = [j for j in orthanc.get_json("/pacs-landmarks/jobs")
                    if j["details"].get("sop_instance_uid") == str(header.SOPInstanceUID)]
            assert not [j for j in jobs if j["state"] == "failed"], jobs
            return [j for j in jobs if j["state"] == "done"]
        return check

    try:
        header = pydicom.dcmread(ceph, stop_before_pixels=True)
        orthanc.storescu([ceph])
        job = wait_for(finished(header), 240, f"the image job (StableAge {STABLE_AGE} s: it must not wait)")[0]
        assert job["details"]["kind"] == "image" and job["worker"] and job["attempts"] == 1
        assert job["model_name"] == "ceph19-report-all" and job["model_version"]  # recorded by the worker
        assert job["series_instance_uid"] == str(header.SeriesInstanceUID)
        assert list(job["delivery"].values()) == ["success"]
        made = {kind: u["SOPInstanceUID"] for kind, u in job["details"]["result_uids"].items()}
        assert len(made) == 3, made  # landmark SR, measurements SR, presentation state
        # The results as a PACS client finds them: C-FIND at series level.
        study = str(header.StudyInstanceUID)
        sr, pr = orthanc.findscu_series(study, "SR"), orthanc.findscu_series(study, "PR")
        assert len(sr) == 2 and len(pr) == 1, (sr, pr)
        for uid in made.values():
            found = orthanc.post_json("/tools/lookup", uid.encode())
            iid = next(item["ID"] for item in found if item["Type"] == "Instance")
            status, data = orthanc.request("GET", f"/instances/{iid}/file")
            assert status == 200
            path = tmp_path / f"{uid}.dcm"
            path.write_bytes(data)
            validate_dicom(path)

        # A panoramic image: an image job that ends done with the reason; nothing is stored for it.
        px = write_ceph_variant(ceph, tmp_path / "px.dcm", Modality="PX", PositionerType="PANORAMIC")
        px_header = pydicom.dcmread(px, stop_before_pixels=True)
        orthanc.storescu([px])
        px_job = wait_for(finished(px_header), 120, "the panoramic image's job")[0]
        assert px_job["reason"].startswith("not analysed: ") and "panoramic" in px_job["reason"], px_job
        assert not px_job["details"].get("result_uids") and px_job["details"]["kind"] == "image"
        assert len(orthanc.findscu_series(study, "SR")) == 2, "nothing was added for the panoramic image"
        assert orthanc.get_json(f"/instances/{px_job['source']}")["MainDicomTags"]["SOPInstanceUID"] == \
            str(px_header.SOPInstanceUID), "the refused image stays stored"
    finally:
        stop_workers([worker])
    text = log_path.read_text()
    assert text.count("worker.image_model_loaded") == 1  # the 2D model: once, at the first image job
