"""Domain randomisation (phantoms and training augmentation) and clinical scan ranges: each knob does what it
says, measured on rendered phantoms or augmented tensors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pacs_landmarks.inference import phantom as ph
from pacs_landmarks.inference.coverage import KINDS, Region, draw_region
from pacs_landmarks.inference.train import DOMAIN, augment_hu

CLI = str(Path(sys.executable).with_name("pacs-landmarks"))
QUIET = dict(noise_hu=0.0, rotation_deg=(0, 0, 0), translation_mm=(0, 0, 0), headrest=False)


def _axial(case, z, size=160, ps=1.0, centre=(0.0, 0.0), **kw):
    aff = np.eye(4)
    aff[:3, 0] = [0, 0, 1.0]
    aff[:3, 1] = [0, ps, 0]
    aff[:3, 2] = [ps, 0, 0]
    aff[:3, 3] = [centre[0] - ps * (size - 1) / 2, centre[1] - ps * (size - 1) / 2, z]
    return case.render(aff, (1, size, size), **kw)[0]


def _occlusal_z(case):
    return float((case.aux_points["Prosthion"][2] + case.aux_points["Infradentale"][2]) / 2)


def test_variety_keeps_the_basic_head_and_draws_new_parameters():
    plain, var = ph.make_case(11), ph.make_case(11, variety=True)
    assert plain.params["size"] == ph.make_case(11).params["size"]
    assert plain.params["kernel"] == "standard" and plain.params["metal_streaks_hu"] == 0.0
    drawn = [ph.make_case(s, variety=True).params for s in range(20, 40)]
    assert {p["kernel"] for p in drawn} >= {"sharp", "standard"}
    assert max(abs(p["mandible_shift_mm"]) for p in drawn) > 4.0  # Class II / III beyond +-15 % of the chin
    assert max(max(abs(r) for r in p["rotation_deg"]) for p in drawn) > 15.0
    assert min(p["bone_density"] for p in drawn) < 0.7
    assert max(p["noise_hu"] for p in drawn) > 30.0
    assert var.landmarks.keys() == plain.landmarks.keys()


@pytest.mark.parametrize("cls_shift", [-8.0, 8.0])
def test_class_ii_iii_jaws_move_the_chin_landmarks(cls_shift):
    base = ph.make_case(3, mandible_shift_mm=0.0, windows_follow_jaws=True, **QUIET)
    moved = ph.make_case(3, mandible_shift_mm=cls_shift, windows_follow_jaws=True, **QUIET)
    for name in ("Pogonion", "Menton", "B point"):
        dy = moved.landmarks[name][1] - base.landmarks[name][1]
        assert dy == pytest.approx(-cls_shift, abs=2.5), name  # +y is posterior: a Class III chin comes forward
    assert np.linalg.norm(moved.landmarks["Sella"] - base.landmarks["Sella"]) < 0.01


def test_edentulous_jaw_has_no_enamel():
    case = ph.make_case(4, missing_teeth=list(range(28)), **QUIET)
    img = _axial(case, _occlusal_z(case) + 3.0, noise=False)
    assert (img > 2500).sum() == 0
    full = ph.make_case(4, missing_teeth=[], **QUIET)
    assert (_axial(full, _occlusal_z(full) + 3.0, noise=False) > 2500).sum() > 20


def test_bone_density_lowers_bone_hu():
    dense = ph.make_case(5, bone_density=1.0, **QUIET)
    light = ph.make_case(5, bone_density=0.5, **QUIET)
    cort = ph.MATERIAL_IDS["cortical"]
    assert dense.hu[cort] > 1300 and 600 < light.hu[cort] < 850  # a physical phantom's ~700-800 HU bone
    canc = ph.MATERIAL_IDS["cancellous"]
    assert light.hu[canc] / dense.hu[canc] < light.hu[cort] / dense.hu[cort]  # cancellous bone drops more


def test_metal_streaks_through_the_jaw():
    args = dict(fillings=list(range(28)), missing_teeth=[], **QUIET)
    clean = ph.make_case(6, metal_streaks_hu=0.0, **args)
    streaky = ph.make_case(6, metal_streaks_hu=600.0, **args)
    z = _occlusal_z(clean) + 2.5
    a, b = _axial(clean, z), _axial(streaky, z)
    diff = b - a
    assert np.abs(diff).max() > 200  # bright and dark streaks
    assert (diff < -100).sum() > 50 and (diff > 100).sum() > 50
    # streaks reach well beyond the metal itself
    far = np.abs(diff)[(a > -200) & (a < 200)]
    assert (far > 50).mean() > 0.02


def test_streak_image_alone():
    metal = np.zeros((64, 64), bool)
    metal[30:33, 10:13] = True
    metal[30:33, 50:53] = True
    s = ph.metal_streaks(metal, 400.0, np.random.default_rng(0))
    assert s[31, 20:45].mean() < -150  # the dark band between two fillings (beam hardening)
    assert ph.metal_streaks(np.zeros((8, 8), bool), 400.0, np.random.default_rng(0)).max() == 0


@pytest.mark.parametrize("kernel", ["sharp", "soft"])
def test_reconstruction_kernels(kernel):
    std = ph.make_case(8, kernel="standard", **QUIET)
    k = ph.make_case(8, kernel=kernel, kernel_strength=1.0, **QUIET)
    z = float(std.landmarks["Sella"][2]) + 40
    a, b = _axial(std, z), _axial(k, z)
    grad = lambda im: np.abs(np.diff(im, axis=1)).max()  # noqa: E731
    if kernel == "sharp":
        assert b.max() > a.max() + 50 and b.min() < a.min() - 5  # edge overshoot on both sides of the skull
        assert grad(b) > grad(a)
    else:
        assert grad(b) < grad(a)


def test_noise_up_to_60_hu():
    case = ph.make_case(9, noise_hu=60.0, psf_fwhm_mm=1.0)
    aff = np.diag([1.0, 0.5, 0.5, 1.0])
    aff[:3, 3] = [400.0, 400.0, 400.0]
    assert case.render(aff, (2, 96, 96)).std() == pytest.approx(60.0, rel=0.12)


@pytest.mark.parametrize("thick", [0.5, 5.0])
def test_thin_and_thick_slices_partial_volume(thick):
    case = ph.make_case(10, **QUIET)
    z = float(case.landmarks["Sella"][2]) + 60  # through the vault, where the skull is oblique to the slice
    aff = np.eye(4)
    aff[:3, 0] = [0, 0, 1.0]
    aff[:3, 1] = [0, 1.0, 0]
    aff[:3, 2] = [1.0, 0, 0]
    aff[:3, 3] = [-80, -80, z]
    img = case.render(aff, (1, 160, 160), slice_thickness=thick, blur=False, noise=False)[0]
    pure = np.round(case.hu)
    mixtures = [v for v in np.unique(np.round(img)) if not np.any(np.abs(pure - v) < 0.5)]
    if thick == 5.0:  # mixtures of tissues across the thickness, not just the case's material values
        assert len(mixtures) >= 5
    else:
        assert mixtures == []


def test_cbct_intensity_cupping_and_rings():
    base = ph.make_case(12, **QUIET)
    cb = ph.make_case(12, cbct=True, cbct_gain=0.7, cbct_offset_hu=200.0, cupping_hu=200.0, rings_hu=0.0,
                      **QUIET)
    z = float(base.landmarks["Sella"][2]) + 20
    a, b = _axial(base, z), _axial(cb, z)
    # no HU calibration: a gain and an offset, and a darker centre (cupping)
    corner = (slice(0, 10), slice(0, 10))
    assert b[corner].mean() == pytest.approx(-1000 * 0.7 + 200, abs=40)
    centre = (slice(75, 85), slice(75, 85))
    expected = a[centre].mean() * 0.7 + 200
    assert b[centre].mean() < expected - 120
    ringed = ph.make_case(12, cbct=True, rings_hu=60.0, **QUIET)
    r = _axial(ringed, z) - a
    assert np.abs(r).max() > 20  # concentric rings about the rotation axis


def test_immobilisation_mask_in_front_of_the_face():
    case = ph.make_case(13, mask=True, **QUIET)
    face_y = float(case.landmarks["Nasion"][1])
    z = float(case.landmarks["Nasion"][2]) - 20
    img = _axial(case, z, size=220, noise=False, blur=False)
    col = img[:, 110]  # midline, anterior (small y) first
    plastic = np.flatnonzero(np.abs(col - ph.MATERIALS["cartilage"]) < 1)
    assert len(plastic) and (plastic.min() - 110) + 0.0 < face_y  # plastic lies anterior of the nasion plane
    plain = _axial(ph.make_case(13, **QUIET), z, size=220, noise=False, blur=False)[:, 110]
    assert not np.any(np.abs(plain[: plastic.min() + 1] - ph.MATERIALS["cartilage"]) < 1)


@pytest.mark.parametrize("kind", KINDS)
def test_scan_ranges_cover_what_clinics_scan(kind):
    case = ph.make_case(14)
    lm = case.landmarks
    rng = np.random.default_rng(1)
    regions = [draw_region(kind, lm, rng) for _ in range(20)]
    inside = np.array([[r.contains(lm[n]) for n in ph.NAMES] for r in regions])
    idx = {n: i for i, n in enumerate(ph.NAMES)}
    if kind == "full":
        assert inside.all()
    elif kind == "routine":
        assert inside[:, idx["Sella"]].all() and not inside[:, idx["Menton"]].any()
    elif kind in ("facial", "sinus"):
        assert inside[:, idx["Nasion"]].all() and inside[:, idx["ANS"]].all()
        if kind == "sinus":
            assert not inside[:, idx["Menton"]].any()
    elif kind == "mandible":
        assert inside[:, idx["Menton"]].all() and not inside[:, idx["Sella"]].any()
    elif kind.startswith("cbct"):
        assert all(r.cylinder is not None for r in regions)
        assert not inside[:, idx["Sella"]].any()
    else:
        assert 0 < inside.mean() < 1


def test_phantom_cli_coverage_cuts_the_series(tmp_path, validate_dicom):
    out = tmp_path / "cut"
    subprocess.run([CLI, "phantom", str(out), "--seed", "15", "--size", "96", "--slice-thickness", "3",
                    "--coverage", "routine"], check=True, capture_output=True, timeout=300)
    doc = json.loads((out / "case-0001" / "landmarks.json").read_text())
    status = {d["name"]: d["in_scan"] for d in doc["landmarks"]}
    assert doc["coverage"]["kind"] == "routine"
    assert status["Sella"] and not status["Menton"] and not status["Gonion R"]
    import pydicom

    zs = [float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in (out / "case-0001").glob("*.dcm")]
    assert min(zs) >= doc["coverage"]["z_lo"] - 1e-6
    validate_dicom(next((out / "case-0001").glob("*.dcm")))


def test_phantom_cli_cbct_cylinder(tmp_path):
    import pydicom

    out = tmp_path / "cbct"
    subprocess.run([CLI, "phantom", str(out), "--seed", "16", "--size", "128", "--slice-thickness", "2",
                    "--coverage", "cbct-medium"], check=True, capture_output=True, timeout=300)
    doc = json.loads((out / "case-0001" / "landmarks.json").read_text())
    cx, cy, r = doc["coverage"]["cylinder"]
    f = sorted((out / "case-0001").glob("*.dcm"))[len(list((out / "case-0001").glob("*.dcm"))) // 2]
    ds = pydicom.dcmread(f)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    x0, y0 = float(ds.ImagePositionPatient[0]), float(ds.ImagePositionPatient[1])
    ps = float(ds.PixelSpacing[0])
    jj, ii = np.mgrid[: hu.shape[0], : hu.shape[1]]
    outside = (x0 + ii * ps - cx) ** 2 + (y0 + jj * ps - cy) ** 2 > (r + ps) ** 2
    assert outside.any() and np.all(hu[outside] <= -999)
    assert (hu[~outside] > 200).any()  # bone inside the cylinder


def test_region_contains_and_edge_distance():
    r = Region("x", z_lo=0.0, z_hi=10.0, cylinder=(0.0, 0.0, 5.0))
    pts = np.array([[0, 0, 5.0], [0, 0, 12.0], [6, 0, 5.0], [3, 0, 1.0]])
    assert r.contains(pts).tolist() == [True, False, False, True]
    assert r.edge_distance(pts).tolist() == pytest.approx([5.0, 2.0, 1.0, 1.0])


# ------------------------------------------------------------------------------ training augmentation
def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _box():
    hu = torch.full((1, 24, 24, 24), 40.0)
    hu[:, :, :, 8:10] = 1500.0  # a bone plate
    hu[:, :, :, :2] = -1000.0  # air / outside
    return hu


def _only(**kw):
    """A DOMAIN with everything off except ``kw``."""
    d = dict(DOMAIN, gain=0.0, offset_hu=0.0, noise_hu=0.0, bone_density_p=0.0, sharp_p=0.0, soft_p=0.0, cbct_p=0.0)
    d.update(kw)
    return d


def test_augment_off_is_identity():
    hu = _box()
    assert torch.equal(augment_hu(hu, _gen(), _only()), hu)


def test_augment_bone_density_scales_bone_only():
    out = augment_hu(_box(), _gen(), _only(bone_density_p=1.0, bone_density=(0.5, 0.5)))
    assert float(out[0, 5, 5, 8]) == pytest.approx(100 + 1400 * 0.5)
    assert float(out[0, 5, 5, 15]) == pytest.approx(40.0)


def test_augment_sharp_kernel_overshoots_and_soft_blurs():
    sharp = augment_hu(_box(), _gen(), _only(sharp_p=1.0, sharp=(1.0, 1.0)))
    assert float(sharp.max()) > 1500 and float(sharp[0, 5, 5, 10]) < 40
    soft = augment_hu(_box(), _gen(), _only(soft_p=1.0))
    assert float(soft.max()) < 1500


def test_augment_noise_and_correlation():
    hu = torch.zeros((64, 24, 24, 24))
    white = augment_hu(hu, _gen(), _only(noise_hu=60.0, correlated_noise_p=0.0))
    assert 20 < float(white.std()) < 45  # SD drawn uniformly up to 60 per crop
    corr = augment_hu(hu, _gen(), _only(noise_hu=60.0, correlated_noise_p=1.0))
    d = corr[:, :, :, 1:] * corr[:, :, :, :-1]
    assert float(d.mean() / corr.var()) > 0.4


def test_augment_cbct_gain_offset_cupping_keep_padding():
    hu = _box()
    out = augment_hu(hu, _gen(), _only(cbct_p=1.0, cbct_gain=(0.6, 0.6), cbct_offset_hu=0.0, cupping_hu=0.0))
    assert float(out[0, 5, 5, 15]) == pytest.approx(24.0)
    assert float(out[0, 5, 5, 0]) == -1000.0  # padding outside the volume stays air
    flat = torch.zeros((1, 24, 24, 24))
    cup = augment_hu(flat, _gen(3), _only(cbct_p=1.0, cbct_gain=(1.0, 1.0), cbct_offset_hu=0.0, cupping_hu=250.0))
    assert float(cup[0, 12, 12, 12]) < float(cup[0, 12, 0, 0]) - 5  # darker in the centre


def test_training_scan_range_weights_can_be_changed():
    """``train --coverage-weights``: the cuts are drawn with the changed weights; unknown or negative ones fail."""
    import numpy as np

    from pacs_landmarks.inference.coverage import TRAIN_WEIGHTS, draw_training_kind, training_weights

    assert training_weights() == TRAIN_WEIGHTS
    w = training_weights({k: 0.0 for k in TRAIN_WEIGHTS} | {"cbct-small": 1.0})
    rng = np.random.default_rng(0)
    assert {draw_training_kind(rng, w) for _ in range(50)} == {"cbct-small"}
    more = training_weights({"mandible": 0.5})
    draws = [draw_training_kind(rng, more) for _ in range(2000)]
    share = draws.count("mandible") / len(draws)
    assert abs(share - 0.5 / sum(more.values())) < 0.04 and share > 2 * TRAIN_WEIGHTS["mandible"]
    for bad in ({"cbct-huge": 1.0}, {"mandible": -0.1}, {k: 0.0 for k in TRAIN_WEIGHTS}):
        with pytest.raises(ValueError):
            training_weights(bad)
