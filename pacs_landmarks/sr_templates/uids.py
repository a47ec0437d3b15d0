"""Deterministic UIDs for our results: a result's identity follows its input.

A UID is ``2.25.<decimal of a name-based UUID>`` (PS3.5 B.2: UUID-derived UIDs) of a key made from the source
series UID, a digest of the exact set of source instances used (``sources_digest``), the model name + version,
the kind of object and ``series``/``instance``. The same input always gives the same UIDs (re-sending a
series, or re-running it, stores nothing new); another set of instances of the same series (a series that
grew, a late reconstruction) gives new UIDs, so new results never hide behind the old ones' UIDs.
"""
from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable

# Fixed namespace of this product; changing it changes every result UID.
_NAMESPACE = uuid.UUID("6f0b1d2e-3c4a-5b6d-8e9f-a0b1c2d3e4f5")


def derived_uid(*parts: str) -> str:
    """``2.25.`` UID from a name-based (SHA-1, version 5) UUID of the joined parts."""
    return f"2.25.{uuid.uuid5(_NAMESPACE, chr(31).join(parts)).int}"


def sources_digest(sop_instance_uids: Iterable[str]) -> str:
    """SHA-256 (hex) of the sorted, distinct SOP Instance UIDs of the source images: independent of the order
    the instances arrived or were read in."""
    uids = sorted({str(u).strip() for u in sop_instance_uids})
    if not uids:
        raise ValueError("a result needs at least one source instance")
    return hashlib.sha256("\\".join(uids).encode("ascii")).hexdigest()


def result_uid(series_uid: str, sources: str, kind: str, model_name: str, model_version: str, what: str) -> str:
    """UID of one result object: ``sources`` = ``sources_digest`` of the instances used, ``kind``
    (``landmark-sr``, ``measurements-sr``, ``seg``, ``gsps``), ``what`` (``series`` or ``instance``)."""
    return derived_uid(series_uid, sources, kind, model_name, model_version, what)


def tracking_uid(series_uid: str, model_name: str, model_version: str, tracked: str) -> str:
    """Tracking Unique Identifier of one landmark (or measurement), shared by the SR groups and the SEG
    segment of that landmark (PS3.16 TID 1410, PS3.3 C.8.20.4 Segment Description).

    It names what is tracked (this landmark of this series by this model), not one result: it stays the same
    when a grown series gets new results, so a viewer can follow the landmark from the old result to the new.
    """
    return derived_uid(series_uid, "tracking", model_name, model_version, tracked)
