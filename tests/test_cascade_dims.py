"""One cascade for 2D and 3D: the 3D path is unchanged by the refactor that made the dimension a parameter,
and 2D stages really work on 2D crops."""
from __future__ import annotations

import numpy as np
import pytest
import torch

# (name, status, confidence, stage positions LPS mm) from the shipped model on main before the 2D refactor
BEFORE_REFACTOR = [
    ('Sella', 'found', 0.718469, [(3.67978, -1.40769, 21.13992), (3.50341, -2.08409, 21.14575), (3.06106, -2.22306, 21.03541)]),
    ('Nasion', 'found', 0.646898, [(-8.35943, -66.89656, 37.5796), (-9.55244, -67.58746, 37.40876), (-9.68896, -67.52972, 37.43902)]),
    ('Orbitale R', 'found', 0.638484, [(-36.46135, -62.82093, 5.19581), (-35.56501, -62.72984, 5.11642), (-35.58858, -62.5334, 5.15216)]),
    ('Orbitale L', 'found', 0.616237, [(26.99287, -68.65797, 17.38081), (26.18409, -71.14493, 17.84137), (25.68351, -71.59969, 17.59562)]),
    ('Porion R', 'found', 0.673945, [(-47.10424, 14.56816, -9.03835), (-46.40232, 13.95508, -9.3873), (-46.23163, 13.99541, -9.54467)]),
    ('Porion L', 'found', 0.689135, [(62.20271, -0.80021, 12.79731), (62.41006, -1.36065, 12.39615), (62.29078, -1.65145, 12.39281)]),
    ('ANS', 'found', 0.70882, [(-1.69777, -79.25161, -11.27457), (-2.26926, -81.16708, -11.50922), (-2.11189, -81.2084, -11.38203)]),
    ('PNS', 'found', 0.679502, [(6.6762, -29.63983, -17.8161), (6.79636, -29.99379, -18.52161), (7.06535, -29.89278, -18.50745)]),
    ('A point', 'found', 0.725049, [(-0.01407, -74.19215, -19.76846), (-0.35608, -75.7664, -19.419), (0.13858, -76.02926, -19.36055)]),
    ('B point', 'found', 0.619227, [(10.10458, -76.3356, -59.89769), (10.31549, -74.56519, -60.51865), (9.51238, -74.22253, -60.32154)]),
    ('Pogonion', 'found', 0.502805, [(11.28031, -79.59727, -70.41574), (11.53137, -78.20881, -69.9723), (11.62942, -78.62856, -69.97115)]),
    ('Menton', 'found', 0.590674, [(12.58825, -71.6379, -85.79062), (13.1584, -71.29041, -85.25778), (13.09841, -70.92519, -85.28318)]),
    ('Gnathion', 'found', 0.588718, [(12.18742, -76.50043, -82.81788), (12.79729, -75.50297, -82.79337), (12.72618, -75.08408, -83.13246)]),
    ('Gonion R', 'found', 0.622618, [(-26.40603, -11.78639, -75.81702), (-26.39567, -13.24319, -75.46677), (-26.20096, -12.931, -75.39377)]),
    ('Gonion L', 'found', 0.646538, [(60.31879, -26.61538, -58.03397), (60.63432, -25.48364, -57.45091), (60.76945, -24.94092, -57.0228)]),
    ('Basion', 'found', 0.654145, [(13.07218, 15.08187, -21.09326), (14.15144, 14.90582, -20.68785), (14.25825, 14.92484, -20.51238)]),
]


def test_3d_model_gives_the_same_points_as_before_the_refactor(tmp_path):
    """Positions of every stage within 1e-4 mm (+ rounding of the record) of those computed on main."""
    from pacs_landmarks.dicom.series import load_series
    from pacs_landmarks.inference.model import LandmarkModel
    from pacs_landmarks.inference.phantom import make_case, write_case

    torch.set_num_threads(1)
    out = write_case(make_case(7301), tmp_path / "c", pixel_spacing=1.5, slice_thickness=2.0, size=160)
    lms = LandmarkModel.load(device="cpu").predict(load_series(sorted(out.glob("*.dcm"))))
    assert [lm.name for lm in lms] == [r[0] for r in BEFORE_REFACTOR]
    for lm, (name, status, conf, stages) in zip(lms, BEFORE_REFACTOR):
        assert lm.status == status, name
        assert lm.confidence == pytest.approx(conf, abs=2e-6), name
        got = np.asarray(lm.stage_positions)
        assert got.shape == (3, 3)
        assert np.abs(got - np.asarray(stages)).max() < 1e-4 + 1e-5, name


# --- 2D: the same sampler, networks and cascade on a projection image ---

def test_2d_sampler_reads_the_right_place_in_mm():
    from pacs_landmarks.inference.model import image_affine
    from pacs_landmarks.inference.sampling import VolumeSampler, box_points

    arr = np.zeros((50, 40), np.float32)
    r, c = 31, 12
    arr[r, c] = 1.0
    spacing = (0.2, 0.3)  # row, column
    s = VolumeSampler(arr, image_affine(spacing), outside=0.0)
    x, y = (c + 0.5) * spacing[1], (r + 0.5) * spacing[0]  # the pixel's centre in SCOORD x spacing
    assert s.sample(torch.tensor([[[x, y]]]), 0.01).item() == pytest.approx(1.0, abs=1e-5)
    assert s.sample(torch.tensor([[[x + spacing[1] / 2, y]]]), 0.01).item() == pytest.approx(0.5, abs=1e-5)
    assert s.sample(torch.tensor([[[x, y + spacing[0]]]]), 0.01).item() == pytest.approx(0.0, abs=1e-5)
    assert s.sample(torch.tensor([[[-5.0, y]]]), 0.01).item() == 0.0
    # box axes (h, w) run along (y, x): a box row is an image row
    pts = box_points(torch.tensor([[x, y]]), 5, 0.3)
    assert pts.shape == (1, 5, 5, 2)
    assert torch.allclose(pts[0, 2, 3] - pts[0, 2, 2], torch.tensor([0.3, 0.0]))
    assert torch.allclose(pts[0, 3, 2] - pts[0, 2, 2], torch.tensor([0.0, 0.3]))
    with pytest.raises(ValueError, match="3x3 affine"):
        VolumeSampler(arr, np.eye(4))


def test_2d_rotations_are_rotations():
    from pacs_landmarks.inference.sampling import random_rotations

    r = random_rotations(16, 10.0, torch.Generator().manual_seed(3), dim=2)
    assert r.shape == (16, 2, 2)
    assert torch.allclose(r @ r.transpose(1, 2), torch.eye(2).expand(16, 2, 2), atol=1e-6)
    ang = torch.rad2deg(torch.atan2(r[:, 1, 0], r[:, 0, 0])).abs()
    assert float(ang.max()) <= 10.0 + 1e-4 and float(ang.max()) > 1.0


@pytest.fixture(scope="module")
def ceph_images(tmp_path_factory):
    """One synthetic cephalogram written facing right and facing left (same pixels, mirrored)."""
    from pacs_landmarks.dicom.xray import load_xray
    from pacs_landmarks.inference.ceph_phantom import render_ceph, write_ceph

    out = tmp_path_factory.mktemp("ceph")
    image = render_ceph(27901)
    write_ceph(image, out / "right")
    write_ceph(image, out / "left", facing="left")
    return load_xray(out / "right" / "image.dcm"), load_xray(out / "left" / "image.dcm"), out


@pytest.fixture(scope="module")
def untrained_2d(tmp_path_factory):
    from pacs_landmarks.inference.model import LandmarkModel, make_untrained

    torch.set_num_threads(1)
    path = make_untrained(tmp_path_factory.mktemp("m2d") / "ceph.pt", seed=3, landmark_set="ceph19")
    return LandmarkModel.load(path, device="cpu")


def test_untrained_2d_model_predicts_in_the_images_own_coordinates(untrained_2d, ceph_images):
    from pacs_landmarks.landmark_sets import landmark_names

    right, left, _ = ceph_images
    assert (right.facing, left.facing) == ("right", "left")
    assert untrained_2d.dim == 2
    a, b = untrained_2d.predict_image(right), untrained_2d.predict_image(left)
    assert [lm.name for lm in a] == landmark_names("ceph19") == [lm.name for lm in b]
    assert a.pixel_spacing_mm == pytest.approx(right.spacing.mm) and not a.spacing_nominal
    width = right.shape[1]
    for x, y in zip(a, b):
        assert len(x.stage_positions) == 3
        assert x.status in ("found", "not_found", "outside_field_of_view")
        assert (x.position_px is None) == (x.status != "found")
        for (cx, rx), (cy, ry) in zip(x.stage_positions, y.stage_positions):
            assert cy == pytest.approx(width - cx, abs=1e-3) and ry == pytest.approx(rx, abs=1e-3)
    # the random network puts its points somewhere inside the image, not at the origin or in mm
    cols = np.array([lm.stage_positions[-1][0] for lm in a])
    assert (cols > 0).all() and (cols < width).all() and cols.std() > 1.0


def test_2d_image_without_spacing_runs_at_a_nominal_spacing(untrained_2d, ceph_images, caplog):
    import dataclasses

    from pacs_landmarks.inference.model import NOMINAL_IMAGE_HEIGHT_MM

    image = dataclasses.replace(ceph_images[0], spacing=None)
    with caplog.at_level("WARNING"):
        out = untrained_2d.predict_image(image)
    assert out.spacing_nominal and "nominal" in out.spacing_source
    assert out.pixel_spacing_mm[0] == pytest.approx(NOMINAL_IMAGE_HEIGHT_MM / image.shape[0])
    assert "no pixel spacing" in caplog.text
    assert len(out) == 19


def test_2d_stages_read_2d_crops(untrained_2d, ceph_images):
    seen = []
    hooks = [net.register_forward_pre_hook(lambda mod, args, k=k: seen.append((k, tuple(args[0].shape))))
             for k, net in enumerate(untrained_2d.cascade.nets)]
    try:
        untrained_2d.predict_image(ceph_images[0])
    finally:
        for h in hooks:
            h.remove()
    shapes = dict(seen)
    stages = untrained_2d.stages
    assert shapes[0] == (1, 3, stages[0].size, stages[0].size)  # grey + (h, w) coordinate channels
    for k in (1, 2):
        assert shapes[k] == (19, 1, stages[k].size, stages[k].size)
    conv = untrained_2d.cascade.nets[1].enc1[0][0]
    assert isinstance(conv, torch.nn.Conv2d)


def test_2d_model_refuses_a_volume_and_3d_model_an_image(untrained_2d, ceph_images):
    from pacs_landmarks.inference.model import LandmarkModel

    with pytest.raises(ValueError, match="predict_image"):
        untrained_2d.run(type("V", (), {"array": np.zeros((4, 4, 4))})())
    with pytest.raises(ValueError, match="use predict"):
        LandmarkModel.load(device="cpu").predict_image(ceph_images[0])


def test_load_by_landmark_set(tmp_path):
    from pacs_landmarks.inference.model import LandmarkModel, ModelError, default_model_path

    assert LandmarkModel.load(device="cpu").landmark_set == "craniofacial16"
    assert default_model_path("ceph19").name == "ceph19-demo.pt"
    m = LandmarkModel.load(landmark_set="ceph19", device="cpu")
    assert (m.landmark_set, m.dim) == ("ceph19", 2)
    with pytest.raises(ModelError, match="no shipped model"):
        LandmarkModel.load(landmark_set="aariz29", device="cpu")
    with pytest.raises(ModelError, match="not 'ceph19'"):
        LandmarkModel.load(default_model_path(), landmark_set="ceph19", device="cpu")


def _image(pixels, spacing=0.14):
    from pydicom.dataset import Dataset

    from pacs_landmarks.dicom.xray import CephCheck, Spacing, XRayImage

    return XRayImage(pixels.astype(np.float32), Spacing(spacing, spacing, "test", "patient"), "right", "test",
                     CephCheck("unknown"), "1.2.840.10008.5.1.4.1.1.1.1", "1.2.3", "1.2", "1.2.3.4", "DX", "-",
                     Dataset())


def _chest(rows=2500, cols=2100):
    """A chest-like radiograph: body, two dark lungs, ribs, a bright mediastinum."""
    y, x = np.mgrid[0:rows, 0:cols] / np.array([rows, cols])[:, None, None]
    v = np.where(((x - 0.5) / 0.45) ** 2 + ((y - 0.55) / 0.6) ** 2 < 1, 0.55, 0.02)
    for cx in (0.3, 0.7):
        v = np.where(((x - cx) / 0.16) ** 2 + ((y - 0.45) / 0.3) ** 2 < 1, 0.15, v)
    for k in range(10):
        v = np.where((np.abs(y - 0.2 - 0.06 * k - 0.32 * (x - 0.5) ** 2) < 0.008) & (v > 0.1), v + 0.3, v)
    v = np.where(np.abs(x - 0.5) < 0.06, 0.8, v)
    return np.clip(v + np.random.default_rng(1).normal(0, 0.03, v.shape), 0, 1)


def test_shipped_ceph_model_on_a_fresh_ceph_and_on_images_that_are_not_cephs(ceph_images):
    """The shipped ceph19-demo model: close to the truth on a held-out synthetic cephalogram facing either way;
    nothing found on a chest-like image, noise or a flat image (the whole-image check)."""
    import json

    from pacs_landmarks.inference.model import LandmarkModel

    torch.set_num_threads(1)
    model = LandmarkModel.load(landmark_set="ceph19", device="cpu")
    assert model.trained, "the shipped ceph19 model is the untrained placeholder: run `make train-demo-ceph`"
    right, left, folder = ceph_images
    for image, side in ((right, "right"), (left, "left")):
        truth = {it["name"]: it["position_px"] for it in
                 json.loads((folder / side / "landmarks.json").read_text())["landmarks"]}
        lms = model.predict_image(image)
        found = [lm for lm in lms if lm.found]
        assert len(found) >= 15, [(lm.name, lm.status, lm.reason) for lm in lms]
        err_mm = [np.hypot(*(np.subtract(lm.position_px, truth[lm.name]) * right.spacing.col_mm)) for lm in found]
        assert np.mean(err_mm) < 1.5, np.round(err_mm, 2)
    for name, pixels in (("chest", _chest()), ("noise", np.random.default_rng(3).random((2000, 1700))),
                         ("flat", np.full((2000, 1700), 0.5))):
        lms = model.predict_image(_image(pixels))
        assert not any(lm.found for lm in lms), name
        assert all("not a lateral cephalogram" in lm.reason for lm in lms if lm.status == "not_found"), name
