"""Real heads with reference points placed by hand: the JSON that holds them, and the InVesalius reader.

A *reference-point file* (one per head, ``pacs_landmarks/inference/real/*.json``) says where a careful reader
put each landmark of a set on one public real head CT, and how sure they are.  The images themselves are
never in the repository: they are fetched from their public source (recorded in the file with its commit or
package version) at training or evaluation time, and joined with the points here into an ordinary case
directory (a DICOM series + ``landmarks.json``, see ``data.py``) that ``train`` and ``evaluate`` read.

File format (``format_version`` 1)::

    {"format": "pacs-landmarks reference points", "format_version": 1, "landmark_set": "craniofacial16",
     "head": "vhm-male-head", "use": "training" | "evaluation",
     "source": {"repository": "owner/name", "commit": "...", "path": "..."}   # or {"package", "version", "file"}
     "frame_of_reference_uid": "...",         # the series' Frame of Reference UID (PS3.3 C.7.4.1)
     "coordinate_system": "LPS",              # the DICOM patient frame (PS3.3 C.7.6.2.1.1)
     "landmarks": [{"name", "status": "found" | "outside_field_of_view",
                    "position_lps_mm": [x, y, z] | null, "uncertainty_mm", "note"}]}

Every landmark of the set appears once.  A landmark whose anatomy is not in the scan is
``outside_field_of_view`` and has no position: it is never a point.  ``RealHeadError`` names the file and
the landmark for an unknown landmark, a missing or repeated one, a bad status, a point outside the volume or
points for another frame of reference.

InVesalius projects (``.inv3``: a gzip tar holding ``main.plist`` and a raw int16 ``matrix.dat``) keep only
the voxel matrix, its spacing and the acquisition orientation, not the DICOM geometry.  ``read_inv3`` puts
the matrix back into the patient frame the way InVesalius read it (``imagedata_utils.dcm2memmap``: axial
slices stacked in position order, each slice's rows reversed): axis 0 runs inferior to superior, axis 1
anterior to posterior once reversed back, axis 2 along the image rows, i.e. towards the patient's left for
the usual axial orientation (1, 0, 0, 0, 1, 0).  The origin is not stored and is set to (0, 0, 0); a Frame of
Reference UID is derived from the matrix's content so that reference points stay tied to it.
"""
from __future__ import annotations

import hashlib
import json
import math
import plistlib
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pacs_landmarks.errors import CommandError

FORMAT = "pacs-landmarks reference points"
STATUSES = ("found", "outside_field_of_view")
REFERENCE_DIR = Path(__file__).parent / "real"


class RealHeadError(Exception):
    """A reference-point file, or its pairing with a series, cannot be used."""


@dataclass
class ReferencePoints:
    path: Path
    head: str
    use: str
    landmark_set: str
    names: list[str]
    positions: np.ndarray  # (L, 3) LPS mm; NaN where outside_field_of_view
    status: list[str]
    uncertainty_mm: np.ndarray  # (L,) NaN where outside_field_of_view
    notes: list[str]
    source: dict
    frame_of_reference_uid: str | None
    doc: dict = field(repr=False, default_factory=dict)

    @property
    def found(self) -> np.ndarray:
        return np.array([s == "found" for s in self.status])

    def source_label(self) -> str:
        s = self.source
        if "repository" in s:
            return f"{s['repository']}@{s.get('commit', '?')}:{s.get('path', '')}"
        return f"{s.get('package', '?')}={s.get('version', '?')}:{s.get('file', '')}"


def load_reference(path: str | Path) -> ReferencePoints:
    """Read and check one reference-point file (see the module docstring); ``RealHeadError`` if it is bad."""
    from pacs_landmarks.landmark_sets import load_landmark_set

    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RealHeadError(f"{path}: cannot read reference points ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise RealHeadError(f"{path}: not a reference-point file (format must be {FORMAT!r})")
    if doc.get("format_version") != 1:
        raise RealHeadError(f"{path}: format_version {doc.get('format_version')!r} is not supported (1)")
    if str(doc.get("coordinate_system", "LPS")).upper() != "LPS":
        raise RealHeadError(f"{path}: coordinate_system must be LPS (the DICOM patient frame)")
    set_name = doc.get("landmark_set", "")
    try:
        names = [d["name"] for d in load_landmark_set(set_name)["landmarks"]]
    except Exception as exc:  # an unknown set is the file's fault, whatever the loader raises
        raise RealHeadError(f"{path}: landmark set {set_name!r}: {exc}") from None
    if doc.get("use") not in ("training", "evaluation"):
        raise RealHeadError(f"{path}: use must be 'training' or 'evaluation', not {doc.get('use')!r}")
    source = doc.get("source")
    if not isinstance(source, dict) or not (("repository" in source and "commit" in source)
                                            or ("package" in source and "version" in source)):
        raise RealHeadError(f"{path}: source must name a repository + commit or a package + version")
    index = {n: i for i, n in enumerate(names)}
    pos = np.full((len(names), 3), np.nan)
    unc = np.full(len(names), np.nan)
    status: list[str | None] = [None] * len(names)
    notes = [""] * len(names)
    for item in doc.get("landmarks", []):
        name = item.get("name")
        if name not in index:
            raise RealHeadError(f"{path}: {name!r} is not a landmark of {set_name!r}")
        i = index[name]
        if status[i] is not None:
            raise RealHeadError(f"{path}: landmark {name!r} is given twice")
        st = item.get("status")
        if st not in STATUSES:
            raise RealHeadError(f"{path}: landmark {name!r}: status {st!r} is not one of {STATUSES}")
        status[i] = st
        notes[i] = str(item.get("note", ""))
        p = item.get("position_lps_mm")
        if st == "found":
            try:
                p = np.asarray(p, float)
            except (TypeError, ValueError):
                p = np.array([np.nan])
            if p.shape != (3,) or not np.isfinite(p).all():
                raise RealHeadError(f"{path}: landmark {name!r} is found but has no finite 3D position")
            u = item.get("uncertainty_mm")
            if not isinstance(u, (int, float)) or not (0 < u < 20):
                raise RealHeadError(f"{path}: landmark {name!r}: uncertainty_mm must be a number of mm (0-20)")
            pos[i], unc[i] = p, float(u)
        elif p is not None:
            raise RealHeadError(f"{path}: landmark {name!r} is outside_field_of_view and must have no position")
    missing = [n for n, s in zip(names, status) if s is None]
    if missing:
        raise RealHeadError(f"{path}: no entry for {', '.join(missing)} (every landmark needs a status)")
    return ReferencePoints(path, str(doc.get("head", path.stem)), doc["use"], set_name, names, pos,
                           [str(s) for s in status], unc, notes, source, doc.get("frame_of_reference_uid"), doc)


def reference_files(directory: str | Path = REFERENCE_DIR) -> list[Path]:
    return sorted(Path(directory).glob("*.json"))


def check_against_volume(ref: ReferencePoints, array_shape, affine: np.ndarray,
                         frame_of_reference_uid: str | None, margin_mm: float = 0.0) -> None:
    """``RealHeadError`` if the points belong to another frame of reference or lie outside the volume."""
    if ref.frame_of_reference_uid and frame_of_reference_uid and \
            ref.frame_of_reference_uid != frame_of_reference_uid:
        raise RealHeadError(f"{ref.path}: points are for frame of reference {ref.frame_of_reference_uid}, "
                             f"the series is in {frame_of_reference_uid}")
    from pacs_landmarks.inference.data import points_outside_volume

    outside = points_outside_volume(ref.positions, array_shape, affine, margin_mm)
    if outside:
        i = outside[0]
        raise RealHeadError(f"{ref.path}: {ref.names[i]!r} at {np.round(ref.positions[i], 1).tolist()} mm (LPS) "
                            "is outside the scanned volume: points for another series, or RAS/LPS mixed up")


def truth_document(ref: ReferencePoints, series_uid: str | None = None) -> dict:
    """``landmarks.json`` for a case made from a real head: found points only; the rest are not in the scan
    (``in_scan`` false), so evaluation scores presence for them and no error."""
    doc = {"landmark_set": ref.landmark_set, "frame_of_reference_uid": ref.frame_of_reference_uid,
           "series_instance_uid": series_uid, "real_head": ref.head, "source": ref.source_label(),
           "landmarks": []}
    for name, p, st, u in zip(ref.names, ref.positions, ref.status, ref.uncertainty_mm):
        if st == "found":
            doc["landmarks"].append({"name": name, "position_lps_mm": [round(float(v), 3) for v in p],
                                     "uncertainty_mm": float(u)})
    doc["outside_field_of_view"] = [n for n, st in zip(ref.names, ref.status) if st != "found"]
    return doc


def make_case(ref: ReferencePoints, series_dir: str | Path, out_dir: str | Path) -> Path:
    """A case directory for ``train``/``evaluate``: links to the series' files + ``landmarks.json``.

    The series is read once to check the points against its frame of reference and volume."""
    from pacs_landmarks.dicom.series import load_series
    from pacs_landmarks.inference.data import dicom_files

    series_dir, out = Path(series_dir), Path(out_dir)
    files = dicom_files(series_dir)
    if not files:
        raise RealHeadError(f"{series_dir}: no DICOM files")
    volume = load_series(files)
    check_against_volume(ref, volume.array.shape, np.asarray(volume.affine, float), volume.frame_of_reference_uid)
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        link = out / (f.name if f.suffix.lower() == ".dcm" else f.name + ".dcm")
        if not link.exists():
            link.symlink_to(f.resolve())
    (out / "landmarks.json").write_text(json.dumps(truth_document(ref, volume.series_instance_uid), indent=1),
                                        encoding="utf-8")
    return out


# ------------------------------------------------------------------------------------------ InVesalius
@dataclass
class Inv3Volume:
    array: np.ndarray  # int16 HU, (slices, rows, cols) = (inferior->superior, anterior->posterior, R->L)
    affine: np.ndarray  # 4x4 index (k, j, i) -> LPS mm
    spacing: tuple[float, float, float]  # (x, y, z) mm as InVesalius stores it
    name: str
    frame_of_reference_uid: str


def read_inv3(path: str | Path) -> Inv3Volume:
    """The CT matrix of an InVesalius project file in the patient frame (see the module docstring)."""
    path = Path(path)
    try:
        tar = tarfile.open(path, "r:gz")
    except (OSError, tarfile.TarError) as exc:
        raise RealHeadError(f"{path}: not an InVesalius project (gzip tar): {exc}") from None
    with tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        if "main.plist" not in members:
            raise RealHeadError(f"{path}: no main.plist")
        main = plistlib.load(tar.extractfile(members["main.plist"]))
        matrix = main.get("matrix", {})
        fname = matrix.get("filename", "matrix.dat")
        if fname not in members:
            raise RealHeadError(f"{path}: no {fname}")
        shape = tuple(int(v) for v in matrix.get("shape", ()))
        dtype = np.dtype(matrix.get("dtype", "int16")).newbyteorder("<")
        raw = tar.extractfile(members[fname]).read()
    if main.get("orientation", 1) not in (1, "AXIAL"):
        raise RealHeadError(f"{path}: only axial InVesalius projects are supported "
                             f"(orientation {main.get('orientation')!r})")
    if len(shape) != 3 or math.prod(shape) * dtype.itemsize != len(raw):
        raise RealHeadError(f"{path}: matrix shape {shape} does not match {len(raw)} bytes of {dtype}")
    array = np.frombuffer(raw, dtype=dtype).reshape(shape).astype(np.int16)
    sx, sy, sz = (float(v) for v in main.get("spacing", (1.0, 1.0, 1.0)))
    # InVesalius reversed each slice's rows (first row = most posterior): reverse back to DICOM row order,
    # so row index j runs anterior -> posterior (+y in LPS).
    array = np.ascontiguousarray(array[:, ::-1, :])
    affine = np.array([[0, 0, sx, 0], [0, sy, 0, 0], [sz, 0, 0, 0], [0, 0, 0, 1]], float)
    digest = hashlib.sha1(raw[: 1 << 20] + repr((shape, sx, sy, sz)).encode()).hexdigest()
    for_uid = "2.25." + str(int(digest[:30], 16))
    return Inv3Volume(array, affine, (sx, sy, sz), str(main.get("name", path.stem)), for_uid)


def write_inv3_series(path: str | Path, out_dir: str | Path) -> Path:
    """An InVesalius project as a CT Image Storage series (one file per axial slice, PS3.3 A.3)."""
    from pacs_landmarks.dicom.write import SeriesInfo, save, slice_dataset

    vol = read_inv3(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = "2.25." + str(int(hashlib.sha1(vol.frame_of_reference_uid.encode()).hexdigest()[:28], 16))
    info = SeriesInfo(patient_name="INVESALIUS^CRANIUM", patient_id="INV3-" + vol.frame_of_reference_uid[-8:],
                      study_instance_uid=root + ".1", series_instance_uid=root + ".2",
                      frame_of_reference_uid=vol.frame_of_reference_uid,
                      series_description=f"InVesalius {vol.name}"[:64], model_name="InVesalius project",
                      manufacturer="unknown")
    sx, sy, sz = vol.spacing
    for k in range(vol.array.shape[0]):
        ds = slice_dataset(vol.array[k].astype(np.float32), info=info, sop_instance_uid=f"{root}.3.{k + 1}",
                           instance_number=k + 1, position=(0.0, 0.0, k * sz), orientation=(1, 0, 0, 0, 1, 0),
                           pixel_spacing=(sy, sx), slice_thickness=sz)
        save(ds, out / f"IM{k + 1:04d}.dcm")
    return out


def _cmd_real_case(args) -> int:
    try:
        ref = load_reference(args.reference)
        series = args.series
        if str(series).endswith(".inv3"):
            series = write_inv3_series(series, Path(args.out) / ".series")
        out = make_case(ref, series, args.out)
    except RealHeadError as exc:
        raise CommandError(str(exc)) from None
    print(f"real-case: {out} ({int(ref.found.sum())} reference points, {ref.source_label()})")
    return 0


def register(sub) -> None:
    p = sub.add_parser("real-case", help="join a real head's series with its reference points into a case",
                       description="Make a case directory (the series' files linked + landmarks.json) from a "
                                   "real head CT and its reference-point file (pacs_landmarks/inference/real/). "
                                   "An InVesalius .inv3 project is first written as a CT series.")
    p.add_argument("reference", help="reference-point JSON")
    p.add_argument("series", help="directory of the head's DICOM series, or an InVesalius .inv3 file")
    p.add_argument("--out", required=True, help="case directory to write")
    p.set_defaults(func=_cmd_real_case)


def record_training(model_path: str | Path, heads: list[str], recipe: str,
                    directory: str | Path = REFERENCE_DIR) -> dict:
    """Write into a model file's metadata (``training.real_heads``) which real heads made it: each head's
    source (repository + commit or package + version), its reference-point file and that file's SHA-1."""
    import os

    import torch

    refs = {}
    for f in reference_files(directory):
        r = load_reference(f)
        refs[r.head] = (f, r)
    unknown = [h for h in heads if h not in refs]
    if unknown:
        raise RealHeadError(f"no reference-point file for {', '.join(unknown)} in {directory}")
    model_path = Path(model_path)
    payload = torch.load(model_path, map_location="cpu", weights_only=True)
    meta = json.loads(payload["metadata"])
    meta.setdefault("training", {})["real_heads"] = [
        {"head": h, "use": refs[h][1].use, "source": refs[h][1].source,
         "reference_points": refs[h][0].name,
         "reference_points_sha1": hashlib.sha1(refs[h][0].read_bytes()).hexdigest()} for h in heads]
    meta["training"]["recipe"] = recipe
    # the model is no longer "trained on synthetic phantoms only": its description must say what it learnt from
    meta["description"] = ("Coarse-to-fine 3D landmark cascade. Trained on synthetic phantoms and thin-plate-spline "
                           f"warps of {len(heads)} public real head(s) ({', '.join(heads)}): not for clinical use.")
    payload["metadata"] = json.dumps(meta)
    tmp = model_path.with_name(model_path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, model_path)
    return meta["training"]


def interpolate_weights(start: str | Path, tuned: str | Path, alpha: float, out: str | Path) -> Path:
    """``out`` = the tuned model file with weights (1 - alpha) x start + alpha x tuned (weight-space ensembling
    of a fine-tuned model with its starting point, WiSE-FT, Wortsman et al., CVPR 2022): it keeps most of
    what fine-tuning on real anatomy gained while giving back little on the phantoms. Metadata (shape model,
    training summary) are the tuned model's; ``training.interpolation`` records the blend."""
    import os

    import torch

    if not 0.0 <= alpha <= 1.0:
        raise RealHeadError(f"alpha must be within 0..1, not {alpha}")
    a = torch.load(start, map_location="cpu", weights_only=True)
    b = torch.load(tuned, map_location="cpu", weights_only=True)
    if set(a["weights"]) != set(b["weights"]) or any(a["weights"][k].shape != v.shape for k, v in b["weights"].items()):
        raise RealHeadError(f"{start} and {tuned} are not the same network")
    b["weights"] = {k: torch.lerp(a["weights"][k].float(), v.float(), alpha).to(v.dtype) if v.is_floating_point()
                    else v for k, v in b["weights"].items()}
    meta = json.loads(b["metadata"])
    meta.setdefault("training", {})["interpolation"] = {"start": Path(start).name, "alpha": alpha,
                                                        "method": "WiSE-FT weight interpolation"}
    b["metadata"] = json.dumps(meta)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(b, tmp)
    os.replace(tmp, out)
    return out


if __name__ == "__main__":  # python -m pacs_landmarks.inference.real_heads record|interpolate ...
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m pacs_landmarks.inference.real_heads")
    cmds = parser.add_subparsers(dest="cmd", required=True)
    cmd = cmds.add_parser("record", help="record_training()")
    cmd.add_argument("model")
    cmd.add_argument("--heads", nargs="+", required=True)
    cmd.add_argument("--recipe", required=True)
    cmd = cmds.add_parser("interpolate", help="interpolate_weights()")
    cmd.add_argument("start")
    cmd.add_argument("tuned")
    cmd.add_argument("--alpha", type=float, required=True)
    cmd.add_argument("--out", required=True)
    a = parser.parse_args()
    try:
        if a.cmd == "record":
            record_training(a.model, a.heads, a.recipe)
        else:
            interpolate_weights(a.start, a.tuned, a.alpha, a.out)
    except RealHeadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
