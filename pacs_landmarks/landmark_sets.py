"""Landmark set definitions: data files in ``sets/``, one per set.

Each set names its landmarks (with the code shown as label, a SNOMED CT structure, topographic modifier and
laterality, a display colour), the derived cephalometric measurements as formulas on those landmarks, and the
local coding scheme(s) it uses. Local codes use a designator beginning with ``99`` (PS3.16 section 8) and are
declared in the Coding Scheme Identification Sequence of every object we write (PS3.3 C.12.1.1.2.3).
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=None)
def load_landmark_set(name: str = "craniofacial16") -> dict:
    """The parsed JSON definition of a landmark set; ``KeyError`` if there is none of that name."""
    path = resources.files("pacs_landmarks") / "sets" / f"{name}.json"
    if not path.is_file():
        raise KeyError(f"unknown landmark set {name!r}")
    return json.loads(path.read_text(encoding="utf-8"))


def set_dimension(name: str = "craniofacial16") -> int:
    """2 for a set traced on a projection image (positions in image pixels, SCOORD), 3 for one on a volume
    (positions in patient mm, SCOORD3D); sets without a ``dimension`` are 3D."""
    return int(load_landmark_set(name).get("dimension", 3))


def landmark_sets() -> list[str]:
    """The names of the shipped landmark sets."""
    folder = resources.files("pacs_landmarks") / "sets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def find_landmark(label: str, set_name: str) -> str:
    """The set's name for a landmark given by name, abbreviation or alias (case-insensitive, spaces and
    hyphens ignored), e.g. "Subspinale" or "a-point" -> "A point"; ``KeyError`` if none or ambiguous."""

    def key(text: str) -> str:
        return "".join(ch for ch in text.casefold() if ch not in " -_")

    wanted = key(label)
    hits = {lm["name"] for lm in load_landmark_set(set_name)["landmarks"]
            if wanted in {key(lm["name"]), key(lm["abbreviation"]), *(key(a) for a in lm.get("aliases", ()))}}
    if len(hits) != 1:
        reason = "matches several" if hits else "is not"
        raise KeyError(f"landmark {label!r} {reason} in set {set_name!r}" + (f": {sorted(hits)}" if hits else ""))
    return hits.pop()


def landmark_names(name: str = "craniofacial16") -> list[str]:
    return [lm["name"] for lm in load_landmark_set(name)["landmarks"]]


def mirror_names(names: list[str]) -> list[int]:
    """Index permutation that swaps "... R" and "... L" names (identity for midline landmarks): what a
    landmark is called once the head is mirrored left-right."""
    index = {n: i for i, n in enumerate(names)}
    out = []
    for n in names:
        if n.endswith(" R"):
            out.append(index.get(n[:-2] + " L", index[n]))
        elif n.endswith(" L"):
            out.append(index.get(n[:-2] + " R", index[n]))
        else:
            out.append(index[n])
    return out


def landmark_definition(landmark: str, set_name: str = "craniofacial16") -> dict:
    """The definition of one landmark, found by its name or abbreviation; ``KeyError`` if unknown."""
    for lm in load_landmark_set(set_name)["landmarks"]:
        if landmark in (lm["name"], lm["abbreviation"]):
            return lm
    raise KeyError(f"landmark {landmark!r} is not in set {set_name!r}")


def coded(entry: dict):
    """A highdicom ``CodedConcept`` from a ``{"value", "scheme", "meaning"}`` entry of a set file."""
    from highdicom.sr import CodedConcept

    return CodedConcept(value=entry["value"], scheme_designator=entry["scheme"], meaning=entry["meaning"])


def coding_scheme_identification(set_name: str = "craniofacial16") -> list:
    """Items of the Coding Scheme Identification Sequence (0008,0110) for the local schemes of a set.

    PS3.3 C.12.1.1.2.3: a private scheme used in an object must be identified there.
    """
    from pydicom.dataset import Dataset

    items = []
    for scheme in load_landmark_set(set_name).get("coding_schemes", []):
        item = Dataset()
        item.CodingSchemeDesignator = scheme["designator"]
        item.CodingSchemeName = scheme["name"]
        item.CodingSchemeResponsibleOrganization = scheme["responsible_organization"]
        items.append(item)
    return items


def rgb_to_cielab(rgb: tuple[int, int, int]):
    """A highdicom ``CIELabColor`` for a set's sRGB display colour (SEG Recommended Display CIELab Value)."""
    from highdicom.color import CIELabColor

    return CIELabColor.from_rgb(*rgb)
