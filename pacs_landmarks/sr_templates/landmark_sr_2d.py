"""The landmark SR of a 2D image (a lateral cephalogram): Comprehensive SR, TID 1500 (PS3.16).

One TID 1410 "Planar ROI Measurements and Qualitative Evaluations" group per found landmark: Tracking
Identifier (the landmark name) and Tracking UID, Image Region = SCOORD POINT (column, row) SELECTED FROM the
image (PS3.3 C.18.6: the top-left corner of the top-left pixel is (0, 0)), the model's confidence, Finding =
SCT 711101009 "Anatomical point", Finding Sites = the landmark's code and structure. Landmarks not found get
no group. A Comprehensive SR (not 3D): the content has no SCOORD3D, and a projection image has no frame of
reference to put one in. The document is PRELIMINARY and UNVERIFIED, like the CT one.
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
from pacs_landmarks.sr_templates.landmark_sr import CONFIDENCE, finding_sites
from pacs_landmarks.sr_templates.readback import _CONFIDENCE, _MEASUREMENT_GROUP, _TRACKING_ID, _concept, _walk
from pacs_landmarks.sr_templates.readback import _resolve_name, _FINDING, _FINDING_SITE
from pacs_landmarks.sr_templates.uids import tracking_uid

PROCEDURE_RADIOGRAPHY = ("168537006", "SCT", "Plain radiography")


def build_landmark_sr_2d(image: Dataset, landmarks: list[Landmark2D], algorithm: Algorithm) -> Dataset:
    """The SR for ``landmarks`` found on ``image`` (its header is enough: no pixel data needed)."""
    import highdicom as hd
    from highdicom.sr import (
        CodedConcept,
        ImageRegion,
        Measurement,
        MeasurementReport,
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
    report = MeasurementReport(
        observation_context=observation_context(algorithm),
        procedure_reported=CodedConcept(*PROCEDURE_RADIOGRAPHY),
        imaging_measurements=groups,
    )
    # The result's UIDs follow the input as for CT (uids.py): here the one source image.
    source_of = SimpleNamespace(series_instance_uid=series, source_headers=[image])
    return sr_document(report, evidence_headers([image]), "landmark-sr", algorithm, source_of, three_d=False)


def read_landmark_sr_2d(dataset: Dataset, set_name: str = "ceph19") -> list[Landmark2D]:
    """Landmarks (SCOORD pixels) of a TID 1500 SR on a 2D image, one per tracking identifier, in document
    order; the image each point is on is the SR's Current Requested Procedure Evidence. ``ValueError`` when
    there is no 2D landmark point."""
    if "ContentSequence" not in dataset:
        raise ValueError("not a structured report: no Content Sequence")
    set_def = load_landmark_set(set_name)
    found: dict[str, Landmark2D] = {}
    for group in _walk(dataset.ContentSequence):
        if group.get("ValueType") != "CONTAINER" or _concept(group) != _MEASUREMENT_GROUP:
            continue
        identifier, point, confidence, sites = None, None, 1.0, []
        for item in _walk(group.get("ContentSequence")):
            concept, vt = _concept(item), item.get("ValueType")
            if concept == _TRACKING_ID and vt == "TEXT":
                identifier = str(item.TextValue)
            elif vt == "SCOORD" and item.get("GraphicType") == "POINT" and point is None:
                point = tuple(float(v) for v in item.GraphicData[:2])
            elif concept in (_FINDING_SITE, _FINDING) and vt == "CODE":
                code = item.ConceptCodeSequence[0]
                sites.append((str(code.get("CodeValue", "")), str(code.CodingSchemeDesignator), str(code.CodeMeaning)))
            elif concept == _CONFIDENCE and vt == "NUM":
                confidence = float(item.MeasuredValueSequence[0].NumericValue)
        name = _resolve_name(identifier, sites, set_def)
        if point is None or name is None or name in found:
            continue
        found[name] = Landmark2D(name=name, position_px=point, confidence=confidence)  # type: ignore[arg-type]
    if not found:
        raise ValueError("the SR holds no 2D landmark point (SCOORD POINT with a tracking identifier)")
    return list(found.values())
