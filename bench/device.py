"""The cascade on a GPU against the CPU: the same points, confidences and statuses? How fast?

A model file's confidence threshold was calibrated on the CPU in float32, and every device serves in
float32. For every case of each ``--data`` folder (CT cases or cephalograms, each with its landmarks.json),
the shipped model of that kind runs on the CPU, then on the device in float32 (as served) and with float16
autocast (``LandmarkModel(autocast=True)``). Per variant the table gives the median cascade time per case
(after one warm-up run), the landmarks found, the error of all in-scan landmarks against the truth, how far
the final points and the confidences move from the CPU's, and every status that differs.

Without ``--data``: 4 complete phantom heads (256 x 256 at 1 mm) and 4 cephalograms, made in a temporary
folder. Without the device (no GPU): says so and exits 0, as ``make bench`` runs every benchmark.

Usage: python bench/device.py [--data DIR ...] [--device cuda] [--threads 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", action="append", help="folder of cases (repeatable; default: phantoms made here)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of the CPU variant")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per case and variant")
    args = ap.parse_args()
    os.environ["PACS_LANDMARKS_THREADS"] = str(args.threads)
    import torch

    from pacs_landmarks.inference.model import ModelError, torch_device

    torch.set_num_threads(args.threads)
    try:
        torch_device(args.device)
    except ModelError as exc:
        print(f"bench/device.py: nothing to compare ({exc})")
        return
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    print(f"torch {torch.__version__}, {name}, {os.cpu_count()} CPUs, CPU variant on {args.threads} threads, "
          f"median of {args.repeats} runs per case")
    with tempfile.TemporaryDirectory() as tmp:
        for data in args.data or _phantoms(Path(tmp)):
            compare(data, args.device, args.repeats)


def _phantoms(tmp: Path) -> list[str]:
    from pacs_landmarks.inference.ceph_phantom import render_ceph, write_ceph
    from pacs_landmarks.inference.phantom import make_case, write_case

    for k in range(4):
        write_case(make_case(5000 + k), tmp / "ct" / f"case-{k + 1:04d}", pixel_spacing=1.0, slice_thickness=1.0,
                   size=256)
        write_ceph(render_ceph(5000 + k), tmp / "ceph" / f"case-{k + 1:04d}")
    return [str(tmp / "ct"), str(tmp / "ceph")]


def compare(data: str, device: str, repeats: int) -> None:
    from pacs_landmarks.inference.data import detect_landmark_set, load_cases
    from pacs_landmarks.inference.model import LandmarkModel

    landmark_set = detect_landmark_set(data)
    cpu = LandmarkModel.load(device="cpu", landmark_set=landmark_set)
    dev = LandmarkModel.load(device=device, landmark_set=landmark_set)
    variants = {"cpu float32": cpu, f"{dev.device} float32 (served)": dev,
                f"{dev.device} float16 autocast": LandmarkModel(dev.cascade, dev.metadata, dev.device, dev.path,
                                                                autocast=True)}
    cases = load_cases(data, cpu.landmark_names, cpu.landmark_set, progress=False)
    runs = {v: [_run(m, c, repeats) for c in cases] for v, m in variants.items()}
    print(f"\n{data}: {len(cases)} cases, model {cpu.name} {cpu.version} (threshold {cpu.low_confidence:.2f})")
    print("| variant | cascade per case, median (s) | found | MRE in scan (mm) | largest / median move "
          "from the CPU's point (mm) | largest confidence change | statuses that differ |")
    print("|---|---|---|---|---|---|---|")
    base = runs["cpu float32"]
    for v, rs in runs.items():
        moves = np.concatenate([np.linalg.norm(r["pos"] - b["pos"], axis=-1) for r, b in zip(rs, base)])
        dconf = max(float(np.abs(r["conf"] - b["conf"]).max()) for r, b in zip(rs, base))
        changed = [f"{c.name} {cpu.landmark_names[i]} {b['status'][i]} -> {r['status'][i]}"
                   for c, r, b in zip(cases, rs, base) for i in np.flatnonzero(r["status"] != b["status"])]
        err = np.concatenate([r["err"] for r in rs])
        print(f"| {v} | {statistics.median(r['time'] for r in rs):.3f} | "
              f"{sum(int((r['status'] == 'found').sum()) for r in rs)} | {np.nanmean(err):.3f} | "
              f"{np.nanmax(moves):.3f} / {np.nanmedian(moves):.3f} | {dconf:.4f} | "
              f"{len(changed)}{': ' + '; '.join(changed) if changed else ''} |")


def _run(model, case, repeats: int) -> dict:
    arr = case.array.astype(np.float32)
    times = []
    for r in range(repeats + 1):  # the first run warms up (kernels, caches) and is not counted
        t0 = time.perf_counter()
        out = model.run_array(arr, case.affine)
        if r:
            times.append(time.perf_counter() - t0)
    status, _, conf = model.statuses(out)
    in_scan = (case.in_scan if case.in_scan is not None else True) & np.isfinite(case.landmarks).all(1)
    err = np.linalg.norm(out.positions[-1] - case.landmarks, axis=-1)[in_scan]
    return {"pos": out.positions[-1], "conf": np.asarray(conf), "status": np.asarray(status), "err": err,
            "time": statistics.median(times)}


if __name__ == "__main__":
    main()
