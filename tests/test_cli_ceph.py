"""The command line on cephalograms: infer (a folder of X-ray images, --pixel-spacing), read-sr, review."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from ceph_helpers import report_all_model, write_ceph_variant  # noqa: E402

CLI = str(Path(sys.executable).with_name("pacs-landmarks"))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder with a ceph (ceph.dcm) and a panoramic (pano.dcm), and a model that reports what it sees."""
    from pacs_landmarks.inference.ceph_phantom import render_ceph, write_ceph

    root = tmp_path_factory.mktemp("cli-ceph")
    rendered = write_ceph(render_ceph(14, imager_pixel_spacing=0.4), root / "render")
    folder = root / "in"
    folder.mkdir()
    shutil.copy(rendered, folder / "ceph.dcm")
    write_ceph_variant(rendered, folder / "pano.dcm", Modality="PX", PositionerType="PANORAMIC")
    return folder, report_all_model(root / "model.pt")


def test_infer_read_sr_and_review(images, tmp_path, validate_dicom):
    folder, model = images
    proc = run("infer", str(folder), "--out", str(tmp_path / "out"), "--model", str(model))
    assert proc.returncode == 0, proc.stderr
    assert "pano.dcm: not analysed: a panoramic radiograph (Modality PX)" in proc.stdout
    out = tmp_path / "out" / "ceph"  # several images: a folder per file
    assert not (tmp_path / "out" / "pano").exists(), "nothing is written for a refused image"
    for name in ("landmarks-sr.dcm", "measurements-sr.dcm", "landmarks-gsps.dcm"):
        validate_dicom(out / name)
    doc = json.loads((out / "landmarks.json").read_text())
    assert doc["landmark_set"] == "ceph19" and len(doc["landmarks"]) == 19
    assert doc["pixel_spacing_mm"] == pytest.approx([0.4 / 1.1, 0.4 / 1.1], rel=0.05)
    assert "Estimated Radiographic Magnification Factor" in doc["pixel_spacing_source"]
    assert "pixel spacing: " in proc.stdout and "Magnification" in proc.stdout  # the table says it too
    found = {lm["name"]: lm["position_px"] for lm in doc["landmarks"] if lm["status"] == "found"}
    assert found

    # read-sr: the same points back from the SR file, within 0.01 px, and the spacing it states.
    back = run("read-sr", str(out / "landmarks-sr.dcm"))
    assert back.returncode == 0, back.stderr
    sr = json.loads(back.stdout)
    assert sr["pixel_spacing_mm"] == pytest.approx(doc["pixel_spacing_mm"], rel=1e-5)
    points = {lm["name"]: lm["position_px"] for lm in sr["landmarks"] if lm["position_px"]}
    assert set(points) == set(found)
    for name, p in found.items():
        np.testing.assert_allclose(points[name], p, atol=0.01, err_msg=name)
    assert {lm["status"] for lm in sr["landmarks"]} >= {"found"}
    assert len(sr["landmarks"]) == 19, "the SR states every landmark, found or not"

    # review: the image with the SR's landmarks, as a PNG of the image's proportions.
    rev = run("review", str(folder / "ceph.dcm"), "--out", str(tmp_path / "review"), "--sr",
              str(out / "landmarks-sr.dcm"))
    assert rev.returncode == 0, rev.stderr
    png = tmp_path / "review" / "ceph.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    header = pydicom.dcmread(folder / "ceph.dcm", stop_before_pixels=True)
    with Image.open(png) as im:
        assert abs(im.height / im.width - header.Rows / header.Columns) < 0.01


def test_infer_pixel_spacing_override_and_refusals(images, tmp_path):
    folder, model = images
    proc = run("infer", str(folder / "ceph.dcm"), "--out", str(tmp_path / "o"), "--model", str(model),
               "--pixel-spacing", "0.25,0.3")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "o" / "landmarks.json").read_text())  # one image: OUT itself
    assert doc["pixel_spacing_mm"] == [0.25, 0.3] and "override" in doc["pixel_spacing_source"]
    pano = run("infer", str(folder / "pano.dcm"), "--out", str(tmp_path / "p"), "--model", str(model))
    assert pano.returncode == 2 and "no image was a lateral cephalogram" in pano.stderr
    bad = run("infer", str(folder / "ceph.dcm"), "--out", str(tmp_path / "b"), "--pixel-spacing", "-1")
    assert bad.returncode == 2 and "--pixel-spacing" in bad.stderr
