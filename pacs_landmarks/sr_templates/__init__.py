"""DICOM results: landmark SR (TID 1500), measurements SR, landmark SEG, and reading landmark SRs back.

Landmark set definitions live in ``sets/*.json``; heavy imports (highdicom) happen inside the builders.
"""
from __future__ import annotations


def read_landmark_sr(dataset, set_name: str = "craniofacial16", include_missing: bool = False):
    """Landmarks (3D, LPS mm) of a TID 1500 SR (with ``include_missing`` also those it states as not found);
    see :mod:`pacs_landmarks.sr_templates.readback`."""
    from pacs_landmarks.sr_templates.readback import read_landmark_sr as _read

    return _read(dataset, set_name, include_missing)
