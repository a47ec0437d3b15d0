"""`make cluster-demo` with two series: two Orthancs on one PostgreSQL index (Debian orthanc-postgresql),
two workers with the real model; a series split between both Orthancs is analysed once, and every result is
found by C-FIND through either Orthanc (the demo raises otherwise)."""
from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_cluster_demo_two_orthancs_one_database(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pacs_landmarks.cluster_demo", "--series", "2", "--out",
                           str(tmp_path / "demo")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("case")]
    assert len(rows) == 2
    split = [r for r in rows if r[1] == "split"]
    assert split and split[0][3] == "1"  # one job for the series both Orthancs fired for
    assert all(r[-1] == "3" and r[-2] == "3" for r in rows)  # SR + SR + SEG via A and via B


def test_cluster_demo_orthanc_killed_after_queueing(tmp_path):
    """Orthanc A queues the series and is killed (SIGKILL) before a worker reads them: the workers read
    (WADO-RS) and store (STOW-RS) through Orthanc B, the peer on the same index."""
    proc = subprocess.run([sys.executable, "-m", "pacs_landmarks.cluster_demo", "--series", "1", "--kill-one",
                           "--out", str(tmp_path / "demo")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Orthanc A killed" in proc.stdout
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("case")]
    assert rows and all(r[-2] == "-" and r[-1] == "3" and r[2] == "1" for r in rows)
