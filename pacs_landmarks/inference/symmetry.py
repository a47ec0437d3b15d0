"""Where the chin's midline is: the mirror-symmetry plane of the bone around it.

The front of the chin is a broad curve (a radius of about 35 mm in the axial plane): 3 mm to the side of its
most anterior point the bone lies only 0.1 mm further back, far below what a local crop can resolve, so the
local stages place Pogonion, Menton, Gnathion and B point well from front to back and from top to bottom but
wander from side to side.  The symphysis as a whole, with both halves of the mandibular arch, is mirror
symmetric about the midsagittal plane, and that plane is sharp: the image correlates with its own mirror image
only when the mirror is there.  A reader finds the chin's midline the same way, from both sides of the arch.

``chin_midline`` finds the plane -- its normal near the head's left-right axis, its offset -- by normalised
cross-correlation of a box of bone around the chin with its mirror image (intensities clipped to soft
tissue .. dense bone, so metal streaks and air weigh no more than bone); ``onto_midline`` moves the chin points
onto it.  The plane is the chin's own, so a chin that deviates from the rest of the face keeps its deviation.
"""
from __future__ import annotations

import numpy as np
import torch

from pacs_landmarks.dicom.volume import axis_rotation

# The box, in mm, relative to the mean of the chin points: half-width across (both sides of the arch),
# back (behind the chin's front, the symphysis and alveolus) and up/down.
HALF_WIDTH_MM = 30.0
BACK_MM = (-10.0, 25.0)
UP_MM = (-15.0, 20.0)
# Grids in mm: across the plane, and in it for the search over directions (coarse: 4 mm reads the copy that
# stage 1 of the cascade averaged already) and around the best (fine); offsets 0.5 mm apart, the peak refined
# by a parabola.
COARSE_STEP_MM, FINE_STEP_MM = 4.0, 2.0
ACROSS_STEP_MM = 1.0
OFFSETS_MM = np.arange(-8.0, 8.01, 0.5)
# Directions of the plane's normal tried around each starting axis: turned about the vertical (yaw) and about
# the front-back axis (roll).  The starting axes are the head's (from the found landmarks, which on a partial
# scan are few) and the scanner's left-right axis (patients lie about straight).
ANGLES_DEG = (-10.0, -5.0, 0.0, 5.0, 10.0)
FINE_ANGLES_DEG = (-2.5, -1.25, 0.0, 1.25, 2.5)
CLIP_HU = (-200.0, 1500.0)
# Below this correlation the box is not a symmetric chin (a cut, a large asymmetric filling, a fracture): keep
# the points.  On complete phantom heads the correlation at the plane is 0.95-0.99.
MIN_CORRELATION = 0.9
# A point the plane would move further than this disagrees with it for a reason the plane does not know.
MAX_MOVE_MM = 4.0


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


def _correlations(sampler, centre: np.ndarray, normals: list[np.ndarray], step: float, smooth: bool) -> np.ndarray:
    """(len(normals), len(OFFSETS_MM)): normalised cross-correlation of the box on one side of each plane
    (normal, offset from ``centre``) with its mirror image on the other side.

    One grid per normal, ``ACROSS_STEP_MM`` apart along it and ``step`` apart in the plane, serves every
    offset: the mirror of the sample at u about the plane at s is the sample at 2s - u, another sample of the
    same grid when s is a multiple of half the step.  ``smooth``: read a copy averaged to about ``step`` (the
    coarse search, which must not alias), else the image as it is.
    """
    h = ACROSS_STEP_MM
    reach = HALF_WIDTH_MM + np.abs(OFFSETS_MM).max()
    u = np.arange(-reach, reach + 1e-6, h)
    v = np.arange(BACK_MM[0], BACK_MM[1] + 1e-6, step)
    w = np.arange(UP_MM[0], UP_MM[1] + 1e-6, step)
    uu, vv, ww = np.meshgrid(u, v, w, indexing="ij")
    grids = []
    for normal in normals:
        ex, ey, ez = _box_axes(normal)
        grids.append(np.asarray(centre, float) + uu[..., None] * ex + vv[..., None] * ey + ww[..., None] * ez)
    values = sampler.sample(torch.as_tensor(np.stack(grids), dtype=torch.float32), step if smooth else 0.0)
    values = values.clamp(*CLIP_HU)
    values = values.reshape(len(normals), len(u), -1).double()
    side = int(round(HALF_WIDTH_MM / h))
    out = np.empty((len(normals), len(OFFSETS_MM)))
    for k, s in enumerate(OFFSETS_MM):
        twice = int(round((2 * s + 2 * reach) / h))  # index of u plus index of its mirror
        first = int(np.floor((s + reach) / h)) + 1  # the first sample beyond the plane
        i = np.arange(first, first + side)
        a, b = values[:, i], values[:, twice - i]
        a = a - a.mean((1, 2), keepdim=True)
        b = b - b.mean((1, 2), keepdim=True)
        den = (a.square().sum((1, 2)) * b.square().sum((1, 2))).sqrt().clamp_min(1e-9)
        out[:, k] = ((a * b).sum((1, 2)) / den).cpu().numpy()
    return out


def chin_midline(sampler, centre: np.ndarray, axes: list[np.ndarray]) -> tuple[np.ndarray, float, float]:
    """The chin's symmetry plane near ``centre``: (its unit normal, its offset mm along the normal from
    ``centre``, the correlation there), the normal searched around each of ``axes`` (``ANGLES_DEG``), then in
    finer turns around the best (``FINE_ANGLES_DEG``)."""
    normals = [_turned(np.asarray(a, float), yaw, roll) for a in axes for yaw in ANGLES_DEG for roll in ANGLES_DEG]
    coarse = _correlations(sampler, centre, normals, COARSE_STEP_MM, smooth=True)
    # a normal a few degrees off shifts the best offset towards the bulk of the bone, behind the chin's front:
    # turn it in finer steps before taking the offset
    best = normals[int(np.argmax(coarse.max(1)))]
    normals = [_turned(best, yaw, roll) for yaw in FINE_ANGLES_DEG for roll in FINE_ANGLES_DEG]
    score = _correlations(sampler, centre, normals, FINE_STEP_MM, smooth=False)
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
    (``chin_midline``, searched around ``axes``), the correlation there); unchanged where the correlation is
    below ``MIN_CORRELATION`` or a point would move more than ``MAX_MOVE_MM``."""
    pts = np.asarray(points, float).copy()
    if not chin.any():
        return pts, float("nan")
    centre = pts[chin].mean(0)
    normal, offset, score = chin_midline(sampler, centre, axes)
    if score < MIN_CORRELATION:
        return pts, score
    move = offset - (pts - centre) @ normal
    ok = chin & (np.abs(move) <= MAX_MOVE_MM)
    pts[ok] += move[ok, None] * normal
    return pts, score
