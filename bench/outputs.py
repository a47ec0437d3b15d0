"""Time to build and write the landmark SR, measurements SR and SEG for a 512 x 512 x 300 CT series.

Target (docs/benchmarks.md): <= 0.5 s in total on the 2-core CI machine. Prints one table. Source headers are
synthetic (no pixel data is needed to build the results); 16 landmarks at random places inside the volume.

    .venv/bin/python bench/outputs.py [--slices 300] [--size 512] [--thickness 1.0] [--repeat 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from pydicom.uid import generate_uid  # noqa: E402
from sr_helpers import GEOMETRIES, make_landmarks, make_series  # noqa: E402

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
    steps = {"landmark SR": [], "measurements SR": [], "SEG": [], "write 3 files": [], "total": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat + 1):  # the first round warms imports and caches; not counted
            t0 = time.perf_counter()
            sr = build_landmark_sr(volume, landmarks, alg)
            t1 = time.perf_counter()
            msr = build_measurements_sr(volume, landmarks, alg, compute_measurements(landmarks))
            t2 = time.perf_counter()
            seg = build_landmark_seg(volume, landmarks, alg)
            t3 = time.perf_counter()
            for name, ds in (("sr", sr), ("msr", msr), ("seg", seg)):
                ds.save_as(Path(tmp) / f"{name}.dcm", enforce_file_format=True)
            t4 = time.perf_counter()
            for key, value in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                steps[key].append(value)
        frames = int(seg.NumberOfFrames)
        sizes = {n: (Path(tmp) / f"{n}.dcm").stat().st_size for n in ("sr", "msr", "seg")}
    print(f"series {args.size}x{args.size}x{args.slices}, pixel {args.pixel} mm, slices {args.thickness} mm; "
          f"SEG frames {frames}; sizes SR {sizes['sr'] // 1024} KiB, measurements SR {sizes['msr'] // 1024} KiB, "
          f"SEG {sizes['seg'] // 1024} KiB")
    print(f"{'step':<18} {'median s':>9} {'min s':>7} {'max s':>7}")
    for key, values in steps.items():
        values = values[1:]
        print(f"{key:<18} {statistics.median(values):9.3f} {min(values):7.3f} {max(values):7.3f}")


if __name__ == "__main__":
    main()
