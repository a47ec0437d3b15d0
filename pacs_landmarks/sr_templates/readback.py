"""Read landmarks back from a TID 1500 SR: ours, or one a person corrected in a viewer.

Walks the content tree (PS3.3 C.17.3) for Measurement Group containers (DCM 125007) that carry a Tracking
Identifier (DCM 112039) and a SCOORD3D POINT; the tracking identifier (or, failing that, the label or code of
a Finding / Finding Site, where viewers keep the user's label) names the landmark. Groups with only 2D points are skipped: they cannot give a 3D position.
"""
from __future__ import annotations

from pydicom.dataset import Dataset

from pacs_landmarks.inference.landmark import Landmark
from pacs_landmarks.landmark_sets import load_landmark_set

_MEASUREMENT_GROUP = ("125007", "DCM")
_TRACKING_ID = ("112039", "DCM")
_FINDING_SITE = ("363698007", "SCT")
_FINDING = ("121071", "DCM")
_CONFIDENCE = ("CONF", "99PACSLMK")


def _concept(item: Dataset) -> tuple[str, str] | None:
    seq = item.get("ConceptNameCodeSequence")
    if not seq:
        return None
    code = seq[0]
    value = code.get("CodeValue") or code.get("LongCodeValue") or code.get("URNCodeValue")
    return str(value), str(code.CodingSchemeDesignator)


def _walk(items):
    for item in items or []:
        yield item
        yield from _walk(item.get("ContentSequence"))


def _resolve_name(identifier: str | None, codes: list[tuple[str, str, str]], set_def: dict) -> str | None:
    """The landmark a group is about: its tracking identifier, else a finding / finding site code or label
    (viewers often keep the user's label there), matched to names, abbreviations and codes of the set."""
    labels = [identifier] + [meaning for _, _, meaning in codes]
    for label in labels:
        if not label:
            continue
        key = label.strip().lower()
        for lm in set_def["landmarks"]:
            if key in (lm["name"].lower(), lm["abbreviation"].lower(), lm["code"]["meaning"].lower()):
                return lm["name"]
    for lm in set_def["landmarks"]:
        if any((value, scheme) == (lm["code"]["value"], lm["code"]["scheme"]) for value, scheme, _ in codes):
            return lm["name"]
    return identifier.strip() if identifier else None


def read_landmark_sr(dataset: Dataset, set_name: str = "craniofacial16") -> list[Landmark]:
    """Landmarks (3D, LPS mm) of a TID 1500 SR, one per tracking identifier, in document order.

    ``ValueError`` if the dataset is not an SR document or holds no 3D landmark point.
    """
    if "ContentSequence" not in dataset:
        raise ValueError("not a structured report: no Content Sequence")
    set_def = load_landmark_set(set_name)
    found: dict[str, Landmark] = {}
    for group in _walk(dataset.ContentSequence):
        if group.get("ValueType") != "CONTAINER" or _concept(group) != _MEASUREMENT_GROUP:
            continue
        identifier, point, confidence, sites = None, None, 1.0, []
        for item in _walk(group.get("ContentSequence")):
            concept = _concept(item)
            vt = item.get("ValueType")
            if concept == _TRACKING_ID and vt == "TEXT":
                identifier = str(item.TextValue)
            elif vt == "SCOORD3D" and item.get("GraphicType") == "POINT" and point is None:
                data = [float(v) for v in item.GraphicData]
                point = (data[0], data[1], data[2])
            elif concept in (_FINDING_SITE, _FINDING) and vt == "CODE":
                code = item.ConceptCodeSequence[0]
                sites.append((str(code.get("CodeValue", "")), str(code.CodingSchemeDesignator), str(code.CodeMeaning)))
            elif concept == _CONFIDENCE and vt == "NUM":
                confidence = float(item.MeasuredValueSequence[0].NumericValue)
        name = _resolve_name(identifier, sites, set_def)
        if point is None or name is None or name in found:
            continue
        found[name] = Landmark(name=name, position_lps_mm=point, confidence=confidence)
    if not found:
        raise ValueError("the SR holds no 3D landmark point (SCOORD3D POINT with a tracking identifier)")
    return list(found.values())
