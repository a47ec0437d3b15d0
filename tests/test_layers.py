"""Imports run one way, down: no module of ``pacs_landmarks`` imports a room above its own.

A room is the first name under ``pacs_landmarks`` (a subpackage or a top-level module).  Rooms, bottom to top:

0. ``landmark_sets``, ``errors`` and the package ``__init__`` (``__version__``).
1. ``dicom``.
2. ``inference`` and ``sr_templates``, one level: they may import each other, as the code does today.
   ``sr_templates`` encodes ``inference.landmark``'s ``Landmark`` (and ``landmark2d``'s) at module top;
   ``inference.data`` reads training truth with ``sr_templates.read_landmark_sr`` and ``inference.ceph_phantom``
   writes its truth's measurements with ``sr_templates.measurements``, both inside functions.
3. ``pipeline``.
4. ``jobs``.
5. The front ends: ``cli`` (the console script), ``__main__``, ``node``, ``plugin``, ``cluster_cli``, ``demo``,
   ``cluster_demo``, ``viewer``, ``pipeline_cli`` (``infer``, ``read-sr``) and ``review``.  ``review`` is
   one because nothing but the console script's command list imports it and it takes ``xray_inputs`` from
   ``pipeline_cli``.  Front ends may import each other (``cluster_cli`` uses ``node``'s configuration and
   model loading; the demos start Orthanc with ``plugin``), except that ``node`` and ``plugin`` never import
   each other: what they share lives in ``jobs`` (see its docstring).

Every import counts: module top, inside functions, ``TYPE_CHECKING`` blocks, relative ones, and
``importlib.import_module`` / ``__import__`` calls.  A module below the front ends that imports a name it
computes cannot be checked and is reported as such.  A new room must be placed in ``LEVELS`` first.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "pacs_landmarks"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE  # the source tree, whatever is installed

FRONT_END = 5
LEVELS = {
    "": 0, "landmark_sets": 0, "errors": 0,
    "dicom": 1,
    "inference": 2, "sr_templates": 2,
    "pipeline": 3,
    "jobs": 4,
    "cli": FRONT_END, "__main__": FRONT_END, "node": FRONT_END, "plugin": FRONT_END, "cluster_cli": FRONT_END,
    "demo": FRONT_END, "cluster_demo": FRONT_END, "viewer": FRONT_END, "pipeline_cli": FRONT_END,
    "review": FRONT_END,
}
# Rooms of one level that must still not import each other (pairs, either direction).
APART = {frozenset(("node", "plugin"))}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room_of(dotted: str) -> str:
    """The room of a module of the package (``""``: the package ``__init__``)."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else ""


def _resolve_relative(name: str, level: int, module: str, is_package: bool) -> str:
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _literal(node: ast.expr | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def imported_modules(source: str, module: str, is_package: bool, rooms: set[str]):
    """Yield (line, dotted name or None when it cannot be known) for every import in ``source``."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = _resolve_relative(base, node.level, module, is_package)
            if base == PACKAGE:
                # ``from pacs_landmarks import review`` imports a room, ``from pacs_landmarks import __version__``
                # the package (every room on disk is in LEVELS: test_every_room_has_a_level).
                for alias in node.names:
                    yield node.lineno, f"{PACKAGE}.{alias.name}" if alias.name in rooms else PACKAGE
            else:
                yield node.lineno, base
        elif isinstance(node, ast.Call):
            called = getattr(node.func, "attr", getattr(node.func, "id", None))
            if called not in ("import_module", "__import__"):
                continue
            name = _literal(node.args[0]) if node.args else None
            if name is not None and name.startswith("."):
                anchor = _literal(node.args[1]) if len(node.args) > 1 else _literal(
                    next((k.value for k in node.keywords if k.arg == "package"), None))
                if anchor is None:
                    name = None
                else:
                    dots = len(name) - len(name.lstrip("."))
                    name = _resolve_relative(name.lstrip("."), dots, anchor, True)
            yield node.lineno, name


def upward_imports(source: str, path: str, module: str, *, is_package: bool = False) -> list[str]:
    """One message per import in ``source`` (the module ``module``) that reaches a room above its own."""
    own = room_of(module)
    if own not in LEVELS:
        return [f"{path}: {module} is in no room"]
    problems = []
    for line, target in imported_modules(source, module, is_package, set(LEVELS)):
        if target is None:
            if LEVELS[own] < FRONT_END:
                problems.append(f"{path}:{line}: {module} imports a module whose name it computes: "
                                "cannot check the layers (use an import statement)")
            continue
        if target != PACKAGE and not target.startswith(PACKAGE + "."):
            continue
        theirs = room_of(target)
        if theirs not in LEVELS:
            problems.append(f"{path}:{line}: {module} imports {target}, which is in no room")
        elif LEVELS[theirs] > LEVELS[own]:
            problems.append(f"{path}:{line}: {module} (room {own or PACKAGE}, level {LEVELS[own]}) imports {target} "
                            f"(room {theirs}, level {LEVELS[theirs]}): upward")
        elif frozenset((own, theirs)) in APART:
            problems.append(f"{path}:{line}: {module} imports {target}: {own} and {theirs} never import each other")
    return problems


def package_files() -> list[Path]:
    return sorted(PACKAGE_DIR.rglob("*.py"))


def test_every_room_has_a_level():
    rooms = {room_of(module_name(p)) for p in package_files()}
    assert rooms - set(LEVELS) == set(), "place these in LEVELS (tests/test_layers.py)"
    assert len(package_files()) > 50  # the walk found the package


def test_no_module_imports_a_room_above_its_own():
    problems = []
    for path in package_files():
        problems += upward_imports(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE_DIR.parent)),
                                   module_name(path), is_package=path.name == "__init__.py")
    assert problems == [], "\n".join(problems)


# The checker itself: each case is a module of a given room whose last line is the import in question.
UPWARD = [
    ("pacs_landmarks.dicom.series", "from pacs_landmarks.cli import CommandError\n"),
    ("pacs_landmarks.dicom.series", "def f():\n    from pacs_landmarks.cli import CommandError\n"),
    ("pacs_landmarks.dicom.series", "if TYPE_CHECKING:\n    import pacs_landmarks.pipeline\n"),
    ("pacs_landmarks.landmark_sets", "from pacs_landmarks import dicom\n"),
    ("pacs_landmarks.errors", "from pacs_landmarks.inference.landmark import Landmark\n"),
    ("pacs_landmarks.sr_templates.cli", "def f():\n    from pacs_landmarks.pipeline import input_kind\n"),
    ("pacs_landmarks.inference.model", "from ..jobs import store\n"),
    ("pacs_landmarks.pipeline", "from .jobs.steps import run\n"),
    ("pacs_landmarks.jobs.steps", "import importlib\nimportlib.import_module('pacs_landmarks.node.app')\n"),
    ("pacs_landmarks.jobs.steps", "from importlib import import_module\nimport_module('.plugin', 'pacs_landmarks')\n"),
    ("pacs_landmarks.jobs.steps", "__import__('pacs_landmarks.cli')\n"),
    ("pacs_landmarks.jobs.steps", "import importlib\nimportlib.import_module(NAME)\n"),
    ("pacs_landmarks.node.app", "from pacs_landmarks.plugin import config\n"),
    ("pacs_landmarks.plugin.app", "def f():\n    import pacs_landmarks.node.scp\n"),
    ("pacs_landmarks.dicom.series", "from pacs_landmarks.nowhere import x\n"),
]
ALLOWED = [
    ("pacs_landmarks.dicom.series", "from pacs_landmarks.errors import CommandError\n"),
    ("pacs_landmarks.dicom.series", "from pacs_landmarks import __version__\n"),
    ("pacs_landmarks.dicom.series", "import numpy\nfrom pathlib import Path\nimport importlib.util\n"),
    ("pacs_landmarks.dicom.series", "from .volume import Volume\nfrom . import write\n"),
    ("pacs_landmarks.sr_templates.seg", "from pacs_landmarks.inference.landmark import Landmark\n"),
    ("pacs_landmarks.inference.data", "def f():\n    from pacs_landmarks.sr_templates import read_landmark_sr\n"),
    ("pacs_landmarks.jobs.steps", "from pacs_landmarks.pipeline import process_series\n"),
    ("pacs_landmarks.jobs.steps", "import importlib\nimportlib.import_module('pacs_landmarks.inference.model')\n"),
    ("pacs_landmarks.cli", "import importlib\nfor name in MODULES:\n    importlib.import_module(name)\n"),
    ("pacs_landmarks.cluster_cli", "from pacs_landmarks.node.cli import effective_config\n"),
    ("pacs_landmarks.review", "from pacs_landmarks.pipeline_cli import xray_inputs\n"),
]


@pytest.mark.parametrize("module,source", UPWARD)
def test_checker_reports_an_upward_import(module, source):
    problems = upward_imports(source, "x.py", module)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"x.py:{source.count(chr(10))}: {module} ")


@pytest.mark.parametrize("module,source", ALLOWED)
def test_checker_lets_a_downward_or_level_import_pass(module, source):
    assert upward_imports(source, "x.py", module) == []


def test_checker_resolves_relative_imports_in_a_package_init():
    # In inference/__init__.py, ``from .cli import x`` is inference.cli; ``from .. import cli`` the console script.
    assert upward_imports("from .cli import x\n", "x.py", "pacs_landmarks.inference", is_package=True) == []
    assert upward_imports("from .. import cli\n", "x.py", "pacs_landmarks.inference", is_package=True) != []
