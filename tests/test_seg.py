"""Landmark SEG: valid (dciodvfy), spheres centred on the points, same tracking UIDs as the SR."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from sr_helpers import GEOMETRIES, make_landmarks, make_series

from pacs_landmarks.sr_templates.common import Algorithm
from pacs_landmarks.sr_templates.landmark_sr import build_landmark_sr
from pacs_landmarks.sr_templates.seg import build_landmark_seg, sphere_radius

ALG = Algorithm("test-model", "1.2.3")


def segment_centroids(ds) -> dict[int, np.ndarray]:
    """LPS centroid of every segment, from the frames' own plane positions (PS3.3 C.7.6.16.2.3)."""
    shared = ds.SharedFunctionalGroupsSequence[0]
    ori = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    rs, cs = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    pixels = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    sums: dict[int, list] = {}
    for frame, item in zip(pixels, ds.PerFrameFunctionalGroupsSequence):
        seg = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        ipp = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float)
        r, c = np.nonzero(frame)
        lps = ipp + np.outer(c * cs, ori[:3]) + np.outer(r * rs, ori[3:])
        acc = sums.setdefault(seg, [np.zeros(3), 0])
        acc[0] += lps.sum(axis=0)
        acc[1] += len(r)
    return {seg: total / count for seg, (total, count) in sums.items()}


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_seg_valid_and_centred(tmp_path, validate_dicom, geometry):
    _, volume = make_series(geometry, seed=4)
    landmarks = make_landmarks(volume, seed=5)
    seg = build_landmark_seg(volume, landmarks, ALG)
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    warnings = validate_dicom(path)
    assert all("99PACSLMK" in w for w in warnings), warnings

    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SegmentationType == "BINARY" and ds.SeriesNumber == 7703
    assert ds.FrameOfReferenceUID == volume.frame_of_reference_uid
    source_uids = {h.SOPInstanceUID for h in volume.source_headers}
    referenced = {i.ReferencedSOPInstanceUID for i in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced and referenced <= source_uids

    sr = build_landmark_sr(volume, landmarks, ALG)
    sr_tracking = {}
    for group in sr.ContentSequence[-1].ContentSequence:
        items = {i.ConceptNameCodeSequence[0].CodeValue: i for i in group.ContentSequence}
        sr_tracking[items["112039"].TextValue] = items["112040"].UID
    inv = np.linalg.inv(volume.affine[:3, :3])
    centroids = segment_centroids(ds)
    assert len(ds.SegmentSequence) == len(landmarks) == len(centroids)
    for n, (segment, lm) in enumerate(zip(ds.SegmentSequence, landmarks), start=1):
        assert segment.SegmentLabel == lm.name
        assert segment.TrackingUID == sr_tracking[lm.name]
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "711101009"
        assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "309825002"
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        if lm.name.endswith((" R", " L")):
            laterality = segment.AnatomicRegionSequence[0].AnatomicRegionModifierSequence[-1]
            assert laterality.CodeValue == ("24028007" if lm.name.endswith(" R") else "7771000")
        assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
        # Centroid within half a voxel of the point, in voxel units of the volume (any axis).
        offset_voxels = inv @ (centroids[n] - np.asarray(lm.position_lps_mm))
        assert np.all(np.abs(offset_voxels) <= 0.5), (lm.name, offset_voxels)
    # Only frames where a sphere is: at most (slices a sphere can touch) per segment.
    per_segment = int(np.ceil(2 * sphere_radius(volume) / GEOMETRIES[geometry]["thickness"])) + 1
    assert int(ds.NumberOfFrames) <= per_segment * len(landmarks)


def test_sphere_radius():
    _, thin = make_series("anisotropic")
    _, thick = make_series("thick")
    assert sphere_radius(thin) == pytest.approx(max(2.0, 1.5 * 1.3))
    assert sphere_radius(thick) == pytest.approx(7.5)


def test_landmarks_outside_volume_give_empty_segments(tmp_path, validate_dicom):
    _, volume = make_series("axial")
    far = [type(lm)(lm.name, (1000.0, 1000.0, 1000.0)) for lm in make_landmarks(volume)]
    seg = build_landmark_seg(volume, far, ALG)
    seg.save_as(tmp_path / "seg.dcm", enforce_file_format=True)
    validate_dicom(tmp_path / "seg.dcm")
    ds = pydicom.dcmread(tmp_path / "seg.dcm")
    assert len(ds.SegmentSequence) == 16 and not ds.pixel_array.any()


def test_overlapping_spheres_keep_both_segments(tmp_path, validate_dicom):
    """Two landmarks 3 mm apart on 5 mm slices (radius 7.5 mm): the spheres share pixels, each stays whole."""
    _, volume = make_series("thick", seed=6)
    landmarks = make_landmarks(volume, seed=6)
    pog = np.asarray(landmarks[10].position_lps_mm)
    landmarks[12] = type(landmarks[12])(landmarks[12].name, tuple(pog + np.array([0.0, 0.0, 3.0])))
    seg = build_landmark_seg(volume, landmarks, ALG)
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    validate_dicom(path)
    ds = pydicom.dcmread(path)
    assert ds.SegmentsOverlap == "YES"
    centroids = segment_centroids(ds)
    inv = np.linalg.inv(volume.affine[:3, :3])
    for n in (11, 13):
        offset = inv @ (centroids[n] - np.asarray(landmarks[n - 1].position_lps_mm))
        assert np.all(np.abs(offset) <= 0.5), offset
