"""Training / evaluation cases: a DICOM series plus its ground truth, decoded once and cached as .npz.

A case is a directory holding one CT series and its truth, as ``pacs-landmarks phantom`` writes it:
``landmarks.json`` (``{"landmark_set", "landmarks": [{"name", "position_lps_mm"}]}``), or else a TID 1500
landmark SR (PS3.16 TID 1500) among the files, read with ``pacs_landmarks.sr_templates.read_landmark_sr``.
Decoding a few hundred slices costs seconds; the cache (HU as int16, the affine, the truth) costs
milliseconds, so repeated epochs and evaluations read the cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
CACHE_VERSION = 1


class DataError(Exception):
    """A case directory cannot be used (no series, no truth, wrong landmark set)."""


@dataclass
class Case:
    name: str
    array: np.ndarray  # int16 HU (slices, rows, cols)
    affine: np.ndarray  # 4x4 array index (k, j, i) -> LPS mm
    landmarks: np.ndarray  # (L, 3) LPS mm; NaN where the truth lacks a landmark
    slice_thickness: float

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]


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


def load_case(case_dir: str | Path, names: list[str], landmark_set: str = "craniofacial16",
              cache_dir: str | Path | None = None) -> Case:
    """Decode (or read from the cache) one case. The cache goes to ``cache_dir`` or ``case_dir/.cache``."""
    case_dir = Path(case_dir)
    files = dicom_files(case_dir)
    truth_file = case_dir / "landmarks.json"
    truth_file = truth_file if truth_file.is_file() else None
    key = _cache_key(files, truth_file)
    cdir = Path(cache_dir) / case_dir.name if cache_dir else case_dir / ".cache"
    cpath = cdir / f"volume-{key}.npz"
    if cpath.is_file():
        z = np.load(cpath)
        return Case(case_dir.name, z["array"], z["affine"], z["landmarks"], float(z["slice_thickness"]))

    from pacs_landmarks.dicom.series import SeriesError, load_series

    if not files:
        raise DataError(f"{case_dir}: no DICOM files")
    try:
        volume = load_series(files)  # leaves out non-image instances (e.g. a truth SR) by itself
    except SeriesError as exc:
        raise DataError(f"{case_dir}: {exc}") from None
    if truth_file is not None:
        truth = _truth_from_json(truth_file, names, landmark_set)
    else:
        truth = _truth_from_sr(files, names)
        if truth is None:
            raise DataError(f"{case_dir}: no ground truth (landmarks.json or a landmark SR)")
    thickness = float(getattr(volume.source_headers[0], "SliceThickness", 0) or 0) if volume.source_headers \
        else 0.0
    array = np.clip(np.rint(volume.array), -32768, 32767).astype(np.int16)
    case = Case(case_dir.name, array, np.asarray(volume.affine, float), truth, thickness or volume.spacing[0])
    cdir.mkdir(parents=True, exist_ok=True)
    tmp = cdir / f".tmp-{key}.npz"
    np.savez(tmp, array=case.array, affine=case.affine, landmarks=case.landmarks,
             slice_thickness=case.slice_thickness)
    tmp.replace(cpath)
    for old in cdir.glob("volume-*.npz"):
        if old != cpath:
            old.unlink(missing_ok=True)
    return case


def load_cases(data_dir: str | Path, names: list[str], landmark_set: str = "craniofacial16",
               cache_dir: str | Path | None = None, progress: bool = True) -> list[Case]:
    from tqdm import tqdm

    dirs = find_cases(data_dir)
    cases = []
    for d in tqdm(dirs, desc="reading cases", unit="case", disable=not progress):
        cases.append(load_case(d, names, landmark_set, cache_dir))
    return cases
