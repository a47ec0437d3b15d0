"""X-ray input (dicom/xray.py): every input variant, every spacing source, refusals, facing; validated files."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGLossless, JPEGLSLossless, RLELossless, generate_uid

from pacs_landmarks.dicom.write import save
from pacs_landmarks.dicom.xray import XRAY_CLASSES, XRayError, ceph_check, load_xray, physical_spacing
from pacs_landmarks.dicom.xray_write import XRayInfo, xray_dataset


def picture(rows=48, cols=64, top=4095, dtype=np.uint16) -> np.ndarray:
    """A ramp with a bright block on the right (so a mirror is visible) in ``top`` grey levels."""
    img = np.tile(np.linspace(0.1, 0.6, cols), (rows, 1))
    img[10:30, cols - 20:cols - 5] = 1.0
    return np.round(img * top).astype(dtype)


def info(**kw) -> XRayInfo:
    base = dict(patient_name="TEST^XRAY", patient_id="X1", study_instance_uid=generate_uid(),
                series_instance_uid=generate_uid(), sop_instance_uid=generate_uid())
    base.update(kw)
    return XRayInfo(**base)


def write_xray(path: Path, pixels=None, *, info_kw=None, syntax=None, **kw) -> Path:
    ds = xray_dataset(picture() if pixels is None else pixels, info(**(info_kw or {})), **kw)
    return save(ds, path, syntax) if syntax else save(ds, path)


VARIANTS = {
    "DX presentation": dict(kind="DX", bits_stored=12, view_position="LL"),
    "DX processing": dict(kind="DX-PROCESSING", bits_stored=12),
    "CR": dict(kind="CR", bits_stored=12, pixel_spacing=(0.1, 0.1)),
    "SC film": dict(kind="SC", bits_stored=12, nominal_scanned_spacing=(0.1, 0.1)),
    "16 bit": dict(kind="DX", bits_stored=16),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variants_load_and_validate(tmp_path, validate_dicom, name):
    kw = VARIANTS[name]
    top = (1 << kw["bits_stored"]) - 1
    path = write_xray(tmp_path / "x.dcm", picture(top=top), **kw)
    validate_dicom(path)
    image = load_xray(path)
    assert image.sop_class_uid in XRAY_CLASSES
    assert image.ceph.verdict == "lateral"
    assert image.pixels.shape == (48, 64) and image.pixels.dtype == np.float32
    assert 0.0 <= image.pixels.min() and image.pixels.max() <= 1.0
    # The bright block stays the brightest thing, on the right.
    assert image.pixels[20, 50] > image.pixels[20, 10] + 0.3


def test_eight_bit(tmp_path, validate_dicom):
    path = write_xray(tmp_path / "x8.dcm", picture(top=255, dtype=np.uint8), kind="DX")
    validate_dicom(path)
    ref = load_xray(write_xray(tmp_path / "x16.dcm", picture(top=255).astype(np.uint16), kind="DX", bits_stored=8))
    np.testing.assert_allclose(load_xray(path).pixels, ref.pixels, atol=1e-6)


def test_monochrome1_reads_like_monochrome2(tmp_path, validate_dicom):
    img = picture()
    m2 = write_xray(tmp_path / "m2.dcm", img, bits_stored=12)
    m1 = write_xray(tmp_path / "m1.dcm", (4095 - img).astype(np.uint16), bits_stored=12, photometric="MONOCHROME1")
    validate_dicom(m1)
    assert pydicom.dcmread(m1).PresentationLUTShape == "INVERSE"
    np.testing.assert_allclose(load_xray(m1).pixels, load_xray(m2).pixels, atol=1e-5)


def test_window_is_applied(tmp_path):
    """A narrow window saturates what lies outside it: the VOI LUT is really used."""
    wide = load_xray(write_xray(tmp_path / "w.dcm", bits_stored=12))
    narrow = load_xray(write_xray(tmp_path / "n.dcm", bits_stored=12, window=(1000.0, 400.0)))
    assert np.isclose(wide.pixels[20, 10], wide.pixels[21, 10])
    assert (narrow.pixels == 1.0).mean() > (wide.pixels == 1.0).mean() + 0.2


TRANSCODERS = {
    "RLE (dcmcrle)": (RLELossless, ["dcmcrle"]),
    "JPEG Lossless P14 (dcmcjpeg)": (JPEGLossless, ["dcmcjpeg", "--encode-lossless", "--selection-value", "6"]),
    "JPEG-LS lossless (dcmcjpls)": (JPEGLSLossless, ["dcmcjpls", "--encode-lossless"]),
}


@pytest.mark.parametrize("name", list(TRANSCODERS))
def test_compressed_by_dcmtk(tmp_path, validate_dicom, name):
    syntax, command = TRANSCODERS[name]
    if shutil.which(command[0]) is None:
        pytest.fail(f"{command[0]} (dcmtk) is not installed: run scripts/bootstrap")
    plain = write_xray(tmp_path / "plain.dcm", bits_stored=12)
    packed = tmp_path / "packed.dcm"
    subprocess.run([*command, str(plain), str(packed)], check=True, capture_output=True, timeout=60)
    assert pydicom.dcmread(packed, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    validate_dicom(packed)
    np.testing.assert_array_equal(load_xray(packed).pixels, load_xray(plain).pixels)


def test_jpeg2000(tmp_path, validate_dicom):
    plain = write_xray(tmp_path / "plain.dcm", bits_stored=12)
    j2k = write_xray(tmp_path / "j2k.dcm", bits_stored=12, syntax=JPEG2000Lossless)
    validate_dicom(j2k)
    image = load_xray(j2k)
    assert image.transfer_syntax == JPEG2000Lossless.name
    np.testing.assert_array_equal(image.pixels, load_xray(plain).pixels)


# ------------------------------------------------------------------------------------------------ spacing


SPACINGS = {
    "fiducial": (dict(pixel_spacing=(0.09, 0.09), pixel_spacing_calibration="FIDUCIAL", magnification=1.1),
                 (0.09, 0.09), "Pixel Spacing (calibration FIDUCIAL)", "patient"),
    "geometry": (dict(pixel_spacing=(0.091, 0.092), pixel_spacing_calibration="GEOMETRY"),
                 (0.091, 0.092), "Pixel Spacing (calibration GEOMETRY)", "patient"),
    "magnification": (dict(imager_pixel_spacing=(0.11, 0.11), magnification=1.1),
                      (0.1, 0.1), "Estimated Radiographic Magnification Factor 1.1", "patient"),
    "SID/SOD": (dict(imager_pixel_spacing=(0.11, 0.11), source_detector_mm=1650.0, source_patient_mm=1500.0),
                (0.1, 0.1), "SID 1650 / SOD 1500", "patient"),
    "detector": (dict(imager_pixel_spacing=(0.11, 0.12)), (0.11, 0.12), "at the detector", "detector"),
    "stated": (dict(kind="CR", pixel_spacing=(0.15, 0.15)), (0.15, 0.15), "calibration not stated", "stated"),
    "film": (dict(kind="SC", nominal_scanned_spacing=(0.2, 0.2)), (0.2, 0.2), "Nominal Scanned", "film"),
}


@pytest.mark.parametrize("name", list(SPACINGS))
def test_spacing_sources(tmp_path, validate_dicom, name):
    kw, want, source, plane = SPACINGS[name]
    path = write_xray(tmp_path / "s.dcm", **{"bits_stored": 12, **kw})
    validate_dicom(path)
    spacing = load_xray(path).spacing
    assert spacing is not None
    assert spacing.mm == pytest.approx(want, rel=1e-6)
    assert source in spacing.source and spacing.plane == plane


def test_no_spacing_and_override(tmp_path):
    path = write_xray(tmp_path / "sc.dcm", kind="SC", bits_stored=12)
    assert load_xray(path).spacing is None
    over = load_xray(path, pixel_spacing=0.1).spacing
    assert over.mm == (0.1, 0.1) and over.plane == "override"
    magnified = write_xray(tmp_path / "dx.dcm", bits_stored=12, imager_pixel_spacing=(0.11, 0.11), magnification=1.1)
    assert load_xray(magnified, pixel_spacing=(0.2, 0.3)).spacing.mm == (0.2, 0.3)
    with pytest.raises(XRayError, match="positive"):
        physical_spacing(pydicom.dcmread(path), -1.0)


# ------------------------------------------------------------------------------------------------ ceph or not


def _header(**kw) -> pydicom.Dataset:
    ds = xray_dataset(picture(), info(series_description=kw.pop("description", "")), bits_stored=12,
                      **{"positioner": None, **kw})
    return ds


def test_ceph_evidence_and_unknown():
    assert ceph_check(_header(positioner="CEPHALOSTAT")).verdict == "lateral"
    check = ceph_check(_header(view_position="RL"))
    assert check.verdict == "lateral" and any("View Code 399198007" in e for e in check.evidence)
    assert ceph_check(_header(description="Fernroentgen seitlich")).verdict == "lateral"
    assert ceph_check(_header(description="Ceph LAT")).verdict == "lateral"
    # Nothing for or against: the image has to decide.
    assert ceph_check(_header()).verdict == "unknown"


REFUSED = {
    "chest": (dict(body_part="CHEST", view_position="PA"), "chest"),
    "lateral chest": (dict(body_part="CHEST", view_position="LL"), "chest"),
    "chest by description": (dict(body_part="", description="Thorax pa"), "Thorax"),
    "panoramic": (dict(modality="PX"), "panoramic"),
    "panoramic positioner": (dict(modality="DX", positioner="PANORAMIC"), "PANORAMIC"),
    "frontal ceph": (dict(positioner="CEPHALOSTAT", view_position="PA"), "frontal"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_with_reason(tmp_path, validate_dicom, name):
    kw, word = REFUSED[name]
    ds = _header(**kw)
    check = ceph_check(ds)
    assert check.verdict == "refused" and word.lower() in check.reason.lower()
    path = save(ds, tmp_path / "r.dcm")
    with pytest.raises(XRayError, match="(?i)" + word):
        load_xray(path)
    assert load_xray(path, require_ceph=False).ceph.verdict == "refused"


def test_not_an_xray_refused(tmp_path):
    from pydicom.data import get_testdata_file

    with pytest.raises(XRayError, match="not a single X-ray image"):
        load_xray(get_testdata_file("CT_small.dcm"))
    (tmp_path / "junk.dcm").write_bytes(b"not dicom at all")
    with pytest.raises(XRayError, match="not a readable DICOM file"):
        load_xray(tmp_path / "junk.dcm")


# ------------------------------------------------------------------------------------------------ facing


def test_facing_left_is_mirrored_internally(tmp_path):
    img = picture()
    right = load_xray(write_xray(tmp_path / "r.dcm", img, bits_stored=12, facing="right"))
    left = load_xray(write_xray(tmp_path / "l.dcm", img[:, ::-1].copy(), bits_stored=12, facing="left"))
    assert right.facing == "right" and left.facing == "left" and left.flipped
    # Both canonical images face the same way ...
    np.testing.assert_array_equal(left.canonical(), right.canonical())
    # ... and a point found on the canonical image is reported in the image's own SCOORD columns.
    block_centre = np.array([[64 - 12.5, 20.0]])  # (column, row) of the block's centre, facing right
    np.testing.assert_allclose(right.from_canonical(block_centre), block_centre)
    np.testing.assert_allclose(left.from_canonical(block_centre), [[12.5, 20.0]])
    np.testing.assert_allclose(left.to_canonical(left.from_canonical(block_centre)), block_centre)
    unknown = load_xray(write_xray(tmp_path / "u.dcm", img, kind="CR", bits_stored=12, facing=None))
    assert unknown.facing == "unknown" and not unknown.flipped


# ------------------------------------------------------------------------------------------------ inspect


def test_inspect_shows_xray_images(tmp_path):
    (tmp_path / "in").mkdir()
    write_xray(tmp_path / "in" / "ceph.dcm", bits_stored=12, imager_pixel_spacing=(0.11, 0.11), magnification=1.1,
               view_position="LL")
    save(_header(modality="PX"), tmp_path / "in" / "pano.dcm")
    exe = str(Path(sys.executable).parent / "pacs-landmarks")
    proc = subprocess.run([exe, "inspect", str(tmp_path / "in"), "--json"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    images = {Path(im["source"]).name: im for s in json.loads(proc.stdout)["series"] for im in s["images"]}
    assert images["ceph.dcm"]["lateral_ceph"] == "lateral"
    assert images["ceph.dcm"]["pixel_spacing_mm"] == [0.1, 0.1]
    assert "Magnification" in images["ceph.dcm"]["pixel_spacing_source"]
    assert "panoramic" in images["pano.dcm"]["refused"]
    text = subprocess.run([exe, "inspect", str(tmp_path / "in"), "--pixel-spacing", "0.2"], capture_output=True,
                          text=True, timeout=120).stdout
    assert "lateral ceph  yes" in text and "0.2 x 0.2 mm" in text and "override" in text
    assert "lateral ceph  no: a panoramic radiograph (Modality PX)" in text
