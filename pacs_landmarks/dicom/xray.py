"""Read one projection X-ray image (a lateral cephalogram) into a :class:`XRayImage`.

What this module decides, from the header alone (details: docs/cephalograms.md):

- which SOP classes are single X-ray images that may start a cephalogram job (:data:`XRAY_CLASSES`, shared
  with the node and the plugin as :data:`~pacs_landmarks.dicom.series.CT_CLASSES` is for CT): Digital X-Ray
  For Presentation / For Processing (PS3.3 A.26), Computed Radiography (A.2), Secondary Capture (A.8, film);
- whether the image is a lateral cephalogram (:func:`ceph_check`): Positioner Type CEPHALOSTAT (C.8.11.5),
  View Position LL/RL, View Code Sequence (CID 4010 lateral codes), Body Part Examined and the descriptions;
  a panoramic (Modality PX), a chest, a frontal view, an intra-oral or a mammogram is refused with the reason;
- the physical pixel size and where it came from (:func:`physical_spacing`), in the order of PS3.3 10.7.1
  (Basic Pixel Spacing Calibration Macro) and C.8.11.4/C.8.11.5 (DX Detector / Positioning);
- which way the face looks, from Patient Orientation (C.7.6.1.1.1): "A" along the rows = facing right.

Pixels are decoded with pydicom (the same decoders, hence the same compressed transfer syntaxes, as the CT
path), put through the Modality LUT and the first VOI LUT / window (C.11.2, pydicom's ``apply_voi_lut``),
inverted for MONOCHROME1 so that dense bone is always bright, and scaled to 0..1.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
# PS3.4 B.5: single-image X-ray classes that can hold a lateral cephalogram; the node and the Orthanc plugin
# start one job per stored instance of these classes (no series-stable wait: one image is the whole input).
XRAY_CLASSES = frozenset({CR_IMAGE, DX_PRESENTATION, DX_PROCESSING, SECONDARY_CAPTURE})
# X-ray classes that are never a cephalogram, with the reason given when one arrives.
OTHER_XRAY_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1.2": "a mammogram",
    "1.2.840.10008.5.1.4.1.1.1.2.1": "a mammogram",
    "1.2.840.10008.5.1.4.1.1.1.3": "an intra-oral X-ray",
    "1.2.840.10008.5.1.4.1.1.1.3.1": "an intra-oral X-ray",
}
# CID 4010 (DX View): lateral views. SCT 399173006 left lateral, 399198007 right lateral, 399067008 lateral.
LATERAL_VIEW_CODES = frozenset({"399173006", "399198007", "399067008"})
HEAD_BODY_PARTS = frozenset({"SKULL", "HEAD", "FACE", "JAW", "HEADNECK", "TMJ"})
NOT_HEAD_BODY_PARTS = frozenset({"CHEST", "THORAX", "ABDOMEN", "PELVIS", "SPINE", "LSPINE", "TSPINE", "HAND",
                                 "FOOT", "KNEE", "HIP", "SHOULDER", "BREAST", "EXTREMITY", "ARM", "LEG"})
_CEPH_WORDS = re.compile(r"\b(CEPH\w*|KEPH\w*|TELE\w*|LAT(ERAL)?|FERN\w*)\b", re.I)
_REFUSE_WORDS = re.compile(r"\b(CHEST|THORAX|THORAC\w*|LUNG\w*|PANO\w*|OPG|OPT|ORTHOPANTOMO\w*|BITE\s*WING|"
                           r"PERIAPICAL|MAMMO\w*)\b", re.I)


class XRayError(Exception):
    """The object is not an X-ray image we can use (or not a lateral cephalogram); the message says why."""


@dataclass(frozen=True)
class CephCheck:
    """What the header says: ``verdict`` is "lateral" (evidence found), "unknown" (nothing for or against:
    the image itself has to confirm it) or "refused" (``reason`` says what it is instead)."""

    verdict: str
    evidence: tuple[str, ...] = ()
    reason: str = ""


@dataclass(frozen=True)
class Spacing:
    """Physical pixel size (mm between rows, mm between columns) and where it came from.

    ``plane`` is "patient" (corrected to the mid-sagittal plane or calibrated in the patient), "detector"
    (Imager Pixel Spacing uncorrected: ~8-13 % larger than the patient for a cephalostat), "film" (scanned
    film), "stated" (a value whose calibration is not known) or "override".
    """

    row_mm: float
    col_mm: float
    source: str
    plane: str

    @property
    def mm(self) -> tuple[float, float]:
        return (self.row_mm, self.col_mm)


@dataclass
class XRayImage:
    """One X-ray image ready for landmark detection.

    ``pixels`` is float32 (rows, columns), 0..1, dense bone bright, in the image's own orientation; positions
    reported to the user are always in these coordinates (SCOORD convention, PS3.3 C.18.6.1.2: the top-left
    corner of the top-left pixel is (0, 0)). ``facing`` is "right", "left" or "unknown"; :meth:`canonical`
    gives the pixels turned to face right, and :meth:`from_canonical` brings points back.
    """

    pixels: np.ndarray
    spacing: Spacing | None
    facing: str
    facing_source: str
    ceph: CephCheck
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    transfer_syntax: str
    header: Dataset = field(repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.pixels.shape)  # type: ignore[return-value]

    @property
    def flipped(self) -> bool:
        """True when the canonical (face-right) image is this one mirrored left-right."""
        return self.facing == "left"

    def canonical(self) -> np.ndarray:
        return self.pixels[:, ::-1] if self.flipped else self.pixels

    def from_canonical(self, points: np.ndarray) -> np.ndarray:
        """(column, row) points found on :meth:`canonical` -> this image's own (column, row)."""
        pts = np.array(points, float, copy=True)
        if self.flipped:
            pts[..., 0] = self.shape[1] - pts[..., 0]  # a mirror of continuous SCOORD columns: x -> W - x
        return pts

    to_canonical = from_canonical  # the mirror is its own inverse


# --------------------------------------------------------------------------------------------- header


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if isinstance(value, (list, pydicom.multival.MultiValue)):
        value = " ".join(str(v) for v in value)
    return str(value or "").strip()


def _floats(value, n: int) -> list[float] | None:
    try:
        out = [float(v) for v in (value if isinstance(value, (list, pydicom.multival.MultiValue)) else [value])]
    except (TypeError, ValueError):
        return None
    if len(out) == 1 and n == 2:
        out = out * 2
    if len(out) != n or not all(np.isfinite(out)) or any(v <= 0 for v in out):
        return None
    return out


def is_xray_class(sop_class_uid: str) -> bool:
    return str(sop_class_uid) in XRAY_CLASSES


def ceph_check(ds: Dataset) -> CephCheck:
    """Is this header a lateral cephalogram? See the module docstring for the attributes used."""
    sop_class = str(ds.get("SOPClassUID", ""))
    modality = _text(ds, "Modality").upper()
    if sop_class in OTHER_XRAY_CLASSES:
        return CephCheck("refused", reason=f"{OTHER_XRAY_CLASSES[sop_class]}, not a lateral cephalogram")
    if sop_class not in XRAY_CLASSES:
        return CephCheck("refused", reason=f"not a single X-ray image (SOP class {sop_class or '-'})")
    if modality == "PX":
        return CephCheck("refused", reason="a panoramic radiograph (Modality PX), not a lateral cephalogram")
    if modality in ("MG", "IO", "CT", "MR", "US", "NM", "PT", "XA", "RF"):
        return CephCheck("refused", reason=f"Modality {modality}, not a lateral cephalogram")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        return CephCheck("refused", reason=f"{ds.NumberOfFrames} frames: a cephalogram is a single image")
    positioner = _text(ds, "PositionerType").upper()
    if positioner == "PANORAMIC":
        return CephCheck("refused", reason="Positioner Type PANORAMIC: a panoramic radiograph")
    if positioner == "MAMMOGRAPHIC":
        return CephCheck("refused", reason="Positioner Type MAMMOGRAPHIC: a mammogram")
    body = _text(ds, "BodyPartExamined").upper().replace(" ", "")
    if body in NOT_HEAD_BODY_PARTS:
        what = "a chest radiograph" if body in ("CHEST", "THORAX") else "not a head image"
        return CephCheck("refused", reason=f"Body Part Examined {body}: {what}")
    descriptions = " ".join(_text(ds, k) for k in ("StudyDescription", "SeriesDescription", "ProtocolName",
                                                   "AcquisitionDeviceProcessingDescription"))
    refuse = _REFUSE_WORDS.search(descriptions)
    if refuse and positioner != "CEPHALOSTAT":
        return CephCheck("refused", reason=f"the description says {refuse.group(0)!r}: not a lateral cephalogram")
    view = _text(ds, "ViewPosition").upper()
    if view in ("PA", "AP"):
        return CephCheck("refused", reason=f"View Position {view}: a frontal view, not a lateral cephalogram")
    evidence = []
    if positioner == "CEPHALOSTAT":
        evidence.append("Positioner Type CEPHALOSTAT")
    if view in ("LL", "RL"):
        evidence.append(f"View Position {view}")
    for item in ds.get("ViewCodeSequence", []) or []:
        value, meaning = str(item.get("CodeValue", "")), str(item.get("CodeMeaning", ""))
        if value in LATERAL_VIEW_CODES or "lateral" in meaning.lower():
            evidence.append(f"View Code {value} ({meaning})")
    words = _CEPH_WORDS.search(descriptions)
    if words:
        evidence.append(f"description {words.group(0)!r}")
    if body in HEAD_BODY_PARTS:
        if not evidence:
            return CephCheck("unknown", (f"Body Part Examined {body}",))
        evidence.append(f"Body Part Examined {body}")
    return CephCheck("lateral" if evidence else "unknown", tuple(evidence))


def physical_spacing(ds: Dataset, override: float | tuple[float, float] | None = None) -> Spacing | None:
    """The pixel size in mm and its source, in this order (PS3.3 10.7.1.3, C.8.11.4, C.8.11.5):

    1. an ``override`` (the user's ``--pixel-spacing``);
    2. Pixel Spacing (0028,0030) with Pixel Spacing Calibration Type (0028,0A02) FIDUCIAL or GEOMETRY;
    3. Imager Pixel Spacing (0018,1164) / Estimated Radiographic Magnification Factor (0018,1114), or / (SID/SOD)
       from Distance Source to Detector (0018,1110) and Distance Source to Patient (0018,1111);
    4. Imager Pixel Spacing alone (at the detector, said so);
    5. Pixel Spacing of unstated calibration (different from Imager Pixel Spacing, or the only one there);
    6. Nominal Scanned Pixel Spacing (0018,2010) of scanned film;
    None when there is none: landmarks stay in pixels and no lengths are measured.
    """
    if override is not None:
        row, col = (override, override) if np.isscalar(override) else override  # type: ignore[misc]
        if not (float(row) > 0 and float(col) > 0):
            raise XRayError(f"pixel spacing override must be positive, not {override}")
        return Spacing(float(row), float(col), "override (--pixel-spacing)", "override")
    ps = _floats(ds.get("PixelSpacing"), 2) if "PixelSpacing" in ds else None
    ips = _floats(ds.get("ImagerPixelSpacing"), 2) if "ImagerPixelSpacing" in ds else None
    calibration = _text(ds, "PixelSpacingCalibrationType").upper()
    if ps and calibration in ("FIDUCIAL", "GEOMETRY"):
        return Spacing(ps[0], ps[1], f"Pixel Spacing (calibration {calibration})", "patient")
    if ips:
        factor = _floats(ds.get("EstimatedRadiographicMagnificationFactor"), 1)
        if factor:
            f = factor[0]
            return Spacing(ips[0] / f, ips[1] / f,
                           f"Imager Pixel Spacing / Estimated Radiographic Magnification Factor {f:g}", "patient")
        sid = _floats(ds.get("DistanceSourceToDetector"), 1)
        sod = _floats(ds.get("DistanceSourceToPatient"), 1)
        if sid and sod:
            f = sid[0] / sod[0]
            return Spacing(ips[0] / f, ips[1] / f,
                           f"Imager Pixel Spacing / (SID {sid[0]:g} / SOD {sod[0]:g} mm)", "patient")
        if not ps or np.allclose(ps, ips, rtol=1e-4):
            return Spacing(ips[0], ips[1], "Imager Pixel Spacing (at the detector, not corrected for magnification)",
                           "detector")
    if ps:
        return Spacing(ps[0], ps[1], "Pixel Spacing (calibration not stated)", "stated")
    nominal = _floats(ds.get("NominalScannedPixelSpacing"), 2) if "NominalScannedPixelSpacing" in ds else None
    if nominal:
        return Spacing(nominal[0], nominal[1], "Nominal Scanned Pixel Spacing (scanned film)", "film")
    return None


def facing(ds: Dataset) -> tuple[str, str]:
    """("right" | "left" | "unknown", source) from Patient Orientation (0020,0020): the direction of the rows
    toward the anterior (A) means the face looks right, toward posterior (P) left."""
    value = ds.get("PatientOrientation")
    if value and len(value) >= 1:
        row, text = str(value[0]).upper(), "\\".join(str(v) for v in value)
        if row.startswith("A"):
            return "right", f"Patient Orientation {text}"
        if row.startswith("P"):
            return "left", f"Patient Orientation {text}"
    return "unknown", "no usable Patient Orientation"


# --------------------------------------------------------------------------------------------- pixels


def _gray(ds: Dataset, arr: np.ndarray) -> np.ndarray:
    """Grey values, modality and VOI LUT applied, dense = bright, scaled to 0..1."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, convert_color_space

    photometric = _text(ds, "PhotometricInterpretation").upper()
    if int(ds.get("SamplesPerPixel", 1)) == 3:  # scanned film stored in colour: its luma
        if photometric.startswith("YBR"):
            arr = convert_color_space(arr, photometric, "RGB")
        out = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    elif photometric in ("MONOCHROME1", "MONOCHROME2"):
        out = apply_modality_lut(arr, ds)
        if "VOILUTSequence" in ds or "WindowCenter" in ds:
            out = apply_voi_lut(out, ds, index=0, prefer_lut=True)
        out = np.asarray(out, np.float32)
        if photometric == "MONOCHROME1":
            out = -out  # MONOCHROME1: the minimum is white (C.7.6.3.1.2)
    else:
        raise XRayError(f"photometric interpretation {photometric or '-'} is not supported for X-ray images")
    lo, hi = (float(v) for v in np.percentile(out, (0.1, 99.9)))
    if not hi > lo:
        raise XRayError("the image is blank (one grey value)")
    return np.clip((out - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def load_xray(item: str | Path | Dataset, *, pixel_spacing: float | tuple[float, float] | None = None,
              require_ceph: bool = True) -> XRayImage:
    """Read and decode one X-ray image; :class:`XRayError` with the reason when it cannot be used
    (``require_ceph``: also when the header says it is something other than a lateral cephalogram)."""
    from pydicom.pixels import get_decoder

    label = str(item) if not isinstance(item, Dataset) else str(item.get("SOPInstanceUID", "dataset"))
    try:
        ds = item if isinstance(item, Dataset) else pydicom.dcmread(item)
    except Exception as exc:  # noqa: BLE001 -- any unreadable file gets the same clear refusal
        raise XRayError(f"{label}: not a readable DICOM file ({exc.__class__.__name__})") from exc
    check = ceph_check(ds)
    if check.verdict == "refused" and (require_ceph or str(ds.get("SOPClassUID", "")) not in XRAY_CLASSES):
        raise XRayError(f"{label}: {check.reason}")
    if "PixelData" not in ds:
        raise XRayError(f"{label}: no Pixel Data")
    syntax = ds.file_meta.TransferSyntaxUID if "TransferSyntaxUID" in getattr(ds, "file_meta", {}) else None
    try:
        arr = get_decoder(syntax).as_array(ds)[0] if syntax is not None else ds.pixel_array
    except Exception as exc:  # every decoder raises its own types; the reason is what matters
        name = syntax.name if syntax is not None else "unknown transfer syntax"
        raise XRayError(f"cannot decode pixel data of {label} ({name}): {exc}") from exc
    pixels = _gray(ds, arr)
    face, face_source = facing(ds)
    header = Dataset({t: ds.get_item(t) for t in ds.keys() if t.group != 0x7FE0})
    if hasattr(ds, "file_meta"):
        header.file_meta = ds.file_meta
    return XRayImage(
        pixels=pixels, spacing=physical_spacing(ds, pixel_spacing), facing=face, facing_source=face_source,
        ceph=check, sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        study_instance_uid=str(ds.get("StudyInstanceUID", "")), series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        modality=_text(ds, "Modality"), transfer_syntax=str(syntax.name if syntax is not None else "-"), header=header,
    )


def describe(ds: Dataset, pixel_spacing: float | tuple[float, float] | None = None) -> dict:
    """What :func:`load_xray` would make of a header, as plain data (for ``inspect``; no pixels decoded)."""
    from pacs_landmarks.dicom.series import sop_class_name

    check = ceph_check(ds)
    try:
        spacing = physical_spacing(ds, pixel_spacing)
    except XRayError as exc:
        spacing, spacing_error = None, str(exc)
    else:
        spacing_error = ""
    face, face_source = facing(ds)
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return {
        "sop_instance_uid": str(ds.get("SOPInstanceUID", "")),
        "sop_class": sop_class_name(str(ds.get("SOPClassUID", ""))),
        "modality": _text(ds, "Modality"),
        "rows": int(ds.get("Rows", 0) or 0),
        "columns": int(ds.get("Columns", 0) or 0),
        "bits_stored": int(ds.get("BitsStored", 0) or 0),
        "photometric": _text(ds, "PhotometricInterpretation"),
        "transfer_syntax": syntax.name if syntax is not None else "-",
        "lateral_ceph": check.verdict,
        "evidence": list(check.evidence),
        "refused": check.reason,
        "pixel_spacing_mm": [round(spacing.row_mm, 5), round(spacing.col_mm, 5)] if spacing else None,
        "pixel_spacing_source": spacing.source if spacing else (spacing_error or "none: landmarks in pixels, no lengths"),
        "facing": face,
        "facing_source": face_source,
    }
