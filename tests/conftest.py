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


def _sigint_state() -> tuple[object, set]:
    import signal

    return signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, [])


# Taken when pytest imports this file, before any test module: what every test must leave as it found.
_SIGINT_AT_START = _sigint_state()


@pytest.fixture(autouse=True)
def sigint_left_as_found():
    """A test (or a fixture it set up, an earlier teardown, an import while collecting) that leaves this
    process's SIGINT handler or signal mask other than at the start fails here, and the start's state is put
    back: every later child would inherit an ignored or blocked SIGINT (test_viewer's Ctrl-C)."""
    import signal

    yield
    handler, blocked = _SIGINT_AT_START
    now_handler, now_blocked = _sigint_state()
    if now_blocked != blocked:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    if now_handler is not handler and handler is not None:
        signal.signal(signal.SIGINT, handler)
    assert now_handler is handler and now_blocked == blocked, (
        f"SIGINT left changed: handler {handler!r} -> {now_handler!r}, "
        f"blocked signals {sorted(blocked)} -> {sorted(now_blocked)}")


def pytest_terminal_summary(terminalreporter):
    """Say so when this pytest started with SIGINT ignored or blocked: its children (servers that stop on
    Ctrl-C) inherit that. A shell without job control starts a background job so (``sh -c 'make test &'``,
    POSIX "Asynchronous Lists"); test_viewer's child hung 30 s in two such full-suite runs."""
    import signal

    handler, blocked = _SIGINT_AT_START
    if handler is signal.SIG_IGN or signal.SIGINT in blocked:
        terminalreporter.write_line(f"note: SIGINT was {'ignored' if handler is signal.SIG_IGN else 'blocked'} in "
                                    "this pytest process from its start (a background job of a shell without job "
                                    "control?); children that stop on Ctrl-C inherit that")
