"""Read landmarks back from a TID 1500 SR: ours, or one a person corrected in a viewer.

Walks the content tree (PS3.3 C.17.3) for Measurement Group containers (DCM 125007) that carry a Tracking
Identifier (DCM 112039) and a SCOORD3D POINT; the tracking identifier (or, failing that, the label or code of
a Finding / Finding Site, where viewers keep the user's label) names the landmark. Groups with only 2D points are skipped: they cannot give a 3D position.
With ``include_missing``, groups that state a landmark as not found (Qualitative Evaluation DCM 121052
"Presence of property" = DCM 122288 "Not visualized" or DCM 121059 "Presence Undetermined", see
``landmark_sr``) come back too, with their status and the reason from the group's Comment.
"""
from __future__ import annotations

from pydicom.dataset import Dataset

from pacs_landmarks.inference.landmark import NOT_FOUND, OUTSIDE_FIELD_OF_VIEW, Landmark
from pacs_landmarks.landmark_sets import load_landmark_set

_MEASUREMENT_GROUP = ("125007", "DCM")
_TRACKING_ID = ("112039", "DCM")
_FINDING_SITE = ("363698007", "SCT")
_FINDING = ("121071", "DCM")
_CONFIDENCE = ("CONF", "99PACSLMK")
_PRESENCE = ("121052", "DCM")
_COMMENT = ("121106", "DCM")
_STATUS_OF = {("122288", "DCM"): OUTSIDE_FIELD_OF_VIEW, ("121059", "DCM"): NOT_FOUND}


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


def read_landmark_sr(dataset: Dataset, set_name: str = "craniofacial16",
                     include_missing: bool = False) -> list[Landmark]:
    """Landmarks (3D, LPS mm) of a TID 1500 SR, one per tracking identifier, in document order; with
    ``include_missing`` also the landmarks it states as not found (position None), and then in the order of
    the landmark set when all names belong to it.

    ``ValueError`` if the dataset is not an SR document or holds no 3D landmark point (nor, with
    ``include_missing``, any landmark statement).
    """
    if "ContentSequence" not in dataset:
        raise ValueError("not a structured report: no Content Sequence")
    set_def = load_landmark_set(set_name)
    found: dict[str, Landmark] = {}
    missing: dict[str, Landmark] = {}
    for group in _walk(dataset.ContentSequence):
        if group.get("ValueType") != "CONTAINER" or _concept(group) != _MEASUREMENT_GROUP:
            continue
        identifier, point, confidence, sites = None, None, 1.0, []
        status, comment = None, ""
        for item in _walk(group.get("ContentSequence")):
            concept = _concept(item)
            vt = item.get("ValueType")
            if concept == _PRESENCE and vt == "CODE":
                code = item.ConceptCodeSequence[0]
                status = _STATUS_OF.get((str(code.get("CodeValue", "")), str(code.CodingSchemeDesignator)))
            elif concept == _COMMENT and vt == "TEXT":
                comment = str(item.TextValue)
            elif concept == _TRACKING_ID and vt == "TEXT":
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
        if name is None:
            continue
        if point is None:
            if status is not None and name not in missing:
                reason = comment.split(": ", 1)[1] if comment.startswith(status + ": ") else comment
                missing[name] = Landmark(name=name, position_lps_mm=None, confidence=0.0, status=status,
                                         reason=reason)
            continue
        if name in found:
            continue
        found[name] = Landmark(name=name, position_lps_mm=point, confidence=confidence)
    if not include_missing:
        if not found:
            raise ValueError("the SR holds no 3D landmark point (SCOORD3D POINT with a tracking identifier)")
        return list(found.values())
    if not found and not missing:
        raise ValueError("the SR holds no landmark (SCOORD3D POINT or a not-found statement with a tracking "
                         "identifier)")
    everything = {**missing, **found}  # a point wins over a statement for the same landmark
    order = [d["name"] for d in set_def["landmarks"]]
    if set(everything) <= set(order):
        return [everything[n] for n in order if n in everything]
    return list(everything.values())
