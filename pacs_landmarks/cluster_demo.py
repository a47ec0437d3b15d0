"""``make cluster-demo``: the distributed mode on one machine, end to end, with real parts.

In a private network namespace (the demo re-runs itself under ``unshare -n``: nothing listens outside it):
PostgreSQL (``initdb`` into ``var/cluster-demo/pg``, run as the ``postgres`` user when root) holds Orthanc's
index for two Orthancs (Debian ``orthanc-postgresql``, ``"Lock": false``, one shared storage area) and the
job queue; both Orthancs run the plugin with ``"Queue": "postgres"`` (they only enqueue); two
``pacs-landmarks worker`` processes analyse (model loaded once each) and deliver with STOW-RS. A burst of
phantom series is sent, half to each Orthanc, plus one series split between both (both fire STABLE_SERIES:
one analysis). The results are then found with ``findscu`` on either Orthanc, a summary table is printed,
and everything is stopped -- also when a step fails.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pacs_landmarks.plugin.config import REPO_ROOT, write_runtime_config
from pacs_landmarks.plugin.launch import OrthancProcess

OUT = REPO_ROOT / "var" / "cluster-demo"
PG_PLUGIN = "/usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so"
CLI = str(Path(sys.executable).with_name("pacs-landmarks"))


class DemoError(Exception):
    pass


def _say(t0: float, text: str) -> None:
    print(f"[{time.perf_counter() - t0:6.1f} s] {text}", flush=True)


def _phantoms(out: Path, n: int, size: int) -> list[Path]:
    """n phantom series (different seeds) as folders of DICOM files."""
    from pacs_landmarks.inference.phantom import make_case, write_case

    return [Path(write_case(make_case(100 + k), out / f"case{k}", size=size, slice_thickness=2.5))
            for k in range(n)]


def _orthanc(out: Path, name: str, http: int, dicom: int, pg_uri: str, dsn: str, peer: int) -> OrthancProcess:
    config = write_runtime_config(out / f"{name}.json", {
        "Name": name, "DicomAet": name.upper(), "HttpPort": http, "DicomPort": dicom,
        "StorageDirectory": str(out / "storage"), "IndexDirectory": str(out / name),
        "StableAge": 2,
        "Plugins": ["/usr/share/orthanc/plugins/libOrthancPython.so",
                    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so", PG_PLUGIN],
        "PostgreSQL": {"EnableIndex": True, "EnableStorage": False, "ConnectionUri": pg_uri, "Lock": False},
        "PacsLandmarks": {"WorkDirectory": str(out / f"{name}-work"), "Queue": "postgres", "Dsn": dsn,
                          "DicomWebUrl": f"http://127.0.0.1:{http}/dicom-web",
                          "DicomWebPeers": [f"http://127.0.0.1:{peer}/dicom-web"]},
    })
    return OrthancProcess(config, private_network=False, log_path=out / f"{name}.log")


def run(args: argparse.Namespace) -> int:
    from pacs_landmarks.jobs.distributed import stop_workers
    from pacs_landmarks.jobs.pgserver import PgServer
    from pacs_landmarks.jobs.pgstore import PgJobStore

    t0 = time.perf_counter()
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if not Path(PG_PLUGIN).exists():
        raise DemoError("Debian's orthanc-postgresql is not installed (scripts/bootstrap installs it)")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    series = _phantoms(out / "phantoms", args.series, args.size)
    _say(t0, f"{len(series)} phantom series written ({args.size}^2 pixels)")
    pg = PgServer(out / "pg", port=5432).start()
    procs: list[subprocess.Popen] = []
    orthancs: list[OrthancProcess] = []
    try:
        pg.create_database("orthanc")
        dsn = pg.create_database("landmarks")
        _say(t0, f"PostgreSQL {pg.dsn_base} (Orthanc index + job queue)")
        for name, http, dicom, peer in (("orthanc-a", 8042, 4242, 8043), ("orthanc-b", 8043, 4243, 8042)):
            orthancs.append(_orthanc(out, name, http, dicom, pg.dsn("orthanc"), dsn, peer).start(timeout=120))
        _say(t0, "two Orthancs on one PostgreSQL index, plugin in enqueue-only mode")

        def start_workers() -> None:
            for k in range(2):
                log = open(out / f"worker-{k}.log", "w")
                procs.append(subprocess.Popen(
                    [CLI, "worker", "--dsn", dsn, "--storage", str(out / "shared"), "--name", f"worker-{k}",
                     "--queues", "analyse-stat,analyse,deliver"], stdout=log, stderr=subprocess.STDOUT))

        store = PgJobStore(dsn)
        import pydicom

        uids = {pydicom.dcmread(next(f.glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID: f.name
                for f in series}
        sent: dict[str, str] = {}
        t_send = time.time()
        if args.kill_one:
            # Everything to A; A dies once its jobs are queued: the workers read and store through B.
            for folder in series:
                orthancs[0].storescu(folder)
                sent[folder.name] = orthancs[0].aet
            deadline = time.monotonic() + 60
            while not all(store.find(uid) for uid in uids):
                if time.monotonic() > deadline:
                    raise DemoError("Orthanc A did not queue the series")
                time.sleep(0.2)
            orthancs[0].kill()
            _say(t0, f"sent {len(series)} series to Orthanc A, queued; Orthanc A killed (SIGKILL)")
            start_workers()
        else:
            start_workers()
            for k, folder in enumerate(series[1:]):
                target = orthancs[k % 2]
                target.storescu(folder)
                sent[folder.name] = target.aet
            # One series split between both Orthancs: each fires STABLE_SERIES; the queueing lock makes one job.
            files = sorted(series[0].glob("*.dcm"))
            orthancs[0].storescu(files[: len(files) // 2])
            orthancs[1].storescu(files[len(files) // 2:])
            sent[series[0].name] = "split A/B"
            _say(t0, f"sent {len(series)} series ({len(series) - 1} to one Orthanc each, 1 split between both)")
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            for p in procs:
                if p.poll() is not None:
                    raise DemoError(f"a worker exited: see {out}/worker-*.log")
            jobs = [j for j in store.list() if j.series_instance_uid in uids]
            done = {j.series_instance_uid for j in jobs if j.state == "done"}
            failed = [j for j in jobs if j.state == "failed"]
            if failed:
                raise DemoError(f"job {failed[0].id} failed: {failed[0].reason}")
            if done == set(uids) and all(j.finished for j in jobs):
                break
            time.sleep(0.5)
        else:
            raise DemoError(f"not all series analysed within {args.timeout:.0f} s: see {out}")
        _say(t0, f"every series analysed and delivered ({time.time() - t_send:.1f} s after the first send)")
        print(f"\n{'series':<8} {'sent to':<10} {'jobs':>4} {'worker':<9} {'try':>3} {'latency s':>9} "
              f"{'SR+SEG via A':>12} {'via B':>6}")
        for uid, case in sorted(uids.items(), key=lambda kv: kv[1]):
            jobs = [j for j in store.list() if j.series_instance_uid == uid]
            job = [j for j in jobs if j.state == "done"][-1]
            study = job.study_instance_uid
            found = [sum(len(o.findscu_series(study, m)) for m in ("SR", "SEG"))
                     if o.proc is not None and o.proc.poll() is None else "-" for o in orthancs]
            print(f"{case:<8} {sent[case]:<10} {len(jobs):>4} {job.details.get('worker', '-'):<9} {job.attempts:>3} "
                  f"{job.finished_at - job.created_at:>9.1f} {found[0]:>12} {found[1]:>6}")
            if not all(found):
                raise DemoError(f"results of {case} not found through every running Orthanc: {found}")
            if len(jobs) != 1:
                raise DemoError(f"{case}: {len(jobs)} jobs for one series (coalescing failed)")
        print()
        _say(t0, "results found by C-FIND through every running Orthanc; stopping")
        return 0
    finally:
        stop_workers(procs)
        for o in orthancs:
            o.stop()
        pg.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pacs_landmarks.cluster_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=OUT, help="working folder, emptied first (default var/cluster-demo)")
    p.add_argument("--series", type=int, default=5, help="phantom series in the burst (one of them split)")
    p.add_argument("--size", type=int, default=128, help="phantom image size in pixels")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for every result")
    p.add_argument("--kill-one", action="store_true",
                   help="send everything to Orthanc A and kill it once the jobs are queued (B serves the workers)")
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.inside:  # run the whole demo in a private network namespace: only its own loopback
        if os.geteuid() != 0:
            print("cluster-demo: a private network namespace needs root (unshare -n)", file=sys.stderr)
            return 2
        cmd = ["unshare", "-n", "--", sys.executable, "-m", "pacs_landmarks.cluster_demo", "--inside",
               *(argv if argv is not None else sys.argv[1:])]
        return subprocess.call(cmd)
    try:
        return run(args)
    except DemoError as exc:
        print(f"cluster-demo: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
