"""Node settings: a TOML file (``node.toml``, read with tomllib) overridden by command-line options.

See the documented example ``node.toml`` at the repository root and docs/node.md.
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

_AET = re.compile(r"^[\x20-\x7e]{1,16}$")  # PS3.5 6.2: AE is up to 16 characters, no backslash or control
# ClusterSettings fields a [cluster] table may set (dsn and results_dir come from dsn and storage).
CLUSTER_KEYS = ("heartbeat_s", "stalled_after_s", "sweep_interval_s", "max_routine_wait_s", "backoff_base_s",
                "backoff_max_s", "max_delivery_attempts", "max_attempts", "reconcile_after_s", "enqueue_retry_s",
                "source_retry_s", "stat_rule")
_DEST = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:]+|\[[^\]]+\]):(?P<port>\d{1,5})$")


class ConfigError(ValueError):
    """A setting that cannot work, with the setting's name in the message."""


def check_ae_title(value: str, what: str) -> str:
    value = str(value).strip()
    if not _AET.match(value) or "\\" in value:
        raise ConfigError(f"{what}: {value!r} is not a valid AE title (1-16 printable characters, no backslash)")
    return value


@dataclass
class Destination:
    """Where results are C-STOREd. ``tls``: DICOM TLS (PS3.15 B.1); ``tls_ca`` verifies the server,
    ``tls_cert``/``tls_key`` is our client certificate when the destination asks for one."""

    ae_title: str
    host: str
    port: int
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Destination":
        """``AET@HOST:PORT`` (the ``--destination`` syntax)."""
        m = _DEST.match(text.strip())
        if not m:
            raise ConfigError(f"--destination {text!r}: expected AET@HOST:PORT")
        return cls(m["aet"], m["host"].strip("[]"), int(m["port"])).checked()

    def checked(self) -> "Destination":
        self.ae_title = check_ae_title(self.ae_title, "destination ae_title")
        if not 0 < int(self.port) < 65536:
            raise ConfigError(f"destination {self.ae_title}: port {self.port} out of range")
        self.port = int(self.port)
        return self

    def to_job(self) -> dict[str, Any]:
        """The JSON stored with a job (JobStore destinations are opaque dicts)."""
        return {k: v for k, v in asdict(self).items() if v not in (None, False)}


@dataclass
class AllowedCaller:
    """A calling AE title allowed to associate, optionally only from these addresses."""

    ae_title: str
    addresses: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> "AllowedCaller":
        """``AET`` or ``AET@ADDR[,ADDR...]`` (the ``--allow-ae`` syntax)."""
        aet, _, addrs = text.partition("@")
        return cls(check_ae_title(aet, "--allow-ae"), [a for a in addrs.split(",") if a])


@dataclass
class NodeConfig:
    ae_title: str = "LANDMARKS"
    bind: str = "127.0.0.1"
    port: int = 11112
    storage: str = "node-data"  # series/, other/, results/ and jobs.sqlite live here
    idle_timeout: float = 2.0  # s without a new instance after the association closed -> series complete
    model: str | None = None  # None: the shipped demo model
    # Lateral cephalograms (single X-ray images, docs/node.md): analysed with this 2D model (None: the shipped
    # ceph19 model); ``cephalograms = false`` stores X-ray images without analysing them.
    ceph_model: str | None = None
    cephalograms: bool = True
    device: str | None = None  # "cpu", "cuda", ...; None: the model's default
    log_format: str = "text"  # "text" or "json"
    max_associations: int = 10
    # Processes that run the associations (node/receivers.py); None: one per CPU core, at most 4.
    receivers: int | None = None
    max_instance_mb: float = 1024.0  # larger instances are refused (0xA700), nothing written
    backoff_base_s: float = 1.0  # delivery retry: base * 2**n seconds ...
    backoff_max_s: float = 60.0  # ... at most this
    max_delivery_attempts: int | None = None  # None: keep trying until delivered (results stay on disk)
    # No landmark found (not a head): false = no result objects in the archive (landmarks.json only); true = a
    # landmark SR and measurements SR that say "nothing found" are sent (docs/node.md).
    store_when_nothing_found: bool = False
    # DICOM TLS for incoming associations (PS3.15 B.1): our certificate and key; ``tls_ca`` set = clients
    # must present a certificate signed by it.
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    # Job queue: "embedded" (jobs.sqlite + a worker thread in this process, the default) or "postgres" (the
    # distributed mode, docs/scale-out.md: jobs in PostgreSQL at ``dsn``, analysed by `pacs-landmarks worker`).
    queue: str = "embedded"
    dsn: str | None = None  # libpq connection string, e.g. "postgresql://landmarks@db-host:5432/landmarks"
    cluster: dict[str, Any] = field(default_factory=dict)  # [cluster] table: ClusterSettings tuning
    allow: list[AllowedCaller] = field(default_factory=list)  # empty: any calling AE title (warned at start)
    destinations: list[Destination] = field(default_factory=list)

    @property
    def storage_path(self) -> Path:
        return Path(self.storage)

    def checked(self) -> "NodeConfig":
        self.ae_title = check_ae_title(self.ae_title, "ae_title")
        if not 0 <= int(self.port) < 65536:
            raise ConfigError(f"port {self.port} out of range")
        if self.idle_timeout <= 0:
            raise ConfigError("idle_timeout must be > 0 seconds")
        if self.receivers is not None and not (isinstance(self.receivers, int) and 1 <= self.receivers <= 64):
            raise ConfigError(f"receivers {self.receivers!r}: use a number of processes from 1 to 64")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format {self.log_format!r}: use text or json")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key go together")
        if self.tls_ca and not self.tls_cert:
            raise ConfigError("tls_ca (client certificates) needs tls_cert and tls_key")
        for path in (self.tls_cert, self.tls_key, self.tls_ca):
            if path and not Path(path).is_file():
                raise ConfigError(f"TLS file not found: {path}")
        for d in self.destinations:
            d.checked()
        if not isinstance(self.store_when_nothing_found, bool):
            raise ConfigError("store_when_nothing_found: use true or false")
        if self.queue not in ("embedded", "postgres"):
            raise ConfigError(f"queue {self.queue!r}: use embedded or postgres")
        if self.queue == "postgres" and not self.dsn:
            raise ConfigError('queue = "postgres" needs dsn (a PostgreSQL connection string)')
        unknown = set(self.cluster) - set(CLUSTER_KEYS)
        if unknown:
            raise ConfigError(f"[cluster]: unknown setting(s): {', '.join(sorted(unknown))}")
        if "stat_rule" in self.cluster:
            from pacs_landmarks.jobs.priority import check_rule

            try:
                self.cluster["stat_rule"] = check_rule(self.cluster["stat_rule"])
            except ValueError as exc:
                raise ConfigError(f"[cluster] {exc}") from None
        return self

    def cluster_settings(self) -> Any:
        """The distributed mode's settings (pacs_landmarks.jobs.distributed.ClusterSettings); results go to
        ``storage``/results, which every worker must see at the same path (shared storage)."""
        from pacs_landmarks.jobs.distributed import ClusterSettings

        return ClusterSettings(dsn=str(self.dsn), results_dir=str(self.storage_path / "results"), **self.cluster)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_toml(self) -> str:
        """The effective configuration in node.toml syntax (``serve --print-config``)."""
        lines = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("allow", "destinations", "cluster") or value is None:
                continue
            lines.append(f"{f.name} = {_toml(value)}")
        if self.cluster:
            lines += ["", "[cluster]"] + [f"{k} = {_toml(v)}" for k, v in self.cluster.items()]
        for a in self.allow:
            lines += ["", "[[allow]]", f"ae_title = {_toml(a.ae_title)}"]
            if a.addresses:
                lines.append(f"addresses = {_toml(a.addresses)}")
        for d in self.destinations:
            lines += ["", "[[destinations]]"]
            lines += [f"{k} = {_toml(v)}" for k, v in asdict(d).items() if v not in (None, False)]
        return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def load(path: str | Path | None) -> NodeConfig:
    """Read a node.toml; unknown keys are an error (a typo must not silently fall back to a default)."""
    cfg = NodeConfig()
    if path is None:
        return cfg
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    known = {f.name for f in fields(NodeConfig)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s): {', '.join(sorted(unknown))}")
    try:
        for key, value in data.items():
            if key == "allow":
                cfg.allow = [
                    AllowedCaller(check_ae_title(a["ae_title"], "allow ae_title"), list(a.get("addresses", [])))
                    for a in value
                ]
            elif key == "destinations":
                cfg.destinations = [Destination(**d) for d in value]
            else:
                setattr(cfg, key, value)
    except (TypeError, KeyError) as exc:
        raise ConfigError(f"{path}: bad [[{key}]] entry: {exc}") from None
    # Relative paths in the file are relative to the file, so the node starts the same from any directory.
    for key in ("storage", "model", "ceph_model", "tls_cert", "tls_key", "tls_ca"):
        value = getattr(cfg, key)
        if value and not Path(value).is_absolute():
            setattr(cfg, key, str((path.parent / value).resolve()))
    for d in cfg.destinations:
        for key in ("tls_ca", "tls_cert", "tls_key"):
            value = getattr(d, key)
            if value and not Path(value).is_absolute():
                setattr(d, key, str((path.parent / value).resolve()))
    return cfg
