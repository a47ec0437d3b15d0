"""`make demo` end to end (Orthanc, storescu, findscu, dsr2html) on a small phantom, and `make serve`."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture
def phantom_module():
    return pytest.importorskip("pacs_landmarks.inference.phantom")  # lands during the session


def test_demo_runs_end_to_end_and_stops_orthanc(tmp_path, phantom_module):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "pacs_landmarks.demo", "--out", str(out), "--size", "128", "--timeout", "120"],
        capture_output=True, text=True, timeout=400,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert "[13/13" in text and "demo: Orthanc stopped" in text
    # The cephalogram step ran: a tracing, or (the shipped model untrained) that nothing was found, said so.
    assert "synthetic lateral cephalogram" in text and "the plugin starts an image job at once" in text
    assert "the tracing, read back from the SR" in text or "no tracing: no landmark found" in text
    # the demo's 128² series (2 mm pixels) is coarser than the model's training data: most, not all, found
    read_back = re.search(r"landmark SR read back from Orthanc \((\d+) of 16 landmarks found\)", text)
    assert read_back and int(read_back.group(1)) >= 12, text[-4000:]
    assert text.count(" mm\n") >= int(read_back.group(1)) and "mean error" in text
    assert "SEG series" in text and "SR  series" in text
    html = (out / "results" / "landmarks-sr.html").read_text()
    assert "Imaging Measurement Report" in html or "Nasion" in html
    # Orthanc is gone: its log ends with the stop, and nothing of ours still runs from this folder.
    assert "Orthanc has stopped" in (out / "orthanc.log").read_text()


def test_demo_ceph_step_finds_the_sr_and_prints_the_tracing(tmp_path):
    """`make demo-ceph` with a ceph19 model that reports what it sees: the SR is found by findscu and read
    back, the tracing table is printed against the phantom's truth."""
    sys.path.insert(0, str(Path(__file__).parent))
    from ceph_helpers import report_all_model

    model = report_all_model(tmp_path / "model.pt")
    proc = subprocess.run(
        [sys.executable, "-m", "pacs_landmarks.demo", "--ceph-only", "--ceph-model", str(model), "--out",
         str(tmp_path / "demo"), "--timeout", "120"], capture_output=True, text=True, timeout=400,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert "[6/6" in text and "demo: Orthanc stopped" in text
    assert "SR  series 7701  AI Landmarks" in text and "PR  series 7704" in text  # found by findscu
    assert "Estimated Radiographic Magnification Factor" in text and "mean error" in text
    assert "these points are meaningless" in text  # an untrained model is said to be one
    assert sorted(p.name for p in (tmp_path / "demo" / "ceph-results").iterdir()) == [
        "gsps.dcm", "landmarks-sr.dcm", "measurements-sr.dcm"]


def test_demo_failure_is_clear_and_still_stops_orthanc(tmp_path, phantom_module):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "pacs_landmarks.demo", "--out", str(out), "--size", "64", "--timeout", "0"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1
    assert "demo: error: no results within 0 s" in proc.stderr
    assert "demo: Orthanc stopped" in proc.stdout
    assert "Orthanc has stopped" in (out / "orthanc.log").read_text()


def test_serve_runs_orthanc_with_the_plugin_in_the_foreground(tmp_path):
    """`make serve` (here inside a private network namespace, so nothing listens outside it)."""
    import json
    import signal
    import time

    script = 'ip link set lo up && exec "$@"'
    proc = subprocess.Popen(
        ["unshare", "-n", "--", "sh", "-c", script, "sh", sys.executable, "-m", "pacs_landmarks.plugin.serve",
         "--storage", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline, health = time.monotonic() + 60, None
        while time.monotonic() < deadline and health is None:
            probe = subprocess.run(
                ["nsenter", f"--net=/proc/{proc.pid}/ns/net", "--", "curl", "-sf",
                 "http://127.0.0.1:8042/pacs-landmarks/health"], capture_output=True, text=True,
            )
            if probe.returncode == 0:
                health = json.loads(probe.stdout)
            time.sleep(0.3)
        assert health is not None, "serve did not answer /pacs-landmarks/health"
        assert "model" in health and "queue_depth" in health
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: Orthanc (which replaced python) stops cleanly
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-2000:]
    assert "Orthanc has stopped" in out
    assert "OHIF viewer: run `make viewer`" in out and "http://localhost:3000/" in out
    assert (tmp_path / "orthanc").is_dir() and (tmp_path / "pacs-landmarks" / "jobs.sqlite").exists()
