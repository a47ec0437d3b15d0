"""Many exactly labelled training heads from one annotated real head: landmark-driven smooth warps.

One real head with reference points (``real_heads``) is too little to train on, and phantoms have the wrong
bone shapes.  A warp of the real head keeps its real bone, soft tissue, fillings and streaks and changes its
proportions (the idea of atlas-based augmentation with sampled deformations, Zhao et al., CVPR 2019):

1. the landmarks move to a new configuration: the real head's points plus a shape drawn from the shape model
   in a model file (Procrustes + PCA of the phantoms' truth, which follow the craniofacial norms; ``shape``),
   mapped into the real head's frame by the similarity that aligns the model's mean to it (1.5 x the
   phantoms' variation by default), and the whole head scaled by up to +-8 % per axis (Procrustes removes
   size from the shape model);
2. a smooth random field on top: extra control points inside the head, 12 mm or more from every landmark,
   move by a few mm; the box's corners and face centres stay put;
3. a thin-plate spline through all control points (``scipy.interpolate.RBFInterpolator``) maps each output
   point back to the source, so every control point, the landmarks among them, lands exactly where it was
   sent: the truth moves with the image by construction (``tests/test_real_heads.py`` checks that a
   landmark's voxel stays the landmark's voxel);
4. half of the heads are mirrored left-right (the bilateral names swap), the slice thickness is drawn from
   1-3 mm (thicker slices average the warped volume across the slice), and the head is cropped to its box.

Intensity randomisation (kernels, noise, bone density, cone-beam intensity) and scan-range cuts are not
baked in: ``train`` applies them on the fly to every case (``train.DOMAIN``, ``coverage``), so each epoch
sees new ones.  Output: one case directory per head (a CT series + ``landmarks.json``), what ``train``
reads.  The spline is evaluated on a 4 mm grid and interpolated; the written truth is then corrected by a
few fixed-point steps so that it is where the interpolated map really sends it (residual < 0.01 mm).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from pacs_landmarks.landmark_sets import mirror_names

log = logging.getLogger(__name__)

COARSE_MM = 4.0
MIN_LANDMARK_DISTANCE_MM = 12.0
THICKNESSES = (1.0, 1.0, 1.25, 2.0, 3.0)


def draw_configuration(truth: np.ndarray, shape_model, rng: np.random.Generator, amplitude: float = 1.0,
                       clip_sd: float = 2.5) -> np.ndarray:
    """New landmark positions (L, 3): the real head's plus a shape-model variation in its frame."""
    from pacs_landmarks.inference.shape import _similarity

    b = np.clip(rng.standard_normal(len(shape_model.sd)), -clip_sd, clip_sd) * shape_model.sd * amplitude
    delta = (b @ shape_model.components).reshape(shape_model.mean.shape)
    s, r, _ = _similarity(shape_model.mean, truth, np.ones(len(truth)))
    return truth + s * delta @ r.T


def random_control_points(array: np.ndarray, affine: np.ndarray, landmarks: np.ndarray, rng: np.random.Generator,
                          count: int = 20, sigma_mm: float = 2.5, max_mm: float = 6.0,
                          min_landmark_mm: float = MIN_LANDMARK_DISTANCE_MM) -> tuple[np.ndarray, np.ndarray]:
    """``count`` points inside the head (HU > -300), far from the landmarks and from each other, and their
    random displacements (Gaussian, clipped)."""
    k, j, i = np.nonzero(array[::4, ::4, ::4] > -300)
    if len(k) == 0:
        return np.zeros((0, 3)), np.zeros((0, 3))
    idx = np.c_[k, j, i] * 4.0
    pts = idx @ affine[:3, :3].T + affine[:3, 3]
    chosen: list[np.ndarray] = []
    for q in pts[rng.permutation(len(pts))]:
        if np.min(np.linalg.norm(landmarks - q, axis=1)) < min_landmark_mm:
            continue
        if chosen and np.min(np.linalg.norm(np.asarray(chosen) - q, axis=1)) < 25.0:
            continue
        chosen.append(q)
        if len(chosen) == count:
            break
    p = np.asarray(chosen).reshape(-1, 3)
    d = np.clip(rng.normal(0.0, sigma_mm, p.shape), -max_mm, max_mm)
    return p, d


def box_anchors(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Corners and face centres of an LPS box: points that do not move."""
    c = (lo + hi) / 2
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    faces = np.array([[lo[0], c[1], c[2]], [hi[0], c[1], c[2]], [c[0], lo[1], c[2]], [c[0], hi[1], c[2]],
                      [c[0], c[1], lo[2]], [c[0], c[1], hi[2]]])
    return np.vstack([corners, faces])


class BackwardMap:
    """Output LPS -> source LPS: a thin-plate spline through (target -> source) control points, tabulated on
    a coarse grid over the output box and interpolated trilinearly."""

    def __init__(self, target: np.ndarray, source: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                 mirror_x: float | None = None, coarse_mm: float = COARSE_MM):
        from scipy.interpolate import RBFInterpolator

        self.mirror_x = mirror_x
        self.lo = np.asarray(lo, float) - coarse_mm
        n = np.ceil((np.asarray(hi, float) + coarse_mm - self.lo) / coarse_mm).astype(int) + 1
        self.step = coarse_mm
        rbf = RBFInterpolator(target, source - target, kernel="thin_plate_spline", degree=1)
        axes = [self.lo[a] + np.arange(n[a]) * coarse_mm for a in range(3)]
        grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
        self.table = rbf(grid).reshape(*n, 3).astype(np.float64)  # displacement at (x, y, z) grid nodes

    def displacement(self, pts: np.ndarray) -> np.ndarray:
        from scipy.ndimage import map_coordinates

        g = ((pts - self.lo) / self.step).T
        return np.stack([map_coordinates(self.table[..., a], g, order=1, mode="nearest") for a in range(3)], -1)

    def __call__(self, out_pts: np.ndarray) -> np.ndarray:
        """Source positions of output points (N, 3)."""
        q = np.asarray(out_pts, float).copy()
        if self.mirror_x is not None:
            q[:, 0] = 2 * self.mirror_x - q[:, 0]
        return q + self.displacement(q)

    def min_jacobian(self) -> float:
        """Smallest Jacobian determinant of the tabulated map (<= 0 would fold the image)."""
        t = self.table
        jac = np.empty(t.shape[:3] + (3, 3))
        for a in range(3):
            jac[..., :, a] = np.gradient(t, self.step, axis=a)[..., :]
        jac += np.eye(3)
        return float(np.linalg.det(jac).min())


def forward_points(bmap: BackwardMap, source_pts: np.ndarray, start: np.ndarray, steps: int = 20) -> np.ndarray:
    """Output positions whose source is ``source_pts``: fixed-point iteration from ``start``."""
    q = np.asarray(start, float).copy()
    for _ in range(steps):
        err = bmap(q) - source_pts
        if bmap.mirror_x is not None:
            err[:, 0] = -err[:, 0]
        q -= err
        if np.abs(err).max() < 1e-4:
            break
    return q


def head_box(array: np.ndarray, affine: np.ndarray, margin_mm: float = 8.0) -> tuple[np.ndarray, np.ndarray]:
    """LPS box of everything denser than fat, plus a margin."""
    k, j, i = np.nonzero(array[::2, ::2, ::2] > -300)
    idx = np.c_[k, j, i] * 2.0
    pts = idx @ affine[:3, :3].T + affine[:3, 3]
    return pts.min(0) - margin_mm, pts.max(0) + margin_mm


def warp_head(array: np.ndarray, affine: np.ndarray, truth: np.ndarray, names: list[str], shape_model,
              seed: int, amplitude: float = 1.5, field_mm: float = 2.5, mirror: bool | None = None,
              thickness: float | None = None, pixel_mm: float = 1.0, scale_range: float = 0.08):
    """One warped head: (array int16 (slices, rows, cols), affine, truth (L, 3), info dict)."""
    from scipy.ndimage import map_coordinates

    rng = np.random.default_rng(np.random.SeedSequence([0x3A7, seed]))
    lo, hi = head_box(array, affine)
    target = draw_configuration(truth, shape_model, rng, amplitude) if shape_model is not None else truth.copy()
    # Procrustes takes size out of the shape model: head length, breadth and height vary on their own.
    centre = (lo + hi) / 2
    scale = np.exp(rng.uniform(-1, 1, 3) * np.log1p(scale_range))
    target = centre + (target - centre) * scale
    lo_out, hi_out = centre + (lo - centre) * scale, centre + (hi - centre) * scale
    nx = int(np.ceil((hi_out[0] - lo_out[0]) / pixel_mm)) + 1
    ny = int(np.ceil((hi_out[1] - lo_out[1]) / pixel_mm)) + 1
    grid_centre_x = float(lo_out[0] + (nx - 1) * pixel_mm / 2)  # mirroring about it maps voxels onto voxels
    for attempt in range(4):
        rp, rd = random_control_points(array, affine, np.vstack([truth, target]), rng, sigma_mm=field_mm)
        anchors = box_anchors(lo, hi)
        tgt = np.vstack([target, centre + (rp + rd - centre) * scale, centre + (anchors - centre) * scale])
        src = np.vstack([truth, rp, anchors])
        mirror_x = grid_centre_x if (rng.random() < 0.5 if mirror is None else mirror) else None
        bmap = BackwardMap(tgt, src, lo_out, hi_out, mirror_x)
        jmin = bmap.min_jacobian()
        if jmin > 0.3:
            break
        field_mm /= 2  # too strong for this draw: calmer field, landmarks half way
        target = (target + centre + (truth - centre) * scale) / 2
    else:
        raise RuntimeError(f"warp {seed}: no fold-free warp found (min Jacobian {jmin:.2f})")
    thick = float(thickness if thickness is not None else rng.choice(THICKNESSES))
    # Output grid: axial slices over the (scaled) box, pixel_mm in plane (LPS axes, as most head CT).
    lo, hi = lo_out, hi_out
    nz = int(np.floor((hi[2] - lo[2]) / thick)) + 1
    out_aff = np.array([[0, 0, pixel_mm, lo[0]], [0, pixel_mm, 0, lo[1]], [thick, 0, 0, lo[2]], [0, 0, 0, 1.0]])
    inv = np.linalg.inv(affine)
    yy, xx = np.meshgrid(lo[1] + np.arange(ny) * pixel_mm, lo[0] + np.arange(nx) * pixel_mm, indexing="ij")
    offsets = [0.0] if thick <= 1.25 else list(np.linspace(-thick / 2, thick / 2, int(np.ceil(thick)) + 1)[1:-1])
    out = np.empty((nz, ny, nx), np.int16)
    src_f = array.astype(np.float32)
    for k in range(nz):
        acc = np.zeros((ny, nx), np.float32)
        for off in offsets:
            pts = np.c_[xx.ravel(), yy.ravel(), np.full(xx.size, lo[2] + k * thick + off)]
            s = bmap(pts)
            idx = (s @ inv[:3, :3].T + inv[:3, 3]).T
            acc += map_coordinates(src_f, idx, order=1, mode="constant", cval=-1000.0).reshape(ny, nx)
        out[k] = np.clip(np.rint(acc / len(offsets)), -1024, 3071).astype(np.int16)
    start = target.copy()
    if mirror_x is not None:
        start[:, 0] = 2 * mirror_x - start[:, 0]
    out_truth = forward_points(bmap, truth, start)
    if mirror_x is not None:
        out_truth = out_truth[mirror_names(names)]
    info = {"seed": seed, "mirrored": mirror_x is not None, "slice_thickness_mm": thick,
            "pixel_spacing_mm": pixel_mm, "amplitude": amplitude, "scale_xyz": np.round(scale, 4).tolist(),
            "field_mm": field_mm,
            "min_jacobian": round(jmin, 3), "random_control_points": len(rp),
            "landmark_shift_mm": np.round(np.linalg.norm(target - truth, axis=1), 2).tolist()}
    return out, out_aff, out_truth, info


def write_warped_case(out_dir: str | Path, array: np.ndarray, affine: np.ndarray, truth: np.ndarray,
                      names: list[str], landmark_set: str, info: dict, source_label: str) -> Path:
    """A case directory: the warped head as a CT series (PS3.3 A.3, axial) + landmarks.json."""
    from pacs_landmarks.dicom.write import SeriesInfo, save, slice_dataset

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = "2.25." + str(int(hashlib.sha1(f"warp:{source_label}:{json.dumps(info, sort_keys=True)}".encode())
                             .hexdigest()[:28], 16))
    sinfo = SeriesInfo(patient_name=f"WARP^{info['seed']:04d}", patient_id=f"WARP{info['seed']:06d}",
                       study_instance_uid=root + ".1", series_instance_uid=root + ".2",
                       frame_of_reference_uid=root + ".4", series_description=f"Warped real head {info['seed']}",
                       model_name="warped real head")
    ps = float(np.linalg.norm(affine[:3, 2]))
    thick = float(np.linalg.norm(affine[:3, 0]))
    for k in range(array.shape[0]):
        pos = affine[:3, 3] + k * affine[:3, 0]
        ds = slice_dataset(array[k].astype(np.float32), info=sinfo, sop_instance_uid=f"{root}.3.{k + 1}",
                           instance_number=k + 1, position=pos, orientation=(1, 0, 0, 0, 1, 0),
                           pixel_spacing=(ps, ps), slice_thickness=thick)
        save(ds, out / f"IM{k + 1:04d}.dcm")
    doc = {"landmark_set": landmark_set, "frame_of_reference_uid": sinfo.frame_of_reference_uid,
           "series_instance_uid": sinfo.series_instance_uid, "warped_from": source_label, "warp": info,
           "landmarks": [{"name": n, "position_lps_mm": [round(float(v), 4) for v in p]}
                         for n, p in zip(names, truth) if np.isfinite(p).all()]}
    (out / "landmarks.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")
    return out


def warp_cases(case_dir: str | Path, out_dir: str | Path, count: int, seed: int = 0,
               model: str | Path | None = None, amplitude: float = 1.5, field_mm: float = 2.5,
               pixel_mm: float = 1.0) -> list[Path]:
    """``count`` warped heads of one annotated case directory (a real head with all landmarks)."""
    from pacs_landmarks.inference.data import load_case
    from pacs_landmarks.inference.model import DEFAULT_MODEL, read_model_file
    from pacs_landmarks.inference.shape import ShapeModel

    meta, _ = read_model_file(model or DEFAULT_MODEL)
    names = list(meta["landmark_names"])
    shape_model = ShapeModel.from_json(meta["shape_model"]) if meta.get("shape_model") else None
    case_dir = Path(case_dir)
    case = load_case(case_dir, names, meta["landmark_set"])
    if not np.isfinite(case.landmarks).all():
        raise ValueError(f"{case_dir}: warping needs every landmark (missing: "
                         f"{[n for n, p in zip(names, case.landmarks) if not np.isfinite(p).all()]})")
    truth_doc = json.loads((case_dir / "landmarks.json").read_text(encoding="utf-8"))
    label = truth_doc.get("source", case_dir.name)
    out = []
    for n in range(count):
        s = seed + n
        arr, aff, truth, info = warp_head(case.array, case.affine, case.landmarks, names, shape_model, s,
                                          amplitude, field_mm, pixel_mm=pixel_mm)
        out.append(write_warped_case(Path(out_dir) / f"warp-{s:04d}", arr, aff, truth, names,
                                     meta["landmark_set"], info, label))
        log.info("warp %d: %s, %d slices of %.2f mm, mirrored %s", s, out[-1], arr.shape[0],
                 info["slice_thickness_mm"], info["mirrored"])
    return out


def _cmd_warp(args: argparse.Namespace) -> int:
    paths = warp_cases(args.case, args.out, args.count, args.seed, args.model, args.amplitude, args.field_mm,
                       args.pixel_mm)
    print(f"warp-heads: {len(paths)} warped heads in {args.out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("warp-heads", help="exactly labelled training heads from one annotated real head",
                       description="Thin-plate-spline warps of an annotated real head (a case directory made "
                                   "by real-case) towards landmark configurations drawn from a model file's "
                                   "shape model, plus a smooth random field; the truth moves with the image.")
    p.add_argument("case", help="case directory of the annotated real head")
    p.add_argument("--out", required=True, help="directory for the warped cases (warp-NNNN)")
    p.add_argument("--count", type=int, default=24, help="number of warped heads (default 24)")
    p.add_argument("--seed", type=int, default=0, help="first seed (each head has its own)")
    p.add_argument("--model", default=None, help="model file whose shape model drives the landmarks")
    p.add_argument("--amplitude", type=float, default=1.5, help="scale of the shape-model variation (SDs)")
    p.add_argument("--field-mm", type=float, default=2.5, help="SD of the random field's control points (mm)")
    p.add_argument("--pixel-mm", type=float, default=1.0, help="in-plane pixel spacing of the warped heads")
    p.set_defaults(func=_cmd_warp)
