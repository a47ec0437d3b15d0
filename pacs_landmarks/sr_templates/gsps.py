"""The landmark presentation state: Grayscale Softcopy Presentation State (PS3.3 A.33.1), built with highdicom.

Many PACS viewers draw no SR content but do apply a GSPS: graphic and text annotations on the referenced
images (Graphic Annotation Module, PS3.3 C.10.5; Graphic Layer Module, C.10.7). What we draw:

- layer ``LANDMARKS`` (the landmark result): each drawn landmark as a POINT on its nearest source slice (the
  same slice and pixel coordinates as the landmark SR's SCOORD point) with its name as text beside it;
- layer ``TRACING`` (a measurement result, for 2D cephalograms): a POLYLINE per tracing line (S-N, FH = Po-Or,
  mandibular plane Go-Me, N-A, N-B, N-Pog) labelled with the line and the measurement it shows
  (``image_marks``); CT results have none yet.

A 2D image (a cephalogram) is one ``ImagePlane``; its marks are in the image's own SCOORD pixels
(``build_gsps_image``).

Everything drawn is a ``Mark``: one graphic on one source image (or frame) of one layer. A later result adds
its marks and, if new, its layer (``LAYERS``); the builder does not change.

The presentation state references every source image of the series (Presentation State Relationship
Module, C.11.11), so a viewer that applies it shows the whole series with the marks on their slices; the
rescale (Modality LUT, C.11.1) and VOI window (C.11.8) are the source images'. One presentation state has
one Modality LUT for all its images (PS3.4 N.2.1): for a series whose slices differ in Rescale Slope /
Intercept / Type, no GSPS is made (``build_gsps`` returns None, with a warning) rather than one that shows
some slices with wrong values.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from pacs_landmarks.dicom.volume import SliceSource, Volume
from pacs_landmarks.inference.landmark import Landmark
from pacs_landmarks.landmark_sets import rgb_to_cielab
from pacs_landmarks.sr_templates.common import SERIES, Algorithm, evidence_headers, finish, image_result_identity
from pacs_landmarks.sr_templates.geometry import SourcePlane, nearest_plane, source_planes

# Layer name -> (order, description, sRGB colour, stored as Graphic Layer Recommended Display CIELab Value).
# Lower order is drawn first (PS3.3 C.10.7): the points stay on top of the lines.
LAYERS: dict[str, tuple[int, str, tuple[int, int, int]]] = {
    "TRACING": (1, "AI cephalometric tracing", (255, 255, 128)),
    "LANDMARKS": (2, "AI landmarks", (255, 96, 32)),
}
# Text box beside a point (PS3.3 C.10.5.1.1: a viewer fits the text into it), in image pixels: its height a
# 40th of the image (at least 12 pixels), so that a 512 CT slice and a 2500 pixel cephalogram show it alike.
_TEXT_LINES_PER_IMAGE = 40.0
_MIN_TEXT_HEIGHT = 12.0
_RESCALE = ("RescaleSlope", "RescaleIntercept", "RescaleType")
_WINDOW = ("WindowCenter", "WindowWidth", "WindowCenterWidthExplanation", "VOILUTFunction")

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mark:
    """One graphic on one image: ``points`` in that image's pixel coordinates ((0, 0) = top left corner of the
    first pixel, PS3.3 C.10.5.1.2), column first; ``text`` drawn beside its first point."""

    layer: str
    plane: SourcePlane
    graphic_type: str  # "POINT" or "POLYLINE"
    points: tuple[tuple[float, float], ...]
    text: str | None = None

    @classmethod
    def polyline(cls, layer: str, plane: SourcePlane, lps_points: list, text: str | None = None) -> "Mark":
        """A line through 3D points projected onto ``plane`` (a tracing on a cephalogram, with its value)."""
        points = tuple(_pixel(plane, p) for p in lps_points)
        return cls(layer, plane, "POLYLINE", points, text)


def _pixel(plane: SourcePlane, lps) -> tuple[float, float]:
    column, row = plane.pixel_index(np.asarray(lps, float))
    return column + 0.5, row + 0.5  # pixel centre (c, r) is at (c + 0.5, r + 0.5)


def drawn_landmarks(landmarks: list[Landmark]) -> list[Landmark]:
    """The landmarks the presentation state draws: the found ones (a ``status`` other than ``found`` --
    not found, outside the field of view -- is not drawn); landmarks without a status are all drawn."""
    return [lm for lm in landmarks if getattr(lm, "status", "found") == "found"]


def landmark_marks(volume: Volume, landmarks: list[Landmark]) -> list[Mark]:
    """A POINT with the landmark's name on its nearest source slice, for every drawn landmark whose point
    falls inside that slice (the same slice and coordinates as the landmark SR's 2D point)."""
    planes = source_planes(volume)
    marks = []
    for lm in drawn_landmarks(landmarks):
        plane = nearest_plane(planes, np.asarray(lm.position_lps_mm, float))
        x, y = _pixel(plane, lm.position_lps_mm)
        if 0.0 <= x <= plane.columns and 0.0 <= y <= plane.rows:
            marks.append(Mark("LANDMARKS", plane, "POINT", ((x, y),), lm.name))
    return marks


def _text_box(mark: Mark) -> tuple[tuple[float, float], tuple[float, float]]:
    """A box right of the first point (left of it near the right edge), kept inside the image."""
    x, y = mark.points[0]
    cols, rows = float(mark.plane.columns), float(mark.plane.rows)
    height = max(_MIN_TEXT_HEIGHT, rows / _TEXT_LINES_PER_IMAGE)
    width, gap = 0.6 * height * len(mark.text or ""), height / 3
    left = x + gap if x + gap + width <= cols else max(0.0, x - gap - width)
    top = min(max(0.0, y - height / 2), max(0.0, rows - height))
    return (left, top), (min(cols, left + width), min(rows, top + height))


def _values(header: Dataset, keys: tuple[str, ...]) -> tuple:
    return tuple(tuple(v) if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue" else v
                 for v in (header.get(k) for k in keys))


def _shared_transformations(headers: list[Dataset]) -> dict:
    """highdicom arguments for the Modality LUT and VOI of single-frame sources that all share them.

    highdicom copies both from the referenced images itself, but checks every image against its IOD tables
    on the way (0.1 s for 300 slices); when the slices agree, the first one's values are given explicitly
    (the same result). Anything else (multi-frame, differing windows, VOI LUTs) is left to highdicom.
    """
    import highdicom as hd

    if any(int(h.get("NumberOfFrames", 1) or 1) > 1 or "SharedFunctionalGroupsSequence" in h for h in headers):
        return {}
    first, out = headers[0], {}
    rescale = _values(first, _RESCALE)
    if rescale[0] is not None and rescale[1] is not None and rescale[2] \
            and all(_values(h, _RESCALE) == rescale for h in headers):
        out["modality_lut_transformation"] = hd.ModalityLUTTransformation(
            rescale_intercept=first.RescaleIntercept, rescale_slope=first.RescaleSlope,
            rescale_type=first.RescaleType)
    window = _values(first, _WINDOW)
    if window[0] is not None and window[1] is not None and not any("VOILUTSequence" in h for h in headers) \
            and all(_values(h, _WINDOW) == window for h in headers):
        out["voi_lut_transformations"] = [hd.pr.SoftcopyVOILUTTransformation(
            window_center=first.WindowCenter, window_width=first.WindowWidth,
            window_explanation=first.get("WindowCenterWidthExplanation"),
            voi_lut_function=first.get("VOILUTFunction"))]
    return out


def rescale_differs(headers: list[Dataset]) -> bool:
    """True when single-frame source images differ in Rescale Slope / Intercept / Type (or some lack them)."""
    single = [h for h in headers if int(h.get("NumberOfFrames", 1) or 1) == 1]
    return len({_values(h, _RESCALE) for h in single}) > 1


def build_gsps(volume: Volume, marks: list[Mark], algorithm: Algorithm) -> Dataset | None:
    """The GSPS drawing ``marks`` on the source images of ``volume``; one Graphic Annotation per layer and
    image (frame), one Graphic Layer per layer used. None (and a warning) when the source images differ in
    their rescale: one presentation state cannot show them all right (module docstring)."""
    planes = source_planes(volume)
    referenced = evidence_headers(list({p.header.SOPInstanceUID: p.header for p in planes}.values()))
    if rescale_differs(referenced):
        LOGGER.warning("series %s: no presentation state: its images differ in Rescale Slope/Intercept/Type",
                       volume.series_instance_uid)
        return None
    return _presentation_state(referenced, volume, marks, algorithm)


def _presentation_state(referenced: list[Dataset], source_of, marks: list[Mark], algorithm: Algorithm) -> Dataset:
    """The GSPS itself: ``referenced`` source headers (no pixels), ``source_of`` what its UIDs follow
    (``common.result_uids``)."""
    import highdicom as hd
    from highdicom.pr import (
        AnnotationUnitsValues,
        GraphicAnnotation,
        GraphicLayer,
        GraphicObject,
        GraphicTypeValues,
        TextJustificationValues,
        TextObject,
    )

    unknown = sorted({m.layer for m in marks} - set(LAYERS))
    if unknown:
        raise ValueError(f"unknown graphic layer(s) {unknown}: add them to gsps.LAYERS")
    by_uid = {str(h.SOPInstanceUID): h for h in referenced}
    groups: dict[tuple[str, str, int | None], list[Mark]] = defaultdict(list)
    for mark in marks:
        groups[(mark.layer, mark.plane.source.sop_instance_uid, mark.plane.source.frame_number)].append(mark)
    layers = {
        name: GraphicLayer(layer_name=name, order=LAYERS[name][0], description=LAYERS[name][1],
                            display_color=rgb_to_cielab(LAYERS[name][2]))
        for name in sorted({m.layer for m in marks}, key=lambda n: LAYERS[n][0])
    }
    for layer in layers.values():
        # Graphic Layer Recommended Display Grayscale Value (PS3.3 C.10.7, Type 3): white, for grayscale
        # displays and for renderers that ignore the CIELab value (dcmtk's reads only this one).
        layer.GraphicLayerRecommendedDisplayGrayscaleValue = 0xFFFF
    annotations = []
    pixel = AnnotationUnitsValues.PIXEL
    for (layer, uid, frame), group in groups.items():
        graphics, texts = [], []
        for mark in group:
            graphics.append(GraphicObject(
                graphic_type=GraphicTypeValues[mark.graphic_type],
                graphic_data=np.asarray(mark.points, dtype=float),
                units=pixel,
            ))
            if mark.text:
                top_left, bottom_right = _text_box(mark)
                texts.append(TextObject(text_value=mark.text, units=pixel, bounding_box=(*top_left, *bottom_right),
                                        text_justification=TextJustificationValues.LEFT))
        annotations.append(GraphicAnnotation(
            referenced_images=[by_uid[uid]],
            graphic_layer=layers[layer],
            referenced_frame_number=frame,
            graphic_objects=graphics,
            text_objects=texts or None,
        ))
    extra = {}
    if all(str(h.get("PhotometricInterpretation", "")) == "MONOCHROME1" for h in referenced):
        # PS3.4 N.2.1.4: a presentation state's output is P-values (bright = white); for MONOCHROME1 sources
        # (minimum = white) the Presentation LUT must invert, as their own Presentation LUT Shape does.
        extra["presentation_lut_transformation"] = hd.PresentationLUTTransformation(
            presentation_lut_shape=hd.PresentationLUTShapeValues.INVERSE)
    ds = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=referenced,
        **image_result_identity(source_of, "gsps", algorithm),
        content_label="AI_LANDMARKS",
        content_description=SERIES["gsps"][1],
        graphic_annotations=annotations or None,
        graphic_layers=list(layers.values()) or None,
        **_shared_transformations(referenced),
        **extra,
    )
    # General Series (PS3.3 C.7.3.1): Laterality is Type 2C, required for a paired body part. The marks are
    # on the source images, so their body part and laterality are ours. Without a body part nobody can tell
    # whether it is paired: Laterality is then present and empty (unknown), as dciodvfy asks (a warning).
    for key in ("BodyPartExamined", "Laterality"):
        if referenced[0].get(key):
            setattr(ds, key, referenced[0].get(key))
    if "BodyPartExamined" not in ds and "Laterality" not in ds:
        ds.Laterality = ""
    return finish(ds, "gsps", algorithm)


# --------------------------------------------------------------------------------------------- 2D images


@dataclass(frozen=True)
class ImagePlane:
    """A single projection image as a ``Mark`` target (what ``Mark`` needs of a ``SourcePlane``)."""

    source: SliceSource
    header: Dataset
    rows: int
    columns: int

    @classmethod
    def of(cls, header: Dataset) -> "ImagePlane":
        return cls(SliceSource(str(header.SOPInstanceUID), str(header.SOPClassUID)), header, int(header.Rows),
                   int(header.Columns))


# Tracing lines of a lateral cephalogram: (label, from, to, (measurement shown beside it, its short name)), by
# abbreviation.
TRACING_LINES = (
    ("S-N", "S", "N", ("S-N length", "")),
    ("FH", "Po", "Or", None),
    ("MP", "Go", "Me", ("FH to mandibular plane angle", "FMA")),
    ("N-A", "N", "A", ("SNA angle", "SNA")),
    ("N-B", "N", "B", ("SNB angle", "SNB")),
    ("N-Pog", "N", "Pog", ("Facial angle", "facial angle")),
)
_UNIT_TEXT = {"deg": "\N{DEGREE SIGN}", "mm": " mm"}


def image_marks(header: Dataset, landmarks: list, set_name: str, measurements: list = ()) -> list[Mark]:
    """Marks on one cephalogram: each found landmark as a POINT with its name (layer LANDMARKS), and the
    tracing lines (``TRACING_LINES``) whose two ends were found as POLYLINEs, labelled with the line and, when
    computed, the measurement it shows (layer TRACING). Positions are the image's SCOORD pixels."""
    from pacs_landmarks.landmark_sets import load_landmark_set

    plane = ImagePlane.of(header)
    names = {d["abbreviation"]: d["name"] for d in load_landmark_set(set_name)["landmarks"]}
    points = {lm.name: tuple(float(v) for v in lm.position_px) for lm in drawn_landmarks(landmarks)
              if lm.position_px is not None}
    values = {m.name: m for m in measurements}
    marks = []
    for label, a, b, shown in TRACING_LINES:
        pa, pb = points.get(names.get(a, a)), points.get(names.get(b, b))
        if pa is None or pb is None:
            continue
        text = label
        if shown is not None and shown[0] in values:
            m, short = values[shown[0]], shown[1]
            value = f"{m.value:.1f}{_UNIT_TEXT[m.unit]}"
            text = f"{label} ({short} {value})" if short else f"{label}: {value}"
        marks.append(Mark("TRACING", plane, "POLYLINE", (pa, pb), text))
    for lm in drawn_landmarks(landmarks):
        if lm.position_px is not None:
            marks.append(Mark("LANDMARKS", plane, "POINT", (points[lm.name],), lm.name))
    return marks


def build_gsps_image(header: Dataset, marks: list[Mark], algorithm: Algorithm, source_of) -> Dataset:
    """The GSPS drawing ``marks`` on one image (``header``; its UIDs follow ``source_of``)."""
    return _presentation_state(evidence_headers([header]), source_of, marks, algorithm)
