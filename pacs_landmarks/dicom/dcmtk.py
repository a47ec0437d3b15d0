"""Find dcmtk's command-line tools by absolute path, never a same-named program that shadows them.

pynetdicom installs Python programs called ``storescu``, ``findscu``, ``echoscu``, ``getscu``, ``movescu`` and
``storescp`` into the virtual environment's ``bin``; with the environment activated they come first on PATH and
take other options (``storescu: error: unrecognized arguments: -R -nh``). Everything of ours that runs a dcmtk
tool (demo, Orthanc launcher, tests, benchmarks) asks :func:`dcmtk_tool` for it: each candidate on PATH (then
the usual system folders) is run once with ``--version``, and only one whose answer starts with dcmtk's
identification line (``$dcmtk: storescu v3.6.7 2022-04-22 $``) is taken.

:func:`program` is the same clear "not installed" error for the other external programs (Orthanc, curl,
dciodvfy, unshare, nsenter), which have no namesakes to avoid.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

# After PATH: where Debian's dcmtk and a source build put the tools.
_FALLBACK_DIRS = ("/usr/bin", "/usr/local/bin", "/opt/dcmtk/bin")


class ToolNotFound(RuntimeError):
    """An external program we need is missing (or only an impostor of it is installed)."""


def _candidates(name: str) -> list[Path]:
    seen: list[Path] = []
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d] + list(_FALLBACK_DIRS)
    for d in dirs:
        path = Path(d) / name
        if path.is_file() and os.access(path, os.X_OK) and path.resolve() not in {p.resolve() for p in seen}:
            seen.append(path)
    return seen


def is_dcmtk(path: str | Path) -> bool:
    """True if ``path --version`` identifies itself as a dcmtk (OFFIS) tool."""
    try:
        proc = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=20,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return (proc.stdout + proc.stderr).lstrip().startswith("$dcmtk:")


@functools.cache
def dcmtk_tool(name: str) -> str:
    """The absolute path of dcmtk's ``name`` (``storescu``, ``findscu``, ``dsr2html``, ...), verified as dcmtk.

    Raises :class:`ToolNotFound` naming what was found instead, if anything.
    """
    rejected = []
    for path in _candidates(name):
        if is_dcmtk(path):
            return str(path.absolute())
        rejected.append(str(path))
    hint = f" (found only {', '.join(rejected)}, which is not dcmtk's: pynetdicom installs a namesake)" if rejected else ""
    raise ToolNotFound(f"dcmtk's {name} is not installed{hint}: run scripts/bootstrap (it installs dcmtk)")


def program(name: str) -> str:
    """The absolute path of an external program that is not part of dcmtk, or a clear :class:`ToolNotFound`."""
    path = shutil.which(name)
    if path is None:
        raise ToolNotFound(f"{name} is not installed: run scripts/bootstrap")
    return path
