"""Subcommands of this part of the package (see pacs_landmarks.cli): ``infer``, ``read-sr``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

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
        help="find the landmarks in one CT series folder and write SR + SEG + GSPS results",
        description=(
            "Assemble the CT series in SERIES_DIR, run the landmark cascade and write OUT/landmarks-sr.dcm "
            "(TID 1500 landmark SR), OUT/measurements-sr.dcm (cephalometric measurements SR), "
            "OUT/landmarks-seg.dcm (one sphere segment per landmark), OUT/landmarks-gsps.dcm (presentation "
            "state: each landmark as a point with its name) and OUT/landmarks.json; print the "
            "landmarks and the measurements, flagging values outside the typical range."
        ),
    )
    p.add_argument("series_dir", metavar="SERIES_DIR", type=Path, help="folder holding the DICOM files of one series")
    p.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    p.add_argument("--model", type=Path, default=None, help="model file (default: the shipped demo model)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: automatic)")
    p.add_argument("--report-nothing-found", action="store_true",
                   help="when no landmark is found, still write a landmark SR and a measurements SR that say so "
                   "(default: no result objects, only landmarks.json)")
    p.set_defaults(func=infer)

    r = sub.add_parser(
        "read-sr",
        help="print the 3D landmarks of a TID 1500 SR (ours or one corrected in a viewer)",
        description="Read SCOORD3D landmark points with tracking identifiers from a TID 1500 SR file, and the "
        "landmarks it states as not found or outside the field of view, and print them as JSON (the same form "
        "as landmarks.json, with each landmark's status).",
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


def infer(args: argparse.Namespace) -> int:
    from pacs_landmarks.cli import CommandError

    if not args.series_dir.is_dir():
        raise CommandError(f"not a folder: {args.series_dir}")
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

    from pacs_landmarks.cli import CommandError
    from pacs_landmarks.sr_templates.readback import read_landmark_sr

    try:
        ds = pydicom.dcmread(args.sr_file)
        landmarks = read_landmark_sr(ds, include_missing=True)
    except (OSError, pydicom.errors.InvalidDicomError, ValueError) as exc:
        raise CommandError(f"{args.sr_file}: {exc}") from exc
    doc = landmarks_json(landmarks)
    doc["frame_of_reference_uid"] = None
    print(json.dumps(doc, indent=1))
    return 0
