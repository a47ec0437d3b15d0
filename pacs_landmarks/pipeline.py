"""The one core both front ends call: DICOM datasets of one series in, landmarks + SR + SEG + GSPS out.

load_series -> model.predict -> landmark SR, measurements SR, landmark SEG, presentation state (GSPS), with
the seconds each step took ("volume", "cascade", "outputs").

One X-ray image (a lateral cephalogram, ``process_image``): load_xray -> model.predict_image -> 2D landmark SR,
2D measurements SR, GSPS with the tracing (no SEG), timings "image", "cascade", "outputs". An image that is
not a lateral cephalogram raises ``NotACephalogram`` with the reason, before anything is built: what the
header says (``dicom.xray.ceph_check``: a panoramic, a chest, a frontal view ...), or, when the header says
nothing either way, what the model finds (fewer than ``CONFIRM_FRACTION`` of the set's landmarks).

Every landmark has a status (``Landmark.status``).  Only ``found`` landmarks are SR points, SEG segments and
GSPS marks; the landmark SR states the others, the measurements SR says which measurements it left out and
why.  When no landmark is found (not a head, or a part of the head the model does not know), there are no
result objects at all by default (``Results.nothing_found``; ``results_when_nothing_found=True`` makes a
landmark SR and a measurements SR that say so, and no SEG or GSPS).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from pydicom.dataset import Dataset

from pacs_landmarks.inference.landmark import FOUND, Landmark


log = logging.getLogger(__name__)


# The result objects in the order they are written and delivered: Results attribute -> kind (common.SERIES).
RESULT_KINDS = {"landmark_sr": "landmark-sr", "measurements_sr": "measurements-sr", "seg": "seg", "gsps": "gsps"}

# Earlier results of the same series and model, by kind, newest first (``sr_templates.common.reference``).
Predecessors = Mapping[str, Sequence[Dataset]]


@dataclass
class Results:
    landmarks: list[Landmark]  # every landmark of the set, in order, with its status
    landmark_sr: Dataset | None  # None: nothing found (see the module docstring)
    measurements_sr: Dataset | None
    seg: Dataset | None  # None when no landmark is found
    gsps: Dataset | None  # None when nothing is found or the slices differ in rescale (sr_templates/gsps.py)
    timings: dict[str, float] = field(default_factory=dict)
    measurements: list = field(default_factory=list)  # MeasurementValue, for display
    volume: object | None = None  # the Volume the landmarks were found in
    omitted: list = field(default_factory=list)  # OmittedMeasurement: left out, and why
    image: object | None = None  # the XRayImage (process_image): its spacing, facing, ceph evidence

    @property
    def nothing_found(self) -> bool:
        return not any(lm.status == FOUND for lm in self.landmarks)

    def objects(self) -> dict[str, Dataset]:
        """The result objects there are, by attribute ("landmark_sr", "measurements_sr", "seg", "gsps")."""
        return {k: getattr(self, k) for k in RESULT_KINDS if getattr(self, k) is not None}


def build_outputs(volume, landmarks: list[Landmark], algorithm, predecessors: Predecessors | None = None,
                  results_when_nothing_found: bool = False
                  ) -> tuple[Dataset | None, Dataset | None, Dataset | None, Dataset | None, list]:
    """Landmark SR, measurements SR, SEG, GSPS and the measurement values for the landmarks of ``volume`` (all
    of the set, with their status); ``None`` for an object there is nothing to put in (module docstring).

    ``predecessors``: what these results replace (the SRs name it, PS3.3 C.17.2.3; the SEG and GSPS IODs
    have no such attribute)."""
    from pacs_landmarks.sr_templates.gsps import build_gsps, landmark_marks
    from pacs_landmarks.sr_templates.landmark_sr import build_landmark_sr
    from pacs_landmarks.sr_templates.measurements import build_measurements_sr, compute_measurements
    from pacs_landmarks.sr_templates.seg import build_landmark_seg

    found = [lm for lm in landmarks if lm.status == FOUND]
    for lm in found:
        if len(lm.position_lps_mm) != 3 or not all(math.isfinite(v) for v in lm.position_lps_mm):
            raise ValueError(f"landmark {lm.name!r} has no finite 3D position: {lm.position_lps_mm!r}")
    values = compute_measurements(landmarks, algorithm.landmark_set)
    if not found and not results_when_nothing_found:
        return None, None, None, None, values
    before = predecessors or {}
    return (
        build_landmark_sr(volume, landmarks, algorithm, predecessors=before.get("landmark-sr", ())),
        build_measurements_sr(volume, landmarks, algorithm, values, predecessors=before.get("measurements-sr", ())),
        build_landmark_seg(volume, landmarks, algorithm) if found else None,
        build_gsps(volume, landmark_marks(volume, landmarks), algorithm) if found else None,
        values,
    )


def warm_up(model) -> float:
    """Run the whole pipeline once on a small blank synthetic series and throw the result away.

    The first series after a start otherwise pays one-off costs on its critical path: importing highdicom,
    pydicom's code dictionaries, highdicom's IOD tables, torch's first kernels. Measured on the first job: SR +
    SEG build 1.05 s in the node and 2.07 s inside Orthanc, against 0.3 s once warm (bench/node.py,
    bench/orthanc.py).
    Returns the seconds it took.
    """
    import numpy as np
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from pacs_landmarks.dicom.write import SeriesInfo, slice_dataset

    t = time.perf_counter()
    info = SeriesInfo("WARM^UP", "WARMUP", generate_uid(), generate_uid(), generate_uid())
    blank = np.full((64, 64), -1000.0)
    datasets = []
    for k in range(32):
        ds = slice_dataset(blank, info=info, sop_instance_uid=generate_uid(), instance_number=k + 1,
                           position=(-64.0, -64.0, 2.0 * k), orientation=(1, 0, 0, 0, 1, 0),
                           pixel_spacing=(2.0, 2.0), slice_thickness=2.0)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        datasets.append(ds)
    # A blank series makes the model warn "not a head CT?": true, and not worth a log line here.
    # Only these two loggers: the node's other loggers (associations, jobs) keep logging meanwhile.
    quiet = [logging.getLogger(n) for n in ("pacs_landmarks.inference.model", __name__)]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        res = process_series(datasets, model, results_when_nothing_found=True)
        if res.seg is None:  # nothing found on a blank series: build every object once anyway
            from dataclasses import replace

            from pacs_landmarks.sr_templates.common import Algorithm

            forced = [replace(lm, status=FOUND, reason="", position_lps_mm=lm.stage_positions[-1])
                      for lm in res.landmarks]
            build_outputs(res.volume, forced, Algorithm.of(model))
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    return time.perf_counter() - t


def process_series(datasets: Iterable[str | Path | Dataset], model, predecessors: Predecessors | None = None,
                   results_when_nothing_found: bool = False) -> Results:
    """Assemble the series, run the model's cascade, build the DICOM results.

    Raises ``pacs_landmarks.dicom.series.SeriesError`` for a series that cannot be assembled (clear reason),
    ``ValueError`` if the model gives a found landmark without a finite position. Nothing is written here: the
    caller decides where results go. Result UIDs are deterministic: the same source instances and model give
    the same UIDs, another set of instances of the series gives new ones (``sr_templates/uids.py``).
    ``predecessors``: the results these replace, by kind, newest first (see ``build_outputs``).
    No landmark found: ``Results.nothing_found``, and no result objects unless ``results_when_nothing_found``.
    """
    from pacs_landmarks.dicom.series import load_series
    from pacs_landmarks.sr_templates.common import Algorithm

    timings: dict[str, float] = {}
    t = time.perf_counter()
    volume = load_series(datasets)
    timings["volume"] = time.perf_counter() - t

    t = time.perf_counter()
    landmarks = list(model.predict(volume))
    timings["cascade"] = time.perf_counter() - t

    t = time.perf_counter()
    landmark_sr, measurements_sr, seg, gsps, values = build_outputs(
        volume, landmarks, Algorithm.of(model), predecessors, results_when_nothing_found)
    timings["outputs"] = time.perf_counter() - t
    from pacs_landmarks.sr_templates.measurements import omitted_measurements

    results = Results(landmarks, landmark_sr, measurements_sr, seg, gsps, timings, values, volume,
                      omitted_measurements(landmarks, model.landmark_set))
    if results.nothing_found:
        log.warning("series %s: no landmark found: %s", volume.series_instance_uid,
                    "reporting that nothing was found" if results_when_nothing_found else "no result objects")
    return results


# An image whose header neither says "lateral cephalogram" nor refuses it must be confirmed by the model: at
# least this fraction of the set's landmarks found (a chest or a hand finds few with any confidence).
CONFIRM_FRACTION = 0.5


class NotACephalogram(Exception):
    """An X-ray image that is not a lateral cephalogram; the message says what it is instead, or why the
    image did not confirm it. No result is made for it (a job ends with this reason; nothing is lost)."""


def build_image_outputs(header: Dataset, landmarks: list, algorithm, spacing, predecessors: Predecessors | None = None):
    """Landmark SR, measurements SR and GSPS (tracing) of one image, the measurement values and the ones left
    out, for ``landmarks`` (``Landmark2D``, every landmark of the set with its status) found on the image of
    ``header``; ``spacing``: the ``dicom.xray.Spacing`` used (None: none: angles only).
    Nothing found: (None, None, None, values, omitted): no result objects."""
    from pacs_landmarks.sr_templates.gsps import build_gsps_image, image_marks
    from pacs_landmarks.sr_templates.landmark_sr_2d import build_landmark_sr_2d, image_source
    from pacs_landmarks.sr_templates.measurements_2d import build_measurements_sr_2d, measure_2d

    found = [lm for lm in landmarks if lm.status == FOUND]
    rows, cols = int(header.Rows), int(header.Columns)
    for lm in found:
        if lm.position_px is None or len(lm.position_px) != 2 or not all(math.isfinite(v) for v in lm.position_px):
            raise ValueError(f"landmark {lm.name!r} has no finite 2D position: {lm.position_px!r}")
        if not (0.0 <= lm.position_px[0] <= cols and 0.0 <= lm.position_px[1] <= rows):
            raise ValueError(f"landmark {lm.name!r} at {lm.position_px} lies outside the {cols} x {rows} image")
    values, omitted = measure_2d(landmarks, algorithm.landmark_set, spacing)
    if not found:
        return None, None, None, values, omitted
    before = predecessors or {}
    landmark_sr = build_landmark_sr_2d(header, landmarks, algorithm, before.get("landmark-sr", ()), spacing)
    measurements_sr = build_measurements_sr_2d(header, landmarks, algorithm, values, omitted, spacing,
                                               before.get("measurements-sr", ()))
    gsps = build_gsps_image(header, image_marks(header, landmarks, algorithm.landmark_set, values), algorithm,
                            image_source(header))
    return landmark_sr, measurements_sr, gsps, values, omitted


def process_image(item: str | Path | Dataset, model, predecessors: Predecessors | None = None,
                  pixel_spacing: float | tuple[float, float] | None = None) -> Results:
    """One X-ray image (a file or a dataset) through a 2D model (``model.predict_image``); see the module
    docstring. ``pixel_spacing``: mm (one value, or (row, column)) instead of what the header gives. No
    landmark found (on an image the header calls a lateral cephalogram): ``Results.nothing_found``, no objects.

    Raises ``NotACephalogram`` (the reason) for an image that is not a lateral cephalogram,
    ``pacs_landmarks.dicom.xray.XRayError`` for one that cannot be used (unreadable, undecodable),
    ``ValueError`` for a 3D model or a found landmark outside the image. Result UIDs follow the image and the
    model (``sr_templates/uids.py``): the same image again gives the same UIDs.
    """
    from pacs_landmarks.dicom.xray import load_xray
    from pacs_landmarks.sr_templates.common import Algorithm

    if getattr(model, "dim", 2) != 2 or not hasattr(model, "predict_image"):
        raise ValueError(f"model {model.name} {model.version} finds landmarks in 3D series, not in X-ray images")
    timings: dict[str, float] = {}
    t = time.perf_counter()
    image = load_xray(item, pixel_spacing=pixel_spacing, require_ceph=False)
    timings["image"] = time.perf_counter() - t
    if image.ceph.verdict == "refused":
        raise NotACephalogram(image.ceph.reason)

    t = time.perf_counter()
    read = model.predict_image(image)
    timings["cascade"] = time.perf_counter() - t
    landmarks = list(read)
    # the image's own reading of the facing replaces the header's (often empty on CR and film) from here on
    image = dataclasses.replace(image, facing=read.facing, facing_source=read.facing_source)
    found = sum(lm.status == FOUND for lm in landmarks)
    if image.ceph.verdict == "unknown" and found < CONFIRM_FRACTION * len(landmarks):
        raise NotACephalogram(
            f"not confirmed as a lateral cephalogram: the header says nothing either way and the model found "
            f"{found} of {len(landmarks)} landmarks")

    t = time.perf_counter()
    landmark_sr, measurements_sr, gsps, values, omitted = build_image_outputs(
        image.header, landmarks, Algorithm.of(model), image.spacing, predecessors)
    timings["outputs"] = time.perf_counter() - t
    results = Results(landmarks, landmark_sr, measurements_sr, None, gsps, timings, values, None, omitted, image)
    if results.nothing_found:
        log.warning("image %s: no landmark found: no result objects", image.sop_instance_uid)
    return results


def image_landmarks_json(results: Results, model_name: str | None = None, model_version: str | None = None) -> dict:
    """The 2D ``landmarks.json`` of an image's results (the form ``pacs-landmarks import`` writes, plus status,
    confidence, the spacing's source and the measurements): ``position_px`` = (column, row) in the image's
    SCOORD pixels (PS3.3 C.18.6.1.2), null unless found; ``pixel_spacing_mm`` = [row, column] or null."""
    from pacs_landmarks.sr_templates.landmark_sr_2d import spacing_text

    image = results.image
    spacing = image.spacing
    return {
        "landmark_set": _set_of(results),
        "sop_instance_uid": image.sop_instance_uid,
        "series_instance_uid": image.series_instance_uid,
        "study_instance_uid": image.study_instance_uid,
        "model": {"name": model_name, "version": model_version} if model_name else None,
        "rows": int(image.shape[0]),
        "columns": int(image.shape[1]),
        "pixel_spacing_mm": [round(spacing.row_mm, 6), round(spacing.col_mm, 6)] if spacing else None,
        "pixel_spacing_source": spacing.source if spacing else None,
        "pixel_spacing": spacing_text(spacing),
        "facing": image.facing,
        "lateral_ceph_evidence": list(image.ceph.evidence),
        "landmarks": [
            {"name": lm.name, "status": lm.status,
             "position_px": [round(float(v), 4) for v in lm.position_px] if lm.position_px is not None
             and lm.status == FOUND else None,
             "confidence": round(float(lm.confidence), 4)}
            for lm in results.landmarks
        ],
        "measurements": [
            {"name": m.name, "value": round(m.value, 3), "unit": m.unit, "range": list(m.range) if m.range else None,
             "outside_range": m.outside_range}
            for m in results.measurements
        ],
        "omitted_measurements": [{"name": o.name, "reason": o.reason} for o in results.omitted],
    }


def _set_of(results: Results) -> str:
    """The landmark set whose names the results have, in order (a 2D model reports every landmark of its set)."""
    from pacs_landmarks.landmark_sets import landmark_names, landmark_sets

    names = [lm.name for lm in results.landmarks]
    return next((s for s in landmark_sets() if landmark_names(s) == names), "ceph19")


def starts_image_job(header: Dataset) -> bool:
    """Whether a stored instance starts an image job (front ends: the node, the Orthanc plugin).

    Every single-frame DX (For Presentation / For Processing) and CR image does, so that a panoramic or a
    chest image ends with a job state that says what it is. A Secondary Capture does only when its header
    does not refuse it: SC is also every screen capture of a CT, MR or ultrasound, and those are not
    scanned film (``dicom.xray.ceph_check``)."""
    from pacs_landmarks.dicom.xray import SECONDARY_CAPTURE, XRAY_CLASSES, ceph_check

    sop_class = str(header.get("SOPClassUID", ""))
    if sop_class not in XRAY_CLASSES or int(header.get("NumberOfFrames", 1) or 1) != 1:
        return False
    return sop_class != SECONDARY_CAPTURE or ceph_check(header).verdict != "refused"


def input_kind(datasets: list[Any]) -> str:
    """"image" for one single-frame X-ray image (``dicom.xray.XRAY_CLASSES``), else "series": what decides
    between ``process_image`` and ``process_series``. Reads only the header of a path."""
    import pydicom

    from pacs_landmarks.dicom.xray import XRAY_CLASSES

    if len(datasets) != 1:
        return "series"
    item = datasets[0]
    if isinstance(item, Dataset):
        ds = item
    else:
        # Anything that is not a readable DICOM file is left to process_series, which says what is wrong.
        try:
            ds = pydicom.dcmread(item, stop_before_pixels=True, specific_tags=["SOPClassUID", "NumberOfFrames"])
        except (OSError, TypeError, ValueError, pydicom.errors.InvalidDicomError):
            return "series"
    single = int(ds.get("NumberOfFrames", 1) or 1) == 1
    return "image" if str(ds.get("SOPClassUID", "")) in XRAY_CLASSES and single else "series"
