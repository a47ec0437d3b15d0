"""Synthetic lateral cephalograms: a cephalostat's cone-beam projection of the 3D head phantoms.

Geometry (docs/cephalograms.md): the X-ray source sits ``SOD`` (~1500 mm) from the mid-sagittal plane on the
patient's right, the detector ``SID - SOD`` (~150 mm) behind it on the left (View Position LL), so the
mid-sagittal plane is magnified by ``SID / SOD`` (~1.1); the central ray passes through the ear rods (the
porion axis). A point at depth ``x`` (mm toward the detector) lands on the detector at
``c + (p - c) * SID / (SOD + x)``: the two sides of the head are magnified differently, which is the double
contour of the mandible and the orbits that clinicians trace through the middle.

The line integral of attenuation is summed slab by slab: each sagittal slab of the phantom is sampled on the
detector grid back-projected to that slab (exact cone-beam geometry, no parallel-beam approximation), with
mu = mu_water * (1 + HU / 1000). Then: ear rods with metal ring markers, the nasal positioner, a soft-tissue
(profile) filter, collimation, scatter (a wide blur of the primary), quantum noise, detector blur, and a
vendor-like display curve (log, window, gamma, unsharp masking) drawn at random per image so that a model does
not learn one look.

The anatomy the CT phantom lacks for the ISBI landmarks is added here, on the solid, before measuring:
lips and a soft-tissue chin over a reshaped lower-face profile (the jaw is painted again on top so no bone is
lost), and the measurements of subnasale, the lip points, soft-tissue pogonion, the incisor tips and
articulare (the posterior border of the condyle meeting the inferior contour of the cranial base, on the
projection). Landmark positions are projected with the same geometry; bilateral ones (orbitale, porion,
gonion, articulare) are the midpoint of their two projections.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from pacs_landmarks.dicom.volume import axis_rotation
from pacs_landmarks.errors import CommandError
from pacs_landmarks.inference.phantom import MATERIAL_IDS, PhantomCase, Shape, make_case

LANDMARK_SET = "ceph19"
NAMES = (
    "Sella", "Nasion", "Orbitale", "Porion", "A point", "B point", "Pogonion", "Menton", "Gnathion", "Gonion",
    "Lower incisal incision", "Upper incisal incision", "Upper lip", "Lower lip", "Subnasale",
    "Soft tissue pogonion", "Posterior nasal spine", "Anterior nasal spine", "Articulare",
)
# Names of the CT phantom's landmarks that are the same points (head frame).
_FROM_CT = {"Sella": "Sella", "Nasion": "Nasion", "A point": "A point", "B point": "B point",
            "Pogonion": "Pogonion", "Menton": "Menton", "Gnathion": "Gnathion",
            "Posterior nasal spine": "PNS", "Anterior nasal spine": "ANS"}
_BILATERAL = {"Orbitale": ("Orbitale R", "Orbitale L"), "Porion": ("Porion R", "Porion L"),
              "Gonion": ("Gonion R", "Gonion L")}
_CENTRAL_INCISORS = (0, 7, 14, 21)  # tooth numbers of the phantom's four central incisors
MU_WATER = 0.02  # 1/mm, about 60 keV effective energy
_UID_ROOT = "pacs-landmarks-ceph-phantom"


@dataclass(frozen=True)
class CephGeometry:
    """Cephalostat geometry in the ceph frame (mm; x toward the detector, y posterior, z superior, origin at
    sella): source-to-mid-sagittal ``sod``, source-to-detector ``sid``, central ray through ``centre`` (y, z)."""

    sod: float
    sid: float
    centre: tuple[float, float]

    @property
    def magnification(self) -> float:
        return self.sid / self.sod

    def to_midplane(self, p: np.ndarray) -> np.ndarray:
        """(..., 3) ceph-frame points -> (..., 2) (y, z) where their ray crosses the mid-sagittal plane."""
        p = np.asarray(p, float)
        c = np.asarray(self.centre, float)
        return c + (p[..., 1:] - c) * (self.sod / (self.sod + p[..., :1]))


@dataclass
class CephImage:
    """A rendered cephalogram: stored values, pixel geometry, landmarks in SCOORD pixels (column, row)."""

    pixels: np.ndarray  # uint16, rows x columns, MONOCHROME2
    bits_stored: int
    imager_pixel_spacing: float  # mm at the detector
    geometry: CephGeometry
    landmarks_px: dict[str, tuple[float, float]]
    params: dict
    seed: int

    @property
    def pixel_spacing_mm(self) -> float:
        """At the mid-sagittal plane: Imager Pixel Spacing / magnification."""
        return self.imager_pixel_spacing / self.geometry.magnification


# --------------------------------------------------------------------------------------------- anatomy
def _ellipsoid(name: str, material: str, centre, axes, R=None, clip=None) -> Shape:
    """An ellipsoid given directly in the head frame (``R`` columns: its axes)."""
    R = np.eye(3) if R is None else np.asarray(R, float)
    A = np.diag(1.0 / np.asarray(axes, float)) @ R.T
    M = np.hstack([A, (-A @ np.asarray(centre, float))[:, None]])
    return Shape(name, MATERIAL_IDS[material], "ellipsoid", M, clip=clip)


def _profile(case: PhantomCase, z_lo: float, z_hi: float, step: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """The mid-sagittal soft-tissue profile: per height z, the most anterior (smallest y) non-air point."""
    zs = np.arange(z_lo, z_hi, step)
    ys = np.arange(-160.0, -20.0, step)
    Y, Z = np.meshgrid(ys, zs, indexing="ij")
    tissue = case.labels_head(np.stack([np.zeros_like(Y), Y, Z], -1)) != MATERIAL_IDS["air"]
    first = np.argmax(tissue, 0)
    return np.where(tissue.any(0), ys[first], np.nan), zs


def _most_anterior(case, z_lo, z_hi) -> np.ndarray:
    y, zs = _profile(case, z_lo, z_hi)
    k = int(np.nanargmin(y))
    ties = np.flatnonzero(np.abs(y - y[k]) < 1e-6)
    return np.array([0.0, y[k], float(zs[ties].mean())])


def _centre(shape: Shape) -> np.ndarray:
    """Head-frame point where the shape's local coordinates are 0."""
    return np.linalg.solve(shape.M[:, :3], -shape.M[:, 3])


def _incisal_tip(case: PhantomCase, which: str) -> np.ndarray:
    """Midpoint of the incisal edges of the two central incisor crowns (lowest upper / highest lower point)."""
    crowns = [s for s in case.shapes if s.name == f"{which} crown"]
    down = np.array([0.0, 0.0, -1.0 if which == "upper" else 1.0])
    # The central incisors are the two crowns nearest the midline and furthest forward.
    centres = [(s, _centre(s)) for s in crowns]
    centres.sort(key=lambda sc: abs(sc[1][0]) + 0.2 * sc[1][1])
    tips = [s.support(down) for s, _ in centres[:2]]
    return np.mean(tips, axis=0)


def ceph_case(seed: int) -> PhantomCase:
    """The CT phantom of this seed made ready for a cephalogram: no CT headrest, central incisors present,
    lips and a soft-tissue chin; ``case.head_landmarks`` gains the soft-tissue and incisor points."""
    case = make_case(seed, headrest=False)
    missing = [t for t in case.params["missing_teeth"] if t not in _CENTRAL_INCISORS]
    if len(missing) != len(case.params["missing_teeth"]):
        case = make_case(seed, headrest=False, missing_teeth=missing)
    rng = np.random.default_rng(np.random.SeedSequence([0xCE9, int(seed)]))
    L = case.head_landmarks
    uit, lit = _incisal_tip(case, "upper"), _incisal_tip(case, "lower")
    fwd = lambda p: -float(p[1])  # noqa: E731  forward = -y in the head frame
    # The lower-face skin line: a plane ahead of the teeth and chin, carved with air, then lips and chin on it.
    top_z = float(L["ANS"][2]) + 10.0  # beside the nose; the nose itself is painted again afterwards
    f_top = max(fwd(L["A point"]) + rng.uniform(12.0, 16.0), fwd(uit) + 2.8 + rng.uniform(8.0, 11.0))
    f_chin = fwd(L["Pogonion"]) + rng.uniform(7.0, 10.0)
    z_chin = float(L["Pogonion"][2])
    slope = (f_top - f_chin) / (top_z - z_chin)  # d(forward)/dz along the skin line
    plane_f = lambda z: f_chin + slope * (z - z_chin)  # noqa: E731
    bottom_z = float(L["Menton"][2]) - 25.0
    mid_z = (top_z + bottom_z) / 2
    # Going down the line, "forward" shrinks by ``slope`` per mm, so y (= -forward) grows.
    axis_down = np.array([0.0, slope, -1.0]) / math.hypot(slope, 1.0)
    axis_fwd = np.array([0.0, -1.0, -slope]) / math.hypot(slope, 1.0)  # perpendicular to it, forward
    R = np.stack([axis_fwd, axis_down, np.array([1.0, 0.0, 0.0])], 1)
    half = (top_z - bottom_z) / 2 * math.hypot(slope, 1.0)
    centre = np.array([0.0, -plane_f(mid_z), mid_z])
    shapes = [_ellipsoid("lower face air", "air", centre, (70.0, half, 90.0), R=R, clip=(0, 0.0))]
    p = {"lip_upper_mm": float(rng.uniform(3.5, 7.0)), "lip_lower_mm": float(rng.uniform(3.0, 7.0)),
         "chin_soft_mm": float(rng.uniform(1.5, 4.0)), "stomion_dz_mm": float(rng.uniform(-1.0, 2.0))}
    for name, z, out, zr in (("upper lip", float(uit[2]) + 7.5 + p["stomion_dz_mm"], p["lip_upper_mm"], 8.5),
                             ("lower lip", float(uit[2]) - 7.0 + p["stomion_dz_mm"], p["lip_lower_mm"], 8.0)):
        shapes.append(_ellipsoid(name, "skin", (0.0, -(plane_f(z) + out - 6.0), z), (24.0, 6.0, zr)))
    zc = z_chin - 4.0
    shapes.append(_ellipsoid("soft chin", "skin", (0.0, -(plane_f(zc) + p["chin_soft_mm"] - 10.0), zc),
                             (26.0, 10.0, 16.0)))
    # Paint the nose and the jaw again over the new soft tissue (painter's order: later solids win).
    names = [s.name for s in case.shapes]
    first = names.index("symphysis")
    last = max(i for i, n in enumerate(names) if n.startswith("lower "))
    nose = [s for s in case.shapes if s.name in ("nose", "nostrils")]
    case.shapes.extend(shapes + nose + case.shapes[first:last + 1])
    case.params["ceph_soft_tissue"] = p
    # Soft-tissue landmarks on the finished profile (mid-sagittal plane).
    ls = _most_anterior(case, float(uit[2]) + 2.0, float(uit[2]) + 16.0)
    li = _most_anterior(case, float(uit[2]) - 16.0, float(uit[2]) - 1.0)
    pog_s = _most_anterior(case, z_chin - 12.0, z_chin + 8.0)
    pn = _most_anterior(case, float(L["ANS"][2]), float(L["Nasion"][2]) - 10.0)
    y, zs = _profile(case, float(ls[2]), float(pn[2]))
    # Subnasale: the deepest point of the profile behind the line from pronasale to the upper lip.
    d = np.array([pn[1] - ls[1], pn[2] - ls[2]])
    n = np.array([d[1], -d[0]]) / np.linalg.norm(d)
    if n[0] < 0:  # point posterior (+y)
        n = -n
    depth = (y - ls[1]) * n[0] + (zs - ls[2]) * n[1]
    k = int(np.nanargmax(depth))
    sn = np.array([0.0, y[k], zs[k]])
    extra = {"Upper incisal incision": uit, "Lower incisal incision": lit, "Upper lip": ls, "Lower lip": li,
             "Soft tissue pogonion": pog_s, "Subnasale": sn, "Pronasale": pn}
    case.head_landmarks = {**case.head_landmarks, **extra}
    return case


def _articulare(case: PhantomCase, to_ceph: np.ndarray, geom: CephGeometry) -> tuple[np.ndarray, list[np.ndarray]]:
    """Articulare on the mid-sagittal projection (y, z): where the posterior border of each side's condyle and
    ramus crosses the inferior contour of the cranial base (sphenoid and clivus); the mean of the two sides."""
    to_head = np.linalg.inv(to_ceph)
    base = [s for s in case.shapes if s.name in ("sphenoid", "clivus")]
    sides = []
    for sign in (-1.0, 1.0):
        condyle = [s for s in case.shapes if s.name in ("condyle", "ramus") and np.sign(_centre(s)[0]) == sign]
        cx = float(np.mean([_centre(s)[0] for s in condyle]))
        ys = np.arange(-30.0, 25.0, 0.1)
        zs = np.arange(-60.0, -5.0, 0.1)
        Y, Z = np.meshgrid(ys, zs, indexing="ij")
        # Sample in the ceph frame at the condyle's depth, so "posterior" is the ceph frame's +y.
        ceph_pts = np.stack([np.full_like(Y, cx), Y, Z], -1)
        head_pts = ceph_pts @ to_head[:3, :3].T + to_head[:3, 3]
        inside = np.zeros(Y.shape, bool)
        for s in condyle:
            loc = head_pts @ s.M[:, :3].T + s.M[:, 3]
            inside |= s.inside(loc[..., 0], loc[..., 1], loc[..., 2])
        rows = inside.any(0)
        border = np.stack([np.full(rows.sum(), cx), ys[len(ys) - 1 - np.argmax(inside[::-1], 0)][rows], zs[rows]], 1)
        proj = geom.to_midplane(border)  # (y, z) on the mid-sagittal plane, ordered by z upward
        # The cranial base's lower contour, projected, as a function of y.
        bY, bZ = np.meshgrid(np.arange(-30.0, 40.0, 0.2), np.arange(-50.0, 5.0, 0.2), indexing="ij")
        bpts = np.stack([np.zeros_like(bY), bY, bZ], -1) @ to_head[:3, :3].T + to_head[:3, 3]
        binside = np.zeros(bY.shape, bool)
        for s in base:
            loc = bpts @ s.M[:, :3].T + s.M[:, 3]
            binside |= s.inside(loc[..., 0], loc[..., 1], loc[..., 2])
        has = binside.any(1)
        low = geom.to_midplane(np.stack([np.zeros(has.sum()), bY[has, 0], bZ[0][np.argmax(binside[has], 1)]], 1))
        order = np.argsort(low[:, 0])
        low = low[order]
        hit = None
        for (y0, z0), (y1, z1) in zip(proj[:-1], proj[1:]):
            if y1 < low[0, 0] or y1 > low[-1, 0]:
                continue
            if z1 >= np.interp(y1, low[:, 0], low[:, 1]):
                a0 = z0 - np.interp(y0, low[:, 0], low[:, 1])
                a1 = z1 - np.interp(y1, low[:, 0], low[:, 1])
                t = float(np.clip(-a0 / (a1 - a0), 0, 1)) if a1 != a0 else 0.0
                hit = np.array([y0 + t * (y1 - y0), z0 + t * (z1 - z0)])
                break
        sides.append(hit if hit is not None else proj[-1])  # no crossing: the top of the posterior border
    return np.mean(sides, axis=0), sides


# --------------------------------------------------------------------------------------------- projection
def draw_params(seed: int) -> dict:
    """The random acquisition and display parameters of one cephalogram."""
    rng = np.random.default_rng(np.random.SeedSequence([0xCE7, int(seed)]))
    sod = float(rng.uniform(1450.0, 1550.0))
    return {
        "sod_mm": sod,
        "sid_mm": sod + float(rng.uniform(130.0, 170.0)),
        "pose_deg": [float(rng.uniform(-4.0, 4.0)), float(rng.uniform(-1.5, 1.5)), float(rng.uniform(-1.5, 1.5))],
        "imager_pixel_spacing_mm": float(round(rng.uniform(0.12, 0.16), 4)),
        "fov_mm": [float(rng.uniform(205.0, 235.0)), float(rng.uniform(185.0, 205.0))],  # height, width (midplane)
        "fov_margin_mm": [float(rng.uniform(0.0, 10.0)), float(rng.uniform(0.0, 8.0))],  # below, in front
        "collimation_mm": [float(v) for v in rng.uniform(0.0, 14.0, 4)],  # top, bottom, back, front
        "photons": float(rng.uniform(400.0, 4000.0)),  # per 0.1 mm pixel, unattenuated
        "scatter_fraction": float(rng.uniform(0.1, 0.45)),
        "scatter_sigma_mm": float(rng.uniform(15.0, 40.0)),
        "detector_blur_mm": float(rng.uniform(0.06, 0.2)),
        "soft_tissue_filter": float(rng.uniform(0.3, 1.1)),  # extra attenuation (mu * mm) over the profile
        "ear_rod_radius_mm": float(rng.uniform(3.0, 4.5)),
        "ear_rod_ring": bool(rng.random() < 0.7),
        "nasal_positioner": bool(rng.random() < 0.8),
        "window_percentiles": [float(rng.uniform(0.5, 8.0)), float(rng.uniform(97.0, 99.9))],
        "gamma": float(rng.uniform(0.6, 1.6)),
        "unsharp_amount": float(rng.uniform(0.0, 1.2)),
        "unsharp_sigma_mm": float(rng.uniform(1.0, 6.0)),
        "bits_stored": int(rng.choice([12, 14, 16])),
        "slab_mm": 1.0,
        "grid_mm": 0.3,
    }


def render_ceph(seed: int, *, imager_pixel_spacing: float | None = None, **overrides) -> CephImage:
    """Render the cephalogram of ``seed`` (same seed, same image). ``overrides`` fix any drawn parameter."""
    from scipy.ndimage import gaussian_filter, map_coordinates

    p = draw_params(seed)
    unknown = set(overrides) - set(p)
    if unknown:
        raise TypeError(f"render_ceph: unknown parameter(s) {sorted(unknown)}")
    p.update(overrides)
    if imager_pixel_spacing is not None:
        if not imager_pixel_spacing > 0:
            raise ValueError(f"imager pixel spacing must be positive, not {imager_pixel_spacing}")
        p["imager_pixel_spacing_mm"] = float(imager_pixel_spacing)
    rng = np.random.default_rng(np.random.SeedSequence([0xCE8, int(seed)]))
    case = ceph_case(seed)
    H = case.head_landmarks
    # Ceph frame: the head turned a little in the cephalostat (pitch, roll, yaw about sella).
    pitch, roll, yaw = p["pose_deg"]
    Rp = axis_rotation("x", pitch) @ axis_rotation("y", roll) @ axis_rotation("z", yaw)
    to_ceph = np.eye(4)
    to_ceph[:3, :3] = Rp
    ceph = lambda q: np.asarray(q, float) @ Rp.T  # noqa: E731  head -> ceph (rotation about the origin)
    po = (ceph(H["Porion R"]) + ceph(H["Porion L"])) / 2
    geom = CephGeometry(p["sod_mm"], p["sid_mm"], (float(po[1]), float(po[2])))
    # Field of view on the mid-sagittal plane: columns run anterior (-y), rows inferior (-z); face looks right.
    fov_h, fov_w = p["fov_mm"]
    ps = p["imager_pixel_spacing_mm"] / geom.magnification
    rows, cols = int(round(fov_h / ps)), int(round(fov_w / ps))
    # The exposed field keeps the chin (with the soft tissue below menton) and the nose tip inside.
    t_mm, b_mm, back_mm, front_mm = p["collimation_mm"]
    bottom = float(geom.to_midplane(ceph(H["Menton"]))[1]) - 18.0 - b_mm - p["fov_margin_mm"][0]
    z0 = bottom + fov_h  # top edge
    front = float(geom.to_midplane(ceph(H["Pronasale"]))[0]) - 10.0 - front_mm - p["fov_margin_mm"][1]
    y0 = front + fov_w  # posterior edge (largest y)
    g = p["grid_mm"]
    gr, gc = int(math.ceil(fov_h / g)), int(math.ceil(fov_w / g))
    # Line integral slab by slab through the head (|x| <= 95 mm covers skull and ears).
    mu = np.maximum(MU_WATER * (1.0 + case.hu.astype(np.float64) / 1000.0), 0.0).astype(np.float32)
    mu[MATERIAL_IDS["air"]] = 0.0
    line = np.zeros((gr, gc), np.float32)
    dx = p["slab_mm"]
    offset = float(rng.uniform(0.0, dx))
    cy, cz = geom.centre
    head_to_lps = case.head_to_lps
    to_head = np.linalg.inv(to_ceph)
    for x in np.arange(-95.0 + offset, 95.0, dx):
        f = (geom.sod + x) / geom.sod  # midplane -> this slab, about the central ray
        A = np.zeros((4, 4))
        A[:3, 0] = (dx, 0.0, 0.0)
        A[:3, 1] = (0.0, 0.0, -g * f)
        A[:3, 2] = (0.0, -g * f, 0.0)
        A[:3, 3] = (x, cy + (y0 - 0.5 * g - cy) * f, cz + (z0 - 0.5 * g - cz) * f)
        A[3, 3] = 1.0
        labels = case.render_labels(head_to_lps @ to_head @ A, (1, gr, gc))[0]
        line += mu[labels]
    line *= dx
    # Rays are slanted: the path through a slab is longer by 1/cos.
    yy = y0 - (np.arange(gc) + 0.5) * g
    zz = z0 - (np.arange(gr) + 0.5) * g
    slant = np.sqrt(1.0 + ((yy[None, :] - cy) ** 2 + (zz[:, None] - cz) ** 2) / geom.sod ** 2)
    line *= slant.astype(np.float32)
    line += _devices(case, geom, H, ceph, p, y0, z0, g, gr, gc)
    # Soft-tissue filter: a wedge over the facial profile, in front of a line just behind the A point.
    y_edge = float(geom.to_midplane(ceph(H["A point"]))[0]) + 8.0
    col_edge = (y0 - y_edge) / g
    ramp = np.clip((np.arange(gc) - col_edge) / (5.0 / g), 0.0, 1.0)
    filt = (p["soft_tissue_filter"] * ramp)[None, :].astype(np.float32)
    # To the output grid (cubic), then photons, scatter, collimation, blur, noise.
    scale_r, scale_c = gr / rows, gc / cols
    rr = (np.arange(rows) + 0.5) * scale_r - 0.5
    cc = (np.arange(cols) + 0.5) * scale_c - 0.5
    R_, C_ = np.meshgrid(rr, cc, indexing="ij")
    total = map_coordinates(line + filt, [R_, C_], order=3, mode="nearest").astype(np.float32)
    n0 = p["photons"] * (ps / 0.1) ** 2
    primary = n0 * np.exp(-total)
    scatter = p["scatter_fraction"] * gaussian_filter(primary, p["scatter_sigma_mm"] / ps, mode="nearest")
    signal = primary + scatter
    t, b, back, fr = (int(round(v / ps)) for v in p["collimation_mm"])
    mask = np.zeros((rows, cols), bool)
    mask[t:rows - b, back:cols - fr] = True
    signal = np.where(mask, signal, 0.002 * n0)
    signal = gaussian_filter(signal, p["detector_blur_mm"] / ps)
    signal = rng.poisson(np.maximum(signal, 0.0)).astype(np.float32) + 0.5
    # Display processing as a vendor does: log, window, gamma, unsharp masking.
    v = -np.log(signal / n0)
    inside = v[mask]
    lo, hi = np.percentile(inside, p["window_percentiles"])
    v = np.clip((v - lo) / (hi - lo), 0.0, 1.0) ** p["gamma"]
    v = v + p["unsharp_amount"] * (v - gaussian_filter(v, p["unsharp_sigma_mm"] / ps))
    top_value = (1 << p["bits_stored"]) - 1
    pixels = np.round(np.clip(v, 0.0, 1.0) * top_value).astype(np.uint16)
    # Landmarks: projected like the anatomy; bilateral ones as the midpoint of the two projections.
    to_px = lambda yz: ((y0 - yz[0]) / ps, (z0 - yz[1]) / ps)  # noqa: E731  midplane (y, z) -> (column, row)
    points: dict[str, tuple[float, float]] = {}
    for name in NAMES:
        if name in _BILATERAL:
            yz = np.mean([geom.to_midplane(ceph(H[s])) for s in _BILATERAL[name]], axis=0)
        elif name == "Articulare":
            yz = _articulare(case, to_ceph, geom)[0]
        else:
            yz = geom.to_midplane(ceph(H[_FROM_CT.get(name, name)]))
        points[name] = tuple(float(v) for v in to_px(yz))  # type: ignore[assignment]
    p["seed"] = int(seed)
    p["case_params"] = {k: v for k, v in case.params.items()}
    return CephImage(pixels, p["bits_stored"], p["imager_pixel_spacing_mm"], geom, points, p, int(seed))


def _devices(case, geom, H, ceph, p, y0, z0, g, gr, gc) -> np.ndarray:
    """Line integrals of the cephalostat's parts: ear rods (plastic, with a metal ring at the tip) and their
    vertical holders, and the nasal positioner resting on soft-tissue nasion."""
    out = np.zeros((gr, gc), np.float32)
    yy = y0 - (np.arange(gc) + 0.5) * g
    zz = z0 - (np.arange(gr) + 0.5) * g
    Y, Z = np.meshgrid(yy, zz)
    plastic, metal = MU_WATER * 1.2, 0.6
    r = p["ear_rod_radius_mm"]
    for name in ("Porion R", "Porion L"):
        po = ceph(H[name])
        x_tip = float(po[0])
        sign = np.sign(x_tip)
        # The rod runs from the ear canal outward 60 mm; project at its middle depth.
        x_mid = x_tip + sign * 30.0
        cy, cz = geom.to_midplane(np.array([x_mid, po[1], po[2] - r]))
        scale = geom.sod / (geom.sod + x_mid)
        rad = r * scale
        d2 = (Y - cy) ** 2 + (Z - cz) ** 2
        out += np.where(d2 <= rad ** 2, plastic * 60.0, 0.0).astype(np.float32)
        if p["ear_rod_ring"]:
            ring = (d2 <= (0.8 * rad) ** 2) & (d2 >= (0.55 * rad) ** 2)
            out += np.where(ring, metal * 1.0, 0.0).astype(np.float32)
        # Vertical holder: a plastic bar 12 mm wide, 8 mm thick, from the rod to the top of the image.
        hx = x_tip + sign * 55.0
        hy, hz = geom.to_midplane(np.array([hx, po[1], po[2]]))
        hs = geom.sod / (geom.sod + hx)
        bar = (np.abs(Y - hy) <= 6.0 * hs) & (Z >= hz)
        out += np.where(bar, plastic * 8.0, 0.0).astype(np.float32)
    if p["nasal_positioner"]:
        n_soft = _soft_nasion(case)
        ny, nz = geom.to_midplane(ceph(n_soft))
        bar = (Y <= ny) & (Y >= ny - 6.0) & (Z >= nz)
        out += np.where(bar, plastic * 10.0, 0.0).astype(np.float32)
        marker = (Y - (ny - 3.0)) ** 2 + (Z - (nz + 15.0)) ** 2 <= 1.2 ** 2
        out += np.where(marker, metal * 2.0, 0.0).astype(np.float32)
    return out


def _soft_nasion(case: PhantomCase) -> np.ndarray:
    n = case.head_landmarks["Nasion"]
    y, zs = _profile(case, float(n[2]) - 6.0, float(n[2]) + 6.0)
    k = int(np.nanargmax(y))  # the deepest (most posterior) point of the profile at the nasion
    return np.array([0.0, y[k], zs[k]])


# --------------------------------------------------------------------------------------------- writing
def _uid(seed: int, *parts) -> str:
    return generate_uid(entropy_srcs=[_UID_ROOT, str(int(seed)), *[str(x) for x in parts]])


def write_ceph(image: CephImage, out_dir: str | Path, *, facing: str = "right") -> Path:
    """Write ``image`` as DX For Presentation (``image.dcm``) and its 2D ``landmarks.json`` into ``out_dir``.

    ``facing="left"`` mirrors the image (and the landmark columns: x -> width - x) as a cephalostat with the
    patient's right side to the detector would show it.
    """
    from pacs_landmarks.dicom.write import save
    from pacs_landmarks.dicom.xray_write import XRayInfo, xray_dataset
    from pacs_landmarks.sr_templates.measurements import compute_measurements_2d

    if facing not in ("right", "left"):
        raise ValueError(f"facing must be right or left, not {facing!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed = image.seed
    pixels = image.pixels if facing == "right" else np.ascontiguousarray(image.pixels[:, ::-1])
    width = pixels.shape[1]
    points = {k: ((width - c) if facing == "left" else c, r) for k, (c, r) in image.landmarks_px.items()}
    variant = f"{image.imager_pixel_spacing:.4f}/{facing}"
    geom = image.geometry
    info = XRayInfo(
        patient_name=f"PHANTOM^CEPH{seed:04d}", patient_id=f"PHC{seed:06d}",
        study_instance_uid=_uid(seed, "study"), series_instance_uid=_uid(seed, "series", variant),
        sop_instance_uid=_uid(seed, "sop", variant),
        study_date=f"2024{1 + seed % 12:02d}{1 + seed % 28:02d}", study_id=str(seed % 100000),
        accession_number=f"PHC{seed:08d}"[:16], series_description="Phantom lateral cephalogram",
    )
    ds = xray_dataset(
        pixels, info, kind="DX", bits_stored=image.bits_stored, imager_pixel_spacing=(image.imager_pixel_spacing,) * 2,
        magnification=round(geom.magnification, 5), source_detector_mm=round(geom.sid, 2),
        source_patient_mm=round(geom.sod, 2), facing=facing, positioner="CEPHALOSTAT",
        view_position="LL" if facing == "right" else "RL", body_part="SKULL",
    )
    path = save(ds, out / "image.dcm")
    ps = round(image.imager_pixel_spacing / round(geom.magnification, 5), 6)
    measured = compute_measurements_2d(points, LANDMARK_SET, (ps, ps))
    doc = {
        "landmark_set": LANDMARK_SET,
        "sop_instance_uid": info.sop_instance_uid,
        "study_instance_uid": info.study_instance_uid,
        "series_instance_uid": info.series_instance_uid,
        "pixel_spacing_mm": [ps, ps],
        "pixel_spacing_source": "Imager Pixel Spacing / Estimated Radiographic Magnification Factor",
        "rows": int(pixels.shape[0]),
        "columns": int(width),
        "facing": facing,
        "landmarks": [{"name": k, "position_px": [round(points[k][0], 4), round(points[k][1], 4)]} for k in NAMES],
        "measurements": {m.name: round(m.value, 3) for m in measured},
        "seed": seed,
        "geometry": {"sod_mm": geom.sod, "sid_mm": geom.sid, "magnification": geom.magnification,
                     "central_ray_yz_mm": list(geom.centre)},
        "params": {k: v for k, v in image.params.items() if k != "case_params"},
    }
    (out / "landmarks.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------- CLI
def register(sub: argparse._SubParsersAction) -> None:
    """Add ``--ceph`` (and ``--facing``) to the ``phantom`` command that inference/phantom.py registers."""
    p = sub.choices["phantom"]
    p.add_argument("--ceph", action="store_true",
                   help="write synthetic lateral cephalograms (DX, ceph19 landmarks) instead of CT series; "
                        "--pixel-spacing is then the detector's Imager Pixel Spacing (default: drawn, 0.12-0.16)")
    p.add_argument("--facing", choices=("right", "left"), default="right",
                   help="with --ceph: which way the face looks (default right)")
    ct_command = p.get_default("func")
    p.set_defaults(func=lambda args: _cmd_ceph(args) if args.ceph else ct_command(args))


def _cmd_ceph(args: argparse.Namespace) -> int:
    if args.count < 1:
        raise CommandError("--count must be at least 1")
    ct_only = [name for name, given in (("--slice-thickness", args.slice_thickness is not None),
                                        ("--tilt", args.tilt != 0.0), ("--order", args.order != "ascending"),
                                        ("--size", args.size != 512)) if given]
    if ct_only:
        raise CommandError(f"{', '.join(ct_only)}: for CT phantoms only, not with --ceph")
    if args.pixel_spacing is not None and not 0.02 <= args.pixel_spacing <= 1.0:
        raise CommandError("--pixel-spacing (the detector's, with --ceph) must be 0.02-1.0 mm")
    args.out.mkdir(parents=True, exist_ok=True)
    for k in range(args.count):
        image = render_ceph(args.seed + k, imager_pixel_spacing=args.pixel_spacing)
        write_ceph(image, args.out / f"ceph-{k + 1:04d}", facing=args.facing)
    print(f"wrote {args.count} cephalogram(s) to {args.out}")
    return 0
