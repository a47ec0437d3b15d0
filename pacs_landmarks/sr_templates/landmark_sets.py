"""Landmark set definitions: data files in ``sets/``, one per set."""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=None)
def load_landmark_set(name: str = "craniofacial16") -> dict:
    """The parsed JSON definition of a landmark set; ``KeyError`` if there is none of that name."""
    path = resources.files("pacs_landmarks.sr_templates") / "sets" / f"{name}.json"
    if not path.is_file():
        raise KeyError(f"unknown landmark set {name!r}")
    return json.loads(path.read_text(encoding="utf-8"))


def landmark_names(name: str = "craniofacial16") -> list[str]:
    return [lm["name"] for lm in load_landmark_set(name)["landmarks"]]
