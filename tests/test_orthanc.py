"""The Orthanc plugin with a real Orthanc (Debian 1.10.1) and real dcmtk clients, in a private network."""
from __future__ import annotations

import json

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
    # Re-running by REST is refused for the MR series with a reason.
    answer = orthanc.post_json(f"/pacs-landmarks/series/{mr[0]['ID']}/run")
    assert answer["job"] is None and "modality MR" in answer["result"]
