"""Landmarks that are not found: stated in the landmark SR (no point), measurements left out with the reason,
no SEG segment, all read back; nothing found -> no result objects (or, on request, a report that says so)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pydicom
import pytest
from sr_helpers import make_landmarks, make_series

from pacs_landmarks.inference.landmark import FOUND, NOT_FOUND, OUTSIDE_FIELD_OF_VIEW
from pacs_landmarks.landmark_sets import landmark_names
from pacs_landmarks.pipeline import build_outputs
from pacs_landmarks.sr_templates import read_landmark_sr
from pacs_landmarks.sr_templates.common import Algorithm
from pacs_landmarks.sr_templates.landmark_sr import build_landmark_sr
from pacs_landmarks.sr_templates.measurements import build_measurements_sr, omitted_measurements
from pacs_landmarks.sr_templates.seg import build_landmark_seg

ALG = Algorithm("test-model", "1.2.3")
JAW = ("B point", "Pogonion", "Menton", "Gnathion", "Gonion R", "Gonion L")


def _mixed(volume):
    out = []
    for lm in make_landmarks(volume, seed=3):
        if lm.name in JAW:
            lm = replace(lm, position_lps_mm=None, status=OUTSIDE_FIELD_OF_VIEW, reason="not in the scanned volume")
        elif lm.name == "Porion R":
            lm = replace(lm, position_lps_mm=None, status=NOT_FOUND, reason="implausible position")
        out.append(lm)
    return out


def _coords(ds):
    """Every SCOORD / SCOORD3D item's graphic data in the document."""
    found = []

    def walk(items):
        for it in items or []:
            if it.get("ValueType") in ("SCOORD", "SCOORD3D"):
                found.append(it)
            walk(it.get("ContentSequence"))

    walk(ds.ContentSequence)
    return found


def _texts(ds) -> str:
    """Text values and code meanings of the whole content tree, one per line."""
    out = []

    def walk(items):
        for it in items or []:
            if "TextValue" in it:
                out.append(str(it.TextValue))
            for seq in ("ConceptCodeSequence", "ConceptNameCodeSequence"):
                if seq in it:
                    out.append(str(it[seq][0].CodeMeaning))
            walk(it.get("ContentSequence"))

    walk(ds.ContentSequence)
    return "\n".join(out)


def test_landmark_sr_states_missing_landmarks_and_reads_them_back(tmp_path, validate_dicom):
    _, volume = make_series("axial", seed=1)
    landmarks = _mixed(volume)
    ds = build_landmark_sr(volume, landmarks, ALG)
    path = tmp_path / "sr.dcm"
    ds.save_as(path, enforce_file_format=True)
    warnings = validate_dicom(path)
    assert all("99PACSLMK" in w for w in warnings), warnings
    ds = pydicom.dcmread(path)
    n_found = sum(lm.status == FOUND for lm in landmarks)
    assert len(_coords(ds)) == 2 * n_found  # a 3D and a 2D point per found landmark, none for the others
    text = _texts(ds)
    assert "Not visualized" in text and "Presence Undetermined" in text

    assert [lm.name for lm in read_landmark_sr(ds)] == [lm.name for lm in landmarks if lm.status == FOUND]
    back = read_landmark_sr(ds, include_missing=True)
    assert [lm.name for lm in back] == landmark_names()
    by = {lm.name: lm for lm in back}
    for name in JAW:
        assert by[name].status == OUTSIDE_FIELD_OF_VIEW and by[name].position_lps_mm is None
    assert by["Porion R"].status == NOT_FOUND and by["Porion R"].reason == "implausible position"
    assert by["Nasion"].status == FOUND


def test_measurements_sr_says_what_it_left_out(tmp_path, validate_dicom):
    _, volume = make_series("axial", seed=1)
    landmarks = _mixed(volume)
    omitted = omitted_measurements(landmarks)
    names = {om.name for om in omitted}
    assert omitted and all(om.missing for om in omitted)
    menton = [om for om in omitted if any(n == "Menton" for n, _, _ in om.missing)]
    assert menton and "Menton outside field of view" in menton[0].reason
    ds = build_measurements_sr(volume, landmarks, ALG)
    path = tmp_path / "m.dcm"
    ds.save_as(path, enforce_file_format=True)
    warnings = validate_dicom(path)
    assert all("99PACSLMK" in w for w in warnings), warnings
    text = _texts(pydicom.dcmread(path))
    assert "Value indeterminate" in text and menton[0].reason in text
    for name in names:
        assert name in text


def test_seg_has_segments_for_found_landmarks_only(tmp_path, validate_dicom):
    _, volume = make_series("axial", seed=1)
    landmarks = _mixed(volume)
    seg = build_landmark_seg(volume, landmarks, ALG)
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    validate_dicom(path)
    labels = [s.SegmentLabel for s in pydicom.dcmread(path).SegmentSequence]
    assert len(labels) == sum(lm.status == FOUND for lm in landmarks)
    assert not any(name in label for label in labels for name in JAW)


def test_nothing_found_makes_no_objects_unless_asked(tmp_path, validate_dicom):
    _, volume = make_series("axial", seed=1)
    none = [replace(lm, position_lps_mm=None, status=NOT_FOUND, reason="low confidence")
            for lm in make_landmarks(volume, seed=3)]
    assert build_outputs(volume, none, ALG)[:4] == (None, None, None, None)
    sr, msr, seg, gsps, values = build_outputs(volume, none, ALG, results_when_nothing_found=True)
    assert seg is None and gsps is None and values == []
    for name, ds in (("sr", sr), ("m", msr)):
        ds.save_as(tmp_path / f"{name}.dcm", enforce_file_format=True)
        validate_dicom(tmp_path / f"{name}.dcm")
    assert not _coords(sr)
    back = read_landmark_sr(sr, include_missing=True)
    assert len(back) == 16 and all(lm.status == NOT_FOUND for lm in back)
    with pytest.raises(ValueError):
        read_landmark_sr(sr)
    with pytest.raises(ValueError):
        build_landmark_seg(volume, none, ALG)


def test_found_landmark_keeps_its_position_check():
    _, volume = make_series("axial", seed=1)
    lms = make_landmarks(volume, seed=3)
    lms[0] = replace(lms[0], position_lps_mm=(float("nan"), 0.0, 0.0))
    with pytest.raises(ValueError):
        build_outputs(volume, lms, ALG)
    assert np.isfinite(lms[1].position_lps_mm).all()
