import subprocess
import sys

from pacs_landmarks.cli import build_parser


def test_every_subcommand_has_useful_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sub.choices, "no subcommands registered"
    for name, p in sub.choices.items():
        assert p.description or p.format_help().strip(), name
        assert len(p.format_help()) > 80, f"`{name} --help` says almost nothing"


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "pacs_landmarks.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "pacs-landmarks" in out.stdout
