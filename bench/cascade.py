"""Per-stage time of the landmark cascade on a 512 x 512 x 200 CT series (CPU, 2 threads unless told).

Prints a table: DICOM read (pydicom, all slices), volume build (load_series), stage 1/2/3, cascade total.
Usage: .venv/bin/python bench/cascade.py [--repeats 5] [--threads 2] [--model MODEL.pt]
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
    args = ap.parse_args()

    import os

    os.environ["PACS_LANDMARKS_THREADS"] = str(args.threads)
    import pydicom
    import torch

    from pacs_landmarks.dicom.series import load_series
    from pacs_landmarks.inference.model import LandmarkModel
    from pacs_landmarks.inference.phantom import make_case, write_case

    torch.set_num_threads(args.threads)
    model = LandmarkModel.load(args.model, device="cpu")
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
          f"model {model.name} {model.version}, torch {torch.__version__}, {args.threads} threads, "
          f"{os.cpu_count()} CPUs, median of {args.repeats}")
    print(f"| step | median (s) | min (s) |\n|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {statistics.median(v):.3f} | {min(v):.3f} |")


if __name__ == "__main__":
    main()
