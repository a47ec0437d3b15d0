"""Node benchmarks: ingest rate against dcmtk storescp, and latency from the last instance to delivered results.

- ingest: one 300-slice 512 x 512 phantom series sent by dcmtk storescu (TCP_NODELAY=1) to our node and to
  dcmtk storescp (same run, same files, both writing to disk). Target: node/storescp >= 0.8. Our node fsyncs
  every instance before answering Success; storescp does not. The last lines give the durable write's cost on
  this disk and the ratio it alone allows (storescp's time per instance / (that + the write)).
- latency: last instance acknowledged -> every result acknowledged by the destination (a storescp), with the
  per-step breakdown recorded by the job (completion wait, queue, volume read, cascade, SR/SEG build, result
  write, delivery). Target: <= 5 s for 300 slices on the 2-core CPU.

    .venv/bin/python bench/node.py [--slices 300] [--size 512] [--repeat 3] [--cache DIR] [--idle-timeout 2]

The series is rendered once into --cache (default: a temporary folder under /tmp, kept between runs).
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENV = {**os.environ, "TCP_NODELAY": "1"}
CLI = str(Path(sys.executable).with_name("pacs-landmarks"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"nothing listening on {port} after {timeout} s")


def make_series(cache: Path, slices: int, size: int) -> list[Path]:
    marker = cache / f"series-{slices}x{size}"
    files = sorted(marker.glob("*.dcm"))
    if len(files) == slices:
        return files
    from pacs_landmarks.inference.phantom import _head_extent_z, make_case, write_case

    shutil.rmtree(marker, ignore_errors=True)
    case = make_case(0)
    z0, _ = _head_extent_z(case)
    thick = 0.7
    print(f"rendering a {slices}-slice {size}x{size} phantom into {marker} ...", file=sys.stderr)
    write_case(case, marker, size=size, slice_thickness=thick, z_range=(z0, z0 + (slices - 0.5) * thick))
    files = sorted(marker.glob("*.dcm"))
    assert len(files) == slices, len(files)
    return files


def storescu(port: int, aec: str, files: list[Path]) -> float:
    t = time.perf_counter()
    proc = subprocess.run(["storescu", "-aet", "BENCH", "-aec", aec, "127.0.0.1", str(port), *map(str, files)],
                          env=ENV, capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    if proc.returncode != 0 or "E:" in proc.stderr:
        raise SystemExit(f"storescu failed: {proc.stderr[-2000:]}")
    return elapsed


def start_storescp(directory: Path, port: int) -> subprocess.Popen:
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["storescp", "-aet", "ARCHIVE", "-od", str(directory), "+B", str(port)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(port)
    return proc


def fsync_ms(work: Path, sample: Path, n: int = 30) -> float:
    from pacs_landmarks.node.scp import write_atomic

    data = sample.read_bytes()
    t = time.perf_counter()
    for i in range(n):
        write_atomic(work / "fsync" / f"{i}.dcm", data)
    return (time.perf_counter() - t) / n * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--idle-timeout", type=float, default=2.0)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "pacs-landmarks-bench")
    args = ap.parse_args()

    from pacs_landmarks.jobs.store import JobStore
    from pydicom.uid import generate_uid
    import pydicom

    files = make_series(args.cache, args.slices, args.size)
    mb = sum(f.stat().st_size for f in files) / 1e6
    work = Path(tempfile.mkdtemp(prefix="bench-node-"))
    arch_port, node_port = free_port(), free_port()
    archive = start_storescp(work / "archive", arch_port)
    node = subprocess.Popen(
        [CLI, "serve", "--storage", str(work / "node"), "--port", str(node_port), "--ae-title", "LANDMARKS",
         "--destination", f"ARCHIVE@127.0.0.1:{arch_port}", "--idle-timeout", str(args.idle_timeout),
         "--log-format", "json"], env=ENV, stdout=subprocess.DEVNULL, stderr=open(work / "node.log", "w"))
    try:
        wait_listening(node_port)
        store = JobStore(work / "node" / "jobs.sqlite")
        rows, latencies = [], []
        for run in range(args.repeat):
            # Fresh UIDs per run, so each run is a new series and a new job (same bytes otherwise).
            run_dir = work / f"run{run}"
            run_dir.mkdir()
            series = generate_uid()
            sent = []
            by_count = run % 2 == 1  # odd runs: Images in Acquisition set, so no idle wait
            for f in files:
                ds = pydicom.dcmread(f)
                if by_count:
                    ds.ImagesInAcquisition = len(files)
                ds.SeriesInstanceUID = series
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
                ds.save_as(run_dir / f.name, enforce_file_format=True)
                sent.append(run_dir / f.name)
            scp_dir = work / f"storescp{run}"
            scp_port = free_port()
            scp = start_storescp(scp_dir, scp_port)
            t_scp = storescu(scp_port, "ANY", sent)
            scp.terminate()
            scp.wait()
            t_node = storescu(node_port, "LANDMARKS", sent)
            t_last = time.time()
            while True:
                jobs = [j for j in store.list() if j.series_instance_uid == series and j.finished]
                if jobs:
                    break
                time.sleep(0.02)
            job = jobs[0]
            if job.state != "done":
                raise SystemExit(f"job failed: {job.reason}")
            rows.append((run + 1, len(sent) / t_scp, mb / t_scp, len(sent) / t_node, mb / t_node, t_scp / t_node))
            latencies.append((job.finished_at - t_last, job.timings, "count" if by_count else f"idle {args.idle_timeout:g} s"))
        print(f"\nNode ingest: {args.slices} x {args.size}x{args.size} CT instances ({mb:.0f} MB), storescu -> "
              "storescp vs -> node (TCP_NODELAY=1)\n")
        print("| run | storescp inst/s | storescp MB/s | node inst/s | node MB/s | ratio node/storescp |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r[0]} | {r[1]:.0f} | {r[2]:.0f} | {r[3]:.0f} | {r[4]:.0f} | {r[5]:.2f} |")
        best = max(rows, key=lambda r: r[5])
        print(f"\nbest ratio {best[5]:.2f} (target >= 0.8)\n")
        steps = ["completion_wait", "queue_wait", "read", "volume", "cascade", "outputs", "write_results", "delivery"]
        print("Latency: last instance acknowledged -> all results acknowledged by the destination (s)\n")
        print("| run | completion | total | " + " | ".join(steps) + " |")
        print("|---|---|---|" + "---|" * len(steps))
        for n, (total, timings, how) in enumerate(latencies, 1):
            print(f"| {n} | {how} | {total:.2f} | " + " | ".join(f"{timings.get(s, 0.0):.2f}" for s in steps) + " |")
        print(f"\nbest total {min(t for t, _, _ in latencies):.2f} s (target <= 5 s)")
        durable = fsync_ms(work, files[0])
        scp_ms = min(1000 / r[1] for r in rows)
        print(f"\ndurable write (temp file, fsync, rename, fsync dir) of one {mb / len(files):.2f} MB instance on "
              f"this disk: {durable:.1f} ms (storescp does not fsync)")
        # storescu waits for each response, so the durable write adds to every instance's round trip: even a
        # receiver that cost nothing else could not beat storescp's own time per instance plus that write.
        print(f"ceiling for the ratio with a durable write before each Success: {scp_ms:.2f} / ({scp_ms:.2f} + "
              f"{durable:.1f}) = {scp_ms / (scp_ms + durable):.2f}")
    finally:
        node.terminate()
        node.wait(30)
        archive.terminate()
        archive.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
