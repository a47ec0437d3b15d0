"""The exception every subcommand raises for a user-facing failure.

It lives at the bottom of the package, beside ``landmark_sets``, because the subcommands are registered by
modules in every layer (``dicom.cli``, ``inference.phantom``, ...) and imports run one way, down
(``tests/test_layers.py``): a command in a low layer cannot import it from the console script
``pacs_landmarks.cli`` at the top, which catches it, prints ``pacs-landmarks COMMAND: error: MESSAGE`` and exits
with status 2.  ``pacs_landmarks.cli`` re-exports it for code that imports it from there.
"""
from __future__ import annotations


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 2, no traceback."""
