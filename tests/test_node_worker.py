"""The generic worker: results on disk before delivery, back-off while a destination is down, failures kept.

The pipeline is injected here (``process_series=``) so that the worker's own rules are tested in isolation and
fast; the real cascade end to end is in tests/test_node.py.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pacs_landmarks.inference.landmark import Landmark
from pacs_landmarks.jobs.store import JobStore
from pacs_landmarks.jobs.worker import PermanentDeliveryError, Worker


def _obj(kind: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2", generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesDescription = kind
    return ds


def fake_pipeline(datasets, model, predecessors=None):
    assert datasets and model == "warm-model"
    return SimpleNamespace(
        landmarks=[Landmark("Nasion", (1.0, 2.0, 3.0), 0.9)],
        landmark_sr=_obj("lm"), measurements_sr=_obj("meas"), seg=_obj("seg"), gsps=_obj("gsps"),
        timings={"cascade": 0.01},
    )


class FlakyDestination:
    """Refuses the first ``down`` attempts, then accepts; records what it got."""

    def __init__(self, down: int = 0):
        self.down, self.calls, self.received = down, 0, []

    def __call__(self, job, destination, paths):
        self.calls += 1
        for p in paths:  # results must be complete on disk before any delivery attempt
            assert pydicom.dcmread(p).SOPInstanceUID
        if self.calls <= self.down:
            raise ConnectionRefusedError("destination down")
        self.received.append([Path(p).name for p in paths])


def _setup(tmp_path, deliver, destinations=2, **kw):
    store = JobStore(tmp_path / "jobs.sqlite")
    series_file = tmp_path / "in.dcm"
    _obj("ct").save_as(series_file, enforce_file_format=True)
    dests = [{"ae_title": f"D{n}", "host": "127.0.0.1", "port": 1000 + n} for n in range(destinations)]
    job, _ = store.ensure_job("1.2.3", "1.2", str(series_file), state="queued", destinations=dests)
    worker = Worker(store, "warm-model", loader=lambda j: [j.source], deliver=deliver,
                    results_dir=tmp_path / "results", process_series=fake_pipeline, **kw)
    return store, job, worker


def test_job_done_after_every_destination_succeeds(tmp_path):
    dest = FlakyDestination()
    store, job, worker = _setup(tmp_path, dest)
    assert worker.run_once()
    job = store.get(job.id)
    assert job.state == "done", job.reason
    assert dest.received == [["landmarks-sr.dcm", "measurements-sr.dcm", "seg.dcm", "gsps.dcm"]] * 2
    assert set(job.timings) >= {"read", "cascade", "write_results", "delivery", "queue_wait"}
    doc = json.loads(Path(job.results["landmarks_json"]).read_text())
    assert doc["landmarks"][0]["name"] == "Nasion"
    assert not worker.run_once()


def test_destination_down_backs_off_then_delivers(tmp_path):
    dest = FlakyDestination(down=3)
    store, job, worker = _setup(tmp_path, dest, destinations=1, backoff_base_s=0.05, backoff_max_s=0.2,
                                poll_interval_s=0.05)
    worker.start()
    try:
        deadline = time.time() + 20
        while store.get(job.id).state != "done" and time.time() < deadline:
            time.sleep(0.05)
    finally:
        worker.stop()
    job = store.get(job.id)
    assert job.state == "done" and job.delivery_attempts == 4 and dest.calls == 4
    states = [s for _, s, _ in store.events(job.id)]
    assert states[:3] == ["queued", "running", "delivering"] and states[-1] == "done"
    # Results stay on disk after delivery too (they are the node's record).
    assert all(Path(p).exists() for p in job.results.values())


def test_partial_success_only_redelivers_to_the_failing_destination(tmp_path):
    calls: list[str] = []

    def deliver(job, destination, paths):
        calls.append(destination["ae_title"])
        if destination["ae_title"] == "D1" and calls.count("D1") == 1:
            raise TimeoutError("no answer")

    store, job, worker = _setup(tmp_path, deliver, backoff_base_s=0.0)
    worker.run_once()
    assert store.get(job.id).state == "delivering"
    worker.run_once()
    assert store.get(job.id).state == "done" and calls == ["D0", "D1", "D1"]


def test_failures_are_recorded_with_a_reason(tmp_path):
    def refuse(job, destination, paths):
        raise PermanentDeliveryError("SOP class not supported (0x0122)")

    store, job, worker = _setup(tmp_path, refuse)
    worker.run_once()
    job = store.get(job.id)
    assert job.state == "failed" and "0x0122" in job.reason

    store2, job2, worker2 = _setup(tmp_path / "b", FlakyDestination())
    worker2.loader = lambda j: (_ for _ in ()).throw(ValueError("series has 2 slices"))
    worker2.run_once()
    assert store2.get(job2.id).state == "failed" and "2 slices" in store2.get(job2.id).reason
    # Retry puts it back in the queue and it now succeeds.
    worker2.loader = lambda j: [j.source]
    store2.retry(job2.id)
    worker2.run_once()
    assert store2.get(job2.id).state == "done" and store2.get(job2.id).attempts == 2


def test_repeated_crash_during_analysis_gives_up(tmp_path):
    store, job, worker = _setup(tmp_path, FlakyDestination(), max_attempts=2)
    for _ in range(2):  # the process dies while analysing: claimed, never finished, resumed at restart
        assert store.claim().state == "running"
        store.resume()
    worker.run_once()
    job = store.get(job.id)
    assert job.state == "failed" and "gave up" in job.reason


def test_a_later_job_of_the_series_gets_the_earlier_results_as_predecessors(tmp_path):
    """What a job wrote is recorded (result UIDs, instances read), and the next job of the same series and
    model gets those results, newest first, to name as replaced; another model's results are not its own."""
    seen = []

    def pipeline(datasets, model, predecessors=None):
        seen.append(predecessors)
        return fake_pipeline(datasets, model)

    store, first, worker = _setup(tmp_path, FlakyDestination(), destinations=1)
    worker.steps._process_series = pipeline
    store._db().execute("UPDATE jobs SET model_name = 'other-model' WHERE id = ?", (first.id,))
    assert worker.run_once()
    first = store.get(first.id)
    assert first.details["instances_read"] == 1
    assert set(first.details["result_uids"]) == {"landmark-sr", "measurements-sr", "seg", "gsps"}
    assert seen == [{}]

    second, _ = store.ensure_job("1.2.3", "1.2", first.source, state="queued", model_name="other-model")
    assert worker.run_once()
    third, _ = store.ensure_job("1.2.3", "1.2", first.source, state="queued", model_name="other-model")
    assert worker.run_once()
    uids = [store.get(j.id).details["result_uids"]["landmark-sr"]["SOPInstanceUID"] for j in (first, second)]
    assert [str(p.SOPInstanceUID) for p in seen[2]["landmark-sr"]] == uids[::-1]
    assert str(seen[2]["landmark-sr"][0].StudyInstanceUID) == "1.2"
    fourth, _ = store.ensure_job("1.2.3", "1.2", first.source, state="queued", model_name="a-third-model")
    assert worker.run_once()
    assert seen[3] == {}


def test_a_result_set_without_presentation_state_is_delivered(tmp_path):
    """The GSPS is optional (None for slices that differ in rescale): the other results go out."""
    def pipeline(datasets, model, predecessors=None):
        results = fake_pipeline(datasets, model)
        results.gsps = None
        return results

    dest = FlakyDestination()
    store, job, worker = _setup(tmp_path, dest, destinations=1)
    worker.steps._process_series = pipeline
    assert worker.run_once()
    job = store.get(job.id)
    assert job.state == "done", job.reason
    assert dest.received == [["landmarks-sr.dcm", "measurements-sr.dcm", "seg.dcm"]]
    assert "gsps" not in job.results and "gsps" not in job.details["result_uids"]
def test_nothing_found_is_done_without_result_objects(tmp_path):
    """No landmark found (pipeline.Results.nothing_found): nothing goes to the archive, the job is done with
    the reason, landmarks.json keeps the statuses."""
    from pacs_landmarks.inference.landmark import NOT_FOUND

    def nothing(datasets, model, predecessors=None):
        return SimpleNamespace(
            landmarks=[Landmark("Nasion", None, 0.05, status=NOT_FOUND, reason="low confidence")],
            landmark_sr=None, measurements_sr=None, seg=None, gsps=None, timings={"cascade": 0.01},
            nothing_found=True)

    dest = FlakyDestination()
    store, job, worker = _setup(tmp_path, dest)
    worker.steps._process_series = nothing
    assert worker.run_once()
    job = store.get(job.id)
    assert job.state == "done" and "no landmark found" in job.reason
    assert dest.calls == 0
    assert set(job.results) == {"landmarks_json"}
    doc = json.loads(Path(job.results["landmarks_json"]).read_text())
    assert doc["landmarks"][0] == {"name": "Nasion", "status": "not_found", "position_lps_mm": None,
                                   "confidence": 0.05}
