"""Where the chin's midline is: the mirror-symmetry plane of the bone around it.

The front of the chin is a broad curve (a radius of about 35 mm in the axial plane): 3 mm to the side of its
most anterior point the bone lies only 0.1 mm further back, far below what a local crop can resolve, so the
local stages place Pogonion, Menton, Gnathion and B point well from front to back and from top to bottom but
wander from side to side.  The symphysis as a whole, with both halves of the mandibular arch, is mirror
symmetric about the midsagittal plane, and that plane is sharp: the image correlates with its own mirror image
only when the mirror is there.  A reader finds the chin's midline the same way, from both sides of the arch.

``chin_midline`` finds the plane's offset along the head's left-right axis by normalised cross-correlation of a
box of bone around the chin with its mirror image (intensities clipped to soft tissue .. dense bone, so metal
streaks and air weigh no more than bone); ``onto_midline`` moves the chin points onto it.  The plane is the
chin's own, so a chin that deviates from the rest of the face keeps its deviation.
"""
from __future__ import annotations

import numpy as np
import torch

# The box, in mm, relative to the mean of the chin points: half-width across (both sides of the arch),
# back (behind the chin's front, the symphysis and alveolus) and up/down.
HALF_WIDTH_MM = 30.0
BACK_MM = (-10.0, 25.0)
UP_MM = (-15.0, 20.0)
STEP_MM = 1.5
OFFSETS_MM = np.arange(-8.0, 8.01, 0.5)
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
            lr += mean_shape[j] - mean_shape[i]
    if not np.linalg.norm(lr) > 0:
        raise ValueError("the landmark set has no left-right pairs")
    lr = frame @ (lr / np.linalg.norm(lr))
    return lr / np.linalg.norm(lr)


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


def chin_midline(sampler, centre: np.ndarray, lateral: np.ndarray) -> tuple[float, float]:
    """(offset mm along ``lateral`` from ``centre`` to the chin's symmetry plane, correlation at the plane)."""
    ex, ey, ez = _box_axes(np.asarray(lateral, float))
    u = np.arange(STEP_MM / 2, HALF_WIDTH_MM, STEP_MM)
    v = np.arange(BACK_MM[0], BACK_MM[1] + 1e-6, STEP_MM)
    w = np.arange(UP_MM[0], UP_MM[1] + 1e-6, STEP_MM)
    uu, vv, ww = np.meshgrid(u, v, w, indexing="ij")
    base = np.asarray(centre, float) + vv[..., None] * ey + ww[..., None] * ez  # (U, V, W, 3)
    sides = np.stack([base + (s + sign * uu)[..., None] * ex for s in OFFSETS_MM for sign in (1.0, -1.0)])
    values = sampler.sample(torch.as_tensor(sides, dtype=torch.float32), STEP_MM).clamp(*CLIP_HU)
    values = values.reshape(len(OFFSETS_MM), 2, -1).double()
    values = values - values.mean(-1, keepdim=True)
    num = (values[:, 0] * values[:, 1]).sum(-1)
    den = (values[:, 0].square().sum(-1) * values[:, 1].square().sum(-1)).sqrt().clamp_min(1e-9)
    score = (num / den).cpu().numpy()
    k = int(np.argmax(score))
    offset = float(OFFSETS_MM[k])
    if 0 < k < len(score) - 1:  # parabola through the peak and its neighbours
        curve = score[k - 1] - 2 * score[k] + score[k + 1]
        if curve < 0:
            offset += 0.5 * (OFFSETS_MM[1] - OFFSETS_MM[0]) * (score[k - 1] - score[k + 1]) / curve
    return offset, float(score[k])


def onto_midline(points: np.ndarray, chin: np.ndarray, sampler, lateral: np.ndarray) -> tuple[np.ndarray, float]:
    """(points (L, 3) with the ``chin`` ones (L,) bool moved along ``lateral`` onto the chin's symmetry plane,
    the correlation there); unchanged where the correlation is below ``MIN_CORRELATION`` or a point would move
    more than ``MAX_MOVE_MM``."""
    pts = np.asarray(points, float).copy()
    if not chin.any():
        return pts, float("nan")
    centre = pts[chin].mean(0)
    ex = np.asarray(lateral, float) / np.linalg.norm(lateral)
    offset, score = chin_midline(sampler, centre, ex)
    if score < MIN_CORRELATION:
        return pts, score
    move = offset - (pts - centre) @ ex
    ok = chin & (np.abs(move) <= MAX_MOVE_MM)
    pts[ok] += move[ok, None] * ex
    return pts, score
