"""The small 3D fully convolutional networks of the cascade.

Both networks output one logit map per landmark; the cascade turns each map into a point with a soft-argmax
over the physical (LPS) positions of the sampled grid (integral regression), so the output is sub-voxel and
the loss can be a distance in mm.  They are deliberately small (tens to hundreds of thousands of weights) so
that training and inference run on a 2-core CPU.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    # GroupNorm, not BatchNorm: batches are small and mix landmarks, and eval must match training.
    groups = 4 if cout % 4 == 0 else 1
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(groups, cout),
        nn.LeakyReLU(0.1, inplace=True),
    )


class GlobalNet(nn.Module):
    """Stage 1: the whole head (e.g. 64^3 at 4 mm) -> one logit map per landmark at the input size.

    Input channels: normalised intensity plus three coordinate channels (position in the box, -1..1), which
    tell an otherwise translation-invariant network where it is (left from right, up from down).
    """

    def __init__(self, n_landmarks: int, width: int = 16, in_channels: int = 4, presence: bool = False):
        super().__init__()
        w = width
        self.presence = presence
        if presence:
            # Per landmark: is it inside the scanned volume?  From the features where the landmark's own map
            # puts it (air or a cut edge there when it is not) and from the whole box (which part of the head
            # the scan holds).
            self.presence_local = nn.Parameter(torch.zeros(n_landmarks, 2 * w))
            self.presence_global = nn.Linear(4 * w, n_landmarks)
        self.enc1 = nn.Sequential(_block(in_channels, w, 2))  # 1/2
        self.enc2 = nn.Sequential(_block(w, 2 * w, 2), _block(2 * w, 2 * w))  # 1/4
        self.enc3 = nn.Sequential(_block(2 * w, 3 * w, 2), _block(3 * w, 3 * w), _block(3 * w, 3 * w))  # 1/8
        self.enc4 = nn.Sequential(_block(3 * w, 4 * w, 2), _block(4 * w, 4 * w), _block(4 * w, 4 * w))  # 1/16
        self.dec3 = _block(7 * w, 3 * w)
        self.dec2 = _block(5 * w, 2 * w)
        self.head = nn.Conv3d(2 * w, n_landmarks, 1)

    def forward(self, x: torch.Tensor, with_presence: bool = False):
        """Logit maps (N, L, *size); with ``with_presence`` also presence logits (N, L) (None without a
        presence head)."""
        size = x.shape[2:]
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        e4 = self.enc4(e3)
        d3 = self.dec3(torch.cat([F.interpolate(e4, size=e3.shape[2:], mode="trilinear"), e3], 1))
        d2 = self.dec2(torch.cat([F.interpolate(d3, size=e2.shape[2:], mode="trilinear"), e2], 1))
        # Logits at 1/4 resolution are upsampled (no convolution at full size: that would cost most of the
        # compute); the soft-argmax on the full grid still gives sub-voxel points.
        coarse = self.head(d2)
        logits = F.interpolate(coarse, size=size, mode="trilinear")
        if not with_presence:
            return logits
        if not self.presence:
            return logits, None
        n, n_lm = coarse.shape[:2]
        # the map is a fixed pointer here (detached): presence must not pull the points around
        att = torch.softmax(coarse.detach().reshape(n, n_lm, -1).float(), -1)
        feat = torch.einsum("nlp,ncp->nlc", att, d2.reshape(n, d2.shape[1], -1).float())
        pooled = e4.mean((2, 3, 4))
        return logits, (feat * self.presence_local).sum(-1) + self.presence_global(pooled)


class LocalNet(nn.Module):
    """Stages 2 and 3: a crop around one landmark estimate -> one logit map per landmark.

    One network serves all landmarks: it has a map per landmark and the cascade reads the map of the
    landmark the crop was taken for, so all 16 crops go through in one batch.
    """

    def __init__(self, n_landmarks: int, width: int = 8, in_channels: int = 1):
        super().__init__()
        w = width
        self.enc1 = nn.Sequential(_block(in_channels, w), _block(w, w))  # 1
        self.enc2 = nn.Sequential(_block(w, 2 * w, 2), _block(2 * w, 2 * w), _block(2 * w, 2 * w))  # 1/2
        self.enc3 = nn.Sequential(_block(2 * w, 4 * w, 2), _block(4 * w, 4 * w), _block(4 * w, 4 * w))  # 1/4
        self.dec2 = nn.Sequential(_block(6 * w, 2 * w), _block(2 * w, 2 * w))
        self.skip1 = nn.Conv3d(w, 2 * w, 2, stride=2)  # full-resolution detail, brought to 1/2
        self.head = nn.Conv3d(2 * w, n_landmarks, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d2 = self.dec2(torch.cat([F.interpolate(e3, size=e2.shape[2:], mode="trilinear"), e2], 1))
        d2 = d2 + self.skip1(e1)
        return F.interpolate(self.head(d2), size=size, mode="trilinear")


def build_network(kind: str, n_landmarks: int, width: int, presence: bool = False) -> nn.Module:
    if kind == "global":
        return GlobalNet(n_landmarks, width, presence=presence)
    if kind == "local":
        return LocalNet(n_landmarks, width)
    raise ValueError(f"unknown network kind {kind!r}")
