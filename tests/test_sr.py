"""Landmark SR + measurements SR: valid DICOM (dciodvfy), parsed by dcmtk, exact round trip, right values."""
from __future__ import annotations

import subprocess

import numpy as np
import pydicom
import pytest
from sr_helpers import GEOMETRIES, make_landmarks, make_series

from conftest import dcmtk
from pacs_landmarks.inference.landmark import Landmark
from pacs_landmarks.sr_templates import read_landmark_sr
from pacs_landmarks.sr_templates.common import Algorithm
from pacs_landmarks.sr_templates.geometry import source_planes
from pacs_landmarks.landmark_sets import landmark_names, load_landmark_set
from pacs_landmarks.sr_templates.landmark_sr import build_landmark_sr
from pacs_landmarks.sr_templates.measurements import build_measurements_sr, compute_measurements

ALG = Algorithm("test-model", "1.2.3")
LOCAL_SCHEME = "99PACSLMK"  # dciodvfy warns about designators it does not know; that is expected


def _save(ds, path):
    ds.save_as(path, enforce_file_format=True)
    return path


def _groups(ds):
    report = ds.ContentSequence
    container = next(i for i in report if i.ValueType == "CONTAINER" and i.ConceptNameCodeSequence[0].CodeValue == "126010")
    return list(container.ContentSequence)


def _item(group, value_type, code=None):
    for it in group.ContentSequence:
        if it.ValueType == value_type and (code is None or it.ConceptNameCodeSequence[0].CodeValue == code):
            return it
    return None


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_landmark_sr_valid_and_round_trips(tmp_path, validate_dicom, geometry):
    _, volume = make_series(geometry, seed=1)
    landmarks = make_landmarks(volume, seed=2)
    path = _save(build_landmark_sr(volume, landmarks, ALG), tmp_path / "sr.dcm")

    warnings = validate_dicom(path)
    assert all(LOCAL_SCHEME in w for w in warnings), warnings
    dump = subprocess.run([dcmtk("dsrdump"), str(path)], capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0, dump.stderr
    assert "Imaging Measurement Report" in dump.stdout and "Anatomical point" in dump.stdout

    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert (ds.PreliminaryFlag, ds.VerificationFlag) == ("PRELIMINARY", "UNVERIFIED")
    assert ds.StudyInstanceUID == volume.study_instance_uid and ds.PatientID == "PH0001"
    assert ds.SeriesNumber == 7701 and ds.SeriesDescription == "AI Landmarks"
    assert ds.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == LOCAL_SCHEME

    # highdicom parses it back as a TID 1500 report: 2 planar ROI groups per tracking UID.
    import highdicom as hd

    parsed = hd.sr.srread(path).content.get_planar_roi_measurement_groups()
    assert len(parsed) == 2 * len(landmarks) and len({g.tracking_uid for g in parsed}) == len(landmarks)

    back = read_landmark_sr(ds)
    assert [lm.name for lm in back] == landmark_names()
    for want, got in zip(landmarks, back):
        assert np.allclose(want.position_lps_mm, got.position_lps_mm, atol=0.01)
        assert got.confidence == pytest.approx(want.confidence, abs=1e-4)

    # Two groups per landmark with the same tracking identifier + UID: a 2D point on the nearest source slice
    # that projects onto the same in-plane position (first: the one OHIF draws), then the 3D point.
    groups = _groups(ds)
    assert len(groups) == 2 * len(landmarks)
    planes = {p.source.sop_instance_uid: p for p in source_planes(volume)}
    for lm, g2, g3 in zip(landmarks, groups[0::2], groups[1::2]):
        assert _item(g2, "SCOORD3D") is None and _item(g3, "SCOORD") is None
        assert _item(g3, "TEXT", "112039").TextValue == lm.name == _item(g2, "TEXT", "112039").TextValue
        assert _item(g3, "UIDREF", "112040").UID == _item(g2, "UIDREF", "112040").UID
        assert _item(g3, "SCOORD3D").ReferencedFrameOfReferenceUID == volume.frame_of_reference_uid
        scoord = _item(g2, "SCOORD")
        ref = scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        plane = planes[ref]
        p = np.asarray(lm.position_lps_mm)
        assert abs(plane.distance(p)) == pytest.approx(min(abs(q.distance(p)) for q in planes.values()))
        column, row = (float(v) - 0.5 for v in scoord.GraphicData)
        on_plane = plane.pixel_lps(column, row)
        assert np.allclose(on_plane, p - plane.distance(p) * plane.normal, atol=1e-3)


def test_highdicom_reads_every_point_as_3d_slicer_does(tmp_path):
    """3D Slicer's QuantitativeReporting reads a TID 1500 SR through highdicom: planar ROI groups whose
    reference is (DCM 111030) Image Region and whose graphic type is a SCOORD3D POINT, one markups point per
    group, named by the tracking identifier. Every landmark must come out, once, at its position; the 2D
    groups must come out too (each on the slice it references) and the landmark's first Finding Site must
    carry its name, the label OHIF shows."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    _, volume = make_series("tilted", seed=3)
    landmarks = make_landmarks(volume, seed=4)
    path = _save(build_landmark_sr(volume, landmarks, ALG), tmp_path / "sr.dcm")
    report = hd.sr.srread(path).content
    points3d = report.get_planar_roi_measurement_groups(
        reference_type=codes.DCM.ImageRegion, graphic_type=hd.sr.GraphicTypeValues3D.POINT
    )
    assert [g.tracking_identifier for g in points3d] == [lm.name for lm in landmarks]
    for lm, group in zip(landmarks, points3d):
        assert group.roi.frame_of_reference_uid == volume.frame_of_reference_uid
        assert np.allclose(group.roi.value, [lm.position_lps_mm], atol=1e-3)
        assert group.finding_type == codes.SCT.AnatomicalPoint
        assert group.finding_sites[0].value.meaning == lm.name
        (confidence,) = group.get_measurements()
        assert float(confidence.value) == pytest.approx(lm.confidence, abs=1e-4)
    points2d = report.get_planar_roi_measurement_groups(
        reference_type=codes.DCM.ImageRegion, graphic_type=hd.sr.GraphicTypeValues.POINT
    )
    sources = {p.source.sop_instance_uid for p in source_planes(volume)}
    assert [g.tracking_identifier for g in points2d] == [lm.name for lm in landmarks]
    assert [g.tracking_uid for g in points2d] == [g.tracking_uid for g in points3d]
    for group in points2d:
        image = group.roi.ContentSequence[0].ReferencedSOPSequence[0]  # the IMAGE child of the SCOORD
        assert image.ReferencedSOPInstanceUID in sources
        assert group.finding_sites[0].value.meaning == group.tracking_identifier


def test_result_uids_follow_the_input():
    """Same source instances + model -> same UIDs (in any order); another set of instances of the same series
    (it grew) or another model version -> new UIDs."""
    import dataclasses

    _, volume = make_series("axial")
    landmarks = make_landmarks(volume)
    a = build_landmark_sr(volume, landmarks, ALG)
    shuffled = dataclasses.replace(volume, source_headers=list(reversed(volume.source_headers)))
    b = build_landmark_sr(shuffled, landmarks, ALG)
    c = build_landmark_sr(volume, landmarks, Algorithm("test-model", "1.2.4"))
    grown = dataclasses.replace(volume, source_headers=volume.source_headers[:-1])
    d = build_landmark_sr(grown, landmarks, ALG)
    m = build_measurements_sr(volume, landmarks, ALG)
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    for other in (c, d):
        assert a.SOPInstanceUID != other.SOPInstanceUID and a.SeriesInstanceUID != other.SeriesInstanceUID
    assert len({a.SOPInstanceUID, m.SOPInstanceUID, a.SeriesInstanceUID, m.SeriesInstanceUID}) == 4


def test_predecessor_documents(tmp_path, validate_dicom):
    """A new SR names the one it replaces (PS3.3 C.17.2.3), never itself: predecessors are given newest first,
    and one with the document's own UID (the same input again) is passed over."""
    import dataclasses

    from pacs_landmarks.sr_templates.common import reference

    _, volume = make_series("axial")
    landmarks = make_landmarks(volume)
    first = build_landmark_sr(dataclasses.replace(volume, source_headers=volume.source_headers[:30]), landmarks, ALG)
    assert "PredecessorDocumentsSequence" not in first
    second = build_landmark_sr(volume, landmarks, ALG, predecessors=[reference(first)])
    (study,) = second.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == first.StudyInstanceUID
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    (item,) = series.ReferencedSOPSequence
    assert (item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID) == (first.SOPClassUID, first.SOPInstanceUID)
    validate_dicom(_save(second, tmp_path / "second.dcm"))
    again = build_landmark_sr(volume, landmarks, ALG, predecessors=[reference(second), reference(first)])
    assert again.SOPInstanceUID == second.SOPInstanceUID
    assert again.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0] \
        .ReferencedSOPInstanceUID == first.SOPInstanceUID
    msr = build_measurements_sr(volume, landmarks, ALG, predecessors=[reference(first)])
    assert msr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0] \
        .ReferencedSOPInstanceUID == first.SOPInstanceUID


def _unmark(ds):
    for elem in ds.elements():
        if elem.VR == "SQ":
            for item in elem.value:
                item.set_original_encoding(None, None, "")
                _unmark(item)


def test_encoding_marks_do_not_change_the_bytes(tmp_path):
    """finish() marks nested items as Explicit VR Little Endian to spare pydicom's writer its per-item
    ambiguous-VR pass; the file must be byte for byte what the unmarked tree gives."""
    _, volume = make_series("tilted")
    landmarks = make_landmarks(volume)
    for ds in (build_landmark_sr(volume, landmarks, ALG), build_measurements_sr(volume, landmarks, ALG)):
        item = ds.ContentSequence[0]
        assert (item.original_encoding, item.original_character_set) == ((False, True), ds._character_set)
        marked = _save(ds, tmp_path / "marked.dcm").read_bytes()
        _unmark(ds)
        assert ds.ContentSequence[0].original_encoding == (None, None)
        assert _save(ds, tmp_path / "plain.dcm").read_bytes() == marked


def test_source_planes_are_per_volume():
    _, a = make_series("axial")
    _, b = make_series("tilted")
    planes_a = source_planes(a)
    assert source_planes(a) is planes_a  # the SR and the SEG of one series share them
    planes_b = source_planes(b)
    assert planes_b is not planes_a and planes_b[0].source in b.slice_sources
    assert source_planes(a) is not planes_a  # only the last volume is kept
    assert [p.source for p in source_planes(a)] == [p.source for p in planes_a]


def _sagittal(angle_deg: float, length: float, origin: np.ndarray) -> np.ndarray:
    """A point ``length`` mm from ``origin`` at ``angle_deg`` from +y (posterior), turning towards -y via -z."""
    a = np.radians(angle_deg)
    return origin + length * np.array([0.0, np.cos(a), -np.sin(a)])


def test_measurements_from_known_geometry():
    """Landmarks placed so that each measurement has a value known by construction."""
    n = np.array([0.0, -80.0, 20.0])
    s = n + np.array([0.0, 70.0, 0.0])  # S-N = 70 mm along +y
    pts = {
        "Nasion": n, "Sella": s,
        "A point": _sagittal(83.0, 50.0, n),  # SNA = 83
        "B point": _sagittal(79.5, 90.0, n),  # SNB = 79.5 -> ANB = 3.5
        "Menton": n + np.array([0.0, 10.0, -118.0]),
        "Porion R": np.array([-57.0, -10.0, 0.0]), "Porion L": np.array([57.0, -10.0, 0.0]),
        "Orbitale R": np.array([-32.0, -75.0, 0.0]), "Orbitale L": np.array([32.0, -75.0, 0.0]),
        "Basion": n + np.array([0.0, 100.0, -25.0]),
    }
    # Mandibular plane tilted 27 degrees from the (horizontal) FH plane, through Menton.
    me = pts["Menton"]
    go_y = 70.0
    pts["Gonion R"] = me + np.array([-47.0, go_y, go_y * np.tan(np.radians(27.0))])
    pts["Gonion L"] = me + np.array([47.0, go_y, go_y * np.tan(np.radians(27.0))])
    landmarks = [Landmark(k, tuple(v)) for k, v in pts.items()]
    values = {m.name: m for m in compute_measurements(landmarks)}
    assert values["SNA angle"].value == pytest.approx(83.0, abs=1e-6)
    assert values["SNB angle"].value == pytest.approx(79.5, abs=1e-6)
    assert values["ANB angle"].value == pytest.approx(3.5, abs=1e-6)
    assert values["S-N length"].value == pytest.approx(70.0)
    assert values["N-Me anterior face height"].value == pytest.approx(np.hypot(10, 118))
    side = np.linalg.norm([47.0, go_y, go_y * np.tan(np.radians(27.0))])
    assert values["Go-Me length"].value == pytest.approx(side)  # mean of the two (equal) sides
    assert values["FH to mandibular plane angle"].value == pytest.approx(27.0, abs=1e-6)
    assert values["SN to FH angle"].value == pytest.approx(0.0, abs=1e-6)
    assert values["Inter-porion distance"].value == pytest.approx(114.0)
    assert values["Bigonial width"].value == pytest.approx(94.0)
    assert not values["SNA angle"].outside_range and values["SN to FH angle"].outside_range
    # Every measurement of the set needs only landmarks we have: all 13 are present.
    assert len(values) == len(load_landmark_set()["measurements"])


def test_measurements_sr_valid(tmp_path, validate_dicom):
    _, volume = make_series("tilted", seed=3)
    landmarks = make_landmarks(volume, seed=3)
    values = compute_measurements(landmarks)
    path = _save(build_measurements_sr(volume, landmarks, ALG, values), tmp_path / "m.dcm")
    warnings = validate_dicom(path)
    assert all(LOCAL_SCHEME in w for w in warnings), warnings
    dump = subprocess.run([dcmtk("dsrdump"), str(path)], capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0, dump.stderr
    ds = pydicom.dcmread(path)
    assert ds.SeriesNumber == 7702 and ds.SeriesDescription == "AI Cephalometry"
    nums = {}
    for group in _groups(ds):
        num = _item(group, "NUM")
        unit = num.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0]
        nums[_item(group, "TEXT", "112039").TextValue] = (float(num.MeasuredValueSequence[0].NumericValue), unit.CodeValue)
        assert unit.CodingSchemeDesignator == "UCUM"
        inferred = [i for i in num.ContentSequence if i.ValueType == "SCOORD3D"]
        assert len(inferred) == 1 and inferred[0].GraphicType == "MULTIPOINT"
        assert inferred[0].RelationshipType == "INFERRED FROM"
    for v in values:
        assert nums[v.name][0] == pytest.approx(v.value, abs=1e-3) and nums[v.name][1] == v.unit
    with pytest.raises(ValueError, match="no 3D landmark"):
        read_landmark_sr(ds)


def test_reads_a_foreign_tid1500_sr():
    """An SR written by another tool (e.g. a viewer): abbreviations as tracking identifiers, no finding sites."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    datasets, volume = make_series("axial", with_pixels=False)
    groups = []
    # A viewer-style group: the tool name as tracking identifier, the user's label as a free-text Finding.
    probe = hd.sr.CodedConcept("CORNERSTONEFREETEXT", "CORNERSTONEJS", "Gonion R")
    for name, point, finding in [
        ("N", (1.0, -80.0, 20.0), None),
        ("Menton", (0.5, -70.0, -98.0), None),
        ("Cornerstone3DTools@^0.1.0:Probe", (-45.0, -10.0, -60.0), probe),
        ("Unknown thing", (0.0, 0.0, 0.0), None),
    ]:
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                finding_type=finding,
                tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=name),
                referenced_region=hd.sr.ImageRegion3D(
                    graphic_type="POINT", graphic_data=np.array([point]), frame_of_reference_uid=volume.frame_of_reference_uid
                ),
            )
        )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_person_context=hd.sr.ObserverContext(
                observer_type=codes.cid270.Person,
                observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(name="Reader^A"),
            )
        ),
        procedure_reported=codes.cid100.ComputedTomographyOfHead if hasattr(codes.cid100, "ComputedTomographyOfHead")
        else hd.sr.CodedConcept("303653007", "SCT", "CT of head"),
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=volume.source_headers, content=report, series_instance_uid=hd.UID(), series_number=5,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="viewer",
    )
    back = read_landmark_sr(sr)
    assert [(lm.name, lm.position_lps_mm) for lm in back] == [
        ("Nasion", (1.0, -80.0, 20.0)), ("Menton", (0.5, -70.0, -98.0)), ("Gonion R", (-45.0, -10.0, -60.0)),
        ("Unknown thing", (0.0, 0.0, 0.0)),
    ]


def test_read_rejects_non_sr():
    datasets, _ = make_series("axial", with_pixels=False)
    with pytest.raises(ValueError, match="not a structured report"):
        read_landmark_sr(datasets[0])
