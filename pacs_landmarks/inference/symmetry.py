"""The head's mirror symmetry where a local crop cannot see it: the chin's midline, and the orbits' midplane.

The front of the chin is a broad curve (a radius of about 35 mm in the axial plane): 3 mm to the side of its
most anterior point the bone lies only 0.1 mm further back, far below what a local crop can resolve, so the
local stages place Pogonion, Menton, Gnathion and B point well from front to back and from top to bottom but
wander from side to side.  The symphysis as a whole, with both halves of the mandibular arch, is mirror
symmetric about the midsagittal plane, and that plane is sharp: the image correlates with its own mirror image
only when the mirror is there.  A reader finds the chin's midline the same way, from both sides of the arch.

``mirror_plane`` finds the plane -- its normal near the head's left-right axis, its offset -- by normalised
cross-correlation of a box of bone around the chin with its mirror image (intensities clipped to soft
tissue .. dense bone, so metal streaks and air weigh no more than bone); ``onto_midline`` moves the chin points
onto it.  The plane is the chin's own, so a chin that deviates from the rest of the face keeps its deviation.

Orbitale, the lowest point of the orbital rim, lies on a floor that is as flat from side to side, and the local
stages move both Orbitales sideways together (2-3 mm, the same way on both sides) on scans without the jaw,
where the shape prior does not apply.  Both orbits with the nose between them are mirror symmetric too:
``pairs_onto_midplane`` finds that plane the same way, in a larger box around the pair, and moves the pair
together until its midpoint lies on it, keeping the difference between the two sides, which is the head's own
asymmetry.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pacs_landmarks.dicom.volume import axis_rotation


@dataclass(frozen=True)
class MirrorBox:
    """A box around a mirror-symmetric structure, in mm from its centre: half-width across the plane, and the
    range along the patient's posterior (back) and superior (up) directions; ``fine_step_mm``: the grid's step
    in the plane for the fine search (``mirror_plane``)."""
    half_width_mm: float
    back_mm: tuple[float, float]
    up_mm: tuple[float, float]
    fine_step_mm: float = 2.0


# Around the mean of the chin points: both sides of the arch, the symphysis and alveolus behind the chin's front.
CHIN_BOX = MirrorBox(30.0, (-10.0, 25.0), (-15.0, 20.0))
# Around the Orbitales' midpoint: both orbits to their lateral rims, the nasal cavity and ethmoid between them,
# the orbits' roofs and the maxillary sinuses' tops.
ORBIT_BOX = MirrorBox(50.0, (-15.0, 45.0), (-20.0, 30.0), fine_step_mm=4.0)
# Grids in mm: across the plane, and in it for the search over directions (coarse: 4 mm reads the copy that
# stage 1 of the cascade averaged already) and around the best (fine); offsets 0.5 mm apart, the peak refined
# by a parabola.
COARSE_STEP_MM = 4.0
ACROSS_STEP_MM = 1.0
OFFSETS_MM = np.arange(-8.0, 8.01, 0.5)
# Directions of the plane's normal tried around each starting axis: turned about the vertical (yaw) and about
# the front-back axis (roll).  The starting axes are the head's (from the found landmarks, which on a partial
# scan are few) and the scanner's left-right axis (patients lie about straight).
ANGLES_DEG = (-10.0, -5.0, 0.0, 5.0, 10.0)
FINE_ANGLES_DEG = (-2.5, -1.25, 0.0, 1.25, 2.5)
CLIP_HU = (-200.0, 1500.0)
# Below this correlation the box is not a symmetric structure (a large asymmetric filling, a fracture): keep
# the points.  On phantom heads the correlation at the plane is 0.95-0.99 around the chin, 0.88-0.99 around the
# orbits; on the two real heads' orbits 0.72-0.78, so there nothing moves (docs/accuracy.md).
MIN_CORRELATION = 0.9
# ... and a plane is judged on at least this share of its box inside the scan.
MIN_INSIDE_SHARE = 0.5
# A point the plane would move further than this disagrees with it for a reason the plane does not know.
MAX_MOVE_MM = 4.0


@dataclass(frozen=True)
class SymmetryRules:
    """Which landmarks the symmetry rules move, as indices into the landmark set (model metadata
    ``chin_midline`` and ``midplane_pairs``; ``from_metadata``).

    ``mirror``: the set's left-right permutation (``landmark_sets.mirror_names``); ``chin`` (L,) bool: the
    points put onto the chin's symmetry plane (``onto_midline``); ``pairs``: (right, left) index pairs moved
    together onto the symmetry plane around them (``pairs_onto_midplane``: one ``ORBIT_BOX`` around all of
    them, made for the Orbitales); ``min_depth_mm``: how deep inside the scan both of a pair must lie (at the
    edge a point is where the cut put it).
    """
    mirror: list[int]
    chin: np.ndarray | None = None
    pairs: tuple[tuple[int, int], ...] = ()
    min_depth_mm: float = 0.0

    @classmethod
    def from_metadata(cls, meta: dict, mirror: list[int], min_depth_mm: float = 0.0) -> SymmetryRules | None:
        """The rules a model file asks for, or None; ``ValueError`` naming what does not fit the set."""
        names = list(meta["landmark_names"])
        chin, paired = meta.get("chin_midline") or (), meta.get("midplane_pairs") or ()
        if not chin and not paired:
            return None
        index = {n: i for i, n in enumerate(names)}
        unknown = (set(chin) | set(paired)) - set(index)
        if unknown:
            raise ValueError(f"unknown: {', '.join(sorted(unknown))}")
        pairs = []
        for n in paired:
            i, j = index[n], mirror[index[n]]
            if i == j:
                raise ValueError(f"{n} has no counterpart on the other side")
            if (min(i, j), max(i, j)) not in pairs:
                pairs.append((min(i, j), max(i, j)))
        mask = np.array([n in set(chin) for n in names]) if chin else None
        return cls(list(mirror), mask, tuple(pairs), float(min_depth_mm))


def lateral_axis(frame: np.ndarray, mean_shape: np.ndarray, mirror: list[int]) -> np.ndarray:
    """(3,) unit vector, the head's left-right axis in patient coordinates: the mean shape's pairs (``mirror``,
    ``landmark_sets.mirror_names``), turned by ``frame`` (``ShapeModel.frame``).  Its sign does not matter."""
    lr = np.zeros(mean_shape.shape[1])
    for i, j in enumerate(mirror):
        if i < j:
            d = mean_shape[j] - mean_shape[i]
            lr += d if d @ lr >= 0 else -d  # a set may list a pair left first
    if not np.linalg.norm(lr) > 0:
        raise ValueError("the landmark set has no left-right pairs")
    lr = frame @ (lr / np.linalg.norm(lr))
    return lr / np.linalg.norm(lr)


def _turned(axis: np.ndarray, yaw_deg: float, roll_deg: float) -> np.ndarray:
    """``axis`` turned about the patient's vertical (z) by ``yaw_deg`` and about front-back (y) by ``roll_deg``."""
    out = axis_rotation("z", yaw_deg) @ axis_rotation("y", roll_deg) @ axis
    return out / np.linalg.norm(out)


def _box_axes(lateral: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(left-right, back, up) unit vectors: the patient's posterior (+y in LPS) and superior (+z) made
    orthogonal to ``lateral``."""
    ex = lateral / np.linalg.norm(lateral)
    ez = np.array([0.0, 0.0, 1.0]) - ex[2] * ex
    ez /= np.linalg.norm(ez)
    ey = np.cross(ez, ex)
    if ey[1] < 0:
        ey = -ey
    return ex, ey, ez


def _correlations(sampler, centre: np.ndarray, normals: list[np.ndarray], step: float, smooth: bool,
                  box: MirrorBox) -> np.ndarray:
    """(len(normals), len(OFFSETS_MM)): normalised cross-correlation of the ``box`` on one side of each plane
    (normal, offset from ``centre``) with its mirror image on the other side.

    One grid per normal, ``ACROSS_STEP_MM`` apart along it and ``step`` apart in the plane, serves every
    offset: the mirror of the sample at u about the plane at s is the sample at 2s - u, another sample of the
    same grid when s is a multiple of half the step.  ``smooth``: read a copy averaged to about ``step`` (the
    coarse search, which must not alias), else the image as it is.

    Only pairs of samples that both lie inside the scanned region count: the edge of a cut series or of a
    cone-beam cylinder is no anatomy, and where it crosses the box askew it is not symmetric either.  A plane
    with fewer than ``MIN_INSIDE_SHARE`` of its pairs inside scores 0.
    """
    h = ACROSS_STEP_MM
    reach = box.half_width_mm + np.abs(OFFSETS_MM).max()
    u = np.arange(-reach, reach + 1e-6, h)
    v = np.arange(box.back_mm[0], box.back_mm[1] + 1e-6, step)
    w = np.arange(box.up_mm[0], box.up_mm[1] + 1e-6, step)
    local = np.stack(np.meshgrid(u, v, w, indexing="ij"), -1).reshape(-1, 3)
    frames = np.stack([np.stack(_box_axes(n)) for n in normals])  # (N, 3, 3): rows across, back, up
    grids = (np.asarray(centre, float) + local @ frames).reshape(len(normals), len(u), len(v), len(w), 3)
    values = sampler.sample(torch.as_tensor(grids, dtype=torch.float32), step if smooth else 0.0)
    values = values.clamp(*CLIP_HU).reshape(len(normals), len(u), -1)
    # each line of the grid across the plane enters and leaves the scan once (the region is convex)
    t_in, t_out = sampler.chord(grids[:, 0].reshape(len(normals), -1, 3) - u[0] * frames[:, None, 0],
                                frames[:, None, 0])
    inside = torch.as_tensor((u[None, :, None] > t_in[:, None]) & (u[None, :, None] < t_out[:, None]),
                             device=values.device)
    side = int(round(box.half_width_mm / h))
    out = np.empty((len(normals), len(OFFSETS_MM)))
    for k, s in enumerate(OFFSETS_MM):
        twice = int(round((2 * s + 2 * reach) / h))  # index of u plus index of its mirror
        first = int(np.floor((s + reach) / h)) + 1  # the first sample beyond the plane
        near, far = slice(first, first + side), slice(twice - first - side + 1, twice - first + 1)
        a = values[:, near]
        b = values[:, far].flip(1)  # the mirror of each sample of a
        both = (inside[:, near] & inside[:, far].flip(1)).to(values.dtype)
        n = both.sum((1, 2), dtype=torch.float64)
        count = n.clamp_min(1).float()[:, None, None]
        a = (a - (a * both).sum((1, 2), keepdim=True) / count) * both
        b = (b - (b * both).sum((1, 2), keepdim=True) / count) * both
        # sums in double: neighbouring offsets' scores differ in the fourth digit, and the parabola needs it
        sums = [x.sum((1, 2), dtype=torch.float64) for x in (a * b, a.square(), b.square())]
        score = sums[0] / (sums[1] * sums[2]).sqrt().clamp_min(1e-9)
        out[:, k] = torch.where(n >= MIN_INSIDE_SHARE * both[0].numel(), score, 0.0).cpu().numpy()
    return out


def mirror_plane(sampler, centre: np.ndarray, axes: list[np.ndarray],
                 box: MirrorBox) -> tuple[np.ndarray, float, float]:
    """The symmetry plane of the ``box`` around ``centre``: (its unit normal, its offset mm along the normal
    from ``centre``, the correlation there), the normal searched around each of ``axes`` (``ANGLES_DEG``), then
    in finer turns around the best (``FINE_ANGLES_DEG``)."""
    normals = [_turned(np.asarray(a, float), yaw, roll) for a in axes for yaw in ANGLES_DEG for roll in ANGLES_DEG]
    coarse = _correlations(sampler, centre, normals, COARSE_STEP_MM, smooth=True, box=box)
    # a normal a few degrees off shifts the best offset towards the bulk of the bone (behind the chin's front):
    # turn it in finer steps before taking the offset
    best = normals[int(np.argmax(coarse.max(1)))]
    normals = [_turned(best, yaw, roll) for yaw in FINE_ANGLES_DEG for roll in FINE_ANGLES_DEG]
    score = _correlations(sampler, centre, normals, box.fine_step_mm, smooth=False, box=box)
    n, j = np.unravel_index(int(np.argmax(score)), score.shape)
    score = score[n]
    offset = float(OFFSETS_MM[j])
    if 0 < j < len(score) - 1:  # parabola through the peak and its neighbours
        curve = score[j - 1] - 2 * score[j] + score[j + 1]
        if curve < 0:
            offset += 0.5 * (OFFSETS_MM[1] - OFFSETS_MM[0]) * (score[j - 1] - score[j + 1]) / curve
    return normals[n], offset, float(score[j])


def onto_midline(points: np.ndarray, chin: np.ndarray, sampler, axes: list[np.ndarray]) -> tuple[np.ndarray, float]:
    """(points (L, 3) with the ``chin`` ones (L,) bool moved onto the chin's symmetry plane along its normal
    (``mirror_plane``, searched around ``axes``), the correlation there); unchanged where the correlation is
    below ``MIN_CORRELATION`` or a point would move more than ``MAX_MOVE_MM``."""
    pts = np.asarray(points, float).copy()
    if not chin.any():
        return pts, float("nan")
    centre = pts[chin].mean(0)
    normal, offset, score = mirror_plane(sampler, centre, axes, CHIN_BOX)
    if score < MIN_CORRELATION:
        return pts, score
    move = offset - (pts - centre) @ normal
    ok = chin & (np.abs(move) <= MAX_MOVE_MM)
    pts[ok] += move[ok, None] * normal
    return pts, score


def pairs_onto_midplane(points: np.ndarray, pairs, sampler, axes: list[np.ndarray],
                        box: MirrorBox = ORBIT_BOX) -> tuple[np.ndarray, float]:
    """(points (L, 3) with each (right, left) pair of ``pairs`` moved together along the normal of the symmetry
    plane of the ``box`` around them (``mirror_plane``, searched around ``axes``) until its midpoint lies on
    it, the correlation there).  The pair's difference is kept.  Unchanged where the correlation is below
    ``MIN_CORRELATION``, and a pair that would move further than ``MAX_MOVE_MM`` stays where it is."""
    pts = np.asarray(points, float).copy()
    if not pairs:
        return pts, float("nan")
    both = [k for pair in pairs for k in pair]
    centre = pts[both].mean(0)
    normal, offset, score = mirror_plane(sampler, centre, axes, box)
    if score < MIN_CORRELATION:
        return pts, score
    for i, j in pairs:
        move = offset - ((pts[i] + pts[j]) / 2 - centre) @ normal
        if abs(move) <= MAX_MOVE_MM:
            pts[[i, j]] += move * normal
    return pts, score
