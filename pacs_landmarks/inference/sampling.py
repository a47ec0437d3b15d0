"""Physical-space sampling: boxes of points in mm, read from a 2D image or a 3D volume with ``grid_sample``.

Every stage of the cascade sees the patient through a box of points defined in mm (a centre, a rotation, a
spacing and a size), never through the source pixel grid, so pixel spacing, slice thickness, slice order and
gantry tilt (already resampled by the loader) do not matter to the networks.  Nothing here depends on the
dimension ``D``: a CT volume is D = 3 with points in patient LPS mm, its affine mapping array indices
``(k, j, i)`` to LPS (PS3.3 C.7.6.2.1.1); a cephalogram is D = 2 with points ``(x, y)`` in mm on the
face-right image (x = column * column spacing, y = row * row spacing, SCOORD pixel centres at +0.5, PS3.3
C.18.6.1.2), its affine mapping ``(row, column)`` to ``(x, y)``.  Affines are (D+1) x (D+1); the inverse
takes box points back to indices.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

AIR_HU = -1000.0


def box_axes(dim: int) -> torch.Tensor:
    """(D, D), columns = the box axes in patient coordinates.

    Box axes (d, h, w) point along LPS (z, y, x) in 3D and (h, w) along (y, x) in 2D: the same order as the
    array (slices, rows, columns) / (rows, columns), so that crops look like the image they come from.
    """
    return torch.eye(dim).flip(1)


BOX_AXES = box_axes(3)  # columns: d, h, w in LPS


def normalise_hu(hu: torch.Tensor) -> torch.Tensor:
    """HU -> network input: air -1, water 0, dense bone ~ 1.5; metal and enamel clipped."""
    return hu.clamp(-1000.0, 2500.0) / 1000.0


def normalise_xray(x: torch.Tensor) -> torch.Tensor:
    """X-ray grey 0..1 (dense bright) -> network input -1..1 (outside the image: -1, like air)."""
    return x.clamp(0.0, 1.0) * 2.0 - 1.0


# How a model's intensities are read and normalised, by ``metadata["intensity"]["unit"]``:
# (normaliser, value outside the image).
INTENSITY = {"HU": (normalise_hu, AIR_HU), "xray": (normalise_xray, 0.0)}


def intensity(unit: str):
    """(normaliser, outside value) of an intensity unit ("HU" or "xray")."""
    try:
        return INTENSITY[unit]
    except KeyError:
        raise ValueError(f"unknown intensity unit {unit!r} (known: {', '.join(INTENSITY)})") from None


def image_affine(spacing: tuple[float, float]) -> np.ndarray:
    """3x3: array index (row, column) -> (x, y) mm with x = SCOORD column * column spacing, y = SCOORD row *
    row spacing (pixel centres at +0.5, PS3.3 C.18.6.1.2); ``spacing`` is (row, column) mm."""
    sr, sc = spacing
    return np.array([[0.0, sc, 0.5 * sc], [sr, 0.0, 0.5 * sr], [0.0, 0.0, 1.0]])


def box_offsets(size: int, spacing: float, device=None, dim: int = 3) -> torch.Tensor:
    """Offsets (size,) * dim + (dim,) in box coordinates ((d,) h, w) mm from the box centre."""
    r = (torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2.0) * spacing
    return torch.stack(torch.meshgrid(*([r] * dim), indexing="ij"), -1)


def box_points(centres: torch.Tensor, size: int, spacing: float, rotations: torch.Tensor | None = None,
               scales: torch.Tensor | None = None) -> torch.Tensor:
    """Points (N, size, ..., size, D) of N boxes; D is the width of ``centres`` (N, D) mm.

    ``rotations`` (N, D, D) applied about each centre (augmentation); ``scales`` (N,) multiply the spacing
    (augmentation).
    """
    n, dim = centres.shape
    offs = box_offsets(size, spacing, centres.device, dim).reshape(-1, dim)  # (P, D) in box axes
    mats = box_axes(dim).to(centres.device).expand(n, dim, dim)
    if rotations is not None:
        mats = rotations @ mats
    if scales is not None:
        mats = mats * scales.view(n, 1, 1)
    pts = offs @ mats.transpose(1, 2) + centres[:, None, :]
    return pts.reshape(n, *([size] * dim), dim)


def random_rotations(n: int, max_deg: float, generator: torch.Generator, dim: int = 3) -> torch.Tensor:
    """N rotation matrices (N, D, D) by an angle uniform in [-max_deg, max_deg]; in 3D about a random axis."""
    if dim == 2:
        ang = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(max_deg)
        c, s = torch.cos(ang), torch.sin(ang)
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    axis = torch.randn(n, 3, generator=generator)
    axis = axis / axis.norm(dim=1, keepdim=True).clamp_min(1e-6)
    ang = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(max_deg)
    k = torch.zeros(n, 3, 3)
    k[:, 0, 1], k[:, 0, 2], k[:, 1, 2] = -axis[:, 2], axis[:, 1], -axis[:, 0]
    k = k - k.transpose(1, 2)
    eye = torch.eye(3).expand(n, 3, 3)
    s, c = torch.sin(ang).view(n, 1, 1), torch.cos(ang).view(n, 1, 1)
    return eye + s * k + (1 - c) * (k @ k)


def _avg_pool(x: torch.Tensor, k: tuple[int, ...]) -> torch.Tensor:
    return (F.avg_pool3d if len(k) == 3 else F.avg_pool2d)(x, kernel_size=k, stride=k)


@dataclass(frozen=True)
class ScanRegion:
    """Where an image or volume has data, in patient mm: the array's box (``affine``, ``shape``), cut to a
    reconstruction circle (``dicom.volume.ReconstructionCircle``, in array indices) when the volume is round.
    Small enough to keep with a result after the volume is gone."""

    affine: np.ndarray  # (D+1, D+1) array indices -> mm
    shape: tuple[int, ...]
    circle: object | None = None

    def depth_mm(self, points: np.ndarray) -> np.ndarray:
        """How deep (mm) each point (..., D) lies inside the region; negative outside."""
        d = len(self.shape)
        spacing = np.linalg.norm(self.affine[:-1, :-1], axis=0)
        inv = np.linalg.inv(self.affine)
        idx = np.asarray(points, np.float64) @ inv[:d, :d].T + inv[:d, d]
        size = np.asarray(self.shape, np.float64)
        depth = np.minimum((idx + 0.5) * spacing, (size - 0.5 - idx) * spacing).min(-1)
        if self.circle is not None:
            c = self.circle
            off = np.hypot((idx[..., 1] - c.row) * spacing[1], (idx[..., 2] - c.column) * spacing[2])
            depth = np.minimum(depth, c.radius_mm - off)
        return depth

    def chord(self, origins: np.ndarray, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where the lines ``origins + t * directions`` (t in mm along unit directions; (..., D) each,
        broadcast) run inside the region: (t_in, t_out), the open interval of t where ``depth_mm`` > 0, empty
        when t_in >= t_out.  For many points on few lines (the symmetry search) far cheaper than their depths.
        """
        d = len(self.shape)
        inv = np.linalg.inv(self.affine)
        o = np.asarray(origins, np.float64) @ inv[:d, :d].T + inv[:d, d]  # array indices
        v = np.asarray(directions, np.float64) @ inv[:d, :d].T  # indices per mm
        o, v = np.broadcast_arrays(o, v)
        lo, hi = -0.5 - o, np.asarray(self.shape, np.float64) - 0.5 - o  # index offsets the box allows
        with np.errstate(divide="ignore", invalid="ignore"):
            t1, t2 = lo / v, hi / v
        still = v == 0  # a line parallel to a face: inside for all t or for none
        inside = (lo < 0) & (hi > 0)
        t_in = np.where(still, np.where(inside, -np.inf, np.inf), np.minimum(t1, t2)).max(-1)
        t_out = np.where(still, np.where(inside, np.inf, -np.inf), np.maximum(t1, t2)).min(-1)
        if self.circle is not None:
            c = self.circle
            spacing = np.linalg.norm(self.affine[:-1, :-1], axis=0)
            # |(o + t v - centre) * spacing|^2 < r^2 over the two in-plane axes: a t^2 + b t + k < 0
            p = (o[..., 1:3] - [c.row, c.column]) * spacing[1:3]
            q = v[..., 1:3] * spacing[1:3]
            a, b, k = (q * q).sum(-1), 2 * (p * q).sum(-1), (p * p).sum(-1) - c.radius_mm ** 2
            disc = b * b - 4 * a * k
            with np.errstate(divide="ignore", invalid="ignore"):
                root = np.sqrt(np.maximum(disc, 0.0))
                r1, r2 = (-b - root) / (2 * a), (-b + root) / (2 * a)
            r1 = np.where(a == 0, np.where(k < 0, -np.inf, np.inf), np.where(disc > 0, r1, np.inf))
            r2 = np.where(a == 0, np.where(k < 0, np.inf, -np.inf), np.where(disc > 0, r2, -np.inf))
            t_in, t_out = np.maximum(t_in, r1), np.minimum(t_out, r2)
        return t_in, t_out


class VolumeSampler:
    """Reads intensities at points (mm) from one image (2D) or volume (3D); keeps box-filtered copies for
    coarse stages.

    Linear sampling of a fine image at a coarse spacing aliases (noise and thin bone flicker), and how much
    depends on the source spacing; averaging blocks of about the target spacing first makes a coarse stage see
    the same kind of image whatever the source's pixel spacing.  ``outside``: the value read outside the
    array (air in HU for CT, 0 = black for an X-ray).
    """

    def __init__(self, array: np.ndarray | torch.Tensor, affine: np.ndarray, device: torch.device | str = "cpu",
                 outside: float = AIR_HU, circle=None):
        vol = torch.as_tensor(array)
        if vol.dtype != torch.float32:
            vol = vol.float()
        self.dim = vol.dim()
        affine = np.asarray(affine, dtype=np.float64)
        if self.dim not in (2, 3) or affine.shape != (self.dim + 1, self.dim + 1):
            raise ValueError(f"a {self.dim}D array needs a {self.dim + 1}x{self.dim + 1} affine, "
                             f"got {affine.shape}")
        self.device = torch.device(device)
        self.volume = vol.to(self.device)[None, None]  # (1, 1, (K,) J, I)
        self.affine = affine
        self.outside = float(outside)
        self.spacing = np.linalg.norm(self.affine[:-1, :-1], axis=0)
        # 3D: the reconstruction circle (``dicom.volume.ReconstructionCircle``) when the volume is round, in
        # array indices, so mirrored views share it
        self.circle = circle
        # block-averaged copies by block size, shared with mirrored views (``mirrored``); each view keeps its own
        # inverse affines
        self._pooled: dict[tuple[int, ...], torch.Tensor] = {}
        self._inverse: dict[tuple[int, ...], torch.Tensor] = {}

    def mirrored(self, x_mm: float) -> "VolumeSampler":
        """The same image seen in a mirror: the plane x = ``x_mm`` (3D: LPS x, a sagittal plane, so the
        patient's right and left swap; 2D: image x, a vertical line), a view that reads ``self`` at ``(2 x_mm
        - x, y[, z])``.

        Only the affine changes (a reflection before it); array and block-averaged copies are shared, so a
        view costs no copy.  A box read through the view is the box read from ``self`` at the mirrored points,
        which is what the networks would see if the patient had been scanned mirrored.
        """
        reflect = np.eye(self.dim + 1)
        reflect[0, 0], reflect[0, self.dim] = -1.0, 2.0 * float(x_mm)
        view = object.__new__(VolumeSampler)
        view.__dict__.update(self.__dict__)
        view.affine = reflect @ self.affine
        view._inverse = {}
        return view

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.volume.shape[2:])

    @property
    def region(self) -> ScanRegion:
        """Where this view has data (its own affine: a mirrored view's region is mirrored too)."""
        return ScanRegion(self.affine, self.shape, self.circle)

    def depth_mm(self, points: np.ndarray) -> np.ndarray:
        """How deep (mm) each point (..., D) lies inside the scanned region (``ScanRegion.depth_mm``)."""
        return self.region.depth_mm(points)

    def chord(self, origins: np.ndarray, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where lines run inside the scanned region (``ScanRegion.chord``)."""
        return self.region.chord(origins, directions)

    def _level(self, target_spacing: float) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.dim
        k = tuple(max(1, int(target_spacing / s + 1e-3)) for s in self.spacing)
        k = tuple(min(kk, n) for kk, n in zip(k, self.shape))
        if k not in self._pooled:
            self._pooled[k] = self.volume if k == (1,) * d else _avg_pool(self.volume, k)
        if k not in self._inverse:
            self._inverse[k] = torch.as_tensor(np.linalg.inv(self._level_affine(k)), dtype=torch.float32,
                                               device=self.device)
        return self._pooled[k], self._inverse[k]

    def _level_affine(self, k: tuple[int, ...]) -> np.ndarray:
        """The affine of the copy averaged over blocks of ``k`` voxels."""
        d = self.dim
        # pooled index n covers source indices k*n .. k*n+k-1: its centre is k*n + (k-1)/2
        t = np.eye(d + 1)
        t[:d, :d] = np.diag(k)
        t[:d, d] = [(kk - 1) / 2.0 for kk in k]
        return self.affine @ t

    def sample(self, points: torch.Tensor, target_spacing: float) -> torch.Tensor:
        """Intensities at ``points`` (N, ..., D) -> (N, ...); ``outside`` beyond the array.

        Where the source is finer than ``target_spacing``: coarse targets (>= 3 mm) read a block-averaged
        copy; finer targets average 2^D linear samples +-spacing/4 around each point, which costs far less
        than averaging the whole array and blurs about as much.
        """
        fine = np.any(self.spacing * 2 <= target_spacing + 1e-6)
        if fine and target_spacing < 3.0:
            q = target_spacing / 4.0
            acc = None
            # shifts in (x, y[, z]) order, z slowest: the order the 3D path has always summed in
            for shift in itertools.product((-q, q), repeat=self.dim):
                shift = torch.tensor(shift[::-1], dtype=torch.float32, device=points.device)
                part = self._sample_level(points + shift, self._level(0.0))
                acc = part if acc is None else acc + part
            return acc / float(2 ** self.dim)
        return self._sample_level(points, self._level(target_spacing))

    def _sample_level(self, points: torch.Tensor, level: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        vol, inv = level
        d = self.dim
        box = points.shape[:-1]  # (N, ...)
        pts = points.to(self.device, torch.float32).reshape(-1, d)
        idx = pts @ inv[:d, :d].T + inv[:d, d]  # array indices ((k,) j, i)
        size = torch.tensor(vol.shape[2:], dtype=torch.float32, device=self.device)
        norm = 2.0 * idx / (size - 1).clamp_min(1.0) - 1.0
        # grid_sample wants (x, y[, z]) = (i, j[, k]); all boxes as one batch of rows
        lead = int(np.prod(box[:len(box) - (d - 1)]))
        grid = norm.flip(-1).reshape(1, lead, *box[len(box) - (d - 1):], d)
        out = F.grid_sample(vol, grid, mode="bilinear", padding_mode="border", align_corners=True)
        out = out.reshape(box)
        inside = ((idx >= -0.5) & (idx <= size - 0.5)).all(-1).reshape(box)
        return torch.where(inside, out, torch.full_like(out, self.outside))


def soft_argmax(logits: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integral regression over a box.

    ``logits`` (N, ...), ``points`` (N, ..., D) -> (position (N, D) mm, variance (N, D) mm^2 of the
    probability mass along each axis about the position, probabilities (N, P)).  The spread (RMS distance
    of the mass from the position) is ``variance.sum(-1).sqrt()``.
    """
    n = logits.shape[0]
    prob = torch.softmax(logits.reshape(n, -1).float(), dim=1)
    pts = points.reshape(n, -1, points.shape[-1])
    pos = torch.einsum("np,npc->nc", prob, pts)
    var = torch.einsum("np,npc->nc", prob, (pts - pos[:, None, :]) ** 2)
    return pos, var.clamp_min(0), prob
