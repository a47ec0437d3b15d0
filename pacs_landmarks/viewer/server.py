"""HTTP server for the OHIF build: static files, single-page-app fallback, ``/dicom-web`` proxied to Orthanc.

Python's own ``http.server`` (``ThreadingHTTPServer`` + ``SimpleHTTPRequestHandler``) serves the files; the
proxy is ``http.client``. No extra dependency: this serves one user or one test browser on loopback, not a
hospital (put a real web server in front for that, see docs/orthanc.md). Orthanc 1.10 cannot serve a
single-page app itself (no fallback to index.html for the app's routes such as ``/viewer``).

    python -m pacs_landmarks.viewer --orthanc http://127.0.0.1:8042 --port 3000
"""
from __future__ import annotations

import argparse
import http.client
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

DICOMWEB_PREFIX = "/dicom-web"
# Hop-by-hop headers (RFC 9110 section 7.6.1) are not forwarded by a proxy.
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
               "transfer-encoding", "upgrade", "host", "content-length"}


def app_config() -> bytes:
    """The app configuration served at ``/app-config.js`` (data source = Orthanc DICOMweb at /dicom-web)."""
    return (resources.files("pacs_landmarks.viewer") / "app-config.js").read_bytes()


class ViewerHandler(SimpleHTTPRequestHandler):
    """Static files of ``dist/``; ``/app-config.js`` ours; unknown paths -> index.html; ``/dicom-web`` proxied."""

    extensions_map = {
        **SimpleHTTPRequestHandler.extensions_map,
        ".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm", ".json": "application/json",
    }
    protocol_version = "HTTP/1.1"  # keep-alive: OHIF makes hundreds of small requests

    def __init__(self, *args, orthanc: str, config: bytes, quiet: bool, **kwargs):
        self.orthanc = urlsplit(orthanc)
        self.config = config
        self.quiet = quiet
        super().__init__(*args, **kwargs)

    # -- routing -------------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        if self._is_dicomweb():
            return self._proxy()
        path = urlsplit(self.path).path
        if path == "/app-config.js":
            return self._send(200, "text/javascript", self.config)
        if not Path(self.translate_path(self.path)).exists():
            self.path = "/index.html"  # a route of the single-page app (/viewer, /basic, ...)
        return super().do_GET()

    def do_HEAD(self) -> None:
        if self._is_dicomweb():
            return self._proxy()
        return super().do_HEAD()

    def do_POST(self) -> None:  # STOW-RS (OHIF stores a SR a user saves)
        if self._is_dicomweb():
            return self._proxy()
        self.send_error(405)

    def do_PUT(self) -> None:
        self.do_POST()

    def do_DELETE(self) -> None:
        self.do_POST()

    def _is_dicomweb(self) -> bool:
        path = urlsplit(self.path).path
        return path == DICOMWEB_PREFIX or path.startswith(DICOMWEB_PREFIX + "/")

    # -- proxy ---------------------------------------------------------------------------------------------
    def _proxy(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        base = self.orthanc.path.rstrip("/")
        conn = http.client.HTTPConnection(self.orthanc.hostname, self.orthanc.port or 80, timeout=300)
        try:
            conn.request(self.command, base + self.path, body=body, headers=headers)
            upstream = conn.getresponse()
            data = upstream.read()  # Orthanc answers with a length; DICOMweb answers here are small enough
        except (OSError, http.client.HTTPException) as exc:
            self._send(502, "text/plain", f"Orthanc at {self.orthanc.geturl()} did not answer: {exc}\n".encode())
            return
        finally:
            conn.close()
        self.send_response(upstream.status, upstream.reason)
        for key, value in upstream.getheaders():
            if key.lower() not in _HOP_BY_HOP:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def list_directory(self, path):  # folders of the build are not for browsing
        self.send_error(404)
        return None

    def _send(self, status: int, content_type: str, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:
        if not self.quiet:
            super().log_message(format, *args)


class ViewerServer(ThreadingHTTPServer):
    daemon_threads = True
    # Ctrl-C must stop the viewer at once: a browser's idle keep-alive connection would otherwise hold
    # server_close() (it joins every handler thread) until the browser lets go (CI saw a 30 s hang once).
    block_on_close = False


def make_server(dist: Path, orthanc: str, host: str = "127.0.0.1", port: int = 3000, quiet: bool = True) -> ViewerServer:
    """A bound (not yet serving) server; ``port=0`` picks a free port (``server.server_address[1]``)."""
    if not (Path(dist) / "index.html").is_file():
        raise FileNotFoundError(f"no OHIF build in {dist}: run `make viewer` (it fetches it)")
    handler = partial(ViewerHandler, directory=str(dist), orthanc=orthanc, config=app_config(), quiet=quiet)
    return ViewerServer((host, port), handler)


def serve_in_thread(server: ViewerServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, name="ohif-viewer", daemon=True)
    thread.start()
    return thread


def url_of(server: ViewerServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{'localhost' if host in ('127.0.0.1', '::1') else host}:{port}/"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pacs_landmarks.viewer",
        description="Serve the pinned OHIF viewer against Orthanc's DICOMweb (what `make viewer` does).",
    )
    parser.add_argument("--orthanc", default="http://127.0.0.1:8042",
                        help="Orthanc's HTTP address; /dicom-web is proxied to its DICOMweb plugin (default %(default)s)")
    parser.add_argument("--port", type=int, default=3000, help="viewer port (default %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this machine only)")
    parser.add_argument("--cache", type=Path, help="where the OHIF build is kept (default var/ohif)")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    return parser


def main(argv: list[str] | None = None) -> int:
    from pacs_landmarks.viewer.ohif import DEFAULT_CACHE, OhifError, ensure_ohif

    args = build_parser().parse_args(argv)
    try:
        dist = ensure_ohif(args.cache or DEFAULT_CACHE)
    except OhifError as exc:
        print(f"viewer: {exc}", file=sys.stderr)
        return 2
    try:
        server = make_server(dist, args.orthanc, args.host, args.port, quiet=not args.verbose)
    except OSError as exc:
        print(f"viewer: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    print(f"viewer: OHIF on {url_of(server)} (DICOMweb from {args.orthanc.rstrip('/')}/dicom-web); Ctrl-C stops it",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
