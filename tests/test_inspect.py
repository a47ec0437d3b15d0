"""`pacs-landmarks inspect`: the real console entry point on a folder of real files."""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from tests.test_series import analytic_series, ct_series, write


def run_inspect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / "pacs-landmarks"), "inspect", *args], capture_output=True, text=True, timeout=120
    )


def make_folder(tmp_path):
    tilted = analytic_series(tilt_deg=15.0, n=12, size=64)
    write(tilted, tmp_path / "study" / "tilted")
    straight = ct_series(4)
    loc = copy.deepcopy(straight[0])
    loc.SOPInstanceUID, loc.ImageType = pydicom.uid.generate_uid(), ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    write([*straight, loc], tmp_path / "study" / "straight")
    write(ct_series(2), tmp_path / "study" / "short")
    shutil.copy(get_testdata_file("MR_small.dcm"), tmp_path / "study" / "mr.dcm")
    (tmp_path / "study" / "notes.txt").write_text("hello")
    return tilted, straight, loc


def test_inspect_json(tmp_path):
    tilted, straight, loc = make_folder(tmp_path)
    proc = run_inspect(str(tmp_path / "study"), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    by_uid = {s["series_instance_uid"]: s for s in report["series"]}
    assert len(by_uid) == 4
    t = by_uid[tilted[0].SeriesInstanceUID]
    assert t["resampled"] is True and abs(t["gantry_tilt_deg"] - 15.0) < 0.01
    assert t["slices_used"] == 12 and t["modality"] == "CT" and t["sop_classes"] == ["CT Image Storage"]
    assert t["shape"][0] == 12 and t["shape"][1] > 64  # the tilt widens the grid along the column direction
    s = by_uid[straight[0].SeriesInstanceUID]
    assert s["resampled"] is False and s["shape"] == [4, 128, 128] and s["spacing_mm"] == [2.5, 0.6615, 0.6615]
    assert [e["reason"] for e in s["excluded"]] == ["localizer (ImageType contains LOCALIZER)"]
    assert s["excluded"][0]["source"].endswith("0004.dcm")
    errors = [v["error"] for v in by_uid.values() if "error" in v]
    assert any("only 2 usable CT slice" in e for e in errors)
    assert any("no CT image" in e and "MR Image Storage" in e for e in errors)
    assert [e["source"].endswith("notes.txt") for e in report["not_dicom"]] == [True]


def test_inspect_text(tmp_path):
    make_folder(tmp_path)
    proc = run_inspect(str(tmp_path / "study"))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for text in ("volume shape    4 x 128 x 128", "gantry tilt     15 deg", "resampled       yes",
                 "localizer (ImageType contains LOCALIZER)", "not DICOM:", "notes.txt", "cannot be loaded"):
        assert text in out, text


def test_inspect_missing_folder(tmp_path):
    proc = run_inspect(str(tmp_path / "nope"))
    assert proc.returncode == 2 and "is not a folder" in proc.stderr


def test_inspect_reads_headers_only(tmp_path):
    """A series whose pixel data cannot be decoded is still inspected (geometry comes from headers), while
    loading it fails: inspect does not decode pixels."""
    from pydicom.uid import JPEG2000Lossless

    from pacs_landmarks.dicom.series import SeriesError, load_series

    series = ct_series(3)
    for ds in series:
        ds.compress(JPEG2000Lossless)
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    paths = write(series, tmp_path / "broken")
    proc = run_inspect(str(tmp_path / "broken"), "--json")
    assert proc.returncode == 0, proc.stderr
    (entry,) = json.loads(proc.stdout)["series"]
    assert entry["shape"] == [3, 128, 128] and "error" not in entry
    with pytest.raises(SeriesError, match="cannot decode pixel data"):
        load_series(paths)
