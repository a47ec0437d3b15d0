"""Which series are STAT: the front ends' priority rule (the distributed mode's ``stat_rule``, docs/scale-out.md).

A rule is a table of values to match, any one of which makes the series STAT:

- ``priorities``: Requested Procedure Priority (0040,1003) (PS3.3 C.4.11 / C.30.2, values STAT, HIGH, ROUTINE,
  MEDIUM, LOW), read from the instance's top level and from its Request Attributes Sequence (0040,0275) items,
  where modalities that copy the worklist's request put it;
- ``calling_ae_titles``: the AE title of the association that sent the series (e.g. the emergency CT);
- ``station_names``: Station Name (0008,1010).

Matching is case-insensitive and ignores padding. The node's receivers take the facts from each instance
and its association (a series is STAT when any of its instances matches); the Orthanc plugin from the
series' first instance and its ``RemoteAET`` metadata.
"""
from __future__ import annotations

from typing import Any

RULE_KEYS = ("priorities", "calling_ae_titles", "station_names")


def check_rule(rule: Any) -> dict[str, list[str]]:
    """The rule as given in node.toml ``[cluster] stat_rule`` / orthanc.json ``Cluster.stat_rule``, checked."""
    if not isinstance(rule, dict):
        raise ValueError(f"stat_rule must be a table of {', '.join(RULE_KEYS)}, not {rule!r}")
    unknown = set(rule) - set(RULE_KEYS)
    if unknown:
        raise ValueError(f"stat_rule: unknown key(s) {', '.join(sorted(unknown))}; use {', '.join(RULE_KEYS)}")
    for key, values in rule.items():
        if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
            raise ValueError(f"stat_rule.{key} must be a list of strings")
    return {k: list(v) for k, v in rule.items()}


def is_stat(rule: dict[str, Any], facts: dict[str, Any]) -> bool:
    """The priority rule: STAT when a fact matches (see the module docstring).

    ``facts``: ``priority`` (one value or a list), ``calling_ae_title``, ``station_name``.
    """
    def hit(key: str, fact: str) -> bool:
        wanted = {str(v).strip().upper() for v in rule.get(key, ())}
        value = facts.get(fact)
        values = value if isinstance(value, (list, tuple)) else [value]
        return any(v is not None and str(v).strip().upper() in wanted for v in values)

    return hit("priorities", "priority") or hit("calling_ae_titles", "calling_ae_title") or hit(
        "station_names", "station_name")


def dataset_facts(ds: Any) -> dict[str, Any]:
    """``priority`` and ``station_name`` of a pydicom Dataset (or a dict of keyword -> value, as Orthanc's
    ``/instances/{id}/tags?simplify`` gives) for ``is_stat``."""
    def get(item: Any, keyword: str) -> Any:
        return item.get(keyword) if hasattr(item, "get") else None

    priorities = [get(ds, "RequestedProcedurePriority")]
    for item in get(ds, "RequestAttributesSequence") or ():
        priorities.append(get(item, "RequestedProcedurePriority"))
    return {"priority": [p for p in priorities if p], "station_name": get(ds, "StationName")}
