"""Held-out synthetic cephalograms with the hard variants the ceph phantom generator offers, for calibrating
and evaluating a 2D model (docs/accuracy.md, Cephalograms).

    python scripts/ceph_heldout.py OUT --seed 31000 --per-variant 3

writes ``OUT/<variant>-<k>/`` (``image.dcm`` + ``landmarks.json``, the layout ``pacs-landmarks phantom --ceph``
writes) for every variant in ``VARIANTS``, seeds ``seed, seed + 1, ...`` in order (one seed per image, none
twice). Each variant fixes some of ``ceph_phantom.draw_params``' parameters (``render_ceph`` overrides) beyond
the ranges drawn for training, or writes the image another way (facing left, MONOCHROME1). Seeds used by
``make train-demo-ceph`` (21000-21109) and its evaluation (27000-27019) must not be given here.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pydicom

from pacs_landmarks.inference.ceph_phantom import render_ceph, write_ceph

# scripts/train-demo-ceph: training 21000-21109, its held-out evaluation 27000-27019.
USED_SEEDS = frozenset(range(21000, 21110)) | frozenset(range(27000, 27020))

# name -> (render_ceph overrides, write options). Training draws: photons 400-4000, scatter 0.1-0.45,
# pose pitch +-4 / roll, yaw +-1.5 deg, imager pixel spacing 0.12-0.16 mm, blur 0.06-0.2 mm, gamma 0.6-1.6,
# unsharp 0-1.2, collimation 0-14 mm, ear-rod rings 70 %, nasal positioner 80 %.
VARIANTS: dict[str, tuple[dict, dict]] = {
    "plain": ({}, {}),
    "low-dose": ({"photons": 120.0}, {}),
    "high-dose": ({"photons": 12000.0, "scatter_fraction": 0.1}, {}),
    "scatter": ({"scatter_fraction": 0.65, "scatter_sigma_mm": 50.0}, {}),
    "rotated": ({"pose_deg": [7.0, 3.0, -3.0]}, {}),
    "rotated-back": ({"pose_deg": [-7.0, -3.0, 3.0]}, {}),
    "spacing-0.10": ({"imager_pixel_spacing_mm": 0.10}, {}),
    "spacing-0.20": ({"imager_pixel_spacing_mm": 0.20}, {}),
    "blur-contrast": ({"detector_blur_mm": 0.35, "gamma": 1.8, "window_percentiles": [10.0, 96.0]}, {}),
    "sharp": ({"unsharp_amount": 2.0, "unsharp_sigma_mm": 3.0, "gamma": 0.55}, {}),
    "devices": ({"ear_rod_radius_mm": 5.0, "ear_rod_ring": True, "nasal_positioner": True}, {}),
    "no-devices": ({"ear_rod_ring": False, "nasal_positioner": False}, {}),
    "collimated": ({"collimation_mm": [18.0, 4.0, 25.0, 4.0]}, {}),
    "facing-left": ({}, {"facing": "left"}),
    "monochrome1": ({}, {"photometric": "MONOCHROME1"}),
}


def to_monochrome1(path: Path) -> None:
    """Rewrite a MONOCHROME2 DX image as MONOCHROME1 showing the same picture (PS3.3 C.7.6.3.1.2: the minimum
    is white; C.8.11.1.1.1: Presentation LUT Shape INVERSE for DX MONOCHROME1)."""
    ds = pydicom.dcmread(path)
    top = (1 << int(ds.BitsStored)) - 1
    ds.PixelData = (top - ds.pixel_array.astype(np.int32)).astype(np.uint16).tobytes()
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.PresentationLUTShape = "INVERSE"
    if "WindowCenter" in ds:  # the same window about the inverted values (C.11.2.1.2.1: centre c - 0.5)
        ds.WindowCenter = f"{top + 1 - float(ds.WindowCenter):g}"
    ds.save_as(path, enforce_file_format=True)


def write_set(out: Path, seed: int, per_variant: int, variants: list[str] | None = None) -> int:
    """Render the set; returns the number of images. Images already written (``landmarks.json`` present) are
    kept, so an interrupted run continues."""
    names = variants or list(VARIANTS)
    n = 0
    for name in names:
        overrides, opts = VARIANTS[name]
        for k in range(per_variant):
            case = out / f"{name}-{k + 1}"
            s = seed + n
            n += 1
            if (case / "landmarks.json").exists():
                continue
            image = render_ceph(s, **overrides)
            write_ceph(image, case, facing=opts.get("facing", "right"))
            if opts.get("photometric") == "MONOCHROME1":
                to_monochrome1(case / "image.dcm")
            doc = json.loads((case / "landmarks.json").read_text())
            doc["variant"] = name
            (case / "landmarks.json").write_text(json.dumps(doc, indent=1))
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--per-variant", type=int, default=3)
    ap.add_argument("--variant", action="append", choices=sorted(VARIANTS), help="only these (default all)")
    args = ap.parse_args()
    seeds = set(range(args.seed, args.seed + args.per_variant * len(args.variant or VARIANTS)))
    if not seeds.isdisjoint(USED_SEEDS):
        ap.error("these seeds overlap make train-demo-ceph's training or evaluation seeds")
    n = write_set(args.out, args.seed, args.per_variant, args.variant)
    print(f"{n} cephalograms in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
