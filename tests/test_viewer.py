"""The viewer server of `make viewer` without a browser: OHIF's files, our app config, the single-page-app
fallback, a clear 502 when Orthanc is not there. (The proxy to a real Orthanc and the real OHIF in a browser:
tests/test_ohif.py.)"""
from __future__ import annotations

import base64
import hashlib
import socket
import urllib.error
import urllib.request

import pytest

from pacs_landmarks.viewer.ohif import OHIF_INTEGRITY, dist_dir, integrity_of, is_installed
from pacs_landmarks.viewer.server import make_server, serve_in_thread, url_of


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def viewer():
    if not is_installed():
        pytest.fail(f"the pinned OHIF build is not in {dist_dir()}: run scripts/bootstrap")
    # Orthanc "at" a port nobody listens on: the proxy must say so.
    server = make_server(dist_dir(), f"http://127.0.0.1:{_free_port()}", "127.0.0.1", 0)
    serve_in_thread(server)
    try:
        yield url_of(server)
    finally:
        server.shutdown()
        server.server_close()


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def test_serves_ohif_with_our_config_and_spa_fallback(viewer):
    status, ctype, index = _get(viewer)
    assert status == 200 and b"app-config.js" in index and ctype.startswith("text/html")
    # The app's own routes are not files: index.html answers them.
    status, _, body = _get(viewer + "viewer?StudyInstanceUIDs=1.2.3")
    assert status == 200 and body == index
    status, ctype, config = _get(viewer + "app-config.js")
    assert status == 200 and ctype.startswith("text/javascript")
    assert b"'/dicom-web'" in config and b"dataSourcesModule.dicomweb" in config
    assert b"cloudfront" not in config  # not OHIF's public demo server
    folder = next(p.name for p in dist_dir().iterdir() if p.is_dir() and not (p / "index.html").exists())
    assert _get(viewer + folder + "/")[0] == 404  # no directory listings
    wasm = next(dist_dir().glob("*.wasm")).name
    status, ctype, _ = _get(viewer + wasm)
    assert status == 200 and ctype == "application/wasm"  # browsers refuse streaming compile otherwise


def test_dicomweb_without_orthanc_is_a_clear_502(viewer):
    status, _, body = _get(viewer + "dicom-web/studies")
    assert status == 502 and b"did not answer" in body


def test_integrity_is_npm_style_sha512(tmp_path):
    blob = tmp_path / "blob"
    blob.write_bytes(b"pacs-landmarks")
    want = "sha512-" + base64.b64encode(hashlib.sha512(b"pacs-landmarks").digest()).decode()
    assert integrity_of(blob) == want
    assert OHIF_INTEGRITY.startswith("sha512-") and len(base64.b64decode(OHIF_INTEGRITY[7:])) == 64


def test_make_viewer_command_prints_its_url_and_serves():
    """`make viewer` = `python -m pacs_landmarks.viewer`: prints the URL, serves until stopped (Ctrl-C)."""
    import signal
    import subprocess
    import sys

    def as_in_a_terminal():
        # A child inherits an ignored or blocked SIGINT (a background job; seen in full-suite runs here, not
        # alone), and Ctrl-C is the point of this test.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    proc = subprocess.Popen([sys.executable, "-m", "pacs_landmarks.viewer", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=as_in_a_terminal)
    try:
        line = proc.stdout.readline()
        assert line.startswith("viewer: OHIF on http://localhost:"), line
        url = line.split()[3]
        assert _get(url)[0] == 200
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    assert proc.returncode == 0
