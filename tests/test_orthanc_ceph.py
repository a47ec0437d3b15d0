"""Cephalograms through Orthanc with the plugin (a real Orthanc 1.10, dcmtk's storescu and findscu, in a
private network): an image job per stored X-ray image, without waiting for the series to be stable."""
from __future__ import annotations

import sys
from pathlib import Path

import pydicom

sys.path.insert(0, str(Path(__file__).parent))
from ceph_helpers import ceph, report_all_model, write_ceph_variant  # noqa: E402,F401  (fixture)
from orthanc_harness import orthanc_factory, wait_for  # noqa: E402,F401  (fixture)

STABLE_AGE = 120  # longer than the test waits: an image job must not depend on STABLE_SERIES


def _image_job(orthanc, sop_uid: str, series_uid: str) -> dict | None:
    for job in orthanc.get_json("/pacs-landmarks/jobs"):
        if job["series_instance_uid"] == series_uid and job["state"] in ("done", "failed"):
            return job
    return None


def test_ceph_px_and_chest_through_orthanc(orthanc_factory, ceph, tmp_path, validate_dicom):
    model = report_all_model(tmp_path / "ceph19-report-all.pt")
    orthanc = orthanc_factory.start({"StableAge": STABLE_AGE}, CephModel=str(model))
    health = wait_for(lambda: (lambda h: h if not h["model"]["loading"] else None)(
        orthanc.get_json("/pacs-landmarks/health")), 120, "the models to load")
    assert health["ceph_model"]["loaded"] and health["ceph_model"]["name"] == "ceph19-report-all", health

    header = pydicom.dcmread(ceph, stop_before_pixels=True)
    orthanc.storescu([ceph])
    job = wait_for(lambda: _image_job(orthanc, str(header.SOPInstanceUID), str(header.SeriesInstanceUID)), 90,
                   f"the image job (StableAge is {STABLE_AGE} s: it must not wait for it)")
    assert job["state"] == "done", job["reason"]
    assert job["details"]["kind"] == "image" and len(job["details"]["result_instances"]) == 3
    # The results as a PACS client finds them: C-FIND at series level.
    study = str(header.StudyInstanceUID)
    sr = orthanc.findscu_series(study, "SR")
    pr = orthanc.findscu_series(study, "PR")
    assert len(sr) == 2 and len(pr) == 1, (sr, pr)
    for iid in job["details"]["result_instances"]:
        status, data = orthanc.request("GET", f"/instances/{iid}/file")
        assert status == 200
        path = tmp_path / f"{iid}.dcm"
        path.write_bytes(data)
        validate_dicom(path)

    # Re-run by REST (the image's series): a new job for the image, the same results (UIDs follow the input).
    series_id = orthanc.get_json(f"/instances/{job['source']}")["ParentSeries"]
    rerun = orthanc.post_json(f"/pacs-landmarks/series/{series_id}/run")
    assert rerun["result"] == "queued" and rerun["job"]["id"] != job["id"], rerun
    wait_for(lambda: orthanc.get_json("/pacs-landmarks/jobs")[0]["state"] == "done", 60, "the re-run")
    assert len(orthanc.findscu_series(study, "SR")) == 2, "a re-run must not duplicate results"
    assert sorted(orthanc.get_json("/pacs-landmarks/jobs")[0]["details"]["result_instances"]) == sorted(
        job["details"]["result_instances"])

    # A panoramic and a chest image: image jobs that end with the reason, no results stored.
    for name, changes, why in (("px", dict(Modality="PX", PositionerType="PANORAMIC"), "panoramic"),
                               ("chest", dict(BodyPartExamined="CHEST", PositionerType="", ViewPosition="PA"),
                                "chest radiograph")):
        image = write_ceph_variant(ceph, tmp_path / f"{name}.dcm", **changes)
        h = pydicom.dcmread(image, stop_before_pixels=True)
        orthanc.storescu([image])
        job = wait_for(lambda: _image_job(orthanc, str(h.SOPInstanceUID), str(h.SeriesInstanceUID)), 60,
                       f"the {name} job")
        assert job["state"] == "done" and job["reason"].startswith("not analysed: ") and why in job["reason"], job
        assert not job["details"].get("result_instances")
    assert len(orthanc.findscu_series(study, "SR")) == 2, "nothing was added for the refused images"
    # Our own results start no job: the ceph (twice: the re-run), the panoramic, the chest image.
    assert len(orthanc.get_json("/pacs-landmarks/jobs")) == 4
