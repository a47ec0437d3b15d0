"""The small fully convolutional networks of the cascade, 2D or 3D (``dim``: the same code, ``Conv2d`` or
``Conv3d``, bilinear or trilinear upsampling, GroupNorm either way).

Both networks output one logit map per landmark; the cascade turns each map into a point with a soft-argmax
over the physical (mm) positions of the sampled grid (integral regression), so the output is sub-voxel and
the loss can be a distance in mm.  They are deliberately small (tens to hundreds of thousands of weights) so
that training and inference run on a 2-core CPU.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.nn import functional as F


def _conv(dim: int):
    return nn.Conv3d if dim == 3 else nn.Conv2d


def _mode(dim: int) -> str:
    return "trilinear" if dim == 3 else "bilinear"


def _block(cin: int, cout: int, stride: int = 1, dim: int = 3) -> nn.Sequential:
    # GroupNorm, not BatchNorm: batches are small and mix landmarks, and eval must match training.
    groups = 4 if cout % 4 == 0 else 1
    return nn.Sequential(
        _conv(dim)(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(groups, cout),
        nn.LeakyReLU(0.1, inplace=True),
    )


class GlobalNet(nn.Module):
    """Stage 1: the whole head (e.g. 64^3 at 4 mm, or 128^2 at 2 mm) -> one logit map per landmark at the
    input size.

    Input channels: normalised intensity plus ``dim`` coordinate channels (position in the box, -1..1), which
    tell an otherwise translation-invariant network where it is (left from right, up from down).
    """

    def __init__(self, n_landmarks: int, width: int = 16, in_channels: int | None = None, presence: bool = False,
                 dim: int = 3):
        super().__init__()
        w = width
        self.dim = dim
        in_channels = dim + 1 if in_channels is None else in_channels
        b = partial(_block, dim=dim)
        self.presence = presence
        if presence:
            # Per landmark: is it inside the scanned volume?  From the features where the landmark's own map
            # puts it (air or a cut edge there when it is not) and from the whole box (which part of the head
            # the scan holds).
            self.presence_local = nn.Parameter(torch.zeros(n_landmarks, 2 * w))
            self.presence_global = nn.Linear(4 * w, n_landmarks)
        self.enc1 = nn.Sequential(b(in_channels, w, 2))  # 1/2
        self.enc2 = nn.Sequential(b(w, 2 * w, 2), b(2 * w, 2 * w))  # 1/4
        self.enc3 = nn.Sequential(b(2 * w, 3 * w, 2), b(3 * w, 3 * w), b(3 * w, 3 * w))  # 1/8
        self.enc4 = nn.Sequential(b(3 * w, 4 * w, 2), b(4 * w, 4 * w), b(4 * w, 4 * w))  # 1/16
        self.dec3 = b(7 * w, 3 * w)
        self.dec2 = b(5 * w, 2 * w)
        self.head = _conv(dim)(2 * w, n_landmarks, 1)

    def forward(self, x: torch.Tensor, with_presence: bool = False):
        """Logit maps (N, L, *size); with ``with_presence`` also presence logits (N, L) (None without a
        presence head)."""
        size = x.shape[2:]
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        e4 = self.enc4(e3)
        d3 = self.dec3(torch.cat([F.interpolate(e4, size=e3.shape[2:], mode=_mode(self.dim)), e3], 1))
        d2 = self.dec2(torch.cat([F.interpolate(d3, size=e2.shape[2:], mode=_mode(self.dim)), e2], 1))
        # Logits at 1/4 resolution are upsampled (no convolution at full size: that would cost most of the
        # compute); the soft-argmax on the full grid still gives sub-voxel points.
        coarse = self.head(d2)
        logits = F.interpolate(coarse, size=size, mode=_mode(self.dim))
        if not with_presence:
            return logits
        if not self.presence:
            return logits, None
        n, n_lm = coarse.shape[:2]
        # the map is a fixed pointer here (detached): presence must not pull the points around
        att = torch.softmax(coarse.detach().reshape(n, n_lm, -1).float(), -1)
        feat = torch.einsum("nlp,ncp->nlc", att, d2.reshape(n, d2.shape[1], -1).float())
        pooled = e4.mean(tuple(range(2, e4.dim())))
        return logits, (feat * self.presence_local).sum(-1) + self.presence_global(pooled)


class LocalNet(nn.Module):
    """Stages 2 and 3: a crop around one landmark estimate -> one logit map per landmark.

    One network serves all landmarks: it has a map per landmark and the cascade reads the map of the
    landmark the crop was taken for, so all 16 crops go through in one batch.
    """

    def __init__(self, n_landmarks: int, width: int = 8, in_channels: int = 1, dim: int = 3):
        super().__init__()
        w = width
        self.dim = dim
        b = partial(_block, dim=dim)
        self.enc1 = nn.Sequential(b(in_channels, w), b(w, w))  # 1
        self.enc2 = nn.Sequential(b(w, 2 * w, 2), b(2 * w, 2 * w), b(2 * w, 2 * w))  # 1/2
        self.enc3 = nn.Sequential(b(2 * w, 4 * w, 2), b(4 * w, 4 * w), b(4 * w, 4 * w))  # 1/4
        self.dec2 = nn.Sequential(b(6 * w, 2 * w), b(2 * w, 2 * w))
        self.skip1 = _conv(dim)(w, 2 * w, 2, stride=2)  # full-resolution detail, brought to 1/2
        self.head = _conv(dim)(2 * w, n_landmarks, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d2 = self.dec2(torch.cat([F.interpolate(e3, size=e2.shape[2:], mode=_mode(self.dim)), e2], 1))
        d2 = d2 + self.skip1(e1)
        return F.interpolate(self.head(d2), size=size, mode=_mode(self.dim))


def build_network(kind: str, n_landmarks: int, width: int, presence: bool = False, dim: int = 3) -> nn.Module:
    if kind == "global":
        return GlobalNet(n_landmarks, width, presence=presence, dim=dim)
    if kind == "local":
        return LocalNet(n_landmarks, width, dim=dim)
    raise ValueError(f"unknown network kind {kind!r}")
