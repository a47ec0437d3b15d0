"""The landmark type of a 2D image (a cephalogram) that the SR builders consume (no torch import here)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Landmark2D:
    """One landmark on a projection image, in the image's own pixel coordinates.

    ``position_px`` is (column, row) in the DICOM SCOORD convention (PS3.3 C.18.6.1.2: the top-left corner of
    the top-left pixel is (0, 0), its centre (0.5, 0.5)); None when the landmark was not found.
    """

    name: str  # as in the landmark set definition, e.g. "Sella", "Upper lip"
    position_px: tuple[float, float] | None
    confidence: float = 1.0  # 0..1
    status: str = "found"  # "found" or "not_found"
    stage_positions: tuple[tuple[float, float], ...] = field(default=())  # per cascade stage, SCOORD pixels
