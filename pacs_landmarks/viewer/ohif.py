"""The OHIF viewer build: ``@ohif/app`` from the npm registry, pinned by version and integrity hash.

The package ships a complete production build in ``dist/`` (index.html, bundles, wasm codecs): no build step,
no ``npm install``. ``npm pack`` downloads the tarball (npm checks the registry's hash), we check it against our
own pin (Subresource-Integrity style ``sha512-<base64>``, as npm's ``integrity`` field and package-lock files
write it), and unpack only ``dist/`` into a git-ignored cache (``var/ohif/``). Nothing of OHIF is committed.
"""
from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

OHIF_PACKAGE = "@ohif/app"
OHIF_VERSION = "3.13.2"
OHIF_INTEGRITY = "sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = REPO_ROOT / "var" / "ohif"


class OhifError(RuntimeError):
    """The OHIF build could not be fetched or did not match its pin."""


def integrity_of(path: Path) -> str:
    """``sha512-<base64 digest>`` of a file, the form of npm's ``integrity`` field."""
    digest = hashlib.sha512()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "sha512-" + base64.b64encode(digest.digest()).decode()


def dist_dir(cache: Path = DEFAULT_CACHE) -> Path:
    return Path(cache) / f"ohif-app-{OHIF_VERSION}" / "dist"


def _stamp(cache: Path) -> Path:
    return Path(cache) / f"ohif-app-{OHIF_VERSION}" / "integrity"


def is_installed(cache: Path = DEFAULT_CACHE) -> bool:
    stamp = _stamp(cache)
    return (dist_dir(cache) / "index.html").is_file() and stamp.is_file() and stamp.read_text().strip() == OHIF_INTEGRITY


def ensure_ohif(cache: Path = DEFAULT_CACHE, *, log=print) -> Path:
    """The ``dist/`` folder of the pinned OHIF build, fetched with ``npm pack`` the first time."""
    cache = Path(cache)
    if is_installed(cache):
        return dist_dir(cache)
    npm = shutil.which("npm")
    if npm is None:
        raise OhifError("npm not found: run scripts/bootstrap (it installs nodejs and npm)")
    cache.mkdir(parents=True, exist_ok=True)
    spec = f"{OHIF_PACKAGE}@{OHIF_VERSION}"
    log(f"viewer: fetching {spec} with npm pack (about 50 MB, once)")
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
        proc = subprocess.run(
            [npm, "pack", spec, "--json", "--pack-destination", tmp],
            capture_output=True, text=True, timeout=900, cwd=tmp,
        )
        if proc.returncode != 0:
            raise OhifError(f"npm pack {spec} failed ({proc.returncode}): {proc.stderr.strip()[-1500:]}")
        try:
            filename = json.loads(proc.stdout)[0]["filename"]
        except (ValueError, KeyError, IndexError) as exc:
            raise OhifError(f"npm pack {spec}: unexpected output {proc.stdout[:300]!r}") from exc
        tarball = Path(tmp) / filename
        got = integrity_of(tarball)
        if got != OHIF_INTEGRITY:
            raise OhifError(f"{spec}: integrity {got} is not the pinned {OHIF_INTEGRITY}; refusing to use it")
        unpacked = Path(tmp) / "unpacked"
        with tarfile.open(tarball, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/dist/")]
            tar.extractall(unpacked, members=members, filter="data")
        target = dist_dir(cache).parent
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        (unpacked / "package" / "dist").rename(target / "dist")
        _stamp(cache).write_text(OHIF_INTEGRITY + "\n")
    log(f"viewer: {spec} ready in {dist_dir(cache)}")
    return dist_dir(cache)
