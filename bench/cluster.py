"""Distributed-mode benchmark: throughput and latency of a burst with 1 and 2 analysis workers, and the
queue's own overhead per job.

- burst: N series enqueued at once (``Cluster.enqueue``, as the plugin and the node do); every analysis
  worker is a real `worker` process on a private PostgreSQL, plus one delivery worker (results copied to a
  folder). ``--analysis stub``: a fixed ``--seconds`` per series (tests/cluster_worker.py), so the numbers are
  the queue's; ``--analysis model``: `pacs-landmarks worker` with the real model on phantom series in a
  spool folder. Latency = enqueue -> job done (results written and delivered); add the receiver's completion
  wait (node: idle timeout; Orthanc: StableAge) for "last instance -> results stored".
- overhead: one job at a time on an idle stub worker (``--seconds 0``): enqueue -> the job's record claimed
  by the worker (procrastinate LISTEN/NOTIFY + fetch + claim). Target: <= 50 ms p95 on this machine.

    .venv/bin/python bench/cluster.py [--series 20] [--seconds 0.5] [--analysis stub|model] [--overhead 40]
                                      [--no-burst]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pacs_landmarks.jobs.distributed import Cluster, ClusterSettings, stop_workers  # noqa: E402
from pacs_landmarks.jobs.pgserver import PgServer  # noqa: E402

CLI = str(Path(sys.executable).with_name("pacs-landmarks"))


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))]


def start_workers(args, dsn: str, root: Path, n: int, seconds: float) -> list[subprocess.Popen]:
    log = root / "runs.jsonl"
    err = open(root / "workers.err", "a")
    procs = []
    for queues, count in (("analyse-stat,analyse", n), ("deliver", 1)):
        for _ in range(count):
            if args.analysis == "model" and queues != "deliver":
                cmd = [CLI, "worker", "--dsn", dsn, "--storage", str(root), "--queues", queues]
            else:
                cmd = [sys.executable, str(REPO / "tests" / "cluster_worker.py"), dsn, str(root / "results"),
                       str(log), "--queues", queues, "--seconds", str(seconds)]
            procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=err, stderr=err))
    # Ready = registered with procrastinate (model loaded and warmed for real workers).
    import psycopg

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(dsn) as conn:
                if conn.execute("SELECT count(*) FROM procrastinate_workers").fetchone()[0] >= n + 1:
                    return procs
        except psycopg.Error:
            pass
        time.sleep(0.2)
    raise SystemExit(f"workers not ready: {(root / 'workers.err').read_text()[-2000:]}")


def wait_done(cluster: Cluster, n: int, timeout: float = 1800) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = cluster.store.list()
        if len(jobs) >= n and all(j.finished for j in jobs):
            return jobs
        time.sleep(0.05)
    raise SystemExit("burst did not finish")


def spool_series(root: Path, n: int) -> list[tuple[str, str, str]]:
    """n copies of one phantom series with new UIDs in root/series/<uid>: (series, study, folder)."""
    import pydicom
    from pydicom.uid import generate_uid

    from pacs_landmarks.inference.phantom import make_case, write_case

    src = Path(write_case(make_case(7), root / "phantom", size=128, slice_thickness=2.5))
    out = []
    for _ in range(n):
        series = generate_uid()
        folder = root / "series" / series
        folder.mkdir(parents=True)
        for f in sorted(src.glob("*.dcm")):
            ds = pydicom.dcmread(f)
            ds.SeriesInstanceUID = series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.save_as(folder / f.name, enforce_file_format=True)
        out.append((series, str(ds.StudyInstanceUID), str(folder)))
    return out


def burst(args, pg: PgServer, root: Path, workers: int) -> dict:
    dsn = pg.create_database(f"burst{workers}")
    cluster = Cluster(ClusterSettings(dsn=dsn, results_dir=str(root / "results")))
    if args.analysis == "model":
        series = spool_series(root / f"spool{workers}", args.series)
    else:
        series = [(f"1.2.826.0.1.{workers}.{k}", "1.2.826.0.1", f"/spool/1.2.826.0.1.{workers}.{k}")
                  for k in range(args.series)]
    procs = start_workers(args, dsn, root, workers, args.seconds)
    try:
        t0 = time.time()
        for uid, study, source in series:
            cluster.enqueue(uid, study, source, destinations=[{"directory": str(root / "delivered")}])
        jobs = wait_done(cluster, len(series))
        wall = max(j.finished_at for j in jobs) - t0
    finally:
        stop_workers(procs)
        cluster.close()
    failed = [j for j in jobs if j.state != "done"]
    if failed:
        raise SystemExit(f"{len(failed)} jobs failed: {failed[0].reason}")
    latency = [j.finished_at - j.created_at for j in jobs]
    return {"workers": workers, "jobs": len(jobs), "wall_s": wall, "jobs_per_min": 60 * len(jobs) / wall,
            "p50_s": pct(latency, 50), "p95_s": pct(latency, 95)}


def overhead(args, pg: PgServer, root: Path) -> list[float]:
    dsn = pg.create_database("overhead")
    cluster = Cluster(ClusterSettings(dsn=dsn, results_dir=str(root / "results-o")))
    saved, args.analysis = args.analysis, "stub"
    procs = start_workers(args, dsn, root, 1, 0.0)
    args.analysis = saved
    waits = []
    try:
        for k in range(args.overhead + 3):
            job, _ = cluster.enqueue(f"1.2.826.0.2.{k}", "1.2.826.0.2", f"/spool/o{k}", destinations=[])
            while (j := cluster.store.get(job.id)).started_at is None:
                time.sleep(0.002)
            if k >= 3:  # the first claims warm the worker's connections up
                waits.append(j.started_at - j.queued_at)
            while not cluster.store.get(job.id).finished:
                time.sleep(0.005)
    finally:
        stop_workers(procs)
        cluster.close()
    return waits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--series", type=int, default=20)
    p.add_argument("--seconds", type=float, default=0.5, help="stub analysis time per series")
    p.add_argument("--analysis", choices=("stub", "model"), default="stub")
    p.add_argument("--overhead", type=int, default=40, help="jobs for the enqueue -> start measurement (0: skip)")
    p.add_argument("--no-burst", action="store_true", help="only the queue overhead (quick; for quiet moments)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    with open("/proc/loadavg") as fh:
        load = fh.read().split()[:3]
    pg = PgServer(root / "pg").start()
    try:
        rows = [] if args.no_burst else [burst(args, pg, root, n) for n in (1, 2)]
        waits = overhead(args, pg, root) if args.overhead else []
    finally:
        pg.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps({"bursts": rows, "overhead_s": waits, "load": load}))
        return
    what = f"stub {args.seconds:.2f} s/series" if args.analysis == "stub" else "real model, 128^2 phantom"
    print(f"load average before: {' '.join(load)}; after: {' '.join(open('/proc/loadavg').read().split()[:3])}")
    if rows:
        print(f"burst of {args.series} series, {what}")
        print(f"{'workers':>7}  {'jobs':>4}  {'wall s':>7}  {'jobs/min':>8}  {'p50 s':>6}  {'p95 s':>6}")
    for r in rows:
        print(f"{r['workers']:>7}  {r['jobs']:>4}  {r['wall_s']:>7.2f}  {r['jobs_per_min']:>8.1f}  {r['p50_s']:>6.2f}"
              f"  {r['p95_s']:>6.2f}")
    if waits:
        ms = [1000 * w for w in waits]
        print(f"queue overhead enqueue -> start ({len(ms)} jobs, idle worker): p50 {statistics.median(ms):.1f} ms, "
              f"p95 {pct(ms, 95):.1f} ms, max {max(ms):.1f} ms (target p95 <= 50 ms)")


if __name__ == "__main__":
    main()
