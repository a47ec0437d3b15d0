"""Atlas-registration baseline on real heads: the annotated Visible Human Male head registered onto each
evaluation head (affine, then B-spline; SimpleITK), its reference points carried across, errors per landmark.

This is the classic way to find landmarks from one annotated head, and the bar the network has to clear
(issue 16 section 4). Registration: atlas = fixed image, target = moving image, so the resulting transform
maps atlas points straight into the target. Both heads clamped to -1000..2000 HU and resampled to 2 mm;
initial translation aligns the tops of the skulls (the evaluation heads need not include the jaw);
both cut to the head's box; Mattes mutual information on 5 % of the voxels, affine at 8/4/2 mm (100 iterations
per level), then a B-spline (mesh 8 x 8 x 8, L-BFGS-B, 40 iterations) at 4/2 mm. A carried point
outside the target's volume is reported as outside the field of view. The networks' numbers for the same
heads come from `pacs-landmarks evaluate` (docs/accuracy.md, "Real heads").

Usage: .venv/bin/python bench/real_heads.py [--real-heads DIR] [--threads 2] [--json OUT.json]
DIR (default $REAL_HEADS) holds each head as REFERENCE_DIR's "head" names it: a DICOM series directory
(DIR/vhm-male-head) or an InVesalius project (DIR/invesalius-cranium.inv3). Without DIR it says so and exits.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ATLAS = "vhm-male-head"


def load_head(real_heads: Path, ref):
    """(array (k, j, i) int16, affine, frame of reference UID) of a head, or None if it is not there."""
    from pacs_landmarks.inference import real_heads as rh

    inv3 = real_heads / f"{ref.head}.inv3"
    if inv3.is_file():
        v = rh.read_inv3(inv3)
        return v.array, v.affine, v.frame_of_reference_uid
    d = real_heads / ref.head
    if d.is_dir():
        from pacs_landmarks.dicom.series import load_series
        from pacs_landmarks.inference.data import dicom_files

        v = load_series(dicom_files(d))
        return np.asarray(v.array), np.asarray(v.affine, float), v.frame_of_reference_uid
    return None


def to_sitk(array: np.ndarray, affine: np.ndarray):
    """A SimpleITK image in LPS (ITK's physical frame is LPS too) from an array (k, j, i) and its affine."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.clip(array, -1000, 2000).astype(np.float32))  # array z, y, x = k, j, i
    cols = affine[:3, :3]
    spacing = np.linalg.norm(cols, axis=0)  # for k, j, i
    direction = cols / spacing  # columns: unit vectors of k, j, i
    img.SetSpacing([float(spacing[2]), float(spacing[1]), float(spacing[0])])
    img.SetOrigin([float(v) for v in affine[:3, 3]])
    img.SetDirection([float(v) for v in np.stack([direction[:, 2], direction[:, 1], direction[:, 0]], 1).ravel()])
    return img


def crop_to_head(array: np.ndarray, affine: np.ndarray, margin_mm: float = 10.0):
    """The array cut to the box of everything denser than fat (a 512 mm field of view is mostly air)."""
    k, j, i = np.nonzero(array > -300)
    m = np.ceil(margin_mm / np.linalg.norm(affine[:3, :3], axis=0)).astype(int)
    lo = np.maximum([k.min(), j.min(), i.min()] - m, 0)
    hi = np.minimum(np.array([k.max(), j.max(), i.max()]) + m + 1, array.shape)
    out = affine.copy()
    out[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    return array[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], out


def resample(img, mm: float):
    import SimpleITK as sitk

    size = [int(round(s * sp / mm)) for s, sp in zip(img.GetSize(), img.GetSpacing())]
    return sitk.Resample(img, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), [mm] * 3,
                         img.GetDirection(), -1000.0, sitk.sitkFloat32)


def skull_top(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """LPS centre of the bone in the top 40 mm of the skull (bone > 300 HU)."""
    k, j, i = np.nonzero(array[:, ::2, ::2] > 300)
    pts = np.c_[k, j * 2, i * 2] @ affine[:3, :3].T + affine[:3, 3]
    z_top = np.percentile(pts[:, 2], 99.9)
    top = pts[pts[:, 2] > z_top - 40]
    return np.array([top[:, 0].mean(), top[:, 1].mean(), z_top])


def register(atlas, target, threads: int):
    """Transform mapping atlas LPS points into the target (affine + B-spline); seconds taken."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    t0 = time.perf_counter()
    fixed = resample(to_sitk(*crop_to_head(*atlas)), 2.0)
    moving = resample(to_sitk(*crop_to_head(*target)), 2.0)
    init = sitk.TranslationTransform(3, (skull_top(*target) - skull_top(*atlas)).tolist())
    affine = sitk.AffineTransform(3)
    affine.SetCenter(skull_top(*atlas).tolist())
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=48)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.05, seed=1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=100,
                                                 gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SetMovingInitialTransform(init)
    reg.SetInitialTransform(affine, inPlace=True)
    reg.Execute(fixed, moving)
    first = sitk.CompositeTransform([init, affine])
    bspline = sitk.BSplineTransformInitializer(fixed, [8, 8, 8])
    reg2 = sitk.ImageRegistrationMethod()
    reg2.SetMetricAsMattesMutualInformation(numberOfHistogramBins=48)
    reg2.SetMetricSamplingStrategy(reg2.RANDOM)
    reg2.SetMetricSamplingPercentage(0.05, seed=2)
    reg2.SetInterpolator(sitk.sitkLinear)
    reg2.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=40)
    reg2.SetShrinkFactorsPerLevel([2, 1])
    reg2.SetSmoothingSigmasPerLevel([1, 0])
    reg2.SetMovingInitialTransform(first)
    reg2.SetInitialTransform(bspline, inPlace=True)
    reg2.Execute(fixed, moving)
    # ITK applies the last-added transform first: a fixed (atlas) point goes through the B-spline, then the
    # affine, then the initial translation.
    full = sitk.CompositeTransform([init, affine, bspline])
    return full, first, time.perf_counter() - t0


def inside(p: np.ndarray, shape, affine: np.ndarray) -> bool:
    idx = np.linalg.inv(affine)[:3, :3] @ p + np.linalg.inv(affine)[:3, 3]
    return bool(np.all(idx >= -0.5) and np.all(idx <= np.asarray(shape) - 0.5))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real-heads", default=os.environ.get("REAL_HEADS"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not args.real_heads:
        print("bench/real_heads.py: no real heads (set REAL_HEADS=DIR or --real-heads DIR; docs/accuracy.md)")
        return 0
    try:
        import SimpleITK  # noqa: F401
    except ImportError:
        print("bench/real_heads.py: SimpleITK is not installed (pip install -e '.[bench]')", file=sys.stderr)
        return 2
    from pacs_landmarks.inference import real_heads as rh

    root = Path(args.real_heads)
    refs = {r.head: r for r in map(rh.load_reference, rh.reference_files())}
    atlas = load_head(root, refs[ATLAS])
    if atlas is None:
        print(f"bench/real_heads.py: the atlas {ATLAS} is not in {root}")
        return 0
    rh.check_against_volume(refs[ATLAS], atlas[0].shape, atlas[1], atlas[2])
    results = {}
    for name, ref in refs.items():
        if ref.use != "evaluation":
            continue
        target = load_head(root, ref)
        if target is None:
            print(f"bench/real_heads.py: {name} not in {root}, skipped")
            continue
        rh.check_against_volume(ref, target[0].shape, target[1], target[2])
        full, affine_only, seconds = register(atlas[:2], target[:2], args.threads)
        rows = []
        for i, lm in enumerate(ref.names):
            a = refs[ATLAS].positions[i]
            p = np.array(full.TransformPoint([float(v) for v in a]))
            pa = np.array(affine_only.TransformPoint([float(v) for v in a]))
            status = "found" if inside(p, target[0].shape, target[1]) else "outside_field_of_view"
            err = float(np.linalg.norm(p - ref.positions[i])) if ref.status[i] == "found" else None
            err_a = float(np.linalg.norm(pa - ref.positions[i])) if ref.status[i] == "found" else None
            rows.append({"landmark": lm, "reference": ref.status[i], "registration": status, "error_mm": err,
                         "affine_error_mm": err_a})
        errs = [r["error_mm"] for r in rows if r["error_mm"] is not None]
        results[name] = {"seconds": round(seconds, 1), "threads": args.threads, "landmarks": rows,
                         "mre_mm": float(np.mean(errs)), "within_5mm": int(sum(e <= 5 for e in errs)),
                         "in_view": len(errs),
                         "out_of_view_found": sum(r["registration"] == "found" and r["reference"] != "found"
                                                  for r in rows)}
        print(f"\n{name}: atlas {ATLAS} -> target, affine + B-spline (SimpleITK), {seconds:.1f} s "
              f"({args.threads} threads)\n")
        print("| landmark | reference | registration | error (mm) | affine only (mm) |")
        print("|---|---|---|---|---|")
        for r in rows:
            e = "" if r["error_mm"] is None else f"{r['error_mm']:.1f}"
            ea = "" if r["affine_error_mm"] is None else f"{r['affine_error_mm']:.1f}"
            print(f"| {r['landmark']} | {r['reference']} | {r['registration']} | {e} | {ea} |")
        res = results[name]
        print(f"\nMRE {res['mre_mm']:.2f} mm over {res['in_view']} in-view landmarks, {res['within_5mm']} within "
              f"5 mm; out-of-view landmarks placed inside the volume: {res['out_of_view_found']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
