"""Landmark sets ceph19 / aariz29 and the 2D cephalometric measurements, on hand-made points."""
from __future__ import annotations

import math

import pytest

from pacs_landmarks.landmark_sets import (
    find_landmark,
    landmark_names,
    landmark_sets,
    load_landmark_set,
    set_dimension,
)
from pacs_landmarks.sr_templates.measurements import compute_measurements_2d

ISBI_ORDER = [
    "Sella", "Nasion", "Orbitale", "Porion", "A point", "B point", "Pogonion", "Menton", "Gnathion", "Gonion",
    "Lower incisal incision", "Upper incisal incision", "Upper lip", "Lower lip", "Subnasale",
    "Soft tissue pogonion", "Posterior nasal spine", "Anterior nasal spine", "Articulare",
]


def test_sets_and_dimensions():
    assert {"craniofacial16", "ceph19", "aariz29"} <= set(landmark_sets())
    assert set_dimension("craniofacial16") == 3
    assert set_dimension("ceph19") == 2 and set_dimension("aariz29") == 2
    assert landmark_names("ceph19") == ISBI_ORDER
    assert len(landmark_names("aariz29")) == 29
    # The 19 ISBI landmarks are in aariz29 under the same names and codes.
    a = {lm["name"]: lm for lm in load_landmark_set("aariz29")["landmarks"]}
    for lm in load_landmark_set("ceph19")["landmarks"]:
        assert a[lm["name"]]["code"] == lm["code"]
    # Codes shared with the CT set stay the same.
    ct = {lm["abbreviation"]: lm["code"] for lm in load_landmark_set("craniofacial16")["landmarks"]}
    c19 = {lm["abbreviation"]: lm["code"] for lm in load_landmark_set("ceph19")["landmarks"]}
    for abbr in ("S", "N", "A", "B", "Pog", "Me", "Gn", "ANS", "PNS"):
        assert c19[abbr] == ct[abbr]


def test_find_landmark_by_alias():
    assert find_landmark("Subspinale", "ceph19") == "A point"
    assert find_landmark("a-point", "aariz29") == "A point"
    assert find_landmark("Labrale superius", "aariz29") == "Upper lip"
    assert find_landmark("Soft Tissue Nasion", "aariz29") == "Soft tissue nasion"
    assert find_landmark("Pog`", "aariz29") == "Soft tissue pogonion"
    with pytest.raises(KeyError):
        find_landmark("Basion", "ceph19")


def _pol(origin, r, deg):
    """A point ``r`` mm from ``origin`` at ``deg`` degrees from +x toward +y (x anterior, y down, as an image)."""
    return (origin[0] + r * math.cos(math.radians(deg)), origin[1] + r * math.sin(math.radians(deg)))


# Hand-made face in mm (x = anterior, y = inferior), built so that each measurement has a known value.
S, N = (0.0, 0.0), (70.0, 0.0)
GO = (0.0, 70.0)
FACE_MM = {
    "Sella": S, "Nasion": N,
    "A point": _pol(N, 20, 180 - 82),  # SNA 82
    "B point": _pol(N, 50, 180 - 79),  # SNB 79 -> ANB 3
    "Porion": (-20.0, 25.0), "Orbitale": (50.0, 25.0),  # FH parallel to SN
    "Gonion": GO, "Menton": _pol(GO, 60, 28),  # SN-MP = FMA = 28
    "Pogonion": _pol(N, 100, 180 - 88),  # facial angle 88
    "Gnathion": _pol(S, 120, 60),  # Y-axis 60
    "Articulare": _pol(GO, 50, 28 - 125),  # gonial angle 125
    "Upper incisal incision": (72.0, 90.0), "Lower incisal incision": (69.0, 88.0),  # overjet 3, overbite 2
    "Subnasale": (80.0, 50.0), "Soft tissue pogonion": (80.0, 120.0),
    "Upper lip": (84.0, 70.0), "Lower lip": (79.0, 90.0),  # +4 and -1 mm to Sn-Pog'
    "Posterior nasal spine": (20.0, 45.0), "Anterior nasal spine": (68.0, 45.0),
}
EXPECTED = {
    "SNA angle": 82.0, "SNB angle": 79.0, "ANB angle": 3.0, "SN to mandibular plane angle": 28.0,
    "FH to mandibular plane angle": 28.0, "Facial angle": 88.0, "Y-axis": 60.0, "Gonial angle": 125.0,
    "Overjet": 3.0, "Overbite": 2.0, "Upper lip to Sn-Pog' line": 4.0, "Lower lip to Sn-Pog' line": -1.0,
    "S-N length": 70.0, "N-Me anterior face height": math.dist(N, _pol(GO, 60, 28)),
}


def _to_px(points_mm, spacing, mirror=False, width=3000.0):
    """Image points (column, row) for mm points at (row, column) spacing; ``mirror`` = face looking left."""
    out = {}
    for name, (x, y) in points_mm.items():
        col = x / spacing[1]
        out[name] = ((width - col) if mirror else col, y / spacing[0] + 500.0)
    return out


@pytest.mark.parametrize("spacing,mirror", [((0.1, 0.1), False), ((0.1, 0.1), True), ((0.1, 0.25), False)])
def test_measurements_2d_known_values(spacing, mirror):
    values = {m.name: m for m in compute_measurements_2d(_to_px(FACE_MM, spacing, mirror), "ceph19", spacing)}
    assert set(values) == set(EXPECTED)
    for name, want in EXPECTED.items():
        assert values[name].value == pytest.approx(want, abs=1e-6), name
    assert values["SNA angle"].unit == "deg" and values["S-N length"].unit == "mm"
    assert not values["SNA angle"].outside_range
    assert values["Lower lip to Sn-Pog' line"].outside_range  # -1 mm: range 1..3
    assert not values["Gonial angle"].outside_range  # 125 is inside 123..137


def test_measurements_2d_without_spacing_keeps_angles_only():
    values = {m.name: m.value for m in compute_measurements_2d(_to_px(FACE_MM, (1.0, 1.0)), "ceph19", None)}
    assert "S-N length" not in values and "Overjet" not in values
    assert values["SNA angle"] == pytest.approx(82.0)
    assert values["Facial angle"] == pytest.approx(88.0)


def test_missing_point_skips_only_its_measurements():
    pts = _to_px(FACE_MM, (0.1, 0.1))
    pts["Articulare"] = None
    names = {m.name for m in compute_measurements_2d(pts, "ceph19", (0.1, 0.1))}
    assert "Gonial angle" not in names and "SNA angle" in names
