"""The cascade: physical-space sampling, soft-argmax, confidence on non-heads, the shipped model on phantoms,
and the train / evaluate / predict commands."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from pacs_landmarks.dicom.volume import Volume
from pacs_landmarks.inference.model import LOW_CONFIDENCE, LandmarkModel
from pacs_landmarks.inference.sampling import AIR_HU, VolumeSampler, box_points, random_rotations, soft_argmax


def _affine(spacing, origin, flip_rows=False):
    """Array index (k, j, i) -> LPS for axial slices, ``spacing`` in array order (slice, row, column);
    optionally rows running anterior (a flipped y axis)."""
    a = np.zeros((4, 4))
    a[0, 2] = spacing[2]
    a[1, 1] = -spacing[1] if flip_rows else spacing[1]
    a[2, 0] = spacing[0]
    a[:3, 3] = origin
    a[3, 3] = 1
    return a


@pytest.mark.parametrize("spacing,flip", [((1.0, 1.0, 1.0), False), ((5.0, 0.45, 0.45), False),
                                          ((0.625, 0.8, 0.8), True)])
def test_sampling_reads_the_right_place_in_mm(spacing, flip):
    shape = (24, 40, 36)
    arr = np.zeros(shape, np.float32)
    k, j, i = 11, 17, 23
    arr[k, j, i] = 1000.0
    aff = _affine(spacing, (-20.0, 30.0, 100.0), flip)
    s = VolumeSampler(arr, aff)
    lps = aff[:3, :3] @ np.array([k, j, i]) + aff[:3, 3]
    pts = torch.tensor(lps, dtype=torch.float32).view(1, 1, 1, 1, 3)
    assert s.sample(pts, 0.1).item() == pytest.approx(1000.0, abs=1e-2)
    # half a voxel away along x (columns): trilinear gives half the value
    half = torch.tensor(lps + [spacing[2] / 2, 0, 0], dtype=torch.float32).view(1, 1, 1, 1, 3)
    assert s.sample(half, 0.1).item() == pytest.approx(500.0, abs=1e-2)
    far = torch.tensor([500.0, 500.0, 500.0]).view(1, 1, 1, 1, 3)
    assert s.sample(far, 0.1).item() == AIR_HU


def _round_scan(shape, spacing, centre_px, radius_mm, pad=-1000.0, seed=0):
    """Noisy air and a block of bone inside a circle, one padding value outside it, on every slice."""
    rng = np.random.default_rng(seed)
    arr = rng.normal(-1000.0, 15.0, shape).round().clip(-1024, None).astype(np.float32)
    arr[:, shape[1] // 2 - 5:shape[1] // 2 + 5, shape[2] // 2 - 5:shape[2] // 2 + 5] = 900.0
    jj, ii = np.indices(shape[1:])
    outside = np.hypot((jj - centre_px[0]) * spacing[1], (ii - centre_px[1]) * spacing[2]) > radius_mm
    arr[:, outside] = pad
    return arr


@pytest.mark.parametrize("centre,radius,pad", [((40, 44), 28.0, -1000.0),  # a dental CBCT's small cylinder
                                               ((60, 44), 30.0, -1000.0),  # clipped by the last row
                                               ((40, 44), 40.0, -3024.0)])  # a CT's reconstruction circle
def test_reconstruction_circle_is_read_from_the_padding(centre, radius, pad):
    from pacs_landmarks.dicom.volume import reconstruction_circle

    spacing = (1.25, 0.8, 0.8)
    arr = _round_scan((12, 90, 96), spacing, centre, radius, pad)
    circle = reconstruction_circle(arr, spacing[1:])
    assert circle is not None
    assert (circle.row, circle.column) == pytest.approx(centre, abs=0.5)
    assert circle.radius_mm == pytest.approx(radius, abs=0.3)
    # the sampler's depth: the circle's edge, the box's, and outside both
    s = VolumeSampler(arr, _affine(spacing, (0.0, 0.0, 0.0)), circle=circle)
    lps = lambda k, j, i: np.array([i * spacing[2], j * spacing[1], k * spacing[0]])  # noqa: E731
    assert s.depth_mm(lps(6, *centre)) == pytest.approx(min(radius, 5.5 * spacing[0]), abs=0.1)  # the last slice
    inner = lps(6, centre[0], centre[1] + (radius - 3.0) / spacing[2])
    assert s.depth_mm(inner) == pytest.approx(3.0, abs=0.3)
    assert s.depth_mm(lps(6, centre[0], centre[1] + (radius + 5.0) / spacing[2])) < 0
    # a mirrored view (test-time augmentation) sees the same circle, mirrored
    view = s.mirrored(10.0)
    assert view.depth_mm(inner * [-1, 1, 1] + [20.0, 0, 0]) == pytest.approx(s.depth_mm(inner))
    _chords_agree_with_depths(s.region)


def _chords_agree_with_depths(region):
    """``ScanRegion.chord`` (where lines run inside, for the symmetry search) says what ``depth_mm`` says about
    every point of the lines, the axis-parallel ones included."""
    rng = np.random.default_rng(1)
    origins = rng.uniform(-20, 120, (400, 3))
    directions = rng.normal(size=(400, 3))
    directions[:50, 1:] = 0.0  # along x only
    directions[50:100, 0] = 0.0  # in the axial plane
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    t = np.linspace(-150, 150, 301)
    t_in, t_out = region.chord(origins, directions)
    depth = region.depth_mm(origins[:, None] + t[None, :, None] * directions[:, None])
    sure = np.abs(depth) > 1e-6
    assert np.array_equal(((t > t_in[:, None]) & (t < t_out[:, None]))[sure], (depth > 0)[sure])
    assert (depth > 0).any() and (depth <= 0).any()


def test_chords_of_a_plain_box_agree_with_depths():
    from pacs_landmarks.inference.sampling import ScanRegion

    _chords_agree_with_depths(ScanRegion(_affine((1.25, 0.8, 0.7), (3.0, -2.0, 1.0)), (40, 90, 96)))


def test_no_reconstruction_circle_without_padding_or_in_a_head_outline():
    from pacs_landmarks.dicom.volume import reconstruction_circle

    spacing = (1.25, 0.8, 0.8)
    noisy = _round_scan((12, 90, 96), spacing, (40, 44), 200.0)  # the circle holds the whole array
    assert reconstruction_circle(noisy, spacing[1:]) is None
    # an oval "head" in air stored as one exact value everywhere (air clipped, no noise): not a disk
    head = np.full((12, 90, 96), -1024.0, np.float32)
    jj, ii = np.indices((90, 96))
    head[:, ((jj - 45) / 40.0) ** 2 + ((ii - 48) / 30.0) ** 2 <= 1] = 40.0
    assert reconstruction_circle(head, spacing[1:]) is None
    # the empty bands above and below a gantry-tilted series that the reader resampled: straight, not round
    bands = _round_scan((12, 90, 96), spacing, (40, 44), 200.0)
    bands[:, :6] = bands[:, -6:] = -1024.0
    assert reconstruction_circle(bands, spacing[1:]) is None


def test_padding_lines_inside_the_circle_do_not_hide_it():
    """Some scanners leave arcs of padding inside the reconstructed field (the Visible Human Male's CT)."""
    from pacs_landmarks.dicom.volume import reconstruction_circle

    spacing = (1.25, 0.8, 0.8)
    arr = _round_scan((12, 90, 96), spacing, (45, 48), 30.0)
    arr[:, 20:60, 30] = -1000.0  # a line of padding inside, not reaching the array's sides
    circle = reconstruction_circle(arr, spacing[1:])
    assert circle is not None and circle.radius_mm == pytest.approx(30.0, abs=0.3)


def test_boxes_are_in_mm_and_rotations_are_rotations():
    centre = torch.tensor([[10.0, -5.0, 40.0]])
    pts = box_points(centre, 5, 2.0)
    assert torch.allclose(pts[0, 2, 2, 2], centre[0])
    assert torch.allclose(pts[0, 2, 2, 3] - pts[0, 2, 2, 2], torch.tensor([2.0, 0, 0]))  # w -> +x
    assert torch.allclose(pts[0, 3, 2, 2] - pts[0, 2, 2, 2], torch.tensor([0, 0, 2.0]))  # d -> +z
    r = random_rotations(8, 15.0, torch.Generator().manual_seed(1))
    assert torch.allclose(r @ r.transpose(1, 2), torch.eye(3).expand(8, 3, 3), atol=1e-5)
    angles = torch.rad2deg(torch.acos(((r.diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2).clamp(-1, 1)))
    assert float(angles.max()) <= 15.0 + 1e-3 and float(angles.max()) > 1.0


def test_soft_argmax_is_sub_voxel():
    pts = box_points(torch.zeros(1, 3), 15, 1.0)
    target = torch.tensor([0.3, -1.7, 2.2])
    logits = -((pts - target) ** 2).sum(-1) / 2.0  # a Gaussian 1 voxel wide
    pos, var, prob = soft_argmax(logits, pts)
    assert torch.allclose(pos[0], target, atol=0.02)
    assert torch.allclose(var[0], torch.ones(3), atol=0.05)  # 1 voxel^2 along each axis
    assert prob.shape == (1, 15 ** 3)
    assert prob.sum().item() == pytest.approx(1.0, abs=1e-5)


@pytest.fixture(scope="module")
def demo_model():
    return LandmarkModel.load(device="cpu")


def _volume(array, spacing=(2.0, 1.0, 1.0)):
    shape = np.array(array.shape)
    origin = -np.array([spacing[2] * shape[2], spacing[1] * shape[1], spacing[0] * shape[0]]) / 2
    origin[2] += 300.0  # patient positions far from the scanner origin must not matter
    return Volume(array.astype(np.float32), _affine(spacing, origin), "1.2.3", "1.2.4", "1.2.5", [])


def test_empty_volume_gives_no_confident_landmark(demo_model, caplog):
    with caplog.at_level("WARNING"):
        lms = demo_model.predict(_volume(np.full((60, 128, 128), -1000.0)))
    assert "no landmark found: 0 ml of bone" in caplog.text and "not a head CT?" in caplog.text
    assert len(lms) == 16
    assert max(lm.confidence for lm in lms) < LOW_CONFIDENCE
    assert not any(lm.found for lm in lms) and all(lm.position_lps_mm is None for lm in lms)
    assert all(np.isfinite(lm.stage_positions).all() for lm in lms)  # the estimates stay for review


def test_abdomen_sized_soft_tissue_gives_no_confident_landmark(demo_model):
    # 350 x 250 mm soft-tissue ellipse (fat rim, muscle inside), 200 mm long, no bone, with noise
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[0:100, 0:300, 0:400].astype(np.float32)
    r = ((x - 200) / 175) ** 2 + ((y - 150) / 125) ** 2
    arr = np.where(r < 1, -90.0, -1000.0) + np.where(r < 0.8, 130.0, 0.0)
    arr += rng.normal(0, 15, arr.shape)
    lms = demo_model.predict(_volume(arr))
    assert max(lm.confidence for lm in lms) < LOW_CONFIDENCE
    assert not any(lm.found for lm in lms)


def test_chest_like_volume_with_much_bone_gives_no_landmark(demo_model, caplog):
    # Body ellipse with lungs, a spine and rib rings: over a litre of bone, so the "too little bone" rule does
    # not apply and the model itself must not see a head in it.
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[0:150, 0:260, 0:360].astype(np.float32)
    arr = np.where(((x - 180) / 160) ** 2 + ((y - 130) / 115) ** 2 < 1, 40.0, -1000.0)
    for cx in (110, 250):
        arr = np.where(((x - cx) / 55) ** 2 + ((y - 120) / 75) ** 2 < 1, -850.0, arr)
    arr = np.where(((x - 180) / 18) ** 2 + ((y - 215) / 18) ** 2 < 1, 700.0, arr)
    rib = np.abs(np.sqrt(((x - 180) / 150) ** 2 + ((y - 130) / 105) ** 2) - 1.0) < 0.04
    arr = np.where(rib & ((z.astype(int) % 25) < 8), 900.0, arr)
    arr += rng.normal(0, 15, arr.shape)
    with caplog.at_level("WARNING"):
        lms = demo_model.predict(_volume(arr))
    assert not any(lm.found for lm in lms), [(lm.name, round(lm.confidence, 2)) for lm in lms if lm.found]
    # the log says what the model saw: bone enough for a head, nothing it is sure of
    assert "ml of bone, but no landmark confident enough" in caplog.text and "pacs-landmarks review" in caplog.text


def test_predict_returns_every_stage(demo_model):
    arr = np.full((60, 128, 128), -1000.0)
    lms = demo_model.predict(_volume(arr))
    assert [lm.name for lm in lms] == demo_model.landmark_names
    for lm in lms:
        assert len(lm.stage_positions) == len(demo_model.stages)
        assert lm.position_lps_mm is None if not lm.found else lm.stage_positions[-1] == lm.position_lps_mm
        assert 0.0 <= lm.confidence <= 1.0 and lm.status in ("found", "not_found", "outside_field_of_view")


# --- on phantoms (seeds 7000-7999: never used for training; the demo model trains on 1000-1999) ---

def _phantom_volume(seed, tmp_path, size=256, pixel_spacing=1.0, slice_thickness=1.0):
    from pacs_landmarks.dicom.series import load_series
    from pacs_landmarks.inference.phantom import make_case, write_case

    case = make_case(seed)
    out = write_case(case, tmp_path / f"case-{seed}", pixel_spacing=pixel_spacing,
                     slice_thickness=slice_thickness, size=size)
    return case, load_series(sorted(out.glob("*.dcm")))


def test_shipped_model_finds_landmarks_on_fresh_phantoms(demo_model, tmp_path):
    assert demo_model.trained, "the shipped model is the untrained placeholder: run `make train-demo`"
    errors, confidences = [], []
    for seed in (7001, 7002, 7003):
        case, volume = _phantom_volume(seed, tmp_path)
        landmarks = demo_model.predict(volume)
        # the final estimate exists for every landmark; only `found` ones carry a position downstream
        case_errors = [float(np.linalg.norm(np.subtract(lm.stage_positions[-1], case.landmarks[lm.name])))
                       for lm in landmarks]
        found = [(lm.name, err) for lm, err in zip(landmarks, case_errors) if lm.status == "found"]
        assert len(found) >= 14, f"seed {seed}: only {len(found)} of 16 found"
        assert all(err < 4.0 for _, err in found), f"seed {seed}: found but off: {found}"
        errors += case_errors
        confidences += [lm.confidence for lm in landmarks]
    mre = float(np.mean(errors))
    assert mre < 3.0, f"MRE {mre:.2f} mm on fresh phantoms (per landmark: {np.round(errors, 1)})"
    assert float(np.median(confidences)) > LOW_CONFIDENCE


def _run_cli(*args, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "pacs_landmarks.cli", *args], capture_output=True, text=True,
                          timeout=timeout)
    return proc


@pytest.fixture(scope="module")
def tiny_cases(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    proc = _run_cli("phantom", str(out), "--count", "2", "--seed", "7100", "--size", "128",
                    "--pixel-spacing", "2.0", "--slice-thickness", "3.0")
    assert proc.returncode == 0, proc.stderr
    return out


def test_one_case_decoded_by_several_loaders_at_once(tiny_cases, tmp_path):
    """Training and an evaluation (or two evaluations) may read the same case directory at the same time: each
    writes the decoded cache through a file of its own, and all get the case."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    from pacs_landmarks.inference.data import load_case
    from pacs_landmarks.landmark_sets import landmark_names

    case = tmp_path / "case-0001"
    shutil.copytree(tiny_cases / "case-0001", case, ignore=shutil.ignore_patterns(".cache"))
    names = landmark_names("craniofacial16")
    with ThreadPoolExecutor(6) as pool:
        cases = list(pool.map(lambda _: load_case(case, names), range(12)))
    assert all(np.array_equal(c.array, cases[0].array) for c in cases)
    assert [p.name for p in (case / ".cache").iterdir() if p.name.startswith(".tmp")] == []
    assert np.array_equal(load_case(case, names).landmarks, cases[0].landmarks)  # the cache reads back


def test_train_cli_one_epoch_smoke_then_resume(tiny_cases, tmp_path):
    model_path = tmp_path / "m.pt"
    args = ["train", "--data", str(tiny_cases), "--out", str(model_path), "--epochs", "1", "--batch-cases", "2",
            "--val-cases", "0", "--cache", str(tmp_path / "cache"), "-q", "--coverage-weights", "cbct-small=0.5"]
    proc = _run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert any((tmp_path / "cache").rglob("volume-*.npz"))  # decoded once, cached
    model = LandmarkModel.load(model_path)
    assert model.trained and model.metadata["training"]["cases"] == 2
    assert model.metadata["training"]["config"]["coverage_weights"] == {"cbct-small": 0.5}  # the recipe is recorded
    assert model.metadata["training"]["epochs_done"] == 1
    # resuming to 2 epochs continues from the checkpoint (epoch 2 only)
    proc = _run_cli(*[a if a != "1" else "2" for a in args], "--resume")
    assert proc.returncode == 0, proc.stderr
    assert LandmarkModel.load(model_path).metadata["training"]["epochs_done"] == 2


def test_train_cli_reports_bad_data(tmp_path):
    proc = _run_cli("train", "--data", str(tmp_path), "--out", str(tmp_path / "m.pt"))
    assert proc.returncode == 2 and "no cases" in proc.stderr
    for bad, says in (("cbct-huge=0.2", "unknown scan range 'cbct-huge'"), ("mandible=-1", "must be >= 0"),
                      ("mandible", "must be >= 0")):
        proc = _run_cli("train", "--data", str(tmp_path), "--out", str(tmp_path / "m.pt"), "--coverage-weights", bad)
        assert proc.returncode == 2 and says in proc.stderr, proc.stderr


def test_evaluate_cli_tables_json_and_plots(tiny_cases, tmp_path):
    proc = _run_cli("evaluate", "--data", str(tiny_cases), "--json", str(tmp_path / "r.json"),
                    "--plots", str(tmp_path / "plots"), "--cache", str(tmp_path / "cache"), "-q")
    assert proc.returncode == 0, proc.stderr
    assert "| global |" in proc.stdout and "| fine |" in proc.stdout and "| Menton |" in proc.stdout
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["cases"] == 2 and result["stages"] == ["global", "local", "fine"]
    final = result["overall"]["fine"]
    assert final["n"] == 32 and set(final["sdr"]) == {"2", "2.5", "3", "4"}
    assert math.isfinite(final["mre"])
    # presence misses split by direction, adding up to the share that is wrong
    st = result["status"]
    misses = st["presence_misses_beyond_5mm"]
    wrong = round((1 - st["presence_correct_beyond_5mm"]) * st["presence_n_beyond_5mm"])
    assert misses["in_scan_called_outside"] + misses["outside_called_in_scan"] == wrong
    # found more than 5 mm off, from the raw errors and statuses
    err = np.array(result["errors"], float)[:, -1]
    found = np.array([c["statuses"] for c in result["per_case"]]) == "found"
    assert st["found_beyond_5mm"] == int((found & (np.nan_to_num(err) > 5.0)).sum())
    assert "| found more than 5 mm off |" in proc.stdout
    # found points landmark by landmark add up to all found points
    per = st["found_error_per_landmark"]
    assert list(per) == result["landmarks"]
    assert sum(e["n"] for e in per.values()) == st["found_error"]["n"] == int((found & np.isfinite(err)).sum())
    assert all(f"| found {n} |" in proc.stdout for n, e in per.items() if e["n"])
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert len(pngs) == 17 and "Gonion_R.png" in pngs


def test_evaluate_cli_fits_the_shape_prior_then_the_threshold(tiny_cases, tmp_path):
    proc = _run_cli("evaluate", "--data", str(tiny_cases), "--fit-shape-prior", "-q")
    assert proc.returncode == 2 and "--fit-shape-prior needs --calibrate" in proc.stderr
    out = tmp_path / "cal.pt"
    proc = _run_cli("evaluate", "--data", str(tiny_cases), "--calibrate", str(out), "--fit-shape-prior",
                    "--cache", str(tmp_path / "cache"), "-q")
    assert proc.returncode == 0, proc.stderr
    assert "shape prior on" in proc.stdout and "calibrated threshold" in proc.stdout
    model = LandmarkModel.load(out, device="cpu")
    cal = model.metadata["calibration"]
    # two cases are too few to measure a landmark's variances (ShapePrior.MIN_CASES): the image alone, said so
    assert cal["shape_prior"]["cases"] == 2 and model.shape_prior is not None
    assert not model.shape_prior.image_scale.any() and 0.3 <= cal["low_confidence"] <= 0.95
    # a later threshold-only calibration keeps the prior; --shape-prior off leaves it out
    proc = _run_cli("evaluate", "--data", str(tiny_cases), "--model", str(out), "--calibrate", str(out),
                    "--cache", str(tmp_path / "cache"), "-q")
    assert proc.returncode == 0 and LandmarkModel.load(out, device="cpu").shape_prior is not None
    proc = _run_cli("evaluate", "--data", str(tiny_cases), "--model", str(out), "--shape-prior", "off",
                    "--calibrate", str(tmp_path / "plain.pt"), "--cache", str(tmp_path / "cache"), "-q")
    assert proc.returncode == 0 and "shape prior off" in proc.stdout
    assert LandmarkModel.load(tmp_path / "plain.pt", device="cpu").shape_prior is None


def test_predict_cli_table_and_json(tiny_cases):
    case = sorted(p for p in tiny_cases.iterdir() if p.is_dir())[0]
    proc = _run_cli("predict", str(case))
    assert proc.returncode == 0, proc.stderr
    assert "Sella" in proc.stdout and "status" in proc.stdout and "conf" in proc.stdout
    proc = _run_cli("predict", str(case), "--json")
    doc = json.loads(proc.stdout)
    assert [lm["name"] for lm in doc["landmarks"]][:2] == ["Sella", "Nasion"]
    assert len(doc["landmarks"]) == 16 and all("status" in lm for lm in doc["landmarks"])
    assert all((lm["position_lps_mm"] is None) == (lm["status"] != "found") for lm in doc["landmarks"])
    truth = json.loads((case / "landmarks.json").read_text())
    assert doc["series_instance_uid"] == truth["series_instance_uid"]


def test_predict_cli_bad_model(tiny_cases, tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"junk")
    proc = _run_cli("predict", str(tiny_cases), "--model", str(tmp_path / "bad.pt"))
    assert proc.returncode == 2 and "not a readable model file" in proc.stderr


def test_a_device_this_machine_lacks_is_a_clear_error(tiny_cases, demo_model):
    """``--device`` of evaluate and predict: a clear message and exit 2, not torch's assertion."""
    missing = f"cuda:{torch.cuda.device_count()}"  # one more than there are (cuda:0 here, with no GPU)
    case = sorted(p for p in tiny_cases.iterdir() if p.is_dir())[0]
    for args in (("evaluate", "--data", str(tiny_cases), "-q"), ("predict", str(case))):
        proc = _run_cli(*args, "--device", missing)
        assert proc.returncode == 2 and f"device '{missing}': this machine has" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    proc = _run_cli("evaluate", "--data", str(tiny_cases), "-q", "--device", "toaster")
    assert proc.returncode == 2 and "device 'toaster'" in proc.stderr and "Traceback" not in proc.stderr
    model = LandmarkModel(demo_model.cascade, demo_model.metadata, demo_model.device, demo_model.path, autocast=True)
    assert not demo_model.autocast and model.with_tta(None).autocast and model.with_shape_prior(None).autocast


def test_truth_from_a_landmark_sr_when_there_is_no_json(tiny_cases, tmp_path):
    """A case may carry its truth as a TID 1500 SR (here: the SR that `infer` writes) instead of JSON."""
    import shutil

    from pacs_landmarks.inference.data import load_case
    from pacs_landmarks.landmark_sets import landmark_names

    src = sorted(p for p in tiny_cases.iterdir() if p.is_dir())[0]
    proc = _run_cli("infer", str(src), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    for f in src.glob("*.dcm"):
        shutil.copy(f, case_dir / f.name)
    shutil.copy(tmp_path / "out" / "landmarks-sr.dcm", case_dir / "landmarks-sr.dcm")
    case = load_case(case_dir, landmark_names(), cache_dir=tmp_path / "cache")
    predicted = json.loads((tmp_path / "out" / "landmarks.json").read_text())["landmarks"]
    assert case.array.ndim == 3 and case.landmarks.shape == (16, 3)
    assert any(item["status"] == "found" for item in predicted)
    for i, item in enumerate(predicted):
        if item["status"] == "found":
            assert np.allclose(case.landmarks[i], item["position_lps_mm"], atol=0.01)
        else:  # stated in the SR as not found: no truth for it
            assert np.isnan(case.landmarks[i]).all()
