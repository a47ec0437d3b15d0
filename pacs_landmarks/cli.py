"""``pacs-landmarks``: one console script, one subcommand per job.

Each part of the package registers its own subcommands (``register(subparsers)`` in its ``cli`` module) and
imports its heavy dependencies (torch, highdicom) only when its command runs, so ``--help`` stays quick.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pacs_landmarks import __version__
from pacs_landmarks.errors import CommandError  # re-exported: it was defined here

COMMAND_MODULES = (
    "pacs_landmarks.dicom.cli",  # inspect
    "pacs_landmarks.inference.cli",  # train, evaluate, predict
    "pacs_landmarks.inference.phantom",  # phantom
    "pacs_landmarks.inference.ceph_phantom",  # phantom --ceph (after phantom: it extends that command)
    "pacs_landmarks.inference.importers",  # import
    "pacs_landmarks.pipeline_cli",  # infer, read-sr
    "pacs_landmarks.review",  # review
    "pacs_landmarks.inference.real_heads",  # real-case
    "pacs_landmarks.inference.warp",  # warp-heads
    "pacs_landmarks.node.cli",  # serve, jobs
    "pacs_landmarks.cluster_cli",  # worker
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacs-landmarks",
        description="Craniofacial landmarks on CT for PACS: DICOM in, DICOM SR (TID 1500) and SEG out.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except CommandError as exc:
        print(f"pacs-landmarks {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
