"""node.toml parsing and command-line overrides."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pacs_landmarks.cli import CommandError, build_parser
from pacs_landmarks.node import config
from pacs_landmarks.node.cli import effective_config

REPO = Path(__file__).resolve().parents[1]


def test_shipped_example_loads_and_paths_are_relative_to_the_file(tmp_path):
    cfg = config.load(REPO / "node.toml").checked()
    assert cfg.ae_title == "LANDMARKS" and cfg.port == 11112 and cfg.idle_timeout == 2.0
    assert [a.ae_title for a in cfg.allow] == ["MODALITY", "PACS"] and cfg.allow[1].addresses == ["127.0.0.1"]
    assert cfg.destinations[0].to_job() == {"ae_title": "PACS", "host": "127.0.0.1", "port": 4242}
    assert Path(cfg.storage) == (REPO / "node-data").resolve()


@pytest.mark.parametrize("text, message", [
    ("prot = 104\n", "unknown setting(s): prot"),
    ("port = 70000\n", "out of range"),
    ("ae_title = 'THIS IS FAR TOO LONG'\n", "not a valid AE title"),
    ("[[destinations]]\nae_title = 'X'\nhost = 'h'\n", "bad [[destinations]] entry"),
    ("log_format = 'xml'\n", "log_format"),
    ("tls_cert = 'missing.crt'\ntls_key = 'missing.key'\n", "TLS file not found"),
    ("port = \n", "node.toml"),
])
def test_bad_settings_are_clear_errors(tmp_path, text, message):
    path = tmp_path / "node.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        config.load(path).checked()


def test_command_line_overrides_the_file(tmp_path):
    args = build_parser().parse_args([
        "serve", "--config", str(REPO / "node.toml"), "--port", "0", "--allow-ae", "CT1@10.0.0.1,10.0.0.2",
        "--destination", "ARCH@[::1]:105", "--destination", "B@pacs.local:104", "--idle-timeout", "0.5",
    ])
    cfg = effective_config(args)
    assert cfg.port == 0 and cfg.idle_timeout == 0.5
    assert [(a.ae_title, a.addresses) for a in cfg.allow] == [("CT1", ["10.0.0.1", "10.0.0.2"])]
    assert [(d.ae_title, d.host, d.port) for d in cfg.destinations] == [("ARCH", "::1", 105), ("B", "pacs.local", 104)]
    with pytest.raises(CommandError, match="AET@HOST:PORT"):
        effective_config(build_parser().parse_args(["serve", "--destination", "nohost"]))
    assert "[[destinations]]" in cfg.to_toml() and "port = 0" in cfg.to_toml()
