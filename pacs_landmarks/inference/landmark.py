"""The landmark type that the cascade produces and the SR / SEG builders consume (no torch import here)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Landmark:
    name: str  # as in the landmark set definition, e.g. "Nasion", "Gonion R"
    position_lps_mm: tuple[float, float, float]
    confidence: float = 1.0  # 0..1
    stage_positions: tuple[tuple[float, float, float], ...] = field(default=())  # per cascade stage, LPS mm
