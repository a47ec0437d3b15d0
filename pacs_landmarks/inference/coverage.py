"""Scan ranges that clinics use: which part of the head a series covers (phantoms and training cuts).

A region is an axial slab ``z_lo <= z <= z_hi`` (patient LPS z, superior +; PS3.3 C.7.6.2.1.1), optionally
intersected with a vertical cylinder (dental cone-beam CT's field of view is a cylinder, not a box).  Regions
are drawn from the true landmarks of a case, so "routine head" really starts at the foramen magnum whatever
the pose.  The phantom generator writes series cut to a region (``pacs-landmarks phantom --coverage``);
training cuts its inputs to random regions and learns, per landmark, whether it lies inside the scan.

The landmark set enters only through names (``Basion``, ``Menton``, ...): a 2D cephalogram cascade has no
use for scan ranges, so there is nothing dimension-specific here beyond the slab and cylinder.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

KINDS = ("full", "routine", "sinus", "facial", "mandible", "cbct-small", "cbct-medium", "random")
# How often training sees each range (full heads stay the most common input).
TRAIN_WEIGHTS = {"full": 0.36, "routine": 0.16, "sinus": 0.08, "facial": 0.08, "mandible": 0.08,
                 "cbct-small": 0.05, "cbct-medium": 0.07, "random": 0.12}


@dataclass(frozen=True)
class Region:
    kind: str
    z_lo: float = -math.inf
    z_hi: float = math.inf
    cylinder: tuple[float, float, float] | None = None  # (x, y, radius) LPS mm

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Boolean per LPS point (..., 3)."""
        p = np.asarray(points, float)
        ok = (p[..., 2] >= self.z_lo) & (p[..., 2] <= self.z_hi)
        if self.cylinder is not None:
            cx, cy, r = self.cylinder
            ok &= (p[..., 0] - cx) ** 2 + (p[..., 1] - cy) ** 2 <= r * r
        return ok

    def edge_distance(self, points: np.ndarray) -> np.ndarray:
        """Distance (mm) of each point from the region's boundary (>= 0 inside and outside)."""
        p = np.asarray(points, float)
        d = np.minimum(np.abs(p[..., 2] - self.z_lo), np.abs(p[..., 2] - self.z_hi))
        if self.cylinder is not None:
            cx, cy, r = self.cylinder
            d = np.minimum(d, np.abs(np.hypot(p[..., 0] - cx, p[..., 1] - cy) - r))
        return d

    def to_json(self) -> dict:
        return {"kind": self.kind, "z_lo": _finite(self.z_lo), "z_hi": _finite(self.z_hi),
                "cylinder": list(self.cylinder) if self.cylinder else None}


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def draw_region(kind: str, landmarks: dict[str, np.ndarray], rng: np.random.Generator) -> Region:
    """A scan range of ``kind`` for a head whose true landmarks (LPS mm, by name) are given."""
    z = {n: float(np.asarray(q)[2]) for n, q in landmarks.items()}
    u = rng.uniform
    if kind == "full":
        return Region("full")
    if kind == "routine":  # foramen magnum to vertex
        return Region(kind, z_lo=z["Basion"] - u(-6.0, 12.0))
    if kind == "sinus":  # below the maxillary alveolus to above the frontal sinus
        return Region(kind, z_lo=min(z["ANS"], z["PNS"]) - u(12.0, 28.0), z_hi=z["Nasion"] + u(12.0, 35.0))
    if kind == "facial":  # chin to above the orbits
        return Region(kind, z_lo=z["Menton"] - u(4.0, 15.0), z_hi=z["Nasion"] + u(10.0, 30.0))
    if kind == "mandible":  # chin to the condyles
        return Region(kind, z_lo=z["Menton"] - u(4.0, 15.0), z_hi=min(z["Porion R"], z["Porion L"]) - u(2.0, 14.0))
    if kind in ("cbct-small", "cbct-medium"):
        small = kind == "cbct-small"
        radius, height = (u(25.0, 40.0), u(40.0, 80.0)) if small else (u(50.0, 80.0), u(60.0, 100.0))
        front = np.mean([np.asarray(landmarks[n], float) for n in ("A point", "B point")], axis=0)
        back = np.mean([np.asarray(landmarks[n], float) for n in ("Gonion R", "Gonion L")], axis=0)
        centre = front + (back - front) * u(0.1, 0.5) + rng.normal(0.0, 6.0 if small else 10.0, 3)
        if small and rng.random() < 0.5:  # a small volume often sits on one side (one quadrant, one joint)
            side = np.asarray(landmarks["Gonion R" if rng.random() < 0.5 else "Gonion L"], float)
            centre = centre + (side - centre) * u(0.3, 0.8)
        return Region(kind, z_lo=centre[2] - height / 2, z_hi=centre[2] + height / 2,
                      cylinder=(float(centre[0]), float(centre[1]), float(radius)))
    if kind == "random":  # arbitrary cuts at both ends (or one)
        zs = np.array(list(z.values()))
        lo, hi, mid = zs.min() - 20.0, zs.max() + 20.0, float(np.median(zs))
        z_lo = u(lo, mid) if rng.random() < 0.8 else -math.inf
        z_hi = u(mid, hi) if rng.random() < 0.8 else math.inf
        return Region(kind, z_lo=z_lo, z_hi=z_hi)
    raise ValueError(f"unknown coverage {kind!r}; one of {', '.join(KINDS)}")


def training_weights(changes: dict[str, float] | None = None) -> dict[str, float]:
    """``TRAIN_WEIGHTS`` with ``changes`` (scan range -> weight; weights are relative, 0 leaves a range out)."""
    weights = dict(TRAIN_WEIGHTS)
    for kind, w in (changes or {}).items():
        if kind not in weights:
            raise ValueError(f"unknown scan range {kind!r}; one of {', '.join(TRAIN_WEIGHTS)}")
        if not w >= 0:
            raise ValueError(f"scan range {kind}: weight {w!r} must be >= 0")
        weights[kind] = float(w)
    if sum(weights.values()) <= 0:
        raise ValueError("the scan-range weights add up to 0")
    return weights


def draw_training_kind(rng: np.random.Generator, weights: dict[str, float] | None = None) -> str:
    weights = weights or TRAIN_WEIGHTS
    kinds = list(weights)
    w = np.array([weights[k] for k in kinds])
    return kinds[int(rng.choice(len(kinds), p=w / w.sum()))]
