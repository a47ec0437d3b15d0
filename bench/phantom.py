"""Phantom generation speed: make_case (anatomy + landmark measurement) and write_case (render + DICOM).

Prints a table. The issue's target: one 512x512x200 case in <= 10 s on the 2-core CI machine.
Run: .venv/bin/python bench/phantom.py [--repeat N]
"""
from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

from pacs_landmarks.inference import phantom as ph


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="cases per row (different seeds)")
    args = parser.parse_args()
    rows = []
    configs = [  # (label, size, pixel spacing, thickness, slices)
        ("512x512x200, 1 mm", 512, 0.5, 1.0, 200),
        ("512x512x40, 5 mm", 512, 0.5, 5.0, 40),
        ("256x256x100, 2 mm", 256, 1.0, 2.0, 100),
        ("128x128x50, 4 mm", 128, 2.0, 4.0, 50),
    ]
    tmp = Path(tempfile.mkdtemp(prefix="bench-phantom-"))
    try:
        for label, size, ps, thick, n in configs:
            make_s, write_s = [], []
            for r in range(args.repeat):
                t0 = time.perf_counter()
                case = ph.make_case(100 + r)
                t1 = time.perf_counter()
                z0 = float(case.landmarks["Menton"][2]) - 25.0
                out = ph.write_case(case, tmp / f"{size}-{r}", pixel_spacing=ps, slice_thickness=thick, size=size,
                                    z_range=(z0, z0 + thick * (n - 1) + 1e-6))
                t2 = time.perf_counter()
                assert len(list(out.glob("*.dcm"))) == n
                make_s.append(t1 - t0)
                write_s.append(t2 - t1)
                shutil.rmtree(out)
            total = [a + b for a, b in zip(make_s, write_s)]
            rows.append((label, min(make_s), min(write_s), min(total), max(total)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, python {platform.python_version()}")
    print(f"| case | make_case s | write_case s | total s (best) | total s (worst of {args.repeat}) |")
    print("|---|---:|---:|---:|---:|")
    for label, m, w, best, worst in rows:
        print(f"| {label} | {m:.2f} | {w:.2f} | {best:.2f} | {worst:.2f} |")


if __name__ == "__main__":
    main()
