"""Time to build and write the landmark SR, measurements SR and SEG for a 512 x 512 x 300 CT series.

Target (docs/benchmarks.md): <= 0.5 s in total on the 2-core CI machine. Prints one table. Source headers are
synthetic (no pixel data is needed to build the results); 16 landmarks at random places inside the volume.

    .venv/bin/python bench/outputs.py [--slices 300] [--size 512] [--thickness 1.0] [--repeat 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from sr_helpers import GEOMETRIES, make_landmarks, make_series  # noqa: E402

from pacs_landmarks.sr_templates import geometry  # noqa: E402
from pacs_landmarks.sr_templates.common import Algorithm  # noqa: E402
from pacs_landmarks.sr_templates.landmark_sr import build_landmark_sr  # noqa: E402
from pacs_landmarks.sr_templates.measurements import build_measurements_sr, compute_measurements  # noqa: E402
from pacs_landmarks.sr_templates.seg import build_landmark_seg  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--pixel", type=float, default=0.5)
    ap.add_argument("--thickness", type=float, default=0.625)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    GEOMETRIES["bench"] = dict(
        size=args.size, pixel=(args.pixel, args.pixel), thickness=args.thickness, slices=args.slices, tilt_deg=0.0
    )
    _, volume = make_series("bench", with_pixels=False)
    landmarks = make_landmarks(volume, seed=0)
    alg = Algorithm("bench-model", "1.0")
    names = ("landmark SR", "measurements SR", "SEG", "write SRs", "write SEG", "total")
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat + 1):  # the first round warms imports; not counted
            geometry._last_planes = None  # as for a new series: its source planes are not known yet
            marks = [(time.perf_counter(), time.process_time())]
            sr = build_landmark_sr(volume, landmarks, alg)
            marks.append((time.perf_counter(), time.process_time()))
            msr = build_measurements_sr(volume, landmarks, alg, compute_measurements(landmarks))
            marks.append((time.perf_counter(), time.process_time()))
            seg = build_landmark_seg(volume, landmarks, alg)
            marks.append((time.perf_counter(), time.process_time()))
            sr.save_as(Path(tmp) / "sr.dcm", enforce_file_format=True)
            msr.save_as(Path(tmp) / "msr.dcm", enforce_file_format=True)
            marks.append((time.perf_counter(), time.process_time()))
            seg.save_as(Path(tmp) / "seg.dcm", enforce_file_format=True)
            marks.append((time.perf_counter(), time.process_time()))
            for n, key in enumerate(names[:-1]):
                wall[key].append(marks[n + 1][0] - marks[n][0])
                cpu[key].append(marks[n + 1][1] - marks[n][1])
            wall["total"].append(marks[-1][0] - marks[0][0])
            cpu["total"].append(marks[-1][1] - marks[0][1])
        frames = int(seg.NumberOfFrames)
        sizes = {n: (Path(tmp) / f"{n}.dcm").stat().st_size for n in ("sr", "msr", "seg")}
    print(f"series {args.size}x{args.size}x{args.slices}, pixel {args.pixel} mm, slices {args.thickness} mm; "
          f"SEG frames {frames}; sizes SR {sizes['sr'] // 1024} KiB, measurements SR {sizes['msr'] // 1024} KiB, "
          f"SEG {sizes['seg'] // 1024} KiB")
    # CPU seconds are reported next to wall seconds: on a shared 2-core machine wall time mostly measures
    # the neighbours.
    print(f"{'step':<16} {'wall median s':>13} {'wall min s':>10} {'CPU median s':>12}")
    for key in names:
        w, c = wall[key][1:], cpu[key][1:]
        print(f"{key:<16} {statistics.median(w):13.3f} {min(w):10.3f} {statistics.median(c):12.3f}")
    try:
        load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        load = "?"
    print(f"load average during the run: {load} ({os.cpu_count()} CPUs)")

if __name__ == "__main__":
    main()
