"""dcmtk's tools are found by path and verified, even with the virtual environment activated (pynetdicom
installs namesakes of storescu, findscu and echoscu into .venv/bin)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from orthanc_harness import orthanc_factory  # noqa: F401  (fixture)
from pydicom.data import get_testdata_file

from pacs_landmarks.dicom import dcmtk
from pacs_landmarks.dicom.dcmtk import ToolNotFound, dcmtk_tool, is_dcmtk

VENV_BIN = Path(sys.executable).parent


@pytest.fixture
def venv_first_on_path(monkeypatch):
    """What `. .venv/bin/activate` does to PATH; the resolver's cache is emptied before and after."""
    monkeypatch.setenv("PATH", f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    dcmtk_tool.cache_clear()
    yield
    dcmtk_tool.cache_clear()


def test_pynetdicom_puts_namesakes_first_on_an_activated_path(venv_first_on_path):
    # The premise of the resolver: without it, `storescu` on this PATH is pynetdicom's program.
    impostor = VENV_BIN / "storescu"
    assert impostor.is_file(), "pynetdicom no longer installs a storescu script: revisit dicom/dcmtk.py"
    assert not is_dcmtk(impostor)


@pytest.mark.parametrize("name", ["storescu", "findscu", "echoscu", "storescp", "dsr2html"])
def test_dcmtk_tool_skips_namesakes(venv_first_on_path, name):
    path = dcmtk_tool(name)
    assert Path(path).is_absolute() and Path(path).parent != VENV_BIN
    assert is_dcmtk(path)


def test_only_a_namesake_is_a_clear_error(venv_first_on_path, monkeypatch):
    monkeypatch.setenv("PATH", str(VENV_BIN))
    monkeypatch.setattr(dcmtk, "_FALLBACK_DIRS", ())
    with pytest.raises(ToolNotFound, match=r"dcmtk's storescu is not installed \(found only .*\.venv/bin/storescu"):
        dcmtk_tool("storescu")
    with pytest.raises(ToolNotFound, match="dcmtk's no-such-tool is not installed: run scripts/bootstrap"):
        dcmtk_tool("no-such-tool")


def test_demo_client_step_with_the_venv_activated(orthanc_factory, venv_first_on_path, tmp_path):  # noqa: F811
    """`make demo`'s client step (storescu, findscu, echoscu through the launcher) with .venv/bin first on PATH:
    before the resolver this failed with `storescu: error: unrecognized arguments: -R -nh`."""
    orthanc = orthanc_factory.start(Worker=False)
    assert orthanc.echoscu().returncode == 0
    orthanc.storescu([get_testdata_file("CT_small.dcm")])
    assert len(orthanc.get_json("/instances")) == 1
    import pydicom

    study = str(pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True).StudyInstanceUID)
    found = orthanc.findscu_series(study, "CT")
    assert len(found) == 1 and found[0].get("Modality") == "CT", found
