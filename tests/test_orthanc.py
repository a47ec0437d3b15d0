"""The Orthanc plugin with a real Orthanc (Debian 1.10.1) and real dcmtk clients, in a private network."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import dcmtk
from orthanc_harness import orthanc_factory, wait_for  # noqa: F401  (fixture)
from pydicom.data import get_testdata_file


def series_of(orthanc, modality: str) -> list[dict]:
    found = []
    for sid in orthanc.get_json("/series"):
        info = orthanc.get_json(f"/series/{sid}")
        if info["MainDicomTags"].get("Modality") == modality:
            found.append(info)
    return found


def test_starts_answers_echo_store_and_rest(orthanc_factory):
    orthanc = orthanc_factory.start()
    assert orthanc.echoscu().returncode == 0
    orthanc.storescu([get_testdata_file("CT_small.dcm")])
    assert len(orthanc.get_json("/instances")) == 1

    health = orthanc.get_json("/pacs-landmarks/health")
    assert set(health) >= {"status", "model", "queue_depth", "last_error", "jobs"}
    assert isinstance(health["queue_depth"], int)
    status, body = orthanc.request("GET", "/pacs-landmarks/jobs")
    assert status == 200 and isinstance(json.loads(body), list)
    # Wrong method: refused, not answered.
    status, _ = orthanc.request("POST", "/pacs-landmarks/health", b"{}")
    assert status == 405


def test_superseded_setting():
    """orthanc.json ships "Superseded": "delete"; "keep" is the other choice; anything else is refused."""
    from pacs_landmarks.plugin.config import PluginSettings, read_orthanc_json

    assert PluginSettings.from_orthanc_config(read_orthanc_json()).superseded == "delete"
    assert PluginSettings.from_orthanc_config({"PacsLandmarks": {"Superseded": "Keep"}}).superseded == "keep"
    assert PluginSettings.from_orthanc_config({}).superseded == "delete"
    with pytest.raises(ValueError, match='Superseded must be "delete" or "keep"'):
        PluginSettings.from_orthanc_config({"PacsLandmarks": {"Superseded": "purge"}})


def test_bad_superseded_setting_stops_orthanc_with_the_reason(orthanc_factory):
    from pacs_landmarks.plugin.launch import OrthancError

    with pytest.raises(OrthancError):
        orthanc_factory.start(Superseded="purge")
    assert 'PacsLandmarks.Superseded must be "delete" or "keep", not \'purge\'' in orthanc_factory.log()


def test_mr_series_makes_no_job_but_ct_does(orthanc_factory):
    orthanc = orthanc_factory.start()
    orthanc.storescu([get_testdata_file("MR_small.dcm")])
    mr = wait_for(lambda: [s for s in series_of(orthanc, "MR") if s["IsStable"]], 30, "the MR series to be stable")
    # Positive control: a CT image series sent afterwards does become a job, so the MR one was seen and skipped.
    orthanc.storescu([get_testdata_file("CT_small.dcm")])
    jobs = wait_for(lambda: orthanc.get_json("/pacs-landmarks/jobs"), 30, "a job for the CT series")
    assert [j["source"] for j in jobs] != [mr[0]["ID"]]
    assert all(j["source"] != mr[0]["ID"] for j in orthanc.get_json("/pacs-landmarks/jobs"))
    ct = series_of(orthanc, "CT")[0]
    assert [j["source"] for j in jobs] == [ct["ID"]]
    # The listing's query: only the states asked for, at most `limit` rows.
    assert orthanc.get_json("/pacs-landmarks/jobs?state=no-such-state") == []
    from pacs_landmarks.jobs.store import STATES

    assert len(orthanc.get_json(f"/pacs-landmarks/jobs?state={','.join(STATES)}&limit=1")) == 1
    # Re-running by REST is refused for the MR series with a reason.
    answer = orthanc.post_json(f"/pacs-landmarks/series/{mr[0]['ID']}/run")
    assert answer["job"] is None and "modality MR" in answer["result"]


# --- the job flow on a small phantom ----------------------------------------------------------------------
# Small phantoms keep the file at a few minutes on 2 cores: 256 x 256 pixels of 1 mm, 3 mm slices.
PHANTOM_OPTIONS = {"pixel_spacing": 1.0, "slice_thickness": 3.0, "size": 256}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """One phantom head CT series on disk and its truth: (folder, landmarks.json dict)."""
    phantom = pytest.importorskip("pacs_landmarks.inference.phantom")  # lands during the session
    pytest.importorskip("pacs_landmarks.pipeline")
    out = tmp_path_factory.mktemp("phantom")
    case_dir = Path(phantom.write_case(phantom.make_case(11), out / "case", **PHANTOM_OPTIONS))
    assert sorted(case_dir.glob("*.dcm")), f"no slices in {case_dir}"
    return case_dir, json.loads((case_dir / "landmarks.json").read_text())


def job_for(orthanc, series_uid: str, states=("done",)) -> dict | None:
    for job in orthanc.get_json("/pacs-landmarks/jobs"):
        if job["series_instance_uid"] == series_uid:
            if job["state"] == "failed":
                pytest.fail(f"job {job['id']} failed: {job['reason']}")
            if job["state"] in states:
                return job
    return None


def result_instances(orthanc) -> dict[str, list[str]]:
    """Orthanc instance IDs of every SR, SEG and presentation state (PR) series, by modality."""
    out: dict[str, list[str]] = {"SR": [], "SEG": [], "PR": []}
    for info in (orthanc.get_json(f"/series/{sid}") for sid in orthanc.get_json("/series")):
        modality = info["MainDicomTags"].get("Modality")
        if modality in out:
            out[modality] += info["Instances"]
    return out


def test_phantom_gets_sr_and_seg_once(orthanc_factory, phantom, validate_dicom, tmp_path):
    case_dir, truth = phantom
    series_uid = truth["series_instance_uid"]
    orthanc = orthanc_factory.start()

    orthanc.storescu(case_dir)
    job = wait_for(lambda: job_for(orthanc, series_uid), 60, "the SR, measurements SR and SEG in Orthanc")
    results = result_instances(orthanc)
    assert len(results["SR"]) == 2 and len(results["SEG"]) == 1 and len(results["PR"]) == 1, results
    assert sorted(job["details"]["result_instances"]) == sorted(results["SR"] + results["SEG"] + results["PR"])

    study_uid = job["study_instance_uid"]
    assert len(orthanc.findscu_series(study_uid, "SEG")) == 1
    sr_series = orthanc.findscu_series(study_uid, "SR")
    assert sr_series and all(m["SeriesInstanceUID"] for m in sr_series)
    qido = orthanc.get_json(f"/dicom-web/studies/{study_uid}/series?Modality=SR")
    assert {s["0020000E"]["Value"][0] for s in qido} == {m["SeriesInstanceUID"] for m in sr_series}

    # The SR as Orthanc serves it: valid, and its points are where the phantom's landmarks are.
    sr_path = tmp_path / "sr.dcm"
    status, data = orthanc.request("GET", f"/instances/{job['details']['result_instances'][0]}/file")
    assert status == 200
    sr_path.write_bytes(data)
    validate_dicom(sr_path)
    import pydicom

    from pacs_landmarks.sr_templates import read_landmark_sr

    landmarks = {lm.name: np.asarray(lm.position_lps_mm) for lm in read_landmark_sr(pydicom.dcmread(sr_path))}
    true = {lm["name"]: np.asarray(lm["position_lps_mm"]) for lm in truth["landmarks"]}
    assert set(landmarks) == set(true)

    # Our own results are stable series too: they make no job.
    wait_for(lambda: all(orthanc.get_json(f"/series/{s}")["IsStable"] for s in orthanc.get_json("/series")),
             30, "every series to be stable")
    wait_for(lambda: orthanc.get_json("/pacs-landmarks/health")["pending_events"] == 0, 10, "the events handled")
    assert [j["series_instance_uid"] for j in orthanc.get_json("/pacs-landmarks/jobs")] == [series_uid]

    # Same series again: nothing new. Then an explicit re-run: a new job, but the same (deterministic) results.
    orthanc.storescu(case_dir)
    time.sleep(float(orthanc.config.get("StableAge", 2)) + 2)
    wait_for(lambda: orthanc.get_json("/pacs-landmarks/health")["pending_events"] == 0, 10, "the events handled")
    assert len(orthanc.get_json("/pacs-landmarks/jobs")) == 1
    ct_series = job["source"]
    rerun = orthanc.post_json(f"/pacs-landmarks/series/{ct_series}/run")
    assert rerun["result"] == "queued" and rerun["job"]["id"] != job["id"]
    wait_for(lambda: orthanc.get_json("/pacs-landmarks/jobs")[0]["state"] == "done", 60, "the re-run")
    assert result_instances(orthanc) == results, "a re-run must not duplicate results"

    errors = {name: float(np.linalg.norm(landmarks[name] - true[name])) for name in true}
    if orthanc.get_json("/pacs-landmarks/health")["model"]["version"].endswith("untrained"):
        pytest.xfail(f"the shipped demo model is untrained (max error {max(errors.values()):.0f} mm)")
    assert max(errors.values()) <= 3.0, errors


def test_jpeg_ls_series_survives_kill_while_queued(orthanc_factory, phantom, tmp_path):
    """Jobs are durable: killed with a job queued, Orthanc restarts and the results appear. The series is
    JPEG-LS (dcmcjpls), decoded in the plugin with GDCM (pyjpegls next to Orthanc's CharLS is not safe)."""
    case_dir, truth = phantom
    jls = tmp_path / "jpeg-ls"
    jls.mkdir()
    for f in sorted(case_dir.glob("*.dcm")):
        subprocess.run([dcmtk("dcmcjpls"), str(f), str(jls / f.name)], check=True, capture_output=True)
    import pydicom

    assert pydicom.dcmread(next(jls.glob("*.dcm"))).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.80"

    orthanc = orthanc_factory.start(Worker=False)  # queue, do not analyse
    orthanc.storescu(jls)
    queued = wait_for(lambda: job_for(orthanc, truth["series_instance_uid"], ("queued",)), 30, "the job queued")
    orthanc.kill()

    orthanc = orthanc_factory.start(Worker=True)
    job = wait_for(lambda: job_for(orthanc, truth["series_instance_uid"]), 60, "the results after the restart")
    assert job["id"] == queued["id"] and job["attempts"] == 1
    results = result_instances(orthanc)
    assert len(results["SR"]) == 2 and len(results["SEG"]) == 1 and len(results["PR"]) == 1


def test_series_stored_just_before_a_kill_is_queued_after_restart(orthanc_factory):
    """Killed before StableAge passed, Orthanc never fires STABLE_SERIES for that series: the plugin finds it
    in Orthanc's change log at the next start."""
    orthanc = orthanc_factory.start()
    orthanc.storescu([get_testdata_file("CT_small.dcm")])
    orthanc.kill()  # well within StableAge (2 s) of the store
    orthanc = orthanc_factory.start()
    ct = series_of(orthanc, "CT")[0]["ID"]
    jobs = wait_for(lambda: orthanc.get_json("/pacs-landmarks/jobs"), 30, "the series to be found after the restart")
    assert [j["source"] for j in jobs] == [ct]
    # One slice is not a volume: the job fails with a reason, the instance stays in Orthanc.
    job = wait_for(lambda: [j for j in orthanc.get_json("/pacs-landmarks/jobs") if j["state"] == "failed"], 60,
                   "the single-slice job to be refused")[0]
    assert job["reason"]
    assert orthanc.get_json("/pacs-landmarks/health")["last_error"]
    assert len(orthanc.get_json("/instances")) == 1


# --- a series that grows: new results replace the old ------------------------------------------------------

def _jobs_of(orthanc, series_uid: str) -> list[dict]:
    """The series' jobs, oldest first; a failed one fails the test."""
    jobs = [j for j in orthanc.get_json("/pacs-landmarks/jobs") if j["series_instance_uid"] == series_uid]
    for job in jobs:
        if job["state"] == "failed":
            pytest.fail(f"job {job['id']} failed: {job['reason']}")
    return list(reversed(jobs))


def _wait_for_job(orthanc, series_uid: str, n: int) -> dict:
    """The series' n-th job, once it is done."""
    def done():
        jobs = _jobs_of(orthanc, series_uid)
        return jobs[n - 1] if len(jobs) >= n and jobs[n - 1]["state"] == "done" else None

    return wait_for(done, 120, f"job {n} of the series to be done")


def _settle(orthanc) -> None:
    """Every series stable and every STABLE_SERIES event handled (a job, if any, is then queued)."""
    time.sleep(float(orthanc.config.get("StableAge", 2)) + 1)
    wait_for(lambda: all(orthanc.get_json(f"/series/{s}")["IsStable"] for s in orthanc.get_json("/series")),
             30, "every series to be stable")
    wait_for(lambda: orthanc.get_json("/pacs-landmarks/health")["pending_events"] == 0, 10, "the events handled")


def _current_results(orthanc, study_uid: str) -> dict[str, list[dict]]:
    """C-FIND (findscu) per result modality: the series Orthanc answers, with their instance counts."""
    return {m: orthanc.findscu_series(study_uid, m) for m in ("SR", "SEG", "PR")}


def _sr_predecessor(orthanc, instance_id: str) -> str | None:
    import pydicom

    status, data = orthanc.request("GET", f"/instances/{instance_id}/file")
    assert status == 200
    ds = pydicom.dcmread(__import__("io").BytesIO(data))
    if "PredecessorDocumentsSequence" not in ds:
        return None
    return str(ds.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
               .ReferencedSOPInstanceUID)


def test_a_series_that_grows_gets_new_results_and_the_old_ones_go(orthanc_factory, phantom):
    """The issue's scenario: the upper 60 % of a head CT, results; the same part again, nothing new; the
    rest in two parts, each time a new job, new results naming the ones they replace, and the replaced ones
    deleted: C-FIND finds one landmark SR, one measurements SR, one SEG and one GSPS."""
    import pydicom

    case_dir, truth = phantom
    series_uid = truth["series_instance_uid"]
    files = sorted(case_dir.glob("*.dcm"),
                   key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))[::-1]
    cut = int(len(files) * 0.6)
    upper, rest = files[:cut], files[cut:]
    parts = [rest[: len(rest) // 2], rest[len(rest) // 2:]]
    orthanc = orthanc_factory.start()

    orthanc.storescu(upper)
    first = _wait_for_job(orthanc, series_uid, 1)
    assert first["details"]["instances_read"] == len(upper)
    ids = [first["details"]["result_instances"]]
    assert len(ids[0]) == 4
    assert _sr_predecessor(orthanc, ids[0][0]) is None
    study_uid = first["study_instance_uid"]
    _settle(orthanc)
    before = sorted(orthanc.get_json("/instances"))

    # The same part again: no job, no new object.
    orthanc.storescu(upper)
    _settle(orthanc)
    assert len(_jobs_of(orthanc, series_uid)) == 1
    assert sorted(orthanc.get_json("/instances")) == before

    for n, part in enumerate(parts, start=2):
        orthanc.storescu(part)
        job = _wait_for_job(orthanc, series_uid, n)
        assert job["details"]["instances_read"] == len(upper) + sum(len(p) for p in parts[: n - 1])
        ids.append(job["details"]["result_instances"])
        assert not set(ids[-1]) & set(ids[-2]), "new input must give new result UIDs"
        for old in ids[-2]:  # the replaced results are gone from Orthanc ...
            assert orthanc.request("GET", f"/instances/{old}")[0] == 404
        for new in ids[-1]:
            assert orthanc.request("GET", f"/instances/{new}")[0] == 200
        # ... the new landmark SR and measurements SR name them, and the store says who replaced whom.
        jobs = _jobs_of(orthanc, series_uid)
        replaced = jobs[n - 2]["details"]["result_uids"]
        assert _sr_predecessor(orthanc, ids[-1][0]) == replaced["landmark-sr"]["SOPInstanceUID"]
        assert _sr_predecessor(orthanc, ids[-1][1]) == replaced["measurements-sr"]["SOPInstanceUID"]
        assert jobs[n - 2]["details"]["superseded_by"] == job["id"]
        _settle(orthanc)
        found = _current_results(orthanc, study_uid)
        assert sorted(int(s["SeriesNumber"]) for s in found["SR"]) == [7701, 7702], found
        assert [int(s["SeriesNumber"]) for s in found["SEG"]] == [7703], found
        assert [int(s["SeriesNumber"]) for s in found["PR"]] == [7704], found
        assert all(int(s["NumberOfSeriesRelatedInstances"]) == 1 for series in found.values() for s in series)
        assert len(_jobs_of(orthanc, series_uid)) == n, "our own results make no job"


def test_superseded_keep_leaves_the_earlier_results(orthanc_factory, phantom):
    """With "Superseded": "keep" the grown series' new results are stored next to the earlier ones, which
    the new SRs name as predecessors."""
    import pydicom

    case_dir, truth = phantom
    series_uid = truth["series_instance_uid"]
    files = sorted(case_dir.glob("*.dcm"),
                   key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))[::-1]
    cut = int(len(files) * 0.6)
    orthanc = orthanc_factory.start(Superseded="keep")
    orthanc.storescu(files[:cut])
    first = _wait_for_job(orthanc, series_uid, 1)
    _settle(orthanc)
    orthanc.storescu(files[cut:])
    second = _wait_for_job(orthanc, series_uid, 2)
    for iid in first["details"]["result_instances"] + second["details"]["result_instances"]:
        assert orthanc.request("GET", f"/instances/{iid}")[0] == 200
    _settle(orthanc)
    found = _current_results(orthanc, first["study_instance_uid"])
    assert sorted(int(s["SeriesNumber"]) for s in found["SR"]) == [7701, 7701, 7702, 7702], found
    assert _sr_predecessor(orthanc, second["details"]["result_instances"][0]) == \
        first["details"]["result_uids"]["landmark-sr"]["SOPInstanceUID"]
    assert "superseded_by" not in _jobs_of(orthanc, series_uid)[0]["details"]
