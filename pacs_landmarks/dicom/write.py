"""Writing a CT Image Storage series: one complete CT Image IOD per slice (PS3.3 A.3).

The caller gives the Hounsfield-unit slices and their geometry; this module owns the DICOM side: the
modules the CT Image IOD requires (Patient C.7.1.1, General Study C.7.2.1, General Series C.7.3.1, Frame of
Reference C.7.4.1, General Equipment C.7.5.1, General Image C.7.6.1, Image Plane C.7.6.2, Image Pixel
C.7.6.3, CT Image C.8.2.1, VOI LUT C.11.2, SOP Common C.12.1) and the file meta information (PS3.10 7.1).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    PYDICOM_IMPLEMENTATION_UID,
    UID,
)

# Stored values are HU + 1024 in 12 bits (PS3.3 C.8.2.1.1.4: CT uses 12-16 bits stored); HU range -1024..3071.
RESCALE_INTERCEPT = -1024.0
HU_MIN, HU_MAX = -1024.0, 3071.0


@dataclass
class SeriesInfo:
    """Patient, study and series attributes shared by every slice of a series (no real patient data)."""

    patient_name: str
    patient_id: str
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    study_date: str = "20240101"  # YYYYMMDD
    study_time: str = "120000"
    study_id: str = "1"
    accession_number: str = ""
    series_number: int = 1
    series_description: str = ""
    patient_birth_date: str = ""
    patient_sex: str = "O"
    patient_position: str = "HFS"
    manufacturer: str = "pacs-landmarks"
    model_name: str = "synthetic phantom"
    kvp: float = 120.0
    convolution_kernel: str = "STANDARD"
    extra: dict = field(default_factory=dict)  # keyword -> value, set on every slice last


def identity_dataset(info, sop_class_uid: str, sop_instance_uid: str, modality: str) -> Dataset:
    """A new dataset with what every image we write shares: SOP Common (C.12.1), Patient (C.7.1.1), General
    Study (C.7.2.1), General Series (C.7.3.1) and General Equipment (C.7.5.1), from ``info`` (a ``SeriesInfo``
    or ``xray_write.XRayInfo``: the same field names)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = UID(sop_class_uid)
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = info.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = info.study_time
    ds.AccessionNumber = info.accession_number
    ds.Modality = modality
    ds.Manufacturer = info.manufacturer
    ds.ManufacturerModelName = info.model_name
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = info.series_description
    ds.PatientName = info.patient_name
    ds.PatientID = info.patient_id
    ds.PatientBirthDate = info.patient_birth_date
    ds.PatientSex = info.patient_sex
    ds.StudyInstanceUID = info.study_instance_uid
    ds.SeriesInstanceUID = info.series_instance_uid
    ds.StudyID = info.study_id
    ds.SeriesNumber = info.series_number
    return ds


def slice_dataset(
    hu: np.ndarray,
    *,
    info: SeriesInfo,
    sop_instance_uid: str,
    instance_number: int,
    position: Sequence[float],
    orientation: Sequence[float],
    pixel_spacing: tuple[float, float],
    slice_thickness: float,
    gantry_tilt_deg: float = 0.0,
    window: tuple[float, float] = (40.0, 400.0),
) -> Dataset:
    """One CT Image Storage instance for a 2-D slice of HU values (rows, columns).

    ``position`` is Image Position (Patient) of the first pixel, ``orientation`` the six direction cosines of
    Image Orientation (Patient) (row direction, then column direction; PS3.3 C.7.6.2.1.1), and
    ``pixel_spacing`` is (row spacing, column spacing) in mm as in Pixel Spacing (0028,0030).
    """
    if hu.ndim != 2:
        raise ValueError(f"a slice must be 2-D, got shape {hu.shape}")
    stored = np.clip(np.rint(hu), HU_MIN, HU_MAX) - RESCALE_INTERCEPT
    pixels = stored.astype(np.uint16)

    ds = identity_dataset(info, CTImageStorage, sop_instance_uid, "CT")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    # With Body Part Examined naming an unpaired part, Laterality (Type 2C, C.7.3.1) must be absent.
    ds.BodyPartExamined = "HEAD"
    # CT Image module acquisition attributes (C.8.2.1)
    ds.SliceThickness = _ds(slice_thickness)
    ds.KVP = _ds(info.kvp)
    ds.GantryDetectorTilt = _ds(gantry_tilt_deg)
    ds.ConvolutionKernel = info.convolution_kernel
    ds.PatientPosition = info.patient_position
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance_number
    # Image Plane (C.7.6.2)
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = [_ds(v, 8) for v in orientation]
    ds.FrameOfReferenceUID = info.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    ds.SliceLocation = _ds(float(np.dot(normal, np.asarray(position, float))))
    # Image Pixel (C.7.6.3) with CT constraints (C.8.2.1.1)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = (int(n) for n in pixels.shape)
    ds.PixelSpacing = [_ds(pixel_spacing[0]), _ds(pixel_spacing[1])]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    # VOI LUT (C.11.2): a soft-tissue window by default
    ds.WindowCenter = _ds(window[0])
    ds.WindowWidth = _ds(window[1])
    ds.RescaleIntercept = _ds(RESCALE_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    for keyword, value in info.extra.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.tobytes()
    return ds


def save(ds: Dataset, path: Path, transfer_syntax: str = ExplicitVRLittleEndian) -> Path:
    """Write ``ds`` as a DICOM Part 10 file (PS3.10) in ``transfer_syntax``; compressed syntaxes use pydicom's
    encoders (RLE Lossless, JPEG 2000 Lossless via pylibjpeg-openjpeg)."""
    ts = UID(transfer_syntax)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "PACSLMK_010"
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if ts == ImplicitVRLittleEndian else ExplicitVRLittleEndian
    ds.file_meta = meta
    if ts.is_compressed:
        ds.compress(ts, generate_instance_uid=False)
    else:
        meta.TransferSyntaxUID = ts
    path = Path(path)
    ds.save_as(path, enforce_file_format=True)
    return path


def _ds(value: float, digits: int = 6) -> str:
    """A Decimal String (PS3.5 6.2, at most 16 characters) without float noise, e.g. 0.5 -> '0.5'."""
    text = f"{float(value):.{digits}f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text[:16]


def read_hu(path: Path) -> np.ndarray:
    """The HU array of one slice written here (rescale applied); a helper for tests and tools."""
    ds = pydicom.dcmread(path)
    return ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
