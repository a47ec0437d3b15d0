"""The landmark type of a 2D image (a cephalogram) that the SR builders consume (no torch import here)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Landmark2D:
    """One landmark on a projection image, in the image's own pixel coordinates.

    ``position_px`` is (column, row) in the DICOM SCOORD convention (PS3.3 C.18.6.1.2: the top-left corner of
    the top-left pixel is (0, 0), its centre (0.5, 0.5)); None when the landmark was not found.  ``status``
    is "found", "not_found" (in the image, but not confident or not plausible: ``reason`` says which) or
    "outside_field_of_view" (collimation cut it off).
    """

    name: str  # as in the landmark set definition, e.g. "Sella", "Upper lip"
    position_px: tuple[float, float] | None
    confidence: float = 1.0  # 0..1
    status: str = "found"  # "found", "not_found" or "outside_field_of_view"
    stage_positions: tuple[tuple[float, float], ...] = field(default=())  # per cascade stage, SCOORD pixels
    reason: str = ""  # why a landmark is not found, e.g. "low confidence"

    @property
    def found(self) -> bool:
        return self.status == "found"


class ImageLandmarks(list):
    """``LandmarkModel.predict_image``'s result: the list of ``Landmark2D`` (every landmark of the set, in
    order) plus how the image was measured: ``pixel_spacing_mm`` (row, column) used by the cascade,
    ``spacing_source`` (the DICOM attribute it came from, or the nominal estimate) and ``spacing_nominal``
    (True when the image had no physical pixel size: then only the pixel positions mean anything); ``facing``
    ("right" or "left"), the way the face looks in the image as the model read it, and ``facing_source``, why."""

    def __init__(self, items=(), *, pixel_spacing_mm: tuple[float, float], spacing_source: str,
                 spacing_nominal: bool = False, facing: str = "right", facing_source: str = ""):
        super().__init__(items)
        self.pixel_spacing_mm = pixel_spacing_mm
        self.spacing_source = spacing_source
        self.spacing_nominal = spacing_nominal
        self.facing = facing
        self.facing_source = facing_source
