"""Shared fixtures: real DICOM tools, temporary phantoms, the validator."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pacs_landmarks.dicom.dcmtk import ToolNotFound, dcmtk_tool, program

REPO = Path(__file__).resolve().parents[1]


def require_tool(name: str) -> str:
    """A program that is not dcmtk (dciodvfy, openssl): its path, or the test fails saying to bootstrap."""
    try:
        return program(name)
    except ToolNotFound as exc:
        pytest.fail(str(exc))


def dcmtk(name: str) -> str:
    """dcmtk's ``name`` by absolute path (never pynetdicom's namesake on an activated venv's PATH)."""
    try:
        return dcmtk_tool(name)
    except ToolNotFound as exc:
        pytest.fail(str(exc))


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """Run dicom3tools' dciodvfy on one file; return (errors, warnings) lines."""
    proc = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [ln for ln in lines if ln.startswith("Error")]
    warnings = [ln for ln in lines if ln.startswith("Warning")]
    return errors, warnings


@pytest.fixture
def validate_dicom():
    """``validate_dicom(path, allow=())``: assert dciodvfy reports no error (except ones matching ``allow``)."""

    def check(path: Path, allow: tuple[str, ...] = ()) -> list[str]:
        errors, warnings = dciodvfy(path)
        errors = [e for e in errors if not any(a in e for a in allow)]
        assert not errors, f"dciodvfy errors in {path}:\n" + "\n".join(errors)
        return warnings

    return check


@pytest.fixture(scope="session")
def pg_server():
    """A private PostgreSQL (Debian's binaries, initdb into a temporary folder, 127.0.0.1, a free port) for
    the whole test session; run as the ``postgres`` user when we are root (PostgreSQL refuses root)."""
    import tempfile

    from pacs_landmarks.jobs.pgserver import PgServer

    folder = Path(tempfile.mkdtemp(prefix="pacs-landmarks-pg-"))
    server = PgServer(folder).start()
    try:
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def pg_dsn(pg_server, request):
    """A new empty database on the session's PostgreSQL, named after the test; its DSN."""
    import re

    name = "t_" + re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:50]
    return pg_server.create_database(name)
