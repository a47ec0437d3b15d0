"""Small synthetic CT series + landmark lists for the SR / SEG tests (no dependency on the phantom helper).

The geometry is what matters here: plain axial, gantry-tilted (sheared Image Position), anisotropic pixels and
5 mm slices. Landmarks are spread through the volume at plausible relative places.
"""
from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from pacs_landmarks.dicom.volume import SliceSource, Volume
from pacs_landmarks.inference.landmark import Landmark
from pacs_landmarks.sr_templates.common import evidence_headers
from pacs_landmarks.landmark_sets import landmark_names

GEOMETRIES = {
    "axial": dict(size=64, pixel=(1.0, 1.0), thickness=1.5, slices=48, tilt_deg=0.0),
    "tilted": dict(size=64, pixel=(1.0, 1.0), thickness=1.5, slices=48, tilt_deg=15.0),
    "anisotropic": dict(size=64, pixel=(0.6, 1.3), thickness=1.0, slices=60, tilt_deg=0.0),
    "thick": dict(size=48, pixel=(1.5, 1.5), thickness=5.0, slices=16, tilt_deg=0.0),
}


def make_series(geometry: str = "axial", seed: int = 0, with_pixels: bool = True) -> tuple[list[Dataset], Volume]:
    g = GEOMETRIES[geometry]
    rng = np.random.default_rng(seed)
    n, size, (rs, cs), dz = g["slices"], g["size"], g["pixel"], g["thickness"]
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    row_dir, col_dir = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
    # Gantry tilt: slices stay axial in orientation, but each is shifted along y (PS3.3 C.7.6.2.1.1 allows it).
    step = np.array([0.0, np.tan(np.radians(g["tilt_deg"])) * dz, dz])
    origin = np.array([-size * cs / 2, -size * rs / 2, -n * dz / 2])
    datasets = []
    for k in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Phantom", "PH0001", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", "A1"
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, k + 1
        ds.Manufacturer = "test"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [round(float(v), 4) for v in origin + k * step]
        ds.ImageOrientationPatient = [*row_dir, *col_dir]
        ds.PixelSpacing = [rs, cs]
        ds.SliceThickness = dz
        ds.GantryDetectorTilt = g["tilt_deg"]
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.KVP, ds.AcquisitionNumber, ds.PositionReferenceIndicator = 120, 1, ""
        if with_pixels:
            ds.PixelData = rng.integers(0, 2000, (size, size), dtype=np.int16).tobytes()
        datasets.append(ds)
    affine = np.eye(4)
    affine[:3, 0] = step
    affine[:3, 1] = col_dir * rs
    affine[:3, 2] = row_dir * cs
    affine[:3, 3] = origin
    headers = evidence_headers(datasets)
    volume = Volume(
        array=np.zeros((n, size, size), np.float32),
        affine=affine,
        frame_of_reference_uid=frame,
        study_instance_uid=study,
        series_instance_uid=series,
        slice_sources=[SliceSource(d.SOPInstanceUID, d.SOPClassUID) for d in datasets],
        source_headers=headers,
        gantry_tilt_deg=g["tilt_deg"],
    )
    return datasets, volume


def make_landmarks(volume: Volume, seed: int = 0) -> list[Landmark]:
    """The 16 landmarks at random (seeded) sub-voxel positions well inside the volume."""
    rng = np.random.default_rng(seed)
    shape = np.array(volume.shape, float)
    out = []
    for name in landmark_names():
        index = rng.uniform(0.2, 0.8, 3) * (shape - 1)
        out.append(
            Landmark(name, tuple(float(v) for v in volume.index_to_lps(index)), confidence=float(rng.uniform(0.5, 1)))
        )
    return out
