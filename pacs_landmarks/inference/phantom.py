"""Synthetic head-CT phantoms with exact ground-truth craniofacial landmarks.

A phantom is a painter's list of smooth solids (ellipsoids, swept-ellipsoid capsules, superellipsoids), each
filled with one tissue; later solids overwrite earlier ones, which is how cavities (orbits, sinuses, ear
canals, the foramen magnum) are carved. Shapes are built in a *design* frame (mm, axes as LPS: +x patient
left, +y posterior, +z superior; origin at the centre of the sella turcica, Frankfort plane ~18 mm below),
scaled per case into the *head* frame, and placed in the scanner's patient LPS frame (PS3.3 C.7.6.2.1.1) by a
random pose. Every shape is one affine map from head mm to normalised local coordinates, so evaluating it on a
voxel grid is a few broadcast sums per block of voxels.

Landmarks are *measured* on the finished solid in the head frame (extreme or deepest points of the bone
outline, a cavity centre, the top of the ear canal at its bony opening), so each one lies on the rendered
anatomy exactly, whatever the random shape parameters did. Definitions follow
docs/phantoms.md and /work/shared/design/craniofacial-reference.md.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pacs_landmarks.dicom.volume import axis_rotation
from pacs_landmarks.errors import CommandError

LANDMARK_SET = "craniofacial16"
NAMES = (
    "Sella", "Nasion", "Orbitale R", "Orbitale L", "Porion R", "Porion L", "ANS", "PNS", "A point",
    "B point", "Pogonion", "Menton", "Gnathion", "Gonion R", "Gonion L", "Basion",
)

# Tissues and their nominal Hounsfield units (the reference's table); a case jitters them a little.
MATERIALS: dict[str, float] = {
    "air": -1000.0, "fat": -95.0, "skin": 45.0, "muscle": 50.0, "brain": 32.0, "csf": 8.0, "eye": 12.0,
    "lens": 75.0, "cortical": 1500.0, "diploe": 500.0, "cancellous": 380.0, "dentin": 1900.0,
    "enamel": 2800.0, "metal": 3500.0, "cartilage": 100.0, "headrest": 180.0, "foam": -880.0,
    "mastoid": -600.0, "cord": 30.0, "disc": 85.0, "pituitary": 45.0,
}
MATERIAL_IDS = {name: i for i, name in enumerate(MATERIALS)}
SKELETAL = frozenset(MATERIAL_IDS[m] for m in ("cortical", "diploe", "cancellous"))
BONE = SKELETAL | {MATERIAL_IDS[m] for m in ("dentin", "enamel", "metal")}
_SKEL_LUT = np.zeros(256, bool)
_SKEL_LUT[list(SKELETAL)] = True

# Ranges drawn per case (the figures).
PIXEL_SPACING_RANGE = (0.45, 1.0)  # mm at a 512 matrix; other matrices keep the field of view
SLICE_THICKNESSES = (0.625, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0)
NOISE_RANGE = (5.0, 30.0)  # HU, standard deviation
PSF_FWHM_RANGE = (0.6, 1.3)  # mm, in-plane
_UID_ROOT = "pacs-landmarks-phantom"
NASION = (0.0, -69.5, 8.0)  # designed nasion (design frame, mm)


# --------------------------------------------------------------------------------------------- shapes
@dataclass
class Shape:
    """A solid: ``M`` (3x4) maps head-frame mm to normalised local coordinates (u, v, w).

    ellipsoid: u²+v²+w² <= 1 (w scaled by ``down`` where w < 0, for a different lower semi-axis);
    capsule: the unit ball swept along u from 0 to ``length``; super: |u|^4+|v|^4+|w|^4 <= 1.
    ``clip`` = (axis, minimum): keep only the part where that local coordinate >= minimum.
    """

    name: str
    material: int
    kind: str
    M: np.ndarray
    length: float = 0.0
    down: float = 1.0
    clip: tuple[int, float] | None = None

    def local_box(self) -> tuple[np.ndarray, np.ndarray]:
        lo = np.array([-1.0, -1.0, -1.0])
        hi = np.array([1.0 + self.length, 1.0, 1.0])
        if self.kind == "ellipsoid" and self.down < 1.0:
            lo[2] = -1.0 / self.down
        if self.clip is not None:
            lo[self.clip[0]] = max(lo[self.clip[0]], self.clip[1])
        return lo, hi

    def head_box(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned bounds of the solid in the head frame (cached)."""
        box = self.__dict__.get("_box")
        if box is None:
            lo, hi = self.local_box()
            corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
            Minv = np.linalg.inv(np.vstack([self.M, [0, 0, 0, 1]]))
            head = corners @ Minv[:3, :3].T + Minv[:3, 3]
            box = (head.min(0), head.max(0))
            self.__dict__["_box"] = box
        return box

    def inside(self, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        if self.kind == "ellipsoid":
            if self.down != 1.0:
                w = np.where(w < 0, w * self.down, w)
            r = u * u + v * v + w * w
        elif self.kind == "capsule":
            du = u - np.clip(u, 0.0, self.length)
            r = du * du + v * v + w * w
        else:  # super
            u2, v2, w2 = u * u, v * v, w * w
            r = u2 * u2 + v2 * v2 + w2 * w2
        mask = r <= 1.0
        if self.clip is not None:
            mask &= (u, v, w)[self.clip[0]] >= self.clip[1]
        return mask

    def row_interval(self, base: np.ndarray, slope: np.ndarray):
        """For lines p(i) = base + slope * i in local coordinates (base: (3, ...)), the interval of i inside
        the solid as (lo, hi) arrays (lo > hi when empty); None when there is no closed form. Every solid here
        is convex, so a line meets it in one interval: the union of its convex parts' intervals."""
        if self.kind == "super":
            return None
        if self.kind == "ellipsoid":
            if self.down == 1.0:
                lo, hi = _quad(base, slope, (1.0, 1.0, 1.0))
            else:
                up = _intersect(_quad(base, slope, (1.0, 1.0, 1.0)), _half(base[2], slope[2], 0.0, True))
                dn = _intersect(_quad(base, slope, (1.0, 1.0, self.down)), _half(base[2], slope[2], 0.0, False))
                lo, hi = _union(up, dn)
        else:
            cyl = _intersect(_quad(base, slope, (0.0, 1.0, 1.0)), _half(base[0], slope[0], 0.0, True))
            cyl = _intersect(cyl, _half(base[0], slope[0], self.length, False))
            cap0 = _quad(base, slope, (1.0, 1.0, 1.0))
            shifted = base.copy()
            shifted[0] = base[0] - self.length
            cap1 = _quad(shifted, slope, (1.0, 1.0, 1.0))
            lo, hi = _union(_union(cyl, cap0), cap1)
        if self.clip is not None:
            axis, minimum = self.clip
            lo, hi = _intersect((lo, hi), _half(base[axis], slope[axis], minimum, True))
        return lo, hi

    def support(self, direction: np.ndarray) -> np.ndarray:
        """The head-frame point of this (unclipped) solid furthest along ``direction``."""
        A, b = self.M[:, :3], self.M[:, 3]
        Ainv = np.linalg.inv(A)
        g = Ainv.T @ np.asarray(direction, float)
        u = g / np.linalg.norm(g)
        best = Ainv @ (u - b)
        if self.kind == "capsule":
            other = Ainv @ (u + np.array([self.length, 0, 0]) - b)
            if np.dot(other, direction) > np.dot(best, direction):
                best = other
        return best


def _quad(base: np.ndarray, slope: np.ndarray, weights) -> tuple[np.ndarray, np.ndarray]:
    """Interval where sum_r weights_r² (base_r + slope_r i)² <= 1."""
    a = sum((w * sl) ** 2 for w, sl in zip(weights, slope))
    b = sum(w * w * sl * bs for w, sl, bs in zip(weights, slope, base))
    c = sum((w * bs) ** 2 for w, bs in zip(weights, base)) - 1.0
    if a < 1e-15:  # the line runs along the solid's free axis: all in or all out
        inside = c <= 0
        return np.where(inside, -np.inf, np.inf), np.where(inside, np.inf, -np.inf)
    disc = b * b - a * c
    root = np.sqrt(np.maximum(disc, 0.0))
    empty = disc < 0
    return np.where(empty, np.inf, (-b - root) / a), np.where(empty, -np.inf, (-b + root) / a)


def _half(base: np.ndarray, slope: float, value: float, above: bool) -> tuple[np.ndarray, np.ndarray]:
    """Interval where base + slope i >= value (``above``) or <= value."""
    sign = 1.0 if above else -1.0
    sl, bs = sign * slope, sign * (base - value)  # want bs + sl i >= 0
    if abs(sl) < 1e-15:
        ok = bs >= 0
        return np.where(ok, -np.inf, np.inf), np.where(ok, np.inf, -np.inf)
    t = -bs / sl
    if sl > 0:
        return t, np.full_like(t, np.inf)
    return np.full_like(t, -np.inf), t


def _intersect(p, q):
    return np.maximum(p[0], q[0]), np.minimum(p[1], q[1])


def _union(p, q):
    """Union of two intervals known to overlap or touch when both are non-empty (parts of a convex solid)."""
    pe, qe = p[0] > p[1], q[0] > q[1]
    lo = np.where(pe, q[0], np.where(qe, p[0], np.minimum(p[0], q[0])))
    hi = np.where(pe, q[1], np.where(qe, p[1], np.maximum(p[1], q[1])))
    return lo, hi


def _frame(axis: np.ndarray, hint: Sequence[float] = (1.0, 0.0, 0.0)) -> np.ndarray:
    """Rows e1 (= axis), e2 (closest to ``hint``), e3: an orthonormal local frame."""
    e1 = axis / np.linalg.norm(axis)
    h = np.asarray(hint, float)
    if abs(np.dot(h, e1)) > 0.95:
        h = np.array([0.0, 0.0, 1.0]) if abs(e1[2]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e2 = h - np.dot(h, e1) * e1
    e2 /= np.linalg.norm(e2)
    return np.stack([e1, e2, np.cross(e1, e2)])


class _Builder:
    """Collects shapes given in design mm; ``group`` (4x4, design -> design) moves a rigid part (the jaw)."""

    def __init__(self, design_to_head: np.ndarray):
        self.D = design_to_head
        self.group = np.eye(4)
        self.shapes: list[Shape] = []
        self.design: dict = {}  # named design-frame parameters the landmark measurement needs

    def _add(self, name, material, kind, L, origin, **kw) -> Shape:
        local = np.eye(4)
        local[:3, :3] = L
        local[:3, 3] = -L @ np.asarray(origin, float)
        M = (local @ np.linalg.inv(self.D @ self.group))[:3]
        shape = Shape(name, MATERIAL_IDS[material], kind, M, **kw)
        self.shapes.append(shape)
        return shape

    def ell(self, name, material, center, axes, R=None, down=None, clip=None) -> Shape:
        R = np.eye(3) if R is None else np.asarray(R, float)
        axes = np.asarray(axes, float)
        L = np.diag(1.0 / axes) @ R.T
        ratio = 1.0 if down is None else axes[2] / down
        return self._add(name, material, "ellipsoid", L, center, down=ratio, clip=clip)

    def sup(self, name, material, center, axes, R=None) -> Shape:
        R = np.eye(3) if R is None else np.asarray(R, float)
        return self._add(name, material, "super", np.diag(1.0 / np.asarray(axes, float)) @ R.T, center)

    def cap(self, name, material, a, b, radii, hint=(1.0, 0.0, 0.0), clip=None) -> Shape:
        """Capsule from a to b; radii = (along the axis at the caps, along hint, third)."""
        a, b = np.asarray(a, float), np.asarray(b, float)
        E = _frame(b - a, hint)
        r = np.asarray(radii, float)
        return self._add(name, material, "capsule", np.diag(1.0 / r) @ E, a,
                         length=float(np.linalg.norm(b - a) / r[0]), clip=clip)


# --------------------------------------------------------------------------------------------- the case
@dataclass
class PhantomCase:
    """One synthetic head: shapes in the head frame, a pose into patient LPS, landmarks in LPS mm."""

    seed: int
    shapes: list[Shape]
    hu: np.ndarray  # HU per material id (jittered per case)
    head_to_lps: np.ndarray  # 4x4
    landmarks: dict[str, np.ndarray]  # LPS mm, in NAMES order
    aux_points: dict[str, np.ndarray]  # LPS mm: extra points for measurements (condylion, prosthion, ...)
    params: dict
    head_landmarks: dict[str, np.ndarray] = field(default_factory=dict)  # head frame (anatomical axes)

    # --- evaluation
    @property
    def lps_to_head(self) -> np.ndarray:
        return np.linalg.inv(self.head_to_lps)

    def labels_head(self, points: np.ndarray) -> np.ndarray:
        """Material id at head-frame points ``(..., 3)`` (no blur, no noise)."""
        pts = np.asarray(points, float)
        flat = pts.reshape(-1, 3)
        out = np.zeros(len(flat), np.uint8)
        if len(flat) == 0:
            return out.reshape(pts.shape[:-1])
        plo, phi = flat.min(0), flat.max(0)
        boxes = self.__dict__.get("_boxes")
        if boxes is None or len(boxes[0]) != len(self.shapes):
            boxes = (np.array([s.head_box()[0] for s in self.shapes]), np.array([s.head_box()[1] for s in self.shapes]))
            self.__dict__["_boxes"] = boxes
        hit = np.flatnonzero(~(np.any(boxes[0] > phi, 1) | np.any(boxes[1] < plo, 1)))
        for n in hit:
            s = self.shapes[n]
            loc = flat @ s.M[:, :3].T + s.M[:, 3]
            mask = s.inside(loc[:, 0], loc[:, 1], loc[:, 2])
            out[mask] = s.material
        return out.reshape(pts.shape[:-1])

    def labels_at(self, lps: np.ndarray) -> np.ndarray:
        lps = np.asarray(lps, float)
        T = self.lps_to_head
        return self.labels_head(lps @ T[:3, :3].T + T[:3, 3])

    def hu_at(self, lps: np.ndarray) -> np.ndarray:
        """Noise-free, unblurred HU at patient LPS points ``(..., 3)``."""
        return self.hu[self.labels_at(lps)]

    def render_labels(self, index_to_lps: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
        """Material ids on a grid: ``index_to_lps`` (4x4) maps array index (k, j, i) to LPS mm."""
        nk, nj, ni = shape
        out = np.zeros(shape, np.uint8)
        to_head = self.lps_to_head @ index_to_lps
        from_index = np.linalg.inv(to_head)
        for s in self.shapes:
            A = s.M @ to_head  # 3x4: index -> local
            lo, hi = s.local_box()
            corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
            Minv = np.linalg.inv(np.vstack([s.M, [0, 0, 0, 1]]))
            head = corners @ Minv[:3, :3].T + Minv[:3, 3]
            idx = head @ from_index[:3, :3].T + from_index[:3, 3]
            k0, j0, i0 = np.maximum(np.floor(idx.min(0)).astype(int), 0)
            k1, j1, i1 = np.minimum(np.ceil(idx.max(0)).astype(int) + 1, shape)
            if k0 >= k1 or j0 >= j1 or i0 >= i1:
                continue
            kk = np.arange(k0, k1, dtype=np.float64)
            jj = np.arange(j0, j1, dtype=np.float64)
            # Local coordinates along a row are linear in i: base (at i = 0) plus slope * i.
            base = (A[:, 0, None] * kk + A[:, 3, None])[:, :, None] + (A[:, 1, None] * jj)[:, None, :]
            interval = s.row_interval(base, A[:, 2])
            if interval is None:  # no closed form (superellipsoid): evaluate the block
                ii = np.arange(i0, i1, dtype=np.float32)
                coords = [(base[r].astype(np.float32))[:, :, None] + np.float32(A[r, 2]) * ii for r in range(3)]
                mask = s.inside(*coords)
            else:
                lo_i = np.clip(np.ceil(interval[0] - 1e-9), i0, i1).astype(np.int32)
                hi_i = np.clip(np.floor(interval[1] + 1e-9) + 1, i0, i1).astype(np.int32)
                rows = hi_i > lo_i
                if not rows.any():
                    continue
                ks, js = np.flatnonzero(rows.any(1)), np.flatnonzero(rows.any(0))
                ka, kb, ja, jb = ks[0], ks[-1] + 1, js[0], js[-1] + 1
                ia, ib = int(lo_i[rows].min()), int(hi_i[rows].max())
                ii = np.arange(ia, ib, dtype=np.int32)
                mask = (ii >= lo_i[ka:kb, ja:jb, None]) & (ii < hi_i[ka:kb, ja:jb, None])
                k0, k1, j0, j1, i0, i1 = k0 + ka, k0 + kb, j0 + ja, j0 + jb, ia, ib
            block = out[k0:k1, j0:j1, i0:i1]
            block[mask] = s.material
        return out

    def render(self, index_to_lps: np.ndarray, shape: tuple[int, int, int], *, slice_thickness: float | None = None,
               blur: bool = True, noise: bool = True, rng: np.random.Generator | None = None) -> np.ndarray:
        """HU volume on a grid (float32): partial volume across the slice thickness, scanner PSF, noise."""
        from scipy.ndimage import gaussian_filter

        spacing = np.linalg.norm(index_to_lps[:3, :3], axis=0)
        thick = float(slice_thickness or spacing[0])
        # Partial volume: average sub-slices spread over the nominal thickness (slice sensitivity profile).
        n_sub = max(1, int(math.ceil(thick / 1.25)))
        if n_sub == 1:
            vol = self.hu.astype(np.float32)[self.render_labels(index_to_lps, shape)]
        else:
            # Spread sub-slices across the thickness along the image plane's normal (row x column).
            normal = np.cross(index_to_lps[:3, 2], index_to_lps[:3, 1])
            normal /= np.linalg.norm(normal)
            vol = np.zeros(shape, np.float32)
            for s in range(n_sub):
                off = ((s + 0.5) / n_sub - 0.5) * thick
                aff = index_to_lps.copy()
                aff[:3, 3] = aff[:3, 3] + normal * off
                vol += self.hu.astype(np.float32)[self.render_labels(aff, shape)]
            vol /= n_sub
        sig = [0.0, 0.0, 0.0]
        if blur:
            sigma_mm = self.params["psf_fwhm_mm"] / 2.3548
            sig = [sigma_mm / spacing[0] if n_sub == 1 else 0.0, sigma_mm / spacing[1], sigma_mm / spacing[2]]
            sig = [s if s > 0.25 else 0.0 for s in sig]
        if noise:
            # Noise goes in before the PSF so it comes out correlated like reconstructed CT noise; scaled up
            # by the filter's variance reduction so its final standard deviation is the drawn one.
            rng = rng or np.random.default_rng(self.seed)
            gain = 1.0 / math.sqrt(np.prod([_gauss_sq_sum(s) for s in sig]))
            vol += rng.standard_normal(vol.shape, dtype=np.float32) * np.float32(self.params["noise_hu"] * gain)
        metal = vol > 3000.0 if (noise and self.params["metal_streaks_hu"] > 0) else None
        if any(sig):
            vol = gaussian_filter(vol, sig, mode="nearest", truncate=_TRUNCATE)
        if noise:
            vol = self._scanner_effects(vol, metal, spacing, rng)
        return vol

    def _scanner_effects(self, vol: np.ndarray, metal: np.ndarray | None, spacing: np.ndarray,
                         rng: np.random.Generator) -> np.ndarray:
        """What ``variety`` adds after reconstruction: kernel, metal streaks, cone-beam intensity (slice-wise,
        axis 0 = slices)."""
        from scipy.ndimage import gaussian_filter

        p = self.params
        px = float(spacing[1])
        if p["kernel"] == "sharp":
            # bone kernel: unsharp masking -> edge overshoot and high-frequency (more, finer) noise
            base = gaussian_filter(vol, [0.0, 0.8 / px, 0.8 / px], mode="nearest")
            vol = vol + p["kernel_strength"] * 1.5 * (vol - base)
        elif p["kernel"] == "soft":
            vol = gaussian_filter(vol, [0.0, p["kernel_strength"] / px, p["kernel_strength"] / px], mode="nearest")
        if metal is not None and metal.any():
            for k in np.flatnonzero(metal.any(axis=(1, 2))):
                vol[k] += metal_streaks(metal[k], p["metal_streaks_hu"], rng)
        if p["cbct"]:
            n, h, w = vol.shape
            jj, ii = np.meshgrid(np.arange(h) - (h - 1) / 2, np.arange(w) - (w - 1) / 2, indexing="ij")
            r = np.hypot(jj, ii) * px
            big_r = max(h, w) * px / 2
            shade = -p["cupping_hu"] * np.clip(1.0 - (r / big_r) ** 2, 0.0, 1.0)
            ring_rng = np.random.default_rng(self.seed + 77)
            for radius, amp in zip(ring_rng.uniform(5.0, big_r, 6), ring_rng.uniform(-1, 1, 6)):
                shade = shade + p["rings_hu"] * amp * np.exp(-0.5 * ((r - radius) / 0.8) ** 2)
            vol = vol * np.float32(p["cbct_gain"]) + np.float32(p["cbct_offset_hu"]) + shade.astype(np.float32)
        return vol


_TRUNCATE = 3.0


def metal_streaks(metal: np.ndarray, amplitude_hu: float, rng: np.random.Generator) -> np.ndarray:
    """Additive streak image (HU) for one slice whose metal pixels are ``metal`` (2D bool): bright and dark
    streaks through the metal along random directions, and a dark band (beam hardening) between the two
    furthest metal objects, as in adult head CT with fillings (photon starvation along the longest paths)."""
    h, w = metal.shape
    out = np.zeros((h, w), np.float32)
    idx = np.argwhere(metal)
    if len(idx) == 0 or amplitude_hu <= 0:
        return out
    jj, ii = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    n_lines = int(min(12, 3 + len(idx) // 8))
    for _ in range(n_lines):
        j0, i0 = idx[rng.integers(len(idx))]
        ang = rng.uniform(0, np.pi)
        d = (jj - j0) * np.cos(ang) - (ii - i0) * np.sin(ang)
        along = np.abs((jj - j0) * np.sin(ang) + (ii - i0) * np.cos(ang))
        amp = amplitude_hu * rng.uniform(0.3, 1.0) * (1 if rng.random() < 0.5 else -1)
        out += (amp * np.exp(-0.5 * (d / rng.uniform(0.7, 2.0)) ** 2) / (1.0 + along / (0.5 * max(h, w)))
                ).astype(np.float32)
    a, b = idx[np.argmin(idx[:, 1])], idx[np.argmax(idx[:, 1])]
    if np.linalg.norm(a - b) > 4:
        ab = (b - a).astype(np.float32)
        t = np.clip(((jj - a[0]) * ab[0] + (ii - a[1]) * ab[1]) / float(ab @ ab), 0.0, 1.0)
        dist = np.hypot(jj - (a[0] + t * ab[0]), ii - (a[1] + t * ab[1]))
        out -= (amplitude_hu * 0.8 * np.exp(-0.5 * (dist / 3.0) ** 2)).astype(np.float32)
    return out


def _gauss_sq_sum(sigma: float) -> float:
    """Sum of squared weights of scipy's 1-D Gaussian kernel (the factor by which it scales white-noise
    variance); 1 for no filtering."""
    if sigma <= 0:
        return 1.0
    r = int(_TRUNCATE * sigma + 0.5)
    w = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    w /= w.sum()
    return float(np.sum(w * w))


# --------------------------------------------------------------------------------------------- anatomy
def make_case(seed: int, variety: bool = False, **overrides) -> PhantomCase:
    """Draw one random head. ``overrides`` fix any drawn parameter (see ``PhantomCase.params``), e.g.
    ``mouth_opening_deg=0``, ``rotation_deg=(0, 0, 0)``, ``translation_mm=(0, 0, 0)``, ``size=1.0``,
    ``noise_hu=10``, ``pixel_spacing=0.5``, ``slice_thickness=1.0``, ``vertex_cut_mm=0``, ``headrest=False``,
    ``missing_teeth=()``.

    ``variety``: domain randomisation for what real scanners send (``draw_variety``): Class II/III jaws, open
    bite, asymmetric faces, edentulous jaws, fillings/crowns/brackets with streaks, lower bone density, sharp or
    soft kernels, noise up to 60 HU, head tilt up to 25 deg and gantry tilt, an immobilisation mask, cone-beam
    intensity (no HU calibration, cupping, rings). Drawn from a separate stream, so a seed's basic head is
    the same either way."""
    rng = np.random.default_rng(np.random.SeedSequence([0x5EED, int(seed)]))
    p: dict = {}
    p["size"] = float(np.clip(rng.normal(1.0, 0.04), 0.88, 1.12))
    p["proportions"] = [float(np.clip(rng.normal(1.0, 0.02), 0.95, 1.05)) for _ in range(3)]
    p["vault_scale"] = [float(rng.uniform(0.95, 1.05)) for _ in range(3)]
    p["vault_thickness_mm"] = float(rng.uniform(4.5, 8.0))
    p["maxilla_shift_mm"] = float(rng.normal(0.0, 1.0))
    p["mandible_shift_mm"] = float(rng.normal(0.0, 1.2))
    p["mandible_scale"] = float(np.clip(rng.normal(1.0, 0.03), 0.93, 1.07))
    p["chin_prominence_mm"] = float(rng.uniform(-1.0, 2.0))
    p["mouth_opening_deg"] = float(0.0 if rng.random() < 0.4 else rng.uniform(0.5, 4.5))
    p["ear_canal_radius_mm"] = float(rng.uniform(3.2, 4.5))
    p["asymmetry_mm"] = float(rng.normal(0.0, 1.0))
    p["rotation_deg"] = [float(rng.uniform(-15, 15)) for _ in range(3)]
    p["translation_mm"] = [float(rng.uniform(-20, 20)) for _ in range(3)]
    p["missing_teeth"] = [int(t) for t in np.flatnonzero(rng.random(28) < 0.07)]
    p["fillings"] = [int(t) for t in np.flatnonzero(rng.random(28) < 0.05)]
    p["noise_hu"] = float(rng.uniform(*NOISE_RANGE))
    p["psf_fwhm_mm"] = float(rng.uniform(*PSF_FWHM_RANGE))
    p["pixel_spacing"] = float(round(rng.uniform(*PIXEL_SPACING_RANGE), 3))
    p["slice_thickness"] = float(rng.choice(SLICE_THICKNESSES))
    p["vertex_cut_mm"] = float(0.0 if rng.random() < 0.7 else rng.uniform(5.0, 40.0))
    p["headrest"] = bool(rng.random() < 0.8)
    p["hu_jitter"] = float(rng.uniform(0.93, 1.07))
    p.update(VARIETY_DEFAULTS)
    if variety:
        p.update(draw_variety(seed, p))
    unknown = set(overrides) - set(p)
    if unknown:
        raise TypeError(f"make_case: unknown parameter(s) {sorted(unknown)}")
    p.update(overrides)
    p["seed"] = int(seed)

    scale = p["size"] * np.asarray(p["proportions"], float)
    D = np.diag([*scale, 1.0])
    b = _Builder(D)
    _build_head(b, p, rng)

    hu = np.array(list(MATERIALS.values()), np.float32)
    bone_ids = [MATERIAL_IDS[m] for m in ("cortical", "diploe", "cancellous", "dentin")]
    hu[bone_ids] *= p["hu_jitter"]
    # Lower bone density (elderly, children, physical phantoms whose "bone" is ~700-800 HU): bone HU above
    # soft tissue scaled down; cancellous bone drops more than cortical (osteoporosis thins trabeculae first).
    for m, extra in (("cortical", 1.0), ("diploe", 1.15), ("cancellous", 1.3)):
        i = MATERIAL_IDS[m]
        f = max(0.15, 1.0 - (1.0 - p["bone_density"]) * extra)
        hu[i] = 60.0 + (hu[i] - 60.0) * f

    # Pose: rotate about a point near the head's centre, then translate; the head centre sits at the origin.
    rx, ry, rz = p["rotation_deg"]
    R = axis_rotation("z", rz) @ axis_rotation("y", ry) @ axis_rotation("x", rx)
    centre = D[:3, :3] @ np.array([0.0, 12.0, -22.0])
    head_to_lps = np.eye(4)
    head_to_lps[:3, :3] = R
    head_to_lps[:3, 3] = -R @ centre + np.asarray(p["translation_mm"], float)

    case = PhantomCase(int(seed), b.shapes, hu, head_to_lps, {}, {}, p)
    if p["headrest"]:
        case.shapes[:0] = _headrest(case)
    if p["mask"]:
        case.shapes[:0] = _immobilisation_mask(case)
    head_lm, aux = _measure_landmarks(case, b)
    case.head_landmarks = head_lm
    to_lps = lambda q: head_to_lps[:3, :3] @ q + head_to_lps[:3, 3]  # noqa: E731
    case.landmarks = {n: to_lps(head_lm[n]) for n in NAMES}
    case.aux_points = {n: to_lps(q) for n, q in aux.items()}
    return case


# Parameters that only ``variety`` draws; these values leave a case as it always was.
VARIETY_DEFAULTS: dict = {
    "bone_density": 1.0, "kernel": "standard", "kernel_strength": 0.0, "metal_streaks_hu": 0.0,
    "brackets": False, "mask": False, "gantry_tilt_deg": 0.0,
    "cbct": False, "cbct_gain": 1.0, "cbct_offset_hu": 0.0, "cupping_hu": 0.0, "rings_hu": 0.0,
    "windows_follow_jaws": False,
}


def draw_variety(seed: int, p: dict) -> dict:
    """Domain randomisation (issue 10 section 4): the parameters that ``make_case(variety=True)`` redraws.

    Anatomy beyond +-15 %: Class II / III jaws (mandible and maxilla shifted up to ~9 mm), open bite (mouth
    open up to 12 deg), asymmetric faces, edentulous jaws and missing teeth; metal (fillings, crowns,
    brackets) with streaks; bone density 0.45-1.1 (a physical phantom's ~700-800 HU cortical bone at the
    low end); sharp (edge overshoot, high-frequency noise) and soft kernels; noise up to 60 HU; head
    tilted/rotated up to 25 deg and gantry tilt; an immobilisation mask; cone-beam intensity.
    """
    rng = np.random.default_rng(np.random.SeedSequence([0x5EED, int(seed), 0xD0]))
    v: dict = {"windows_follow_jaws": True}
    cls = rng.choice(["I", "II", "III"], p=[0.5, 0.25, 0.25])
    v["mandible_shift_mm"] = float({"I": rng.normal(0, 1.5), "II": -rng.uniform(3, 9), "III": rng.uniform(3, 9)}[cls])
    v["maxilla_shift_mm"] = float(rng.normal(0.0, 2.0))
    v["mandible_scale"] = float(rng.uniform(0.88, 1.12))
    v["size"] = float(rng.uniform(0.85, 1.15))
    v["chin_prominence_mm"] = float(rng.uniform(-2.0, 4.0))
    v["mouth_opening_deg"] = float(0.0 if rng.random() < 0.4 else rng.uniform(0.5, 12.0))
    v["asymmetry_mm"] = float(rng.normal(0.0, 3.0))
    v["rotation_deg"] = [float(rng.uniform(-25, 25)), float(rng.uniform(-15, 15)), float(rng.uniform(-20, 20))]
    if rng.random() < 0.12:
        v["missing_teeth"] = list(range(28))  # edentulous
    else:
        v["missing_teeth"] = [int(t) for t in np.flatnonzero(rng.random(28) < rng.uniform(0.0, 0.3))]
    v["fillings"] = [int(t) for t in np.flatnonzero(rng.random(28) < rng.uniform(0.0, 0.3))]
    v["brackets"] = bool(rng.random() < 0.12)
    v["metal_streaks_hu"] = float(rng.uniform(150.0, 700.0))
    v["bone_density"] = float(rng.choice([rng.uniform(0.45, 0.6), rng.uniform(0.6, 1.1)], p=[0.25, 0.75]))
    v["kernel"] = str(rng.choice(["standard", "sharp", "soft"], p=[0.4, 0.4, 0.2]))
    v["kernel_strength"] = float(rng.uniform(0.4, 1.2))
    v["noise_hu"] = float(rng.uniform(5.0, 60.0))
    v["gantry_tilt_deg"] = float(0.0 if rng.random() < 0.6 else rng.uniform(-25.0, 25.0))
    v["mask"] = bool(rng.random() < 0.15)
    v["headrest"] = bool(rng.random() < 0.85)
    if rng.random() < 0.2:
        v["cbct"] = True
        v["cbct_gain"] = float(rng.uniform(0.6, 1.4))
        v["cbct_offset_hu"] = float(rng.uniform(-300.0, 300.0))
        v["cupping_hu"] = float(rng.uniform(0.0, 250.0))
        v["rings_hu"] = float(rng.uniform(0.0, 60.0))
    return v


def _immobilisation_mask(case: PhantomCase) -> list[Shape]:
    """A thermoplastic mask: a ~2.5 mm shell of plastic a few mm in front of the face (painted first, so the
    head overwrites its inside)."""
    shapes = []
    for s in case.shapes:
        if s.name == "face" and s.material == MATERIAL_IDS["skin"]:
            for name, mat, grow in (("mask", "cartilage", 6.5), ("mask inside", "air", 4.0)):
                Minv = np.linalg.inv(np.vstack([s.M, [0, 0, 0, 1]]))
                centre = Minv[:3, 3]
                A = Minv[:3, :3]
                axes = np.linalg.norm(A, axis=0)
                A2 = A * ((axes + grow) / axes)
                M = np.linalg.inv(np.vstack([np.hstack([A2, centre[:, None]]), [0, 0, 0, 1]]))[:3]
                # keep the anterior half only (clip on the local coordinate pointing forward)
                shapes.append(Shape(name, MATERIAL_IDS[mat], "ellipsoid", M, clip=(1, 0.0)))
            break
    # the clip must keep the anterior (-y) side: flip the local y axis
    for sh in shapes:
        sh.M = np.diag([1.0, -1.0, 1.0]) @ sh.M
    return shapes


def _build_head(b: _Builder, p: dict, rng: np.random.Generator) -> None:
    """The anatomy in design mm (sella at the origin). Order matters: later solids overwrite earlier ones."""
    vs = np.asarray(p["vault_scale"])
    t = p["vault_thickness_mm"]
    asym = p["asymmetry_mm"]
    mx = p["maxilla_shift_mm"]
    md = p["mandible_shift_mm"]
    va = np.array([73.0, 94.0, 96.0]) * vs  # half breadth, half length, height above centre
    vdown = 55.0
    # The frontal bone's outer surface passes 3 mm in front of the designed nasion, whatever the vault size.
    vc = np.array([0.0, 0.0, 16.0])
    vc[1] = NASION[1] - 3.0 + va[1] * math.sqrt(1.0 - ((NASION[2] - vc[2]) / vdown) ** 2)
    # Soft tissue envelopes: skin, subcutaneous fat, muscle/galea.
    face_c, face_a = np.array([0.0, -36.0, -42.0]), np.array([63.0, 56.0, 82.0])
    neck_a, neck_b = np.array([0.0, 14.0, -62.0]), np.array([0.0, 18.0, -320.0])
    for mat, off in (("skin", 0.0), ("fat", 1.5), ("muscle", 5.0)):
        b.ell("scalp", mat, vc, va + 6.5 - off, down=vdown + 6.5 - off)
        b.ell("face", mat, face_c, face_a - off)
        b.cap("neck", mat, neck_a, neck_b, (48.0 - off, 58.0 - off, 55.0 - off))
    b.cap("nose", "muscle", (0, -66, 4), (0, -90, -33), (7.0, 9.0, 8.0))
    b.cap("nostrils", "air", (0, -80, -36), (0, -90, -36), (3.0, 5.0, 3.0))
    for side in (-1, 1):
        b.ell("auricle", "cartilage", (side * 70.0, 18.0, -14.0), (4.0, 14.0, 28.0), R=axis_rotation("z", side * 20.0))
    # Cranial vault: outer table, diploe, inner table, brain.
    b.ell("vault", "cortical", vc, va, down=vdown)
    b.ell("vault diploe", "diploe", vc, va - 1.8, down=vdown - 1.8)
    b.ell("vault inner table", "cortical", vc, va - (t - 1.6), down=vdown - (t - 1.6))
    b.ell("brain", "brain", vc, va - t, down=vdown - t)
    for side in (-1, 1):
        b.ell("ventricle", "csf", (side * 9.0, 28.0, 38.0), (5.0, 26.0, 9.0), R=axis_rotation("z", side * 8.0))
    zs = NASION[2] + 13.0
    y_outer = vc[1] - va[1] * math.sqrt(1.0 - ((zs - vc[2]) / va[2]) ** 2)
    b.ell("frontal sinus", "air", (0, y_outer + t / 2, zs), (12.0, max(0.8, t / 2 - 1.8), 7.0))
    # Anterior skull base and midface (orbital floors, zygomas), sphenoid, petrous bones.
    b.sup("anterior skull base", "cancellous", (0, -40, -11), (47, 26, 25))
    b.sup("midface", "cancellous", (0, -44, -26), (50, 19, 22))
    for side in (-1, 1):
        b.cap("zygomatic arch", "cortical", (side * 46.0, -36, -20), (side * 54.0, 2, -20), (4.0, 4.0, 6.0))
    b.ell("sphenoid", "cancellous", (0, 2, -12), (15, 15, 12))
    b.ell("sphenoid sinus", "air", (0, -4, -15), (9, 8, 6))
    b.cap("dorsum sellae", "cortical", (0, 7.5, -6), (0, 8.0, 6.0), (2.0, 6.0, 2.0))
    b.ell("sella", "pituitary", (0, 0, 0), (5.5, 5.5, 5.5))
    b.cap("clivus", "cortical", (0, 9, -9), (0, 21, -33), (5.0, 11.0, 5.0))
    for side in (-1, 1):
        x = side * (42.0 + (asym if side > 0 else 0.0))
        b.ell("petrous", "cortical", (x, 12.0, -22.0), (18.0, 13.0, 11.0), R=axis_rotation("z", -side * 35.0))
        b.ell("mastoid", "cortical", (side * 48.0, 30.0, -34.0), (10, 11, 14))
        b.ell("mastoid air cells", "mastoid", (side * 48.0, 30.0, -33.0), (7, 8, 10))
        r = p["ear_canal_radius_mm"]
        b.cap("ear canal", "air", (side * 36.0, 12.0, -18.0 - r), (side * 78.0, 12.0, -18.0 - r), (r, r, r))
    # Foramen magnum (medulla) and spinal canal.
    b.cap("foramen magnum", "cord", (0, 41, -20), (0, 41, -46), (4.0, 14.0, 17.0), hint=(1, 0, 0))
    # Orbits with globes.
    for side in (-1, 1):
        x = side * 33.0
        b.ell("orbit", "fat", (x, -58.0, -2.0), (17.0, 24.0, 16.0))
        b.ell("globe", "eye", (x, -66.0, -1.0), (12.0, 12.0, 12.0))
        b.ell("lens", "lens", (x, -77.0, -1.0), (4.5, 1.8, 4.5))
    # Nasal bones, nasal cavity, maxillary sinuses.
    # Nasion: the frontonasal concavity (deepest point = NASION), then the nasal bones below it.
    nx, ny, nz = NASION
    b.cap("frontonasal concavity", "muscle", (-10, ny - 8.0, nz), (10, ny - 8.0, nz), (8.0, 8.0, 8.0))
    b.cap("nasal bones", "cortical", (0, ny + 2.0, nz - 4.0), (0, ny - 8.0, nz - 24.0), (3.0, 7.0, 3.0))
    b.ell("nasal cavity", "air", (0, -44.0, -24.0), (12.0, 27.0, 17.0))
    for side in (-1, 1):
        b.ell("maxillary sinus", "air", (side * 23.0, -45.0, -28.0), (11.0, 13.0, 12.0))
    # Maxilla: body, the concavity whose deepest point is A point, palate, anterior nasal spine, alveolus.
    b.ell("maxilla", "cancellous", (0, -47.0 - mx, -45.0), (32.0, 21.0, 15.0))
    b.cap("subspinale concavity", "muscle", (-12, -74.0 - mx, -48.5), (12, -74.0 - mx, -48.5), (7.0, 7.0, 7.0))
    b.cap("hard palate", "cortical", (0, -64.0 - mx, -42.5), (0, -25.0, -42.5), (3.0, 16.0, 3.2))
    b.cap("anterior nasal spine", "cortical", (0, -60.0 - mx, -41.5), (0, -71.5 - mx, -41.5), (2.2, 3.0, 2.2))
    b.ell("oral cavity", "air", (0, -42.0, -62.0), (22.0, 22.0, 0.6 + 3.0 * p["mouth_opening_deg"] / 4.5))
    upper = _arch(b, "upper", y_front=-66.0 - mx, z=-55.0, width=27.0, depth=44.0, crest_dz=-1.0, p=p)
    # Pharynx behind the palate.
    b.cap("pharynx", "air", (0, -14.0, -34.0), (0, -6.0, -200.0), (6.0, 11.0, 7.0))
    b.cap("spinal canal", "cord", (0, 40, -40), (0, 40, -260), (8.0, 8.0, 8.0))
    _cervical_spine(b)
    # Mandible: a rigid part rotating about the condylar axis when the mouth opens.
    pivot = np.array([0.0, 2.0, -24.0])
    G = np.eye(4)
    G[:3, :3] = axis_rotation("x", p["mouth_opening_deg"])
    G[:3, 3] = pivot - G[:3, :3] @ pivot
    ms = p["mandible_scale"]
    S = np.eye(4)
    S[:3, :3] *= ms
    S[:3, 3] = pivot * (1 - ms)
    b.group = G @ S
    cp = p["chin_prominence_mm"]
    b.cap("symphysis", "cancellous", (0, -57.0 - md, -96.0), (0, -59.0 - md, -72.0), (7.0, 14.0, 8.5),
          hint=(1, 0, 0))
    b.cap("supramentale concavity", "muscle", (-12, -73.5 - md, -86.5), (12, -73.5 - md, -86.5), (9.0, 9.0, 9.0))
    b.ell("chin", "cortical", (0, -59.0 - md, -96.0), (16.0, 7.5 + cp, 14.0))
    for side in (-1, 1):
        g0 = np.array([side * 47.5, -14.0, -79.0])
        b.cap("mandibular body", "cortical", (side * 13.0, -54.0 - md, -93.0), g0, (11.0, 5.5, 11.0))
        b.cap("ramus", "cortical", g0, (side * 50.0, -1.0, -32.0), (11.0, 4.5, 11.0))
        b.cap("coronoid", "cortical", (side * 49.0, -12.0, -50.0), (side * 46.0, -24.0, -33.0), (4.0, 4.0, 4.0))
        b.ell("condyle", "cortical", (side * 50.0, 2.0, -24.0), (9.5, 5.0, 5.5))
        b.cap("mandibular canal", "cancellous", (side * 15.0, -52.0 - md, -92.0), g0 + (0, 0, 3), (2.0, 2.0, 2.0))
    lower = _arch(b, "lower", y_front=-62.0 - md, z=-73.0, width=25.0, depth=44.0, crest_dz=1.0, p=p)
    b.group = np.eye(4)
    b.design = {"upper_arch": upper, "lower_arch": lower, "pivot": pivot, "jaw": G @ S}


def _arch(b: _Builder, which: str, *, y_front, z, width, depth, crest_dz, p) -> dict:
    """Alveolar process along a dental arch, then 14 teeth (crown enamel toward the occlusal plane)."""
    phis = np.radians(np.linspace(-90, 90, 13))
    pts = np.stack([width * np.sin(phis), y_front + depth * (1 - np.cos(phis)), np.full(13, z)], 1)
    for a, c in zip(pts[:-1], pts[1:]):
        b.cap(f"{which} alveolus", "cancellous", a, c, (5.5, 5.5, 7.0), hint=(0, 0, 1))
    offset = 0 if which == "upper" else 14
    occlusal = -63.0
    for n, deg in enumerate((6, 18, 30, 43, 55, 68, 81)):
        for side, sgn in ((0, -1), (1, 1)):
            tooth = offset + side * 7 + n
            if tooth in p["missing_teeth"]:
                continue
            phi = math.radians(sgn * deg)
            x, y = width * math.sin(phi), y_front + depth * (1 - math.cos(phi)) + (1.5 if which == "upper" else -1.0)
            r = 2.8 if n < 3 else 4.2
            root_end = z + (12.0 if which == "upper" else -12.0)
            crown = occlusal + (2.5 if which == "upper" else -2.5)
            b.cap(f"{which} root", "dentin", (x, y, root_end), (x, y, crown), (2.0, r * 0.7, r * 0.7), hint=(1, 0, 0))
            mat = "metal" if tooth in p["fillings"] else "enamel"
            b.ell(f"{which} crown", mat, (x, y, crown), (r, r, 3.5))
            if p["brackets"]:  # orthodontic bracket on the labial/buccal face of the crown
                nrm = np.array([math.sin(phi), -math.cos(phi), 0.0])
                b.ell(f"{which} bracket", "metal", np.array([x, y, crown]) + nrm * (r + 0.6), (1.6, 1.6, 1.6))
    return {"y_front": y_front, "z": z}


def _cervical_spine(b: _Builder) -> None:
    """Atlas ring, dens and body of C2, C3; cortical shells over cancellous bone, discs between."""
    ring_c, ring_r = np.array([0.0, 36.0, -54.0]), 22.0
    angles = np.radians(np.arange(0, 361, 30))
    ring = np.stack([ring_r * np.sin(angles), ring_c[1] - ring_r * np.cos(angles), np.full(len(angles), ring_c[2])], 1)
    for a, c in zip(ring[:-1], ring[1:]):
        b.cap("atlas", "cortical", a, c, (4.0, 4.0, 5.0), hint=(0, 0, 1))
    for side in (-1, 1):
        b.ell("atlas lateral mass", "cancellous", (side * 18.0, 30.0, -54.0), (8, 10, 7))
    b.cap("dens", "cortical", (0, 21.0, -78.0), (0, 21.0, -56.0), (5.0, 5.0, 5.0))
    for name, zc in (("C2", -84.0), ("C3", -104.0)):
        b.ell(name, "cortical", (0, 22.0, zc), (11.0, 9.5, 8.0))
        b.ell(name + " cancellous", "cancellous", (0, 22.0, zc), (9.5, 8.0, 6.5))
        b.cap(name + " spinous", "cortical", (0, 44.0, zc), (0, 66.0, zc - 6), (5.0, 4.0, 5.0), hint=(1, 0, 0))
        for side in (-1, 1):
            b.cap(name + " lamina", "cortical", (side * 9.0, 30.0, zc), (0, 48.0, zc - 2), (3.5, 3.5, 4.0))
    b.ell("C2-C3 disc", "disc", (0, 22.0, -94.0), (10.0, 8.5, 2.0))


def _headrest(case: PhantomCase) -> list[Shape]:
    """A carbon-fibre head cradle and foam pad under the occiput, fixed in the scanner (LPS) frame."""
    post = case.lps_to_head[:3, :3].T @ np.array([0, 1.0, 0])
    y_back = max(float(np.dot(s.support(post), post)) for s in case.shapes if s.name == "scalp")
    y_back += float(case.head_to_lps[1, 3])
    shapes = []
    for name, mat, gap in (("headrest", "headrest", 10.0), ("headrest pad", "foam", 2.0)):
        # Elliptic cylinder along z whose posterior wall sits behind the occiput; keep its posterior part only.
        ry, rx = 110.0, 105.0
        c = np.array([0.0, y_back + gap - ry, 0.0])
        L = np.diag([1 / 400.0, 1 / rx, 1 / ry]) @ _frame(np.array([0, 0, 1.0]), (1, 0, 0))
        local = np.eye(4)
        local[:3, :3] = L
        local[:3, 3] = -L @ (c - np.array([0, 0, 300.0]))
        M = (local @ case.head_to_lps)[:3]
        shapes.append(Shape(name, MATERIAL_IDS[mat], "capsule", M, length=1.5, clip=(2, 0.55)))
    return shapes


# --------------------------------------------------------------------------------------------- landmarks
def _grid2(plane_x: float, ys: np.ndarray, zs: np.ndarray) -> np.ndarray:
    Y, Z = np.meshgrid(ys, zs, indexing="ij")
    return np.stack([np.full_like(Y, plane_x), Y, Z], -1)


def _front_outline(case, x, ylo, yhi, zlo, zhi, step=0.1):
    """Per z row, the most anterior (smallest y) skeletal point in [ylo, yhi]; NaN where there is none."""
    ys = np.arange(ylo, yhi, step)
    zs = np.arange(zlo, zhi, step)
    bone = _SKEL_LUT[case.labels_head(_grid2(x, ys, zs))]
    has = bone.any(0)
    first = np.argmax(bone, 0)
    yfront = np.where(has, ys[first], np.nan)
    return yfront, zs


def _refine_edge(case, p_out, p_in, rounds=2, n=64):
    """The bone boundary between a point outside bone and one inside, sampled finely (two passes)."""
    a, b = np.asarray(p_out, float), np.asarray(p_in, float)
    for _ in range(rounds):
        ts = np.linspace(0.0, 1.0, n)
        pts = a + ts[:, None] * (b - a)
        bone = _SKEL_LUT[case.labels_head(pts)]
        k = int(np.argmax(bone)) if bone.any() else n - 1
        a, b = pts[max(k - 1, 0)], pts[k]
    return (a + b) / 2


def _deepest(case, x, ylo, yhi, zlo, zhi) -> np.ndarray:
    """Deepest (most posterior) point of the anterior bone outline between two heights (A point, B point,
    nasion): the row whose first bone from the front lies furthest back."""
    yf, zs = _front_outline(case, x, ylo, yhi, zlo, zhi, step=0.25)
    if np.all(np.isnan(yf)):
        raise RuntimeError("no bone in landmark window")
    k = int(np.nanargmax(yf))
    zc, yc = zs[k], yf[k]
    yf, zs = _front_outline(case, x, yc - 0.5, yc + 1.0, max(zlo, zc - 0.75), min(zhi, zc + 0.75), step=0.02)
    k = int(np.nanargmax(yf))
    best = yf[k]
    ties = np.flatnonzero(np.abs(yf - best) < 1e-6)
    z = float(zs[ties].mean())
    return _refine_edge(case, (x, best - 0.05, z), (x, best + 0.03, z))


def _support(case, centre, half, direction, plane_x=None, step=0.25) -> np.ndarray:
    """The skeletal point furthest along ``direction`` inside a box (or a sagittal plane) around ``centre``."""
    d = np.asarray(direction, float)
    d /= np.linalg.norm(d)
    c = np.asarray(centre, float)
    h = np.asarray(half, float)
    for _ in range(2):
        axes = [np.arange(c[i] - h[i], c[i] + h[i] + 1e-9, step) for i in range(3)]
        if plane_x is not None:
            axes[0] = np.array([plane_x])
        P = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
        bone = _SKEL_LUT[case.labels_head(P)]
        if not bone.any():
            raise RuntimeError("no bone in landmark window")
        Pb = P[bone]
        score = Pb @ d
        top = score >= score.max() - 1e-9
        c = Pb[top].mean(0)
        h = np.full(3, 2.0 * step)
        step /= 8.0
    return _refine_edge(case, c + 0.1 * d, c - 0.05 * d)


def _measure_landmarks(case: PhantomCase, b: _Builder) -> tuple[dict, dict]:
    """Measure the 16 landmarks (head frame) on the finished solid; see docs/phantoms.md for definitions."""
    D = b.D[:3, :3]
    jaw = b.design["jaw"]
    h = lambda q: D @ np.asarray(q, float)  # noqa: E731  design -> head, skull
    hj = lambda q: D @ (jaw[:3, :3] @ np.asarray(q, float) + jaw[:3, 3])  # noqa: E731  design -> head, jaw
    lm: dict[str, np.ndarray] = {}
    # search windows follow the jaws when they are shifted far (Class II / III, variety cases); plain heads keep
    # the windows their landmarks were always measured with
    follow = case.params["windows_follow_jaws"]
    md, mx = (case.params["mandible_shift_mm"], case.params["maxilla_shift_mm"]) if follow else (0.0, 0.0)
    aux: dict[str, np.ndarray] = {}
    lm["Sella"] = h((0, 0, 0))  # centre of the pituitary fossa sphere
    # Nasion: deepest point of the midline profile between glabella and the nasal bones.
    n = h(NASION)
    lm["Nasion"] = _deepest(case, 0.0, n[1] - 15, n[1] + 15, n[2] - 6, n[2] + 10)
    for side, sgn in (("R", -1), ("L", 1)):
        o = h((sgn * 33.0, -62.5, -17.5))
        lm[f"Orbitale {side}"] = _support(case, o, (0, 8, 8), (0, -1, 1), plane_x=o[0])
        # Porion: the top of the ear canal at its lateral bony opening.
        shape = next(s for s in case.shapes if s.name == "ear canal" and np.sign(s.support((1, 0, 0))[0]) == sgn)
        top = shape.support((0, 0, 1.0))
        inner = h((sgn * 40.0, 0, 0))[0]
        xs = np.arange(inner, sgn * 90.0 * D[0, 0], sgn * 0.05)
        line = np.stack([xs, np.full_like(xs, top[1]), np.full_like(xs, top[2] + 0.15)], 1)
        bone = _SKEL_LUT[case.labels_head(line)]
        gone = np.flatnonzero(~bone)
        edge = xs[gone[0] - 1] if len(gone) and gone[0] > 0 else xs[-1]
        lm[f"Porion {side}"] = np.array([edge, top[1], top[2]])
    ans = h((0, -72 - mx, -41.5))
    lm["ANS"] = _support(case, ans, (0, 8, 3.5), (0, -1, 0), plane_x=0.0)
    pns = h((0, -22, -42.5))
    lm["PNS"] = _support(case, pns, (0, 6, 3.0), (0, 1, 0), plane_x=0.0)
    pr = h((0, -72 - mx, -57))
    aux["Prosthion"] = _support(case, pr, (0, 8, 5), (0, -1, -0.3), plane_x=0.0)
    lm["A point"] = _deepest(case, 0.0, lm["ANS"][1] - 2, lm["ANS"][1] + 20, aux["Prosthion"][2], lm["ANS"][2] - 2.5)
    chin = hj((0, -66 - md, -97))
    lm["Pogonion"] = _support(case, chin, (0, 8, 7), (0, -1, 0), plane_x=0.0)
    me = hj((0, -59 - md, -110.0))
    lm["Menton"] = _support(case, me, (0, 10, 6), (0, 0, -1), plane_x=0.0)
    lm["Gnathion"] = _support(case, (lm["Pogonion"] + lm["Menton"]) / 2, (0, 8, 8), (0, -1, -1), plane_x=0.0)
    idl = hj((0, -67 - md, -74))
    aux["Infradentale"] = _support(case, idl, (0, 8, 5), (0, -1, 0.3), plane_x=0.0)
    lm["B point"] = _deepest(case, 0.0, lm["Pogonion"][1] - 2, lm["Pogonion"][1] + 22, lm["Pogonion"][2] + 1.0,
                             aux["Infradentale"][2] - 1.0)
    for side, sgn in (("R", -1), ("L", 1)):
        g0 = hj((sgn * 47.5, -14.0, -79.0))
        u1 = g0 - hj((sgn * 13.0, -54.0, -93.0))
        u2 = g0 - hj((sgn * 50.0, -1.0, -32.0))
        d = u1 / np.linalg.norm(u1) + u2 / np.linalg.norm(u2)
        d[0] = 0.0
        lm[f"Gonion {side}"] = _support(case, g0 + 8 * d / np.linalg.norm(d), (9, 9, 9), d, step=0.6)
        cond = hj((sgn * 50.0, 2.0, -24.0))
        aux[f"Condylion {side}"] = _support(case, cond, (10, 6, 7), (0, 0, 1), step=0.6)
    ba = h((0, 24, -38))
    lm["Basion"] = _support(case, ba, (0, 6, 5), (0, 1, -1), plane_x=0.0)
    return {n: lm[n] for n in NAMES}, aux


# --------------------------------------------------------------------------------------------- measurements
def _angle(a, vertex, c) -> float:
    u, v = np.asarray(a) - vertex, np.asarray(c) - vertex
    return math.degrees(math.acos(np.clip(np.dot(u, v) / np.linalg.norm(u) / np.linalg.norm(v), -1, 1)))


def _plane_normal(p, q, r) -> np.ndarray:
    n = np.cross(np.asarray(q) - p, np.asarray(r) - p)
    return n / np.linalg.norm(n)


def measurements(landmarks: dict[str, np.ndarray], aux: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Cephalometric measurements (degrees, mm) from landmark positions (any frame, same units)."""
    L = {k: np.asarray(v, float) for k, v in landmarks.items()}
    S, N = L["Sella"], L["Nasion"]
    dist = lambda a, c: float(np.linalg.norm(L[a] - L[c]))  # noqa: E731
    go = (L["Gonion R"] + L["Gonion L"]) / 2
    po = (L["Porion R"] + L["Porion L"]) / 2
    orb = (L["Orbitale R"] + L["Orbitale L"]) / 2
    fh = _plane_normal(L["Porion R"], L["Porion L"], orb)
    mp = _plane_normal(L["Gonion R"], L["Gonion L"], L["Menton"])
    out = {
        "SNA": _angle(S, N, L["A point"]),
        "SNB": _angle(S, N, L["B point"]),
        "S-N": dist("Sella", "Nasion"),
        "N-Me": dist("Nasion", "Menton"),
        "Go-Me": float(np.mean([dist("Gonion R", "Menton"), dist("Gonion L", "Menton")])),
        "FMA": math.degrees(math.acos(abs(float(np.dot(fh, mp))))),
        "Ba-N": dist("Basion", "Nasion"),
        "S-Ba": dist("Sella", "Basion"),
        "inter-porion": dist("Porion R", "Porion L"),
        "inter-orbitale": dist("Orbitale R", "Orbitale L"),
        "bigonial": dist("Gonion R", "Gonion L"),
    }
    out["ANB"] = out["SNA"] - out["SNB"]
    sn = (N - S) / np.linalg.norm(N - S)
    out["SN-FH"] = 90.0 - math.degrees(math.acos(abs(float(np.dot(sn, fh)))))
    del po, go
    if aux:
        # As on a lateral cephalogram: projected on the plane normal to the porion axis.
        axis = (L["Porion L"] - L["Porion R"]) / np.linalg.norm(L["Porion L"] - L["Porion R"])
        proj = lambda q: q - np.dot(q, axis) * axis  # noqa: E731
        angles = []
        for side in ("R", "L"):
            co = np.asarray(aux[f"Condylion {side}"], float)
            angles.append(_angle(proj(co), proj(L[f"Gonion {side}"]), proj(L["Menton"])))
        out["gonial angle"] = float(np.mean(angles))
    return out


# --------------------------------------------------------------------------------------------- writing
def _uid(seed: int, *parts) -> str:
    return generate_uid(entropy_srcs=[_UID_ROOT, str(int(seed)), *[str(p) for p in parts]])


def _head_extent_z(case: PhantomCase) -> tuple[float, float]:
    """LPS z of the top of the scalp and of the chin's soft tissue."""
    up = case.lps_to_head[:3, :3].T @ np.array([0, 0, 1.0])
    top = max(float(np.dot(s.support(up), up)) for s in case.shapes if s.name == "scalp")
    z_top = top + float(case.head_to_lps[2, 3])
    z_bottom = float(case.landmarks["Menton"][2] - 28.0)
    return z_bottom, z_top


def write_case(case: PhantomCase, out_dir: str | Path, pixel_spacing: float | None = None,
               slice_thickness: float | None = None, size: int = 512, tilt_deg: float = 0.0,
               gaps: Sequence[float] | Callable[[int], float] | None = None, order: str = "ascending",
               transfer_syntax: str = ExplicitVRLittleEndian, z_range: tuple[float, float] | None = None,
               progress: bool = False, coverage=None) -> Path:
    """Render ``case`` and write it as a CT Image Storage series, one file per slice, plus landmarks.json.

    ``pixel_spacing``/``slice_thickness`` default to the case's drawn values (the spacing is for a 512
    matrix and scaled to keep the field of view for other sizes). Slices are spaced by the thickness along z;
    ``gaps`` adds extra mm after slice k (a list, or a callable k -> mm). ``tilt_deg`` is a gantry tilt: the
    image plane is tilted about the patient x axis while slice positions step along z (PS3.3 C.7.6.2.1.1).
    ``order`` sets Instance Number against position: "ascending" (inferior first), "reversed", "shuffled".
    ``z_range`` = (z_min, z_max) LPS mm overrides the automatic chin-to-vertex extent.
    ``coverage``: a ``coverage.Region`` (a clinical scan range): slices only within its slab, and pixels
    outside its cylinder (cone-beam field of view) set to air; landmarks.json records the region and, per
    landmark, whether it lies inside the scanned volume.
    """
    from pacs_landmarks.dicom.write import SeriesInfo, save, slice_dataset

    if order not in ("ascending", "reversed", "shuffled"):
        raise ValueError(f"order must be ascending, reversed or shuffled, not {order!r}")
    if not 8 <= int(size) <= 4096:
        raise ValueError(f"size must be 8-4096 pixels, not {size}")
    if abs(tilt_deg) >= 45:
        raise ValueError(f"gantry tilt must be under 45 degrees, not {tilt_deg}")
    for name, value in (("pixel_spacing", pixel_spacing), ("slice_thickness", slice_thickness)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number of mm, not {value}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    p = case.params
    ps = float(pixel_spacing) if pixel_spacing else p["pixel_spacing"] * 512.0 / size
    thick = float(slice_thickness) if slice_thickness else p["slice_thickness"]
    if z_range is None:
        z0, z1 = _head_extent_z(case)
        z1 -= p["vertex_cut_mm"]
    else:
        z0, z1 = z_range
    if coverage is not None:
        z0, z1 = max(z0, coverage.z_lo), min(z1, coverage.z_hi)
        if z1 < z0:
            raise ValueError(f"coverage {coverage.kind} leaves no slice of this head")
    n = max(1, int(math.floor((z1 - z0) / thick)) + 1)
    steps = np.full(n, thick)
    steps[0] = 0.0
    if gaps is not None:
        extra = [float(gaps(k)) for k in range(n - 1)] if callable(gaps) else [float(g) for g in gaps]
        if any(not math.isfinite(g) or g < 0 for g in extra):
            raise ValueError("gaps must be finite, non-negative extra spacings in mm")
        steps[1:len(extra[: n - 1]) + 1] += np.asarray(extra[: n - 1])
    zs = z0 + np.cumsum(steps)
    t = math.radians(tilt_deg)
    row = np.array([1.0, 0.0, 0.0])
    col = np.array([0.0, math.cos(t), math.sin(t)])
    fov = ps * size
    # Top-left pixel so that the image centre lies on x = y = 0 at the slice's z (tilted planes pivot there).
    firsts = [np.array([-(fov - ps) / 2, 0.0, z]) - col * (fov - ps) / 2 for z in zs]

    write_params = f"{ps:.4f}/{thick:.4f}/{size}/{tilt_deg:.3f}/{order}/{z0:.2f}/{z1:.2f}/{list(steps.round(3))}"
    info = SeriesInfo(
        patient_name=f"PHANTOM^{case.seed:04d}",
        patient_id=f"PH{case.seed:06d}",
        study_instance_uid=_uid(case.seed, "study"),
        series_instance_uid=_uid(case.seed, "series", write_params),
        frame_of_reference_uid=_uid(case.seed, "frame-of-reference"),
        study_date=f"2024{1 + case.seed % 12:02d}{1 + case.seed % 28:02d}",
        study_id=str(case.seed % 100000),
        accession_number=f"PH{case.seed:08d}"[:16],
        series_description=f"Phantom head CT {thick:g} mm",
        patient_sex="O",
    )
    rng = np.random.default_rng(np.random.SeedSequence([0x401, case.seed, _stable_hash(write_params)]))
    instance = np.arange(1, n + 1)
    if order == "reversed":
        instance = instance[::-1]
    elif order == "shuffled":
        instance = rng.permutation(instance)

    # Render in chunks of slices so memory stays modest for big matrices.
    chunk = max(1, int(4_000_000 // (size * size)))
    iterator = range(0, n, chunk)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc=f"case {case.seed}", unit="chunk", leave=False)
    written = []
    for c0 in iterator:
        c1 = min(n, c0 + chunk)
        hu = _render_slices(case, firsts[c0:c1], row, col, ps, size, thick, rng)
        if coverage is not None and coverage.cylinder is not None:
            cx, cy, rad = coverage.cylinder
            grid = np.arange(size) * ps
            for k in range(c0, c1):
                pos = firsts[k][None, None] + grid[:, None, None] * col + grid[None, :, None] * row
                hu[k - c0][(pos[..., 0] - cx) ** 2 + (pos[..., 1] - cy) ** 2 > rad * rad] = -1000.0
        for k in range(c0, c1):
            ds = slice_dataset(
                hu[k - c0], info=info, sop_instance_uid=_uid(case.seed, "sop", write_params, k),
                instance_number=int(instance[k]), position=firsts[k], orientation=[*row, *col],
                pixel_spacing=(ps, ps), slice_thickness=thick, gantry_tilt_deg=tilt_deg,
            )
            written.append(save(ds, out / f"IM{int(instance[k]):04d}.dcm", transfer_syntax))
    doc = {
        "landmark_set": LANDMARK_SET,
        "frame_of_reference_uid": info.frame_of_reference_uid,
        "study_instance_uid": info.study_instance_uid,
        "series_instance_uid": info.series_instance_uid,
        "landmarks": [{"name": k, "position_lps_mm": [round(float(v), 4) for v in case.landmarks[k]]}
                      for k in NAMES],
        "aux_points": [{"name": k, "position_lps_mm": [round(float(v), 4) for v in q]}
                       for k, q in case.aux_points.items()],
        "seed": case.seed,
        "pixel_spacing_mm": ps,
        "slice_thickness_mm": thick,
        "rows": size,
        "columns": size,
        "slices": n,
        "gantry_tilt_deg": tilt_deg,
        "order": order,
        "measurements": {k: round(v, 3) for k, v in measurements(case.landmarks, case.aux_points).items()},
        "params": {k: v for k, v in p.items()},
    }
    if coverage is not None:
        # The scanned volume: the stack of (possibly tilted) slices, thickness included, within the field of
        # view; and the cone-beam cylinder, if any.
        normal = np.cross(row, col)
        normal /= np.linalg.norm(normal)
        offsets = np.array([float(normal @ f) for f in firsts])
        lo_n, hi_n = offsets.min() - thick / 2, offsets.max() + thick / 2
        doc["coverage"] = {"kind": coverage.kind, "z_lo": float(zs.min()), "z_hi": float(zs.max()),
                           "slice_normal": normal.round(6).tolist(), "cylinder": list(coverage.cylinder)
                           if coverage.cylinder else None}
        for item in doc["landmarks"]:
            q = np.asarray(item["position_lps_mm"])
            along = float(normal @ q)
            rel = q - firsts[0]
            u, v = float(rel @ row), float(rel @ col)  # in-plane position (mm) from the first pixel
            edges = [along - lo_n, hi_n - along, u + ps / 2, fov - ps / 2 - u, v + ps / 2, fov - ps / 2 - v]
            if coverage.cylinder is not None:
                cx, cy, rad = coverage.cylinder
                edges.append(rad - math.hypot(q[0] - cx, q[1] - cy))
            item["in_scan"] = bool(min(edges) >= 0)
            item["edge_distance_mm"] = round(abs(min(edges)), 2)  # inside: to the nearest edge; outside: about
    (out / "landmarks.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")
    return out


def _stable_hash(text: str) -> int:
    import zlib

    return zlib.crc32(text.encode("utf-8"))


def _render_slices(case, firsts, row, col, ps, size, thick, rng) -> np.ndarray:
    """Render slices given their first-pixel positions; each slice may sit at its own z (gaps)."""
    n = len(firsts)
    normal = np.cross(row, col)
    # Consecutive slices are rendered together when evenly spaced; otherwise one at a time.
    out = np.empty((n, size, size), np.float32)
    k = 0
    while k < n:
        m = 1
        while k + m < n and np.allclose(firsts[k + m] - firsts[k + m - 1], firsts[k + 1] - firsts[k], atol=1e-6):
            m += 1
        step = firsts[k + 1] - firsts[k] if m > 1 else normal * thick
        aff = np.eye(4)
        aff[:3, 0] = step
        aff[:3, 1] = col * ps
        aff[:3, 2] = row * ps
        aff[:3, 3] = firsts[k]
        out[k:k + m] = case.render(aff, (m, size, size), slice_thickness=thick, rng=rng)
        k += m
    return out


# --------------------------------------------------------------------------------------------- CLI
def register(sub: argparse._SubParsersAction) -> None:
    """``pacs-landmarks phantom OUT``: write synthetic head-CT series with ground-truth landmarks."""
    p = sub.add_parser(
        "phantom",
        help="write synthetic head-CT series with exact landmark positions",
        description="Write N synthetic head CT series (OUT/case-0001/*.dcm + landmarks.json) with the "
        "16 craniofacial landmarks in patient LPS mm. Same seed, same files.",
    )
    p.add_argument("out", type=Path, metavar="OUT", help="output folder")
    p.add_argument("--count", type=int, default=1, help="number of cases (default 1)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of case-0001; case-0002 uses SEED+1, and so on (default 0)")
    p.add_argument("--slice-thickness", type=float, default=None, metavar="MM",
                   help="slice thickness and spacing in mm (default: drawn per case, 0.625-5)")
    p.add_argument("--pixel-spacing", type=float, default=None, metavar="MM",
                   help="pixel spacing in mm (default: drawn per case, 0.45-1.0 at 512, scaled to keep the FOV)")
    p.add_argument("--size", type=int, default=512, help="rows = columns (default 512)")
    p.add_argument("--tilt", type=float, default=0.0, metavar="DEG", help="gantry tilt in degrees")
    p.add_argument("--order", choices=("ascending", "reversed", "shuffled"), default="ascending",
                   help="instance numbering against slice position")
    from pacs_landmarks.inference.coverage import KINDS

    p.add_argument("--coverage", choices=KINDS + ("mixed",), default="full",
                   help="scan range: full head (default), routine head (foramen magnum to vertex), sinus, "
                   "facial bones, mandible only, dental cone-beam small/medium cylinder, random cuts, or "
                   "mixed (drawn per case)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=JSON",
                   help="fix a drawn case parameter for every case (repeatable), e.g. fillings=[4,5,18,19] "
                   "metal_streaks_hu=500 cbct=true bone_density=0.5 (see make_case)")
    p.add_argument("--variety", type=float, nargs="?", const=1.0, default=0.0, metavar="SHARE",
                   help="share of cases (0-1, default 0; 1 when given alone) drawn with domain randomisation: jaw classes, metal with streaks, bone density, kernels, noise "
                   "up to 60 HU, head and gantry tilt, masks, cone-beam intensity (see docs/phantoms.md)")
    p.set_defaults(func=_cmd_phantom)


def _cmd_phantom(args: argparse.Namespace) -> int:
    if args.count < 1:
        raise CommandError("--count must be at least 1")
    if not 0.0 <= args.variety <= 1.0:
        raise CommandError("--variety must be a share between 0 and 1")
    if args.size < 16 or args.size > 2048:
        raise CommandError("--size must be between 16 and 2048")
    for name in ("slice_thickness", "pixel_spacing"):
        v = getattr(args, name)
        if v is not None and not v > 0:
            raise CommandError(f"--{name.replace('_', '-')} must be positive")
    overrides = {}
    for item in args.param:
        name, _, value = item.partition("=")
        try:
            overrides[name.strip()] = json.loads(value)
        except ValueError:
            raise CommandError(f"--param {item!r}: the value must be JSON (e.g. 0.5, true, [1, 2])") from None
    unknown = set(overrides) - set(make_case(0).params)
    if unknown:
        raise CommandError(f"--param: unknown parameter(s) {', '.join(sorted(unknown))}")
    from tqdm import tqdm

    args.out.mkdir(parents=True, exist_ok=True)
    for k in tqdm(range(args.count), desc="phantoms", unit="case", disable=args.count < 2):
        # evenly spread: case k is a variety case when the running share steps up at k
        variety = int((k + 1) * args.variety + 1e-9) > int(k * args.variety + 1e-9)
        case = make_case(args.seed + k, variety=variety, **overrides)
        region = None
        if args.coverage != "full":
            from pacs_landmarks.inference.coverage import draw_region, draw_training_kind

            crng = np.random.default_rng(np.random.SeedSequence([0xC0, args.seed + k]))
            kind = draw_training_kind(crng) if args.coverage == "mixed" else args.coverage
            region = draw_region(kind, case.landmarks, crng)
        tilt = args.tilt or case.params["gantry_tilt_deg"]
        try:
            write_case(case, args.out / f"case-{k + 1:04d}", pixel_spacing=args.pixel_spacing,
                       slice_thickness=args.slice_thickness, size=args.size, tilt_deg=tilt, order=args.order,
                       progress=args.count < 2, coverage=region)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
    print(f"wrote {args.count} case(s) to {args.out}")
    return 0
