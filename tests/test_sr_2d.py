"""2D landmark SR (Comprehensive SR, SCOORD POINT on the image): build, validate, write, read back."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from pacs_landmarks.dicom.write import save
from pacs_landmarks.dicom.xray_write import XRayInfo, xray_dataset
from pacs_landmarks.inference.landmark2d import Landmark2D
from pacs_landmarks.landmark_sets import landmark_names
from pacs_landmarks.sr_templates.common import Algorithm
from pacs_landmarks.sr_templates.landmark_sr_2d import build_landmark_sr_2d, read_landmark_sr_2d

ALG = Algorithm("ceph19-test", "0.0.1", "ceph19")


def ceph_image(tmp_path):
    info = XRayInfo("TEST^SR2D", "S2", generate_uid(), generate_uid(), generate_uid())
    ds = xray_dataset(np.zeros((300, 250), np.uint16), info, bits_stored=12, imager_pixel_spacing=(0.11, 0.11),
                      magnification=1.1, view_position="LL")
    path = save(ds, tmp_path / "ceph.dcm")
    return pydicom.dcmread(path, stop_before_pixels=True)


def landmarks():
    rng = np.random.default_rng(0)
    out = []
    for k, name in enumerate(landmark_names("ceph19")):
        pos = (float(rng.uniform(0, 250)), float(rng.uniform(0, 300)))
        status = "not_found" if name == "Articulare" else "found"
        out.append(Landmark2D(name, pos if status == "found" else None, round(float(rng.uniform(0.5, 1)), 3), status))
    return out


def test_round_trip_and_validation(tmp_path, validate_dicom):
    image = ceph_image(tmp_path)
    lms = landmarks()
    sr = build_landmark_sr_2d(image, lms, ALG)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR, no SCOORD3D
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    validate_dicom(path)
    back = {lm.name: lm for lm in read_landmark_sr_2d(pydicom.dcmread(path))}
    found = [lm for lm in lms if lm.status == "found"]
    assert set(back) == {lm.name for lm in found}  # one group per found landmark, none for the others
    for lm in found:
        np.testing.assert_allclose(back[lm.name].position_px, lm.position_px, atol=0.01)
        assert back[lm.name].confidence == pytest.approx(lm.confidence)
    # Every point refers to the image, which is the evidence.
    ref = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == image.SOPInstanceUID
    # Same input, same UIDs (a re-run replaces the object).
    again = build_landmark_sr_2d(image, lms, ALG)
    assert again.SOPInstanceUID == sr.SOPInstanceUID and again.SeriesInstanceUID == sr.SeriesInstanceUID


def test_points_outside_the_image_or_none_found(tmp_path):
    image = ceph_image(tmp_path)
    with pytest.raises(ValueError, match="outside"):
        build_landmark_sr_2d(image, [Landmark2D("Sella", (251.0, 10.0))], ALG)
    with pytest.raises(ValueError, match="no landmark was found"):
        build_landmark_sr_2d(image, [Landmark2D("Sella", None, 0.1, "not_found")], ALG)
