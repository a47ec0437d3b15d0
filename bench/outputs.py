"""Time to build and write the landmark SR, measurements SR, SEG and GSPS for a 512 x 512 x 300 CT series.

Target (docs/benchmarks.md): <= 0.5 s in total on the 2-core CI machine. Prints one table. Source headers are
synthetic (no pixel data is needed to build the results). Two cases: 16 landmarks at random places inside the
volume, and the same with Gnathion 3 mm from Menton, whose SEG spheres then overlap as they do in most heads.

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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from sr_helpers import GEOMETRIES, make_landmarks, make_series  # noqa: E402

from pacs_landmarks.sr_templates import geometry  # noqa: E402
from pacs_landmarks.inference.landmark import Landmark  # noqa: E402
from pacs_landmarks.sr_templates.common import Algorithm  # noqa: E402
from pacs_landmarks.sr_templates.gsps import build_gsps, landmark_marks  # noqa: E402
from pacs_landmarks.sr_templates.landmark_sr import build_landmark_sr  # noqa: E402
from pacs_landmarks.sr_templates.measurements import build_measurements_sr, compute_measurements  # noqa: E402
from pacs_landmarks.sr_templates.seg import build_landmark_seg  # noqa: E402


STEPS = ("landmark SR", "measurements SR", "SEG", "GSPS", "write SRs", "write SEG", "write GSPS", "total")


def near_pair(landmarks: list[Landmark], distance_mm: float = 3.0) -> list[Landmark]:
    """The same landmarks with Gnathion ``distance_mm`` from Menton, as in real chins (3-5 mm in the phantoms):
    their SEG spheres (radius >= 2 mm) overlap, which takes the SEG's slower per-segment path."""
    names = [lm.name for lm in landmarks]
    menton = np.asarray(landmarks[names.index("Menton")].position_lps_mm)
    out = list(landmarks)
    g = names.index("Gnathion")
    offset = np.array([0.0, -1.0, 1.0]) / np.sqrt(2.0) * distance_mm  # anterior and up, as Gn lies from Me
    out[g] = Landmark("Gnathion", tuple(float(v) for v in menton + offset), landmarks[g].confidence)
    return out


def time_outputs(volume, landmarks: list[Landmark], repeat: int, tmp: Path) -> tuple[dict, dict, object]:
    """Wall and CPU seconds per step over ``repeat`` rounds (after one warm-up round)."""
    alg = Algorithm("bench-model", "1.0")
    wall: dict[str, list[float]] = {k: [] for k in STEPS}
    cpu: dict[str, list[float]] = {k: [] for k in STEPS}
    for _ in range(repeat + 1):  # the first round warms imports; not counted
        geometry._last_planes = None  # as for a new series: its source planes are not known yet
        marks = [(time.perf_counter(), time.process_time())]
        sr = build_landmark_sr(volume, landmarks, alg)
        marks.append((time.perf_counter(), time.process_time()))
        msr = build_measurements_sr(volume, landmarks, alg, compute_measurements(landmarks))
        marks.append((time.perf_counter(), time.process_time()))
        seg = build_landmark_seg(volume, landmarks, alg)
        marks.append((time.perf_counter(), time.process_time()))
        gsps = build_gsps(volume, landmark_marks(volume, landmarks), alg)
        marks.append((time.perf_counter(), time.process_time()))
        sr.save_as(tmp / "sr.dcm", enforce_file_format=True)
        msr.save_as(tmp / "msr.dcm", enforce_file_format=True)
        marks.append((time.perf_counter(), time.process_time()))
        seg.save_as(tmp / "seg.dcm", enforce_file_format=True)
        marks.append((time.perf_counter(), time.process_time()))
        gsps.save_as(tmp / "gsps.dcm", enforce_file_format=True)
        marks.append((time.perf_counter(), time.process_time()))
        for n, key in enumerate(STEPS[:-1]):
            wall[key].append(marks[n + 1][0] - marks[n][0])
            cpu[key].append(marks[n + 1][1] - marks[n][1])
        wall["total"].append(marks[-1][0] - marks[0][0])
        cpu["total"].append(marks[-1][1] - marks[0][1])
    return ({k: v[1:] for k, v in wall.items()}, {k: v[1:] for k, v in cpu.items()}, seg)


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
    for header in volume.source_headers:  # a real CT's default window (the GSPS copies it)
        header.WindowCenter, header.WindowWidth = 40, 400
    spread = make_landmarks(volume, seed=0)
    cases = {"spread": spread, "Me-Gn 3 mm": near_pair(spread)}
    print(f"series {args.size}x{args.size}x{args.slices}, pixel {args.pixel} mm, slices {args.thickness} mm; "
          f"median of {args.repeat} rounds (wall s; CPU s in brackets)")
    print("spread: 16 landmarks at random places, no SEG spheres overlap; Me-Gn 3 mm: the same with Gnathion 3 mm "
          "from Menton, spheres overlap (as in most real heads)\n")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, landmarks in cases.items():
            wall, cpu, seg = time_outputs(volume, landmarks, args.repeat, Path(tmp))
            sizes = {n: (Path(tmp) / f"{n}.dcm").stat().st_size // 1024 for n in ("sr", "msr", "seg", "gsps")}
            results[name] = (wall, cpu, int(seg.NumberOfFrames), str(seg.SegmentsOverlap), sizes)
    # CPU seconds are reported next to wall seconds: on a shared 2-core machine wall time mostly measures
    # the neighbours.
    print("| step | " + " | ".join(cases) + " |")
    print("|---|" + "---:|" * len(cases))
    for key in STEPS:
        cells = [f"{statistics.median(w[key]):.3f} ({statistics.median(c[key]):.3f})"
                 for w, c, *_ in results.values()]
        print(f"| {key} | " + " | ".join(cells) + " |")
    for name, (wall, _, frames, overlap, sizes) in results.items():
        print(f"\n{name}: total min {min(wall['total']):.3f} s; SEG {frames} frames, SegmentsOverlap {overlap}; "
              f"sizes SR {sizes['sr']} KiB, measurements SR {sizes['msr']} KiB, SEG {sizes['seg']} KiB, "
              f"GSPS {sizes['gsps']} KiB")
    try:
        load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        load = "?"
    print(f"load average after the run: {load} ({os.cpu_count()} CPUs); target: total <= 0.5 s")


if __name__ == "__main__":
    main()
