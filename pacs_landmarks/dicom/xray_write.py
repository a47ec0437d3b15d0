"""Writing one projection X-ray image: DX For Presentation / For Processing (PS3.3 A.26.1, A.26.2), CR (A.2)
or Secondary Capture of scanned film (A.8.1).

Used for synthetic cephalograms and for the images that ``pacs-landmarks import`` brings in from the public
datasets. The modules each IOD requires are filled in: Patient C.7.1.1, General Study C.7.2.1, General Series
C.7.3.1, DX Series C.8.11.1 / CR Series C.8.1.1, General Equipment C.7.5.1, SC Equipment C.8.6.1, General
Acquisition C.7.10.1, General Image C.7.6.1, Image Pixel C.7.6.3, DX Anatomy Imaged C.8.11.2, DX Image C.8.11.3,
DX Detector C.8.11.4, DX Positioning C.8.11.5, VOI LUT C.11.2, Acquisition Context C.7.6.14, SOP Common C.12.1.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

from pacs_landmarks.dicom.write import _ds, identity_dataset
from pacs_landmarks.dicom.xray import CR_IMAGE, DX_PRESENTATION, DX_PROCESSING, SECONDARY_CAPTURE

# View Position -> CID 4010 view code; LL = left lateral (left side to the detector).
VIEW_CODES = {"LL": ("399173006", "SCT", "left lateral"), "RL": ("399198007", "SCT", "right lateral")}
KINDS = {"DX": DX_PRESENTATION, "DX-PROCESSING": DX_PROCESSING, "CR": CR_IMAGE, "SC": SECONDARY_CAPTURE}


@dataclass
class XRayInfo:
    """Identity and acquisition attributes of one image (no real patient data)."""

    patient_name: str
    patient_id: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    study_date: str = "20240101"
    study_time: str = "120000"
    study_id: str = "1"
    accession_number: str = ""
    series_number: int = 1
    instance_number: int = 1
    series_description: str = "Lateral cephalogram"
    patient_sex: str = "O"
    patient_birth_date: str = ""
    manufacturer: str = "pacs-landmarks"
    model_name: str = "synthetic cephalostat"
    kvp: float | None = 80.0
    extra: dict = field(default_factory=dict)  # keyword -> value, set last


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def xray_dataset(
    pixels: np.ndarray,
    info: XRayInfo,
    *,
    kind: str = "DX",
    bits_stored: int | None = None,
    photometric: str = "MONOCHROME2",
    imager_pixel_spacing: tuple[float, float] | None = None,
    pixel_spacing: tuple[float, float] | None = None,
    pixel_spacing_calibration: str | None = None,
    magnification: float | None = None,
    source_detector_mm: float | None = None,
    source_patient_mm: float | None = None,
    nominal_scanned_spacing: tuple[float, float] | None = None,
    facing: str | None = "right",
    positioner: str | None = "CEPHALOSTAT",
    view_position: str | None = None,
    body_part: str = "SKULL",
    window: tuple[float, float] | None = None,
    modality: str | None = None,
) -> Dataset:
    """An X-ray image dataset for stored values ``pixels`` (rows, columns; uint8 or uint16).

    ``facing`` ("right"/"left") sets Patient Orientation (the rows point anterior or posterior, the columns
    to the feet) and, for a lateral, View Position RL/LL is left to ``view_position``; ``window`` =
    (centre, width) for the VOI LUT (default: the full stored range).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, not {kind!r}")
    if pixels.ndim != 2:
        raise ValueError(f"an X-ray image is 2-D, got shape {pixels.shape}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError("photometric must be MONOCHROME1 or MONOCHROME2")
    allocated = 8 if pixels.dtype == np.uint8 else 16
    if pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"stored values must be uint8 or uint16, not {pixels.dtype}")
    stored = int(bits_stored or allocated)
    if not 6 <= stored <= allocated or int(pixels.max(initial=0)) >= (1 << stored):
        raise ValueError(f"values do not fit in {stored} bits stored")
    sop_class = KINDS[kind]
    dx = kind.startswith("DX")

    ds = identity_dataset(info, sop_class, info.sop_instance_uid,
                          modality or ("DX" if dx else "CR" if kind == "CR" else "OT"))
    ds.InstanceNumber = info.instance_number
    ds.AcquisitionNumber = 1
    ds.BodyPartExamined = body_part
    if dx:  # General Anatomy Required Macro (10.5), CID 4009: the skull
        ds.AnatomicRegionSequence = [_code("89546000", "SCT", "Skull")]
    if facing in ("right", "left"):
        ds.PatientOrientation = ["A" if facing == "right" else "P", "F"]
    elif dx:
        raise ValueError("a DX image needs Patient Orientation (C.8.11.3): give facing='right' or 'left'")
    else:
        ds.PatientOrientation = ""
    # Image Pixel (C.7.6.3)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = (int(n) for n in pixels.shape)
    ds.BitsAllocated = allocated
    ds.BitsStored = stored
    ds.HighBit = stored - 1
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    if kind == "SC":
        ds.ConversionType = "DF"  # digitised film (C.8.6.1)
        if nominal_scanned_spacing:
            ds.NominalScannedPixelSpacing = [_ds(v) for v in nominal_scanned_spacing]
        ds.ImageType = ["DERIVED", "SECONDARY"]
    else:
        ds.ImageType = ["ORIGINAL", "PRIMARY", ""] if dx else ["ORIGINAL", "PRIMARY"]
        if info.kvp is not None:
            ds.KVP = _ds(info.kvp)
    if dx:
        ds.PresentationIntentType = "FOR PRESENTATION" if kind == "DX" else "FOR PROCESSING"
        ds.ImageLaterality = "U"  # an unpaired (midline) view: C.8.11.2
        ds.PixelIntensityRelationship = "LIN" if kind == "DX" else "LOG"
        ds.PixelIntensityRelationshipSign = 1
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "US"
        ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
        ds.DetectorType = "DIRECT"
        ds.AcquisitionContextSequence = []
        ds.ImagerPixelSpacing = [_ds(v) for v in (imager_pixel_spacing or (0.1, 0.1))]
    elif imager_pixel_spacing:
        ds.ImagerPixelSpacing = [_ds(v) for v in imager_pixel_spacing]
    if kind != "SC":
        ds.ViewPosition = view_position or ""
        if view_position in VIEW_CODES:  # View Code Sequence (C.8.11.5), CID 4010
            ds.ViewCodeSequence = [_code(*VIEW_CODES[view_position])]
            ds.ViewCodeSequence[0].ViewModifierCodeSequence = []
        if dx:
            ds.PositionerType = positioner or ""  # Type 2 (C.8.11.5)
        if magnification:
            ds.EstimatedRadiographicMagnificationFactor = _ds(magnification)
        if source_detector_mm:
            ds.DistanceSourceToDetector = _ds(source_detector_mm)
        if source_patient_mm:
            ds.DistanceSourceToPatient = _ds(source_patient_mm)
    if pixel_spacing:
        ds.PixelSpacing = [_ds(v) for v in pixel_spacing]
        if pixel_spacing_calibration:
            ds.PixelSpacingCalibrationType = pixel_spacing_calibration
            ds.PixelSpacingCalibrationDescription = f"{pixel_spacing_calibration.lower()} calibration"
    if kind != "DX-PROCESSING":
        top = (1 << stored) - 1
        centre, width = window or (top / 2.0 + 0.5, float(top + 1))
        ds.WindowCenter = _ds(centre)
        ds.WindowWidth = _ds(width)
    for keyword, value in info.extra.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.tobytes()
    return ds
