"""DICOMDIR (PS3.10 8, PS3.3 F): a CD/USB export's directory is reported as one and followed to its files,
which have no extensions and sit in nested folders (written by pydicom's FileSet and by dcmtk's dcmmkdir)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
from pydicom.fileset import FileSet

from conftest import dcmtk
from tests.test_series import ct_series, write

from pacs_landmarks.dicom.series import load_series, read_directory


def export(datasets, root: Path) -> Path:
    """What a modality's "export to CD" writes: DICOMDIR at the root, PT*/ST*/SE*/IM* files without extensions."""
    fs = FileSet()
    for ds in datasets:
        fs.add(ds)
    fs.write(root)
    return root / "DICOMDIR"


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pacs_landmarks.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_inspect_reports_a_dicomdir_and_its_series(tmp_path):
    series = ct_series(5)
    export(series, tmp_path / "cd")
    images = [p for p in (tmp_path / "cd").rglob("*") if p.is_file() and p.name != "DICOMDIR"]
    assert len(images) == 5 and all(p.suffix == "" and len(p.relative_to(tmp_path / "cd").parts) == 4 for p in images)

    text = cli("inspect", str(tmp_path / "cd"))
    assert text.returncode == 0, text.stderr
    assert f"{tmp_path / 'cd' / 'DICOMDIR'}: DICOMDIR (directory of 5 referenced files)" in text.stdout
    assert "incomplete dataset" not in text.stdout and "damaged" not in text.stdout
    report = json.loads(cli("inspect", str(tmp_path / "cd"), "--json").stdout)
    assert report["dicomdirs"] == [{"source": str(tmp_path / "cd" / "DICOMDIR"), "referenced_files": 5, "missing": [],
                                    "description": "DICOMDIR (directory of 5 referenced files)"}]
    assert report["not_dicom"] == []
    (entry,) = report["series"]  # reached by the folder walk and through the DICOMDIR: counted once
    assert entry["series_instance_uid"] == series[0].SeriesInstanceUID
    assert entry["files"] == 5 and entry["slices_used"] == 5 and entry["excluded"] == []


def test_dicomdir_alone_leads_to_files_elsewhere_on_the_medium(tmp_path):
    series = ct_series(5)
    dicomdir = export(series, tmp_path / "cd")
    expected = load_series(write(series, tmp_path / "plain")).array
    volume = load_series([dicomdir])  # only the DICOMDIR is given; its files are three folders down
    assert len(volume.slice_sources) == 5 and volume.excluded == []
    np.testing.assert_array_equal(volume.array, expected)
    both = load_series([tmp_path / "cd", dicomdir])  # the folder and the DICOMDIR naming the same files
    assert both.excluded == [] and both.array.shape == expected.shape


def test_medium_mounted_lower_case_and_a_missing_file(tmp_path):
    """ISO 9660 names come back lower case on many mounts; a damaged export misses a file: it is named."""
    series = ct_series(5)
    dicomdir = export(series, tmp_path / "cd")
    for path in sorted((tmp_path / "cd").rglob("*"), key=lambda p: -len(p.parts)):  # deepest first
        if path != dicomdir:
            path.rename(path.with_name(path.name.lower()))
    directory = read_directory(dicomdir)
    assert len(directory.files) == 5 and directory.missing == []
    directory.files[2].unlink()
    directory = read_directory(dicomdir)
    assert len(directory.files) == 4 and len(directory.missing) == 1
    volume = load_series([dicomdir])
    assert len({s.sop_instance_uid for s in volume.slice_sources}) == 4  # the gap is resampled over
    (gone,) = volume.excluded
    assert gone.reason == "referenced by the DICOMDIR but not on the medium" and directory.missing[0] in gone.source
    text = cli("inspect", str(tmp_path / "cd")).stdout
    assert "DICOMDIR (directory of 5 referenced files)" in text and "referenced but not on the medium" in text


def test_dcmmkdir_dicomdir(tmp_path):
    """A DICOMDIR written by dcmtk's dcmmkdir over ISO 9660-named files in nested folders."""
    series = ct_series(4)
    root = tmp_path / "usb"
    folder = root / "DICOM" / "ST1" / "SE1"
    write(series, folder, names=[f"IM{i:06d}" for i in range(4)])
    proc = subprocess.run([dcmtk("dcmmkdir"), "+r", "+id", str(root), "--output-file", str(root / "DICOMDIR"),
                           "DICOM"], capture_output=True, text=True, timeout=120, cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert len(read_directory(root / "DICOMDIR").files) == 4
    volume = load_series([root / "DICOMDIR"])
    assert len(volume.slice_sources) == 4 and volume.excluded == []
    text = cli("inspect", str(root)).stdout
    assert "DICOMDIR (directory of 4 referenced files)" in text and "slices used     4" in text


def test_predict_infer_and_training_loader_follow_a_dicomdir(tmp_path, validate_dicom):
    """A phantom case exported as a CD: `predict` and `infer` on its root folder, and the training loader
    on a case folder holding the export and its landmarks.json, find the same series as the plain files."""
    from pacs_landmarks.inference.data import load_case
    from pacs_landmarks.landmark_sets import landmark_names

    proc = cli("phantom", str(tmp_path / "plain"), "--count", "1", "--seed", "7101", "--size", "128",
               "--pixel-spacing", "2.0", "--slice-thickness", "3.0")
    assert proc.returncode == 0, proc.stderr
    (case,) = [p for p in (tmp_path / "plain").iterdir() if p.is_dir()]
    files = sorted(case.glob("*.dcm"))
    cd = tmp_path / "cd" / case.name
    export([pydicom.dcmread(f) for f in files], cd)
    shutil.copy(case / "landmarks.json", cd / "landmarks.json")

    plain = json.loads(cli("predict", str(case), "--json").stdout)
    proc = cli("predict", str(cd), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["landmarks"] == plain["landmarks"]

    proc = cli("infer", str(cd), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    outputs = sorted((tmp_path / "out").glob("*.dcm"))
    assert outputs
    for path in outputs:
        validate_dicom(path)

    a = load_case(case, landmark_names(), cache_dir=tmp_path / "cache-a")
    b = load_case(cd, landmark_names(), cache_dir=tmp_path / "cache-b")
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_array_equal(a.landmarks, b.landmarks)
