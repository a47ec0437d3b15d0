"""Synthetic cephalograms: geometry, landmarks, image content, DICOM, CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pacs_landmarks.dicom.xray import load_xray
from pacs_landmarks.inference.ceph_phantom import NAMES, render_ceph, write_ceph

FAST = dict(grid_mm=0.8, slab_mm=2.0, pose_deg=[0.0, 0.0, 0.0], collimation_mm=[10.0, 6.0, 4.0, 3.0])  # coarse sampling: quick, same geometry


@pytest.fixture(scope="module")
def ceph():
    return render_ceph(5, imager_pixel_spacing=0.4, **FAST)


def test_landmarks_inside_the_exposed_field(ceph):
    rows, cols = ceph.pixels.shape
    t, b, back, front = (v / ceph.pixel_spacing_mm for v in ceph.params["collimation_mm"])
    assert list(ceph.landmarks_px) == list(NAMES)
    for name, (c, r) in ceph.landmarks_px.items():
        assert back < c < cols - front and t < r < rows - b, name


def test_midsagittal_distances_are_true_size(ceph):
    """Sella and nasion lie in the mid-sagittal plane: with the magnification taken out (the pixel spacing at
    that plane) their distance is the 3D one; bilateral points show the double contour."""
    from pacs_landmarks.inference.ceph_phantom import ceph_case

    case = ceph_case(5)
    H = case.head_landmarks
    s, n = (np.array(ceph.landmarks_px[k]) for k in ("Sella", "Nasion"))
    two_d = np.linalg.norm(n - s) * ceph.pixel_spacing_mm
    three_d = np.linalg.norm(H["Nasion"][1:] - H["Sella"][1:])  # both at x ~ 0: the y-z distance
    assert abs(H["Nasion"][0]) < 0.5 and abs(H["Sella"][0]) < 0.5
    assert two_d == pytest.approx(three_d, abs=0.05)
    # The right and left gonion project apart (different magnification); the landmark is their midpoint.
    g = ceph.geometry
    right, left = (g.to_midplane(H[k]) for k in ("Gonion R", "Gonion L"))
    assert np.linalg.norm(right - left) > 1.0
    mid = (right + left) / 2
    s_mid = g.to_midplane(H["Sella"])
    # Columns run anterior (-y), rows inferior (-z): offsets from sella in pixels.
    expected = np.array([s_mid[0] - mid[0], s_mid[1] - mid[1]]) / ceph.pixel_spacing_mm
    got = np.array(ceph.landmarks_px["Gonion"]) - np.array(ceph.landmarks_px["Sella"])
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_image_content(ceph):
    img = ceph.pixels.astype(float) / ((1 << ceph.bits_stored) - 1)
    ps = ceph.pixel_spacing_mm

    def around(name, dc=0.0, dr=0.0, half=2):
        c, r = ceph.landmarks_px[name]
        c, r = int(c + dc / ps), int(r + dr / ps)
        return img[r - half:r + half + 1, c - half:c + half + 1].mean()

    # Air in front of the face is dark, bone bright, soft tissue between; unexposed border white.
    air = around("Soft tissue pogonion", dc=+15.0)
    soft = around("Upper lip", dc=-3.0)
    bone = around("Pogonion", dc=-4.0)
    assert air < soft < bone
    t = int(ceph.params["collimation_mm"][0] / ps)
    assert t >= 20 and img[: t - 1].mean() > 0.95


def test_written_dx_and_landmarks_json(ceph, tmp_path, validate_dicom):
    path = write_ceph(ceph, tmp_path / "c")
    validate_dicom(path)
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1" and ds.PresentationIntentType == "FOR PRESENTATION"
    assert ds.PositionerType == "CEPHALOSTAT" and ds.ViewPosition == "LL"
    assert float(ds.EstimatedRadiographicMagnificationFactor) == pytest.approx(ceph.geometry.magnification, rel=1e-4)
    doc = json.loads((tmp_path / "c" / "landmarks.json").read_text())
    assert doc["landmark_set"] == "ceph19" and doc["sop_instance_uid"] == ds.SOPInstanceUID
    image = load_xray(path)
    assert image.ceph.verdict == "lateral" and image.facing == "right"
    assert image.spacing.mm == pytest.approx(tuple(doc["pixel_spacing_mm"]), rel=1e-5)
    assert [lm["name"] for lm in doc["landmarks"]] == list(NAMES)
    assert 60 < doc["measurements"]["SNA angle"] < 100 and "S-N length" in doc["measurements"]
    # Facing left: the same image mirrored, landmark columns x -> width - x, measurements unchanged.
    left = write_ceph(ceph, tmp_path / "l", facing="left")
    validate_dicom(left)
    doc_l = json.loads((tmp_path / "l" / "landmarks.json").read_text())
    width = doc["columns"]
    for a, b in zip(doc["landmarks"], doc_l["landmarks"]):
        assert b["position_px"][0] == pytest.approx(width - a["position_px"][0], abs=1e-3)
        assert b["position_px"][1] == pytest.approx(a["position_px"][1])
    for k, v in doc["measurements"].items():
        assert doc_l["measurements"][k] == pytest.approx(v, abs=2e-3)
    np.testing.assert_array_equal(pydicom.dcmread(left).pixel_array, ds.pixel_array[:, ::-1])
    assert load_xray(left).facing == "left"


def test_same_seed_same_image(ceph):
    again = render_ceph(5, imager_pixel_spacing=0.4, **FAST)
    np.testing.assert_array_equal(again.pixels, ceph.pixels)
    assert again.landmarks_px == ceph.landmarks_px


def test_cli(tmp_path):
    exe = str(Path(sys.executable).parent / "pacs-landmarks")
    bad = subprocess.run([exe, "phantom", str(tmp_path / "x"), "--ceph", "--tilt", "5"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "--tilt" in bad.stderr
    ok = subprocess.run([exe, "phantom", str(tmp_path / "out"), "--ceph", "--pixel-spacing", "0.6", "--seed", "2",
                         "--facing", "left"], capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr
    image = load_xray(tmp_path / "out" / "ceph-0001" / "image.dcm")
    assert image.facing == "left" and float(image.header.ImagerPixelSpacing[0]) == 0.6
