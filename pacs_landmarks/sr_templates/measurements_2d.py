"""Cephalometric measurements of a 2D image (a lateral cephalogram) and their SR: Comprehensive SR, TID 1500.

Values come from ``measurements.compute_measurements_2d`` (the formulas of the landmark set, Steiner / Downs /
Tweed / ... norms). One TID 1501 group per measurement, each a TID 300 numeric in UCUM units INFERRED FROM a
SCOORD MULTIPOINT (the image pixels of the points it used, SELECTED FROM the image), with TID 310 properties:
Normality SCT 17621005 "Normal" or SCT 263654008 "Abnormal" (outside the set's typical range, which is the TID
312 Normal Range Description, its norm the Normal Range Authority). Lengths need a physical pixel size: an
image without one gets its angles only, and each length is stated as left out ("no mm measurements: no pixel
spacing"), like a measurement whose landmarks were not found (``measurements.omitted_groups``). The pixel
spacing used and its source close the report (``landmark_sr_2d.spacing_group``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from pacs_landmarks.inference.landmark2d import Landmark2D
from pacs_landmarks.landmark_sets import coded, load_landmark_set
from pacs_landmarks.sr_templates.common import Algorithm, evidence_headers, sr_algorithm_id
from pacs_landmarks.sr_templates.common import sr_document
from pacs_landmarks.sr_templates.landmark_sr_2d import image_source, measurement_report, spacing_group
from pacs_landmarks.sr_templates.measurements import (
    _UCUM,
    MeasurementValue,
    _landmarks_of,
    compute_measurements_2d,
    omitted_groups,
)
from pacs_landmarks.sr_templates.uids import tracking_uid

NO_SPACING_REASON = "no mm measurements: no pixel spacing"


@dataclass(frozen=True)
class Omitted2D:
    """A measurement of the set left out, and why (``reason``, as ``measurements.OmittedMeasurement``)."""

    name: str
    reason: str
    definition: dict


def points_px(landmarks: list[Landmark2D]) -> dict[str, tuple[float, float]]:
    """{name: (column, row)} of the found landmarks."""
    return {lm.name: tuple(lm.position_px) for lm in landmarks  # type: ignore[misc]
            if lm.status == "found" and lm.position_px is not None}


def measure_2d(landmarks: list[Landmark2D], set_name: str, spacing) -> tuple[list[MeasurementValue], list[Omitted2D]]:
    """(values, left out) for the landmarks of one image; ``spacing``: ``dicom.xray.Spacing`` or None."""
    set_def = load_landmark_set(set_name)
    values = compute_measurements_2d(points_px(landmarks), set_name, spacing.mm if spacing is not None else None)
    done = {m.name for m in values}
    status = {lm.name: lm.status for lm in landmarks}
    by_measure = {m["name"]: m for m in set_def.get("measurements", [])}
    omitted = []
    for m in set_def.get("measurements", []):
        if m["name"] in done:
            continue
        missing = [n for n in _landmarks_of(m, set_def, by_measure) if status.get(n) != "found"]
        if missing:
            reason = "not computed: " + "; ".join(f"{n} {status.get(n, 'not_found').replace('_', ' ')}"
                                                 for n in missing)
        else:  # every landmark is there: only a length without a pixel size is left out
            reason = NO_SPACING_REASON
        omitted.append(Omitted2D(m["name"], reason, m))
    return values, omitted


def _pixels_of(mv: MeasurementValue, points: dict[str, tuple[float, float]], set_name: str) -> np.ndarray:
    names = {d["abbreviation"]: d["name"] for d in load_landmark_set(set_name)["landmarks"]}
    return np.array([points[names.get(n, n)] for n in mv.points], dtype=float)


def build_measurements_sr_2d(image: Dataset, landmarks: list[Landmark2D], algorithm: Algorithm,
                             values: list[MeasurementValue], omitted: list, spacing,
                             predecessors: list[Dataset] = ()) -> Dataset:
    """The measurements SR of one image (module docstring); ``predecessors`` as for the landmark SR."""
    import highdicom as hd
    from highdicom.sr import (
        CodedConcept,
        CoordinatesForMeasurement,
        Measurement,
        MeasurementProperties,
        MeasurementsAndQualitativeEvaluations,
        NormalRangeProperties,
        SourceImageForRegion,
        TrackingIdentifier,
    )
    from pydicom.sr.codedict import codes

    if not values and not omitted:
        raise ValueError("no measurement can be derived from these landmarks")
    series = str(image.SeriesInstanceUID)
    algorithm_id = sr_algorithm_id(algorithm)
    source = SourceImageForRegion(referenced_sop_class_uid=image.SOPClassUID,
                                  referenced_sop_instance_uid=image.SOPInstanceUID)
    points = points_px(landmarks)
    groups = []
    for mv in values:
        unit = _UCUM[mv.unit]
        norm = mv.definition.get("norm_source") or None
        properties = None
        if mv.range is not None:
            properties = MeasurementProperties(
                normality=codes.SCT.Abnormal if mv.outside_range else codes.SCT.Normal,
                normal_range_properties=NormalRangeProperties(
                    values=[], description=f"{mv.range[0]:g} to {mv.range[1]:g} {mv.unit}", authority=norm),
            )
        num = Measurement(
            name=coded(mv.definition["code"]),
            value=round(mv.value, 4),
            unit=CodedConcept(unit[0], "UCUM", unit[1]),
            algorithm_id=algorithm_id,
            properties=properties,
            referenced_coordinates=[CoordinatesForMeasurement(
                graphic_type=hd.sr.GraphicTypeValues.MULTIPOINT,
                graphic_data=_pixels_of(mv, points, algorithm.landmark_set),
                source_image=source,
            )],
        )
        groups.append(MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(
                uid=tracking_uid(series, algorithm.name, algorithm.version, "measurement:" + mv.name),
                identifier=mv.name),
            algorithm_id=algorithm_id,
            measurements=[num],
        ))
    groups += omitted_groups(omitted, algorithm, series)
    groups.append(spacing_group(spacing, algorithm, series))
    report = measurement_report(algorithm, groups, image)
    return sr_document(report, evidence_headers([image]), "measurements-sr", algorithm, image_source(image),
                       predecessors, three_d=False)
