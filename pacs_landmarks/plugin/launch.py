"""Start and stop an Orthanc with the plugin, optionally in a private network namespace, and talk to it.

Orthanc 1.10.1 cannot bind to 127.0.0.1 only, so `make demo`, the tests and the benchmark run it in a new
network namespace (``unshare -n``; only its own loopback, brought up first) and run every client --
storescu, findscu, curl -- in that namespace with ``nsenter --net=/proc/PID/ns/net``. Needs root (or
CAP_SYS_ADMIN), as CI and this machine have. ``make serve`` runs it on the host network instead.

dcmtk (and so Orthanc's DICOM server) leaves Nagle's algorithm on unless ``TCP_NODELAY=1`` is in the
environment: every process started here gets it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from pacs_landmarks.dicom.dcmtk import dcmtk_tool, program
from pacs_landmarks.plugin.config import REPO_ROOT


class OrthancError(RuntimeError):
    """Orthanc did not start, or answered a request with an error."""


class OrthancProcess:
    """One Orthanc process started from a configuration file (see ``config.write_runtime_config``)."""

    def __init__(self, config: str | Path, *, private_network: bool = True, log_path: str | Path | None = None):
        self.config_path = Path(config).resolve()
        self.config = json.loads(self.config_path.read_text())
        self.private_network = private_network
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen[bytes] | None = None
        self.http_port = int(self.config.get("HttpPort", 8042))
        self.dicom_port = int(self.config.get("DicomPort", 4242))
        self.aet = str(self.config.get("DicomAet", "ORTHANC"))

    # -- process -------------------------------------------------------------------------------------------
    @staticmethod
    def env() -> dict[str, str]:
        return {**os.environ, "TCP_NODELAY": "1"}

    def start(self, timeout: float = 60.0, wait_for_plugin: bool = True) -> "OrthancProcess":
        cmd = [program("Orthanc"), str(self.config_path)]
        if self.private_network:
            # unshare execs (no fork), then sh execs Orthanc: self.proc.pid is Orthanc's pid and names the
            # namespace that nsenter joins.
            cmd = [program("unshare"), "-n", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *cmd]
        out = open(self.log_path, "ab") if self.log_path else None
        try:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO_ROOT, env=self.env(), stdout=out, stderr=subprocess.STDOUT if out else None,
                start_new_session=True,
            )
        finally:
            if out:
                out.close()
        self.wait_ready(timeout, wait_for_plugin)
        return self

    def wait_ready(self, timeout: float, wait_for_plugin: bool = True) -> None:
        deadline = time.monotonic() + timeout
        path = "/pacs-landmarks/health" if wait_for_plugin else "/system"
        last = ""
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise OrthancError(f"Orthanc exited with status {self.proc.returncode}{self._log_hint()}")
            try:
                status, _ = self.request("GET", path, timeout=5)
                if status == 200:
                    return
                last = f"HTTP {status}"
            except OrthancError as exc:
                last = str(exc)
            time.sleep(0.2)
        raise OrthancError(f"Orthanc did not answer {path} within {timeout:.0f} s ({last}){self._log_hint()}")

    def _log_hint(self) -> str:
        return f"; see its log {self.log_path}" if self.log_path else ""

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (Orthanc stops cleanly, the plugin gets ORTHANC_STOPPED), SIGKILL after ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL: a crash, as far as Orthanc and the plugin can tell."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> "OrthancProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- clients -------------------------------------------------------------------------------------------
    def client_prefix(self) -> list[str]:
        """Prefix for a client command: join Orthanc's network namespace (nothing on the host network)."""
        if not self.private_network:
            return []
        if self.proc is None or self.proc.poll() is not None:
            raise OrthancError("Orthanc is not running")
        return [program("nsenter"), f"--net=/proc/{self.proc.pid}/ns/net", "--"]

    def run_client(self, cmd: list[str], timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self.client_prefix() + cmd, capture_output=True, text=True, timeout=timeout, env=self.env()
        )
        if check and proc.returncode != 0:
            raise OrthancError(f"{Path(cmd[0]).name} failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-2000:]}")
        return proc

    def request(
        self, method: str, path: str, body: bytes | None = None, timeout: float = 60.0,
        content_type: str = "application/json",
    ) -> tuple[int, bytes]:
        """One HTTP request to Orthanc's REST API (curl in the namespace): (status, body)."""
        cmd = [program("curl"), "-sS", "-X", method, "-o", "-", "-w", "\n%{http_code}", "--max-time", str(timeout)]
        if body is not None:
            cmd += ["-H", f"Content-Type: {content_type}", "--data-binary", "@-"]
        cmd.append(f"http://127.0.0.1:{self.http_port}{path}")
        proc = subprocess.run(self.client_prefix() + cmd, input=body, capture_output=True, timeout=timeout + 5)
        if proc.returncode != 0:
            raise OrthancError(f"{method} {path}: curl {proc.returncode}: {proc.stderr.decode(errors='replace').strip()}")
        data, _, status = proc.stdout.rpartition(b"\n")
        return int(status), data

    def get_json(self, path: str, timeout: float = 60.0) -> Any:
        status, data = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise OrthancError(f"GET {path}: HTTP {status}: {data[:500].decode(errors='replace')}")
        return json.loads(data)

    def post_json(self, path: str, body: Any = None, timeout: float = 60.0) -> Any:
        payload = body if isinstance(body, bytes) else json.dumps(body if body is not None else {}).encode()
        status, data = self.request("POST", path, payload, timeout=timeout)
        if status != 200:
            raise OrthancError(f"POST {path}: HTTP {status}: {data[:500].decode(errors='replace')}")
        return json.loads(data) if data.strip() else None

    def storescu(self, files: list[Path] | Path, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        """Send files (or a folder, recursively) with dcmtk's storescu."""
        paths = [Path(files)] if isinstance(files, (str, Path)) else [Path(f) for f in files]
        # A folder: its DICOM files only (a case folder also holds landmarks.json, which storescu would
        # report as a failed file).
        targets = [str(f) for p in paths for f in (sorted(q for q in p.rglob("*") if _is_dicom(q)) if p.is_dir() else [p])]
        if not targets:
            raise OrthancError(f"no DICOM files in {', '.join(map(str, paths))}")
        # -R: propose only the SOP classes of the files; the transfer syntax proposed is the first file's,
        # so compressed files go as they are (storescu would otherwise try to decompress them itself).
        cmd = [dcmtk_tool("storescu"), "-aet", "PACSLM-SCU", "-aec", self.aet, "-R", "-nh"]
        cmd += _storescu_ts_option(Path(targets[0]))
        proc = self.run_client(cmd + ["127.0.0.1", str(self.dicom_port), *targets], timeout=timeout)
        # storescu exits 0 even when some C-STORE failed: its "E:" lines are the truth.
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("E:")]
        if errors:
            raise OrthancError("storescu: " + " | ".join(errors[:6]))
        return proc

    def echoscu(self) -> subprocess.CompletedProcess[str]:
        return self.run_client([dcmtk_tool("echoscu"), "-aec", self.aet, "127.0.0.1", str(self.dicom_port)])

    def findscu_series(self, study_uid: str, modality: str) -> list[dict[str, str]]:
        """C-FIND at SERIES level in one study (PS3.4 C.6.1.1.4); returns tag keyword -> value per match."""
        cmd = [
            dcmtk_tool("findscu"), "-S", "-aec", self.aet,
            "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study_uid}",
            "-k", f"Modality={modality}", "-k", "SeriesInstanceUID", "-k", "SeriesDescription",
            "-k", "SeriesNumber", "-k", "NumberOfSeriesRelatedInstances",
            "127.0.0.1", str(self.dicom_port),
        ]
        return parse_findscu(self.run_client(cmd).stderr)


# storescu's option proposing each compressed transfer syntax (PS3.5 A.4); uncompressed needs none.
_STORESCU_TS = {
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "-xu",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.50": "-xy",  # JPEG baseline
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "-xw",  # JPEG 2000
    "1.2.840.10008.1.2.5": "-xr",  # RLE
    "1.2.840.10008.1.2.1.99": "-xd",  # deflated
}


def _is_dicom(path: Path) -> bool:
    """A DICOM file (PS3.10 7.1: 128-byte preamble, then "DICM")."""
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        fh.seek(128)
        return fh.read(4) == b"DICM"


def _storescu_ts_option(target: Path) -> list[str]:
    import pydicom

    first = target if target.is_file() else next((p for p in sorted(target.rglob("*")) if p.is_file()), None)
    if first is None:
        return []
    try:
        ts = str(pydicom.dcmread(first, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    except Exception:  # not DICOM: storescu reports it
        return []
    return [_STORESCU_TS[ts]] if ts in _STORESCU_TS else []


def parse_findscu(output: str) -> list[dict[str, str]]:
    """findscu's response dumps (``W: (0020,000e) UI [1.2.3] # ... SeriesInstanceUID``) -> dicts."""
    import re

    matches: list[dict[str, str]] = []
    current: dict[str, str] | None = None
    line_re = re.compile(r"\(([0-9a-f]{4}),([0-9a-f]{4})\)\s+\w\w\s+(?:\[(.*?)\]|\(no value available\)|=\S+).*#\s*\d+,\s*\d+\s+(\w+)")
    for line in output.splitlines():
        if "Find Response:" in line:
            current = {}
            matches.append(current)
            continue
        m = line_re.search(line)
        if m and current is not None:
            current[m.group(4)] = (m.group(3) or "").strip("\x00 ")  # UI values are NUL-padded
    return matches
