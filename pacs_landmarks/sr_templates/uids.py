"""Deterministic UIDs for our results, so that a re-run replaces an object instead of adding a duplicate.

A UID is ``2.25.<decimal of a name-based UUID>`` (PS3.5 B.2: UUID-derived UIDs) of a key made from the source
series UID, the kind of object and the model name + version. The same inputs always give the same UID.
"""
from __future__ import annotations

import uuid

# Fixed namespace of this product; changing it changes every result UID.
_NAMESPACE = uuid.UUID("6f0b1d2e-3c4a-5b6d-8e9f-a0b1c2d3e4f5")


def derived_uid(*parts: str) -> str:
    """``2.25.`` UID from a name-based (SHA-1, version 5) UUID of the joined parts."""
    return f"2.25.{uuid.uuid5(_NAMESPACE, chr(31).join(parts)).int}"


def result_uid(series_uid: str, kind: str, model_name: str, model_version: str, what: str) -> str:
    """UID of one result object: ``kind`` (``landmark-sr``, ``measurements-sr``, ``seg``), ``what``
    (``series`` or ``instance``)."""
    return derived_uid(series_uid, kind, model_name, model_version, what)


def tracking_uid(series_uid: str, model_name: str, model_version: str, tracked: str) -> str:
    """Tracking Unique Identifier of one landmark (or measurement), shared by the SR groups and the SEG
    segment of that landmark (PS3.16 TID 1410, PS3.3 C.8.20.4 Segment Description)."""
    return derived_uid(series_uid, "tracking", model_name, model_version, tracked)
