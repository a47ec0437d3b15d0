"""Subcommands of the pipeline (see pacs_landmarks.cli): ``infer``, ``read-sr``.

A front end beside ``cli``: ``infer`` runs ``pipeline``, a layer above ``sr_templates`` (tests/test_layers.py).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from pacs_landmarks.errors import CommandError
from pacs_landmarks.inference.landmark import landmark_json

OUTPUT_FILES = {
    "landmark_sr": "landmarks-sr.dcm",
    "measurements_sr": "measurements-sr.dcm",
    "seg": "landmarks-seg.dcm",
    "gsps": "landmarks-gsps.dcm",
    "landmarks_json": "landmarks.json",
}


def register(sub: argparse._SubParsersAction) -> None:
    """Add this part's subcommands; its heavy imports happen inside the handlers."""
    p = sub.add_parser(
        "infer",
        help="find the landmarks in one CT series folder, or in X-ray images (cephalograms), and write SR + "
             "SEG + GSPS results",
        description=(
            "CT: assemble the CT series in INPUT (a folder), run the landmark cascade and write "
            "OUT/landmarks-sr.dcm (TID 1500 landmark SR), OUT/measurements-sr.dcm (cephalometric measurements "
            "SR), OUT/landmarks-seg.dcm (one sphere segment per landmark), OUT/landmarks-gsps.dcm (presentation "
            "state: each landmark as a point with its name) and OUT/landmarks.json. "
            "Lateral cephalograms: INPUT is one X-ray image file (DX, CR or Secondary Capture) or a folder of "
            "them; each gets OUT/landmarks-sr.dcm (SCOORD points on the image), OUT/measurements-sr.dcm, "
            "OUT/landmarks-gsps.dcm (points and the tracing lines) and OUT/landmarks.json (position_px, "
            "pixel_spacing_mm and its source), in OUT/<file name>/ when there are several. Print the landmarks "
            "and the measurements, flagging values outside the typical range."
        ),
    )
    p.add_argument("series_dir", metavar="INPUT", type=Path,
                   help="folder holding the DICOM files of one CT series, or an X-ray image file or folder of them")
    p.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    p.add_argument("--model", type=Path, default=None,
                   help="model file (default: the shipped demo model of CT, or of ceph19 for X-ray images)")
    p.add_argument("--pixel-spacing", metavar="MM[,MM]", default=None,
                   help="X-ray images: pixel size in mm (one value, or row,column) instead of what the header "
                        "says; recorded as the source in every result")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: automatic)")
    p.add_argument("--report-nothing-found", action="store_true",
                   help="when no landmark is found, still write a landmark SR and a measurements SR that say so "
                   "(default: no result objects, only landmarks.json)")
    p.set_defaults(func=infer)

    r = sub.add_parser(
        "read-sr",
        help="print the landmarks of a TID 1500 SR (ours or one corrected in a viewer): 3D, or 2D on an X-ray image",
        description="Read landmark points with tracking identifiers from a TID 1500 SR file -- SCOORD3D (a CT "
        "series, LPS mm) or, when it has none, SCOORD points on one image (a cephalogram, position_px = (column, "
        "row) pixels, with the pixel spacing it states) -- and the landmarks it states as not found or outside "
        "the field of view, and print them as JSON (the same form as landmarks.json, with each landmark's status).",
    )
    r.add_argument("sr_file", metavar="SR_FILE", type=Path, help="DICOM SR file")
    r.set_defaults(func=read_sr)


def landmarks_json(landmarks, volume=None, model=None, measurements=()) -> dict:
    """The landmarks.json document (same keys as the phantom truth files, plus confidence and measurements)."""
    return {
        "landmark_set": getattr(model, "landmark_set", "craniofacial16"),
        "frame_of_reference_uid": getattr(volume, "frame_of_reference_uid", None),
        "series_instance_uid": getattr(volume, "series_instance_uid", None),
        "model": {"name": model.name, "version": model.version} if model is not None else None,
        "landmarks": [landmark_json(lm) for lm in landmarks],
        "measurements": [
            {"name": m.name, "value": round(m.value, 3), "unit": m.unit, "range": list(m.range) if m.range else None,
             "outside_range": m.outside_range}
            for m in measurements
        ],
    }


def format_tables(landmarks, measurements, omitted=()) -> str:
    """The landmark table (every landmark with its status; LPS mm of found ones) and the measurement table
    (with the set's typical range; OUTSIDE when the value is not in it; omitted ones with the reason)."""
    from pacs_landmarks.inference.landmark import landmark_table

    lines = [landmark_table(landmarks), ""]
    lines.append(f"{'measurement':<30} {'value':>8} {'unit':<4} {'typical range':<14}")
    for m in measurements:
        rng = f"{m.range[0]:g}-{m.range[1]:g}" if m.range else ""
        flag = "  OUTSIDE" if m.outside_range else ""
        lines.append(f"{m.name:<30} {m.value:8.1f} {m.unit:<4} {rng:<14}{flag}")
    for om in omitted:
        lines.append(f"{om.name:<30} {'-':>8} {'':<4} {'':<14}  {om.reason}")
    return "\n".join(lines)


def parse_pixel_spacing(text: str | None) -> float | tuple[float, float] | None:
    """``--pixel-spacing``: "0.1" or "0.1,0.12" (row, column) in mm."""
    if text is None:
        return None
    try:
        values = [float(v) for v in str(text).split(",")]
    except ValueError:
        raise CommandError(f"--pixel-spacing {text!r}: give MM or ROW_MM,COLUMN_MM") from None
    if len(values) not in (1, 2) or not all(v > 0 for v in values):
        raise CommandError(f"--pixel-spacing {text!r}: one or two positive values in mm")
    return values[0] if len(values) == 1 else (values[0], values[1])


def xray_inputs(path: Path) -> list[Path] | None:
    """The X-ray image files of ``path`` (a file or a folder) when every DICOM file there is one (an image job
    each, ``jobs.steps.input_kind``); None when it is something else (a CT series). A missing ``path`` is the
    command's error."""
    if not path.exists():
        raise CommandError(f"not a folder of a CT series, nor an X-ray image: {path}")
    import pydicom

    from pacs_landmarks.pipeline import input_kind

    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix.lower() not in (".json", ".txt", ".png", ".html"))
    images = []
    for f in files:
        try:
            kind = input_kind([f])
        except (pydicom.errors.InvalidDicomError, OSError):
            continue
        if kind != "image":
            return None
        images.append(f)
    return images or None


def format_image_tables(results) -> str:
    """The 2D landmark table (SCOORD pixels, status, confidence), the spacing used and the measurements."""
    lines = [f"{'landmark':<24} {'status':<21} {'column':>8} {'row':>8} {'conf':>5}  reason"]
    for lm in results.landmarks:
        col, row = (f"{v:8.2f}" for v in lm.position_px) if lm.position_px is not None and lm.status == "found" \
            else (f"{'-':>8}",) * 2
        lines.append(f"{lm.name:<24} {lm.status:<21} {col} {row} {lm.confidence:5.2f}  "
                     f"{getattr(lm, 'reason', '')}".rstrip())
    from pacs_landmarks.sr_templates.landmark_sr_2d import spacing_text

    lines += ["", f"pixel spacing: {spacing_text(results.image.spacing)}", ""]
    lines.append(f"{'measurement':<30} {'value':>8} {'unit':<4} {'typical range':<14}")
    for m in results.measurements:
        rng = f"{m.range[0]:g}-{m.range[1]:g}" if m.range else ""
        flag = "  OUTSIDE" if m.outside_range else ""
        lines.append(f"{m.name:<30} {m.value:8.1f} {m.unit:<4} {rng:<14}{flag}")
    for om in results.omitted:
        lines.append(f"{om.name:<30} {'-':>8} {'':<4} {'':<14}  {om.reason}")
    return "\n".join(lines)


def infer_images(args: argparse.Namespace, images: list[Path]) -> int:
    """``infer`` on X-ray images: one ``process_image`` each (see the command's description)."""
    from pacs_landmarks.dicom.xray import XRayError
    from pacs_landmarks.inference.model import LandmarkModel, ModelError
    from pacs_landmarks.pipeline import NotACephalogram, image_landmarks_json, process_image

    spacing = parse_pixel_spacing(args.pixel_spacing)
    try:
        model = LandmarkModel.load(args.model, device=args.device,
                                   landmark_set=None if args.model is not None else "ceph19")
    except ModelError as exc:
        raise CommandError(str(exc)) from exc
    if model.dim != 2:
        raise CommandError(f"model {model.name} {model.version} is for 3D CT series, not X-ray images")
    if not model.trained:
        print(f"model {model.name} {model.version} is UNTRAINED: its landmarks are meaningless")
    refused = 0
    for image in images:
        out = args.out if len(images) == 1 else args.out / image.stem
        try:
            results = process_image(image, model, pixel_spacing=spacing)
        except NotACephalogram as exc:
            print(f"{image.name}: not analysed: {exc}")
            refused += 1
            continue
        except XRayError as exc:
            raise CommandError(str(exc)) from exc
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for kind, ds in results.objects().items():
            ds.save_as(out / OUTPUT_FILES[kind], enforce_file_format=True)
            written.append(OUTPUT_FILES[kind])
        doc = image_landmarks_json(results, model.name, model.version)
        (out / OUTPUT_FILES["landmarks_json"]).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        written.append(OUTPUT_FILES["landmarks_json"])
        print(f"{image.name} ({results.image.sop_class_uid and results.image.modality}, facing "
              f"{results.image.facing})")
        print(format_image_tables(results))
        print("  ".join(f"{k} {v:.2f} s" for k, v in results.timings.items()))
        if results.nothing_found:
            print("no landmark found: no SR or GSPS written")
        print(f"wrote {', '.join(written)} to {out}\n")
    if refused == len(images):
        raise CommandError("no image was a lateral cephalogram")
    return 0


def infer(args: argparse.Namespace) -> int:
    images = xray_inputs(args.series_dir)
    if images:
        return infer_images(args, images)
    if args.pixel_spacing is not None:
        raise CommandError("--pixel-spacing is for X-ray images; a CT series has its own geometry")
    if not args.series_dir.is_dir():
        raise CommandError(f"not a folder of a CT series, nor an X-ray image: {args.series_dir}")
    files = sorted(p for p in args.series_dir.rglob("*") if p.is_file() and p.suffix.lower() not in (".json", ".txt"))
    if not files:
        raise CommandError(f"no files in {args.series_dir}")

    from pacs_landmarks.dicom.series import SeriesError
    from pacs_landmarks.inference.model import LandmarkModel, ModelError
    from pacs_landmarks.pipeline import process_series

    try:
        model = LandmarkModel.load(args.model, device=args.device)
    except ModelError as exc:
        raise CommandError(str(exc)) from exc
    try:
        results = process_series(files, model, results_when_nothing_found=args.report_nothing_found)
    except SeriesError as exc:
        raise CommandError(f"cannot assemble the series: {exc}") from exc

    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, ds in results.objects().items():
        ds.save_as(args.out / OUTPUT_FILES[kind], enforce_file_format=True)
        written.append(OUTPUT_FILES[kind])
    doc = landmarks_json(results.landmarks, results.volume, model, results.measurements)
    (args.out / OUTPUT_FILES["landmarks_json"]).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    written.append(OUTPUT_FILES["landmarks_json"])

    print(format_tables(results.landmarks, results.measurements, results.omitted))
    print("\n" + "  ".join(f"{k} {v:.2f} s" for k, v in results.timings.items()))
    if results.nothing_found:
        print("no landmark found: " + ("SRs that say so written, no SEG" if args.report_nothing_found
                                       else "no SR or SEG written"))
    print(f"wrote {', '.join(written)} to {args.out}")
    return 0


def read_sr(args: argparse.Namespace) -> int:
    import pydicom

    from pacs_landmarks.sr_templates.readback import read_landmark_sr

    try:
        ds = pydicom.dcmread(args.sr_file)
        if not _has_scoord3d(ds.get("ContentSequence")):
            print(json.dumps(read_sr_2d(ds), indent=1))
            return 0
        landmarks = read_landmark_sr(ds, include_missing=True)
    except (OSError, pydicom.errors.InvalidDicomError, ValueError) as exc:
        raise CommandError(f"{args.sr_file}: {exc}") from exc
    doc = landmarks_json(landmarks)
    doc["frame_of_reference_uid"] = None
    print(json.dumps(doc, indent=1))
    return 0


def _has_scoord3d(items) -> bool:
    for item in items or []:
        if item.get("ValueType") == "SCOORD3D" or _has_scoord3d(item.get("ContentSequence")):
            return True
    return False


def read_sr_2d(ds) -> dict:
    """A 2D landmark SR as landmarks.json (position_px, statuses, the pixel spacing it states)."""
    from pacs_landmarks.landmark_sets import landmark_sets, set_dimension
    from pacs_landmarks.sr_templates.landmark_sr_2d import read_landmark_sr_2d, read_spacing_2d

    best = None
    for name in (s for s in landmark_sets() if set_dimension(s) == 2):
        try:
            landmarks = read_landmark_sr_2d(ds, name, include_missing=True)
        except ValueError:
            continue
        from pacs_landmarks.landmark_sets import landmark_names

        known = sum(lm.name in landmark_names(name) for lm in landmarks)
        if best is None or known > best[0]:
            best = (known, name, landmarks)
    if best is None:
        raise ValueError("the SR holds no landmark point (SCOORD3D, or SCOORD POINT on an image)")
    _, set_name, landmarks = best
    spacing, source = read_spacing_2d(ds)
    evidence = ds.get("CurrentRequestedProcedureEvidenceSequence") or []
    image = None
    for study in evidence:
        for series in study.get("ReferencedSeriesSequence", []):
            for ref in series.get("ReferencedSOPSequence", []):
                image = str(ref.ReferencedSOPInstanceUID)
    return {
        "landmark_set": set_name,
        "sop_instance_uid": image,
        "pixel_spacing_mm": list(spacing) if spacing else None,
        "pixel_spacing": source or None,
        "landmarks": [{"name": lm.name, "status": lm.status,
                       "position_px": [round(v, 4) for v in lm.position_px] if lm.position_px else None,
                       "confidence": round(float(lm.confidence), 4)} for lm in landmarks],
    }
