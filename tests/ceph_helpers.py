"""Helpers for the cephalogram tests: one synthetic ceph per session, its variants, a truth "model".

``TruthModel`` answers ``predict_image`` with the phantom's own landmarks (its ``landmarks.json``, the
truth the image was rendered from), so tests of what is built from landmarks check exact values without
depending on a trained model. Tests of the model path use ``make_untrained(..., landmark_set="ceph19")``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pacs_landmarks.inference.landmark2d import ImageLandmarks, Landmark2D
from pacs_landmarks.landmark_sets import landmark_names


class TruthModel:
    """The landmarks an image was rendered with (``landmarks.json``), as a 2D model's answer."""

    name = "ceph19-truth"
    version = "0.0.0-truth"
    landmark_set = "ceph19"
    dim = 2

    def __init__(self, *truth_files: Path, missing: tuple[str, ...] = ()):
        self.truth: dict[str, dict] = {}
        for f in truth_files:
            doc = json.loads(Path(f).read_text())
            self.truth[doc["sop_instance_uid"]] = {lm["name"]: lm["position_px"] for lm in doc["landmarks"]}
        self.missing = set(missing)

    def add(self, sop_instance_uid: str, points: dict[str, list[float]]) -> None:
        self.truth[sop_instance_uid] = points

    def predict_image(self, image) -> ImageLandmarks:
        points = self.truth.get(image.sop_instance_uid, {})
        spacing = image.spacing.mm if image.spacing is not None else (1.0, 1.0)
        out = ImageLandmarks(pixel_spacing_mm=spacing, spacing_source="truth", spacing_nominal=image.spacing is None,
                             facing=image.facing, facing_source=image.facing_source)
        for name in landmark_names("ceph19"):
            p = points.get(name)
            if p is None or name in self.missing:
                out.append(Landmark2D(name, None, 0.1, "not_found"))
            else:
                out.append(Landmark2D(name, (float(p[0]), float(p[1])), 0.9, "found"))
        return out


def rendered_ceph(folder: Path, seed: int) -> Path:
    """The synthetic lateral ceph of ``seed`` (0.4 mm imager pixels) written into ``folder``, with its truth
    (``landmarks.json``) beside it: the file."""
    from pacs_landmarks.inference.ceph_phantom import render_ceph, write_ceph

    return write_ceph(render_ceph(seed, imager_pixel_spacing=0.4), folder)


@pytest.fixture(scope="module")
def ceph(tmp_path_factory) -> Path:
    """One ceph file for the Orthanc and cluster tests (import this fixture)."""
    return rendered_ceph(tmp_path_factory.mktemp("ceph"), 13)


def report_all_model(path: Path, seed: int = 0) -> Path:
    """An untrained ceph19 model file whose calibrated threshold is 0 and whose presence output says "in the
    image" for every landmark: it reports every landmark as found (random points inside the image). For
    end-to-end tests where only the flow matters: result objects are made and delivered; the points mean
    nothing."""
    import torch

    from pacs_landmarks.inference.model import LandmarkModel, make_untrained, save_model_file

    make_untrained(path, seed=seed, landmark_set="ceph19")
    model = LandmarkModel.load(path, device="cpu")
    with torch.no_grad():  # presence logit +10 whatever the image (the whole-image rule counts every landmark)
        for name, value in model.cascade.named_parameters():
            if "presence" in name:
                value.fill_(10.0 if name.endswith("bias") else 0.0)
    meta = dict(model.metadata, calibration={"low_confidence": 0.0}, name="ceph19-report-all")
    return save_model_file(path, model.cascade, meta)


def write_ceph_variant(src: Path, dst: Path, **changes) -> Path:
    """A copy of an image with new Series/SOP Instance UIDs and the given attributes changed."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(src)
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for k, v in changes.items():
        setattr(ds, k, v)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return dst
