"""Node benchmarks: ingest rate against Orthanc (same durability) and dcmtk storescp, latency, peak memory.

- ingest: one 300-slice 512 x 512 phantom series sent by dcmtk storescu (TCP_NODELAY=1) by 1, 4 and 8 concurrent
  senders (the series split between them, one association each), in the same run and with the same files
  (fresh UIDs per round, so nothing is a duplicate) to
    * dcmtk storescp (``+B``): writes without any fsync, the no-durability ceiling;
    * Orthanc 1.10 with its default durability (``SyncStorageArea`` true: each file flushed before its
      index entry and the C-STORE response), no plugin, in a private network namespace;
    * ``pacs-landmarks serve``: every instance durable before its Success (docs/node.md, "Durability").
  Target: node/Orthanc >= 1.0 for 1, 4 and 8 senders (aggregate instances per second). The "fsync floor" is
  the rate one sender could reach if the node's durable write of one instance (``receive.DurableWriter``:
  temp file, rename, fdatasync beside the folder fsync) were the only cost.
- latency: last instance acknowledged -> every result acknowledged by the destination (a storescp), with the
  per-step breakdown recorded by the job. Target: <= 5 s for 300 slices on the 2-core CPU.
- CPU: user + system CPU time of Orthanc's process and of the node's processes (main + receivers) per instance
  received, each round (every thread; /proc/PID/stat): steadier than the rates on a shared machine.
- memory: the node's peak RSS (VmHWM, main process + receivers summed) after receiving and analysing a
  --rss-slices (600) slice series. Target: <= 2 GB.

    .venv/bin/python bench/node.py [--slices 300] [--size 512] [--repeat 3] [--senders 1,4,8]
                                   [--rss-slices 600] [--work DIR] [--cache DIR] [--idle-timeout 2]
                                   [--receivers N]

The machine is shared: every round measures the three receivers back to back (the order rotates between
rounds), the summary gives the range over rounds, and ``uptime`` is printed before and after. Needs root (the
Orthanc namespace, as ``make demo``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pacs_landmarks.dicom.dcmtk import dcmtk_tool  # noqa: E402  (dcmtk's tools, never pynetdicom's namesakes)
from pacs_landmarks.plugin.launch import OrthancProcess  # noqa: E402

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


def send(port: int, aec: str, files: list, senders: int, prefix: list[str] = ()) -> float:
    """``senders`` storescu processes at once, each one association with its share of ``files``; wall time."""
    chunks = [files[i::senders] for i in range(senders)]
    t = time.perf_counter()
    procs = [subprocess.Popen([*prefix, dcmtk_tool("storescu"), "-aet", f"BENCH{i}", "-aec", aec, "127.0.0.1",
                               str(port), *map(str, chunk)], env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i, chunk in enumerate(chunks)]
    errors = []
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0 or "E:" in err:
            errors.append(err[-1500:])
    elapsed = time.perf_counter() - t
    if errors:
        raise SystemExit(f"storescu to {aec} failed: {errors[0]}")
    return elapsed


def start_storescp(directory: Path, port: int) -> subprocess.Popen:
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([dcmtk_tool("storescp"), "-aet", "ARCHIVE", "-od", str(directory), "+B", str(port)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(port)
    return proc


def start_orthanc(root: Path) -> OrthancProcess:
    """Plain Orthanc (no plugin), default settings but for the folders and ports; SyncStorageArea stays true."""
    config = {
        "Name": "bench", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
        "DicomAet": "ORTHANC", "DicomPort": 4242, "HttpPort": 8042, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "Plugins": [],
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "orthanc.json").write_text(json.dumps(config))
    orthanc = OrthancProcess(root / "orthanc.json", private_network=True, log_path=root / "orthanc.log")
    orthanc.start(timeout=90, wait_for_plugin=False)
    return orthanc


def fresh_copy(files: list[Path], out: Path, *, count: bool = False) -> tuple[list[Path], str]:
    """The same bytes with new Series/SOP Instance UIDs (and Images in Acquisition when ``count``)."""
    import pydicom
    from pydicom.uid import generate_uid

    out.mkdir(parents=True)
    series, sent = generate_uid(), []
    for f in files:
        ds = pydicom.dcmread(f)
        if count:
            ds.ImagesInAcquisition = len(files)
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(out / f.name, enforce_file_format=True)
        sent.append(out / f.name)
    return sent, series


def wait_job(store, series: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = [j for j in store.list() if j.series_instance_uid == series and j.finished]
        if jobs:
            if jobs[0].state != "done":
                raise SystemExit(f"job failed: {jobs[0].reason}")
            return jobs[0]
        time.sleep(0.02)
    raise SystemExit(f"no finished job for series {series} after {timeout} s")


def fsync_ms(work: Path, sample: Path, n: int = 30) -> float:
    from pacs_landmarks.node.receive import DurableWriter

    data, writer = sample.read_bytes(), DurableWriter()
    t = time.perf_counter()
    for i in range(n):
        writer.write(work / "fsync" / f"{i}.dcm", data)
    return (time.perf_counter() - t) / n * 1000


def tree(pid: int) -> list[int]:
    """A process and its children (the node's receiver processes), from /proc/PID/task/*/children."""
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return [pid] + [p for k in kids for p in tree(k)]


def peak_rss_mb(pid: int) -> float:
    """Sum of the peak RSS (VmHWM) of the process and its children: an upper bound of their peak together."""
    total = 0
    for p in tree(pid):
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1])
    return total / 1024


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its children so far (/proc/PID/stat: every thread)."""
    total = 0
    for p in tree(pid):
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def span(values: list[float], fmt: str = "{:.0f}") -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}-{fmt.format(hi)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--senders", default="1,4,8")
    ap.add_argument("--rss-slices", type=int, default=600, help="0: skip the memory run")
    ap.add_argument("--idle-timeout", type=float, default=2.0)
    ap.add_argument("--receivers", type=int, default=None, help="the node's receiver processes (default: its own)")
    ap.add_argument("--work", type=Path, default=None,
                    help="folder for every receiver's storage (default: the system temp folder; a tmpfs such as "
                         "/dev/shm makes fsync free and shows the receive path's CPU cost alone)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "pacs-landmarks-bench")
    args = ap.parse_args()
    senders = [int(n) for n in args.senders.split(",")]

    from pacs_landmarks.jobs.store import JobStore

    files = make_series(args.cache, args.slices, args.size)
    mb = sum(f.stat().st_size for f in files) / 1e6
    print(f"before: {uptime()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-node-", dir=args.work))
    arch_port, node_port = free_port(), free_port()
    archive = start_storescp(work / "archive", arch_port)
    node = subprocess.Popen(
        [CLI, "serve", "--storage", str(work / "node"), "--port", str(node_port), "--ae-title", "LANDMARKS",
         "--destination", f"ARCHIVE@127.0.0.1:{arch_port}", "--idle-timeout", str(args.idle_timeout),
         "--log-format", "json", *(["--receivers", str(args.receivers)] if args.receivers else [])], env=ENV, stdout=subprocess.DEVNULL, stderr=open(work / "node.log", "w"))
    orthanc = None
    try:
        orthanc = start_orthanc(work / "orthanc")
        wait_listening(node_port)
        print(f"node: {len(tree(node.pid)) - 1} receiver process(es)", flush=True)
        store = JobStore(work / "node" / "jobs.sqlite")
        rates: dict[int, list[tuple[float, float, float]]] = {n: [] for n in senders}
        cpu: dict[int, list[tuple[float, float]]] = {n: [] for n in senders}  # ms per instance: Orthanc, node
        latencies = []
        for run in range(args.repeat):
            for n in senders:
                by_count = run % 2 == 1  # odd rounds: Images in Acquisition set, so no idle wait
                sent, series = fresh_copy(files, work / f"run{run}-{n}", count=by_count)
                t_last, rate, used = 0.0, {}, {}
                order = ["storescp", "orthanc", "node"]
                for name in order[run % 3:] + order[:run % 3]:
                    if name == "storescp":
                        port = free_port()
                        scp = start_storescp(work / f"storescp-{run}-{n}", port)
                        rate[name] = len(sent) / send(port, "ANY", sent, n)
                        scp.terminate()
                        scp.wait()
                    elif name == "orthanc":
                        c = cpu_s(orthanc.proc.pid)
                        rate[name] = len(sent) / send(orthanc.dicom_port, orthanc.aet, sent, n, orthanc.client_prefix())
                        used[name] = (cpu_s(orthanc.proc.pid) - c) * 1000 / len(sent)
                    else:
                        c = cpu_s(node.pid)
                        rate[name] = len(sent) / send(node_port, "LANDMARKS", sent, n)
                        used[name] = (cpu_s(node.pid) - c) * 1000 / len(sent)
                        t_last = time.time()
                        job = wait_job(store, series)  # the analysis must not overlap the next measurement
                        if n == senders[0]:
                            how = "count" if by_count else f"idle {args.idle_timeout:g} s"
                            latencies.append((job.finished_at - t_last, job.timings, how))
                rates[n].append((rate["storescp"], rate["orthanc"], rate["node"]))
                cpu[n].append((used["orthanc"], used["node"]))
                print(f"round {run + 1}, {n} sender(s): storescp {rate['storescp']:.0f}, Orthanc {rate['orthanc']:.0f}, "
                      f"node {rate['node']:.0f} inst/s", file=sys.stderr, flush=True)
                shutil.rmtree(work / f"run{run}-{n}", ignore_errors=True)
        durable = fsync_ms(work, files[0])
        print(f"\nNode ingest: {args.slices} x {args.size}x{args.size} CT instances ({mb:.0f} MB), dcmtk storescu "
              f"(TCP_NODELAY=1), {args.repeat} rounds; instances/s (aggregate over the senders)\n")
        print("| senders | round | storescp (no fsync) | Orthanc 1.10 (SyncStorageArea) | node | node / Orthanc "
              "| CPU ms/instance Orthanc | CPU ms/instance node |")
        print("|---|---|---|---|---|---|---|---|")
        for n in senders:
            for r, ((scp, orth, nd), (c_orth, c_node)) in enumerate(zip(rates[n], cpu[n]), 1):
                print(f"| {n} | {r} | {scp:.0f} | {orth:.0f} | {nd:.0f} | {nd / orth:.2f} | {c_orth:.2f} | {c_node:.2f} |")
        print(f"\nfsync floor: durable write of one {mb / len(files):.2f} MB instance (temp file, rename, fdatasync "
              f"beside the folder fsync: node/receive.py) {durable:.2f} ms on this disk = {1000 / durable:.0f} inst/s for one sender\n")
        print("| senders | storescp | Orthanc | node | node / Orthanc (range) | median | target |")
        print("|---|---|---|---|---|---|---|")
        for n in senders:
            scp, orth, nd = zip(*rates[n])
            ratios = [a / b for a, b in zip(nd, orth)]
            print(f"| {n} | {span(scp)} | {span(orth)} | {span(nd)} | {span(ratios, '{:.2f}')} | "
                  f"{statistics.median(ratios):.2f} | >= 1.0 |")
        steps = ["completion_wait", "queue_wait", "read", "volume", "cascade", "outputs", "write_results", "delivery"]
        print(f"\nLatency ({senders[0]} sender(s)): last instance acknowledged -> all results acknowledged by the "
              "destination (s)\n")
        print("| run | completion | total | " + " | ".join(steps) + " |")
        print("|---|---|---|" + "---|" * len(steps))
        for i, (total, timings, how) in enumerate(latencies, 1):
            print(f"| {i} | {how} | {total:.2f} | " + " | ".join(f"{timings.get(s, 0.0):.2f}" for s in steps) + " |")
        print(f"\nbest total {min(t for t, _, _ in latencies):.2f} s (target <= 5 s)")
        if args.rss_slices:
            big = make_series(args.cache, args.rss_slices, args.size)
            sent, series = fresh_copy(big, work / "rss")
            send(node_port, "LANDMARKS", sent, 1)
            wait_job(store, series, timeout=600)
            print(f"\nnode peak RSS (VmHWM) after receiving and analysing {len(big)} x {args.size}x{args.size} "
                  f"(and everything before): {peak_rss_mb(node.pid):.0f} MB (target <= 2048 MB)")
        print(f"\nafter: {uptime()}")
    finally:
        if orthanc is not None:
            orthanc.stop()
        node.terminate()
        node.wait(30)
        archive.terminate()
        archive.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
