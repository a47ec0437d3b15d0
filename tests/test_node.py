"""The standalone node end to end: real `pacs-landmarks serve` processes, real dcmtk clients (echoscu,
storescu) and a real dcmtk storescp as the archive, all on 127.0.0.1 with free ports."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from pacs_landmarks.jobs.store import JobStore
from conftest import dcmtk, require_tool

ENV = {**os.environ, "TCP_NODELAY": "1"}
# The console script, as users run it.
CLI = str(Path(sys.executable).with_name("pacs-landmarks"))
NODE_AET = "LANDMARKS"
SENDER = "MODALITY"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class Archive:
    """dcmtk storescp: the PACS the node delivers to (stops/starts on the same port)."""

    def __init__(self, directory: Path, port: int | None = None):
        self.dir, self.port, self.proc = directory, port or free_port(), None
        self.dir.mkdir(parents=True, exist_ok=True)

    def start(self) -> "Archive":
        self.proc = subprocess.Popen(
            [dcmtk("storescp"), "-aet", "ARCHIVE", "-od", str(self.dir), "+B", str(self.port)],
            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: listening(self.port), 10, "storescp to listen")
        return self

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def files(self) -> list[Path]:
        return sorted(p for p in self.dir.iterdir() if p.is_file())

    @property
    def destination(self) -> str:
        return f"ARCHIVE@127.0.0.1:{self.port}"


class NodeProc:
    """`pacs-landmarks serve` as a child process that tests can kill -9 and restart."""

    def __init__(self, storage: Path, *args: str, port: int | None = None):
        self.storage, self.args, self.port = storage, list(args), port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log = storage.parent / f"{storage.name}.log"

    def start(self, timeout: float = 120) -> "NodeProc":
        self.storage.mkdir(parents=True, exist_ok=True)
        cmd = [CLI, "serve", "--storage", str(self.storage),
               "--port", str(self.port), "--ae-title", NODE_AET, "--log-format", "json", *self.args]
        self._fh = open(self.log, "a")
        self.proc = subprocess.Popen(cmd, env=ENV, stdout=self._fh, stderr=self._fh)
        wait_for(lambda: self.proc.poll() is not None or listening(self.port), timeout, "the node to listen")
        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        return self

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)
        self.proc = None

    def events(self) -> list[dict]:
        out = []
        for line in self.log.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return out

    @property
    def store(self) -> JobStore:
        return JobStore(self.storage / "jobs.sqlite")

    def jobs(self):
        return self.store.list() if (self.storage / "jobs.sqlite").exists() else []


def storescu(port: int, files, *, aet: str = SENDER, extra=(), check=True) -> subprocess.CompletedProcess:
    cmd = [dcmtk("storescu"), "-aet", aet, "-aec", NODE_AET, *extra, "127.0.0.1", str(port),
           *[str(f) for f in files]]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    if check:  # storescu can exit 0 after a failed C-STORE: its "E:" lines are the truth
        assert proc.returncode == 0 and "E:" not in proc.stderr, proc.stdout + proc.stderr
    return proc


def clone_series(src: Path, dst: Path, **changes) -> list[Path]:
    """A copy of a series with new Series/SOP Instance UIDs (a different series, no re-render)."""
    dst.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    out = []
    for f in sorted(src.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        for k, v in changes.items():
            setattr(ds, k, v)
        ds.save_as(dst / f.name, enforce_file_format=True)
        out.append(dst / f.name)
    return out


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    from pacs_landmarks.inference.phantom import make_case, write_case

    out = tmp_path_factory.mktemp("phantom") / "case"
    return write_case(make_case(7), out, size=128, slice_thickness=2.5)


def series_uid_of(directory: Path) -> str:
    return str(pydicom.dcmread(next(directory.glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID)


RESULT_KINDS = ("landmark_sr", "measurements_sr", "seg", "gsps")


def results_at(archive: Archive, job) -> dict[str, Path]:
    """The job's result objects as received by the archive: kind (landmark_sr, measurements_sr, seg, gsps) ->
    file."""
    wanted = {str(pydicom.dcmread(job.results[k], stop_before_pixels=True).SOPInstanceUID): k
              for k in RESULT_KINDS}
    found = {}
    for f in archive.files():
        uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        if uid in wanted:
            found[wanted[uid]] = f
    return found


# -- one node for the transport and security tests ----------------------------------------------------------

@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    a = Archive(tmp_path_factory.mktemp("archive")).start()
    yield a
    a.stop()


def serving(tmp_path_factory, *args: str):
    """A module's ``node`` fixture: `serve` with ``args`` on a new storage, stopped with SIGTERM at the end
    (``yield from serving(...)``)."""
    n = NodeProc(tmp_path_factory.mktemp("node") / "storage", *args).start()
    yield n
    n.kill(signal.SIGTERM)


@pytest.fixture(scope="module")
def node(tmp_path_factory, archive):
    yield from serving(tmp_path_factory, "--allow-ae", SENDER, "--allow-ae", "SENDER2", "--allow-ae", "SENDER3",
                       "--allow-ae", "SENDER4", "--allow-ae", "FARAWAY@10.9.9.9", "--destination", archive.destination,
                       "--idle-timeout", "0.5", "--receivers", "2")


def test_echo(node):
    proc = subprocess.run([dcmtk("echoscu"), "-aet", SENDER, "-aec", NODE_AET, "127.0.0.1", str(node.port)],
                          env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_series_in_results_out(node, archive, phantom, validate_dicom):
    files = sorted(phantom.glob("*.dcm"))
    uid = series_uid_of(phantom)
    storescu(node.port, files)
    job = wait_for(lambda: next((j for j in node.jobs() if j.series_instance_uid == uid and j.finished), None),
                   180, "the job to finish")
    assert job.state == "done", job.reason
    assert job.instances == len(files) and set(job.delivery.values()) == {"success"}
    got = results_at(archive, job)
    assert set(got) == set(RESULT_KINDS), got
    for f in got.values():
        validate_dicom(f)
    # Every received instance is on disk, byte for byte as sent after the file meta.
    stored = sorted((node.storage / "series" / uid).glob("*.dcm"))
    assert len(stored) == len(files)
    # The SR's points are the ones the job recorded (and it references the source series).
    from pacs_landmarks.sr_templates import read_landmark_sr

    points = {lm.name: np.array(lm.position_lps_mm) for lm in read_landmark_sr(pydicom.dcmread(got["landmark_sr"]))}
    assert points
    recorded = json.loads(Path(job.results["landmarks_json"]).read_text())
    for lm in recorded["landmarks"]:
        if lm["name"] in points:
            assert np.allclose(points[lm["name"]], lm["position_lps_mm"], atol=0.01)
    # No patient name or ID in the node's log (UIDs only).
    src = pydicom.dcmread(files[0], stop_before_pixels=True)
    log = node.log.read_text()
    for value in (str(src.get("PatientName", "")), str(src.get("PatientID", ""))):
        assert not value or value not in log, value
    events = {e.get("event") for e in node.events()}
    assert {"worker.warm_up", "association.accepted", "series.complete", "job.queued", "job.delivering",
            "delivery", "job.done"} <= events


def test_sr_points_within_3mm_of_phantom_truth(node, archive, tmp_path):
    """Runs with the trained model (the shipped demo model before training is random). A finer phantom than the
    transport tests use (256 x 256, the case's own slice thickness), as a scanner would send."""
    from pacs_landmarks.inference.model import LandmarkModel
    from pacs_landmarks.inference.phantom import make_case, write_case
    from pacs_landmarks.sr_templates import read_landmark_sr

    if not LandmarkModel.load().trained:
        pytest.skip("the shipped model is the untrained placeholder; the lead runs this with the trained one")
    case_dir = write_case(make_case(11), tmp_path / "case", size=256)
    uid = series_uid_of(case_dir)
    storescu(node.port, sorted(case_dir.glob("*.dcm")))
    job = wait_for(lambda: next((j for j in node.jobs() if j.series_instance_uid == uid and j.finished), None),
                   180, "the job")
    assert job.state == "done", job.reason
    truth = {lm["name"]: np.array(lm["position_lps_mm"])
             for lm in json.loads((case_dir / "landmarks.json").read_text())["landmarks"]}
    points = read_landmark_sr(pydicom.dcmread(results_at(archive, job)["landmark_sr"]))
    errors = {lm.name: round(float(np.linalg.norm(np.array(lm.position_lps_mm) - truth[lm.name])), 2)
              for lm in points}
    assert len(errors) == 16 and max(errors.values()) <= 3.0, errors


def test_unknown_calling_ae_is_rejected(node, phantom):
    proc = subprocess.run([dcmtk("echoscu"), "-aet", "STRANGER", "-aec", NODE_AET, "127.0.0.1",
                           str(node.port)], env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "Calling AE Title Not Recognized" in proc.stdout + proc.stderr or "Rejected" in proc.stdout + proc.stderr
    assert any(e.get("event") == "association.rejected" and e.get("calling_ae") == "STRANGER" for e in node.events())
    # An allowed AE title from an address it is not allowed from.
    proc = subprocess.run([dcmtk("echoscu"), "-aet", "FARAWAY", "-aec", NODE_AET, "127.0.0.1",
                           str(node.port)], env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "Rejected" in proc.stderr


def test_bad_instances_get_failure_status_and_node_keeps_serving(node, phantom, tmp_path, monkeypatch):
    from pynetdicom import AE, _config

    good = clone_series(phantom, tmp_path / "fresh")[0]  # UIDs this node has not stored yet
    raw = good.read_bytes()
    ds = pydicom.dcmread(good)
    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")  # (0002,0000) group length
    # Garbage after a valid file meta, and a data set cut off inside Pixel Data: sent as-is by pynetdicom.
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(raw[:meta_end] + os.urandom(4096))
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(raw[: len(raw) - 3000])
    # Chunked sending reads only the file meta and streams the rest unparsed: the node gets the bad bytes.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title=SENDER)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
    assert assoc.is_established
    statuses = [assoc.send_c_store(p) for p in (garbage, truncated)]
    assoc.release()
    for st in statuses:
        assert "Status" in st and st.Status >= 0xA000, st
    assert not list(node.storage.rglob(f"{ds.SOPInstanceUID}.dcm"))  # the truncated one was not stored
    assert len([e for e in node.events() if e.get("event") == "instance.refused"]) >= 2
    test_echo(node)  # still serving


def test_dotdot_uid_is_refused_and_nothing_written_outside(node, phantom, tmp_path):
    ds = pydicom.dcmread(sorted(phantom.glob("*.dcm"))[0])
    ds.SeriesInstanceUID = "1.2.3.." + "/../../../escape"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    bad = tmp_path / "bad.dcm"
    ds.save_as(bad, enforce_file_format=True)
    proc = storescu(node.port, [bad], check=False)
    assert "Success" not in proc.stdout + proc.stderr or proc.returncode != 0
    assert not list(node.storage.parent.rglob("escape*")) and not list(tmp_path.parent.rglob("escape*"))
    assert any(e.get("event") == "instance.refused" for e in node.events())
    test_echo(node)


def test_mr_series_and_ct_secondary_capture_start_no_job(node, phantom, tmp_path):
    mr = clone_series(phantom, tmp_path / "mr", SOPClassUID="1.2.840.10008.5.1.4.1.1.4", Modality="MR")[:3]
    sc = clone_series(phantom, tmp_path / "sc", SOPClassUID="1.2.840.10008.5.1.4.1.1.7", Modality="CT")[:3]
    for files in (mr, sc):
        for f in files:  # keep the file meta consistent with the new SOP class
            ds = pydicom.dcmread(f)
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            ds.save_as(f, enforce_file_format=True)
    before = len(node.jobs())
    storescu(node.port, mr + sc, extra=("-R",))
    time.sleep(2.0)  # longer than the idle timeout: a job would exist by now
    assert len(node.jobs()) == before
    for files in (mr, sc):
        uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
        assert len(list((node.storage / "other" / uid).glob("*.dcm"))) == 3  # stored, not analysed
    ignored = [e for e in node.events() if e.get("event") == "series.ignored"]
    assert len(ignored) >= 2


def test_series_complete_at_once_when_expected_count_reached(node, phantom, tmp_path):
    files = clone_series(phantom, tmp_path / "n", ImagesInAcquisition=len(list(phantom.glob("*.dcm"))))
    uid = series_uid_of(tmp_path / "n")
    storescu(node.port, files)
    job = wait_for(lambda: next((j for j in node.jobs() if j.series_instance_uid == uid and j.finished), None),
                   180, "the job")
    assert job.state == "done", job.reason
    assert job.timings["completion_wait"] < 0.25  # the idle timeout (0.5 s) was not waited for
    assert any(e.get("event") == "series.complete" and e.get("series") == uid and e.get("why") ==
               "expected count reached" for e in node.events())


def test_aborted_association_completes_with_what_arrived(node, phantom, tmp_path):
    from pynetdicom import AE

    files = clone_series(phantom, tmp_path / "ab")
    uid = series_uid_of(tmp_path / "ab")
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    ae = AE(ae_title=SENDER)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
    half = files[: len(files) // 2]
    for f in half:
        assert assoc.send_c_store(f).Status == 0x0000
    assoc.abort()
    job = wait_for(lambda: next((j for j in node.jobs() if j.series_instance_uid == uid and j.state != "received"),
                                None), 60, "the aborted series to complete")
    assert job.instances == len(half) and job.details.get("aborted") is True
    assert any(e.get("event") == "association.aborted" for e in node.events())


def test_four_senders_at_once(node, archive, phantom, tmp_path):
    series = [clone_series(phantom, tmp_path / f"s{n}") for n in range(4)]
    uids = [series_uid_of(tmp_path / f"s{n}") for n in range(4)]
    aets = [SENDER, "SENDER2", "SENDER3", "SENDER4"]
    procs = [subprocess.Popen([dcmtk("storescu"), "-aet", aet, "-aec", NODE_AET, "127.0.0.1",
                               str(node.port), *map(str, files)], env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for aet, files in zip(aets, series)]
    for p in procs:
        assert p.wait(120) == 0, p.stdout.read()
    jobs = wait_for(lambda: (lambda js: js if len(js) == 4 and all(j.finished for j in js) else None)(
        [j for j in node.jobs() if j.series_instance_uid in uids]), 400, "4 jobs to finish", every=0.5)
    assert {j.state for j in jobs} == {"done"}, [j.reason for j in jobs]
    assert all(j.instances == len(series[0]) for j in jobs)
    for job in jobs:
        assert len(results_at(archive, job)) == len(RESULT_KINDS)


def running(pid: int) -> bool:
    try:
        return "\tZ" not in Path(f"/proc/{pid}/status").read_text()  # a zombie has exited
    except FileNotFoundError:
        return False


def receiver_pids(node) -> dict[int, int]:
    """Receiver number -> pid of its newest process, from the node's log."""
    return {e["receiver"]: e["pid"] for e in node.events() if e.get("event") == "receiver.started"}


def started_receivers(node, count: int = 2) -> dict[int, int]:
    """``receiver_pids`` once all ``count`` receivers have logged their start: the node listens (its socket is
    bound first, connections wait in the backlog) a moment before the receivers' start reaches its log."""
    def all_started():
        pids = receiver_pids(node)
        return pids if len(pids) >= count else None

    return wait_for(all_started, 30, "the receivers to start")


def test_concurrent_senders_are_spread_over_the_receiver_processes(node, phantom, tmp_path):
    """The node's associations run in receiver processes (node/receivers.py): two senders at once get two."""
    pids = started_receivers(node)
    assert len(pids) == 2 and all(map(running, pids.values())), pids
    before = len([e for e in node.events() if e.get("event") == "association.accepted"])
    series = [clone_series(phantom, tmp_path / f"r{n}") for n in range(2)]
    procs = [subprocess.Popen([dcmtk("storescu"), "-aet", SENDER, "-aec", NODE_AET, "127.0.0.1", str(node.port),
                               *map(str, files)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for files in series]
    for p in procs:
        assert p.wait(120) == 0, p.stdout.read()
    accepted = [e for e in node.events() if e.get("event") == "association.accepted"][before:]
    assert len(accepted) == 2 and {e["receiver"] for e in accepted} == {0, 1}, accepted
    for files in series:
        uid = series_uid_of(files[0].parent)
        job = wait_for(lambda: next((j for j in node.jobs() if j.series_instance_uid == uid and j.state != "received"),
                                    None), 60, "the series to complete")
        assert job.instances == len(files)


def test_max_associations_counts_every_receiver(tmp_path, phantom):
    """max_associations is the node's, not each receiver process': one more is rejected (transient)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    cfg = tmp_path / "node.toml"
    cfg.write_text("max_associations = 2\nreceivers = 2\n")
    n = NodeProc(tmp_path / "storage", "--config", str(cfg)).start()
    try:
        ae = AE(ae_title=SENDER)
        ae.add_requested_context(Verification)
        for _ in range(5):  # TCP probes that never send a request (a load balancer's) take no slot
            socket.create_connection(("127.0.0.1", n.port)).close()
        held = [ae.associate("127.0.0.1", n.port, ae_title=NODE_AET) for _ in range(2)]
        assert all(a.is_established for a in held)
        extra = ae.associate("127.0.0.1", n.port, ae_title=NODE_AET)
        assert extra.is_rejected
        assert any(e.get("event") == "association.rejected" and "max_associations" in e.get("reason", "")
                   for e in n.events())
        for a in held:
            a.release()
        # Closed ones no longer count.
        again = wait_for(lambda: (lambda a: a if a.is_established else a.release())(
            ae.associate("127.0.0.1", n.port, ae_title=NODE_AET)), 10, "a free association slot", every=0.2)
        assert again.send_c_echo().Status == 0x0000
        again.release()
    finally:
        n.kill(signal.SIGTERM)


def test_a_killed_receiver_is_replaced_and_nothing_acknowledged_is_lost(phantom, tmp_path):
    """kill -9 of a receiver process mid-series: its sender sees the association fail, the node starts a new
    receiver, every instance acknowledged before is kept, and the resent series completes whole."""
    from pynetdicom import AE

    files = clone_series(phantom, tmp_path / "k")
    uid = series_uid_of(tmp_path / "k")
    n = NodeProc(tmp_path / "storage", "--receivers", "2", "--idle-timeout", "0.5").start()
    try:
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        ae = AE(ae_title=SENDER)
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", n.port, ae_title=NODE_AET)
        acknowledged = [f for f in files[:5] if assoc.send_c_store(f).Status == 0x0000]
        assert len(acknowledged) == 5
        receiver = [e for e in n.events() if e.get("event") == "association.accepted"][-1]["receiver"]
        old = receiver_pids(n)[receiver]
        os.kill(old, signal.SIGKILL)
        status = assoc.send_c_store(files[5]) if assoc.is_established else None
        assert status is None or "Status" not in status  # no Success from a dead receiver
        assoc.abort()
        wait_for(lambda: receiver_pids(n)[receiver] != old, 30, "a new receiver process")
        assert any(e.get("event") == "receiver.died" and e.get("pid") == old for e in n.events())
        for f in acknowledged:
            assert (n.storage / "series" / uid / f"{pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID}.dcm"
                    ).is_file()
        job = wait_for(lambda: next((j for j in n.jobs() if j.series_instance_uid == uid and j.state != "received"),
                                    None), 30, "the cut series to complete")
        assert job.details.get("aborted") is True and job.instances >= len(acknowledged)
        storescu(n.port, files)  # the sender sends it again: a new job with the whole series
        assert len(list((n.storage / "series" / uid).glob("*.dcm"))) == len(files)
        test_echo(n)
    finally:
        n.kill(signal.SIGTERM)


def test_receivers_leave_with_the_node(phantom, tmp_path):
    """SIGTERM and kill -9 of the node: its receiver processes exit (the hand-over socket closed)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        n = NodeProc(tmp_path / f"storage{sig}").start()
        pids = list(started_receivers(n).values())
        assert pids
        n.kill(sig)
        wait_for(lambda: not any(map(running, pids)), 20, "the receivers to exit")


# -- crash, restart, destination down -----------------------------------------------------------------------

def test_kill_during_receive_and_during_inference_then_resume(phantom, tmp_path):
    archive = Archive(tmp_path / "archive").start()
    files = sorted(phantom.glob("*.dcm"))
    uid = series_uid_of(phantom)
    n = NodeProc(tmp_path / "storage", "--destination", archive.destination, "--idle-timeout", "1.0")
    try:
        n.start()
        storescu(n.port, files[: len(files) // 2])
        n.kill()  # before the idle timeout: the job is still "received"
        assert [j.state for j in n.jobs()] == ["received"]
        n.start()
        storescu(n.port, files[len(files) // 2:])
        wait_for(lambda: any(j.state == "running" for j in n.jobs()), 60, "the job to run", every=0.02)
        n.kill()  # during inference
        assert [j.state for j in n.jobs()] == ["running"]
        n.start()
        job = wait_for(lambda: next((j for j in n.jobs() if j.finished), None), 180, "the resumed job")
        assert job.state == "done", job.reason
        assert job.attempts == 2 and len(n.jobs()) == 1
        assert len(list((n.storage / "series" / uid).glob("*.dcm"))) == len(files)
        assert len(results_at(archive, job)) == len(RESULT_KINDS)
        assert any(r == "resumed after restart" for _, _, r in n.store.events(job.id))
    finally:
        n.kill()
        archive.stop()


def test_destination_down_then_back(phantom, tmp_path):
    archive = Archive(tmp_path / "archive")  # not started: the destination is down
    files = sorted(phantom.glob("*.dcm"))
    uid = series_uid_of(phantom)
    n = NodeProc(tmp_path / "storage", "--destination", archive.destination, "--idle-timeout", "0.5")
    try:
        n.start()
        storescu(n.port, files)
        job = wait_for(lambda: next((j for j in n.jobs() if j.state == "delivering" and j.delivery_attempts >= 2),
                                    None), 180, "failed delivery attempts")
        assert "unreachable" in job.reason and all(Path(p).exists() for p in job.results.values())
        archive.start()
        job = wait_for(lambda: next((j for j in n.jobs() if j.finished), None), 120, "delivery after recovery")
        assert job.state == "done", job.reason
        assert len(results_at(archive, job)) == len(RESULT_KINDS)
    finally:
        n.kill()
        archive.stop()


def _archived(archive: Archive) -> dict[str, pydicom.Dataset]:
    """SOP Instance UID -> header of every object the archive holds."""
    return {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in archive.files())}


def _predecessor(ds) -> str | None:
    if "PredecessorDocumentsSequence" not in ds:
        return None
    return str(ds.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
               .ReferencedSOPInstanceUID)


def test_a_series_that_grows_gets_new_results_the_archive_decides(phantom, tmp_path):
    """The node and a dcmtk storescp archive: the upper 60 % of a series, then the same part again (a new job,
    the same result UIDs: no new object in the archive), then the rest in two parts: each arrival after
    completion starts a new job whose results have new UIDs and name the ones they replace."""
    archive = Archive(tmp_path / "archive").start()
    files = sorted(phantom.glob("*.dcm"),
                   key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))[::-1]
    cut = int(len(files) * 0.6)
    upper, rest = files[:cut], files[cut:]
    sends = [upper, upper, rest[: len(rest) // 2], rest[len(rest) // 2:]]
    n = NodeProc(tmp_path / "storage", "--destination", archive.destination, "--idle-timeout", "0.5")
    try:
        n.start()
        jobs = []
        for k, part in enumerate(sends, start=1):
            storescu(n.port, part)
            job = wait_for(lambda: (lambda js: js[0] if len(js) == k and js[0].finished else None)(n.jobs()),
                           180, f"job {k} to finish")
            assert job.state == "done", job.reason
            assert job.details["instances_read"] == len(set(map(str, [f for p in sends[:k] for f in p])))
            jobs.append(job)
        uids = [{kind: u["SOPInstanceUID"] for kind, u in j.details["result_uids"].items()} for j in jobs]
        assert set(uids[0]) == {"landmark-sr", "measurements-sr", "seg", "gsps"}
        assert uids[1] == uids[0], "the same instances again: the same results"
        assert not set(uids[2].values()) & set(uids[1].values()) and not set(uids[3].values()) & set(uids[2].values())
        archived = _archived(archive)
        # The archive got no new object for the resend, and one set per distinct input.
        assert set(archived) == {u for result in uids for u in result.values()}
        for before, after in ((uids[0], uids[2]), (uids[2], uids[3])):
            for kind in ("landmark-sr", "measurements-sr"):
                assert _predecessor(archived[after[kind]]) == before[kind]
        assert _predecessor(archived[uids[0]["landmark-sr"]]) is None
    finally:
        n.kill()
        archive.stop()


def test_bad_model_path_fails_at_start(tmp_path):
    proc = subprocess.run([CLI, "serve", "--storage", str(tmp_path / "s"),
                           "--port", str(free_port()), "--model", str(tmp_path / "missing.pt")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cannot load model" in proc.stderr


def test_print_config_and_jobs_command(tmp_path):
    cfg = tmp_path / "node.toml"
    shutil.copy(Path(__file__).resolve().parents[1] / "node.toml", cfg)
    out = subprocess.run([CLI, "serve", "--config", str(cfg), "--port", "4242",
                          "--destination", "PACS@127.0.0.1:104", "--print-config"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "port = 4242" in out.stdout and 'ae_title = "PACS"' in out.stdout
    store = JobStore(tmp_path / "st" / "jobs.sqlite")
    job, _ = store.ensure_job("1.2.3", "1.2", "/x", state="queued")
    store.claim()
    store.transition(job.id, "failed", reason="test failure")
    cli = [CLI, "jobs", "--storage", str(tmp_path / "st")]
    listed = json.loads(subprocess.run(cli + ["--json"], capture_output=True, text=True).stdout)
    assert listed[0]["state"] == "failed" and listed[0]["reason"] == "test failure"
    assert "test failure" in subprocess.run(cli, capture_output=True, text=True).stdout
    assert subprocess.run(cli + ["retry", str(job.id)], capture_output=True, text=True).returncode == 0
    assert store.get(job.id).state == "queued"
    bad = subprocess.run(cli + ["retry", "999"], capture_output=True, text=True)
    assert bad.returncode == 2 and "no job 999" in bad.stderr


# -- transfer syntaxes and TLS ------------------------------------------------------------------------------

def _encode(src: Path, dst: Path, syntax: str) -> Path:
    """One instance in a given transfer syntax, encoded by dcmtk (or pydicom for JPEG 2000)."""
    tools = {
        "deflate": ["dcmconv", "+td"],
        "rle": ["dcmcrle"],
        "jpeg-lossless": ["dcmcjpeg", "+e1"],
        "jpeg-ls": ["dcmcjpls", "+el"],
    }
    if syntax == "jpeg2000":
        from pydicom.uid import JPEG2000Lossless

        ds = pydicom.dcmread(src)
        ds.compress(JPEG2000Lossless)
        ds.save_as(dst, enforce_file_format=True)
    else:
        subprocess.run([dcmtk(tools[syntax][0]), *tools[syntax][1:], str(src), str(dst)], check=True,
                       capture_output=True)
    return dst


def test_compressed_transfer_syntaxes_are_stored_as_sent(node, phantom, tmp_path):
    files = clone_series(phantom, tmp_path / "ts")[:5]
    sent = [_encode(f, tmp_path / f"{name}.dcm", name)
            for f, name in zip(files, ("deflate", "rle", "jpeg-lossless", "jpeg-ls", "jpeg2000"))]
    # storescu proposes exactly that compressed syntax (-x?), so the node must accept it as is.
    for f, option in zip(sent, ("-xd", "-xr", "-xs", "-xt", "-xv")):
        proc = storescu(node.port, [f], extra=("-R", option))
        assert "E:" not in proc.stderr, proc.stderr
    uid = series_uid_of(tmp_path / "ts")
    for f in sent:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        stored = node.storage / "series" / uid / f"{ds.SOPInstanceUID}.dcm"
        assert stored.exists(), f.name
        assert pydicom.dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID == \
            ds.file_meta.TransferSyntaxUID, f.name


def _openssl(*args: str) -> None:
    subprocess.run([require_tool("openssl"), *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """A self-signed CA, a server certificate for 127.0.0.1 and a client certificate, made by openssl."""
    d = tmp_path_factory.mktemp("tls")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
             "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"))
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", str(d / f"{name}.key"),
                 "-out", str(d / f"{name}.csr"))
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.crt"), "-CAkey", str(d / "ca.key"),
                 "-CAcreateserial", "-days", "2", "-extfile", str(d / "san.ext"), "-out", str(d / f"{name}.crt"))
    return d


def test_dicom_tls_with_client_certificates(certs, tmp_path):
    n = NodeProc(tmp_path / "storage", "--tls-cert", str(certs / "server.crt"), "--tls-key",
                 str(certs / "server.key"), "--tls-ca", str(certs / "ca.crt"), "--allow-ae", SENDER)
    echo = [dcmtk("echoscu"), "-aet", SENDER, "-aec", NODE_AET]
    tls = ["+tls", str(certs / "client.key"), str(certs / "client.crt"), "+cf", str(certs / "ca.crt")]
    try:
        n.start()
        ok = subprocess.run(echo + tls + ["127.0.0.1", str(n.port)], env=ENV, capture_output=True, text=True,
                            timeout=60)
        assert ok.returncode == 0, ok.stderr
        plain = subprocess.run(echo + ["127.0.0.1", str(n.port)], env=ENV, capture_output=True, text=True, timeout=60)
        assert plain.returncode != 0  # no TLS: refused
        anonymous = subprocess.run(echo + ["+tla", "+cf", str(certs / "ca.crt"), "127.0.0.1", str(n.port)], env=ENV,
                                   capture_output=True, text=True, timeout=60)
        assert anonymous.returncode != 0  # TLS without a client certificate signed by the CA: refused
        assert any(e.get("event") == "association.accepted" and e.get("tls") for e in n.events())
    finally:
        n.kill()


def test_delivery_over_tls_to_a_tls_archive(certs, phantom, tmp_path):
    """Destination with tls = true (node.toml): the node verifies the archive's certificate against tls_ca and
    presents its own client certificate, which the archive (dcmtk storescp +tls) requires."""
    port = free_port()
    archive_dir = tmp_path / "archive"
    archive_dir.mkdir()
    scp = subprocess.Popen([dcmtk("storescp"), "-aet", "ARCHIVE", "-od", str(archive_dir), "+B",
                            "+tls", str(certs / "server.key"), str(certs / "server.crt"), "+cf", str(certs / "ca.crt"),
                            str(port)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        "idle_timeout = 0.5\n[[destinations]]\nae_title = 'ARCHIVE'\nhost = '127.0.0.1'\n"
        f"port = {port}\ntls = true\ntls_ca = '{certs / 'ca.crt'}'\ntls_cert = '{certs / 'client.crt'}'\n"
        f"tls_key = '{certs / 'client.key'}'\n"
    )
    files = clone_series(phantom, tmp_path / "s")
    n = NodeProc(tmp_path / "storage", "--config", str(cfg))
    try:
        wait_for(lambda: listening(port), 10, "storescp to listen")
        n.start()
        storescu(n.port, files)
        job = wait_for(lambda: next((j for j in n.jobs() if j.finished), None), 180, "delivery over TLS")
        assert job.state == "done", job.reason
        assert len(list(archive_dir.iterdir())) == len(RESULT_KINDS)
    finally:
        n.kill()
        scp.terminate()
        scp.wait(10)
