"""Per-stage time of the landmark cascade on a 512 x 512 x 200 CT series and on a synthetic lateral
cephalogram (~1700 x 2100 px) (CPU, 2 threads unless told; --device cuda for a GPU).

Prints a table: DICOM read (pydicom, all slices), volume build (load_series), stage 1/2/3, cascade total; then
the 2D rows: image read (load_xray), stage 1/2/3, predict_image total (the issue's target: <= 0.5 s).
Usage: .venv/bin/python bench/cascade.py [--repeats 5] [--threads 2] [--model MODEL.pt] [--ceph-model M.pt]
       [--only ct|ceph] [--tta mirror|none] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=None)
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--ceph-model", default=None, help="2D model (default: the shipped ceph19 demo model)")
    ap.add_argument("--only", choices=("ct", "ceph"), default=None)
    ap.add_argument("--tta", choices=("mirror", "none"), default=None,
                    help="CT: test-time augmentation instead of the model file's (mirror: two passes)")
    ap.add_argument("--device", default="cpu", help="torch device (default cpu; e.g. cuda)")
    args = ap.parse_args()

    import os

    os.environ["PACS_LANDMARKS_THREADS"] = str(args.threads)
    import torch

    from pacs_landmarks.inference.model import LandmarkModel

    torch.set_num_threads(args.threads)
    if args.only != "ceph":
        model = LandmarkModel.load(args.model, device=args.device)
        if args.tta is not None:
            model = model.with_tta(None if args.tta == "none" else args.tta)
        bench_ct(args, model)
    if args.only != "ct":
        bench_ceph(args, LandmarkModel.load(args.ceph_model, device=args.device, landmark_set="ceph19"))


def bench_ceph(args, model) -> None:
    import os

    import torch

    from pacs_landmarks.dicom.xray import load_xray
    from pacs_landmarks.inference.ceph_phantom import render_ceph, write_ceph

    rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_ceph(render_ceph(4242), Path(tmp) / "c")
        for r in range(args.repeats + 1):
            t0 = time.perf_counter()
            image = load_xray(path)
            t1 = time.perf_counter()
            out, *_ = model.run_image(image)
            t2 = time.perf_counter()
            model.predict_image(image)
            t3 = time.perf_counter()
            if r == 0:
                continue
            rows.setdefault("image read (load_xray)", []).append(t1 - t0)
            for k, v in out.timings.items():
                rows.setdefault(k, []).append(v)
            rows.setdefault("cascade total", []).append(t2 - t1)
            rows.setdefault("predict_image total", []).append(t3 - t2)
    print(f"\ncephalogram benchmark: image {image.shape[1]}x{image.shape[0]} (cols x rows), model {model.name} "
          f"{model.version}, torch {torch.__version__}, device {model.device}, {args.threads} threads, "
          f"{os.cpu_count()} CPUs, median of {args.repeats}")
    print("| step | median (s) | min (s) |\n|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {statistics.median(v):.3f} | {min(v):.3f} |")


def bench_ct(args, model) -> None:
    import os

    import pydicom
    import torch

    from pacs_landmarks.dicom.series import load_series
    from pacs_landmarks.inference.phantom import make_case, write_case

    rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        case = make_case(4242)
        # 0.5 mm pixels (256 mm field of view); slice thickness chosen to give the requested slice count
        series = write_case(case, Path(tmp) / "s", pixel_spacing=0.5, slice_thickness=1.0, size=512)
        files = sorted(series.glob("*.dcm"))
        files = files[: args.slices] if len(files) > args.slices else files
        for r in range(args.repeats + 1):  # the first run warms up caches and is not counted
            t0 = time.perf_counter()
            datasets = [pydicom.dcmread(f) for f in files]
            t1 = time.perf_counter()
            volume = load_series(datasets)
            t2 = time.perf_counter()
            out = model.run(volume)
            t3 = time.perf_counter()
            if r == 0:
                shape = volume.shape
                continue
            rows.setdefault("DICOM read", []).append(t1 - t0)
            rows.setdefault("volume build", []).append(t2 - t1)
            for k, v in out.timings.items():
                rows.setdefault(k, []).append(v)
            rows.setdefault("cascade total", []).append(t3 - t2)
    print(f"cascade benchmark: volume {shape[2]}x{shape[1]}x{shape[0]} (cols x rows x slices), "
          f"model {model.name} {model.version}, test-time augmentation {model.tta or 'none'}, "
          f"torch {torch.__version__}, device {model.device}, {args.threads} threads, "
          f"{os.cpu_count()} CPUs, median of {args.repeats}")
    print(f"| step | median (s) | min (s) |\n|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {statistics.median(v):.3f} | {min(v):.3f} |")


if __name__ == "__main__":
    main()
