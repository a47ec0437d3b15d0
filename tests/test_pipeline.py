"""process_series end to end (real loader, shipped model, real validators) and the ``infer`` command."""
from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from sr_helpers import make_series

from pacs_landmarks.sr_templates import read_landmark_sr
from pacs_landmarks.landmark_sets import landmark_names

LOCAL_SCHEME = "99PACSLMK"


@pytest.fixture(scope="module")
def model():
    from pacs_landmarks.inference.model import LandmarkModel

    return LandmarkModel.load()


def _write(datasets, folder):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, ds in enumerate(datasets):
        path = folder / f"IM{n:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _check_results(results, volume_series_uid, tmp_path, validate_dicom):
    assert set(results.timings) >= {"volume", "cascade", "outputs"}
    assert all(v >= 0 for v in results.timings.values())
    assert [lm.name for lm in results.landmarks] == landmark_names()
    for name in ("landmark_sr", "measurements_sr", "seg", "gsps"):
        path = tmp_path / f"{name}.dcm"
        getattr(results, name).save_as(path, enforce_file_format=True)
        warnings = validate_dicom(path)
        # These test series have no Body Part Examined: the GSPS's Laterality is then empty (unknown).
        allowed = (LOCAL_SCHEME, "<Laterality>") if name == "gsps" else (LOCAL_SCHEME,)
        assert all(any(a in w for a in allowed) for w in warnings), warnings
    found = [lm for lm in results.landmarks if lm.found]
    assert len(found) >= 12, [(lm.name, lm.status, lm.reason) for lm in results.landmarks]
    back = read_landmark_sr(pydicom.dcmread(tmp_path / "landmark_sr.dcm"))
    assert len(back) == len(found)
    for want, got in zip(found, back):
        assert want.name == got.name
        assert np.allclose(want.position_lps_mm, got.position_lps_mm, atol=0.01)
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == volume_series_uid
    assert seg.FrameOfReferenceUID == results.volume.frame_of_reference_uid


def _phantom_files(folder, seed, **kw):
    """A real head (phantom) series: the model finds its landmarks, so every result object is made."""
    from pacs_landmarks.inference.phantom import make_case, write_case

    out = write_case(make_case(seed), folder, size=128, pixel_spacing=2.0, **kw)
    return sorted(out.glob("*.dcm")), json.loads((out / "landmarks.json").read_text())


def test_process_series_tilted_files(tmp_path, validate_dicom, model):
    from pacs_landmarks.pipeline import process_series

    paths, truth = _phantom_files(tmp_path / "in", 7102, slice_thickness=2.5, tilt_deg=15.0)
    results = process_series(paths, model)
    assert results.volume.resampled  # the loader resampled the tilted series; outputs use the source planes
    _check_results(results, truth["series_instance_uid"], tmp_path, validate_dicom)

    # Same series, other order, datasets instead of files: same result UIDs (a re-run replaces).
    shuffled = [pydicom.dcmread(p) for p in paths]
    random.Random(0).shuffle(shuffled)
    again = process_series(shuffled, model)
    for name in ("landmark_sr", "measurements_sr", "seg", "gsps"):
        assert getattr(again, name).SOPInstanceUID == getattr(results, name).SOPInstanceUID
    assert all("PixelData" in ds for ds in shuffled)  # the caller's datasets are left whole


def test_process_series_enhanced_ct(tmp_path, validate_dicom, model):
    """A Legacy Converted Enhanced CT (one multi-frame instance) goes through too: SEG frames reference frames."""
    import highdicom as hd

    from pacs_landmarks.pipeline import process_series

    paths, _ = _phantom_files(tmp_path / "in", 7103, slice_thickness=5.0)
    datasets = [pydicom.dcmread(p) for p in paths]
    for ds in datasets:
        ds.ContentDate, ds.ContentTime = ds.StudyDate, ds.StudyTime
        ds.AcquisitionDate, ds.AcquisitionTime = ds.StudyDate, ds.StudyTime
    multi = hd.legacy.LegacyConvertedEnhancedCTImage(
        datasets, series_instance_uid=hd.UID(), series_number=2, sop_instance_uid=hd.UID(), instance_number=1
    )
    results = process_series([multi], model)
    _check_results(results, multi.SeriesInstanceUID, tmp_path, validate_dicom)
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    source = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert source.ReferencedSOPInstanceUID == multi.SOPInstanceUID and source.ReferencedFrameNumber >= 1


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-c", "import sys; from pacs_landmarks.cli import main; sys.exit(main())", *map(str, args)],
        capture_output=True, text=True, timeout=300,
    )


def test_infer_command(tmp_path):
    _, truth = _phantom_files(tmp_path / "series", 7104, slice_thickness=3.0)
    (tmp_path / "series" / "landmarks.json").unlink()
    proc = _cli("infer", tmp_path / "series", "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    for name in ("landmarks-sr.dcm", "measurements-sr.dcm", "landmarks-seg.dcm", "landmarks-gsps.dcm", "landmarks.json"):
        assert (tmp_path / "out" / name).is_file()
    doc = json.loads((tmp_path / "out" / "landmarks.json").read_text())
    assert doc["series_instance_uid"] == truth["series_instance_uid"]
    assert [lm["name"] for lm in doc["landmarks"]] == landmark_names()
    assert "SNA angle" in proc.stdout and "Gonion L" in proc.stdout and "status" in proc.stdout
    found = [entry for entry in doc["landmarks"] if entry["status"] == "found"]
    back = read_landmark_sr(pydicom.dcmread(tmp_path / "out" / "landmarks-sr.dcm"))
    assert [lm.name for lm in back] == [entry["name"] for entry in found]
    for lm, entry in zip(back, found):
        assert np.allclose(lm.position_lps_mm, entry["position_lps_mm"], atol=0.01)

    proc = _cli("read-sr", tmp_path / "out" / "landmarks-sr.dcm")
    assert proc.returncode == 0, proc.stderr
    read = json.loads(proc.stdout)["landmarks"]
    assert [lm["name"] for lm in read] == landmark_names()
    assert [lm["status"] for lm in read] == [entry["status"] for entry in doc["landmarks"]]


def test_infer_on_no_head_writes_no_result_objects(tmp_path):
    """Noise, not a head: no landmark found, so no SR or SEG (the default), a clear line, the statuses in
    landmarks.json."""
    datasets, truth = make_series("anisotropic", seed=13)
    _write(datasets, tmp_path / "series")
    proc = _cli("infer", tmp_path / "series", "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert "no landmark found" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["landmarks.json"]
    doc = json.loads((tmp_path / "out" / "landmarks.json").read_text())
    assert doc["series_instance_uid"] == truth.series_instance_uid
    assert len(doc["landmarks"]) == 16 and all(lm["status"] != "found" for lm in doc["landmarks"])
    assert all(lm["position_lps_mm"] is None for lm in doc["landmarks"])

    proc = _cli("infer", tmp_path / "series", "--out", tmp_path / "out2", "--report-nothing-found")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == [
        "landmarks-sr.dcm", "landmarks.json", "measurements-sr.dcm"]
    back = read_landmark_sr(pydicom.dcmread(tmp_path / "out2" / "landmarks-sr.dcm"), include_missing=True)
    assert len(back) == 16 and not any(lm.found for lm in back)


def test_infer_command_bad_input(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "note.dcm").write_bytes(b"not dicom at all")
    proc = _cli("infer", tmp_path / "junk", "--out", tmp_path / "out")
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
    proc = _cli("infer", tmp_path / "missing", "--out", tmp_path / "out")
    assert proc.returncode == 2 and "not a folder" in proc.stderr


def _gaps(k: int) -> float:
    return 2.5 if k % 9 == 4 else 0.0


@pytest.mark.parametrize("geometry", [{"tilt_deg": 0.0}, {"tilt_deg": 12.0}, {"gaps": _gaps}], ids=["axial", "tilt", "gaps"])
def test_outputs_on_phantom_truth(tmp_path, validate_dicom, geometry):
    """The phantom's true landmarks through the real loader and the builders (5 mm slices; oblique tilt;
    uneven gaps): valid objects, exact round trip, sphere centroids within half a voxel, plausible values."""
    from pacs_landmarks.dicom.series import load_series
    from pacs_landmarks.inference.landmark import Landmark
    from pacs_landmarks.inference.phantom import make_case, write_case
    from pacs_landmarks.pipeline import build_outputs
    from pacs_landmarks.sr_templates.common import Algorithm
    from test_seg import segment_centroids

    case = make_case(3)
    folder = write_case(case, tmp_path / "case", size=128, slice_thickness=5.0, **geometry)
    truth = json.loads((folder / "landmarks.json").read_text())
    volume = load_series(sorted(folder.glob("*.dcm")))
    assert truth["frame_of_reference_uid"] == volume.frame_of_reference_uid
    assert volume.resampled == bool(geometry.get("gaps") or geometry.get("tilt_deg"))
    landmarks = [Landmark(lm["name"], tuple(lm["position_lps_mm"])) for lm in truth["landmarks"]]
    sr, msr, seg, gsps, values = build_outputs(volume, landmarks, Algorithm("phantom-truth", "1"))
    for name, ds in (("sr", sr), ("msr", msr), ("seg", seg), ("gsps", gsps)):
        ds.save_as(tmp_path / f"{name}.dcm", enforce_file_format=True)
        warnings = validate_dicom(tmp_path / f"{name}.dcm")
        assert all(LOCAL_SCHEME in w for w in warnings), warnings

    back = read_landmark_sr(pydicom.dcmread(tmp_path / "sr.dcm"))
    for want, got in zip(landmarks, back):
        assert np.allclose(want.position_lps_mm, got.position_lps_mm, atol=0.01)

    inv = np.linalg.inv(volume.affine[:3, :3])
    centroids = segment_centroids(pydicom.dcmread(tmp_path / "seg.dcm"))
    for n, lm in enumerate(landmarks, start=1):
        offset = inv @ (centroids[n] - np.asarray(lm.position_lps_mm))
        assert np.all(np.abs(offset) <= 0.5), (lm.name, offset)

    # The phantom is drawn from adult norms: every measurement lands near its typical range (a wrong vertex,
    # side or plane would be far off).
    assert len(values) == 13
    for v in values:
        lo, hi = v.range
        slack = (hi - lo) / 2
        assert lo - slack <= v.value <= hi + slack, (v.name, v.value)


def test_non_finite_landmark_is_refused():
    from pacs_landmarks.inference.landmark import Landmark
    from pacs_landmarks.pipeline import build_outputs
    from pacs_landmarks.sr_templates.common import Algorithm

    _, volume = make_series("axial", with_pixels=False)
    with pytest.raises(ValueError, match="Nasion.*no finite 3D position"):
        build_outputs(volume, [Landmark("Nasion", (float("nan"), 0.0, 0.0))], Algorithm("m", "1"))


def test_warm_up_runs_the_pipeline_quietly(model, caplog):
    """The worker's warm-up (pipeline.warm_up) runs the real pipeline on a blank series without failing and
    without the model's "not a head CT" warning in the node's log."""
    import logging

    from pacs_landmarks.pipeline import warm_up

    with caplog.at_level(logging.INFO):
        seconds = warm_up(model)
    assert seconds > 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.records
    assert logging.getLogger("pacs_landmarks.inference.model").level == logging.NOTSET  # restored
