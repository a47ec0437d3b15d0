"""The physical volume every other part of the project works on.

Conventions (one way, everywhere):
- ``array`` is float32 Hounsfield units, shape ``(slices, rows, columns)``;
- ``affine`` maps an *array index* ``(k, j, i, 1)`` -- the same axis order as ``array`` -- to patient
  LPS coordinates in mm (PS3.3 C.7.6.2.1.1, Reference Coordinate System);
- ``spacing`` is in the same order as the array axes, in mm.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset


@dataclass(frozen=True)
class Exclusion:
    """A file or instance left out of a series, and why."""

    source: str  # file path, or SOP Instance UID when no path is known
    reason: str


@dataclass(frozen=True)
class SliceSource:
    """Which source image an output slice came from (nearest one when the volume was resampled)."""

    sop_instance_uid: str
    sop_class_uid: str
    frame_number: int | None = None  # 1-based, for multi-frame (Enhanced CT) sources


@dataclass
class Volume:
    array: np.ndarray
    affine: np.ndarray
    frame_of_reference_uid: str
    study_instance_uid: str
    series_instance_uid: str
    slice_sources: list[SliceSource]
    # Headers of the source images used (PixelData removed), for patient/study attributes and references.
    source_headers: list[Dataset] = field(default_factory=list)
    resampled: bool = False
    gantry_tilt_deg: float = 0.0
    excluded: list[Exclusion] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    def index_to_lps(self, index: np.ndarray) -> np.ndarray:
        """Array indices ``(..., 3)`` in (k, j, i) order -> LPS mm ``(..., 3)``."""
        index = np.asarray(index, dtype=np.float64)
        return index @ self.affine[:3, :3].T + self.affine[:3, 3]

    def lps_to_index(self, lps: np.ndarray) -> np.ndarray:
        """LPS mm ``(..., 3)`` -> fractional array indices ``(..., 3)`` in (k, j, i) order."""
        lps = np.asarray(lps, dtype=np.float64)
        inv = np.linalg.inv(self.affine)
        return lps @ inv[:3, :3].T + inv[:3, 3]


@dataclass(frozen=True)
class ReconstructionCircle:
    """The round field of view of a CT or cone-beam CT reconstruction, in the axial plane of the array:
    centre in pixels (row ``j``, column ``i``) and radius in mm.  Every slice shares it (the cylinder's axis
    runs along the slices)."""

    row: float
    column: float
    radius_mm: float


# Pixels outside the reconstructed field hold one padding value on (almost) every slice; measured air is noisy
# and never holds one exact value everywhere.
_PADDED_SHARE_OF_SLICES = 0.95
_MIN_PADDED_SHARE = 0.02  # of the slice area: less is no circle worth knowing
_MIN_DISK_IOU = 0.95  # the reconstructed region must be a disk (clipped by the array), not a head's outline


def axis_rotation(axis: str, deg: float) -> np.ndarray:
    """(3, 3): the right-handed rotation by ``deg`` degrees about the coordinate ``axis`` ("x", "y" or "z") of a
    3D frame (the patient's LPS, or a phantom's head frame)."""
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def reconstruction_circle(array: np.ndarray, pixel_spacing: tuple[float, float],
                          max_slices: int = 32) -> ReconstructionCircle | None:
    """The circle outside which nothing was reconstructed, or None when the whole array holds data.

    A CT reconstruction is a disk (the scan field of view); a dental cone-beam CT's volume is a cylinder
    (its field of view is given as diameter x height) that most scanners store in a box.  Outside the disk
    the stored value is one padding value -- at or below air, declared or not as Pixel Padding Value
    (PS3.3 C.7.5.1.1.2) -- on every slice.  A landmark near that edge, or an anatomical structure that
    seems to end there, is the scan's edge and not the anatomy's, exactly as at the first and last slice.

    Found when: at least half of the slices' corners hold one value, below the array's median; the pixels
    holding it on >= 95 % of the slices cover >= 2 % of the slice; >= 80 % of the edge between them and the
    data lies within 2 pixels of one circle; and the data form a disk (clipped by the array's sides: IoU >=
    0.95).  A head's outline in air stored with one clipped air value fails the last two tests.
    ``array`` (slices, rows, columns); ``pixel_spacing`` (row, column) mm.
    """
    from scipy import ndimage  # only here: every reader of a Volume would pay for its import

    a = np.asarray(array)
    if a.ndim != 3 or min(a.shape) < 1 or a.shape[1] < 8 or a.shape[2] < 8:
        return None
    picks = a[np.unique(np.linspace(0, a.shape[0] - 1, min(max_slices, a.shape[0])).round().astype(int))]
    corners = picks[:, [0, 0, -1, -1], [0, -1, 0, -1]].ravel()
    values, counts = np.unique(corners, return_counts=True)
    pad = values[np.argmax(counts)]
    if counts.max() < 0.5 * corners.size or pad > np.median(picks[:, ::4, ::4]):
        return None
    padded = (picks == pad).mean(0) >= _PADDED_SHARE_OF_SLICES
    # only padding that reaches the array's sides is outside the field (some scanners leave lines inside it)
    labels, _ = ndimage.label(padded)
    sides = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    padded = np.isin(labels, sides[sides > 0])
    if padded.mean() < _MIN_PADDED_SHARE:
        return None
    data = ~padded
    if not data.any():
        return None
    sr, sc = float(pixel_spacing[0]), float(pixel_spacing[1])
    # the circle through the edge between data and padding (the array's sides may clip it), fitted twice, the
    # second time to the edge pixels within 2 pixels of the first circle
    edge = data & ~_eroded(data)
    rows, cols = np.nonzero(edge)
    if len(rows) < 8:
        return None
    y, x = rows * sr, cols * sc
    fit = _circle_fit(x, y)
    if fit is None:
        return None
    near = np.abs(np.hypot(x - fit[0], y - fit[1]) - fit[2]) <= (sr + sc)
    # a round edge, not straight ones (the empty bands that a gantry tilt's resampling leaves)
    if near.mean() < 0.8:
        return None
    fit = _circle_fit(x[near], y[near])
    if fit is None:
        return None
    cx, cy, radius = fit
    radius += 0.25 * (sr + sc)  # the edge pixels' centres lie about half a pixel inside the circle
    jj, ii = np.indices(data.shape)
    disk = np.hypot(ii * sc - cx, jj * sr - cy) <= radius
    iou = (disk & data).sum() / max(int((disk | data).sum()), 1)
    if iou < _MIN_DISK_IOU:
        return None
    cj, ci = cy / sr, cx / sc
    return ReconstructionCircle(float(cj), float(ci), radius)


def air_and_soft_tissue(array: np.ndarray,
                        max_samples: int = 1_000_000) -> tuple[float, float, float, float] | None:
    """Where air and soft tissue lie among a head scan's values: (air, soft tissue, share of the values near
    air, the lowest values: 0.5th percentile), or None when the values cannot tell (fewer than 1,000
    samples, one value).

    A CT stores Hounsfield units (PS3.3 C.11.1.1.2: stored value x Rescale Slope + Rescale Intercept), with
    air at -1000 and soft tissue at 20-60; a series whose intercept is missing or wrong, or a cone-beam CT
    without calibration, has them elsewhere, and only the values can say where.  Air is the largest peak of
    the lowest quarter of the value range (0.5th-99.5th percentile), soft tissue the largest between a
    quarter and three quarters of the way from air to the top.  One exact value that holds more than 1 % of
    the samples at the bottom (padding, or air clipped by the scanner) is left out: it is no measurement.
    """
    a = np.asarray(array)
    step = max(1, int(np.ceil((a.size / max_samples) ** (1 / 3)))) if a.ndim == 3 else 1
    v = (a[::step, ::step, ::step] if a.ndim == 3 else a).ravel().astype(np.float64)
    if v.size and (v == v.min()).mean() > 0.01:
        v = v[v != v.min()]
    if v.size < 1000:
        return None
    lo, hi = np.percentile(v, [0.5, 99.5])
    if hi <= lo:
        return None
    hist, edges = np.histogram(v, bins=256, range=(lo, hi))
    hist = np.convolve(hist, np.ones(5) / 5, mode="same")
    centres = (edges[:-1] + edges[1:]) / 2
    lower = centres <= lo + 0.25 * (hi - lo)
    air = float(centres[lower][np.argmax(hist[lower])])
    middle = (centres >= air + 0.25 * (hi - air)) & (centres <= air + 0.75 * (hi - air))
    if not middle.any():
        return None
    tissue = float(centres[middle][np.argmax(hist[middle])])
    return air, tissue, float((np.abs(v - air) <= 0.04 * (hi - lo)).mean()), float(lo)


def _circle_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float] | None:
    """Centre and radius of the circle through points (x, y): algebraic least squares, x^2 + y^2 + D x + E y +
    F = 0 (Kasa 1976)."""
    design = np.column_stack([x, y, np.ones_like(x)])
    (d, e, f), *_ = np.linalg.lstsq(design, -(x * x + y * y), rcond=None)
    cx, cy = -d / 2.0, -e / 2.0
    if cx * cx + cy * cy - f <= 0:
        return None
    return float(cx), float(cy), float(np.sqrt(cx * cx + cy * cy - f))


def _eroded(mask: np.ndarray) -> np.ndarray:
    """``mask`` minus its pixels with a 4-neighbour outside it; the array's sides count as inside, so that
    the edge is only where the data meet the padding."""
    m = np.pad(mask, 1, mode="edge")
    return m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
