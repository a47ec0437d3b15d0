"""Cephalograms through the standalone node: a real `pacs-landmarks serve`, dcmtk's storescu as the modality
and dcmtk's storescp as the archive (tests/test_node.py's harness), all on 127.0.0.1."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from ceph_helpers import rendered_ceph, report_all_model, write_ceph_variant  # noqa: E402
from test_node import SENDER, archive, serving, storescu, wait_for  # noqa: E402,F401  (fixture)


@pytest.fixture(scope="module")
def ceph(tmp_path_factory) -> Path:
    return rendered_ceph(tmp_path_factory.mktemp("ceph"), 12)


@pytest.fixture(scope="module")
def node(tmp_path_factory, archive):
    model = report_all_model(tmp_path_factory.mktemp("model") / "ceph19-report-all.pt")
    yield from serving(tmp_path_factory, "--allow-ae", SENDER, "--destination", archive.destination,
                       "--idle-timeout", "30", "--ceph-model", str(model))


def _job_of(node, sop_uid: str, timeout: float = 120):
    """The node's job for one image, once finished."""
    def finished():
        jobs = [j for j in node.jobs() if j.source.endswith(f"{sop_uid}.dcm")]
        return jobs[-1] if jobs and jobs[-1].finished else None
    return wait_for(finished, timeout, f"the job of image {sop_uid}")


def test_ceph_in_results_out(node, archive, ceph, validate_dicom):
    """One DX ceph sent with storescu: a job of its own started at once (the idle timeout is 30 s, the job is
    done well before), the landmark SR, measurements SR and GSPS arrive at the archive, valid, on the image."""
    sop = str(pydicom.dcmread(ceph, stop_before_pixels=True).SOPInstanceUID)
    t = time.monotonic()
    storescu(node.port, [ceph])
    job = _job_of(node, sop)
    assert time.monotonic() - t < 25, "an image job must not wait for a series to complete"
    assert job.state == "done", (job.state, job.reason)
    assert job.details["kind"] == "image" and job.model_name == "ceph19-report-all"
    assert set(job.results) == {"landmark_sr", "measurements_sr", "gsps", "landmarks_json"}
    received = {}
    for f in archive.files():
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        received[str(ds.SOPInstanceUID)] = f
    for kind in ("landmark_sr", "measurements_sr", "gsps"):
        ds = pydicom.dcmread(job.results[kind])
        assert str(ds.SOPInstanceUID) in received, f"{kind} not delivered"
        validate_dicom(received[str(ds.SOPInstanceUID)])
        evidence = ds.get("CurrentRequestedProcedureEvidenceSequence") or ds.get("ReferencedSeriesSequence")
        assert sop in str(evidence), f"{kind} does not reference the image"
    doc = json.loads(Path(job.results["landmarks_json"]).read_text())
    assert doc["sop_instance_uid"] == sop and doc["pixel_spacing_mm"] is not None
    assert "Magnification" in doc["pixel_spacing_source"]
    found = [lm for lm in doc["landmarks"] if lm["status"] == "found"]
    assert found and all(len(lm["position_px"]) == 2 for lm in found)
    assert (node.storage / "images").is_dir() and list((node.storage / "images").rglob(f"{sop}.dcm"))


@pytest.mark.parametrize("name, changes, why", [
    ("panoramic", dict(Modality="PX", PositionerType="PANORAMIC"), "panoramic radiograph"),
    ("chest", dict(BodyPartExamined="CHEST", PositionerType="", ViewPosition="PA"), "chest radiograph"),
])
def test_not_a_ceph_ends_with_the_reason(node, archive, ceph, tmp_path, name, changes, why):
    """A PX or chest image: a job that ends with the reason, nothing delivered, the image kept."""
    image = write_ceph_variant(ceph, tmp_path / f"{name}.dcm", **changes)
    sop = str(pydicom.dcmread(image, stop_before_pixels=True).SOPInstanceUID)
    before = len(archive.files())
    storescu(node.port, [image])
    job = _job_of(node, sop)
    assert job.state == "done" and job.reason.startswith("not analysed: ") and why in job.reason, job.reason
    assert job.details["not_analysed"] and not job.results
    assert len(archive.files()) == before, "nothing goes to the archive"
    assert list((node.storage / "images").rglob(f"{sop}.dcm")), "the image is kept"
    events = [e for e in node.events() if e.get("event") == "job.not_analysed" and e.get("job") == job.id]
    assert events and why in events[0]["reason"]
