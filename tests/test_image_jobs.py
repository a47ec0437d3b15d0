"""Image jobs in the shared job steps (jobs/steps.py) with a real JobStore: the kind follows the SOP Class,
results and landmarks.json of an image, the not-a-cephalogram end state, and which earlier results an image
job replaces (the plugin deletes what is replaced: another image of the same series must never be)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from ceph_helpers import TruthModel, rendered_ceph, write_ceph_variant  # noqa: E402

from pacs_landmarks.jobs.steps import JobSteps, input_kind  # noqa: E402
from pacs_landmarks.jobs.store import JobStore  # noqa: E402
from pacs_landmarks.jobs.supersede import earlier_jobs  # noqa: E402


@pytest.fixture(scope="module")
def ceph(tmp_path_factory):
    path = rendered_ceph(tmp_path_factory.mktemp("ceph"), 15)
    return path, json.loads((path.parent / "landmarks.json").read_text())


class Folder:
    """A ``deliver`` that copies the files into a folder (what an archive would receive)."""

    def __init__(self, root: Path):
        self.root, self.received = root, []

    def __call__(self, job, destination, paths):
        for p in paths:
            self.received.append(shutil.copy(p, self.root / f"{job.id}-{p.name}"))


def _steps(tmp_path, model):
    store = JobStore(tmp_path / "jobs.sqlite")
    archive = tmp_path / "archive"
    archive.mkdir()
    deliver = Folder(archive)
    steps = JobSteps(store, "no CT model here", loader=lambda job: [Path(job.source)], deliver=deliver,
                     results_dir=tmp_path / "results", owner="test", image_model=model)
    return store, steps, deliver


def _run(store, steps, image: Path, kind="image"):
    ds = pydicom.dcmread(image, stop_before_pixels=True)
    job, _ = store.ensure_job(str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID), str(image), state="queued",
                              model_name="ceph19-truth", model_version="1", destinations=[{"name": "archive"}],
                              details={"kind": kind})
    return steps.run_job(store.claim("test", job_id=job.id))


def test_kind_follows_the_sop_class(ceph):
    path, _ = ceph
    assert input_kind([path]) == "image"
    assert input_kind([path, path]) == "series"
    from pydicom.data import get_testdata_file

    assert input_kind([get_testdata_file("CT_small.dcm")]) == "series"
    # What is not a readable DICOM file is the series path's to refuse (with its own reason), not an error here.
    assert input_kind(["no-such-file"]) == "series"
    assert input_kind([path.parent / "landmarks.json"]) == "series"


def test_image_job_results_and_landmarks_json(ceph, tmp_path):
    path, truth = ceph
    model = TruthModel(path.parent / "landmarks.json", missing=("Articulare",))
    store, steps, deliver = _steps(tmp_path, model)
    job = _run(store, steps, path)
    assert job.state == "done", job.reason
    assert job.details["kind"] == "image" and set(job.details["result_uids"]) == {
        "landmark-sr", "measurements-sr", "gsps"}, "an image job has no SEG"
    assert len(deliver.received) == 3
    doc = json.loads(Path(job.results["landmarks_json"]).read_text())
    assert doc["sop_instance_uid"] == truth["sop_instance_uid"] and doc["landmark_set"] == "ceph19"
    assert doc["pixel_spacing_mm"] == pytest.approx(truth["pixel_spacing_mm"], rel=1e-4)
    assert "Magnification" in doc["pixel_spacing_source"] and doc["facing"] == "right"
    by_name = {lm["name"]: lm for lm in doc["landmarks"]}
    assert by_name["Articulare"] == {"name": "Articulare", "status": "not_found", "position_px": None,
                                     "confidence": 0.1}
    assert by_name["Sella"]["position_px"] == pytest.approx(truth["landmarks"][0]["position_px"], abs=1e-3)
    assert {m["name"] for m in doc["measurements"]} == set(truth["measurements"]) - {"Gonial angle"}


def test_not_a_ceph_ends_done_with_the_reason(ceph, tmp_path):
    path, _ = ceph
    pano = write_ceph_variant(path, tmp_path / "pano.dcm", Modality="PX")
    store, steps, deliver = _steps(tmp_path, TruthModel())
    job = _run(store, steps, pano)
    assert job.state == "done" and job.results == {} and deliver.received == []
    assert job.reason == "not analysed: a panoramic radiograph (Modality PX), not a lateral cephalogram"
    assert [s for _, s, _ in store.events(job.id)] == ["queued", "running", "delivering", "done"]


def test_an_image_job_replaces_only_results_of_the_same_image(ceph, tmp_path):
    """Two images of one series: neither replaces the other. The same image again: it replaces its own."""
    path, truth = ceph
    second = write_ceph_variant(path, tmp_path / "second.dcm", SeriesInstanceUID=truth["series_instance_uid"])
    model = TruthModel(path.parent / "landmarks.json")
    model.add(str(pydicom.dcmread(second, stop_before_pixels=True).SOPInstanceUID), {
        lm["name"]: lm["position_px"] for lm in truth["landmarks"]})
    store, steps, _ = _steps(tmp_path, model)
    first_job = _run(store, steps, path)
    second_job = _run(store, steps, second)
    assert first_job.state == second_job.state == "done"
    assert earlier_jobs(store, second_job) == [], "another image of the series is not replaced"
    assert "PredecessorDocumentsSequence" not in pydicom.dcmread(second_job.results["landmark_sr"])
    model.version = "2"  # a new model version: new result UIDs, which replace the first image's results
    again = _run(store, steps, path)
    assert [j.id for j in earlier_jobs(store, again)] == [first_job.id]
    sr = pydicom.dcmread(again.results["landmark_sr"])
    before = pydicom.dcmread(first_job.results["landmark_sr"], stop_before_pixels=True)
    assert sr.SOPInstanceUID != before.SOPInstanceUID
    named = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert named.ReferencedSOPInstanceUID == before.SOPInstanceUID
