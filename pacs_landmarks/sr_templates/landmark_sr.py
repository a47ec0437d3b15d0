"""The landmark SR: Comprehensive 3D SR, TID 1500 "Imaging Measurement Report" (PS3.16).

Per landmark two TID 1410 "Planar ROI Measurements and Qualitative Evaluations" groups with the same Tracking
Identifier (the landmark name) and Tracking UID, in this order:
1. Image Region = SCOORD POINT (with its IMAGE reference) on the nearest source slice;
2. Image Region = SCOORD3D POINT in the CT frame of reference (the exact 3D result), with the confidence.
Why two groups, and why this order: OHIF 3.13 merges groups by Tracking UID and draws only the first SCOORD /
SCOORD3D of the merged group, and only a 2D one in its stack view; highdicom (and so 3D Slicer's
QuantitativeReporting) refuses a TID 1410 group holding both a SCOORD and a SCOORD3D. Measured in a real
browser: see docs/dicom-conformance.md and tests/test_ohif.py.
Finding = SCT 711101009 "Anatomical point"; Finding Category = SCT 91723000 "Anatomical structure";
Finding Sites = the landmark's own code first (its meaning is the landmark's name: OHIF labels the point with
the first Finding Site), then its structure with topographic modifier and laterality.
The document is PRELIMINARY and UNVERIFIED: a person verifies it, not this software.

Only ``found`` landmarks are points.  Every other landmark of the set is stated, not dropped: one TID 1501
"Measurement and Qualitative Evaluation Group" per landmark (same Tracking Identifier and UID as its points
would have) whose Qualitative Evaluation (TID 1501 row 11, CONTAINS CODE) is DCM 121052 "Presence of
property" = DCM 122288 "Not visualized" (outside the field of view) or DCM 121059 "Presence Undetermined"
(in the volume, not found), with a DCM 121106 "Comment" giving the reason (``not_found_groups``).
"""
from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset

from pacs_landmarks.dicom.volume import Volume
from pacs_landmarks.inference.landmark import FOUND, OUTSIDE_FIELD_OF_VIEW, Landmark
from pacs_landmarks.sr_templates.common import (
    Algorithm,
    evidence_headers,
    observation_context,
    sr_algorithm_id,
    sr_document,
)
from pacs_landmarks.sr_templates.geometry import nearest_plane, source_planes
from pacs_landmarks.landmark_sets import coded, landmark_definition
from pacs_landmarks.sr_templates.measurements import PROCEDURE_CT_HEAD
from pacs_landmarks.sr_templates.uids import tracking_uid

# Local concept for the model's confidence in a landmark (0..1), a TID 300 numeric with UCUM unit "1".
CONFIDENCE = {"value": "CONF", "scheme": "99PACSLMK", "meaning": "Landmark detection confidence"}
PRESENCE = ("121052", "DCM", "Presence of property")
NOT_VISUALIZED = ("122288", "DCM", "Not visualized")  # outside_field_of_view
PRESENCE_UNDETERMINED = ("121059", "DCM", "Presence Undetermined")  # not_found
COMMENT = ("121106", "DCM", "Comment")


def not_found_groups(landmarks: list[Landmark], algorithm: Algorithm, series: str, algorithm_id) -> list:
    """TID 1501 groups stating each landmark that is not ``found`` (see the module docstring)."""
    from highdicom.sr import (CodedConcept, MeasurementsAndQualitativeEvaluations, QualitativeEvaluation,
                              TextContentItem, TrackingIdentifier)
    from pydicom.sr.codedict import codes

    groups = []
    for lm in landmarks:
        if lm.status == FOUND:
            continue
        definition = landmark_definition(lm.name, algorithm.landmark_set)
        value = NOT_VISUALIZED if lm.status == OUTSIDE_FIELD_OF_VIEW else PRESENCE_UNDETERMINED
        group = MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(
                uid=tracking_uid(series, algorithm.name, algorithm.version, lm.name), identifier=lm.name),
            finding_type=codes.SCT.AnatomicalPoint,
            finding_category=codes.SCT.AnatomicalStructure,
            finding_sites=finding_sites(definition),
            algorithm_id=algorithm_id,
            qualitative_evaluations=[QualitativeEvaluation(CodedConcept(*PRESENCE), CodedConcept(*value))],
        )
        reason = f"{lm.status}: {lm.reason}" if lm.reason else lm.status
        group[0].ContentSequence.append(
            TextContentItem(name=CodedConcept(*COMMENT), value=reason[:1024], relationship_type="CONTAINS"))
        groups.append(group)
    return groups


def finding_sites(definition: dict) -> list:
    from highdicom.sr import FindingSite

    sites = [FindingSite(anatomic_location=coded(definition["code"]))]
    sites.append(
        FindingSite(
            anatomic_location=coded(definition["structure"]),
            laterality=coded(definition["laterality"]) if definition.get("laterality") else None,
            topographical_modifier=coded(definition["modifier"]) if definition.get("modifier") else None,
        )
    )
    return sites


def image_library(headers: list[Dataset]):
    """TID 1600 Image Library of the referenced slices: one group sharing Modality and Frame of Reference
    (TID 1602 descriptors at group level), one IMAGE entry per slice (TID 1601).

    Per-entry descriptors (position, spacing, ...) are optional and left out: they doubled the size of the
    document and its build + write time, and the slices are referenced by UID anyway.
    """
    from highdicom.sr import (
        CodedConcept,
        ContainerContentItem,
        ContentSequence,
        ImageContentItem,
        RelationshipTypeValues,
        UIDRefContentItem,
        CodeContentItem,
    )
    from pydicom.sr.codedict import codes

    contains = RelationshipTypeValues.CONTAINS
    group = ContainerContentItem(name=codes.DCM.ImageLibraryGroup, relationship_type=contains)
    group.ContentSequence = ContentSequence()
    acq = RelationshipTypeValues.HAS_ACQ_CONTEXT
    group.ContentSequence.append(
        CodeContentItem(name=codes.DCM.Modality, value=CodedConcept("CT", "DCM", "Computed Tomography"), relationship_type=acq)
    )
    group.ContentSequence.append(
        UIDRefContentItem(name=codes.DCM.FrameOfReferenceUID, value=headers[0].FrameOfReferenceUID, relationship_type=acq)
    )
    for h in headers:
        group.ContentSequence.append(
            ImageContentItem(
                name=CodedConcept("260753009", "SCT", "Source"),
                referenced_sop_class_uid=h.SOPClassUID,
                referenced_sop_instance_uid=h.SOPInstanceUID,
                relationship_type=contains,
            )
        )
    library = ContainerContentItem(name=codes.DCM.ImageLibrary, relationship_type=contains)
    library.ContentSequence = ContentSequence([group])
    return library


def build_landmark_sr(volume: Volume, landmarks: list[Landmark], algorithm: Algorithm,
                      predecessors: list[Dataset] = ()) -> Dataset:
    """The landmark SR; ``predecessors``: earlier landmark SRs of this series and model, newest first (the
    newest that is not this document is named in the Predecessor Documents Sequence, see ``sr_document``)."""
    import highdicom as hd
    from highdicom.sr import (
        CodedConcept,
        ImageRegion,
        ImageRegion3D,
        Measurement,
        MeasurementReport,
        PlanarROIMeasurementsAndQualitativeEvaluations,
        SourceImageForRegion,
        TrackingIdentifier,
    )
    from pydicom.sr.codedict import codes

    if not landmarks:
        raise ValueError("no landmarks to report")
    everything, landmarks = landmarks, [lm for lm in landmarks if lm.status == FOUND]
    planes = source_planes(volume)
    series = volume.series_instance_uid
    algorithm_id = sr_algorithm_id(algorithm)  # the same items in every group: built once
    groups = []
    referenced: dict[str, Dataset] = {}
    for lm in landmarks:
        definition = landmark_definition(lm.name, algorithm.landmark_set)
        point = np.asarray(lm.position_lps_mm, dtype=float)
        tid = tracking_uid(series, algorithm.name, algorithm.version, lm.name)
        common = dict(
            finding_type=codes.SCT.AnatomicalPoint,
            finding_category=codes.SCT.AnatomicalStructure,
            finding_sites=finding_sites(definition),
            algorithm_id=algorithm_id,
        )
        confidence = Measurement(
            name=coded(CONFIDENCE),
            value=round(float(lm.confidence), 4),
            unit=CodedConcept("1", "UCUM", "no units"),
            algorithm_id=algorithm_id,
        )
        plane = nearest_plane(planes, point)
        column, row = plane.pixel_index(point)
        src = plane.source
        referenced[src.sop_instance_uid] = plane.header
        # First: the 2D point on its slice, the item OHIF draws.
        groups.append(
            PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(uid=tid, identifier=lm.name),
                # SCOORD pixel coordinates: (0, 0) is the top left corner of the first pixel (PS3.3
                # C.18.6.1.1), so a pixel centre at index (c, r) is at (c + 0.5, r + 0.5).
                referenced_region=ImageRegion(
                    graphic_type=hd.sr.GraphicTypeValues.POINT,
                    graphic_data=np.array([[column + 0.5, row + 0.5]]),
                    source_image=SourceImageForRegion(
                        referenced_sop_class_uid=src.sop_class_uid,
                        referenced_sop_instance_uid=src.sop_instance_uid,
                        referenced_frame_numbers=[src.frame_number] if src.frame_number else None,
                    ),
                ),
                **common,
            )
        )
        # Second: the exact 3D point (Slicer and other SCOORD3D readers), and the confidence.
        groups.append(
            PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(uid=tid, identifier=lm.name),
                referenced_region=ImageRegion3D(
                    graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                    graphic_data=point.reshape(1, 3),
                    frame_of_reference_uid=volume.frame_of_reference_uid,
                ),
                measurements=[confidence],
                **common,
            )
        )
    groups += not_found_groups(everything, algorithm, series, algorithm_id)
    report = MeasurementReport(
        observation_context=observation_context(algorithm),
        procedure_reported=CodedConcept(*PROCEDURE_CT_HEAD),
        imaging_measurements=groups,
    )
    # TID 1500 row "Image Library" goes between Procedure Reported and Imaging Measurements.
    content = report[0].ContentSequence
    at = next(n for n, item in enumerate(content) if item.ValueType == "CONTAINER")
    if referenced:
        content.insert(at, image_library(list(referenced.values())))
    # Evidence = the instances the content references (the slices of the 2D points); the 3D points reference
    # the frame of reference, not instances.
    # Nothing found: the series that was looked at is the evidence.
    evidence = list(referenced.values()) or list(volume.source_headers)
    return sr_document(report, evidence_headers(evidence), "landmark-sr", algorithm, volume, predecessors)
