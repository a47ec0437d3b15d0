"""The physical volume every other part of the project works on.

Conventions (one way, everywhere):
- ``array`` is float32 Hounsfield units, shape ``(slices, rows, columns)``;
- ``affine`` maps an *array index* ``(k, j, i, 1)`` -- the same axis order as ``array`` -- to patient
  LPS coordinates in mm (PS3.3 C.7.6.2.1.1, Reference Coordinate System);
- ``spacing`` is in the same order as the array axes, in mm.
"""
from __future__ import annotations

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
