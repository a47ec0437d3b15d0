#!/usr/bin/env python
"""Orthanc plugin latency: last instance stored -> landmark SR visible in Orthanc, broken down.

One phantom head CT of about 300 slices is sent with storescu to an Orthanc (private network namespace)
with the plugin; the time is taken from the end of storescu (the last C-STORE answered) to the job being
``done`` (all three results stored). The breakdown uses the job's own times and timings:

- stable wait: last instance -> Orthanc's STABLE_SERIES -> job queued (StableAge + Orthanc's 1 s tick);
- queue: queued -> claimed by the worker;
- read: instances read back from Orthanc (``/instances/{id}/file``) and parsed;
- volume / cascade / SR+SEG: ``process_series`` (series assembly, the model, building the three objects);
- write: result files written (fsync) before delivery; store: ``POST /instances`` of the three objects.

If bench/node.py exists it is run afterwards so the two front ends are compared in the same run.

    .venv/bin/python bench/orthanc.py [--slices 300] [--size 512]
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pacs_landmarks.plugin.config import write_runtime_config  # noqa: E402
from pacs_landmarks.plugin.launch import OrthancProcess  # noqa: E402


def make_series(out: Path, slices: int, size: int, seed: int) -> tuple[Path, str]:
    """A phantom with about ``slices`` slices: the slice thickness is scaled once to hit the count."""
    import pydicom

    from pacs_landmarks.inference.phantom import make_case, write_case

    case = make_case(seed)
    thickness = 0.7
    for attempt in range(2):
        case_dir = Path(write_case(case, out / f"try{attempt}", pixel_spacing=0.5, slice_thickness=thickness, size=size))
        n = len(list(case_dir.glob("*.dcm")))
        if abs(n - slices) <= slices * 0.05:
            break
        thickness *= n / slices
    uid = pydicom.dcmread(next(case_dir.glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID
    return case_dir, uid


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--no-node", action="store_true", help="do not run bench/node.py afterwards")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-orthanc-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        case_dir, series_uid = make_series(root / "phantom", args.slices, args.size, args.seed)
        files = sorted(case_dir.glob("*.dcm"))
        print(f"phantom: {len(files)} slices of {args.size}x{args.size} in {time.perf_counter() - t:.1f} s", flush=True)
        config = write_runtime_config(
            root / "orthanc.json",
            {
                "StorageDirectory": str(root / "orthanc"),
                "IndexDirectory": str(root / "orthanc"),
                "PacsLandmarks": {"WorkDirectory": str(root / "work")},
            },
        )
        orthanc = OrthancProcess(config, log_path=root / "orthanc.log")
        try:
            orthanc.start(timeout=90)
            while not orthanc.get_json("/pacs-landmarks/health")["model"]["loaded"]:
                time.sleep(0.2)
            t0 = time.perf_counter()
            orthanc.storescu(case_dir)
            stored_at = time.time()
            send_s = time.perf_counter() - t0
            job = None
            while time.time() - stored_at < 600:
                jobs = [j for j in orthanc.get_json("/pacs-landmarks/jobs") if j["series_instance_uid"] == series_uid]
                if jobs and jobs[0]["state"] in ("done", "failed"):
                    job = jobs[0]
                    break
                time.sleep(0.1)
            visible_at = time.time()
        finally:
            orthanc.stop()
        if job is None or job["state"] != "done":
            print(f"no result: {job and job['reason']}; log {root / 'orthanc.log'}", file=sys.stderr)
            print((root / "orthanc.log").read_text()[-3000:], file=sys.stderr)
            return 1

    tm = job["timings"]
    rows = [
        ("storescu (not in the total)", send_s),
        ("stable wait (StableAge=2 + tick)", job["created_at"] - stored_at),
        ("queue (queued -> worker)", job["started_at"] - job["queued_at"]),
        ("read from Orthanc", tm.get("read", 0.0)),
        ("volume assembly", tm.get("volume", 0.0)),
        ("cascade", tm.get("cascade", 0.0)),
        ("SR + SEG build", tm.get("outputs", 0.0)),
        ("write result files", tm.get("write_results", 0.0)),
        ("store in Orthanc (POST /instances)", tm.get("delivery", 0.0)),
        ("total: last instance -> SR visible", visible_at - stored_at),
    ]
    print(f"\nOrthanc plugin, {len(files)} slices {args.size}x{args.size}, {platform.machine()} "
          f"{_cpu_count()} CPU(s), {platform.python_version()}")
    print(f"| {'step':38s} | {'seconds':>8s} |\n|{'-' * 40}|{'-' * 10}|")
    for name, seconds in rows:
        print(f"| {name:38s} | {seconds:8.2f} |")
    print(json.dumps({"orthanc_timings": tm, "total_s": visible_at - stored_at}))

    node = REPO / "bench" / "node.py"
    if node.exists() and not args.no_node:
        print("\nbench/node.py, same run, for comparison:", flush=True)
        subprocess.run([sys.executable, str(node), "--slices", str(args.slices), "--size", str(args.size), "--repeat", "1"], check=False)
    return 0


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main())
