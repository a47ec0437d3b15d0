"""`pacs-landmarks import`: ISBI 2015, Aariz and LabelMe layouts written by the tests, through the real CLI."""
from __future__ import annotations

import base64
import csv
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from pacs_landmarks.dicom.xray import load_xray
from pacs_landmarks.landmark_sets import landmark_names

EXE = str(Path(sys.executable).parent / "pacs-landmarks")
ROWS, COLS = 60, 80


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, "import", *map(str, args)], capture_output=True, text=True, timeout=120)


def image(seed: int, dtype=np.uint8) -> np.ndarray:
    top = 255 if dtype == np.uint8 else 4000
    return np.random.default_rng(seed).integers(0, top, (ROWS, COLS)).astype(dtype)


def points(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(1, COLS - 2, n), rng.integers(1, ROWS - 2, n)], 1).astype(float)


def by_name(entries):
    return {e["name"]: e["position_px"] for e in entries}


# ------------------------------------------------------------------------------------------------ ISBI 2015


def make_isbi(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    (root / "RawImage" / "TrainingData").mkdir(parents=True)
    img = image(1)
    cv2.imwrite(str(root / "RawImage" / "TrainingData" / "001.bmp"), img)
    senior, junior = points(19, 2), points(19, 3)
    for who, pts in (("senior", senior), ("junior", junior)):
        folder = root / "AnnotationsByMD" / f"400_{who}"
        folder.mkdir(parents=True)
        lines = [f"{int(x)},{int(y)}" for x, y in pts] + ["1", "2", "3"]  # classification lines after the points
        (folder / "001.txt").write_text("\n".join(lines) + "\n")
    return img, senior, junior


def test_isbi2015(tmp_path, validate_dicom):
    img, senior, junior = make_isbi(tmp_path / "isbi")
    proc = run("isbi2015", tmp_path / "isbi", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    case = tmp_path / "out" / "001"
    validate_dicom(case / "image.dcm")
    doc = json.loads((case / "landmarks.json").read_text())
    assert doc["landmark_set"] == "ceph19" and doc["pixel_spacing_mm"] == [0.1, 0.1]
    assert doc["rows"] == ROWS and doc["columns"] == COLS and doc["truth"] == "mean"
    names = landmark_names("ceph19")
    got = by_name(doc["landmarks"])
    for k, name in enumerate(names):  # pixel indices -> SCOORD (+0.5), mean of the two annotators
        assert got[name] == pytest.approx(list((senior[k] + junior[k]) / 2 + 0.5))
    assert by_name(doc["annotators"]["senior"])["Sella"] == pytest.approx(list(senior[0] + 0.5))
    x = load_xray(case / "image.dcm")
    assert x.spacing.mm == (0.1, 0.1) and x.spacing.plane == "detector"
    assert x.sop_instance_uid == doc["sop_instance_uid"]
    np.testing.assert_array_equal(pydicom.dcmread(case / "image.dcm").pixel_array, img)
    # Existing cases are not replaced without --overwrite; one annotator can be the truth.
    again = run("isbi2015", tmp_path / "isbi", tmp_path / "out", "--truth", "senior")
    assert again.returncode == 2 and "--overwrite" in again.stderr
    again = run("isbi2015", tmp_path / "isbi", tmp_path / "out", "--truth", "senior", "--overwrite",
                "--pixel-spacing", "0.125")
    assert again.returncode == 0, again.stderr
    doc = json.loads((case / "landmarks.json").read_text())
    assert by_name(doc["landmarks"])["Nasion"] == pytest.approx(list(senior[1] + 0.5))
    assert doc["pixel_spacing_mm"] == [0.125, 0.125]


def test_isbi2015_facing_follows_the_points(tmp_path):
    """The images' facing (their Patient Orientation) comes from each case's points unless --facing says."""
    names = landmark_names("ceph19")
    (tmp_path / "isbi" / "RawImage" / "TrainingData").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "isbi" / "RawImage" / "TrainingData" / "001.bmp"), image(1))
    pts = np.tile([60.0, 30.0], (19, 1))  # every face landmark in the left part of the image ...
    for back in ("Sella", "Porion", "Articulare", "Gonion", "Posterior nasal spine"):
        pts[names.index(back)] = (15.0, 30.0)  # ... and the back of the head on the right: facing left
    pts[:, 0] = COLS - pts[:, 0]
    for who in ("senior", "junior"):
        folder = tmp_path / "isbi" / "AnnotationsByMD" / f"400_{who}"
        folder.mkdir(parents=True)
        (folder / "001.txt").write_text("\n".join(f"{int(x)},{int(y)}" for x, y in pts) + "\n")
    for args, want, orientation in (((), "left", "P"), (("--facing", "right", "--overwrite"), "right", "A")):
        proc = run("isbi2015", tmp_path / "isbi", tmp_path / "out", *args)
        assert proc.returncode == 0, proc.stderr
        doc = json.loads((tmp_path / "out" / "001" / "landmarks.json").read_text())
        assert doc["facing"] == want
        assert pydicom.dcmread(tmp_path / "out" / "001" / "image.dcm").PatientOrientation[0] == orientation


def test_isbi2015_bad_annotation(tmp_path):
    make_isbi(tmp_path / "isbi")
    bad = tmp_path / "isbi" / "AnnotationsByMD" / "400_junior" / "001.txt"
    bad.write_text("\n".join(bad.read_text().splitlines()[:5]))
    proc = run("isbi2015", tmp_path / "isbi", tmp_path / "out")
    assert proc.returncode == 2 and "001.txt: line 6" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written


# ------------------------------------------------------------------------------------------------ Aariz

AARIZ_TITLES = [
    "A-point", "Anterior Nasal Spine", "B-point", "Menton", "Nasion", "Orbitale", "Pogonion",
    "Posterior Nasal Spine", "Pronasale", "Ramus", "Sella", "Articulare", "Condylion", "Gnathion", "Gonion",
    "Porion", "Lower 2nd PM Cusp Tip", "Lower Incisor Tip", "Lower Molar Cusp Tip", "Upper 2nd PM Cusp Tip",
    "Upper Incisor Apex", "Upper Incisor Tip", "Upper Molar Cusp Tip", "Lower Incisor Apex", "Labrale inferius",
    "Labrale superius", "Soft Tissue Nasion", "Soft Tissue Pogonion", "Subnasale",
]


def make_aariz(root: Path, *, pixel_size="0.127") -> dict:
    split = root / "valid"
    (split / "Cephalograms").mkdir(parents=True)
    cv2.imwrite(str(split / "Cephalograms" / "cks2ip8fq.png"), image(4, np.uint16))
    truth = {}
    for who, seed in (("Senior", 5), ("Junior", 6)):
        pts = points(29, seed)
        truth[who] = dict(zip(AARIZ_TITLES, pts))
        order = list(range(29)) if who == "Senior" else list(range(28, -1, -1))  # order must not matter
        folder = split / "Annotations" / "Cephalometric Landmarks" / f"{who} Orthodontists"
        folder.mkdir(parents=True)
        doc = {"ceph_id": "cks2ip8fq", "landmarks": [
            {"landmark_id": f"id{k}", "title": AARIZ_TITLES[k], "symbol": "?",
             "value": {"x": int(pts[k][0]), "y": int(pts[k][1])}} for k in order]}
        (folder / "cks2ip8fq.json").write_text(json.dumps(doc))
    with (root / "cephalogram_machine_mappings.csv").open("w", encoding="utf-8-sig", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["cephalogram_id", "machine", "pixel_size", "image_format", "mode"])
        w.writerow(["cks2ip8fq", "Synthetic", pixel_size, "png", "Valid"])
    return truth


@pytest.mark.parametrize("set_name,count", [("aariz29", 29), ("ceph19", 19)])
def test_aariz(tmp_path, validate_dicom, set_name, count):
    truth = make_aariz(tmp_path / "aariz")
    proc = run("aariz", tmp_path / "aariz", tmp_path / "out", "--set", set_name)
    assert proc.returncode == 0, proc.stderr
    case = tmp_path / "out" / "cks2ip8fq"
    validate_dicom(case / "image.dcm")
    doc = json.loads((case / "landmarks.json").read_text())
    assert doc["landmark_set"] == set_name and len(doc["landmarks"]) == count
    assert doc["pixel_spacing_mm"] == [0.127, 0.127]
    got = by_name(doc["landmarks"])
    # Titles map onto the set's names (Labrale superius -> Upper lip, A-point -> A point).
    want = (truth["Senior"]["Labrale superius"] + truth["Junior"]["Labrale superius"]) / 2 + 0.5
    assert got["Upper lip"] == pytest.approx(list(want))
    assert by_name(doc["annotators"]["junior"])["A point"] == pytest.approx(list(truth["Junior"]["A-point"] + 0.5))
    assert pydicom.dcmread(case / "image.dcm").BitsAllocated == 16


def test_aariz_missing_pixel_size(tmp_path):
    make_aariz(tmp_path / "aariz")
    csv_path = tmp_path / "aariz" / "cephalogram_machine_mappings.csv"
    csv_path.write_text("cephalogram_id,machine,pixel_size\nother,x,0.1\n")
    proc = run("aariz", tmp_path / "aariz", tmp_path / "out")
    assert proc.returncode == 2 and "no pixel size for cks2ip8fq" in proc.stderr


# ------------------------------------------------------------------------------------------------ LabelMe


def labelme_doc(shapes: dict, image_path="whatever.png", embed: bytes | None = None) -> dict:
    return {"version": "5.2.1", "imagePath": image_path, "imageHeight": ROWS, "imageWidth": COLS,
            "imageData": base64.b64encode(embed).decode() if embed else None,
            "shapes": [{"label": k, "points": [list(v)], "shape_type": "point", "group_id": None, "flags": {}}
                       for k, v in shapes.items()]}


def test_labelme_two_annotators_and_label_map(tmp_path, validate_dicom):
    src = tmp_path / "lm"
    (src / "images").mkdir(parents=True)
    img = image(7)
    cv2.imwrite(str(src / "images" / "patient7.png"), img)
    a = {"l1": (10.25, 20.5), "l2": (30.0, 5.0), "Menton": (40.0, 50.0)}
    b = {"l1": (12.25, 22.5), "l2": (32.0, 7.0)}
    for who, shapes in (("ann_a", a), ("ann_b", b)):
        (tmp_path / who).mkdir()
        (tmp_path / who / "patient7.json").write_text(json.dumps(labelme_doc(shapes)))
    proc = run("labelme", src, tmp_path / "out", "--label-map", "l1=Sella,l2=N", "--pixel-spacing", "0.15",
               "--annotator", f"A={tmp_path / 'ann_a'}", "--annotator", f"B={tmp_path / 'ann_b'}")
    assert proc.returncode == 0, proc.stderr
    case = tmp_path / "out" / "patient7"
    validate_dicom(case / "image.dcm")
    doc = json.loads((case / "landmarks.json").read_text())
    got = by_name(doc["landmarks"])
    assert got["Sella"] == pytest.approx([11.25, 21.5])  # corner convention kept, mean of A and B
    assert got["Nasion"] == pytest.approx([31.0, 6.0])
    assert got["Menton"] == pytest.approx([40.0, 50.0])  # only A placed it
    assert got["Pogonion"] is None and by_name(doc["annotators"]["B"])["Menton"] is None
    assert sorted(doc["annotators"]) == ["A", "B"] and doc["pixel_spacing_mm"] == [0.15, 0.15]
    np.testing.assert_array_equal(pydicom.dcmread(case / "image.dcm").pixel_array, img)


def test_labelme_embedded_image_and_errors(tmp_path):
    src = tmp_path / "lm"
    src.mkdir()
    ok, png = cv2.imencode(".png", image(8))
    (src / "only-json.json").write_text(json.dumps(labelme_doc({"Sella": (5.0, 6.0)}, embed=png.tobytes())))
    proc = run("labelme", src, tmp_path / "out", "--pixel-spacing", "0.1")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "out" / "only-json" / "landmarks.json").read_text())
    assert by_name(doc["landmarks"])["Sella"] == [5.0, 6.0]
    # No spacing, unknown labels, a bad map: clear errors, exit status 2.
    assert "--pixel-spacing" in run("labelme", src, tmp_path / "o2").stderr
    (src / "other.json").write_text(json.dumps(labelme_doc({"p17": (1.0, 1.0)}, embed=png.tobytes())))
    proc = run("labelme", src, tmp_path / "o3", "--pixel-spacing", "0.1")
    assert proc.returncode == 2 and "'p17'" in proc.stderr and "--label-map" in proc.stderr
    proc = run("labelme", src, tmp_path / "o4", "--pixel-spacing", "0.1", "--label-map", "p17=Basion")
    assert proc.returncode == 2 and "Basion" in proc.stderr
    assert not (tmp_path / "o3").exists() and not (tmp_path / "o4").exists()


def test_labelme_skip_bad_leaves_out_bad_cases_and_imports_the_rest(tmp_path):
    """Real annotation sets have slips (a label clicked twice, a point off the image, an unreadable image): the
    first stops the import and names --skip-bad; with it each bad case is listed and the rest imported."""
    src = tmp_path / "lm"
    src.mkdir()
    ok, png = cv2.imencode(".png", image(9))
    good = labelme_doc({"Sella": (5.0, 6.0), "Nasion": (50.0, 8.0)}, embed=png.tobytes())
    (src / "good.json").write_text(json.dumps(good))
    twice = labelme_doc({"Sella": (5.0, 6.0)}, embed=png.tobytes())
    twice["shapes"].append(dict(twice["shapes"][0], points=[[7.0, 8.0]]))
    (src / "twice.json").write_text(json.dumps(twice))
    (src / "outside.json").write_text(json.dumps(labelme_doc({"Sella": (COLS + 5.0, 6.0)}, embed=png.tobytes())))
    (src / "broken.json").write_text(json.dumps(labelme_doc({"Sella": (5.0, 6.0)}, embed=b"not a png")))
    proc = run("labelme", src, tmp_path / "out", "--pixel-spacing", "0.1")
    assert proc.returncode == 2 and "two points for Sella" in proc.stderr and "--skip-bad" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written before every annotation file was read
    proc = run("labelme", src, tmp_path / "out", "--pixel-spacing", "0.1", "--skip-bad")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good"]
    skipped = [ln for ln in proc.stderr.splitlines() if ln.startswith("skipped: ")]
    assert len(skipped) == 3, proc.stderr
    assert any("twice.json: two points for Sella" in ln for ln in skipped)
    assert any("outside" in ln and "lies outside" in ln for ln in skipped)
    assert any("broken" in ln and "not an image" in ln for ln in skipped)
    assert "imported 1 image(s)" in proc.stdout and "3 left out" in proc.stdout
