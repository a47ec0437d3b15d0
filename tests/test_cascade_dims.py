"""One cascade for 2D and 3D: the 3D path is unchanged by the refactor that made the dimension a parameter,
and 2D stages really work on 2D crops."""
from __future__ import annotations

import numpy as np
import pytest
import torch

# (name, status, confidence, stage positions LPS mm) from the shipped model on main before the 2D refactor
BEFORE_REFACTOR = [
    ('Sella', 'found', 0.718469, [(3.67978, -1.40769, 21.13992), (3.50341, -2.08409, 21.14575), (3.06106, -2.22306, 21.03541)]),
    ('Nasion', 'found', 0.646898, [(-8.35943, -66.89656, 37.5796), (-9.55244, -67.58746, 37.40876), (-9.68896, -67.52972, 37.43902)]),
    ('Orbitale R', 'found', 0.638484, [(-36.46135, -62.82093, 5.19581), (-35.56501, -62.72984, 5.11642), (-35.58858, -62.5334, 5.15216)]),
    ('Orbitale L', 'found', 0.616237, [(26.99287, -68.65797, 17.38081), (26.18409, -71.14493, 17.84137), (25.68351, -71.59969, 17.59562)]),
    ('Porion R', 'found', 0.673945, [(-47.10424, 14.56816, -9.03835), (-46.40232, 13.95508, -9.3873), (-46.23163, 13.99541, -9.54467)]),
    ('Porion L', 'found', 0.689135, [(62.20271, -0.80021, 12.79731), (62.41006, -1.36065, 12.39615), (62.29078, -1.65145, 12.39281)]),
    ('ANS', 'found', 0.70882, [(-1.69777, -79.25161, -11.27457), (-2.26926, -81.16708, -11.50922), (-2.11189, -81.2084, -11.38203)]),
    ('PNS', 'found', 0.679502, [(6.6762, -29.63983, -17.8161), (6.79636, -29.99379, -18.52161), (7.06535, -29.89278, -18.50745)]),
    ('A point', 'found', 0.725049, [(-0.01407, -74.19215, -19.76846), (-0.35608, -75.7664, -19.419), (0.13858, -76.02926, -19.36055)]),
    ('B point', 'found', 0.619227, [(10.10458, -76.3356, -59.89769), (10.31549, -74.56519, -60.51865), (9.51238, -74.22253, -60.32154)]),
    ('Pogonion', 'found', 0.502805, [(11.28031, -79.59727, -70.41574), (11.53137, -78.20881, -69.9723), (11.62942, -78.62856, -69.97115)]),
    ('Menton', 'found', 0.590674, [(12.58825, -71.6379, -85.79062), (13.1584, -71.29041, -85.25778), (13.09841, -70.92519, -85.28318)]),
    ('Gnathion', 'found', 0.588718, [(12.18742, -76.50043, -82.81788), (12.79729, -75.50297, -82.79337), (12.72618, -75.08408, -83.13246)]),
    ('Gonion R', 'found', 0.622618, [(-26.40603, -11.78639, -75.81702), (-26.39567, -13.24319, -75.46677), (-26.20096, -12.931, -75.39377)]),
    ('Gonion L', 'found', 0.646538, [(60.31879, -26.61538, -58.03397), (60.63432, -25.48364, -57.45091), (60.76945, -24.94092, -57.0228)]),
    ('Basion', 'found', 0.654145, [(13.07218, 15.08187, -21.09326), (14.15144, 14.90582, -20.68785), (14.25825, 14.92484, -20.51238)]),
]


def test_3d_model_gives_the_same_points_as_before_the_refactor(tmp_path):
    """Positions of every stage within 1e-4 mm (+ rounding of the record) of those computed on main."""
    from pacs_landmarks.dicom.series import load_series
    from pacs_landmarks.inference.model import LandmarkModel
    from pacs_landmarks.inference.phantom import make_case, write_case

    torch.set_num_threads(1)
    out = write_case(make_case(7301), tmp_path / "c", pixel_spacing=1.5, slice_thickness=2.0, size=160)
    lms = LandmarkModel.load(device="cpu").predict(load_series(sorted(out.glob("*.dcm"))))
    assert [lm.name for lm in lms] == [r[0] for r in BEFORE_REFACTOR]
    for lm, (name, status, conf, stages) in zip(lms, BEFORE_REFACTOR):
        assert lm.status == status, name
        assert lm.confidence == pytest.approx(conf, abs=2e-6), name
        got = np.asarray(lm.stage_positions)
        assert got.shape == (3, 3)
        assert np.abs(got - np.asarray(stages)).max() < 1e-4 + 1e-5, name
