"""The cascade: physical-space sampling, soft-argmax, confidence on non-heads, the shipped model on phantoms,
and the train / evaluate / predict commands."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from pacs_landmarks.dicom.volume import Volume
from pacs_landmarks.inference.model import LOW_CONFIDENCE, LandmarkModel
from pacs_landmarks.inference.sampling import AIR_HU, VolumeSampler, box_points, random_rotations, soft_argmax


def _affine(spacing, origin, flip_rows=False):
    """Array index (k, j, i) -> LPS for axial slices, ``spacing`` in array order (slice, row, column);
    optionally rows running anterior (a flipped y axis)."""
    a = np.zeros((4, 4))
    a[0, 2] = spacing[2]
    a[1, 1] = -spacing[1] if flip_rows else spacing[1]
    a[2, 0] = spacing[0]
    a[:3, 3] = origin
    a[3, 3] = 1
    return a


@pytest.mark.parametrize("spacing,flip", [((1.0, 1.0, 1.0), False), ((5.0, 0.45, 0.45), False),
                                          ((0.625, 0.8, 0.8), True)])
def test_sampling_reads_the_right_place_in_mm(spacing, flip):
    shape = (24, 40, 36)
    arr = np.zeros(shape, np.float32)
    k, j, i = 11, 17, 23
    arr[k, j, i] = 1000.0
    aff = _affine(spacing, (-20.0, 30.0, 100.0), flip)
    s = VolumeSampler(arr, aff)
    lps = aff[:3, :3] @ np.array([k, j, i]) + aff[:3, 3]
    pts = torch.tensor(lps, dtype=torch.float32).view(1, 1, 1, 1, 3)
    assert s.sample(pts, 0.1).item() == pytest.approx(1000.0, abs=1e-2)
    # half a voxel away along x (columns): trilinear gives half the value
    half = torch.tensor(lps + [spacing[2] / 2, 0, 0], dtype=torch.float32).view(1, 1, 1, 1, 3)
    assert s.sample(half, 0.1).item() == pytest.approx(500.0, abs=1e-2)
    far = torch.tensor([500.0, 500.0, 500.0]).view(1, 1, 1, 1, 3)
    assert s.sample(far, 0.1).item() == AIR_HU


def test_boxes_are_in_mm_and_rotations_are_rotations():
    centre = torch.tensor([[10.0, -5.0, 40.0]])
    pts = box_points(centre, 5, 2.0)
    assert torch.allclose(pts[0, 2, 2, 2], centre[0])
    assert torch.allclose(pts[0, 2, 2, 3] - pts[0, 2, 2, 2], torch.tensor([2.0, 0, 0]))  # w -> +x
    assert torch.allclose(pts[0, 3, 2, 2] - pts[0, 2, 2, 2], torch.tensor([0, 0, 2.0]))  # d -> +z
    r = random_rotations(8, 15.0, torch.Generator().manual_seed(1))
    assert torch.allclose(r @ r.transpose(1, 2), torch.eye(3).expand(8, 3, 3), atol=1e-5)
    angles = torch.rad2deg(torch.acos(((r.diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2).clamp(-1, 1)))
    assert float(angles.max()) <= 15.0 + 1e-3 and float(angles.max()) > 1.0


def test_soft_argmax_is_sub_voxel():
    pts = box_points(torch.zeros(1, 3), 15, 1.0)
    target = torch.tensor([0.3, -1.7, 2.2])
    logits = -((pts - target) ** 2).sum(-1) / 2.0  # a Gaussian 1 voxel wide
    pos, spread, prob = soft_argmax(logits, pts)
    assert torch.allclose(pos[0], target, atol=0.02)
    assert float(spread) == pytest.approx(math.sqrt(3), abs=0.1)
    assert prob.sum().item() == pytest.approx(1.0, abs=1e-5)


@pytest.fixture(scope="module")
def demo_model():
    return LandmarkModel.load(device="cpu")


def _volume(array, spacing=(2.0, 1.0, 1.0)):
    shape = np.array(array.shape)
    origin = -np.array([spacing[2] * shape[2], spacing[1] * shape[1], spacing[0] * shape[0]]) / 2
    origin[2] += 300.0  # patient positions far from the scanner origin must not matter
    return Volume(array.astype(np.float32), _affine(spacing, origin), "1.2.3", "1.2.4", "1.2.5", [])


def test_empty_volume_gives_no_confident_landmark(demo_model):
    lms = demo_model.predict(_volume(np.full((60, 128, 128), -1000.0)))
    assert len(lms) == 16
    assert max(lm.confidence for lm in lms) < LOW_CONFIDENCE
    assert all(np.isfinite(lm.position_lps_mm).all() for lm in lms)


def test_abdomen_sized_soft_tissue_gives_no_confident_landmark(demo_model):
    # 350 x 250 mm soft-tissue ellipse (fat rim, muscle inside), 200 mm long, no bone, with noise
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[0:100, 0:300, 0:400].astype(np.float32)
    r = ((x - 200) / 175) ** 2 + ((y - 150) / 125) ** 2
    arr = np.where(r < 1, -90.0, -1000.0) + np.where(r < 0.8, 130.0, 0.0)
    arr += rng.normal(0, 15, arr.shape)
    lms = demo_model.predict(_volume(arr))
    assert max(lm.confidence for lm in lms) < LOW_CONFIDENCE


def test_predict_returns_every_stage(demo_model):
    arr = np.full((60, 128, 128), -1000.0)
    lms = demo_model.predict(_volume(arr))
    assert [lm.name for lm in lms] == demo_model.landmark_names
    for lm in lms:
        assert len(lm.stage_positions) == len(demo_model.stages)
        assert lm.stage_positions[-1] == lm.position_lps_mm
        assert 0.0 <= lm.confidence <= 1.0
