"""The landmark presentation state (GSPS): valid (dciodvfy), read by dcmtk, every point where the SR puts it."""
from __future__ import annotations

import re
import subprocess
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from sr_helpers import make_landmarks, make_series

from conftest import require_tool
from pacs_landmarks.sr_templates.common import Algorithm
from pacs_landmarks.sr_templates.geometry import source_planes
from pacs_landmarks.sr_templates.gsps import Mark, build_gsps, drawn_landmarks, landmark_marks
from pacs_landmarks.sr_templates.landmark_sr import build_landmark_sr

ALG = Algorithm("test-model", "1.2.3")
LOCAL_SCHEME = "99PACSLMK"


def sr_points(sr) -> dict[str, tuple[str, np.ndarray]]:
    """Landmark name -> (referenced SOP Instance UID, SCOORD pixel point) of the SR's 2D groups."""
    report = sr.ContentSequence
    container = next(i for i in report if i.ValueType == "CONTAINER" and i.ConceptNameCodeSequence[0].CodeValue == "126010")
    out = {}
    for group in container.ContentSequence:
        name = next(i.TextValue for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "112039")
        for item in group.ContentSequence:
            if item.ValueType == "SCOORD":
                ref = item.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                out[name] = (str(ref), np.asarray(item.GraphicData, float))
    return out


def gsps_points(ps) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
    """Text -> (referenced image, POINT coordinates, text box top left) of the GSPS's LANDMARKS layer."""
    out = {}
    for ann in ps.GraphicAnnotationSequence:
        assert ann.GraphicLayer == "LANDMARKS"
        (ref,) = ann.ReferencedImageSequence
        points = [g for g in ann.GraphicObjectSequence]
        texts = [t for t in ann.TextObjectSequence]
        assert len(points) == len(texts)
        for g, t in zip(points, texts):
            assert g.GraphicType == "POINT" and g.GraphicAnnotationUnits == "PIXEL"
            out[t.UnformattedTextValue] = (str(ref.ReferencedSOPInstanceUID), np.asarray(g.GraphicData, float),
                                           np.asarray(t.BoundingBoxTopLeftHandCorner, float))
    return out


@pytest.mark.parametrize("geometry", ["axial", "tilted", "anisotropic"])
def test_gsps_points_are_the_sr_points(tmp_path, validate_dicom, geometry):
    datasets, volume = make_series(geometry, seed=3)
    landmarks = make_landmarks(volume, seed=4)
    sr = build_landmark_sr(volume, landmarks, ALG)
    path = tmp_path / "gsps.dcm"
    build_gsps(volume, landmark_marks(volume, landmarks), ALG).save_as(path, enforce_file_format=True)
    warnings = validate_dicom(path)
    # These test series have no Body Part Examined: Laterality is then present and empty (unknown), which
    # dciodvfy accepts with a warning (absent, it is an error).
    assert all(LOCAL_SCHEME in w or "<Laterality>" in w for w in warnings), warnings

    ps = pydicom.dcmread(path)
    assert ps.SOPClassUID == "1.2.840.10008.5.1.4.1.1.11.1" and ps.Modality == "PR"
    assert (ps.SeriesNumber, ps.SeriesDescription) == (7704, "AI Landmarks GSPS")
    assert ps.StudyInstanceUID == volume.study_instance_uid and ps.PatientID == "PH0001"
    assert [layer.GraphicLayer for layer in ps.GraphicLayerSequence] == ["LANDMARKS"]
    # Every source image is referenced, so a viewer applies the state to the whole series.
    referenced = {str(i.ReferencedSOPInstanceUID) for i in ps.ReferencedSeriesSequence[0].ReferencedImageSequence}
    assert referenced == {str(d.SOPInstanceUID) for d in datasets}

    want, got = sr_points(sr), gsps_points(ps)
    assert set(got) == set(want) == {lm.name for lm in landmarks}
    for name, (ref, point) in want.items():
        assert got[name][0] == ref, name
        assert np.allclose(got[name][1], point, atol=1e-3), (name, got[name][1], point)
        box = got[name][2]  # the name is drawn beside the point, inside the image
        assert abs(box[1] - point[1]) <= 12 and 0 <= box[0] <= volume.shape[2]


def test_dcmtk_reads_each_annotation_on_its_image(tmp_path):
    """dcmtk's presentation state reader (dcmp2pgm) attaches the state to each referenced slice and lists the
    point and name drawn there. dcmp2pgm renders VOI, shutters and overlays only, not graphic annotations
    (checked: the bitmap is the same with and without the state), so no rendered pixels are compared."""
    datasets, volume = make_series("axial", seed=5)
    landmarks = make_landmarks(volume, seed=6)
    ps_path = tmp_path / "gsps.dcm"
    build_gsps(volume, landmark_marks(volume, landmarks), ALG).save_as(ps_path, enforce_file_format=True)
    files = {}
    for n, ds in enumerate(datasets):
        files[str(ds.SOPInstanceUID)] = tmp_path / f"im{n}.dcm"
        ds.save_as(files[str(ds.SOPInstanceUID)], enforce_file_format=True)
    by_image: dict[str, list] = {}
    for name, (ref, point, _) in gsps_points(pydicom.dcmread(ps_path)).items():
        by_image.setdefault(ref, []).append((name, point))
    for ref, marks in by_image.items():
        proc = subprocess.run([require_tool("dcmp2pgm"), "-v", "-p", str(ps_path), str(files[ref]), str(tmp_path / "o.pgm")],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        log = proc.stdout + proc.stderr
        assert "Graphic Layer #1 [LANDMARKS]" in log
        texts = re.findall(r'text \d+: "([^"]*)"', log)
        coords = [np.array(c.split("\\"), float) for c in re.findall(r"coordinates: ([-\d.e]+\\[-\d.e]+)", log)]
        assert sorted(texts) == sorted(name for name, _ in marks)
        for name, point in marks:  # dcmtk prints 6 significant digits
            assert any(np.allclose(c, point, atol=1e-3 * max(1.0, float(np.max(np.abs(point))))) for c in coords), name


def test_tracing_layer_polylines_with_values(tmp_path, validate_dicom):
    """The builder's second layer (for cephalogram tracings): POLYLINEs with their value as text, drawn
    under the landmarks; same image references as any mark."""
    _, volume = make_series("axial", seed=7)
    landmarks = {lm.name: lm for lm in make_landmarks(volume, seed=8)}
    plane = source_planes(volume)[len(source_planes(volume)) // 2]
    line = Mark.polyline("TRACING", plane, [landmarks["Sella"].position_lps_mm, landmarks["Nasion"].position_lps_mm],
                         "S-N 71.2 mm")
    marks = landmark_marks(volume, list(landmarks.values())) + [line]
    path = tmp_path / "gsps.dcm"
    build_gsps(volume, marks, ALG).save_as(path, enforce_file_format=True)
    validate_dicom(path)
    ps = pydicom.dcmread(path)
    assert [(la.GraphicLayer, la.GraphicLayerOrder) for la in ps.GraphicLayerSequence] == [("TRACING", 1), ("LANDMARKS", 2)]
    (tracing,) = [a for a in ps.GraphicAnnotationSequence if a.GraphicLayer == "TRACING"]
    assert tracing.ReferencedImageSequence[0].ReferencedSOPInstanceUID == plane.source.sop_instance_uid
    (obj,) = tracing.GraphicObjectSequence
    assert obj.GraphicType == "POLYLINE" and obj.NumberOfGraphicPoints == 2
    assert np.allclose(np.reshape(obj.GraphicData, (2, 2))[0], line.points[0], atol=1e-3)
    assert tracing.TextObjectSequence[0].UnformattedTextValue == "S-N 71.2 mm"
    with pytest.raises(ValueError, match="unknown graphic layer"):
        build_gsps(volume, [Mark("NOTES", plane, "POINT", ((1.0, 1.0),), "x")], ALG)


def test_only_found_landmarks_are_drawn():
    found = SimpleNamespace(name="Nasion", position_lps_mm=(0.0, 0.0, 0.0), status="found")
    missing = SimpleNamespace(name="Sella", position_lps_mm=(0.0, 0.0, 0.0), status="not_found")
    outside = SimpleNamespace(name="Menton", position_lps_mm=(0.0, 0.0, 0.0), status="outside_field_of_view")
    plain = SimpleNamespace(name="Basion", position_lps_mm=(0.0, 0.0, 0.0))  # no status: drawn
    assert [lm.name for lm in drawn_landmarks([found, missing, outside, plain])] == ["Nasion", "Basion"]


def test_a_point_off_its_slice_is_not_drawn():
    _, volume = make_series("axial", seed=9)
    landmarks = make_landmarks(volume, seed=10)
    far = landmarks[0].__class__("Sella", (1000.0, 0.0, 0.0))  # 1 m to the patient's left: outside every slice
    names = [m.text for m in landmark_marks(volume, [far, *landmarks[1:]])]
    assert "Sella" not in names and len(names) == len(landmarks) - 1


def test_no_gsps_for_slices_that_differ_in_rescale(caplog, validate_dicom, tmp_path):
    """One presentation state has one Modality LUT: for slices stored with different Rescale Intercepts no
    GSPS is made (with a warning), rather than one showing some slices wrong; the same slices with a common
    rescale and window get it, with that rescale and window."""
    _, volume = make_series("axial", seed=11)
    landmarks = make_landmarks(volume, seed=12)
    for header in volume.source_headers:
        header.WindowCenter, header.WindowWidth = 40, 400
    ps = build_gsps(volume, landmark_marks(volume, landmarks), ALG)
    assert (ps.RescaleIntercept, ps.RescaleSlope, ps.RescaleType) == (-1024, 1, "HU")
    assert (ps.SoftcopyVOILUTSequence[0].WindowCenter, ps.SoftcopyVOILUTSequence[0].WindowWidth) == (40, 400)
    ps.save_as(tmp_path / "gsps.dcm", enforce_file_format=True)
    validate_dicom(tmp_path / "gsps.dcm")

    volume.source_headers[5].RescaleIntercept = 0
    with caplog.at_level("WARNING"):
        assert build_gsps(volume, landmark_marks(volume, landmarks), ALG) is None
    assert "differ in Rescale" in caplog.text
