"""One X-ray image through ``pipeline.process_image``: every input variant, every spacing source, refusals,
results checked against the synthetic cephalogram's truth and validated with dciodvfy."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from pacs_landmarks.dicom.write import save
from pacs_landmarks.dicom.xray_write import XRayInfo, xray_dataset
from pacs_landmarks.pipeline import NotACephalogram, process_image
from pacs_landmarks.sr_templates.landmark_sr_2d import read_landmark_sr_2d, read_spacing_2d
from pacs_landmarks.sr_templates.measurements import compute_measurements_2d

sys.path.insert(0, str(Path(__file__).parent))
from ceph_helpers import TruthModel  # noqa: E402
from conftest import dcmtk  # noqa: E402

IPS = 0.4  # detector pixel size of the test phantom: a small image (~620 x 530) renders in seconds


@pytest.fixture(scope="session")
def ceph(tmp_path_factory):
    """(image path, truth document) of one synthetic lateral ceph (DX For Presentation, CEPHALOSTAT)."""
    from pacs_landmarks.inference.ceph_phantom import render_ceph, write_ceph

    out = tmp_path_factory.mktemp("ceph")
    path = write_ceph(render_ceph(11, imager_pixel_spacing=IPS), out)
    return path, json.loads((out / "landmarks.json").read_text())


def truth_points(doc) -> dict[str, list[float]]:
    return {lm["name"]: lm["position_px"] for lm in doc["landmarks"]}


def sr_values(sr) -> dict[str, float]:
    """Measurement name (tracking identifier) -> numeric value, from a measurements SR."""
    out = {}
    for group in sr.ContentSequence[-1].ContentSequence:
        items = group.get("ContentSequence", [])
        name = next((str(i.TextValue) for i in items if i.ConceptNameCodeSequence[0].CodeValue == "112039"), None)
        nums = [i for i in items if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeValue not in
                ("111066", "111026")]
        if name and nums and "MeasuredValueSequence" in nums[0]:
            out[name] = float(nums[0].MeasuredValueSequence[0].NumericValue)
    return out


def check_results(results, tmp_path, validate_dicom, truth: dict[str, list[float]], missing=()):
    """Write and validate every object; the SR's points are the truth within 0.01 px; statuses of the others."""
    objects = results.objects()
    assert set(objects) == {"landmark_sr", "measurements_sr", "gsps"}, "a 2D result has no SEG"
    paths = {}
    for kind, ds in objects.items():
        paths[kind] = tmp_path / f"{kind}.dcm"
        ds.save_as(paths[kind], enforce_file_format=True)
        validate_dicom(paths[kind])
    sr = pydicom.dcmread(paths["landmark_sr"])
    back = {lm.name: lm for lm in read_landmark_sr_2d(sr, include_missing=True)}
    for name, p in truth.items():
        if name in missing:
            assert back[name].position_px is None and back[name].status == "not_found", name
        else:
            np.testing.assert_allclose(back[name].position_px, p, atol=0.01, err_msg=name)
    return {k: pydicom.dcmread(p) for k, p in paths.items()}


def test_results_match_the_truth(ceph, tmp_path, validate_dicom):
    path, doc = ceph
    model = TruthModel(path.parent / "landmarks.json", missing=("Articulare",))
    results = process_image(path, model)
    written = check_results(results, tmp_path, validate_dicom, truth_points(doc), missing=("Articulare",))
    # Measurements: the phantom's own values (the same points and spacing), except the one that needs Ar.
    values = sr_values(written["measurements_sr"])
    want = {k: v for k, v in doc["measurements"].items() if k != "Gonial angle"}
    assert set(values) == set(want)
    for name, v in want.items():
        assert values[name] == pytest.approx(v, abs=0.01), name
    omitted = {o.name: o.reason for o in results.omitted}
    assert omitted == {"Gonial angle": "not computed: Articulare not found"}
    # The spacing used and its source are stated in both SRs.
    for kind in ("landmark_sr", "measurements_sr"):
        mm, text = read_spacing_2d(written[kind])
        assert mm == pytest.approx(doc["pixel_spacing_mm"], rel=1e-4)
        assert "Estimated Radiographic Magnification Factor" in text
    # Out-of-range values carry Normality = Abnormal, the others Normal.
    flags = {m.name: m.outside_range for m in results.measurements}
    codes = []
    for item in _walk(written["measurements_sr"].ContentSequence):
        if item.ValueType == "CODE" and item.ConceptNameCodeSequence[0].CodeMeaning == "Normality":
            codes.append(item.ConceptCodeSequence[0].CodeMeaning)
    assert codes.count("Abnormal") == sum(flags.values()) and codes.count("Normal") == len(flags) - sum(flags.values())
    # The tracing: six lines on the TRACING layer, from the truth's points; 18 landmark points.
    gsps = written["gsps"]
    layers = {}
    for ann in gsps.GraphicAnnotationSequence:
        layers.setdefault(ann.GraphicLayer, []).extend(ann.GraphicObjectSequence)
        assert ann.ReferencedImageSequence[0].ReferencedSOPInstanceUID == doc["sop_instance_uid"]
    lines = layers["TRACING"]
    assert len(lines) == 6 and all(g.GraphicType == "POLYLINE" for g in lines)
    t = truth_points(doc)
    np.testing.assert_allclose(np.reshape(lines[0].GraphicData, (2, 2)), [t["Sella"], t["Nasion"]], atol=1e-3)
    texts = [x.UnformattedTextValue for a in gsps.GraphicAnnotationSequence for x in a.get("TextObjectSequence", [])]
    assert any(x.startswith("N-A (SNA ") for x in texts) and any(x.startswith("S-N: ") for x in texts)
    assert len(layers["LANDMARKS"]) == 18
    # The same image again: the same UIDs (a re-run replaces, never duplicates).
    again = process_image(path, model)
    for kind, ds in results.objects().items():
        assert again.objects()[kind].SOPInstanceUID == ds.SOPInstanceUID, kind


def _walk(items):
    for item in items or []:
        yield item
        yield from _walk(item.get("ContentSequence"))


def _variant(ceph, tmp_path, *, flip=False, description="Lateral cephalogram", **kw) -> tuple[Path, dict[str, list[float]]]:
    """The phantom's pixels written again as another kind of image, with its truth in that image's pixels."""
    path, doc = ceph
    src = pydicom.dcmread(path)
    pixels = src.pixel_array
    truth = truth_points(doc)
    if flip:
        pixels = np.ascontiguousarray(pixels[:, ::-1])
        truth = {k: [pixels.shape[1] - c, r] for k, (c, r) in truth.items()}
    if kw.get("photometric") == "MONOCHROME1":
        pixels = ((1 << int(src.BitsStored)) - 1 - pixels).astype(np.uint16)
    info = XRayInfo("TEST^CEPH", "C1", generate_uid(), generate_uid(), generate_uid(),
                    series_description=description)
    args = dict(bits_stored=int(src.BitsStored), imager_pixel_spacing=(IPS, IPS), magnification=1.1,
                facing="left" if flip else "right", view_position="RL" if flip else "LL")
    args.update(kw)
    out = save(xray_dataset(pixels, info, **args), tmp_path / "variant.dcm")
    return out, truth


VARIANTS = {
    "DX presentation": dict(kind="DX"),
    "DX processing": dict(kind="DX-PROCESSING"),
    "CR": dict(kind="CR", pixel_spacing=(0.36, 0.36)),
    "SC film": dict(kind="SC", imager_pixel_spacing=None, magnification=None, nominal_scanned_spacing=(0.36, 0.36),
                    facing=None, view_position=None, info_description="Ceph lat"),
    "MONOCHROME1": dict(kind="DX", photometric="MONOCHROME1"),
    "facing left": dict(kind="DX", flip=True),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_input_variants(ceph, tmp_path, validate_dicom, name):
    kw = dict(VARIANTS[name])
    description = kw.pop("info_description", None)
    path, truth = _variant(ceph, tmp_path, **kw)
    if description:  # scanned film carries no positioner: its description says what it is
        ds = pydicom.dcmread(path)
        ds.SeriesDescription = description
        ds.save_as(path)
    validate_dicom(path)
    model = TruthModel()
    model.add(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID, truth)
    results = process_image(path, model)
    written = check_results(results, tmp_path, validate_dicom, truth)
    if name == "MONOCHROME1":  # the tracing shows the image as its own Presentation LUT Shape does
        assert written["gsps"].PresentationLUTShape == "INVERSE"
    assert results.image.facing == ("left" if name == "facing left" else "right" if name != "SC film" else "unknown")


def test_compressed_input(ceph, tmp_path, validate_dicom):
    plain, truth = _variant(ceph, tmp_path, kind="DX")
    packed = tmp_path / "rle.dcm"
    subprocess.run([dcmtk("dcmcrle"), str(plain), str(packed)], check=True, capture_output=True, timeout=60)
    assert pydicom.dcmread(packed, stop_before_pixels=True).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.5"
    model = TruthModel()
    model.add(pydicom.dcmread(packed, stop_before_pixels=True).SOPInstanceUID, truth)
    results = process_image(packed, model)
    assert results.image.transfer_syntax == "RLE Lossless"
    check_results(results, tmp_path, validate_dicom, truth)


SPACINGS = {
    "fiducial": (dict(pixel_spacing=(0.35, 0.35), pixel_spacing_calibration="FIDUCIAL"), 0.35, "FIDUCIAL"),
    "geometry": (dict(pixel_spacing=(0.33, 0.33), pixel_spacing_calibration="GEOMETRY"), 0.33, "GEOMETRY"),
    "magnification": (dict(magnification=1.25), IPS / 1.25, "Magnification Factor 1.25"),
    "SID/SOD": (dict(magnification=None, source_detector_mm=1650.0, source_patient_mm=1500.0), IPS / 1.1,
                "SID 1650 / SOD 1500"),
    "detector": (dict(magnification=None), IPS, "at the detector"),
    "stated": (dict(kind="CR", imager_pixel_spacing=None, magnification=None, pixel_spacing=(0.31, 0.31)), 0.31,
               "calibration not stated"),
    "film": (dict(kind="SC", imager_pixel_spacing=None, magnification=None, nominal_scanned_spacing=(0.3, 0.3)),
             0.3, "Nominal Scanned"),
}


@pytest.mark.parametrize("name", list(SPACINGS))
def test_spacing_sources_in_the_results(ceph, tmp_path, name):
    kw, mm, source = SPACINGS[name]
    path, truth = _variant(ceph, tmp_path, **kw)
    model = TruthModel()
    model.add(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID, truth)
    results = process_image(path, model)
    got, text = read_spacing_2d(results.measurements_sr)
    assert got == pytest.approx((mm, mm), rel=1e-4) and source in text
    assert read_spacing_2d(results.landmark_sr) == (got, text)
    # Lengths follow the spacing: S-N in mm is the pixel distance times the spacing used.
    sn = np.hypot(*np.subtract(truth["Sella"], truth["Nasion"])) * mm
    assert sr_values(results.measurements_sr)["S-N length"] == pytest.approx(sn, rel=1e-4)


def test_no_spacing_angles_only_and_override(ceph, tmp_path):
    path, truth = _variant(ceph, tmp_path, kind="SC", imager_pixel_spacing=None, magnification=None,
                           facing=None, view_position=None)
    ds = pydicom.dcmread(path)
    ds.SeriesDescription = "Ceph lat"
    ds.save_as(path)
    model = TruthModel()
    model.add(ds.SOPInstanceUID, truth)
    results = process_image(path, model)
    assert read_spacing_2d(results.measurements_sr) == (None, "no pixel spacing: landmarks in image pixels, "
                                                              "no mm measurements")
    units = {m.unit for m in results.measurements}
    assert units == {"deg"}, "without a pixel size only angles are measured"
    lengths = [o for o in results.omitted if o.definition["unit"] == "mm"]
    assert lengths and all(o.reason == "no mm measurements: no pixel spacing" for o in lengths)
    angles = {m.name: m.value for m in compute_measurements_2d(truth, "ceph19", None)}
    assert sr_values(results.measurements_sr) == pytest.approx(angles, abs=1e-3)
    # --pixel-spacing: the user's value, said so.
    over = process_image(path, model, pixel_spacing=0.25)
    got, text = read_spacing_2d(over.measurements_sr)
    assert got == (0.25, 0.25) and "override" in text
    assert "S-N length" in sr_values(over.measurements_sr)


REFUSED = {
    "chest": (dict(body_part="CHEST", view_position="PA", positioner=None), "chest radiograph"),
    "panoramic": (dict(modality="PX", positioner="PANORAMIC"), "panoramic"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_not_a_ceph_is_refused(ceph, tmp_path, name):
    kw, why = REFUSED[name]
    path, truth = _variant(ceph, tmp_path, **kw)
    model = TruthModel()
    model.add(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID, truth)
    with pytest.raises(NotACephalogram, match=why):
        process_image(path, model)


def test_header_silent_image_must_be_confirmed(ceph, tmp_path):
    """No evidence either way in the header: a ceph is confirmed by what the model finds, or refused."""
    path, truth = _variant(ceph, tmp_path, kind="CR", positioner=None, view_position=None, body_part="",
                           description="")
    sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
    model = TruthModel()
    model.add(sop, truth)
    assert process_image(path, model).landmark_sr is not None  # 19 of 19 found: confirmed
    model.add(sop, {k: v for k, v in list(truth.items())[:5]})  # what a chest might give: 5 of 19
    with pytest.raises(NotACephalogram, match="not confirmed as a lateral cephalogram.*found 5 of 19"):
        process_image(path, model)


def test_with_real_2d_models(ceph, tmp_path, validate_dicom):
    """The real cascade (untrained ceph19 weights): every landmark of the set comes back with a status; the
    results are made only from found ones and are valid. A model that reports everything it sees (threshold
    0) exercises found, not found and outside-the-image statuses together."""
    from ceph_helpers import report_all_model

    from pacs_landmarks.inference.model import LandmarkModel, make_untrained
    from pacs_landmarks.landmark_sets import landmark_names

    path, _ = ceph
    for model_file in (make_untrained(tmp_path / "u.pt", landmark_set="ceph19"), report_all_model(tmp_path / "r.pt")):
        model = LandmarkModel.load(model_file, device="cpu")
        results = process_image(path, model)
        assert [lm.name for lm in results.landmarks] == landmark_names("ceph19")
        header = pydicom.dcmread(path, stop_before_pixels=True)
        for lm in results.landmarks:
            assert lm.status in ("found", "not_found", "outside_field_of_view")
            if lm.status == "found":
                assert 0 <= lm.position_px[0] <= header.Columns and 0 <= lm.position_px[1] <= header.Rows
            else:
                assert lm.position_px is None
        if results.nothing_found:
            assert results.objects() == {}, "nothing found: no result objects"
            continue
        out = tmp_path / model_file.stem
        out.mkdir()
        for kind, ds in results.objects().items():
            ds.save_as(out / f"{kind}.dcm", enforce_file_format=True)
            validate_dicom(out / f"{kind}.dcm")
        back = read_landmark_sr_2d(pydicom.dcmread(out / "landmark_sr.dcm"), include_missing=True)
        assert {lm.name: lm.status for lm in back} == {lm.name: lm.status for lm in results.landmarks}


def test_a_3d_model_is_refused_for_an_image(ceph):
    from pacs_landmarks.inference.model import LandmarkModel

    with pytest.raises(ValueError, match="3D series, not in X-ray images"):
        process_image(ceph[0], LandmarkModel.load(device="cpu"))
