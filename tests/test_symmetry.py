"""The head's mirror symmetry (``inference.symmetry``): the chin's midline from the bone around it, and the
Orbitales moved as a pair onto the symmetry plane of both orbits."""
from __future__ import annotations

import numpy as np
import pytest

from pacs_landmarks.inference import phantom as ph
from pacs_landmarks.inference.sampling import VolumeSampler
from pacs_landmarks.inference.shape import ShapeModel
from pacs_landmarks.inference.symmetry import (MAX_MOVE_MM, SymmetryRules, lateral_axis, onto_midline,
                                               pairs_onto_midplane)
from pacs_landmarks.landmark_sets import mirror_names

CHIN = np.array([n in ("B point", "Pogonion", "Menton", "Gnathion") for n in ph.NAMES])
ORB_R, ORB_L = ph.NAMES.index("Orbitale R"), ph.NAMES.index("Orbitale L")


def _chin_volume(case, spacing=1.0):
    """The phantom's HU on a box of 90 x 70 x 80 mm around its chin (noise-free), as a sampler."""
    centre = np.mean([case.landmarks[n] for n in ("Pogonion", "Menton", "B point")], axis=0)
    shape = (int(80 / spacing), int(70 / spacing), int(90 / spacing))  # (z, y, x)
    aff = np.eye(4)
    aff[:3, :3] = np.diag([spacing] * 3)[:, ::-1]  # (k, j, i) -> (x, y, z) mm
    aff[:3, 3] = centre - np.array([45.0, 25.0, 40.0])
    k, j, i = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    lps = np.stack([k, j, i], -1) @ aff[:3, :3].T + aff[:3, 3]
    return VolumeSampler(case.hu_at(lps).astype(np.float32), aff)


@pytest.fixture(scope="module")
def case():
    return ph.make_case(31, rotation_deg=[0.0, 0.0, 12.0])  # the head turned 12 degrees about the vertical


def _points(case):
    return np.stack([case.landmarks[n] for n in ph.NAMES])


def _lateral(points):
    """The head's true left-right axis: from Porion R to Porion L."""
    lr = points[ph.NAMES.index("Porion L")] - points[ph.NAMES.index("Porion R")]
    return lr / np.linalg.norm(lr)


def test_lateral_axis_follows_the_head():
    shapes = np.stack([[ph.make_case(s).landmarks[n] for n in ph.NAMES] for s in range(300, 308)])
    model = ShapeModel.fit_shapes(shapes)
    turned = ph.make_case(31, rotation_deg=[0.0, 0.0, 12.0])
    pts = _points(turned)
    every = np.ones(len(pts), bool)
    lr = lateral_axis(model.frame(pts, every), model.mean, mirror_names(ph.NAMES))
    assert abs(lr @ _lateral(pts)) > 0.99


def test_chin_points_that_wander_sideways_come_back_onto_the_midline(case):
    sampler = _chin_volume(case)
    truth = _points(case)
    lateral = _lateral(truth)
    wandered = truth.copy()
    wandered[CHIN] += np.array([2.5, -3.0, 1.5, 3.5])[:, None] * lateral  # each its own way, as the stages do
    moved, score = onto_midline(wandered, CHIN, sampler, [lateral])
    assert score > 0.9
    err = np.linalg.norm(moved - truth, axis=1)
    assert err[CHIN].max() < 0.5, err[CHIN]
    assert np.array_equal(moved[~CHIN], wandered[~CHIN])  # the other landmarks are not touched


def test_no_symmetry_no_move(case):
    truth = _points(case)
    lateral = np.array([1.0, 0.0, 0.0])
    wandered = truth.copy()
    wandered[CHIN] += 2.0 * lateral
    # a box of noise has no mirror plane: the points stay where the stages put them
    rng = np.random.default_rng(0)
    aff = np.eye(4)
    aff[:3, :3] = np.eye(3)[:, ::-1]
    aff[:3, 3] = truth[CHIN].mean(0) - 50.0
    noise = VolumeSampler(rng.normal(300.0, 500.0, (100, 100, 100)).astype(np.float32), aff)
    moved, score = onto_midline(wandered, CHIN, noise, [lateral])
    assert score < 0.9
    assert np.array_equal(moved, wandered)


def test_a_point_far_from_the_plane_is_left_alone(case):
    sampler = _chin_volume(case)
    truth = _points(case)
    lateral = _lateral(truth)
    wandered = truth.copy()
    pog = ph.NAMES.index("Pogonion")
    wandered[pog] += (MAX_MOVE_MM + 2.0) * lateral
    moved, _ = onto_midline(wandered, CHIN, sampler, [lateral])
    assert np.array_equal(moved[pog], wandered[pog])
    others = CHIN.copy()
    others[pog] = False
    assert np.linalg.norm(moved[others] - truth[others], axis=1).max() < 0.5


def test_the_plane_is_found_when_the_axis_it_starts_from_is_off(case):
    """On a partial scan the head's axis comes from few landmarks: a start 8 degrees off still finds the plane."""
    sampler = _chin_volume(case)
    truth = _points(case)
    lateral = _lateral(truth)
    a = np.radians(8.0)
    off = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]]) @ lateral
    wandered = truth.copy()
    wandered[CHIN] += np.array([-2.0, 2.5, 3.0, -1.0])[:, None] * lateral
    moved, score = onto_midline(wandered, CHIN, sampler, [off])
    assert score > 0.9
    assert np.linalg.norm(moved[CHIN] - truth[CHIN], axis=1).max() < 0.6



def _orbit_volume(case, spacing=1.0, below_mm=35.0):
    """The phantom's HU on a box of 120 x 90 mm around its Orbitales (noise-free), from ``below_mm`` under their
    midpoint to 45 mm above it, as a sampler."""
    centre = (_points(case)[ORB_R] + _points(case)[ORB_L]) / 2
    shape = (int((below_mm + 45.0) / spacing), int(90 / spacing), int(120 / spacing))  # (z, y, x)
    aff = np.eye(4)
    aff[:3, :3] = np.diag([spacing] * 3)[:, ::-1]
    aff[:3, 3] = centre - np.array([60.0, 30.0, below_mm])
    k, j, i = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    lps = np.stack([k, j, i], -1) @ aff[:3, :3].T + aff[:3, 3]
    return VolumeSampler(case.hu_at(lps).astype(np.float32), aff)


def _rules(pairs=("Orbitale R",), chin=("Pogonion",)):
    meta = {"landmark_names": ph.NAMES, "chin_midline": list(chin), "midplane_pairs": list(pairs)}
    return SymmetryRules.from_metadata(meta, mirror_names(ph.NAMES), 5.0)


def test_orbitales_that_shift_sideways_together_come_back_as_a_pair(case):
    truth = _points(case)
    lateral = _lateral(truth)
    rules = _rules(pairs=["Orbitale R", "Orbitale L"])  # either side names the pair, once
    assert rules.pairs == ((ORB_R, ORB_L),) and rules.chin.sum() == 1 and rules.min_depth_mm == 5.0
    shifted = truth.copy()
    shifted[[ORB_R, ORB_L]] += 2.5 * lateral  # both the same way, as the local stages do on a partial scan
    shifted[ORB_R] += np.array([0.0, 0.0, 1.0])  # and one also lower: that the plane does not know
    moved, score = pairs_onto_midplane(shifted, rules.pairs, _orbit_volume(case), [lateral])
    assert score > 0.9
    # the side-to-side shift is gone; the pair's own difference, along the plane, is kept
    assert abs((moved[ORB_R] - truth[ORB_R]) @ lateral) < 0.4
    assert abs((moved[ORB_L] - truth[ORB_L]) @ lateral) < 0.4
    assert np.allclose(moved[ORB_R] - moved[ORB_L], shifted[ORB_R] - shifted[ORB_L])
    others = np.ones(len(truth), bool)
    others[[ORB_R, ORB_L]] = False
    assert np.array_equal(moved[others], shifted[others])


def test_an_asymmetric_pair_keeps_its_asymmetry(case):
    truth = _points(case)
    lateral = _lateral(truth)
    asymmetric = truth.copy()
    asymmetric[ORB_R] -= 1.5 * lateral  # one orbit wider than the other: the midpoint moves 0.75 mm
    moved, _ = pairs_onto_midplane(asymmetric, _rules().pairs, _orbit_volume(case), [lateral])
    assert np.allclose(moved[ORB_R] - moved[ORB_L], asymmetric[ORB_R] - asymmetric[ORB_L])
    assert abs(((moved[ORB_R] + moved[ORB_L]) / 2 - (truth[ORB_R] + truth[ORB_L]) / 2) @ lateral) < 0.4


def test_a_cut_across_the_orbits_is_no_anatomy(monkeypatch):
    """A routine head's lower edge crosses the orbit box askew when the head is rolled: only samples whose
    mirror is inside the scan too count, so the plane is found as on a whole head."""
    rolled = ph.make_case(31, rotation_deg=[0.0, 10.0, 12.0])
    truth = _points(rolled)
    lateral = _lateral(truth)
    cut = _orbit_volume(rolled, below_mm=10.0)  # the series ends 10 mm under the Orbitales
    shifted = truth.copy()
    shifted[[ORB_R, ORB_L]] += 2.5 * lateral
    moved, score = pairs_onto_midplane(shifted, _rules().pairs, cut, [lateral])
    assert score > 0.9
    assert abs((moved[ORB_R] - truth[ORB_R]) @ lateral) < 0.4
    assert abs((moved[ORB_L] - truth[ORB_L]) @ lateral) < 0.4
    # counting the samples beyond the cut as well, the same box scores lower
    monkeypatch.setattr(cut, "chord", lambda o, d: (np.full(o.shape[:-1], -np.inf), np.full(o.shape[:-1], np.inf)))
    _, plain = pairs_onto_midplane(shifted, _rules().pairs, cut, [lateral])
    assert plain < score - 0.03


def test_a_pair_far_from_the_plane_is_left_alone(case):
    truth = _points(case)
    lateral = _lateral(truth)
    far = truth.copy()
    far[[ORB_R, ORB_L]] += (MAX_MOVE_MM + 1.5) * lateral
    moved, score = pairs_onto_midplane(far, _rules().pairs, _orbit_volume(case), [lateral])
    assert score > 0.9 and np.array_equal(moved, far)


@pytest.mark.parametrize("pairs, chin, message", [
    (["Sella"], [], "no counterpart"),
    (["Orbitale X"], [], "unknown: Orbitale X"),
    ([], ["Chin"], "unknown: Chin"),
])
def test_rules_that_do_not_fit_the_set_are_refused(pairs, chin, message):
    with pytest.raises(ValueError, match=message):
        _rules(pairs, chin)
    assert _rules([], []) is None  # no rule asked for
