"""Fixtures for the Orthanc tests: a real Orthanc with the plugin, in a private network namespace.

Each test gets its own storage, job store and ports in a temporary folder; the repository's orthanc.json is
the base, so the shipped configuration is what is tested.
"""
from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pacs_landmarks.plugin.config import REPO_ROOT, write_runtime_config
from pacs_landmarks.plugin.launch import OrthancProcess

HTTP_PORT = 18042
DICOM_PORT = 14242


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class OrthancFactory:
    """``start(**plugin_settings)`` -> a running OrthancProcess on this test's storage (restartable)."""

    def __init__(self, root: Path):
        self.root = root
        self.started: list[OrthancProcess] = []

    def config(self, config_overrides: dict[str, Any] | None = None, **plugin: Any) -> Path:
        overrides = {
            "HttpPort": HTTP_PORT,
            "DicomPort": DICOM_PORT,
            "StorageDirectory": str(self.root / "orthanc"),
            "IndexDirectory": str(self.root / "orthanc"),
            "PacsLandmarks": {"WorkDirectory": str(self.root / "pacs-landmarks"), **plugin},
            **(config_overrides or {}),
        }
        return write_runtime_config(self.root / "orthanc.json", overrides)

    def start(self, config_overrides: dict[str, Any] | None = None, **plugin: Any) -> OrthancProcess:
        """``config_overrides``: top-level orthanc.json keys (e.g. StableAge); ``plugin``: PacsLandmarks keys."""
        orthanc = OrthancProcess(self.config(config_overrides, **plugin), private_network=True, log_path=self.root / "orthanc.log")
        self.started.append(orthanc)
        return orthanc.start(timeout=90)

    def log(self) -> str:
        path = self.root / "orthanc.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_all(self) -> None:
        for orthanc in self.started:
            orthanc.stop()


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[OrthancFactory]:
    factory = OrthancFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.stop_all()


def start_worker(orthanc: OrthancProcess, dsn: str, folder: Path, *options: str) -> subprocess.Popen:
    """A real ``pacs-landmarks worker`` on every queue, in ``orthanc``'s network (it reads by WADO-RS and
    stores by STOW-RS there), its storage in ``folder/shared``, its output in ``folder/worker.log``; stop it
    with ``pacs_landmarks.jobs.distributed.stop_workers``."""
    with open(folder / "worker.log", "w") as log:
        return subprocess.Popen(
            orthanc.client_prefix() + [sys.executable, "-m", "pacs_landmarks", "worker", "--dsn", dsn, "--storage",
                                       str(folder / "shared"), "--queues", "analyse-stat,analyse,deliver", *options],
            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
        )
