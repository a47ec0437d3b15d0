"""``python -m pacs_landmarks``: the same as the ``pacs-landmarks`` console script."""
import sys

from pacs_landmarks.cli import main

sys.exit(main())
