"""2D cases, training and evaluation of the cephalogram cascade (tiny synthetic cephalograms made here)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from pacs_landmarks.inference.data import DataError, load_case
from pacs_landmarks.landmark_sets import landmark_names

NAMES = landmark_names("ceph19")


def _cli(*args, timeout=600):
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "pacs_landmarks.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def tiny_cephs(tmp_path_factory):
    """Three small synthetic cephalograms (0.4 mm detector pixels, coarse projection grid), one facing left;
    the third with two annotators (senior = truth, junior = truth + 1 mm along x)."""
    from pacs_landmarks.inference.ceph_phantom import render_ceph, write_ceph

    out = tmp_path_factory.mktemp("cephs")
    for k, seed in enumerate((27960, 27961, 27962)):
        image = render_ceph(seed, imager_pixel_spacing=0.4, grid_mm=0.8, slab_mm=2.0)
        write_ceph(image, out / f"ceph-{k}", facing="left" if k == 1 else "right")
    doc = json.loads((out / "ceph-2" / "landmarks.json").read_text())
    ps = doc["pixel_spacing_mm"][1]
    junior = [{"name": it["name"], "position_px": [it["position_px"][0] + 1.0 / ps, it["position_px"][1]]}
              for it in doc["landmarks"]]
    junior[0]["position_px"] = None  # a point one annotator did not place
    doc["annotators"] = {"senior": doc["landmarks"], "junior": junior}
    (out / "ceph-2" / "landmarks.json").write_text(json.dumps(doc))
    return out


def test_2d_case_is_face_right_in_mm(tiny_cephs):
    right = load_case(tiny_cephs / "ceph-0", NAMES, "ceph19")
    left = load_case(tiny_cephs / "ceph-1", NAMES, "ceph19")
    assert right.dim == 2 and right.landmarks.shape == (19, 2) and right.affine.shape == (3, 3)
    doc = json.loads((tiny_cephs / "ceph-1" / "landmarks.json").read_text())
    ps = doc["pixel_spacing_mm"]
    width = left.array.shape[1]
    sella_px = doc["landmarks"][0]["position_px"]  # facing left: in the image's own (mirrored) columns
    assert left.landmarks[0] == pytest.approx([(width - sella_px[0]) * ps[1], sella_px[1] * ps[0]])
    # face right after loading: the nasion lies right of (anterior to) the sella on both
    n = NAMES.index("Nasion")
    assert left.landmarks[n, 0] > left.landmarks[0, 0] and right.landmarks[n, 0] > right.landmarks[0, 0]


def test_2d_case_faces_the_way_its_reference_points_say_whatever_the_header(tiny_cephs, tmp_path, caplog):
    """A clinic's image with no Patient Orientation, or the wrong one, still trains the right way round: the face
    landmarks lie in front of Sella, Porion and Articulare."""
    import pydicom

    from pacs_landmarks.inference.data import facing_of_points

    good = load_case(tiny_cephs / "ceph-1", NAMES, "ceph19")  # facing left, header says so
    for name, orientation in (("none", None), ("wrong", ["A", "F"])):
        case = tmp_path / name
        shutil.copytree(tiny_cephs / "ceph-1", case)
        ds = pydicom.dcmread(case / "image.dcm")
        if orientation is None:
            del ds.PatientOrientation
        else:
            ds.PatientOrientation = orientation
        ds.save_as(case / "image.dcm")
        with caplog.at_level("WARNING"):
            loaded = load_case(case, NAMES, "ceph19")
        np.testing.assert_allclose(loaded.landmarks, good.landmarks)
        np.testing.assert_array_equal(loaded.array, good.array)
        assert ("reference points face left" in caplog.text) == (name == "wrong")
    points = np.full((len(NAMES), 2), np.nan)
    assert facing_of_points(NAMES, points, 1000) is None  # nothing to tell by
    points[NAMES.index("Sella")] = (300, 400)
    points[NAMES.index("Nasion")] = (330, 380)  # 3 % of the width: too close to tell
    assert facing_of_points(NAMES, points, 1000) is None
    points[NAMES.index("Nasion")] = (700, 380)
    assert facing_of_points(NAMES, points, 1000) == "right"
    points[:, 0] = 1000 - points[:, 0]
    assert facing_of_points(NAMES, points, 1000) == "left"


def test_2d_case_truth_from_an_annotator_or_their_mean(tiny_cephs):
    senior = load_case(tiny_cephs / "ceph-2", NAMES, "ceph19", truth="senior")
    junior = load_case(tiny_cephs / "ceph-2", NAMES, "ceph19", truth="junior")
    mean = load_case(tiny_cephs / "ceph-2", NAMES, "ceph19", truth="mean")
    assert np.isnan(junior.landmarks[0]).all() and np.isfinite(senior.landmarks[0]).all()
    assert junior.landmarks[1, 0] - senior.landmarks[1, 0] == pytest.approx(1.0, abs=1e-3)
    assert mean.landmarks[1, 0] - senior.landmarks[1, 0] == pytest.approx(0.5, abs=1e-3)
    assert mean.landmarks[0] == pytest.approx(senior.landmarks[0])  # only the senior placed it
    assert set(senior.annotators) == {"senior", "junior"}
    with pytest.raises(DataError, match="no annotator 'resident'"):
        load_case(tiny_cephs / "ceph-2", NAMES, "ceph19", truth="resident")


def _broken(tiny_cephs, tmp_path, edit):
    case = tmp_path / "bad"
    shutil.copytree(tiny_cephs / "ceph-0", case)
    doc = json.loads((case / "landmarks.json").read_text())
    edit(doc)
    (case / "landmarks.json").write_text(json.dumps(doc))
    return case


def test_2d_case_with_an_unknown_landmark_is_refused(tiny_cephs, tmp_path):
    case = _broken(tiny_cephs, tmp_path, lambda d: d["landmarks"].append({"name": "Basion", "position_px": [5, 5]}))
    with pytest.raises(DataError, match="'Basion' is not in landmark set 'ceph19'"):
        load_case(case, NAMES, "ceph19")


def test_2d_case_with_a_point_outside_the_image_is_refused(tiny_cephs, tmp_path):
    def edit(d):
        d["landmarks"][3]["position_px"] = [d["columns"] + 40.0, 10.0]

    with pytest.raises(DataError, match=r"Porion at \(\d+(\.\d+)?, 10\) px lies outside the \d+ x \d+ image"):
        load_case(_broken(tiny_cephs, tmp_path, edit), NAMES, "ceph19")


def test_2d_case_null_points_are_skipped(tiny_cephs, tmp_path):
    def edit(d):
        d["landmarks"][5]["position_px"] = None

    case = load_case(_broken(tiny_cephs, tmp_path, edit), NAMES, "ceph19")
    assert np.isnan(case.landmarks[5]).all() and np.isfinite(np.delete(case.landmarks, 5, 0)).all()


def test_train_one_epoch_on_cephs_writes_a_2d_model_and_evaluate_prints_isbi_metrics(tiny_cephs, tmp_path):
    from pacs_landmarks.inference.model import LandmarkModel

    model = tmp_path / "ceph.pt"
    proc = _cli("train", "--data", str(tiny_cephs), "--out", str(model), "--epochs", "1", "--batch-cases", "2",
                "--val-cases", "0", "--threads", "1", "--truth", "mean", "-q")
    assert proc.returncode == 0, proc.stderr
    m = LandmarkModel.load(model, device="cpu")
    assert (m.dim, m.landmark_set, m.metadata["intensity"]["unit"]) == (2, "ceph19", "xray")
    assert m.metadata["training"]["data"].startswith("synthetic") and "not for clinical use" in m.metadata["description"]
    assert m.metadata["training"]["cases"] == 3 and m.metadata["training"]["epochs_done"] == 1
    proc = _cli("evaluate", "--data", str(tiny_cephs), "--model", str(model), "-q", "--json", str(tmp_path / "r.json"),
                "--plots", str(tmp_path / "plots"))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "SDR 2 mm % | SDR 2.5 mm % | SDR 3 mm % | SDR 4 mm %" in out and "mean abs err x / y (mm)" in out
    for stage in ("| global |", "| local |", "| fine |", "| Sella |", "| Articulare |"):
        assert stage in out
    assert "| model vs junior |" in out and "| model vs senior |" in out
    result = json.loads((tmp_path / "r.json").read_text())
    inter = result["inter_observer"]["junior vs senior"]
    assert inter["n"] == 18 and inter["mre"] == pytest.approx(1.0, abs=1e-3)
    # each image is read both ways round, as without Patient Orientation, and wrong readings are counted
    assert 0 <= result["status"]["facing_wrong"] <= 3 and "| read facing the wrong way" in out
    assert (tmp_path / "plots" / "overall.png").is_file()


def test_train_with_a_3d_set_on_cephs_is_a_clear_error(tiny_cephs, tmp_path):
    proc = _cli("train", "--data", str(tiny_cephs), "--out", str(tmp_path / "m.pt"), "--epochs", "1",
                "--landmark-set", "craniofacial16", "-q")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "craniofacial16" in proc.stderr


def test_predict_cli_on_a_cephalogram(tiny_cephs):
    image = tiny_cephs / "ceph-1" / "image.dcm"  # facing left
    proc = _cli("predict", str(image), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["landmark_set"] == "ceph19" and doc["facing"] == "left"
    assert "Patient Orientation P" in doc["facing_source"]
    truth = json.loads((tiny_cephs / "ceph-1" / "landmarks.json").read_text())
    assert doc["pixel_spacing_mm"] == pytest.approx(truth["pixel_spacing_mm"], rel=1e-4)
    assert "Magnification" in doc["pixel_spacing_source"]
    assert [lm["name"] for lm in doc["landmarks"]] == NAMES
    for lm in doc["landmarks"]:
        assert len(lm["stage_positions_px"]) == 3
        if lm["position_px"] is not None:
            c, r = lm["position_px"]
            assert 0 <= c <= truth["columns"] and 0 <= r <= truth["rows"]
            assert lm["position_mm"] == pytest.approx([c * doc["pixel_spacing_mm"][1], r * doc["pixel_spacing_mm"][0]],
                                                      abs=1e-3)
    proc = _cli("predict", str(image), "--pixel-spacing", "0.25")
    assert proc.returncode == 0, proc.stderr
    assert "0.2500 x 0.2500 mm" in proc.stdout and "| Sella" not in proc.stdout
    assert "Sella" in proc.stdout and "column" in proc.stdout
