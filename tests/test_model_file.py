"""The model file: format, validation at load, the shipped demo model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pacs_landmarks.inference.cascade import DEFAULT_STAGES, Cascade
from pacs_landmarks.inference.model import (DEFAULT_MODEL, FORMAT, LandmarkModel, ModelError, make_untrained,
                                            new_metadata, save_model_file)
from pacs_landmarks.landmark_sets import landmark_names


def test_round_trip_keeps_weights_and_metadata(tmp_path):
    path = make_untrained(tmp_path / "m.pt", seed=3)
    raw = torch.load(path, weights_only=True)  # loadable without running pickled code
    assert raw["format"] == FORMAT
    meta = json.loads(raw["metadata"])
    assert meta["landmark_names"] == landmark_names("craniofacial16")
    assert [s["spacing_mm"] for s in meta["stages"]] == [s.spacing_mm for s in DEFAULT_STAGES]
    model = LandmarkModel.load(path, device="cpu")
    assert model.landmark_set == "craniofacial16"
    assert model.version == "0.0.0-untrained" and not model.trained
    for k, v in model.cascade.state_dict().items():
        assert torch.equal(v, raw["weights"][k])


def test_missing_file_fails_at_load(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        LandmarkModel.load(tmp_path / "nope.pt")


@pytest.mark.parametrize("content", [b"", b"not a model at all" * 100])
def test_corrupt_file_fails_at_load(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(ModelError, match="not a readable model file"):
        LandmarkModel.load(path)


def test_truncated_file_fails_at_load(tmp_path):
    good = make_untrained(tmp_path / "m.pt").read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(ModelError):
        LandmarkModel.load(path)


def test_other_torch_file_is_not_a_model(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "x.pt")
    with pytest.raises(ModelError, match="not a pacs-landmarks model"):
        LandmarkModel.load(tmp_path / "x.pt")


def test_other_landmark_set_fails_at_load(tmp_path):
    cascade = Cascade(DEFAULT_STAGES, 16)
    meta = new_metadata()
    meta["landmark_set"] = "no-such-set"  # (ceph19 exists now: it is the 2D cephalogram set)
    save_model_file(tmp_path / "other.pt", cascade, meta)
    with pytest.raises(ModelError, match="unknown landmark set 'no-such-set'"):
        LandmarkModel.load(tmp_path / "other.pt")
    path = make_untrained(tmp_path / "ok.pt")
    with pytest.raises(ModelError, match="not 'ceph19'"):
        LandmarkModel.load(path, landmark_set="ceph19")


def test_a_model_whose_dimension_is_not_its_sets_fails_at_load(tmp_path):
    meta = new_metadata("ceph19")
    assert meta["dim"] == 2 and meta["intensity"]["unit"] == "xray"
    meta["dim"] = 3  # 3D weights labelled as a ceph19 model
    save_model_file(tmp_path / "m.pt", Cascade(DEFAULT_STAGES, 19), meta)
    with pytest.raises(ModelError, match="a 3D model for landmark set 'ceph19', which is 2D"):
        LandmarkModel.load(tmp_path / "m.pt")
    # a 2D model file loads with 2D networks
    m = LandmarkModel.load(make_untrained(tmp_path / "c.pt", landmark_set="ceph19"), device="cpu")
    assert m.dim == 2 and isinstance(m.cascade.nets[0].head, torch.nn.Conv2d)


def test_renamed_landmarks_fail_at_load(tmp_path):
    meta = new_metadata()
    meta["landmark_names"] = list(reversed(meta["landmark_names"]))
    save_model_file(tmp_path / "m.pt", Cascade(DEFAULT_STAGES, 16), meta)
    with pytest.raises(ModelError, match="do not match"):
        LandmarkModel.load(tmp_path / "m.pt")


def test_weights_that_do_not_fit_fail_at_load(tmp_path):
    path = make_untrained(tmp_path / "m.pt")
    raw = torch.load(path, weights_only=True)
    meta = json.loads(raw["metadata"])
    meta["stages"][1]["width"] = 12  # the stored weights are for width 8
    raw["metadata"] = json.dumps(meta)
    torch.save(raw, path)
    with pytest.raises(ModelError, match="do not fit"):
        LandmarkModel.load(path)


def test_shipped_demo_model():
    assert DEFAULT_MODEL.is_file()
    assert DEFAULT_MODEL.stat().st_size <= 30 * 2**20
    model = LandmarkModel.load()  # None -> the shipped file
    assert model.path == DEFAULT_MODEL
    assert model.name == "craniofacial16-demo"
    assert model.landmark_names == landmark_names("craniofacial16")
    assert len(model.stages) >= 3
    spacings = [s.spacing_mm for s in model.stages]
    assert spacings == sorted(spacings, reverse=True) and 3.0 <= spacings[0] <= 4.0 and spacings[-1] <= 0.8
    assert "not for clinical use" in model.metadata["description"]
    assert model.trained and model.version == "2.1.3"
    # 2.1.2: 2.1.1's weights and calibration; the chin points go onto the chin's symmetry plane; 2.1.3: and the
    # Orbitales, as a pair, onto the orbits'
    assert model.metadata["chin_midline"] == ["B point", "Pogonion", "Menton", "Gnathion"]
    assert model.metadata["midplane_pairs"] == ["Orbitale R", "Orbitale L"]
    # 2.0: a presence output, a shape model of the training truth, a calibrated threshold
    assert model.stages[0].presence and model.shape_model is not None
    assert model.shape_model.n_landmarks == 16 and 0.3 <= model.low_confidence < 0.9
    training = model.metadata["training"]
    assert training["cases"] >= 60 and training["pixel_spacing_mm"] == [1.0]
    assert np.isfinite([p.abs().sum().item() for p in model.cascade.parameters()]).all()


def test_damaged_shape_model_fails_at_load(tmp_path):
    import json

    import torch

    payload = torch.load(DEFAULT_MODEL, map_location="cpu", weights_only=True)
    meta = json.loads(payload["metadata"])
    meta["shape_model"]["kind"] = "something-else"
    payload["metadata"] = json.dumps(meta)
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(ModelError, match="shape model"):
        LandmarkModel.load(tmp_path / "bad.pt")


@pytest.mark.parametrize("key, value, message", [
    ("chin_midline", ["Pogonion", "Chin"], "unknown: Chin"),
    ("midplane_pairs", ["Orbitale R", "Orbitale X"], "unknown: Orbitale X"),
    ("midplane_pairs", ["Nasion"], "Nasion has no counterpart"),
])
def test_symmetry_rules_that_do_not_fit_the_set_fail_at_load(tmp_path, key, value, message):
    import json

    import torch

    payload = torch.load(DEFAULT_MODEL, map_location="cpu", weights_only=True)
    meta = json.loads(payload["metadata"])
    meta[key] = value
    payload["metadata"] = json.dumps(meta)
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(ModelError, match=message):
        LandmarkModel.load(tmp_path / "bad.pt")


def test_new_models_get_the_symmetry_rules_of_their_set():
    # CT models the chin points and the Orbitales, a cephalogram (one side of the face) neither
    assert new_metadata()["chin_midline"] == ["B point", "Pogonion", "Menton", "Gnathion"]
    assert new_metadata()["midplane_pairs"] == ["Orbitale R", "Orbitale L"]
    assert "chin_midline" not in new_metadata("ceph19") and "midplane_pairs" not in new_metadata("ceph19")


def test_damaged_shape_prior_fails_at_load(tmp_path):
    import json

    import torch

    payload = torch.load(DEFAULT_MODEL, map_location="cpu", weights_only=True)
    meta = json.loads(payload["metadata"])
    assert meta["calibration"]["shape_prior"]["cases"] >= 16  # the shipped model has one
    for damage, says in ((lambda p: p.update(kind="other"), "shape prior is damaged"),
                         (lambda p: p.update(shape_sd=p["shape_sd"][:15]), "shape prior is damaged"),
                         (lambda p: p.update(shape_sd=[row[:2] for row in p["shape_sd"]],
                                             image_scale=p["image_scale"]), "in 2D")):
        bad = json.loads(json.dumps(meta))
        damage(bad["calibration"]["shape_prior"])
        payload["metadata"] = json.dumps(bad)
        torch.save(payload, tmp_path / "bad.pt")
        with pytest.raises(ModelError, match=says):
            LandmarkModel.load(tmp_path / "bad.pt")


def test_model_1x_without_presence_or_shape_model_still_loads_and_runs(tmp_path):
    """A 1.x file (no presence output, no shape model) loads; statuses fall back to the crop rule."""
    from pacs_landmarks.dicom.volume import Volume
    from pacs_landmarks.inference.cascade import StageConfig
    from pacs_landmarks.inference.model import new_metadata, save_model_file

    stages = tuple(StageConfig(s.name, s.kind, s.size, s.spacing_mm, s.width) for s in DEFAULT_STAGES)
    meta = new_metadata(version="1.9.9")
    meta["training"] = {"cases": 1}
    path = save_model_file(tmp_path / "old.pt", Cascade(stages, 16), meta)
    model = LandmarkModel.load(path, device="cpu")
    assert not model.stages[0].presence and model.shape_model is None
    vol = Volume(np.full((20, 32, 32), -1000.0, np.float32), np.eye(4), "1.2.3", "1.2.4", "1.2.5", [])
    lms = model.predict(vol)
    assert len(lms) == 16 and not any(lm.found for lm in lms)
