"""Derived cephalometric measurements: computed from landmark coordinates with the formulas of the landmark
set, and written as a separate Comprehensive 3D SR (TID 1500 with TID 1501 groups of TID 300 numerics).

Kept apart from the landmark SR so that a viewer that cannot render it still shows the landmarks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from pacs_landmarks.dicom.volume import Volume
from pacs_landmarks.inference.landmark import FOUND, Landmark
from pacs_landmarks.sr_templates.common import (
    Algorithm,
    evidence_headers,
    observation_context,
    sr_algorithm_id,
    sr_document,
)
from pacs_landmarks.landmark_sets import coded, load_landmark_set
from pacs_landmarks.sr_templates.uids import tracking_uid

PROCEDURE_CT_HEAD = ("303653007", "SCT", "CT of head")
_UCUM = {"mm": ("mm", "millimeter"), "deg": ("deg", "degree")}


@dataclass(frozen=True)
class MeasurementValue:
    name: str
    value: float
    unit: str  # UCUM: "mm" or "deg"
    typical: float | None
    range: tuple[float, float] | None
    points: dict[str, tuple[float, ...]]  # the (possibly derived) points it was computed from, mm (2D or 3D)
    definition: dict

    @property
    def outside_range(self) -> bool:
        return self.range is not None and not (self.range[0] <= self.value <= self.range[1])


def _point_table(by_name: dict[str, np.ndarray], set_def: dict) -> dict[str, np.ndarray]:
    """Points by name and abbreviation, plus the derived (bilateral mean) points of the set."""
    table: dict[str, np.ndarray] = {}
    for d in set_def["landmarks"]:
        if d["name"] in by_name:
            table[d["name"]] = table[d["abbreviation"]] = by_name[d["name"]]
    for name, parts in set_def.get("derived_points", {}).items():
        if all(p in table for p in parts):
            table[name] = np.mean([table[p] for p in parts], axis=0)
    return table


def _angle(u: np.ndarray, v: np.ndarray) -> float:
    c = float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


def _normal(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.cross(b - a, c - a)


def _evaluate(m: dict, p: dict[str, np.ndarray], done: dict[str, float]) -> float:
    kind = m["kind"]
    if kind == "distance":
        a, b = (p[n] for n in m["points"])
        return float(np.linalg.norm(b - a))
    if kind == "mean_distance":  # a bilateral length: the mean of the two sides
        return float(np.mean([np.linalg.norm(p[b] - p[a]) for a, b in m["pairs"]]))
    if kind == "angle":  # angle at the middle point
        a, vertex, b = (p[n] for n in m["points"])
        return _angle(a - vertex, b - vertex)
    if kind == "difference":
        first, second = m["of"]
        return done[first] - done[second]
    if kind == "plane_angle":  # acute angle between two planes, from their normals
        n1, n2 = (_normal(*(p[n] for n in plane)) for plane in m["planes"])
        ang = _angle(n1, n2)
        return min(ang, 180.0 - ang)
    if kind == "line_plane_angle":
        a, b = (p[n] for n in m["line"])
        ang = _angle(b - a, _normal(*(p[n] for n in m["plane"])))
        return abs(90.0 - ang)
    if kind == "line_angle":  # acute angle between two undirected lines
        (a, b), (c, d) = ((p[n] for n in line) for line in m["lines"])
        ang = _angle(b - a, d - c)
        return min(ang, 180.0 - ang)
    if kind == "vector_angle":  # angle between two directed segments, 0..180
        (a, b), (c, d) = ((p[n] for n in vec) for vec in m["vectors"])
        return _angle(b - a, d - c)
    if kind == "projected_distance":  # (to - from) along a line, or along its normal that points like a vector
        a, b = (p[n] for n in m["axis"])
        axis = (b - a) / np.linalg.norm(b - a)
        if "normal_toward" in m:
            c, d = (p[n] for n in m["normal_toward"])
            toward = d - c
            axis = toward - np.dot(toward, axis) * axis
            axis /= np.linalg.norm(axis)
        return float(np.dot(p[m["to"]] - p[m["from"]], axis))
    if kind == "point_line_distance":  # signed: positive on the side that the "positive" vector points to
        a, b = (p[n] for n in m["line"])
        c, d = (p[n] for n in m["positive"])
        u = (b - a) / np.linalg.norm(b - a)
        off = p[m["point"]] - a
        normal = off - np.dot(off, u) * u
        dist = float(np.linalg.norm(normal))
        return dist if np.dot(normal, d - c) >= 0 else -dist
    raise ValueError(f"unknown measurement kind {kind!r}")


def compute_measurements(landmarks: list[Landmark], set_name: str = "craniofacial16") -> list[MeasurementValue]:
    """Every measurement of the set whose landmarks are all present, in the order of the set file."""
    # Only found landmarks have a position to measure from (Landmark.status).
    return measurements_from_points({lm.name: lm.position_lps_mm for lm in landmarks
                                     if lm.status == FOUND and lm.position_lps_mm is not None}, set_name)


def compute_measurements_2d(
    points_px: dict[str, tuple[float, float] | None],
    set_name: str = "ceph19",
    pixel_spacing_mm: tuple[float, float] | None = None,
) -> list[MeasurementValue]:
    """Measurements of a 2D set from image points ``{name: (column, row)}`` (SCOORD pixels; None = missing).

    Points are first put in mm with ``pixel_spacing_mm`` = (between rows, between columns), as in Pixel
    Spacing (0028,0030), so that angles are right on non-square pixels too; the reported points are in mm
    (x = column, y = row). Without a spacing, angles are computed on square pixels and lengths are left
    out: a length in pixels is no cephalometric measurement. Signed measurements take their direction from
    the landmarks (anterior = S->N, inferior = N->Me), so a face looking left or right gives the same values.
    """
    scale = np.array([pixel_spacing_mm[1], pixel_spacing_mm[0]], float) if pixel_spacing_mm else np.ones(2)
    mm = {k: np.asarray(v, float) * scale for k, v in points_px.items() if v is not None}
    out = measurements_from_points(mm, set_name)
    return out if pixel_spacing_mm else [m for m in out if m.unit != "mm"]


def measurements_from_points(by_name: dict, set_name: str) -> list[MeasurementValue]:
    """Every measurement of the set whose points are all in ``by_name`` (landmark name -> coordinates in
    mm, 2D or 3D), in the order of the set file."""
    set_def = load_landmark_set(set_name)
    points = _point_table({k: np.asarray(v, float) for k, v in by_name.items()}, set_def)
    done: dict[str, float] = {}
    out: list[MeasurementValue] = []
    for m in set_def.get("measurements", []):
        if not all(n in points for n in m["points"]) or not all(o in done for o in m.get("of", [])):
            continue
        value = _evaluate(m, points, done)
        done[m["name"]] = value
        out.append(
            MeasurementValue(
                name=m["name"],
                value=value,
                unit=m["unit"],
                typical=m.get("typical"),
                range=tuple(m["range"]) if "range" in m else None,  # type: ignore[arg-type]
                points={n: tuple(float(x) for x in points[n]) for n in m["points"]},  # type: ignore[misc]
                definition=m,
            )
        )
    return out


@dataclass(frozen=True)
class OmittedMeasurement:
    """A measurement of the set that could not be computed, and why (its landmarks that are not found)."""

    name: str
    missing: tuple[tuple[str, str, str], ...]  # (landmark, status, reason)
    definition: dict

    @property
    def reason(self) -> str:
        parts = [f"{n} {status.replace('_', ' ')}" + (f" ({why})" if why and status == "not_found" else "")
                 for n, status, why in self.missing]
        return "not computed: " + "; ".join(parts)


def _landmarks_of(m: dict, set_def: dict, by_measure: dict[str, dict]) -> list[str]:
    """Landmark names a measurement needs (derived points and the measurements it is a difference of
    expanded)."""
    abbrev = {d["abbreviation"]: d["name"] for d in set_def["landmarks"]}
    derived = set_def.get("derived_points", {})
    names: list[str] = []

    def add(p: str) -> None:
        if p in derived:
            for q in derived[p]:
                add(q)
        else:
            n = abbrev.get(p, p)
            if n not in names:
                names.append(n)

    for p in m.get("points", []):
        add(p)
    for o in m.get("of", []):
        for n in _landmarks_of(by_measure[o], set_def, by_measure):
            if n not in names:
                names.append(n)
    return names


def omitted_measurements(landmarks: list[Landmark], set_name: str = "craniofacial16") -> list[OmittedMeasurement]:
    """The set's measurements that ``compute_measurements`` leaves out, each with the landmarks it lacks."""
    set_def = load_landmark_set(set_name)
    done = {mv.name for mv in compute_measurements(landmarks, set_name)}
    by_name = {lm.name: lm for lm in landmarks}
    by_measure = {m["name"]: m for m in set_def.get("measurements", [])}
    out = []
    for m in set_def.get("measurements", []):
        if m["name"] in done:
            continue
        missing = []
        for n in _landmarks_of(m, set_def, by_measure):
            lm = by_name.get(n)
            if lm is None:
                missing.append((n, "not_found", "not reported"))
            elif lm.status != FOUND:
                missing.append((n, lm.status, lm.reason))
        out.append(OmittedMeasurement(m["name"], tuple(missing), m))
    return out


def build_measurements_sr(
    volume: Volume, landmarks: list[Landmark], algorithm: Algorithm, measurements: list[MeasurementValue] | None = None,
    predecessors: list[Dataset] = (),
) -> Dataset:
    """Comprehensive 3D SR, TID 1500 (PS3.16): one TID 1501 group per derived measurement, each a TID 300
    numeric in UCUM units, INFERRED FROM a SCOORD3D MULTIPOINT of the points it used. ``predecessors``: as
    for the landmark SR (``common.sr_document``)."""
    import highdicom as hd
    from highdicom.sr import (
        CodedConcept,
        CoordinatesForMeasurement3D,
        Measurement,
        MeasurementReport,
        MeasurementsAndQualitativeEvaluations,
        TrackingIdentifier,
    )

    if measurements is None:
        measurements = compute_measurements(landmarks, algorithm.landmark_set)
    omitted = omitted_measurements(landmarks, algorithm.landmark_set)
    if not measurements and not omitted:
        raise ValueError("no measurement can be derived from these landmarks")
    series = volume.series_instance_uid
    groups = []
    for mv in measurements:
        unit = _UCUM[mv.unit]
        coords = np.asarray(list(mv.points.values()), dtype=float)
        num = Measurement(
            name=coded(mv.definition["code"]),
            value=round(mv.value, 4),
            unit=CodedConcept(unit[0], "UCUM", unit[1]),
            algorithm_id=sr_algorithm_id(algorithm),
            referenced_coordinates=[
                CoordinatesForMeasurement3D(
                    graphic_type=hd.sr.GraphicTypeValues3D.MULTIPOINT,
                    graphic_data=coords,
                    frame_of_reference_uid=volume.frame_of_reference_uid,
                )
            ],
        )
        groups.append(
            MeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(
                    uid=tracking_uid(series, algorithm.name, algorithm.version, "measurement:" + mv.name),
                    identifier=mv.name,
                ),
                algorithm_id=sr_algorithm_id(algorithm),
                measurements=[num],
            )
        )
    groups += omitted_groups(omitted, algorithm, series)
    report = MeasurementReport(
        observation_context=observation_context(algorithm),
        procedure_reported=CodedConcept(*PROCEDURE_CT_HEAD),
        imaging_measurements=groups,
    )
    return sr_document(report, evidence_headers(volume.source_headers), "measurements-sr", algorithm, volume,
                       predecessors)


VALUE_INDETERMINATE = ("114011", "DCM", "Value indeterminate")
COMMENT = ("121106", "DCM", "Comment")


def omitted_groups(omitted: list[OmittedMeasurement], algorithm: Algorithm, series: str) -> list:
    """One TID 1501 group per omitted measurement: Qualitative Evaluation (TID 1501 row 11) = the
    measurement's concept with value DCM 114011 "Value indeterminate", and a DCM 121106 "Comment" naming the
    landmarks it lacks and why."""
    from highdicom.sr import (CodedConcept, MeasurementsAndQualitativeEvaluations, QualitativeEvaluation,
                              TextContentItem, TrackingIdentifier)

    groups = []
    for om in omitted:
        group = MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(
                uid=tracking_uid(series, algorithm.name, algorithm.version, "measurement:" + om.name),
                identifier=om.name),
            algorithm_id=sr_algorithm_id(algorithm),
            qualitative_evaluations=[QualitativeEvaluation(coded(om.definition["code"]),
                                                           CodedConcept(*VALUE_INDETERMINATE))],
        )
        group[0].ContentSequence.append(
            TextContentItem(name=CodedConcept(*COMMENT), value=om.reason[:1024], relationship_type="CONTAINS"))
        groups.append(group)
    return groups
