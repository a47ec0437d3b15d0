"""``pacs-landmarks import FORMAT SRC OUT``: public cephalogram datasets (obtained by the user) -> our cases.

One case folder per image, named after the image's file stem: ``image.dcm`` (DX For Presentation, the
dataset's pixel size as Imager Pixel Spacing, i.e. at the detector unless told otherwise) and a 2D
``landmarks.json`` (docs/cephalograms.md). Formats (layouts as the datasets ship them):

- ``isbi2015``: ``RawImage/*/NNN.bmp`` with ``AnnotationsByMD/400_senior|400_junior/NNN.txt`` (19 lines "x,y"
  in pixels, then extra lines that are ignored); 0.1 mm per pixel;
- ``aariz``: ``{train,valid,test}/Cephalograms/<id>.png|jpg`` with ``{split}/Annotations/Cephalometric
  Landmarks/{Senior,Junior} Orthodontists/<id>.json`` (landmarks by title) and the per-image pixel size from
  ``cephalogram_machine_mappings.csv``; set ``aariz29`` or the 19 it shares with ISBI (``ceph19``);
- ``labelme``: LabelMe JSON point files (``shapes`` with ``shape_type: point``) matched to images of any
  format OpenCV reads by file stem (the embedded ``imageData`` when there is no file), ``--label-map`` to
  name the labels, ``--pixel-spacing`` required, ``--annotator NAME=DIR`` for one folder per annotator.

Coordinates become DICOM SCOORD pixels (PS3.3 C.18.6.1.2: the top-left corner of the image is (0, 0)). ISBI
and Aariz give integer pixel indices (the pixel's centre is index + 0.5); LabelMe gives canvas coordinates
that already follow the corner convention. ``--coordinates`` overrides either.
"""
from __future__ import annotations

import argparse
import base64
import csv
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pacs_landmarks.errors import CommandError

IMAGE_SUFFIXES = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".pgm", ".ppm", ".webp", ".jp2")
_UID_ROOT = "pacs-landmarks-import"


class ImportError_(Exception):  # noqa: N801 -- not the builtin ImportError
    """Bad or incomplete input; the message says which file and why."""


class CaseError(ImportError_):
    """Bad input that spoils one case only (its annotation or image): ``--skip-bad`` leaves the case out."""

    def __init__(self, stem: str, message: str):
        super().__init__(message)
        self.stem = stem


def _per_case(skipped: list[str] | None, exc: CaseError) -> None:
    """Note a bad case in ``skipped`` (``--skip-bad``), or stop the import with it."""
    if skipped is None:
        raise exc
    skipped.append(str(exc))


@dataclass
class ImportCase:
    """One image and its annotations: ``annotators`` maps a name to {landmark name: (x, y) SCOORD or None}."""

    stem: str
    image: Path | None
    spacing_mm: float
    annotators: dict[str, dict[str, tuple[float, float] | None]]
    embedded: str | None = None  # LabelMe imageData (base64) when there is no image file
    source: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- images
def read_image(path: Path | None, embedded: str | None = None) -> np.ndarray:
    """Grey uint8/uint16 pixels of an image file (OpenCV: BMP, PNG, JPEG, TIFF, ...) or of base64 data."""
    import cv2

    if path is not None:
        data = np.fromfile(str(path), np.uint8)
        label = str(path)
    elif embedded:
        data = np.frombuffer(base64.b64decode(embedded), np.uint8)
        label = "embedded imageData"
    else:
        raise ImportError_("no image")
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if img is None:
        raise ImportError_(f"{label}: not an image OpenCV can read")
    if img.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if img.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        img = cv2.cvtColor(img, code)
    if img.dtype not in (np.uint8, np.uint16):
        raise ImportError_(f"{label}: {img.dtype} pixels; 8- or 16-bit grey or colour images only")
    return np.ascontiguousarray(img)


def _uid(*parts) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[_UID_ROOT, *[str(p) for p in parts]])


def write_case(case: ImportCase, out: Path, set_name: str, fmt: str, *, facing: str = "auto",
               truth: str = "mean") -> Path:
    """Write one case folder; returns it. ``truth``: "mean" of the annotators, or one annotator's name;
    ``facing``: "right", "left", or "auto" (``data.facing_of_points`` on the truth, "right" where it cannot
    tell)."""
    from pacs_landmarks.inference.data import facing_of_points
    from pacs_landmarks.dicom.write import save
    from pacs_landmarks.dicom.xray_write import XRayInfo, xray_dataset
    from pacs_landmarks.landmark_sets import landmark_names

    try:
        pixels = read_image(case.image, case.embedded)
    except ImportError_ as exc:
        raise CaseError(case.stem, f"{case.stem}: {exc}") from None
    rows, cols = pixels.shape
    names = landmark_names(set_name)
    for who, points in case.annotators.items():
        for name, pt in points.items():
            if pt is not None and not (0 <= pt[0] <= cols and 0 <= pt[1] <= rows):
                raise CaseError(case.stem, f"{case.stem}: {who}'s {name} at {pt} lies outside the {cols}x{rows} image")
    if truth == "mean":
        landmarks = {}
        for name in names:
            pts = [a[name] for a in case.annotators.values() if a.get(name) is not None]
            landmarks[name] = tuple(np.mean(pts, axis=0)) if pts else None
    elif truth in case.annotators:
        landmarks = {name: case.annotators[truth].get(name) for name in names}
    else:
        raise ImportError_(f"{case.stem}: no annotator {truth!r} (have {sorted(case.annotators)})")
    if facing == "auto":
        cols_rows = np.array([landmarks[n] if landmarks.get(n) is not None else (np.nan, np.nan) for n in names])
        facing = facing_of_points(names, cols_rows, cols) or "right"
    info = XRayInfo(
        patient_name=f"IMPORT^{case.stem}"[:64], patient_id=case.stem[:64],
        study_instance_uid=_uid(fmt, case.stem, "study"), series_instance_uid=_uid(fmt, case.stem, "series"),
        sop_instance_uid=_uid(fmt, case.stem, "image"), series_description=f"Lateral cephalogram ({fmt})",
        model_name="", manufacturer="", kvp=None,
    )
    s = case.spacing_mm
    ds = xray_dataset(pixels, info, kind="DX", imager_pixel_spacing=(s, s), facing=facing, positioner="CEPHALOSTAT",
                      view_position="LL" if facing == "right" else "RL")
    folder = out / case.stem
    folder.mkdir(parents=True, exist_ok=True)
    save(ds, folder / "image.dcm")

    def listed(points):
        return [{"name": n, "position_px": None if points.get(n) is None else
                 [round(float(points[n][0]), 4), round(float(points[n][1]), 4)]} for n in names]

    doc = {
        "landmark_set": set_name,
        "sop_instance_uid": info.sop_instance_uid,
        "study_instance_uid": info.study_instance_uid,
        "series_instance_uid": info.series_instance_uid,
        "pixel_spacing_mm": [s, s],
        "pixel_spacing_source": "Imager Pixel Spacing (at the detector, as the dataset states the pixel size)",
        "rows": rows,
        "columns": cols,
        "facing": facing,
        "truth": truth,
        "landmarks": listed(landmarks),
        "annotators": {who: listed(points) for who, points in case.annotators.items()},
        "source": {"format": fmt, **case.source},
    }
    (folder / "landmarks.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")
    return folder


# --------------------------------------------------------------------------------------------- formats
def _shift(coordinates: str) -> float:
    return 0.5 if coordinates == "index" else 0.0


def isbi2015_cases(src: Path, spacing: float, coordinates: str,
                   skipped: list[str] | None = None) -> list[ImportCase]:
    from pacs_landmarks.landmark_sets import landmark_names

    names = landmark_names("ceph19")
    images = sorted(p for p in (src / "RawImage").glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ImportError_(f"{src}: no images in RawImage/*/ (is this the ISBI 2015 folder?)")
    ann_dirs = {"senior": src / "AnnotationsByMD" / "400_senior", "junior": src / "AnnotationsByMD" / "400_junior"}
    if not any(d.is_dir() for d in ann_dirs.values()):
        raise ImportError_(f"{src}: no AnnotationsByMD/400_senior or 400_junior")
    d = _shift(coordinates)
    cases = []
    for image in images:
        try:
            annotators = _isbi2015_annotators(image, ann_dirs, names, d)
        except CaseError as exc:
            _per_case(skipped, exc)
            continue
        cases.append(ImportCase(image.stem, image, spacing, annotators,
                                source={"image": str(image.relative_to(src)), "split": image.parent.name}))
    return cases


def _isbi2015_annotators(image: Path, ann_dirs: dict[str, Path], names: list[str], d: float) -> dict:
    """{annotator: {landmark: (x, y)}} of one ISBI image from its text files; ``CaseError`` when bad."""
    annotators = {}
    for who, folder in ann_dirs.items():
        txt = folder / f"{image.stem}.txt"
        if not txt.is_file():
            continue
        lines = [ln.strip() for ln in txt.read_text(encoding="utf-8", errors="replace").splitlines()]
        pts = {}
        for k, name in enumerate(names):
            try:
                x, y = (float(v) for v in lines[k].replace(" ", "").split(",")[:2])
            except (IndexError, ValueError):
                raise CaseError(image.stem, f"{txt}: line {k + 1} should be 'x,y' for {name}") from None
            pts[name] = (x + d, y + d)
        annotators[who] = pts
    if not annotators:
        raise CaseError(image.stem, f"{image}: no annotation file {image.stem}.txt in 400_senior or 400_junior")
    return annotators


def _aariz_spacings(src: Path) -> dict[str, float]:
    found = sorted(src.glob("cephalogram_machine_mappings.csv")) + sorted(src.glob("*/cephalogram_machine_mappings.csv"))
    if not found:
        raise ImportError_(f"{src}: no cephalogram_machine_mappings.csv (the per-image pixel sizes)")
    out: dict[str, float] = {}
    with found[0].open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        if not {"cephalogram_id", "pixel_size"} <= set(reader.fieldnames or ()):
            raise ImportError_(f"{found[0]}: needs the columns cephalogram_id and pixel_size")
        for row in reader:
            try:
                value = float(row["pixel_size"])
            except ValueError:
                raise ImportError_(f"{found[0]}: pixel_size {row['pixel_size']!r} of {row['cephalogram_id']}") from None
            if not (math.isfinite(value) and value > 0):
                raise ImportError_(f"{found[0]}: pixel_size {value} of {row['cephalogram_id']} is not positive")
            out[row["cephalogram_id"].strip()] = value
    return out


def aariz_cases(src: Path, set_name: str, spacing: float | None, coordinates: str,
                skipped: list[str] | None = None) -> list[ImportCase]:
    spacings = None if spacing else _aariz_spacings(src)
    images = sorted(p for split in ("train", "valid", "test") for p in (src / split / "Cephalograms").glob("*")
                    if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ImportError_(f"{src}: no images in train|valid|test/Cephalograms (is this the Aariz folder?)")
    d = _shift(coordinates)
    cases = []
    for image in images:
        try:
            cases.append(_aariz_case(src, image, set_name, spacing, spacings, d))
        except CaseError as exc:
            _per_case(skipped, exc)
    return cases


def _aariz_case(src: Path, image: Path, set_name: str, spacing: float | None, spacings: dict | None,
                d: float) -> ImportCase:
    """One Aariz image with its Senior/Junior annotations and pixel size; ``CaseError`` when bad."""
    from pacs_landmarks.landmark_sets import find_landmark

    split = image.parent.parent
    annotators = {}
    for who in ("Senior", "Junior"):
        path = split / "Annotations" / "Cephalometric Landmarks" / f"{who} Orthodontists" / f"{image.stem}.json"
        if not path.is_file():
            continue
        try:
            items = json.loads(path.read_text(encoding="utf-8"))["landmarks"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CaseError(image.stem, f"{path}: not an Aariz landmark file ({exc})") from None
        pts: dict[str, tuple[float, float] | None] = {}
        for item in items:
            label = item.get("title") or item.get("symbol") or ""
            try:
                name = find_landmark(label, set_name)
            except KeyError:
                if set_name == "aariz29":
                    raise CaseError(image.stem, f"{path}: unknown landmark {label!r}") from None
                continue  # one of the ten that ceph19 does not have
            value = item.get("value") or {}
            try:
                pts[name] = (float(value["x"]) + d, float(value["y"]) + d)
            except (KeyError, TypeError, ValueError):
                pts[name] = None
        annotators[who.lower()] = pts
    if not annotators:
        raise CaseError(image.stem, f"{image}: no Senior/Junior Orthodontists annotation {image.stem}.json")
    if spacing:
        s = spacing
    elif image.stem in spacings:  # type: ignore[operator]
        s = spacings[image.stem]  # type: ignore[index]
    else:
        raise CaseError(image.stem, f"{image}: no pixel size for {image.stem} in cephalogram_machine_mappings.csv")
    return ImportCase(image.stem, image, s, annotators,
                      source={"image": str(image.relative_to(src)), "split": split.name})


def parse_label_map(text: str | None, set_name: str) -> dict[str, str]:
    """``"l1=Sella,l2=Nasion"`` -> {label: set name}; each right-hand side must name a landmark of the set."""
    from pacs_landmarks.landmark_sets import find_landmark

    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        if "=" not in part:
            raise ImportError_(f"--label-map: {part!r} should be LABEL=LANDMARK")
        label, target = (x.strip() for x in part.split("=", 1))
        try:
            out[label] = find_landmark(target, set_name)
        except KeyError as exc:
            raise ImportError_(f"--label-map: {exc.args[0]}") from None
    return out


def labelme_cases(src: Path, annotators: dict[str, Path], set_name: str, spacing: float, label_map: dict[str, str],
                  coordinates: str, skipped: list[str] | None = None) -> list[ImportCase]:
    images: dict[str, Path] = {}
    for p in sorted(src.rglob("*")):
        if p.suffix.lower() in IMAGE_SUFFIXES:
            if p.stem in images:
                raise ImportError_(f"two images with the stem {p.stem!r}: {images[p.stem]} and {p}")
            images[p.stem] = p
    folders = annotators or {"annotator": src}
    d = _shift(coordinates)
    by_stem: dict[str, ImportCase] = {}
    unknown: dict[str, Path] = {}
    bad: set[str] = set()
    for who, folder in folders.items():
        files = sorted(folder.rglob("*.json"))
        if not files:
            raise ImportError_(f"{folder}: no LabelMe .json files")
        for path in files:
            try:
                doc, pts = _labelme_points(path, label_map, set_name, d, unknown)
            except CaseError as exc:
                _per_case(skipped, exc)
                bad.add(exc.stem)  # every annotator's file of a bad case goes
                continue
            case = by_stem.get(path.stem)
            if case is None:
                image = images.get(path.stem)
                embedded = doc.get("imageData") if image is None else None
                if image is None and not embedded:
                    exc = CaseError(path.stem, f"{path}: no image with the stem {path.stem!r} under {src} and no "
                                               "imageData")
                    _per_case(skipped, exc)
                    bad.add(exc.stem)
                    continue
                case = ImportCase(path.stem, image, spacing, {}, embedded=embedded,
                                  source={"image": str(image.relative_to(src)) if image else "imageData"})
                by_stem[path.stem] = case
            case.annotators[who] = pts
    if unknown:
        listed = ", ".join(f"{lab!r} ({p.name})" for lab, p in sorted(unknown.items()))
        raise ImportError_(f"labels not in set {set_name}: {listed}; name them with --label-map LABEL=LANDMARK")
    return [by_stem[k] for k in sorted(by_stem) if k not in bad]


def _labelme_points(path: Path, label_map: dict[str, str], set_name: str, d: float,
                    unknown: dict[str, Path]) -> tuple[dict, dict[str, tuple[float, float] | None]]:
    """(the LabelMe document, {landmark: (x, y)}) of one file; labels outside the set go into ``unknown``."""
    from pacs_landmarks.landmark_sets import find_landmark

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        shapes = doc["shapes"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CaseError(path.stem, f"{path}: not a LabelMe file ({exc})") from None
    pts: dict[str, tuple[float, float] | None] = {}
    for shape in shapes:
        if shape.get("shape_type", "point") != "point":
            continue
        label = str(shape.get("label", ""))
        name = label_map.get(label)
        if name is None:
            try:
                name = find_landmark(label, set_name)
            except KeyError:
                unknown.setdefault(label, path)
                continue
        (x, y), = shape["points"][:1]
        if name in pts:
            raise CaseError(path.stem, f"{path}: two points for {name}")
        pts[name] = (float(x) + d, float(y) + d)
    return doc, pts


# --------------------------------------------------------------------------------------------- CLI
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import", help="turn a public cephalogram dataset into cases (DICOM DX + 2D landmarks.json)",
        description="Read a cephalogram dataset you obtained (ISBI 2015, Aariz, or LabelMe point files) and "
                    "write one case folder per image, named after the image's file stem: image.dcm (DX, the "
                    "pixel size as Imager Pixel Spacing) and landmarks.json (SCOORD pixels, every annotator, "
                    "their mean as the truth). All annotation files are read before anything is written; the "
                    "first bad input stops the import with the file and the reason, unless --skip-bad.")
    p.add_argument("format", choices=("isbi2015", "aariz", "labelme"), help="dataset layout")
    p.add_argument("src", type=Path, metavar="SRC", help="the dataset's folder")
    p.add_argument("out", type=Path, metavar="OUT", help="output folder (one sub-folder per image)")
    p.add_argument("--set", dest="set_name", default=None,
                   help="landmark set: ceph19 (default; isbi2015 always), or aariz29 for aariz/labelme")
    p.add_argument("--pixel-spacing", type=float, default=None, metavar="MM",
                   help="pixel size in mm (isbi2015: default 0.1; aariz: default from the CSV; labelme: required)")
    p.add_argument("--label-map", default=None, metavar="L1=NAME,...",
                   help="labelme: what each label means, e.g. l1=Sella,l2=Nasion (names, abbreviations or aliases)")
    p.add_argument("--annotator", action="append", default=[], metavar="NAME=DIR",
                   help="labelme: a folder of one annotator's JSON files (repeat for several)")
    p.add_argument("--truth", default="mean", help="landmarks.json truth: mean of the annotators (default) or one "
                                                   "annotator's name (isbi2015/aariz: senior, junior)")
    p.add_argument("--coordinates", choices=("index", "corner"), default=None,
                   help="input points are pixel indices (centre = index + 0.5; isbi2015/aariz default) or corner-"
                        "based like DICOM SCOORD (labelme default)")
    p.add_argument("--facing", choices=("auto", "right", "left"), default="auto",
                   help="which way the faces look in the images (Patient Orientation of the DICOM written); "
                        "default auto: from each case's points (face landmarks in front of Sella, Porion, "
                        "Articulare), right where they cannot tell")
    p.add_argument("--overwrite", action="store_true", help="replace case folders that exist already")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out a case whose annotation or image is bad (a label twice, a point outside the "
                        "image, an unreadable file), list each with the reason, and import the rest")
    p.set_defaults(func=_cmd_import)


def _cmd_import(args: argparse.Namespace) -> int:
    from pacs_landmarks.landmark_sets import set_dimension

    fmt = args.format
    set_name = args.set_name or "ceph19"
    try:
        if set_dimension(set_name) != 2:
            raise CommandError(f"--set {set_name}: not a 2D (cephalogram) landmark set")
    except KeyError:
        raise CommandError(f"--set: unknown landmark set {set_name!r}") from None
    if fmt == "isbi2015" and set_name != "ceph19":
        raise CommandError("isbi2015 has the 19 landmarks of ceph19 only")
    if args.pixel_spacing is not None and not (math.isfinite(args.pixel_spacing) and args.pixel_spacing > 0):
        raise CommandError("--pixel-spacing must be a positive number of mm")
    if not args.src.is_dir():
        raise CommandError(f"{args.src} is not a folder")
    if fmt != "labelme" and (args.label_map or args.annotator):
        raise CommandError("--label-map and --annotator are for labelme only")
    coordinates = args.coordinates or ("corner" if fmt == "labelme" else "index")
    skipped: list[str] | None = [] if args.skip_bad else None
    try:
        if fmt == "isbi2015":
            cases = isbi2015_cases(args.src, args.pixel_spacing or 0.1, coordinates, skipped)
        elif fmt == "aariz":
            cases = aariz_cases(args.src, set_name, args.pixel_spacing, coordinates, skipped)
        else:
            if args.pixel_spacing is None:
                raise CommandError("labelme: give the pixel size with --pixel-spacing MM")
            folders = {}
            for item in args.annotator:
                name, _, folder = item.partition("=")
                if not name or not folder or not Path(folder).is_dir():
                    raise CommandError(f"--annotator {item!r}: give NAME=DIR with an existing folder")
                folders[name] = Path(folder)
            cases = labelme_cases(args.src, folders, set_name, args.pixel_spacing,
                                  parse_label_map(args.label_map, set_name), coordinates, skipped)
        existing = [c.stem for c in cases if (args.out / c.stem).exists()]
        if existing and not args.overwrite:
            raise CommandError(f"{len(existing)} case folder(s) exist already in {args.out} (e.g. {existing[0]}); "
                               "use --overwrite to replace them")
        written = 0
        for case in cases:
            try:
                write_case(case, args.out, set_name, fmt, facing=args.facing, truth=args.truth)
                written += 1
            except CaseError as exc:
                _per_case(skipped, exc)
    except CaseError as exc:
        raise CommandError(f"{exc} (--skip-bad leaves such cases out and imports the rest)") from None
    except ImportError_ as exc:
        raise CommandError(str(exc)) from None
    for reason in skipped or ():
        print(f"skipped: {reason}", file=sys.stderr)
    print(f"imported {written} image(s) from {args.src} ({fmt}, set {set_name}) into {args.out}"
          + (f"; {len(skipped)} left out (listed above)" if skipped else ""))
    if not written:
        raise CommandError("no case imported")
    return 0
