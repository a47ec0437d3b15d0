"""The landmark type that the cascade produces and the SR / SEG builders consume (no torch import here)."""
from __future__ import annotations

from dataclasses import dataclass, field

FOUND = "found"
OUTSIDE_FIELD_OF_VIEW = "outside_field_of_view"  # the anatomy is not in the scanned volume
NOT_FOUND = "not_found"  # in the volume, but not confident or not plausible
STATUSES = (FOUND, OUTSIDE_FIELD_OF_VIEW, NOT_FOUND)


@dataclass(frozen=True)
class Landmark:
    """One landmark of a set. Only a ``found`` landmark's position is for use downstream; for the others
    ``position_lps_mm`` is None and ``reason`` says why (e.g. "low confidence", "implausible position")."""

    name: str  # as in the landmark set definition, e.g. "Nasion", "Gonion R"
    position_lps_mm: tuple[float, float, float] | None
    confidence: float = 1.0  # 0..1
    stage_positions: tuple[tuple[float, float, float], ...] = field(default=())  # per cascade stage, LPS mm
    status: str = FOUND
    reason: str = ""

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"landmark status must be one of {STATUSES}, not {self.status!r}")
        if self.status == FOUND and self.position_lps_mm is None:
            raise ValueError(f"landmark {self.name!r} is found but has no position")

    @property
    def found(self) -> bool:
        return self.status == FOUND


def found_only(landmarks) -> list[Landmark]:
    """The landmarks that anything downstream may use as points."""
    return [lm for lm in landmarks if lm.status == FOUND]


def landmark_table(landmarks) -> str:
    """The table that predict, infer and read-sr print: every landmark with its status; LPS mm for found
    ones, the reason for the others."""
    lines = [f"{'landmark':<12} {'status':<21} {'x (L)':>9} {'y (P)':>9} {'z (S)':>9} {'conf':>5}  reason"]
    for lm in landmarks:
        if lm.position_lps_mm is not None:
            x, y, z = (f"{v:9.2f}" for v in lm.position_lps_mm)
        else:
            x = y = z = f"{'-':>9}"
        lines.append(f"{lm.name:<12} {lm.status:<21} {x} {y} {z} {lm.confidence:5.2f}  {lm.reason}".rstrip())
    return "\n".join(lines)


def landmark_json(lm: Landmark, digits: int = 4) -> dict:
    """One landmark as in landmarks.json / predict --json: name, status, position (null unless found),
    confidence, reason."""
    pos = None if lm.position_lps_mm is None else [round(float(v), digits) for v in lm.position_lps_mm]
    return {"name": lm.name, "status": lm.status, "position_lps_mm": pos,
            "confidence": round(float(lm.confidence), digits), "reason": lm.reason}
