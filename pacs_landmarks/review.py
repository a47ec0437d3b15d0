"""``pacs-landmarks review``: see every landmark in the images, as a radiologist checks a result.

One PNG per landmark with the axial, coronal and sagittal planes through the point (bone window, a
cross-hair, the landmark's name, status and confidence) and an ``index.html`` overview.  The landmarks come
from the model (default) or from a TID 1500 SR (``--sr``, e.g. one a person corrected in a viewer).  A
landmark that is not found has no point: its page shows the planes through the model's own estimate, marked
"estimate, not a result", or says there is none.

Planes are resampled in patient space (LPS mm, PS3.3 C.7.6.2.1.1) and shown in radiological convention: the
patient's right on the left of axial and coronal views, anterior on the left of the sagittal view, superior
at the top.

An X-ray image (a lateral cephalogram) is drawn whole, as stored (its own orientation and pixel coordinates),
with every found landmark and its name and the tracing lines -- the same marks as the result's presentation
state (``sr_templates.gsps.image_marks``) -- in one PNG per image, ``OUT/<file name>.png``.
"""
from __future__ import annotations

import argparse
import html
import json
import logging
import textwrap
from pathlib import Path

import numpy as np

from pacs_landmarks.errors import CommandError

log = logging.getLogger(__name__)

BONE_WINDOW = (500.0, 2000.0)  # centre, width (HU)
FIELD_MM = 120.0  # each plane shows this much around the point
PIXEL_MM = 0.5


def plane(volume, centre: np.ndarray, u: np.ndarray, v: np.ndarray, field_mm: float = FIELD_MM,
          pixel_mm: float = PIXEL_MM) -> np.ndarray:
    """HU on a plane through ``centre`` (LPS): image column along ``u``, row along ``v`` (unit LPS vectors);
    air outside the volume."""
    from scipy.ndimage import map_coordinates

    n = int(round(field_mm / pixel_mm))
    r = (np.arange(n) - (n - 1) / 2) * pixel_mm
    pts = centre[None, None] + r[None, :, None] * u + r[:, None, None] * v  # (rows, cols, 3)
    idx = volume.lps_to_index(pts.reshape(-1, 3)).T
    out = map_coordinates(volume.array, idx, order=1, mode="constant", cval=-1000.0)
    return out.reshape(n, n)


# (title, column direction, row direction) in LPS
VIEWS = (
    ("axial", np.array([1.0, 0, 0]), np.array([0, 1.0, 0])),  # patient left to the right, posterior down
    ("coronal", np.array([1.0, 0, 0]), np.array([0, 0, -1.0])),  # superior up
    ("sagittal", np.array([0, 1.0, 0]), np.array([0, 0, -1.0])),  # anterior left
)


def render_landmark(volume, lm, path: Path) -> Path:
    """The three-plane PNG of one landmark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    point = lm.position_lps_mm if lm.position_lps_mm is not None else (
        lm.stage_positions[-1] if lm.stage_positions else None)
    c, w = BONE_WINDOW
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.9), dpi=90)
    estimate = lm.position_lps_mm is None
    for ax, (title, u, v) in zip(axes, VIEWS):
        ax.set_axis_off()
        if point is None:
            ax.text(0.5, 0.5, "no position", ha="center", va="center", transform=ax.transAxes)
            continue
        img = plane(volume, np.asarray(point, float), u, v)
        ax.imshow(img, cmap="gray", vmin=c - w / 2, vmax=c + w / 2, interpolation="bilinear")
        n = img.shape[0]
        mid = (n - 1) / 2
        colour = "orange" if estimate else "lime"
        gap = 6 / PIXEL_MM
        for a, b in ((0, mid - gap), (mid + gap, n - 1)):  # a cross-hair that leaves the point itself visible
            ax.plot([a, b], [mid, mid], color=colour, lw=0.8)
            ax.plot([mid, mid], [a, b], color=colour, lw=0.8)
        ax.set_title(title, fontsize=9)
    status = lm.status.replace("_", " ")
    head = f"{lm.name} — {status} — confidence {lm.confidence:.2f}"
    if lm.reason:
        head += f" ({lm.reason})"
    if estimate and point is not None:
        head += " — planes through the model's estimate, not a result"
    # a long reason would run off both sides of the figure
    fig.suptitle(textwrap.fill(head, 110), fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_review(volume, landmarks, out_dir: str | Path, source: str) -> Path:
    """PNG per landmark + index.html in ``out_dir``; returns the index path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for lm in landmarks:
        name = lm.name.replace(" ", "_") + ".png"
        render_landmark(volume, lm, out / name)
        pos = "—" if lm.position_lps_mm is None else ", ".join(f"{v:.1f}" for v in lm.position_lps_mm)
        rows.append(
            f"<tr class='{lm.status}'><td>{html.escape(lm.name)}</td><td>{lm.status.replace('_', ' ')}</td>"
            f"<td>{lm.confidence:.2f}</td><td>{pos}</td><td>{html.escape(lm.reason)}</td>"
            f"<td><a href='{name}'><img src='{name}' width='420'></a></td></tr>")
    found = sum(lm.status == "found" for lm in landmarks)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Landmark review</title>
<style>body{{font-family:sans-serif}} td{{padding:4px 8px;vertical-align:middle}}
tr.found td:nth-child(2){{color:green}} tr.not_found td:nth-child(2){{color:#c60}}
tr.outside_field_of_view td:nth-child(2){{color:grey}}</style></head><body>
<h1>Landmark review</h1>
<p>Series {html.escape(volume.series_instance_uid)}; landmarks from {html.escape(source)};
{found} of {len(landmarks)} found. Positions are patient LPS mm. Bone window (C {BONE_WINDOW[0]:g} /
W {BONE_WINDOW[1]:g}); radiological convention. Not for clinical use.</p>
<table><tr><th>landmark</th><th>status</th><th>confidence</th><th>position (LPS mm)</th><th>reason</th>
<th>axial / coronal / sagittal</th></tr>
{chr(10).join(rows)}
</table></body></html>
"""
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    (out / "landmarks.json").write_text(json.dumps(
        {"series_instance_uid": volume.series_instance_uid, "source": source,
         "landmarks": [{"name": lm.name, "status": lm.status, "confidence": round(float(lm.confidence), 4),
                        "reason": lm.reason,
                        "position_lps_mm": None if lm.position_lps_mm is None
                        else [round(float(v), 3) for v in lm.position_lps_mm]} for lm in landmarks]},
        indent=1), encoding="utf-8")
    return index


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "review",
        help="one PNG per landmark (axial, coronal, sagittal through the point) and an index.html",
        description="Show every landmark of a CT series in the images: the model's result, or the landmarks "
        "of a TID 1500 SR given with --sr (e.g. one corrected in a viewer). Writes OUT/<landmark>.png (bone "
        "window, cross-hair, name, status, confidence), OUT/index.html and OUT/landmarks.json.",
    )
    p.add_argument("series_dir", metavar="INPUT", type=Path,
                   help="folder holding the DICOM files of one CT series, or an X-ray image file or folder of them "
                        "(then OUT/<file name>.png: the image with its landmarks and tracing)")
    p.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    p.add_argument("--sr", type=Path, default=None, help="review this landmark SR instead of running the model")
    p.add_argument("--model", type=Path, default=None,
                   help="model file (default: the shipped demo model of CT, or of ceph19 for X-ray images)")
    p.set_defaults(func=cmd_review)


def render_image(image, landmarks, path: Path, title: str, measurements=()) -> Path:
    """One X-ray image with its landmarks (points and names) and tracing lines, as the GSPS draws them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pacs_landmarks.sr_templates.gsps import image_marks

    rows, cols = image.shape
    fig = plt.figure(figsize=(8.0, 8.0 * rows / cols), dpi=110)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    # extent: SCOORD pixel coordinates, the top-left corner of the first pixel at (0, 0) (PS3.3 C.18.6.1.2)
    ax.imshow(image.pixels, cmap="gray", vmin=0.0, vmax=1.0, extent=(0, cols, rows, 0), interpolation="bilinear")
    set_name = _set_of_names([lm.name for lm in landmarks])
    for mark in image_marks(image.header, landmarks, set_name, measurements):
        xs, ys = zip(*mark.points)
        if mark.graphic_type == "POLYLINE":
            ax.plot(xs, ys, color="yellow", lw=1.0, alpha=0.85)
            ax.text((xs[0] + xs[-1]) / 2, (ys[0] + ys[-1]) / 2, mark.text or "", color="yellow", fontsize=6)
        else:
            ax.plot(xs, ys, "+", color="orangered", ms=8, mew=1.5)
            ax.text(xs[0] + cols / 150, ys[0] - rows / 150, mark.text or "", color="orangered", fontsize=6)
    ax.text(cols / 100, rows / 40, title, color="white", fontsize=7, va="top",
            bbox={"facecolor": "black", "alpha": 0.5, "pad": 2})
    fig.savefig(path)
    plt.close(fig)
    return path


def _set_of_names(names: list[str]) -> str:
    from pacs_landmarks.landmark_sets import landmark_names, landmark_sets, set_dimension

    two_d = [s for s in landmark_sets() if set_dimension(s) == 2]
    return max(two_d, key=lambda s: sum(n in landmark_names(s) for n in names))


def review_images(args: argparse.Namespace, images: list[Path]) -> int:
    """``review`` on X-ray images: a PNG each (see the module docstring)."""
    from pacs_landmarks.dicom.xray import XRayError, load_xray
    from pacs_landmarks.sr_templates.measurements_2d import measure_2d

    model = None
    if args.sr is None:
        from pacs_landmarks.inference.model import LandmarkModel, ModelError

        try:
            model = LandmarkModel.load(args.model, landmark_set=None if args.model is not None else "ceph19")
        except ModelError as exc:
            raise CommandError(str(exc)) from exc
        if model.dim != 2:
            raise CommandError(f"model {model.name} {model.version} is for 3D CT series, not X-ray images")
    args.out.mkdir(parents=True, exist_ok=True)
    for path in images:
        try:
            image = load_xray(path, require_ceph=False)
        except XRayError as exc:
            raise CommandError(str(exc)) from exc
        if model is None:
            import pydicom

            from pacs_landmarks.sr_templates.landmark_sr_2d import read_landmark_sr_2d

            try:
                sr = pydicom.dcmread(args.sr)
                landmarks = read_landmark_sr_2d(sr, include_missing=True)
            except (OSError, pydicom.errors.InvalidDicomError, ValueError) as exc:
                raise CommandError(f"{args.sr}: {exc}") from exc
            source = f"SR {args.sr.name}"
        else:
            landmarks = list(model.predict_image(image))
            source = f"model {model.name} {model.version}" + ("" if model.trained else " (UNTRAINED)")
        values, _ = measure_2d(landmarks, _set_of_names([lm.name for lm in landmarks]), image.spacing)
        found = sum(lm.status == "found" for lm in landmarks)
        png = render_image(image, landmarks, args.out / f"{path.stem}.png",
                           f"{path.name}: {found} of {len(landmarks)} landmarks found; {source}; not for clinical use",
                           values)
        print(f"{path.name}: {found} of {len(landmarks)} landmarks found ({source}) -> {png}")
    return 0


def cmd_review(args: argparse.Namespace) -> int:
    from pacs_landmarks.dicom.series import SeriesError, load_series

    from pacs_landmarks.pipeline_cli import xray_inputs

    images = xray_inputs(args.series_dir)
    if images:
        return review_images(args, images)
    if not args.series_dir.is_dir():
        raise CommandError(f"not a folder: {args.series_dir}")
    files = sorted(p for p in args.series_dir.rglob("*") if p.is_file() and p.suffix.lower() not in (".json", ".txt",
                                                                                                    ".png", ".html"))
    try:
        volume = load_series(files)
    except SeriesError as exc:
        raise CommandError(f"cannot assemble the series: {exc}") from exc
    if args.sr is not None:
        import pydicom

        from pacs_landmarks.sr_templates.readback import read_landmark_sr

        try:
            ds = pydicom.dcmread(args.sr)
            landmarks = read_landmark_sr(ds, include_missing=True)
        except (OSError, pydicom.errors.InvalidDicomError, ValueError) as exc:
            raise CommandError(f"{args.sr}: {exc}") from exc
        for_uid = _sr_frame_of_reference(ds)
        if for_uid and volume.frame_of_reference_uid and for_uid != volume.frame_of_reference_uid:
            raise CommandError(f"{args.sr}: its points are in frame of reference {for_uid}, the series is in "
                               f"{volume.frame_of_reference_uid}")
        source = f"SR {args.sr.name}"
    else:
        from pacs_landmarks.inference.model import LandmarkModel, ModelError

        try:
            model = LandmarkModel.load(args.model)
        except ModelError as exc:
            raise CommandError(str(exc)) from exc
        landmarks = model.predict(volume)
        source = f"model {model.name} {model.version}"
    index = write_review(volume, landmarks, args.out, source)
    from pacs_landmarks.inference.landmark import landmark_table

    print(landmark_table(landmarks))
    print(f"wrote {len(landmarks)} PNGs and {index}")
    return 0


def _sr_frame_of_reference(ds) -> str | None:
    def walk(items):
        for it in items or []:
            if it.get("ValueType") == "SCOORD3D" and "ReferencedFrameOfReferenceUID" in it:
                return str(it.ReferencedFrameOfReferenceUID)
            found = walk(it.get("ContentSequence"))
            if found:
                return found
        return None

    return walk(ds.get("ContentSequence"))
