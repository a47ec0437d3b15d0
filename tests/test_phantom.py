"""Synthetic head-CT phantoms: valid CT Image IODs, deterministic, landmarks on the anatomy, plausible sizes."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pacs_landmarks.inference import phantom as ph
from pacs_landmarks.landmark_sets import landmark_names

SMALL = dict(size=128, slice_thickness=4.0)
CLI = str(Path(sys.executable).with_name("pacs-landmarks"))


@pytest.fixture(scope="module")
def case7():
    return ph.make_case(7)


@pytest.fixture(scope="module")
def written7(case7, tmp_path_factory):
    return ph.write_case(case7, tmp_path_factory.mktemp("ph7"), **SMALL)


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_landmark_names_match_the_shared_set():
    assert list(ph.NAMES) == landmark_names("craniofacial16")


def test_slices_pass_dciodvfy(written7, validate_dicom):
    files = sorted(written7.glob("*.dcm"))
    assert len(files) > 20
    for f in (files[0], files[len(files) // 2], files[-1]):
        warnings = validate_dicom(f)
        assert not warnings, warnings


def test_ct_attributes_and_geometry(written7, case7):
    doc = json.loads((written7 / "landmarks.json").read_text())
    assert doc["landmark_set"] == "craniofacial16"
    assert [lm["name"] for lm in doc["landmarks"]] == list(ph.NAMES)
    dss = [pydicom.dcmread(f) for f in sorted(written7.glob("*.dcm"))]
    ds = dss[0]
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1
    assert ds.BitsAllocated == 16 and str(ds.PatientName) == "PHANTOM^0007"
    assert {d.SeriesInstanceUID for d in dss} == {doc["series_instance_uid"]}
    assert {d.FrameOfReferenceUID for d in dss} == {doc["frame_of_reference_uid"]}
    assert len({d.SOPInstanceUID for d in dss}) == len(dss)
    z = sorted(float(d.ImagePositionPatient[2]) for d in dss)
    assert np.allclose(np.diff(z), 4.0)
    assert sorted(d.InstanceNumber for d in dss) == list(range(1, len(dss) + 1))


def test_same_seed_same_bytes(tmp_path, written7):
    again = ph.write_case(ph.make_case(7), tmp_path / "again", **SMALL)
    assert _hashes(again) == _hashes(written7)
    other = ph.make_case(8)
    assert not np.allclose(other.landmarks["Nasion"], ph.make_case(7).landmarks["Nasion"])


def test_rendered_volume_matches_case_evaluation(written7, case7):
    """The pixel at a landmark's voxel agrees with hu_at (the image IS the analytic shape)."""
    dss = sorted((pydicom.dcmread(f) for f in written7.glob("*.dcm")), key=lambda d: float(d.ImagePositionPatient[2]))
    vol = np.stack([d.pixel_array.astype(np.float32) - 1024 for d in dss])
    ps = float(dss[0].PixelSpacing[0])
    origin = np.array(dss[0].ImagePositionPatient, float)
    # Check the brain centre and air outside: large homogeneous regions survive blur.
    brain = case7.landmarks["Sella"] + case7.head_to_lps[:3, :3] @ np.array([0, 25.0, 45.0])
    k = int(round((brain[2] - origin[2]) / 4.0))
    j, i = (int(round((brain[1] - origin[1]) / ps)), int(round((brain[0] - origin[0]) / ps)))
    assert case7.hu_at(brain) == pytest.approx(ph.MATERIALS["brain"], abs=1)
    assert abs(np.median(vol[k, j - 1:j + 2, i - 1:i + 2]) - ph.MATERIALS["brain"]) < 40
    assert np.median(vol[k, :3, :3]) < -900


@pytest.mark.parametrize("seed", [0, 7, 13, 42, 99])
def test_landmarks_sit_on_the_anatomy(seed):
    """Each landmark is a boundary point of the bone it names, measured in the anatomical head frame."""
    case = ph.make_case(seed)
    H = case.head_landmarks
    lab = lambda p: case.labels_head(np.asarray(p, float)[None])[0]  # noqa: E731
    bone = ph.SKELETAL
    eps = 0.6
    # Menton: bone just above, none below; Pogonion: bone just behind, none in front; and so on.
    inside_outside = {
        "Menton": ((0, 0, eps), (0, 0, -eps)), "Pogonion": ((0, eps, 0), (0, -eps, 0)),
        "ANS": ((0, eps, 0), (0, -eps, 0)), "PNS": ((0, -eps, 0), (0, eps, 0)),
        "A point": ((0, eps, 0), (0, -eps, 0)), "B point": ((0, eps, 0), (0, -eps, 0)),
        "Nasion": ((0, eps, 0), (0, -eps, 0)), "Basion": ((0, -eps, eps), (0, eps, -eps)),
        "Gonion R": ((0, -1.0, 1.0), (0, 1.0, -1.0)), "Gonion L": ((0, -1.0, 1.0), (0, 1.0, -1.0)),
        "Orbitale R": ((0, eps, -eps), (0, -eps, eps)), "Orbitale L": ((0, eps, -eps), (0, -eps, eps)),
    }
    for name, (into, out) in inside_outside.items():
        assert lab(H[name] + into) in bone, name
        assert lab(H[name] + out) not in bone, name
    # A, B and nasion are the deepest points of their concavities: the outline is further forward above and below.
    for name in ("A point", "B point", "Nasion"):
        for dz in (-3.0, 3.0):
            assert lab(H[name] + (0, -0.25, dz)) in bone, (name, dz)
    # Porion: air of the ear canal just below, bone just above and medial, none lateral.
    for side, sgn in (("R", -1), ("L", 1)):
        po = H[f"Porion {side}"]
        assert case.hu[lab(po - (sgn * 1.0, 0, 0.8))] < -900
        assert lab(po + (-sgn * 1.0, 0, 0.8)) in bone
        assert lab(po + (sgn * 1.0, 0, 0.8)) not in bone
    # Sella: the centre of the soft-tissue pocket, with bone below it.
    assert lab(H["Sella"]) == ph.MATERIAL_IDS["pituitary"]
    assert lab(H["Sella"] - (0, 0, 7.0)) in bone
    # Head frame and LPS agree through the pose.
    for name in ph.NAMES:
        assert np.allclose(case.head_to_lps[:3, :3] @ H[name] + case.head_to_lps[:3, 3], case.landmarks[name])


def _sample(folder: Path, points: np.ndarray) -> np.ndarray:
    """Trilinear HU of a straight (untilted) written series at LPS points, from the DICOM headers alone."""
    from scipy.ndimage import map_coordinates

    dss = sorted((pydicom.dcmread(f) for f in folder.glob("*.dcm")), key=lambda d: float(d.ImagePositionPatient[2]))
    vol = np.stack([d.pixel_array.astype(np.float32) * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in dss])
    o = np.array(dss[0].ImagePositionPatient, float)
    ps = float(dss[0].PixelSpacing[0])
    dz = float(dss[1].ImagePositionPatient[2]) - o[2]
    idx = np.stack([(points[:, 2] - o[2]) / dz, (points[:, 1] - o[1]) / ps, (points[:, 0] - o[0]) / ps])
    return map_coordinates(vol, idx, order=1)


def test_rendered_images_show_the_landmarks(tmp_path):
    """In the written pixels: bone on Menton's and Pogonion's inner side, soft tissue outside; air under Porion."""
    case = ph.make_case(21, noise_hu=5.0)
    R = case.head_to_lps[:3, :3]  # anatomical directions in LPS
    up, back, med = R @ (0, 0, 1.0), R @ (0, 1.0, 0), R @ (1.0, 0, 0)
    me, pog = case.landmarks["Menton"], case.landmarks["Pogonion"]
    chin = ph.write_case(case, tmp_path / "chin", pixel_spacing=0.6, slice_thickness=0.75, size=384,
                         z_range=(min(me[2], pog[2]) - 8, max(me[2], pog[2]) + 8))
    hu = _sample(chin, np.array([me + 2.5 * up, me - 2.5 * up, pog + 2.5 * back, pog - 2.5 * back]))
    assert hu[0] > 700 and hu[2] > 700, hu
    assert hu[1] < 200 and hu[3] < 200, hu
    for side, sgn in (("R", -1.0), ("L", 1.0)):
        po = case.landmarks[f"Porion {side}"]
        ear = ph.write_case(case, tmp_path / f"ear{side}", pixel_spacing=0.6, slice_thickness=0.75, size=384,
                            z_range=(po[2] - 10, po[2] + 10))
        hu = _sample(ear, np.array([po - 2.0 * up - sgn * 2.0 * med, po + 2.5 * up - sgn * 2.5 * med]))
        assert hu[0] < -500, (side, hu)  # inside the canal, below its top
        assert hu[1] > 700, (side, hu)  # bone above the canal's roof


# Usual adult ranges from the design reference; phantoms must land in them (within a small margin).
RANGES = {
    "SNA": (78, 86), "SNB": (76, 84), "ANB": (0, 4), "S-N": (63, 80), "N-Me": (105, 135), "Go-Me": (65, 85),
    "FMA": (18, 32), "gonial angle": (115, 135), "Ba-N": (95, 115), "S-Ba": (40, 52), "inter-porion": (105, 125),
    "inter-orbitale": (58, 72), "bigonial": (85, 105), "SN-FH": (4, 10),
}


def test_measurements_in_typical_ranges():
    values = {k: [] for k in RANGES}
    for seed in range(20):
        case = ph.make_case(seed)
        m = ph.measurements(case.landmarks, case.aux_points)
        for k in RANGES:
            values[k].append(m[k])
    report = {k: (round(min(v), 1), round(float(np.median(v)), 1), round(max(v), 1)) for k, v in values.items()}
    for k, (lo, hi) in RANGES.items():
        v = np.asarray(values[k])
        margin = 2.0 if k in ("SNA", "SNB", "ANB", "FMA", "gonial angle", "SN-FH") else 0.04 * hi
        assert lo <= np.median(v) <= hi, (k, report[k])
        assert np.all((v >= lo - margin) & (v <= hi + margin)), (k, report[k])
        assert np.mean((v >= lo) & (v <= hi)) >= 0.75, (k, report[k])


def test_cli_writes_cases(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [CLI, "phantom", str(out), "--count", "2", "--seed", "5",
         "--size", "64", "--slice-thickness", "5", "--pixel-spacing", "4"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    for name in ("case-0001", "case-0002"):
        doc = json.loads((out / name / "landmarks.json").read_text())
        assert len(doc["landmarks"]) == 16
        assert len(list((out / name).glob("*.dcm"))) == doc["slices"]
    bad = subprocess.run([CLI, "phantom", str(out), "--count", "0"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "count" in bad.stderr
    tilt = subprocess.run([CLI, "phantom", str(tmp_path / "t"), "--size", "32", "--tilt", "60"],
                          capture_output=True, text=True, timeout=60)
    assert tilt.returncode == 2 and "tilt" in tilt.stderr and "Traceback" not in tilt.stderr


def test_tilted_gapped_shuffled_geometry(tmp_path):
    """Pixels agree with the analytic solid at the LPS position their own IPP/IOP give them (tilt, gaps, order)."""
    case = ph.make_case(11, noise_hu=0.0, psf_fwhm_mm=0.5, headrest=True)
    out = ph.write_case(case, tmp_path / "tilt", pixel_spacing=2.5, slice_thickness=3.0, size=96, tilt_deg=15.0,
                        gaps=lambda k: 4.5 if k == 5 else 0.0, order="shuffled")
    dss = [pydicom.dcmread(f) for f in sorted(out.glob("*.dcm"))]
    assert [int(f.stem[2:]) for f in sorted(out.glob("*.dcm"))] == sorted(d.InstanceNumber for d in dss)
    by_z = sorted(dss, key=lambda d: float(d.ImagePositionPatient[2]))
    assert [d.InstanceNumber for d in by_z] != sorted(d.InstanceNumber for d in by_z)  # shuffled
    steps = np.diff([float(d.ImagePositionPatient[2]) for d in by_z])
    assert np.allclose(np.delete(steps, 5), 3.0) and steps[5] == pytest.approx(7.5)
    checked = 0
    for d in by_z[::4]:
        iop = np.array(d.ImageOrientationPatient, float)
        row, col = iop[:3], iop[3:]
        assert np.allclose(col, [0, np.cos(np.radians(15)), np.sin(np.radians(15))], atol=1e-6)
        assert float(d.GantryDetectorTilt) == 15.0
        ps = float(d.PixelSpacing[0])
        jj, ii = np.meshgrid(np.arange(d.Rows), np.arange(d.Columns), indexing="ij")
        lps = np.array(d.ImagePositionPatient, float) + ii[..., None] * ps * row + jj[..., None] * ps * col
        normal = np.cross(row, col)
        labels = [case.labels_at(lps + off * normal) for off in (-1.0, 0.0, 1.0)]  # the 3 sub-slices
        same = (labels[0] == labels[1]) & (labels[1] == labels[2])
        hu = d.pixel_array.astype(np.float32) - 1024
        expected = np.clip(case.hu[labels[1]], -1024, 3071)
        assert np.mean(np.abs(hu[same] - np.round(expected[same])) <= 1.0) > 0.999
        checked += int(same.sum())
    assert checked > 10000


def test_noise_level_and_psf(case7):
    """Noise has the drawn standard deviation after the PSF, and the PSF correlates neighbouring pixels."""
    aff = np.diag([1.0, 0.5, 0.5, 1.0])
    aff[:3, 3] = [400.0, 400.0, 400.0]  # far outside the head: pure air
    case = ph.make_case(7, noise_hu=25.0, psf_fwhm_mm=1.2)
    vol = case.render(aff, (4, 128, 128))
    assert vol.mean() == pytest.approx(-1000, abs=2)
    assert vol.std() == pytest.approx(25.0, rel=0.1)
    d = vol - vol.mean()
    corr = float(np.mean(d[:, :, 1:] * d[:, :, :-1]) / d.var())
    assert corr > 0.3
    w = case.render(aff, (4, 128, 128), blur=False)
    w = w - w.mean()
    assert abs(float(np.mean(w[:, :, 1:] * w[:, :, :-1]) / w.var())) < 0.05


def test_rle_transfer_syntax_same_pixels(tmp_path, validate_dicom):
    case = ph.make_case(3)
    kw = dict(pixel_spacing=4.0, slice_thickness=5.0, size=64)
    a = ph.write_case(case, tmp_path / "explicit", **kw)
    b = ph.write_case(case, tmp_path / "rle", transfer_syntax=pydicom.uid.RLELossless, **kw)
    fa, fb = sorted(a.glob("*.dcm")), sorted(b.glob("*.dcm"))
    assert [f.name for f in fa] == [f.name for f in fb]
    mid = len(fa) // 2
    db = pydicom.dcmread(fb[mid])
    assert db.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    assert np.array_equal(pydicom.dcmread(fa[mid]).pixel_array, db.pixel_array)
    validate_dicom(fb[mid])


@pytest.mark.parametrize("bad", [dict(order="sideways"), dict(size=4), dict(tilt_deg=60.0), dict(pixel_spacing=-1.0),
                                 dict(slice_thickness=0.0), dict(gaps=[-2.0])])
def test_write_case_refuses_bad_parameters(tmp_path, bad):
    with pytest.raises(ValueError):
        ph.write_case(ph.make_case(1), tmp_path / "bad", **{"size": 32, "slice_thickness": 5.0, **bad})
    assert not list(tmp_path.glob("**/*.dcm"))


def test_make_case_refuses_unknown_parameters():
    with pytest.raises(TypeError, match="mouth_open"):
        ph.make_case(1, mouth_open=3)


def test_slice_writer_clips_and_formats(tmp_path, validate_dicom):
    """write.py on its own: HU outside the 12-bit range is clipped, decimal strings stay short and exact."""
    from pacs_landmarks.dicom.write import SeriesInfo, _ds, read_hu, save, slice_dataset

    assert _ds(0.1 + 0.2) == "0.3" and _ds(-0.0) == "0" and _ds(1024) == "1024"
    info = SeriesInfo("PHANTOM^TEST", "PHTEST", "1.2.3.4", "1.2.3.4.5", "1.2.3.4.6")
    hu = np.array([[-3000.0, -1024.0, 0.4, 3071.0], [5000.0, 12.6, -12.6, 100.0]])
    ds = slice_dataset(hu, info=info, sop_instance_uid="1.2.3.4.7", instance_number=1, position=(0, 0, 0),
                       orientation=(1, 0, 0, 0, 1, 0), pixel_spacing=(0.5, 0.5), slice_thickness=1.0)
    path = save(ds, tmp_path / "one.dcm")
    assert np.array_equal(read_hu(path), [[-1024, -1024, 0, 3071], [3071, 13, -13, 100]])
    validate_dicom(path)
