"""The landmark SR of a 2D image (a lateral cephalogram): Comprehensive SR, TID 1500 (PS3.16).

One TID 1410 "Planar ROI Measurements and Qualitative Evaluations" group per found landmark: Tracking
Identifier (the landmark name) and Tracking UID, Image Region = SCOORD POINT (column, row) SELECTED FROM the
image (PS3.3 C.18.6: the top-left corner of the top-left pixel is (0, 0)), the model's confidence, Finding =
SCT 711101009 "Anatomical point", Finding Sites = the landmark's code and structure. Every landmark that is
not found is stated as for CT (``landmark_sr.not_found_groups``: Presence Undetermined with a Comment).
A last TID 1501 group, tracking identifier "Pixel spacing" (``spacing_group``), says which physical pixel size
the results use and where it came from (the order of ``dicom.xray.physical_spacing``): DCM 111066 "Vertical
Pixel Spacing" and DCM 111026 "Horizontal Pixel Spacing" in mm (the TID 1604 concepts) and a DCM 121106
"Comment" naming the source, or only a Comment when the image has none (points in pixels, no lengths).

A Comprehensive SR (not 3D): the content has no SCOORD3D, and a projection image has no frame of reference to
put one in. The document is PRELIMINARY and UNVERIFIED, like the CT one. The Image Library (TID 1600) lists the
image with highdicom's projection-radiography descriptors (TID 1604).
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from pydicom.dataset import Dataset

from pacs_landmarks.inference.landmark2d import Landmark2D
from pacs_landmarks.landmark_sets import coded, landmark_definition, load_landmark_set
from pacs_landmarks.sr_templates.common import (
    Algorithm,
    evidence_headers,
    observation_context,
    sr_algorithm_id,
    sr_document,
)
from pacs_landmarks.sr_templates.landmark_sr import CONFIDENCE, COMMENT, finding_sites, not_found_groups
from pacs_landmarks.sr_templates.readback import _COMMENT, _CONFIDENCE, _MEASUREMENT_GROUP, _PRESENCE, _STATUS_OF
from pacs_landmarks.sr_templates.readback import _TRACKING_ID, _concept, _walk
from pacs_landmarks.sr_templates.readback import _resolve_name, _FINDING, _FINDING_SITE
from pacs_landmarks.sr_templates.uids import tracking_uid

PROCEDURE_RADIOGRAPHY = ("168537006", "SCT", "Plain radiography")
SPACING_GROUP = "Pixel spacing"  # tracking identifier of the group that states the pixel spacing used
VERTICAL_SPACING = ("111066", "DCM", "Vertical Pixel Spacing")  # between rows (TID 1604)
HORIZONTAL_SPACING = ("111026", "DCM", "Horizontal Pixel Spacing")  # between columns
NO_SPACING = "no pixel spacing: landmarks in image pixels, no mm measurements"


def image_source(header: Dataset) -> SimpleNamespace:
    """What ``common.result_uids`` needs of a source: the result's UIDs follow this one image (uids.py)."""
    return SimpleNamespace(series_instance_uid=str(header.SeriesInstanceUID), source_headers=[header])


def spacing_text(spacing) -> str:
    """One line for SRs, tables and landmarks.json: the pixel size used and its source (or that there is none)."""
    if spacing is None:
        return NO_SPACING
    return f"{spacing.row_mm:g} x {spacing.col_mm:g} mm (rows x columns) from {spacing.source}; plane: {spacing.plane}"


def library_images(header: Dataset) -> list[Dataset] | None:
    """The image for highdicom's Image Library (``MeasurementReport(referenced_images=...)``), or None when
    highdicom cannot describe it: its TID 1603 projection descriptors read Imager Pixel Spacing and two values
    of Patient Orientation, which a CR (Type 3 there) or a scanned film (SC) may lack. Then
    ``add_image_library`` puts a library with the IMAGE entry only."""
    lean = evidence_headers([header])[0]
    orientation = lean.get("PatientOrientation") or []
    if "ImagerPixelSpacing" in lean and len(orientation) == 2 or str(lean.SOPClassUID) == "1.2.840.10008.5.1.4.1.1.7":
        return [lean]
    return None


def add_image_library(report, header: Dataset) -> None:
    """TID 1600 Image Library with one IMAGE entry (no descriptors), before Imaging Measurements."""
    from highdicom.sr import ContainerContentItem, ContentSequence, ImageContentItem, RelationshipTypeValues
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    contains = RelationshipTypeValues.CONTAINS
    group = ContainerContentItem(name=codes.DCM.ImageLibraryGroup, relationship_type=contains)
    group.ContentSequence = ContentSequence([ImageContentItem(
        name=CodedConcept("260753009", "SCT", "Source"), referenced_sop_class_uid=header.SOPClassUID,
        referenced_sop_instance_uid=header.SOPInstanceUID, relationship_type=contains)])
    library = ContainerContentItem(name=codes.DCM.ImageLibrary, relationship_type=contains)
    library.ContentSequence = ContentSequence([group])
    content = report[0].ContentSequence
    content.insert(next(n for n, item in enumerate(content) if item.ValueType == "CONTAINER"), library)


def measurement_report(algorithm: Algorithm, groups: list, header: Dataset):
    """The TID 1500 report of one image: Plain radiography, the Image Library, ``groups``."""
    from highdicom.sr import CodedConcept, MeasurementReport

    images = library_images(header)
    report = MeasurementReport(
        observation_context=observation_context(algorithm),
        procedure_reported=CodedConcept(*PROCEDURE_RADIOGRAPHY),
        imaging_measurements=groups,
        referenced_images=images,  # the Image Library (TID 1600) with highdicom's descriptors
    )
    if images is None:
        add_image_library(report, header)
    return report


def spacing_group(spacing, algorithm: Algorithm, series: str):
    """The TID 1501 group stating the pixel spacing the results use (module docstring)."""
    from highdicom.sr import (CodedConcept, Measurement, MeasurementsAndQualitativeEvaluations, TextContentItem,
                              TrackingIdentifier)

    algorithm_id = sr_algorithm_id(algorithm)
    values = []
    if spacing is not None:
        mm = CodedConcept("mm", "UCUM", "millimeter")
        values = [Measurement(name=CodedConcept(*VERTICAL_SPACING), value=float(spacing.row_mm), unit=mm,
                              algorithm_id=algorithm_id),
                  Measurement(name=CodedConcept(*HORIZONTAL_SPACING), value=float(spacing.col_mm), unit=mm,
                              algorithm_id=algorithm_id)]
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=tracking_uid(series, algorithm.name, algorithm.version, SPACING_GROUP), identifier=SPACING_GROUP),
        algorithm_id=algorithm_id,
        measurements=values or None,
    )
    group[0].ContentSequence.append(
        TextContentItem(name=CodedConcept(*COMMENT), value=spacing_text(spacing)[:1024], relationship_type="CONTAINS"))
    return group


def build_landmark_sr_2d(image: Dataset, landmarks: list[Landmark2D], algorithm: Algorithm,
                         predecessors: list[Dataset] = (), spacing=None) -> Dataset:
    """The SR for ``landmarks`` (every landmark of the set, with its status) found on ``image`` (its header is
    enough: no pixel data needed). ``spacing``: the ``dicom.xray.Spacing`` the results use (None: none).
    ``predecessors``: earlier landmark SRs of this image and model, newest first (``common.sr_document``)."""
    import highdicom as hd
    from highdicom.sr import (
        CodedConcept,
        ImageRegion,
        Measurement,
        PlanarROIMeasurementsAndQualitativeEvaluations,
        SourceImageForRegion,
        TrackingIdentifier,
    )
    from pydicom.sr.codedict import codes

    found = [lm for lm in landmarks if lm.status == "found" and lm.position_px is not None]
    if not found:
        raise ValueError("no landmark was found: nothing to report")
    rows, cols = int(image.Rows), int(image.Columns)
    series = str(image.SeriesInstanceUID)
    algorithm_id = sr_algorithm_id(algorithm)
    source = SourceImageForRegion(referenced_sop_class_uid=image.SOPClassUID,
                                  referenced_sop_instance_uid=image.SOPInstanceUID)
    groups = []
    for lm in found:
        column, row = (float(v) for v in lm.position_px)  # type: ignore[misc]
        if not (0.0 <= column <= cols and 0.0 <= row <= rows):
            raise ValueError(f"{lm.name} at ({column}, {row}) lies outside the {cols} x {rows} image")
        definition = landmark_definition(lm.name, algorithm.landmark_set)
        groups.append(
            PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(
                    uid=tracking_uid(series, algorithm.name, algorithm.version, lm.name), identifier=lm.name),
                referenced_region=ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POINT,
                                              graphic_data=np.array([[column, row]]), source_image=source),
                finding_type=codes.SCT.AnatomicalPoint,
                finding_category=codes.SCT.AnatomicalStructure,
                finding_sites=finding_sites(definition),
                algorithm_id=algorithm_id,
                measurements=[Measurement(name=coded(CONFIDENCE), value=round(float(lm.confidence), 4),
                                          unit=CodedConcept("1", "UCUM", "no units"), algorithm_id=algorithm_id)],
            )
        )
    # Landmark2D carries no reason; not_found_groups reads ``reason`` where there is one.
    others = [SimpleNamespace(name=lm.name, status=lm.status, reason=getattr(lm, "reason", "") or "")
              for lm in landmarks if lm.status != "found" or lm.position_px is None]
    for lm in others:
        lm.status = "not_found" if lm.status == "found" else lm.status
    groups += not_found_groups(others, algorithm, series, algorithm_id)
    groups.append(spacing_group(spacing, algorithm, series))
    report = measurement_report(algorithm, groups, image)
    return sr_document(report, evidence_headers([image]), "landmark-sr", algorithm, image_source(image),
                       predecessors, three_d=False)


def read_landmark_sr_2d(dataset: Dataset, set_name: str = "ceph19",
                        include_missing: bool = False) -> list[Landmark2D]:
    """Landmarks (SCOORD pixels) of a TID 1500 SR on a 2D image, one per tracking identifier, in document
    order; the image each point is on is the SR's Current Requested Procedure Evidence. With
    ``include_missing`` also the landmarks it states as not found (position None), in the set's order.
    ``ValueError`` when there is no 2D landmark point (nor, with ``include_missing``, any statement)."""
    if "ContentSequence" not in dataset:
        raise ValueError("not a structured report: no Content Sequence")
    set_def = load_landmark_set(set_name)
    found: dict[str, Landmark2D] = {}
    missing: dict[str, Landmark2D] = {}
    for group in _walk(dataset.ContentSequence):
        if group.get("ValueType") != "CONTAINER" or _concept(group) != _MEASUREMENT_GROUP:
            continue
        identifier, point, confidence, sites, status = None, None, 1.0, [], None
        for item in _walk(group.get("ContentSequence")):
            concept, vt = _concept(item), item.get("ValueType")
            if concept == _TRACKING_ID and vt == "TEXT":
                identifier = str(item.TextValue)
            elif vt == "SCOORD" and item.get("GraphicType") == "POINT" and point is None:
                point = tuple(float(v) for v in item.GraphicData[:2])
            elif concept == _PRESENCE and vt == "CODE":
                code = item.ConceptCodeSequence[0]
                status = _STATUS_OF.get((str(code.get("CodeValue", "")), str(code.CodingSchemeDesignator)))
            elif concept in (_FINDING_SITE, _FINDING) and vt == "CODE":
                code = item.ConceptCodeSequence[0]
                sites.append((str(code.get("CodeValue", "")), str(code.CodingSchemeDesignator), str(code.CodeMeaning)))
            elif concept == _CONFIDENCE and vt == "NUM":
                confidence = float(item.MeasuredValueSequence[0].NumericValue)
            elif concept == _COMMENT:
                pass
        name = _resolve_name(identifier, sites, set_def)
        if name is None or name in found:
            continue
        if point is None:
            if status is not None and name not in missing:
                missing[name] = Landmark2D(name=name, position_px=None, confidence=0.0, status=status)
            continue
        found[name] = Landmark2D(name=name, position_px=point, confidence=confidence)  # type: ignore[arg-type]
    if not include_missing:
        if not found:
            raise ValueError("the SR holds no 2D landmark point (SCOORD POINT with a tracking identifier)")
        return list(found.values())
    if not found and not missing:
        raise ValueError("the SR holds no 2D landmark (SCOORD POINT or a not-found statement)")
    everything = {**missing, **found}
    order = [d["name"] for d in set_def["landmarks"]]
    if set(everything) <= set(order):
        return [everything[n] for n in order if n in everything]
    return list(everything.values())


def read_spacing_2d(dataset: Dataset) -> tuple[tuple[float, float] | None, str]:
    """((row mm, column mm) or None, the source text) from the "Pixel spacing" group of one of our 2D SRs."""
    for group in _walk(dataset.ContentSequence):
        if group.get("ValueType") != "CONTAINER" or _concept(group) != _MEASUREMENT_GROUP:
            continue
        items = list(_walk(group.get("ContentSequence")))
        if not any(_concept(i) == _TRACKING_ID and str(i.get("TextValue")) == SPACING_GROUP for i in items):
            continue
        values = {_concept(i): float(i.MeasuredValueSequence[0].NumericValue) for i in items
                  if i.get("ValueType") == "NUM" and i.get("MeasuredValueSequence")}
        text = next((str(i.TextValue) for i in items if _concept(i) == _COMMENT and i.get("ValueType") == "TEXT"), "")
        row, col = values.get(VERTICAL_SPACING[:2]), values.get(HORIZONTAL_SPACING[:2])
        return ((row, col) if row and col else None), text
    return None, ""
