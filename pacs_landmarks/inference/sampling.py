"""Physical-space sampling: boxes of points in patient LPS mm, read from a volume with ``grid_sample``.

Every stage of the cascade sees the patient through a box of points defined in mm (a centre, a rotation, a
spacing and a size), never through the source voxel grid, so pixel spacing, slice thickness, slice order and
gantry tilt (already resampled by the loader) do not matter to the networks.  The volume's affine maps array
indices ``(k, j, i)`` to LPS (PS3.3 C.7.6.2.1.1); its inverse takes box points back to indices.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

AIR_HU = -1000.0
# Box axes (d, h, w) point along LPS (z, y, x), the same order as a volume built from axial slices, so
# that crops look like the volume they come from.
BOX_AXES = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]).T  # columns: d, h, w in LPS


def normalise_hu(hu: torch.Tensor) -> torch.Tensor:
    """HU -> network input: air -1, water 0, dense bone ~ 1.5; metal and enamel clipped."""
    return hu.clamp(-1000.0, 2500.0) / 1000.0


def box_offsets(size: int, spacing: float, device=None) -> torch.Tensor:
    """Offsets (size, size, size, 3) in box coordinates (d, h, w) mm from the box centre."""
    r = (torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2.0) * spacing
    d, h, w = torch.meshgrid(r, r, r, indexing="ij")
    return torch.stack([d, h, w], -1)


def box_points(centres: torch.Tensor, size: int, spacing: float, rotations: torch.Tensor | None = None,
               scales: torch.Tensor | None = None) -> torch.Tensor:
    """LPS points (N, size, size, size, 3) of N boxes.

    ``centres`` (N, 3) LPS mm; ``rotations`` (N, 3, 3) applied in LPS about each centre (augmentation);
    ``scales`` (N,) multiply the spacing (augmentation).
    """
    n = centres.shape[0]
    offs = box_offsets(size, spacing, centres.device).reshape(-1, 3)  # (P, 3) in (d, h, w)
    axes = BOX_AXES.to(centres.device)
    mats = axes.expand(n, 3, 3)
    if rotations is not None:
        mats = rotations @ mats
    if scales is not None:
        mats = mats * scales.view(n, 1, 1)
    pts = offs @ mats.transpose(1, 2) + centres[:, None, :]
    return pts.reshape(n, size, size, size, 3)


def random_rotations(n: int, max_deg: float, generator: torch.Generator) -> torch.Tensor:
    """N rotation matrices, each about a random axis by an angle uniform in [-max_deg, max_deg]."""
    axis = torch.randn(n, 3, generator=generator)
    axis = axis / axis.norm(dim=1, keepdim=True).clamp_min(1e-6)
    ang = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(max_deg)
    k = torch.zeros(n, 3, 3)
    k[:, 0, 1], k[:, 0, 2], k[:, 1, 2] = -axis[:, 2], axis[:, 1], -axis[:, 0]
    k = k - k.transpose(1, 2)
    eye = torch.eye(3).expand(n, 3, 3)
    s, c = torch.sin(ang).view(n, 1, 1), torch.cos(ang).view(n, 1, 1)
    return eye + s * k + (1 - c) * (k @ k)


class VolumeSampler:
    """Reads HU at LPS points from one volume; keeps box-filtered copies for coarse stages.

    Trilinear sampling of a fine volume at a coarse spacing aliases (noise and thin bone flicker), and how much
    depends on the source spacing; averaging blocks of about the target spacing first makes a coarse stage see
    the same kind of image whatever the scanner's pixel spacing.
    """

    def __init__(self, array: np.ndarray | torch.Tensor, affine: np.ndarray, device: torch.device | str = "cpu"):
        vol = torch.as_tensor(array)
        if vol.dtype != torch.float32:
            vol = vol.float()
        self.device = torch.device(device)
        self.volume = vol.to(self.device)[None, None]  # (1, 1, K, J, I)
        self.affine = np.asarray(affine, dtype=np.float64)
        self.spacing = np.linalg.norm(self.affine[:3, :3], axis=0)
        self._pooled: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.volume.shape[2:])  # type: ignore[return-value]

    def _level(self, target_spacing: float) -> tuple[torch.Tensor, torch.Tensor]:
        k = tuple(max(1, int(target_spacing / s + 1e-3)) for s in self.spacing)
        k = tuple(min(kk, n) for kk, n in zip(k, self.shape))
        if k not in self._pooled:
            if k == (1, 1, 1):
                vol, aff = self.volume, self.affine
            else:
                vol = F.avg_pool3d(self.volume, kernel_size=k, stride=k)
                # pooled index n covers source indices k*n .. k*n+k-1: its centre is k*n + (k-1)/2
                t = np.eye(4)
                t[:3, :3] = np.diag(k)
                t[:3, 3] = [(kk - 1) / 2.0 for kk in k]
                aff = self.affine @ t
            inv = torch.as_tensor(np.linalg.inv(aff), dtype=torch.float32, device=self.device)
            self._pooled[k] = (vol, inv)
        return self._pooled[k]

    def sample(self, points: torch.Tensor, target_spacing: float) -> torch.Tensor:
        """HU at LPS ``points`` (N, D, H, W, 3) -> (N, D, H, W); air outside the volume.

        Where the source is finer than ``target_spacing``: coarse targets (>= 3 mm) read a block-averaged
        copy of the volume; finer targets average 2x2x2 trilinear samples +-spacing/4 around each point,
        which costs far less than averaging the whole volume and blurs about as much.
        """
        fine = np.any(self.spacing * 2 <= target_spacing + 1e-6)
        if fine and target_spacing < 3.0:
            q = target_spacing / 4.0
            acc = None
            for dz in (-q, q):
                for dy in (-q, q):
                    for dx in (-q, q):
                        shift = torch.tensor([dx, dy, dz], dtype=torch.float32, device=points.device)
                        part = self._sample_level(points + shift, self._level(0.0))
                        acc = part if acc is None else acc + part
            return acc / 8.0
        return self._sample_level(points, self._level(target_spacing))

    def _sample_level(self, points: torch.Tensor, level: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        vol, inv = level
        n, d, h, w, _ = points.shape
        pts = points.to(self.device, torch.float32).reshape(-1, 3)
        idx = pts @ inv[:3, :3].T + inv[:3, 3]  # (k, j, i)
        size = torch.tensor(vol.shape[2:], dtype=torch.float32, device=self.device)
        norm = 2.0 * idx / (size - 1).clamp_min(1.0) - 1.0
        grid = norm.flip(-1).reshape(1, n * d, h, w, 3)  # grid_sample wants (x, y, z) = (i, j, k)
        out = F.grid_sample(vol, grid, mode="bilinear", padding_mode="border", align_corners=True)
        out = out.reshape(n, d, h, w)
        inside = ((idx >= -0.5) & (idx <= size - 0.5)).all(-1).reshape(n, d, h, w)
        return torch.where(inside, out, torch.full_like(out, AIR_HU))


def soft_argmax(logits: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integral regression over a box.

    ``logits`` (N, D, H, W), ``points`` (N, D, H, W, 3) LPS -> (position (N, 3) mm, variance (N, 3) mm^2 of the
    probability mass along x, y, z about the position, probabilities (N, D*H*W)).  The spread (RMS distance
    of the mass from the position) is ``variance.sum(-1).sqrt()``.
    """
    n = logits.shape[0]
    prob = torch.softmax(logits.reshape(n, -1).float(), dim=1)
    pts = points.reshape(n, -1, 3)
    pos = torch.einsum("np,npc->nc", prob, pts)
    var = torch.einsum("np,npc->nc", prob, (pts - pos[:, None, :]) ** 2)
    return pos, var.clamp_min(0), prob
