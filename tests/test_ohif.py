"""OHIF draws every landmark: the real OHIF (pinned @ohif/app build) in headless Debian chromium, software WebGL,
against a real Orthanc holding a phantom CT and our landmark SR, measurements SR and SEG.

The browser is driven by tests/ohif_driver.py inside Orthanc's private network namespace; it reports what the
page drew and this test judges it. About 30-35 s in the browser and 1.7 GB on 2 busy cores (docs/orthanc.md).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from orthanc_harness import orthanc_factory  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow

DRIVER = Path(__file__).with_name("ohif_driver.py")
# Small phantom: 256 x 256 pixels of 1 mm, 3 mm slices (a few seconds to render, quick to load in OHIF).
PHANTOM_OPTIONS = {"pixel_spacing": 1.0, "slice_thickness": 3.0, "size": 256}
TOLERANCE_PX = 2.0  # image pixels between the drawn arrow tip and the SR's 2D point


def _sr_points(sr: pydicom.Dataset) -> list[dict]:
    """The SR's 2D landmark points as the document states them: name, tracking UID, slice, (x, y)."""
    measurements = next(i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010")
    points = []
    for group in measurements.ContentSequence:
        items = {(i.ValueType, i.ConceptNameCodeSequence[0].CodeValue): i for i in group.ContentSequence}
        scoord = next((i for i in group.ContentSequence if i.ValueType == "SCOORD"), None)
        if scoord is None:
            continue
        points.append({
            "name": items[("TEXT", "112039")].TextValue,
            "uid": items[("UIDREF", "112040")].UID,
            "sop": scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID,
            "xy": [float(v) for v in scoord.GraphicData],
        })
    return points


def _world(header: pydicom.Dataset, x: float, y: float) -> list[float]:
    """Patient (LPS mm) position of SCOORD image coordinates (x, y) on a slice: (0, 0) is the top left corner of
    the first pixel (PS3.3 C.18.6.1.1), so the first pixel's centre, where Image Position points, is (0.5, 0.5)."""
    row_dir, col_dir = np.asarray(header.ImageOrientationPatient[:3], float), np.asarray(header.ImageOrientationPatient[3:], float)
    row_spacing, col_spacing = (float(v) for v in header.PixelSpacing)
    p = np.asarray(header.ImagePositionPatient, float) + (x - 0.5) * col_spacing * row_dir + (y - 0.5) * row_spacing * col_dir
    return [float(v) for v in p]


def _arrow_tips(lines: list[list[float]]) -> list[tuple[float, float]]:
    """Tips of the arrows cornerstone drew: the end point its shaft and both head strokes share (3+ lines)."""
    ends = [(round(x, 1), round(y, 1)) for x1, y1, x2, y2 in lines for x, y in ((x1, y1), (x2, y2))]
    return [e for e in set(ends) if ends.count(e) >= 3]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Phantom CT + our three result objects on disk (built from the phantom's true landmarks)."""
    from pacs_landmarks.dicom.series import load_series
    from pacs_landmarks.inference.landmark import Landmark
    from pacs_landmarks.inference.phantom import make_case, write_case
    from pacs_landmarks.pipeline import build_outputs
    from pacs_landmarks.sr_templates.common import Algorithm

    root = tmp_path_factory.mktemp("ohif-study")
    folder = write_case(make_case(5), root / "ct", **PHANTOM_OPTIONS)
    truth = json.loads((folder / "landmarks.json").read_text())
    volume = load_series(sorted(folder.glob("*.dcm")))
    landmarks = [Landmark(lm["name"], tuple(lm["position_lps_mm"]), 0.9) for lm in truth["landmarks"]]
    results = {}
    for name, ds in zip(("sr", "msr", "seg"), build_outputs(volume, landmarks, Algorithm("phantom-truth", "1"))[:3]):
        results[name] = root / f"{name}.dcm"
        ds.save_as(results[name], enforce_file_format=True)
    headers = {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in folder.glob("*.dcm"))}
    return folder, results, headers, landmarks


def test_ohif_draws_every_landmark_with_its_name_and_loads_the_seg(orthanc_factory, study, validate_dicom, tmp_path):
    folder, results, headers, landmarks = study
    for path in results.values():
        validate_dicom(path, allow=())  # no error at all; warnings (local scheme) are allowed
    sr = pydicom.dcmread(results["sr"])
    seg = pydicom.dcmread(results["seg"])
    msr = pydicom.dcmread(results["msr"], stop_before_pixels=True)
    points = _sr_points(sr)
    assert [p["name"] for p in points] == [lm.name for lm in landmarks]

    # Worker off: the study holds exactly our objects (the plugin would add its own model's results).
    orthanc = orthanc_factory.start(Worker=False)
    orthanc.storescu(folder)
    orthanc.storescu(list(results.values()))

    expected = {p["uid"]: _world(headers[p["sop"]], *p["xy"]) for p in points}
    (tmp_path / "expected.json").write_text(json.dumps(expected))
    slices = list(dict.fromkeys(p["sop"] for p in points))
    out = tmp_path / "ohif"
    cmd = [
        sys.executable, str(DRIVER), "--orthanc", f"http://127.0.0.1:{orthanc.http_port}",
        "--study", sr.StudyInstanceUID, "--sr", sr.SeriesInstanceUID, "--seg", seg.SeriesInstanceUID,
        "--msr", msr.SeriesInstanceUID,
        "--slices", *slices, "--expect", str(tmp_path / "expected.json"), "--out", str(out),
    ]
    proc = orthanc.run_client(cmd, timeout=420, check=False)
    report_path = out / "report.json"
    assert proc.returncode == 0 and report_path.is_file(), (
        f"the OHIF browser check could not run (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    )
    report = json.loads(report_path.read_text())
    print("OHIF timings:", report["timings"], f"peak memory {report['peak_memory_mb']} MB, screenshots: {out}")

    assert report["page_errors"] == [], report["page_errors"]
    assert report["console_errors"] == [], report["console_errors"]
    # OHIF hydrated the SR into one measurement per landmark (2D and 3D groups merged by Tracking UID).
    assert report["sr_display_set"]["measurements"] == len(landmarks), report["sr_display_set"]

    drawn: dict[str, dict] = {}
    for visit in report["visits"]:
        assert "error" not in visit, visit
        for a in visit["annotations"]:
            if a["onThisImage"] and a["texts"]:
                # The arrow of this annotation: its own SVG lines, from cornerstone's node cache.
                assert visit["cacheExported"], "cornerstoneTools.state.svgNodeCache is gone: update the driver"
                tips = _arrow_tips(a["cachedLines"])
                drawn[a["uid"]] = {**a, "sop": visit["sop"], "mm_per_px": visit["mmPerCanvasPx"], "tips": tips}
    missing = [p["name"] for p in points if p["uid"] not in drawn]
    assert not missing, f"OHIF drew no labelled point for {missing} (screenshots in {out})"
    worst = 0.0
    for p in points:
        a = drawn[p["uid"]]
        assert a["sop"] == p["sop"], f"{p['name']} drawn on another slice"
        # The label is the landmark's name as a user reads it (OHIF shows the first Finding Site's meaning).
        assert any(line.endswith(f": {p['name']}") for line in a["texts"]), (p["name"], a["texts"])
        want = a["expectedCanvas"]
        assert a["tips"], f"{p['name']}: no arrow drawn (screenshots in {out})"
        tip = min(a["tips"], key=lambda t: math.dist(t, want))
        canvas_px_per_image_px = float(headers[p["sop"]].PixelSpacing[1]) / a["mm_per_px"]
        off = math.dist(tip, want) / canvas_px_per_image_px
        worst = max(worst, off)
        assert off <= TOLERANCE_PX, f"{p['name']}: arrow tip {tip} is {off:.2f} image px from the SR point at {want}"
    print(f"OHIF: {len(drawn)} landmarks drawn, worst {worst:.2f} image px from the SR's 2D points")

    # The SEG: loaded as one segmentation whose segments carry the landmark names.
    assert report.get("seg_display_sets") == 1 and "seg_error" not in report, report
    assert report["seg_confirmed"], "OHIF did not ask to open the SEG (docs/orthanc.md says it does)"
    (segmentation,) = report["segmentations"]
    assert sorted(s["label"] for s in segmentation["segments"]) == sorted(lm.name for lm in landmarks)

    # The measurements SR opened too (the page-error checks above cover it).
    assert report["msr_display_sets"] == 1

    shots = sorted(out.glob("slice-*.png"))
    assert shots and all(s.stat().st_size > 10_000 for s in shots)
