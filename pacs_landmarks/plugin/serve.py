"""``make serve``: Orthanc with the pacs-landmarks plugin from this repository, in the foreground.

    python -m pacs_landmarks.plugin.serve                 # orthanc.json as it is (storage ./var/orthanc)
    python -m pacs_landmarks.plugin.serve --storage var/demo   # browse what `make demo` left

Logs go to the terminal; Ctrl-C stops Orthanc cleanly. Orthanc 1.10 listens on every interface (its HTTP
server refuses remote clients while RemoteAccessAllowed is false; the DICOM port does not): see
docs/orthanc.md before exposing it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from pacs_landmarks.plugin.config import ORTHANC_JSON, REPO_ROOT, read_orthanc_json, write_runtime_config

# Where `make viewer` (pacs_landmarks.viewer, default port 3000) serves OHIF against this Orthanc.
VIEWER_URL = "http://localhost:3000/"


def viewer_command(http_port) -> str:
    """The `make viewer` line for an Orthanc on ``http_port`` (the viewer assumes 8042 unless told)."""
    if int(http_port or 8042) == 8042:
        return "make viewer"
    return f"make viewer VIEWER_ARGS='--orthanc http://127.0.0.1:{http_port}'"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pacs_landmarks.plugin.serve",
        description="Run Orthanc with the pacs-landmarks plugin in the foreground (what `make serve` does).",
    )
    parser.add_argument("--config", type=Path, default=ORTHANC_JSON, help="Orthanc configuration (default: orthanc.json)")
    parser.add_argument(
        "--storage", type=Path,
        help="use DIR/orthanc for Orthanc's storage and DIR/pacs-landmarks for jobs and results instead",
    )
    parser.add_argument("--verbose", action="store_true", help="Orthanc's --verbose log level")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    orthanc = shutil.which("Orthanc")
    if orthanc is None:
        print("serve: Orthanc is not installed: run `make bootstrap`", file=sys.stderr)
        return 2
    if not args.config.is_file():
        print(f"serve: no configuration file {args.config}", file=sys.stderr)
        return 2
    config = args.config.resolve()
    if args.storage is not None:
        storage = args.storage.resolve()
        config = write_runtime_config(
            storage / "serve-orthanc.json",
            {
                "StorageDirectory": str(storage / "orthanc"),
                "IndexDirectory": str(storage / "orthanc"),
                "PacsLandmarks": {"WorkDirectory": str(storage / "pacs-landmarks")},
            },
            base=args.config,
        )
    settings = read_orthanc_json(config)
    port = settings.get("HttpPort")
    print(
        f"serve: Orthanc AE {settings.get('DicomAet')} on DICOM port {settings.get('DicomPort')}, "
        f"Explorer http://localhost:{port}/app/explorer.html, "
        f"plugin status http://localhost:{port}/pacs-landmarks/health\n"
        f"serve: OHIF viewer: run `{viewer_command(port)}` in another terminal, then open {VIEWER_URL}",
        flush=True,
    )
    # "PythonScript" is relative to the working directory: run from the repository root.
    os.chdir(REPO_ROOT)
    cmd = [orthanc, *(["--verbose"] if args.verbose else []), str(config)]
    os.execve(orthanc, cmd, {**os.environ, "TCP_NODELAY": "1"})  # Orthanc replaces us: Ctrl-C reaches it
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
