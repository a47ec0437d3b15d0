"""Subcommands of this part of the package (see pacs_landmarks.cli): ``inspect``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add this part's subcommands; its heavy imports happen inside the handlers."""
    p = sub.add_parser(
        "inspect",
        help="show how the DICOM files in a folder would be assembled into CT volumes",
        description=(
            "Group the DICOM files under DIR (recursively) by series and, for each series, show what the "
            "loader would build from the headers alone: Series Instance UID, modality, SOP class, slices used, "
            "volume shape and spacing (mm), gantry tilt (degrees), whether the slices are resampled, and every "
            "file left out with the reason. A DICOMDIR (a CD/USB export's directory, PS3.10) is reported as such "
            "and followed to the files it references. Files that are not DICOM are listed too. No pixel data is "
            "decoded."
        ),
    )
    p.add_argument("directory", metavar="DIR", type=Path, help="folder with DICOM files (searched recursively)")
    p.add_argument("--json", action="store_true", help="print the same report as JSON")
    p.set_defaults(func=inspect_command)


def inspect_report(directory: Path) -> dict:
    """The report `inspect` prints, as plain data."""
    from pacs_landmarks.dicom.series import SeriesError, sop_class_name, plan_series, scan

    groups, unreadable, directories = scan([directory])
    series = []
    for uid, files in sorted(groups.items()):
        entry: dict = {"series_instance_uid": uid, "files": len(files)}
        try:
            plan = plan_series(files)
        except SeriesError as exc:
            entry["error"] = str(exc)
            entry["excluded"] = [{"source": e.source, "reason": e.reason} for e in exc.excluded]
            series.append(entry)
            continue
        first = plan.first
        entry.update(
            modality=str(first.get("Modality", "")),
            sop_classes=sorted({sop_class_name(f.sop_class_uid) for f in plan.frames}),
            slices_used=len(plan.frames),
            shape=list(plan.shape),
            spacing_mm=[round(s, 4) for s in plan.spacing],
            gantry_tilt_deg=round(plan.gantry_tilt_deg, 3),
            resampled=plan.resampled,
            excluded=[{"source": e.source, "reason": e.reason} for e in plan.excluded],
        )
        series.append(entry)
    return {
        "directory": str(directory),
        "series": series,
        "dicomdirs": [{"source": d.source, "referenced_files": len(d.files) + len(d.missing), "missing": d.missing,
                       "description": d.describe()} for d in directories],
        "not_dicom": [{"source": e.source, "reason": e.reason} for e in unreadable],
    }


def _print_text(report: dict) -> None:
    print(f"{report['directory']}: {len(report['series'])} series, {len(report['not_dicom'])} non-DICOM file(s)")
    for d in report["dicomdirs"]:
        print(f"\n{d['source']}: {d['description']}")
        for m in d["missing"]:
            print(f"  missing         {m}: referenced but not on the medium")
    for s in report["series"]:
        print(f"\nseries {s['series_instance_uid'] or '(no Series Instance UID)'} ({s['files']} file(s))")
        if "error" in s:
            print(f"  cannot be loaded: {s['error']}")
            for e in s["excluded"]:
                print(f"  excluded        {e['source']}: {e['reason']}")
            continue
        print(f"  modality        {s['modality']}")
        print(f"  SOP class       {', '.join(s['sop_classes'])}")
        print(f"  slices used     {s['slices_used']}")
        print(f"  volume shape    {' x '.join(str(n) for n in s['shape'])} (slices, rows, columns)")
        print(f"  spacing (mm)    {' x '.join(f'{x:g}' for x in s['spacing_mm'])}")
        print(f"  gantry tilt     {s['gantry_tilt_deg']:g} deg")
        print(f"  resampled       {'yes' if s['resampled'] else 'no'}")
        for e in s["excluded"]:
            print(f"  excluded        {e['source']}: {e['reason']}")
    for e in report["not_dicom"]:
        print(f"\nnot DICOM: {e['source']}: {e['reason']}")


def inspect_command(args: argparse.Namespace) -> int:
    from pacs_landmarks.cli import CommandError

    if not args.directory.is_dir():
        raise CommandError(f"{args.directory} is not a folder")
    report = inspect_report(args.directory)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_text(report)
    return 0
