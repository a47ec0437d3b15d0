"""A series with nothing of the head (issue #10 §1): by default no result object reaches the archive; with
``store_when_nothing_found = true`` (node.toml) / ``"StoreWhenNothingFound": true`` (orthanc.json) the landmark
SR and measurements SR that say "nothing found" do, and no SEG. Both front ends, the real model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from orthanc_harness import orthanc_factory, wait_for  # noqa: F401  (fixture)
from test_node import Archive, NodeProc, storescu
from test_orthanc import series_of


def blank_series(out: Path) -> list[Path]:
    """A CT series of air: 32 slices 64 x 64 at 2 mm (no head, so no landmark is found)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from pacs_landmarks.dicom.write import SeriesInfo, slice_dataset

    out.mkdir(parents=True)
    info = SeriesInfo("NOTHING^HERE", "NOTHING", generate_uid(), generate_uid(), generate_uid())
    paths = []
    for k in range(32):
        ds = slice_dataset(np.full((64, 64), -1000.0), info=info, sop_instance_uid=generate_uid(),
                           instance_number=k + 1, position=(-64.0, -64.0, 2.0 * k), orientation=(1, 0, 0, 0, 1, 0),
                           pixel_spacing=(2.0, 2.0), slice_thickness=2.0)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        paths.append(out / f"{k:03d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


@pytest.mark.parametrize("report", [False, True])
def test_node_nothing_found(report, tmp_path, validate_dicom):
    archive = Archive(tmp_path / "archive").start()
    args = ["--destination", archive.destination, "--idle-timeout", "0.5"]
    if report:
        (tmp_path / "node.toml").write_text("store_when_nothing_found = true\n")
        args += ["--config", str(tmp_path / "node.toml")]
    node = NodeProc(tmp_path / "storage", *args).start()
    try:
        storescu(node.port, blank_series(tmp_path / "blank"))
        job = wait_for(lambda: [j for j in node.jobs() if j.finished], 180, "the job to finish")[0]
        assert job.state == "done" and job.details["nothing_found"], (job.state, job.reason)
        if not report:
            assert "no landmark found" in job.reason and set(job.results) == {"landmarks_json"}
            assert archive.files() == []
        else:
            assert set(job.results) == {"landmark_sr", "measurements_sr", "landmarks_json"}
            files = wait_for(lambda: len(archive.files()) == 2 and archive.files(), 30, "the two SRs")
            for f in files:
                validate_dicom(f)
                assert pydicom.dcmread(f).Modality == "SR"
    finally:
        node.kill(15)
        archive.stop()


@pytest.mark.parametrize("report", [False, True])
def test_plugin_nothing_found(report, orthanc_factory, tmp_path):
    orthanc = orthanc_factory.start(**({"StoreWhenNothingFound": True} if report else {}))
    orthanc.storescu(blank_series(tmp_path / "blank"))

    def finished():
        jobs = orthanc.get_json("/pacs-landmarks/jobs")
        return [j for j in jobs if j["state"] in ("done", "failed")]

    job = wait_for(finished, 240, "the job to finish")[0]
    assert job["state"] == "done", job
    assert series_of(orthanc, "SEG") == []
    srs = series_of(orthanc, "SR")
    assert len(srs) == (2 if report else 0), srs


def test_setting_must_be_true_or_false(tmp_path):
    from pacs_landmarks.node.config import ConfigError, load
    from pacs_landmarks.plugin.config import PluginSettings

    (tmp_path / "node.toml").write_text('store_when_nothing_found = "yes"\n')
    with pytest.raises(ConfigError, match="store_when_nothing_found"):
        load(tmp_path / "node.toml").checked()
    with pytest.raises(ValueError, match="StoreWhenNothingFound"):
        PluginSettings.from_orthanc_config({"PacsLandmarks": {"StoreWhenNothingFound": "yes"}})
    assert PluginSettings.from_orthanc_config({}).job_details() == {}
    assert load(Path(__file__).parents[1] / "node.toml").checked().store_when_nothing_found is False
