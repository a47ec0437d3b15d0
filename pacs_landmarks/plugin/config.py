"""The repository's ``orthanc.json`` and the plugin's own ``"PacsLandmarks"`` section.

Orthanc's JSON reader (jsoncpp) accepts ``//`` and ``/* */`` comments; Python's does not, so
``read_orthanc_json`` strips them (outside strings) before parsing. Launchers (``make serve``, ``make demo``,
the tests) write a runtime copy with a few keys overridden (``write_runtime_config``) instead of editing the
documented file.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
ORTHANC_JSON = REPO_ROOT / "orthanc.json"
SECTION = "PacsLandmarks"

# A JSON string, or a comment: strings are kept as they are, comments dropped.
_TOKENS = re.compile(r'"(?:\\.|[^"\\])*"|//[^\n]*|/\*.*?\*/', re.S)


def strip_comments(text: str) -> str:
    return _TOKENS.sub(lambda m: m.group(0) if m.group(0).startswith('"') else "", text)


def read_orthanc_json(path: str | Path = ORTHANC_JSON) -> dict[str, Any]:
    return json.loads(strip_comments(Path(path).read_text()))


def write_runtime_config(
    out: str | Path, overrides: dict[str, Any] | None = None, base: str | Path = ORTHANC_JSON
) -> Path:
    """Write ``base`` with ``overrides`` applied (``PacsLandmarks`` and ``DicomWeb`` are merged key by key).

    Relative ``StorageDirectory``/``IndexDirectory`` are made absolute from ``base``'s folder and the
    ``PythonScript`` absolute from the repository, so the copy can live anywhere.
    """
    base = Path(base).resolve()
    config = read_orthanc_json(base)
    for key in ("StorageDirectory", "IndexDirectory"):
        config[key] = str((base.parent / config[key]).resolve())
    config["PythonScript"] = str((REPO_ROOT / config["PythonScript"]).resolve())
    section = config.setdefault(SECTION, {})
    for key in ("WorkDirectory", "Venv"):
        if section.get(key):
            section[key] = str((REPO_ROOT / section[key]).resolve())
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(config, indent=2))
    return out


@dataclass(frozen=True)
class PluginSettings:
    """The ``"PacsLandmarks"`` section, paths resolved (see orthanc.json for what each key means)."""

    model: str | None = None
    device: str | None = None
    ceph_model: str | None = None  # 2D model of lateral cephalograms (None: the shipped ceph19 model)
    cephalograms: bool = True  # false: X-ray images are stored, not analysed
    venv: Path | None = None
    work_directory: Path = REPO_ROOT / "var" / "pacs-landmarks"
    modalities: tuple[str, ...] = ("CT",)
    worker: bool = True
    skip_processed: bool = True
    superseded: str = "delete"  # what happens to earlier results of a series once newer ones are stored

    SUPERSEDED = ("delete", "keep")
    queue: str = "embedded"  # "postgres": the distributed mode (docs/scale-out.md), this Orthanc only enqueues
    dsn: str | None = None
    dicomweb_url: str | None = None  # how workers reach this Orthanc (WADO-RS in, STOW-RS out)
    dicomweb_peers: tuple[str, ...] = ()  # other Orthancs on the same index: used when this one is down
    cluster: dict[str, Any] = field(default_factory=dict)  # ClusterSettings tuning (as node.toml [cluster])

    @classmethod
    def from_orthanc_config(cls, config: dict[str, Any]) -> "PluginSettings":
        section = config.get(SECTION) or {}

        def path(value: str | None) -> Path | None:
            return None if not value else (REPO_ROOT / value).resolve()

        superseded = str(section.get("Superseded") or "delete").lower()
        if superseded not in cls.SUPERSEDED:
            raise ValueError(f'{SECTION}.Superseded must be "delete" or "keep", not {section.get("Superseded")!r}')
        return cls(
            model=str(path(section["Model"])) if section.get("Model") else None,
            ceph_model=str(path(section["CephModel"])) if section.get("CephModel") else None,
            cephalograms=bool(section.get("Cephalograms", True)),
            device=section.get("Device") or None,
            venv=path(section.get("Venv")),
            work_directory=path(section.get("WorkDirectory")) or cls.work_directory,
            modalities=tuple(m.upper() for m in section.get("Modalities") or ("CT",)),
            worker=bool(section.get("Worker", True)),
            skip_processed=bool(section.get("SkipProcessed", True)),
            superseded=superseded,
            queue=str(section.get("Queue") or "embedded"),
            dsn=section.get("Dsn") or None,
            dicomweb_url=section.get("DicomWebUrl") or (
                f"http://127.0.0.1:{config.get('HttpPort', 8042)}"
                f"{'/' + str((config.get('DicomWeb') or {}).get('Root', '/dicom-web/')).strip('/')}"
            ),
            dicomweb_peers=tuple(section.get("DicomWebPeers") or ()),
            cluster=dict(section.get("Cluster") or {}),
        )

    def cluster_settings(self) -> Any:
        from pacs_landmarks.jobs.distributed import ClusterSettings

        if self.queue != "postgres" or not self.dsn:
            raise ValueError('PacsLandmarks: "Queue": "postgres" needs "Dsn"')
        return ClusterSettings(dsn=self.dsn, results_dir=str(self.results_dir), **self.cluster)

    @property
    def job_store_path(self) -> Path:
        return self.work_directory / "jobs.sqlite"

    @property
    def results_dir(self) -> Path:
        return self.work_directory / "results"
