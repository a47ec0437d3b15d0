"""Mirror test-time augmentation (model metadata ``tta: "mirror"``, ``cascade.run_cascade(mirror=...)``):
the mirrored sampler view, the swap of bilateral landmarks, and the shipped model on a symmetric head."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pacs_landmarks.landmark_sets import landmark_names, mirror_names


def _affine(spacing=(2.0, 0.8, 0.7), origin=(-11.0, 5.0, 40.0)) -> np.ndarray:
    """Array index (k, j, i) -> LPS: i along x, j along y, k along z."""
    aff = np.zeros((4, 4))
    aff[0, 2], aff[1, 1], aff[2, 0] = spacing[2], spacing[1], spacing[0]
    aff[:3, 3] = origin
    aff[3, 3] = 1.0
    return aff


def test_mirrored_sampler_reads_a_voxel_at_its_mirror_image():
    from pacs_landmarks.inference.sampling import VolumeSampler

    arr = np.full((6, 9, 11), -1000.0, np.float32)
    arr[2, 4, 2] = 1500.0  # one bright voxel, near the patient's right
    aff = _affine()
    sampler = VolumeSampler(arr, aff)
    voxel = aff @ np.array([2, 4, 2, 1.0])
    x0 = 3.3  # any sagittal plane: the view need not map voxels onto voxels
    view = sampler.mirrored(x0)
    mirror_pt = voxel[:3].copy()
    mirror_pt[0] = 2 * x0 - mirror_pt[0]

    def read(s, p, spacing=0.7):
        # one point as a 1 x 1 x 1 box (the sampler reads boxes of points)
        return float(s.sample(torch.tensor(np.reshape(p, (1, 1, 1, 3)), dtype=torch.float32), spacing).ravel()[0])

    assert read(sampler, voxel[:3]) == pytest.approx(1500.0, abs=0.1)
    assert read(view, mirror_pt) == pytest.approx(1500.0, abs=0.1)  # the voxel seen in the mirror
    assert read(view, voxel[:3]) == pytest.approx(-1000.0, abs=0.1)  # and no longer where it was
    assert read(sampler, mirror_pt) == pytest.approx(-1000.0, abs=0.1)
    # y and z are untouched, the array is shared (no copy), the original keeps its own geometry
    assert np.allclose(view.affine[1:], aff[1:]) and view.volume is sampler.volume
    assert np.allclose(sampler.affine, aff)
    # the view's coarse copies are the original's (made once), read through the mirrored affine
    assert read(view, mirror_pt, 4.0) > -1000.0 and read(view, voxel[:3], 4.0) == pytest.approx(-1000.0, abs=0.1)
    assert view._pooled is sampler._pooled


def test_mirror_names_swap_bilateral_pairs_and_nothing_else():
    names = landmark_names("craniofacial16")
    perm = mirror_names(names)
    swapped = {names[i]: names[j] for i, j in enumerate(perm) if i != j}
    assert swapped == {"Orbitale R": "Orbitale L", "Orbitale L": "Orbitale R", "Porion R": "Porion L",
                       "Porion L": "Porion R", "Gonion R": "Gonion L", "Gonion L": "Gonion R"}
    assert [perm[j] for j in perm] == list(range(len(names)))  # its own inverse


@pytest.fixture(scope="module")
def symmetric_head(tmp_path_factory):
    """A phantom head with no asymmetry, pose, noise or teeth left out: its own mirror image about x = 0."""
    from pacs_landmarks.dicom.series import load_series
    from pacs_landmarks.inference.phantom import make_case, write_case

    case = make_case(7301, asymmetry_mm=0.0, rotation_deg=(0, 0, 0), translation_mm=(0, 0, 0),
                     missing_teeth=[], fillings=[], noise_hu=0.0)
    out = write_case(case, tmp_path_factory.mktemp("sym") / "c", pixel_spacing=1.5, slice_thickness=2.0,
                     size=160)
    return case, load_series(sorted(out.glob("*.dcm")))


def test_symmetric_head_gives_the_same_points_with_and_without_mirror_tta(symmetric_head):
    from pacs_landmarks.inference.model import LandmarkModel

    torch.set_num_threads(1)
    case, volume = symmetric_head
    truth = np.stack(list(case.landmarks.values()))
    assert np.abs(truth[:, 0] + truth[mirror_names(list(case.landmarks))][:, 0]).max() < 0.05  # truly symmetric
    model = LandmarkModel.load(device="cpu")
    assert model.tta is None  # the shipped model runs once (TTA did not win on the real head: docs/accuracy.md)
    plain = model.run(volume)
    tta = model.with_tta("mirror").run(volume)
    assert plain.disagreement is None and tta.disagreement.shape == (16,)
    assert abs(tta.centre[0]) < 1.0  # the mirror plane is the head's midline
    # Orbitale R and L are ~60 mm apart: a missed R<->L swap would put both near the midline
    assert np.linalg.norm(tta.positions[-1] - plain.positions[-1], axis=-1).max() < 0.5
    assert np.linalg.norm(tta.positions - plain.positions, axis=-1).max() < 2.0  # the 4 mm global stage too
    assert tta.disagreement.max() < 1.0
    assert np.allclose(tta.pass_confidence[0], plain.confidence)
    # confidence: the passes' geometric mean, cut by the disagreement
    base = np.sqrt(tta.pass_confidence[0] * tta.pass_confidence[1])
    assert np.all(tta.confidence <= base + 1e-12) and np.all(tta.confidence > 0.8 * base)


def test_mirror_confidence_falls_with_disagreement():
    from pacs_landmarks.inference.cascade import MIRROR_DISAGREEMENT_MM, mirror_confidence

    conf = mirror_confidence(np.array([[0.6, 0.6, 0.6], [0.6, 0.6, 0.15]]), np.array([0.0, 6.0, 0.0]))
    assert conf == pytest.approx([0.6, 0.6 * np.exp(-6.0 / MIRROR_DISAGREEMENT_MM), 0.3])


def test_mirror_is_for_ct_only_and_must_be_a_permutation(tmp_path):
    from pacs_landmarks.inference.cascade import Cascade, default_stages, run_cascade
    from pacs_landmarks.inference.model import LandmarkModel, ModelError, make_untrained, read_model_file, \
        save_model_file

    c2 = Cascade(default_stages(2), 19, 2, "xray")
    with pytest.raises(ValueError, match="3D"):
        run_cascade(c2, c2.sampler(np.zeros((64, 64), np.float32), np.eye(3)), mirror=list(range(19)))
    c3 = Cascade(default_stages(3), 16, 3, "HU")
    vol = np.full((20, 20, 20), -1000.0, np.float32)
    with pytest.raises(ValueError, match="permutation"):
        run_cascade(c3, c3.sampler(vol, np.eye(4)), mirror=[0] * 16)

    path = make_untrained(tmp_path / "ct.pt")
    meta, _ = read_model_file(path)
    save_model_file(tmp_path / "bad.pt", LandmarkModel.load(path, device="cpu").cascade, dict(meta, tta="flip"))
    with pytest.raises(ModelError, match="unknown test-time augmentation 'flip'"):
        LandmarkModel.load(tmp_path / "bad.pt", device="cpu")
    ceph = make_untrained(tmp_path / "ceph.pt", landmark_set="ceph19")
    meta2, _ = read_model_file(ceph)
    save_model_file(tmp_path / "ceph-tta.pt", LandmarkModel.load(ceph, device="cpu").cascade,
                    dict(meta2, tta="mirror"))
    with pytest.raises(ModelError, match="CT"):
        LandmarkModel.load(tmp_path / "ceph-tta.pt", device="cpu")
    with pytest.raises(ValueError, match="CT"):
        LandmarkModel.load(ceph, device="cpu").with_tta("mirror")


def test_calibrate_records_the_tta_it_was_calibrated_with(tmp_path):
    from pacs_landmarks.inference.evaluate import calibrate_model
    from pacs_landmarks.inference.model import LandmarkModel, make_untrained

    model = LandmarkModel.load(make_untrained(tmp_path / "ct.pt"), device="cpu").with_tta("mirror")
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.2, 0.8, (4, 16))
    err = np.where(conf > 0.5, 1.0, 4.0)  # good above 0.5, bad below
    result = {"cases": 4, "confidences": conf.tolist(), "errors": np.stack([err] * 3, 1).tolist()}
    cal = calibrate_model(model, result, tmp_path / "cal.pt")
    assert cal["tta"] == "mirror" and 0.4 < cal["low_confidence"] <= 0.51
    again = LandmarkModel.load(tmp_path / "cal.pt", device="cpu")
    assert again.tta == "mirror" and again.metadata["calibration"]["tta"] == "mirror"
    cal = calibrate_model(again.with_tta(None), result, tmp_path / "plain.pt")
    assert LandmarkModel.load(tmp_path / "plain.pt", device="cpu").tta is None and cal["tta"] is None
