"""Training / evaluation cases: a DICOM series plus its ground truth, decoded once and cached as .npz.

A case is a directory holding one CT series and its truth, as ``pacs-landmarks phantom`` writes it:
``landmarks.json`` (``{"landmark_set", "landmarks": [{"name", "position_lps_mm"}]}``), or else a TID 1500
landmark SR (PS3.16 TID 1500) among the files, read with ``pacs_landmarks.sr_templates.read_landmark_sr``.
Decoding a few hundred slices costs seconds; the cache (HU as int16, the affine, the truth) costs
milliseconds, so repeated epochs and evaluations read the cache.

Truth may also be a 3D Slicer markups file (``*.mrk.json``, the format Slicer writes for point lists:
``markups[].controlPoints[]`` with ``label`` and ``position``, in the file's ``coordinateSystem``, RAS or
LPS; RAS points are turned into LPS by negating x and y).  Labels are matched to the landmark set by name or
abbreviation (case-insensitive), or through a label map (``--label-map FILE.json``: ``{"label": "landmark
name"}``).  An unknown label, a point outside the scanned volume or truth in another frame of reference is a
``DataError`` naming the case, never a crash.

A phantom cut to a scan range (``phantom --coverage``) also records, per landmark, whether it lies inside the
scanned volume and how far from its edge (``Case.in_scan``, ``Case.edge_distance``): evaluation scores the
presence output with them.

A 2D case (a cephalogram, as ``phantom --ceph`` and ``import`` write it) is one X-ray image (DX / CR / SC,
read with ``dicom.xray.load_xray``) and a ``landmarks.json`` of a 2D landmark set: ``pixel_spacing_mm``
[row, column] (else the image's own spacing), ``landmarks`` [{"name", "position_px": [column, row] or
null}] in the image's own SCOORD pixels (PS3.3 C.18.6.1.2), optionally ``annotators`` {name: same list}.
The case holds the face-right (canonical) image 0..1 as float16 and its points in mm on it (x = column *
column spacing, y = row * row spacing); null points are NaN (skipped in training and evaluation).  Which way
the face looks comes from the reference points (``facing_of_points``), else from Patient Orientation, so a
clinic's images with an empty or wrong header train the right way round.  Truth is
``landmarks`` unless ``truth`` says "mean" (of the annotators) or an annotator's name.  An unknown landmark
or a point outside the image is a ``DataError``.  Decoding one image costs well under a second, so 2D
cases are not cached.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
CACHE_VERSION = 2


class DataError(Exception):
    """A case directory cannot be used (no series, no truth, wrong landmark set)."""


@dataclass
class Case:
    name: str
    array: np.ndarray  # int16 HU (slices, rows, cols); 2D: float16 0..1 (rows, cols), facing right
    affine: np.ndarray  # 4x4 array index (k, j, i) -> LPS mm (2D: 3x3 (row, column) -> (x, y) mm)
    landmarks: np.ndarray  # (L, 3) LPS mm (2D: (L, 2) mm); NaN where the truth lacks a landmark
    slice_thickness: float
    in_scan: np.ndarray | None = None  # (L,) bool: the true landmark lies inside the scanned volume
    edge_distance: np.ndarray | None = None  # (L,) mm from the edge of the scanned volume (inf: unknown)
    annotators: dict[str, np.ndarray] | None = None  # 2D: each annotator's points (L, 2) mm, as ``landmarks``
    synthetic: bool = False  # a phantom (``pacs-landmarks phantom``), not an imported image

    @property
    def dim(self) -> int:
        return self.array.ndim

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:-1, :-1], axis=0))  # type: ignore[return-value]


def find_cases(data_dir: str | Path) -> list[Path]:
    """Case directories under ``data_dir`` (itself, if it is one), sorted by name."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data directory not found: {root}")
    if (root / "landmarks.json").is_file():
        return [root]
    cases = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                   and ((p / "landmarks.json").is_file() or any(p.glob("*.dcm"))))
    if not cases:
        raise DataError(f"no cases in {root} (expected sub-directories with DICOM files and landmarks.json)")
    return cases


def dicom_files(case_dir: Path) -> list[Path]:
    """Files of a case directory that may be DICOM (*.dcm or no suffix)."""
    return sorted(p for p in case_dir.iterdir() if p.is_file() and p.suffix.lower() in (".dcm", ""))


def _truth_from_json(path: Path, names: list[str], landmark_set: str) -> np.ndarray:
    doc = json.loads(path.read_text(encoding="utf-8"))
    if doc.get("landmark_set", landmark_set) != landmark_set:
        raise DataError(f"{path}: landmark set {doc.get('landmark_set')!r}, expected {landmark_set!r}")
    truth = np.full((len(names), 3), np.nan)
    index = {n: i for i, n in enumerate(names)}
    for item in doc["landmarks"]:
        if item["name"] in index:
            truth[index[item["name"]]] = item["position_lps_mm"]
    return truth


def _scan_flags(path: Path, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    doc = json.loads(path.read_text(encoding="utf-8"))
    index = {n: i for i, n in enumerate(names)}
    in_scan = np.ones(len(names), bool)
    edge = np.full(len(names), np.inf)
    for item in doc["landmarks"]:
        if item["name"] in index:
            in_scan[index[item["name"]]] = bool(item.get("in_scan", True))
            edge[index[item["name"]]] = float(item.get("edge_distance_mm", np.inf))
    return in_scan, edge


def markups_files(case_dir: Path) -> list[Path]:
    return sorted(case_dir.glob("*.mrk.json"))


def read_markups(path: str | Path, names: list[str], landmark_set: str = "craniofacial16",
                 label_map: dict[str, str] | None = None) -> np.ndarray:
    """Truth (L, 3) LPS mm from a 3D Slicer markups file; ``DataError`` for bad truth (see module docstring)."""
    from pacs_landmarks.landmark_sets import load_landmark_set

    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        markups = doc["markups"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a Slicer markups file ({exc})") from None
    lookup = {}
    for d in load_landmark_set(landmark_set)["landmarks"]:
        lookup[d["name"].lower()] = d["name"]
        lookup[d["abbreviation"].lower()] = d["name"]
    for label, name in (label_map or {}).items():
        if name not in names:
            raise DataError(f"label map: {name!r} (for label {label!r}) is not a landmark of {landmark_set!r}")
        lookup[label.strip().lower()] = name
    truth = np.full((len(names), 3), np.nan)
    index = {n: i for i, n in enumerate(names)}
    for m in markups:
        system = str(m.get("coordinateSystem", "LPS")).upper()
        if system not in ("LPS", "RAS"):
            raise DataError(f"{path}: coordinate system {system!r} is neither RAS nor LPS")
        flip = np.array([-1.0, -1.0, 1.0]) if system == "RAS" else np.ones(3)
        for cp in m.get("controlPoints", []):
            label = str(cp.get("label", "")).strip()
            if cp.get("positionStatus", "defined") != "defined":
                continue
            name = lookup.get(label.lower())
            if name is None:
                raise DataError(f"{path}: label {label!r} is not a landmark of {landmark_set!r} "
                                f"(use --label-map to map it)")
            pos = np.asarray(cp["position"], float)
            if pos.shape != (3,) or not np.isfinite(pos).all():
                raise DataError(f"{path}: point {label!r} has no finite 3D position")
            if np.isfinite(truth[index[name]]).all():
                raise DataError(f"{path}: landmark {name!r} is given twice")
            truth[index[name]] = pos * flip
    if not np.isfinite(truth).any():
        raise DataError(f"{path}: no control points")
    return truth


def points_outside_volume(points, array_shape, affine, margin_mm: float = 0.0) -> list[int]:
    """Indices of the finite points (LPS mm) more than ``margin_mm`` outside the volume of ``array_shape`` voxels
    whose voxel -> LPS matrix is ``affine`` (voxel centres at integer indices, so the volume reaches 0.5 voxel
    past them)."""
    affine = np.asarray(affine, float)
    inv = np.linalg.inv(affine)
    slack = margin_mm / np.linalg.norm(affine[:3, :3], axis=0)
    size = np.asarray(array_shape, float)
    outside = []
    for i, p in enumerate(np.asarray(points, float)):
        if not np.isfinite(p).all():
            continue
        idx = inv[:3, :3] @ p + inv[:3, 3]
        if np.any(idx < -0.5 - slack) or np.any(idx > size - 0.5 + slack):
            outside.append(i)
    return outside


def _check_truth_in_volume(case_dir: Path, truth: np.ndarray, array_shape, affine: np.ndarray,
                           names: list[str], margin_mm: float = 5.0) -> None:
    """A true point outside the scanned volume means truth for another series / frame of reference."""
    outside = points_outside_volume(truth, array_shape, affine, margin_mm)
    if outside:
        i = outside[0]
        raise DataError(f"{case_dir}: truth point {names[i]!r} at {np.round(truth[i], 1).tolist()} mm (LPS) is "
                        "outside the scanned volume: truth for another series or frame of reference, or "
                        "RAS/LPS mixed up")


def _truth_from_sr(files: list[Path], names: list[str]) -> np.ndarray | None:
    import pydicom

    try:
        from pacs_landmarks.sr_templates import read_landmark_sr
    except ImportError:
        return None
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        if getattr(ds, "Modality", "") == "SR":
            truth = np.full((len(names), 3), np.nan)
            index = {n: i for i, n in enumerate(names)}
            for lm in read_landmark_sr(pydicom.dcmread(f)):
                if lm.name in index:
                    truth[index[lm.name]] = lm.position_lps_mm
            return truth
    return None


def _cache_key(files: list[Path], truth_file: Path | None) -> str:
    h = hashlib.sha1(str(CACHE_VERSION).encode())
    for f in files + ([truth_file] if truth_file else []):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def detect_landmark_set(data_dir: str | Path) -> str:
    """The landmark set of the first case's ``landmarks.json`` (craniofacial16 when it names none)."""
    for d in find_cases(data_dir):
        f = d / "landmarks.json"
        if f.is_file():
            try:
                return str(json.loads(f.read_text(encoding="utf-8")).get("landmark_set") or "craniofacial16")
            except ValueError as exc:
                raise DataError(f"{f}: not JSON ({exc})") from None
    return "craniofacial16"


def _points_2d(path: Path, items, names: list[str], landmark_set: str, shape: tuple[int, int]) -> np.ndarray:
    """(L, 2) (column, row) SCOORD pixels of the image from a list of {"name", "position_px"} (null -> NaN)."""
    rows, cols = shape
    index = {n: i for i, n in enumerate(names)}
    out = np.full((len(names), 2), np.nan)
    if not isinstance(items, list):
        raise DataError(f"{path}: landmarks must be a list of {{name, position_px}}")
    for item in items:
        name = item.get("name") if isinstance(item, dict) else None
        if name not in index:
            raise DataError(f"{path}: landmark {name!r} is not in landmark set {landmark_set!r}")
        pos = item.get("position_px")
        if pos is None:
            continue
        try:
            c, r = (float(v) for v in pos)
        except (TypeError, ValueError):
            raise DataError(f"{path}: {name}: position_px must be [column, row], not {pos!r}") from None
        if not (0.0 <= c <= cols and 0.0 <= r <= rows):
            raise DataError(f"{path}: {name} at ({c:g}, {r:g}) px lies outside the {cols} x {rows} image")
        out[index[name]] = (c, r)
    return out


# Landmarks in front of the face's vertical and behind it on a lateral cephalogram (any 2D set): which way
# the face looks in an annotated image follows from them, whatever Patient Orientation says or omits.
FACE_FRONT = frozenset({"Nasion", "Soft tissue nasion", "A point", "Anterior nasal spine", "Subnasale", "Pronasale",
                        "Upper incisal incision", "Lower incisal incision", "Upper lip", "Lower lip", "B point",
                        "Pogonion", "Soft tissue pogonion"})
FACE_BACK = frozenset({"Sella", "Porion", "Articulare", "Condylion", "Basion", "Gonion", "Ramus",
                       "Posterior nasal spine"})


def facing_of_points(names: list[str], points: np.ndarray, width: float) -> str | None:
    """"right" or "left": the way the face looks from (L, 2) (column, row) points of a 2D set (NaN where
    missing), the front landmarks' median column right or left of the back ones' by more than 5 % of the
    image ``width``; None when the points cannot tell."""
    cols = np.asarray(points, float)[:, 0]
    front = [c for n, c in zip(names, cols) if n in FACE_FRONT and np.isfinite(c)]
    back = [c for n, c in zip(names, cols) if n in FACE_BACK and np.isfinite(c)]
    if not front or not back:
        return None
    gap = float(np.median(front) - np.median(back))
    if abs(gap) <= 0.05 * width:
        return None
    return "right" if gap > 0 else "left"


def load_case_2d(case_dir: str | Path, names: list[str], landmark_set: str, truth: str | None = None) -> Case:
    """One cephalogram case (module docstring); ``DataError`` naming the case when it cannot be used."""
    from pacs_landmarks.dicom.xray import XRayError, load_xray
    from pacs_landmarks.inference.sampling import image_affine

    case_dir = Path(case_dir)
    path = case_dir / "landmarks.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: {exc}") from None
    if doc.get("landmark_set", landmark_set) != landmark_set:
        raise DataError(f"{path}: landmark set {doc.get('landmark_set')!r}, expected {landmark_set!r}")
    image, errors = None, []
    for f in dicom_files(case_dir):
        try:
            image = load_xray(f, require_ceph=False)
            break
        except XRayError as exc:
            errors.append(str(exc))
    if image is None:
        raise DataError(f"{case_dir}: no X-ray image" + (f" ({'; '.join(errors)})" if errors else ""))
    if doc.get("sop_instance_uid") and image.sop_instance_uid and doc["sop_instance_uid"] != image.sop_instance_uid:
        raise DataError(f"{case_dir}: landmarks.json is for image {doc['sop_instance_uid']}, the file is "
                        f"{image.sop_instance_uid}")
    spacing = doc.get("pixel_spacing_mm")
    if spacing is None and image.spacing is not None:
        spacing = image.spacing.mm
    try:
        sr, sc = (float(v) for v in spacing)
        if not (sr > 0 and sc > 0):
            raise ValueError
    except (TypeError, ValueError):
        raise DataError(f"{case_dir}: no usable pixel spacing ({spacing!r}): give pixel_spacing_mm [row, column] "
                        "in landmarks.json") from None
    shape = image.shape
    annotators = {who: _points_2d(path, pts, names, landmark_set, shape)
                  for who, pts in (doc.get("annotators") or {}).items()}
    if truth in (None, "", "landmarks"):
        points = _points_2d(path, doc.get("landmarks", []), names, landmark_set, shape)
    elif truth == "mean":
        if annotators:
            import warnings

            with warnings.catch_warnings():  # a landmark no annotator placed stays NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                points = np.nanmean(np.stack(list(annotators.values())), axis=0)
        else:
            points = _points_2d(path, doc.get("landmarks", []), names, landmark_set, shape)
    elif truth in annotators:
        points = annotators[truth]
    else:
        raise DataError(f"{case_dir}: no annotator {truth!r} (have {sorted(annotators) or 'none'})")
    face = facing_of_points(names, points, shape[1])
    if face is not None and face != image.facing:
        if image.facing != "unknown":
            log.warning("%s: %s, but the reference points face %s: read facing %s", case_dir.name,
                        image.facing_source, face, face)
        image = dataclasses.replace(image, facing=face, facing_source="the reference points")
    scale = np.array([sc, sr])
    to_mm = lambda px: image.to_canonical(px) * scale  # noqa: E731  own pixels -> canonical mm
    points = to_mm(points)
    annotators = {who: to_mm(pts) for who, pts in annotators.items()}
    if not np.isfinite(points).any():
        raise DataError(f"{path}: no landmark positions")
    pixels = np.ascontiguousarray(image.canonical(), dtype=np.float16)
    return Case(case_dir.name, pixels, image_affine((sr, sc)), points, 0.0, annotators=annotators or None,
                synthetic="seed" in doc and "geometry" in doc)


def case_dimension(case_dir: Path, landmark_set: str) -> int:
    """2 for a cephalogram case (a 2D landmark set), else 3."""
    from pacs_landmarks.landmark_sets import set_dimension

    try:
        return set_dimension(landmark_set)
    except KeyError:
        raise DataError(f"{case_dir}: unknown landmark set {landmark_set!r}") from None


def load_case(case_dir: str | Path, names: list[str], landmark_set: str = "craniofacial16",
              cache_dir: str | Path | None = None, label_map: dict[str, str] | None = None,
              truth: str | None = None) -> Case:
    """Decode (or read from the cache) one case. The cache goes to ``cache_dir`` or ``case_dir/.cache``.
    A case of a 2D landmark set is a cephalogram (``load_case_2d``; ``truth`` chooses its annotator)."""
    case_dir = Path(case_dir)
    if case_dimension(case_dir, landmark_set) == 2:
        return load_case_2d(case_dir, names, landmark_set, truth)
    files = dicom_files(case_dir)
    truth_file = case_dir / "landmarks.json"
    truth_file = truth_file if truth_file.is_file() else None
    markups = markups_files(case_dir) if truth_file is None else []
    if len(markups) > 1:
        raise DataError(f"{case_dir}: {len(markups)} markups files; keep one per case")
    truth_src = truth_file or (markups[0] if markups else None)
    key = _cache_key(files, truth_src)
    if label_map:
        key = hashlib.sha1((key + json.dumps(label_map, sort_keys=True)).encode()).hexdigest()[:16]
    cdir = Path(cache_dir) / case_dir.name if cache_dir else case_dir / ".cache"
    cpath = cdir / f"volume-{key}.npz"
    if cpath.is_file():
        z = np.load(cpath)
        return Case(case_dir.name, z["array"], z["affine"], z["landmarks"], float(z["slice_thickness"]),
                    z["in_scan"], z["edge_distance"])
    markup_truth = read_markups(markups[0], names, landmark_set, label_map) if markups else None

    from pacs_landmarks.dicom.series import SeriesError, load_series

    if not files:
        raise DataError(f"{case_dir}: no DICOM files")
    try:
        volume = load_series(files)  # leaves out non-image instances (e.g. a truth SR) by itself
    except SeriesError as exc:
        raise DataError(f"{case_dir}: {exc}") from None
    in_scan, edge = np.ones(len(names), bool), np.full(len(names), np.inf)
    if truth_file is not None:
        truth = _truth_from_json(truth_file, names, landmark_set)
        in_scan, edge = _scan_flags(truth_file, names)
        doc_for = json.loads(truth_file.read_text(encoding="utf-8")).get("frame_of_reference_uid")
        if doc_for and volume.frame_of_reference_uid and doc_for != volume.frame_of_reference_uid:
            raise DataError(f"{case_dir}: landmarks.json is for frame of reference {doc_for}, the series is in "
                            f"{volume.frame_of_reference_uid}")
    elif markup_truth is not None:
        truth = markup_truth
        _check_truth_in_volume(case_dir, truth, volume.array.shape, np.asarray(volume.affine, float), names)
    else:
        truth = _truth_from_sr(files, names)
        if truth is None:
            raise DataError(f"{case_dir}: no ground truth (landmarks.json, a Slicer *.mrk.json or a landmark SR)")
    thickness = float(getattr(volume.source_headers[0], "SliceThickness", 0) or 0) if volume.source_headers \
        else 0.0
    array = np.clip(np.rint(volume.array), -32768, 32767).astype(np.int16)
    case = Case(case_dir.name, array, np.asarray(volume.affine, float), truth, thickness or volume.spacing[0],
                in_scan, edge)
    cdir.mkdir(parents=True, exist_ok=True)
    # a file of this writer's own: two processes may decode the same case at once (train and evaluate)
    fd, tmp = tempfile.mkstemp(dir=cdir, prefix=f".tmp-{key}-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, array=case.array, affine=case.affine, landmarks=case.landmarks,
                     slice_thickness=case.slice_thickness, in_scan=in_scan, edge_distance=edge)
        Path(tmp).replace(cpath)
    except BaseException:  # a full disk, an interrupt: leave no half-written file behind
        Path(tmp).unlink(missing_ok=True)
        raise
    for old in cdir.glob("volume-*.npz"):
        if old != cpath:
            old.unlink(missing_ok=True)
    return case


def load_cases(data_dir: str | Path, names: list[str], landmark_set: str = "craniofacial16",
               cache_dir: str | Path | None = None, progress: bool = True,
               label_map: dict[str, str] | None = None, truth: str | None = None) -> list[Case]:
    from tqdm import tqdm

    dirs = find_cases(data_dir)
    cases, errors = [], []
    for d in tqdm(dirs, desc="reading cases", unit="case", disable=not progress):
        try:
            cases.append(load_case(d, names, landmark_set, cache_dir, label_map, truth))
        except DataError as exc:  # report every bad case at once, not just the first
            log.error("%s", exc)
            errors.append(str(exc))
    if errors:
        raise DataError(f"{len(errors)} of {len(dirs)} case(s) cannot be used:\n  " + "\n  ".join(errors))
    return cases


def read_label_map(path: str | Path | None) -> dict[str, str] | None:
    """``{"label": "landmark name"}`` from a JSON file (``--label-map``); ``DataError`` if it is not one."""
    if path is None:
        return None
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"label map {path}: {exc}") from None
    if not isinstance(doc, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in doc.items()):
        raise DataError(f"label map {path}: expected a JSON object of label -> landmark name")
    return doc
