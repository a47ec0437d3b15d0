"""The script Orthanc's Python plugin loads (``"PythonScript"`` in orthanc.json).

Orthanc embeds Debian's Python 3.11, which does not see the project's virtual environment: put the venv's
site-packages (with its ``.pth`` files, for the editable install) and the repository first on ``sys.path``,
then hand over to ``pacs_landmarks.plugin.app``. Nothing else happens here.
"""
import json
import site
import sys
from pathlib import Path

import orthanc

_PLUGIN_DIR = Path(__file__).resolve().parent
_REPO = _PLUGIN_DIR.parents[1]


def _use_venv() -> None:
    section = json.loads(orthanc.GetConfiguration()).get("PacsLandmarks") or {}
    venv = (_REPO / (section.get("Venv") or ".venv")).resolve()
    site_packages = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    if not site_packages.is_dir():
        orthanc.LogError(
            f"pacs_landmarks: {site_packages} not found: the venv must be built with Python "
            f"{sys.version_info[0]}.{sys.version_info[1]} like Orthanc's plugin (run scripts/bootstrap)"
        )
    before = list(sys.path)
    site.addsitedir(str(site_packages))
    added = [p for p in sys.path if p not in before]
    # Orthanc put this script's folder on sys.path; drop it so plugin modules cannot shadow top-level names.
    rest = [p for p in before if Path(p or ".").resolve() not in (_PLUGIN_DIR, _REPO)]
    sys.path[:] = [str(_REPO), *added, *rest]


_use_venv()

from pacs_landmarks.plugin.app import install  # noqa: E402  (needs the sys.path above)

install(orthanc)
