"""``review`` (PNG per landmark + index.html) and 3D Slicer markups truth (RAS / LPS, label map, bad truth)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pacs_landmarks.inference import phantom as ph
from pacs_landmarks.inference.data import DataError, load_case, load_cases, read_markups
from pacs_landmarks.landmark_sets import landmark_names

CLI = str(Path(sys.executable).with_name("pacs-landmarks"))
NAMES = landmark_names()


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """A small phantom series (no truth file in the folder: the tests add their own)."""
    root = tmp_path_factory.mktemp("rv")
    case = ph.make_case(21, rotation_deg=(0, 0, 0))
    out = ph.write_case(case, root / "series", size=96, slice_thickness=3.0)
    truth = json.loads((out / "landmarks.json").read_text())
    (out / "landmarks.json").unlink()
    return out, {d["name"]: np.asarray(d["position_lps_mm"]) for d in truth["landmarks"]}, truth


def _markups(points: dict[str, np.ndarray], system: str, labels=None) -> dict:
    flip = np.array([-1.0, -1.0, 1.0]) if system == "RAS" else np.ones(3)
    labels = labels or {}
    return {"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/"
                       "Schema/markups-schema-v1.0.3.json#",
            "markups": [{"type": "Fiducial", "coordinateSystem": system, "coordinateUnits": "mm",
                         "controlPoints": [{"id": str(i), "label": labels.get(n, n),
                                            "position": (p * flip).tolist(), "positionStatus": "defined"}
                                           for i, (n, p) in enumerate(points.items())]}]}


def _case_with_markups(tmp_path, series, doc, name="c"):
    src, _, _ = series
    case = tmp_path / name
    case.mkdir()
    for f in src.glob("*.dcm"):
        (case / f.name).symlink_to(f)
    (case / "truth.mrk.json").write_text(json.dumps(doc))
    return case


def test_markups_ras_and_lps_give_the_same_truth(tmp_path, series):
    _, truth, _ = series
    got = {}
    for system in ("LPS", "RAS"):
        c = load_case(_case_with_markups(tmp_path, series, _markups(truth, system), system), NAMES)
        got[system] = c.landmarks
    assert np.allclose(got["LPS"], got["RAS"])
    assert np.allclose(got["LPS"], np.stack([truth[n] for n in NAMES]))


def test_markups_labels_by_abbreviation_and_label_map(tmp_path, series):
    _, truth, _ = series
    labels = {"Sella": "S", "Nasion": "N", "Menton": "my-menton"}
    path = tmp_path / "m.mrk.json"
    path.write_text(json.dumps(_markups(truth, "RAS", labels)))
    with pytest.raises(DataError, match="my-menton"):
        read_markups(path, NAMES)
    t = read_markups(path, NAMES, label_map={"my-menton": "Menton"})
    assert np.allclose(t[NAMES.index("Menton")], truth["Menton"])
    with pytest.raises(DataError, match="not a landmark"):
        read_markups(path, NAMES, label_map={"my-menton": "Chin"})


def test_bad_markups_truth_is_a_clear_per_case_error(tmp_path, series):
    _, truth, _ = series
    root = tmp_path / "data"
    root.mkdir()
    _case_with_markups(root, series, _markups(truth, "LPS"), "good")
    far = dict(truth)
    far["Nasion"] = truth["Nasion"] + [0, 0, 500.0]  # another frame of reference / series
    _case_with_markups(root, series, _markups(far, "LPS"), "outside")
    _case_with_markups(root, series, _markups({"Glabella": truth["Nasion"]}, "LPS"), "unknown")
    with pytest.raises(DataError) as err:
        load_cases(root, NAMES, progress=False)
    text = str(err.value)
    assert "2 of 3 case(s)" in text and "outside" in text and "Glabella" in text
    # the CLI says the same in one line per case, no traceback
    r = subprocess.run([CLI, "evaluate", "--data", str(root), "-q"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "Glabella" in r.stderr


def test_evaluate_takes_markups_cases_train_reads_them_the_same_way(tmp_path, series):
    _, truth, _ = series
    root = tmp_path / "mk"
    root.mkdir()
    _case_with_markups(root, series, _markups(truth, "RAS"), "a")
    _case_with_markups(root, series, _markups(truth, "LPS"), "b")
    r = subprocess.run([CLI, "evaluate", "--data", str(root), "-q", "--json", str(tmp_path / "e.json")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "e.json").read_text())
    errs = np.asarray(res["errors"], float)[:, -1]
    assert np.allclose(errs[0], errs[1], atol=1e-6)  # same truth from RAS and LPS files


def test_review_from_an_sr(tmp_path, series, validate_dicom):
    import pydicom

    from pacs_landmarks.dicom.series import load_series
    from pacs_landmarks.inference.landmark import OUTSIDE_FIELD_OF_VIEW, Landmark
    from pacs_landmarks.review import plane
    from pacs_landmarks.sr_templates.common import Algorithm
    from pacs_landmarks.sr_templates.landmark_sr import build_landmark_sr

    src, truth, _ = series
    volume = load_series(sorted(src.glob("*.dcm")))
    lms = [Landmark(n, tuple(truth[n]), 0.9) if n != "Menton" else
           Landmark(n, None, 0.1, status=OUTSIDE_FIELD_OF_VIEW, reason="not in the scanned volume") for n in NAMES]
    sr = build_landmark_sr(volume, lms, Algorithm("reader", "1"))
    sr_path = tmp_path / "sr.dcm"
    sr.save_as(sr_path, enforce_file_format=True)
    out = tmp_path / "review"
    r = subprocess.run([CLI, "review", str(src), "--sr", str(sr_path), "--out", str(out)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "outside_field_of_view" in r.stdout
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 16
    index = (out / "index.html").read_text()
    assert all(n in index for n in NAMES) and "outside field of view" in index

    # the cross-hair is drawn on the PNG (lime for a found point) and the planes pass through the point
    from PIL import Image

    img = np.asarray(Image.open(out / "Nasion.png").convert("RGB")).astype(int)
    lime = (img[..., 1] > 200) & (img[..., 0] < 80) & (img[..., 2] < 80)
    assert lime.sum() > 100
    p = truth["Sella"]
    centre = plane(volume, p, np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), field_mm=11, pixel_mm=1.0)[5, 5]
    from scipy.ndimage import map_coordinates

    direct = map_coordinates(volume.array, volume.lps_to_index(p[None]).T, order=1)[0]
    assert centre == pytest.approx(direct, abs=1e-3)

    # an SR in another frame of reference is refused with a clear message
    ds = pydicom.dcmread(sr_path)
    ds2 = build_landmark_sr(volume, lms, Algorithm("reader", "1"))
    for item in _walk(ds2.ContentSequence):
        if item.get("ValueType") == "SCOORD3D":
            item.ReferencedFrameOfReferenceUID = "1.2.3.4"
    ds2.save_as(tmp_path / "other.dcm", enforce_file_format=True)
    r = subprocess.run([CLI, "review", str(src), "--sr", str(tmp_path / "other.dcm"), "--out", str(tmp_path / "x")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "frame of reference" in r.stderr
    assert ds.SOPClassUID


def _walk(items):
    for it in items or []:
        yield it
        yield from _walk(it.get("ContentSequence"))
