"""Shape model (Procrustes + PCA) and landmark statuses: implausible points are flagged, missing ones are
predicted from the others, absent anatomy is never a point."""
from __future__ import annotations

import numpy as np
import pytest

from pacs_landmarks.inference import phantom as ph
from pacs_landmarks.inference.cascade import CascadeOutput
from pacs_landmarks.inference.landmark import FOUND, NOT_FOUND, OUTSIDE_FIELD_OF_VIEW, Landmark
from pacs_landmarks.inference.model import landmark_statuses
from pacs_landmarks.inference.sampling import ScanRegion
from pacs_landmarks.inference.shape import ShapeModel

IDX = {n: i for i, n in enumerate(ph.NAMES)}


def _rot(deg):
    a = np.radians(deg)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])


@pytest.fixture(scope="module")
def shapes():
    # Landmarks of phantom heads (plain and with domain randomisation); measuring them is the slow part.
    return np.stack([[ph.make_case(s, variety=s % 2 == 0).landmarks[n] for n in ph.NAMES] for s in range(300, 324)])


@pytest.fixture(scope="module")
def model(shapes):
    return ShapeModel.fit_shapes(shapes[:20])


def test_fit_learns_modes_and_residuals(model):
    assert model.mean.shape == (16, 3) and 1 <= len(model.sd) <= 10
    assert np.all(model.residual_sd > 0) and np.all(model.residual_sd < 6)
    again = ShapeModel.from_json(model.to_json())
    assert np.allclose(again.mean, model.mean, atol=1e-3) and np.allclose(again.sd, model.sd, atol=1e-3)


def test_held_out_heads_fit_and_a_moved_porion_does_not(model, shapes):
    for x in shapes[20:]:
        bad, res = model.check(x, np.ones(16, bool))
        assert not bad.any(), res
        y = x.copy()
        y[IDX["Porion R"]] += [0.0, 18.0, 25.0]  # 30 mm off: the Porion asymmetry of issue 10
        bad, _ = model.check(y, np.ones(16, bool))
        assert np.flatnonzero(bad).tolist() == [IDX["Porion R"]]


def test_pose_does_not_matter(model, shapes):
    x = shapes[21] @ _rot(30).T + [40.0, -20.0, 100.0]
    bad, res = model.check(x, np.ones(16, bool))
    assert not bad.any() and np.nanmax(res) < 6


def test_missing_jaw_is_predicted_from_the_rest(model, shapes):
    x = shapes[22]
    obs = np.ones(16, bool)
    jaw = [IDX[n] for n in ("B point", "Pogonion", "Menton", "Gnathion", "Gonion R", "Gonion L")]
    obs[jaw] = False
    pred = model.predict(x, obs)
    err = np.linalg.norm(pred - x, axis=1)
    assert err[obs].max() < 4 and err[jaw].max() < 15


def test_too_few_points_for_a_shape_are_checked_in_pairs(model, shapes):
    """2-4 found points (a dental CBCT, a mandible-only scan) are too few to fit a shape; a pair whose distance
    no head has is still caught.  The case behind it: a B point found 17 mm up on an incisor, next to A point."""
    a, b, ans = IDX["A point"], IDX["B point"], IDX["ANS"]
    for x in shapes[20:]:
        for few in ([ans, a, b], [a, b], [IDX["Menton"], IDX["Gnathion"]], [IDX["Sella"], IDX["Nasion"],
                                                                            IDX["Basion"], IDX["Porion R"]]):
            cand = np.zeros(16, bool)
            cand[few] = True
            bad, _ = model.check(x, cand)
            assert not bad.any(), few
        y = x.copy()
        y[b] = x[a] + 0.3 * (x[b] - x[a])  # B point 70 % of the way up to A point
        cand = np.zeros(16, bool)
        cand[[ans, a, b]] = True
        bad, _ = model.check(y, cand)
        assert np.flatnonzero(bad).tolist() == [b]  # in both bad pairs: the one to drop
        cand[ans] = False
        bad, _ = model.check(y, cand)
        assert np.flatnonzero(bad).tolist() == [a, b]  # two points do not say which one is wrong
    # a head a fifth smaller or larger than the model's mean (a teenager, a large adult) still fits
    for scale in (0.8, 1.2):
        cand = np.zeros(16, bool)
        cand[[ans, a, b, IDX["Menton"]]] = True
        assert not model.check(shapes[21] * scale, cand)[0].any()


def test_a_found_point_too_far_from_the_few_others_is_not_found(model, shapes):
    x = shapes[22].copy()
    a, b, ans = IDX["A point"], IDX["B point"], IDX["ANS"]
    x[b] = x[a] + 0.3 * (x[b] - x[a])
    conf = np.full(16, 0.8)
    presence = np.zeros(16)
    presence[[ans, a, b]] = 1.0
    status, reason, _ = landmark_statuses(_output(x, conf, presence), model)
    assert status[b] == NOT_FOUND and reason[b] == "implausible position"
    assert status[a] == FOUND and status[ans] == FOUND


def _output(positions, confidence, presence=None, inside=None, edge=None):
    n = positions.shape[0]
    return CascadeOutput(np.stack([positions] * 3), np.ones((3, n)), np.asarray(confidence, float), 500.0, {},
                         presence, inside if inside is not None else np.ones(n), edge_mm=edge,
                         reseeded=np.zeros(n, bool))


def test_statuses_presence_inside_confidence_and_plausibility(model, shapes):
    x = shapes[23].copy()
    x[IDX["Porion L"]] += [0.0, -20.0, 22.0]
    conf = np.full(16, 0.8)
    conf[IDX["Nasion"]] = 0.1
    presence = np.ones(16)
    presence[IDX["Menton"]] = 0.2
    inside = np.ones(16)
    inside[IDX["Gonion R"]] = 0.3
    status, reason, new_conf = landmark_statuses(_output(x, conf, presence, inside), model)
    assert status[IDX["Menton"]] == OUTSIDE_FIELD_OF_VIEW and status[IDX["Gonion R"]] == OUTSIDE_FIELD_OF_VIEW
    assert status[IDX["Nasion"]] == NOT_FOUND and reason[IDX["Nasion"]] == "low confidence"
    assert status[IDX["Porion L"]] == NOT_FOUND and reason[IDX["Porion L"]] == "implausible position"
    assert new_conf[IDX["Porion L"]] == pytest.approx(0.4)
    assert (status == FOUND).sum() == 12


def _scan(points, bottom_z=None, top_z=None):
    """A 1 mm box scan around ``points`` (L, 3) with 20 mm to spare, cut at LPS z = ``bottom_z`` / ``top_z``
    (mm; z grows towards the head) where given."""
    lo, hi = points.min(0) - 20.0, points.max(0) + 20.0
    if bottom_z is not None:
        lo[2] = bottom_z
    if top_z is not None:
        hi[2] = top_z
    affine = np.eye(4)
    affine[:3, :3] = np.eye(3)[:, ::-1]  # array (k, j, i) -> LPS (z, y, x)
    affine[:3, 3] = lo
    return ScanRegion(affine, tuple(int(v) for v in np.ceil(hi - lo)[::-1] + 1))


def _seen(points, confidence, region):
    """What the cascade reports for ``points`` in ``region``: every crop inside, presence 1."""
    out = _output(points, confidence, np.ones(len(points)), np.ones(len(points)), region.depth_mm(points))
    out.region = region
    return out


def test_a_point_at_the_edge_of_the_scan_is_not_found_or_cut_off(model, shapes):
    """A scan cut 3 mm above Menton: the cascade puts Menton on the last slice, and B point (in the scan,
    well above the cut) 2 mm above it.  Both are at the edge, neither is found; the found landmarks put Menton
    below the scan (cut off) and B point inside it (not found)."""
    x = shapes[3]
    bottom = float(x[IDX["Menton"], 2]) + 3.0
    region = _scan(x, bottom_z=bottom)
    seen = x.copy()
    seen[IDX["Menton"], 2] = bottom + 1.0
    seen[IDX["B point"], 2] = bottom + 2.0
    assert region.depth_mm(x[IDX["B point"]]) > 8.0
    conf = np.full(16, 0.8)
    status, reason, _ = landmark_statuses(_seen(seen, conf, region), model, min_edge_mm=5.0)
    assert status[IDX["Menton"]] == OUTSIDE_FIELD_OF_VIEW
    assert reason[IDX["Menton"]] == "at the edge of the scanned volume (cut off by it)"
    assert status[IDX["B point"]] == NOT_FOUND and reason[IDX["B point"]] == "at the edge of the scanned volume"
    # without the scanned region (a model file before it), the edge alone says not found
    out = _seen(seen, conf, region)
    out.region = None
    status, reason, _ = landmark_statuses(out, model, min_edge_mm=5.0)
    assert status[IDX["Menton"]] == NOT_FOUND and reason[IDX["Menton"]] == "at the edge of the scanned volume"
    # off (a cephalogram's statuses): Menton is found, and B point, moved down to the edge, does not fit the others
    status, reason, _ = landmark_statuses(_seen(seen, conf, region), model)
    assert status[IDX["Menton"]] == FOUND and reason[IDX["B point"]] == "implausible position"


def test_anatomy_that_the_found_landmarks_put_beyond_the_edge_is_outside(model, shapes):
    """A mandible-only scan: the presence output says the maxilla is in it, the cascade has put ANS, PNS and
    A point just below the first slice with low confidence.  The found jaw puts them beyond the scan's top."""
    x = shapes[23]
    jaw = [IDX[n] for n in ("B point", "Pogonion", "Menton", "Gnathion", "Gonion R", "Gonion L")]
    top = float(x[jaw, 2].max()) + 8.0  # LPS z grows towards the head: the jaw is in, ANS is above
    upper = [i for i in range(16) if x[i, 2] > top + 2.0 + 10.0]  # well beyond, whatever the fit's error
    assert {IDX["ANS"], IDX["Sella"]} <= set(upper)
    region = _scan(x, top_z=top)
    seen = x.copy()
    seen[upper, 2] = top - 6.0  # the cascade's guess: just inside the edge, deep enough for the edge rule
    conf = np.full(16, 0.1)
    conf[jaw] = 0.8
    conf[IDX["Gonion R"]] = 0.1  # in the scan, not confident: it stays not found, not called absent
    out = _seen(seen, conf, region)
    status, reason, _ = landmark_statuses(out, model, min_edge_mm=5.0)
    assert [i for i in range(16) if status[i] == FOUND] == sorted(set(jaw) - {IDX["Gonion R"]})
    assert status[IDX["Gonion R"]] == NOT_FOUND and reason[IDX["Gonion R"]] == "low confidence"
    for i in upper:
        assert status[i] == OUTSIDE_FIELD_OF_VIEW, ph.NAMES[i]
        assert reason[i] == "not in the scanned volume (the found landmarks put it beyond the edge)"
    # with fewer than 3 found there is no configuration to read, and a cephalogram's statuses skip the rule
    few = conf.copy()
    few[jaw[:4]] = 0.1
    assert not (landmark_statuses(_seen(seen, few, region), model, min_edge_mm=5.0)[0][upper] ==
                OUTSIDE_FIELD_OF_VIEW).any()
    assert not (landmark_statuses(out, model)[0][upper] == OUTSIDE_FIELD_OF_VIEW).any()


def test_the_found_landmarks_overrule_a_presence_output_that_calls_inner_anatomy_absent(model, shapes):
    """The presence output misses an Orbitale 8 mm inside a scan's top edge; the cascade's point is right
    and the found landmarks put it inside too: not found (no point, but not "not in the scan" either).
    Menton, which the scan's bottom cuts off, stays absent even with its point placed deep inside."""
    x = shapes[5]
    orb, men = IDX["Orbitale L"], IDX["Menton"]
    top = float(x[orb, 2]) + 8.0
    bottom = float(x[men, 2]) + 12.0
    region = _scan(x, bottom_z=bottom, top_z=top)
    seen = x.copy()
    seen[men, 2] = bottom + 8.0  # the cascade's guess for absent anatomy, deep inside
    presence = np.ones(16)
    presence[[orb, men]] = 0.4
    out = _seen(seen, np.full(16, 0.8), region)
    out.presence = presence
    status, reason, _ = landmark_statuses(out, model, min_edge_mm=5.0)
    assert status[orb] == NOT_FOUND
    assert reason[orb] == "presence uncertain (the found landmarks put it inside the scanned volume)"
    assert status[men] == OUTSIDE_FIELD_OF_VIEW and reason[men] == "not in the scanned volume"
    # a cephalogram's statuses (no edge rules): the presence output decides
    assert landmark_statuses(out, model)[0][orb] == OUTSIDE_FIELD_OF_VIEW


def test_statuses_without_presence_or_shape_model_fall_back_to_the_crop_rule(shapes):
    inside = np.ones(16)
    inside[IDX["Menton"]] = 0.2
    status, _, _ = landmark_statuses(_output(shapes[0], np.full(16, 0.8), None, inside), None)
    assert status[IDX["Menton"]] == OUTSIDE_FIELD_OF_VIEW and (status == FOUND).sum() == 15


def test_landmark_refuses_found_without_position():
    with pytest.raises(ValueError):
        Landmark("Nasion", None)
    with pytest.raises(ValueError):
        Landmark("Nasion", (0, 0, 0), status="lost")
    assert not Landmark("Menton", None, 0.0, status=OUTSIDE_FIELD_OF_VIEW).found


# ---------------------------------------------------------------------------------------------- shape prior
def _noisy(truth, sd, rng):
    """Image points: truth + noise of ``sd`` (L, 3) mm per axis; their maps' variances say so up to a factor
    of 4 (a map's width is not its error)."""
    return truth + rng.normal(size=truth.shape) * sd, (2.0 * sd) ** 2


def _prior_data(model, truths, sd, rng):
    pts, var, est, frames = [], [], [], []
    for t in truths:
        p, v = _noisy(t, sd, rng)
        pts.append(p)
        var.append(v)
        est.append(model.leave_one_out(p, np.ones(16, bool)))
        frames.append(model.frame(p, np.ones(16, bool)))
    return [np.stack(a) for a in (pts, var, est, frames)]


def test_shape_prior_corrects_the_axis_the_image_cannot_tell(model, shapes):
    """Pogonion's map is wide from side to side (a flat chin): the prior takes x from the other landmarks and
    leaves y and z, and Sella, whose image is sharp, to the image."""
    from pacs_landmarks.inference.shape import ShapePrior

    rng = np.random.default_rng(0)
    sd = np.full((16, 3), 0.3)
    sd[IDX["Pogonion"], 0] = 2.5
    truths = np.concatenate([shapes[:20]] * 3)  # the calibration heads (the shape model's own are enough here)
    pts, var, est, frames = _prior_data(model, truths, sd, rng)
    prior = ShapePrior.fit(pts, var, est, truths, frames)
    assert prior.cases == 60 and np.all(prior.image_scale > 0) and np.isfinite(prior.shape_sd).all()
    assert prior.image_scale[IDX["Pogonion"]] == pytest.approx(0.25, rel=0.35)

    held = np.concatenate([shapes[20:]] * 10)
    pts, var, est, frames = _prior_data(model, held, sd, np.random.default_rng(1))
    fused = np.stack([prior.fuse(p, v, e, f) for p, v, e, f in zip(pts, var, est, frames)])
    pog, sel = IDX["Pogonion"], IDX["Sella"]
    before, after = np.abs(pts - held), np.abs(fused - held)
    assert after[:, pog, 0].mean() < 0.6 * before[:, pog, 0].mean()  # x: the configuration wins
    assert after[:, pog, 1:].mean() < 1.2 * before[:, pog, 1:].mean()  # y, z: about what the image said
    assert after[:, sel].mean() < 1.2 * before[:, sel].mean()
    # no estimate (NaN): the image's point, untouched
    nan = np.full_like(est[0], np.nan)
    assert np.array_equal(prior.fuse(pts[0], var[0], nan, frames[0]), pts[0])
    again = ShapePrior.from_json(prior.to_json())
    assert np.allclose(again.image_scale, prior.image_scale, atol=1e-4)
    assert np.allclose(again.shape_sd, prior.shape_sd, atol=1e-4)


def test_shape_prior_turns_with_the_head(model, shapes):
    """The estimate's uncertainty is along the head's axes: a head turned 30 degrees gets the same answer,
    turned (the image's variance here is the same along every axis)."""
    from pacs_landmarks.inference.shape import ShapePrior

    prior = ShapePrior(np.ones(16), np.tile([0.5, 3.0, 1.0], (16, 1)))
    rng = np.random.default_rng(2)
    truth = shapes[21]
    p = truth + rng.normal(size=truth.shape)
    est = model.leave_one_out(p, np.ones(16, bool))
    upright = prior.fuse(p, np.ones((16, 3)), est, model.frame(p, np.ones(16, bool)))
    r = _rot(30)
    pr = p @ r.T + [40.0, -20.0, 100.0]
    est_r = model.leave_one_out(pr, np.ones(16, bool))
    turned = prior.fuse(pr, np.ones((16, 3)), est_r, model.frame(pr, np.ones(16, bool)))
    assert np.allclose(turned, upright @ r.T + [40.0, -20.0, 100.0], atol=1e-3)


def test_shape_prior_in_2d(shapes):
    """The same prior on a projection image's points (a cephalogram's (x, y) mm): the dimension is a parameter."""
    from pacs_landmarks.inference.shape import ShapePrior

    flat = shapes[:, :, 1:]  # lateral view: (y, z)
    model2 = ShapeModel.fit_shapes(flat[:20])
    prior = ShapePrior(np.ones(16), np.tile([0.5, 2.0], (16, 1)))
    p = flat[22] + np.random.default_rng(3).normal(size=flat[22].shape)
    est = model2.leave_one_out(p, np.ones(16, bool))
    frame = model2.frame(p, np.ones(16, bool))
    assert frame.shape == (2, 2) and np.allclose(frame @ frame.T, np.eye(2))
    wide = np.tile([25.0, 0.01], (16, 1))  # the image knows y, not x
    fused = prior.fuse(p, wide, est, frame)
    assert np.abs(fused[:, 1] - p[:, 1]).max() < 0.05  # y stays the image's
    assert np.abs(fused[:, 0] - est[:, 0]).mean() < np.abs(p[:, 0] - est[:, 0]).mean() / 5  # x is the estimate's


def test_damaged_shape_prior_is_refused():
    from pacs_landmarks.inference.shape import ShapePrior

    good = ShapePrior(np.ones(16), np.ones((16, 3))).to_json()
    for bad in ({**good, "kind": "other"}, {**good, "image_scale": [-1.0] * 16},
                {**good, "shape_sd": [[0.0, 1.0, 1.0]] * 16}, {**good, "shape_sd": [[1.0, 1.0, 1.0]] * 15}):
        with pytest.raises(ValueError):
            ShapePrior.from_json(bad)


def test_plausibility_is_judged_on_the_image_point_not_the_fused_one(model, shapes):
    """The prior pulls a point towards the others; a wild image point must still be flagged, not hidden."""
    x = shapes[23].copy()
    wild = x.copy()
    wild[IDX["Porion L"]] += [0.0, -20.0, 22.0]
    out = _output(x, np.full(16, 0.8), np.ones(16))
    out.image_positions = wild  # what the image said; positions[-1] is after the prior
    status, reason, _ = landmark_statuses(out, model)
    assert status[IDX["Porion L"]] == NOT_FOUND and reason[IDX["Porion L"]] == "implausible position"
