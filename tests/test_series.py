"""load_series / group_series on real DICOM files: pydicom-data CT, dcmtk-transcoded copies, built series."""
from __future__ import annotations

import copy
import math
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import dcmtk
from pydicom.data import get_testdata_file
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSNearLossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from scipy.ndimage import map_coordinates

from pacs_landmarks.dicom.series import SeriesError, group_series, load_series, plan_series

CT_SMALL = get_testdata_file("CT_small.dcm")  # 128x128 CT Image Storage, explicit VR little endian


# ---------------------------------------------------------------------------------------------- builders


def ct_series(count: int = 5, gap: float = 2.5, *, series_uid: str | None = None) -> list[pydicom.Dataset]:
    """``count`` CT slices made from the real CT_small file; slice k holds CT_small + 10*k stored values."""
    base = pydicom.dcmread(CT_SMALL)
    pixels = base.pixel_array.astype(np.int16)
    series_uid = series_uid or generate_uid()
    out = []
    for k in range(count):
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = count - k  # deliberately opposite to the spatial order
        x, y, z = (float(v) for v in base.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + gap * k]
        ds.PixelData = (pixels + 10 * k).astype(pixels.dtype).tobytes()
        out.append(ds)
    return out


def stored(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def write(datasets, folder: Path, names: list[str] | None = None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        path = folder / (names[i] if names else f"{i:04d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------- order, HU


def test_sorts_by_position_not_instance_number_or_file_name(tmp_path):
    series = ct_series(6)
    expected = [stored(ds) for ds in series]
    shuffled = series[:]
    random.Random(3).shuffle(shuffled)
    # File names sort the opposite way to the positions, Instance Numbers too.
    names = [f"{100 - int(round((float(ds.ImagePositionPatient[2]) - float(series[0].ImagePositionPatient[2])) / 2.5)):03d}.dcm"
             for ds in shuffled]
    paths = write(shuffled, tmp_path, names)
    vol = load_series(paths)
    assert vol.shape == (6, 128, 128)
    assert vol.array.dtype == np.float32
    for k in range(6):
        np.testing.assert_array_equal(vol.array[k], expected[k])
    assert [s.sop_instance_uid for s in vol.slice_sources] == [ds.SOPInstanceUID for ds in series]
    assert not vol.resampled and vol.excluded == []
    np.testing.assert_allclose(vol.spacing, (2.5, 0.661468, 0.661468))
    # index (k, j, i) -> LPS: i runs along the row direction (+x here), j down the columns (+y), k along +z.
    first = np.array([float(v) for v in series[0].ImagePositionPatient])
    np.testing.assert_allclose(vol.index_to_lps([2, 3, 4]), first + [4 * 0.661468, 3 * 0.661468, 2 * 2.5])
    assert vol.series_instance_uid == series[0].SeriesInstanceUID
    assert vol.frame_of_reference_uid == series[0].FrameOfReferenceUID
    assert all("PixelData" not in h for h in vol.source_headers) and len(vol.source_headers) == 6


def test_hu_uses_rescale_slope_and_intercept():
    series = ct_series(3)
    for ds in series:
        ds.RescaleSlope, ds.RescaleIntercept = 2, -1000
    vol = load_series(series)
    raw = series[1].pixel_array.astype(np.float32)
    np.testing.assert_array_equal(vol.array[1], raw * 2 - 1000)


def test_datasets_passed_in_are_not_modified():
    series = ct_series(3)
    load_series(series)
    assert all("PixelData" in ds for ds in series)


# ---------------------------------------------------------------------------------------------- compressed


TRANSCODERS = {
    "JPEG Lossless SV1 (dcmcjpeg)": (JPEGLosslessSV1, ["dcmcjpeg", "--encode-lossless-sv1"]),
    "JPEG Lossless P14 (dcmcjpeg)": (JPEGLossless, ["dcmcjpeg", "--encode-lossless", "--selection-value", "6"]),
    "JPEG-LS lossless (dcmcjpls)": (JPEGLSLossless, ["dcmcjpls", "--encode-lossless"]),
    "RLE (dcmcrle)": (RLELossless, ["dcmcrle"]),
    "Deflate (dcmconv)": (DeflatedExplicitVRLittleEndian, ["dcmconv", "--write-xfer-deflated"]),
}


@pytest.mark.parametrize("name", list(TRANSCODERS))
def test_compressed_series_transcoded_by_dcmtk(tmp_path, name):
    syntax, command = TRANSCODERS[name]
    command = [dcmtk(command[0]), *command[1:]]
    series = ct_series(3)
    plain = write(series, tmp_path / "plain")
    packed = []
    for path in plain:
        out = tmp_path / "packed" / path.name
        out.parent.mkdir(exist_ok=True)
        subprocess.run([*command, str(path), str(out)], check=True, capture_output=True, timeout=60)
        assert pydicom.dcmread(out, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
        packed.append(out)
    np.testing.assert_array_equal(load_series(packed).array, load_series(plain).array)


def test_jpeg_ls_near_lossless_series(tmp_path):
    series = ct_series(3)
    for ds in series:  # dcmcjpls encodes near-lossless only for unsigned pixels; these stored values are >= 0
        assert ds.pixel_array.min() >= 0
        ds.PixelRepresentation = 0
    plain = write(series, tmp_path / "plain")
    packed = []
    for path in plain:
        out = tmp_path / f"nl-{path.name}"
        subprocess.run([dcmtk("dcmcjpls"), "--encode-nearlossless", "--max-deviation", "2", str(path), str(out)],
                       check=True, capture_output=True, timeout=60)
        assert pydicom.dcmread(out, stop_before_pixels=True).file_meta.TransferSyntaxUID == JPEGLSNearLossless
        packed.append(out)
    diff = np.abs(load_series(packed).array - load_series(plain).array)
    assert diff.max() <= 2 and diff.mean() > 0  # lossy within the requested deviation, and really decoded


def test_jpeg2000_series(tmp_path):
    """Encoded by pylibjpeg-openjpeg through pydicom, decoded by the loader."""
    series = ct_series(3)
    expected = load_series(series).array
    for ds in series:
        ds.compress(JPEG2000Lossless)
    np.testing.assert_array_equal(load_series(write(series, tmp_path)).array, expected)


@pytest.mark.parametrize(
    "compressed, reference",
    [
        ("693_J2KR.dcm", "693_UNCR.dcm"),  # real CT, JPEG 2000 lossless
        ("693_J2KI.dcm", "693_UNCI.dcm"),  # real CT, JPEG 2000 lossy; UNCI holds the decoded reference
        ("MR_small_RLE.dcm", "MR_small.dcm"),
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
        ("emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm"),
        ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),
    ],
)
def test_decoder_on_real_compressed_files(compressed, reference):
    from pacs_landmarks.dicom.series import _decode

    got = _decode(pydicom.dcmread(get_testdata_file(compressed)), compressed)
    want = pydicom.dcmread(get_testdata_file(reference)).pixel_array
    np.testing.assert_array_equal(got, want.reshape(got.shape))


def test_real_jpeg_lossless_ct_decodes():
    from pacs_landmarks.dicom.series import _decode

    ds = pydicom.dcmread(get_testdata_file("bad_sequence.dcm"))  # real CT, JPEG Lossless SV1 (1.2.840.10008.1.2.4.70)
    assert ds.file_meta.TransferSyntaxUID == JPEGLosslessSV1
    arr = _decode(ds, "bad_sequence.dcm")
    assert arr.shape == (1, 512, 512) and arr.std() > 10


def test_undecodable_pixel_data_is_a_series_error(tmp_path):
    series = ct_series(3)
    for ds in series:
        ds.compress(JPEG2000Lossless)
    frame = series[1].PixelData
    series[1].PixelData = frame[: len(frame) // 3]  # truncated codestream
    with pytest.raises(SeriesError, match="cannot decode pixel data"):
        load_series(write(series, tmp_path))


# ---------------------------------------------------------------------------------------------- enhanced CT


def test_enhanced_ct_real_file():
    path = get_testdata_file("eCT_Supplemental.dcm")  # 2 frames, stored in reverse spatial order
    vol = load_series([path], min_slices=2)
    ds = pydicom.dcmread(path)
    assert vol.shape == (2, 512, 512)
    # Frame 2 lies at z=-159, frame 1 at z=-149: the volume starts with frame 2.
    assert [s.frame_number for s in vol.slice_sources] == [2, 1]
    np.testing.assert_array_equal(vol.array[0], ds.pixel_array[1].astype(np.float32) - 1024)
    np.testing.assert_allclose(vol.spacing, (10.0, 0.388672, 0.388672))
    with pytest.raises(SeriesError, match="only 2 usable CT slice"):
        load_series([path])


def enhanced_from(series) -> pydicom.Dataset:
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    return LegacyConvertedEnhancedCTImage(
        series, series_instance_uid=generate_uid(), series_number=99, sop_instance_uid=generate_uid(), instance_number=1
    )


def test_legacy_converted_enhanced_ct_matches_single_frame(tmp_path):
    series = ct_series(5)
    expected = load_series(series)
    shuffled = series[:]
    random.Random(1).shuffle(shuffled)
    multi = enhanced_from(shuffled)
    path = tmp_path / "enhanced.dcm"
    multi.save_as(path)
    vol = load_series([path])
    np.testing.assert_array_equal(vol.array, expected.array)
    np.testing.assert_allclose(vol.affine, expected.affine)
    assert all(s.sop_instance_uid == multi.SOPInstanceUID for s in vol.slice_sources)


def test_enhanced_ct_per_frame_rescale():
    series = ct_series(4)
    multi = enhanced_from(series)
    shared = multi.SharedFunctionalGroupsSequence[0]
    if "PixelValueTransformationSequence" in shared:
        del shared.PixelValueTransformationSequence
    # Per-frame rescale overrides: frame f gets intercept -1000 - f.
    for f, group in enumerate(multi.PerFrameFunctionalGroupsSequence):
        item = pydicom.Dataset()
        item.RescaleSlope, item.RescaleIntercept, item.RescaleType = 1, -1000 - f, "HU"
        group.PixelValueTransformationSequence = [item]
    vol = load_series([multi])
    frames = multi.pixel_array
    order = [s.frame_number - 1 for s in vol.slice_sources]
    for k, f in enumerate(order):
        np.testing.assert_array_equal(vol.array[k], frames[f].astype(np.float32) - 1000 - f)


# ---------------------------------------------------------------------------------------------- exclusions


def reasons(vol) -> dict[str, str]:
    return {e.source: e.reason for e in vol.excluded}


def test_each_exclusion_reason(tmp_path):
    series = ct_series(5)
    keep = [ds.SOPInstanceUID for ds in series]
    extra = {}

    loc = copy.deepcopy(series[0])
    loc.SOPInstanceUID, loc.ImageType = generate_uid(), ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    loc.ImagePositionPatient = [0, 0, 500]
    extra["localizer"] = loc

    sag = copy.deepcopy(series[1])
    sag.SOPInstanceUID, sag.ImageOrientationPatient = generate_uid(), [0, 1, 0, 0, 0, -1]
    extra["orientation"] = sag

    small = copy.deepcopy(series[2])
    small.SOPInstanceUID, small.Rows, small.Columns = generate_uid(), 64, 64
    small.PixelData = series[2].pixel_array[:64, :64].copy().tobytes()
    small.ImagePositionPatient = [0, 0, 7.7]
    extra["size"] = small

    sc = copy.deepcopy(series[3])
    sc.SOPInstanceUID, sc.SOPClassUID = generate_uid(), "1.2.840.10008.5.1.4.1.1.7"  # Modality stays CT
    sc.file_meta.MediaStorageSOPClassUID = sc.SOPClassUID
    extra["secondary capture"] = sc

    dup = copy.deepcopy(series[4])
    dup.SOPInstanceUID, dup.InstanceNumber = generate_uid(), 99
    extra["duplicate position"] = dup

    nogeo = copy.deepcopy(series[0])
    nogeo.SOPInstanceUID = generate_uid()
    del nogeo.ImagePositionPatient
    extra["no image plane geometry"] = nogeo

    sr = pydicom.Dataset()
    sr.SOPClassUID, sr.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.11", generate_uid()  # Basic Text SR
    sr.Modality, sr.SeriesInstanceUID, sr.StudyInstanceUID = "SR", series[0].SeriesInstanceUID, series[0].StudyInstanceUID
    extra["non-image object"] = sr

    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    extra["not a CT image"] = mr

    paths = write(series, tmp_path / "ct")
    junk = tmp_path / "notes.txt"
    junk.write_text("not dicom")
    # The same file twice: a duplicate instance, not a second slice.
    items = [*paths, paths[0], junk, *extra.values()]
    vol = load_series(items)
    assert [s.sop_instance_uid for s in vol.slice_sources] == keep
    got = reasons(vol)
    for word, ds in extra.items():
        assert word.lower() in got[ds.SOPInstanceUID].lower(), (word, got[ds.SOPInstanceUID])
    assert "not a readable dicom file" in got[str(junk)].lower()
    assert "duplicate instance" in [e.reason for e in vol.excluded if e.source == str(paths[0])][0]
    assert len(vol.excluded) == len(extra) + 2


def test_localizer_frame_in_enhanced_ct():
    multi = enhanced_from(ct_series(4))
    group = multi.PerFrameFunctionalGroupsSequence[0]
    item = pydicom.Dataset()
    item.FrameType = ["ORIGINAL", "PRIMARY", "LOCALIZER", "NONE"]
    group.CTImageFrameTypeSequence = [item]
    vol = load_series([multi])
    assert vol.shape[0] == 3
    assert any("localizer frame" in e.reason for e in vol.excluded)


def test_largest_consistent_group_wins():
    main = ct_series(5)
    other = ct_series(3, series_uid=main[0].SeriesInstanceUID)
    for ds in other:
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal
    vol = load_series(other + main)
    assert vol.shape[0] == 5
    assert sorted(e.source for e in vol.excluded) == sorted(ds.SOPInstanceUID for ds in other)


# ---------------------------------------------------------------------------------------------- errors


def test_too_few_slices():
    with pytest.raises(SeriesError, match="only 2 usable CT slice"):
        load_series(ct_series(2))


def test_gap_too_large():
    series = ct_series(8, gap=1.0)
    del series[3:7]  # a 5 mm hole in a 1 mm series: more than 3 x the median gap
    with pytest.raises(SeriesError, match="gap of 5.00 mm"):
        load_series(series)


def test_gap_over_10_mm_even_when_slices_are_thick():
    series = ct_series(6, gap=5.0)
    del series[2:4]  # 15 mm: 3 x 5 mm but over the 10 mm absolute limit
    with pytest.raises(SeriesError, match="exceeds the limit of 10.00 mm"):
        load_series(series)


def test_one_missing_slice_is_interpolated():
    series = ct_series(8, gap=1.0)
    del series[4]  # 2 mm gap in a 1 mm series
    vol = load_series(series)
    assert vol.resampled and vol.shape[0] == 8
    np.testing.assert_allclose(vol.array[4], (stored(series[3]) + stored(series[4])) / 2, atol=1e-3)


def test_no_ct_at_all():
    files = [get_testdata_file(n) for n in ("MR_small.dcm", "emri_small.dcm")]
    with pytest.raises(SeriesError, match="no CT image among 2 input"):
        load_series(files)


def test_nothing_at_all():
    with pytest.raises(SeriesError, match="no CT image"):
        load_series([])


def test_mixed_series_uids():
    with pytest.raises(SeriesError, match="2 different series"):
        load_series(ct_series(3) + ct_series(3))


# ---------------------------------------------------------------------------------------------- geometry


BLOBS = np.array([[-20.0, -30.0, -60.0], [15.0, 10.0, -40.0], [0.0, 25.0, -75.0], [30.0, -10.0, -55.0]])
SIGMA = 5.0


def field_hu(points: np.ndarray) -> np.ndarray:
    """An analytic 'head': Gaussian blobs (1000 HU) at known LPS points on -1000 HU air."""
    d2 = ((points[..., None, :] - BLOBS) ** 2).sum(-1)
    return -1000 + 2000 * np.exp(-d2 / (2 * SIGMA**2)).sum(-1)


def analytic_series(tilt_deg=0.0, gaps=None, order="ascending", n=60, size=96, pixel=1.2, gap=1.5):
    """CT slices sampling ``field_hu``; gantry tilt rotates the image plane about the row (x) axis while the
    table moves along z, as a tilted CT acquisition does (PS3.3 C.7.6.2.1.1)."""
    base = pydicom.dcmread(CT_SMALL, stop_before_pixels=True)
    t = math.radians(tilt_deg)
    row_dir = np.array([1.0, 0.0, 0.0])
    col_dir = np.array([0.0, math.cos(t), -math.sin(t)])
    zs = np.cumsum([0.0, *(gaps if gaps is not None else [gap] * (n - 1))]) - 100.0
    series_uid, for_uid = generate_uid(), generate_uid()
    jj, ii = np.mgrid[0:size, 0:size]
    out = []
    for k, z in enumerate(zs):
        origin = np.array([-size * pixel / 2, 0, z]) - (size * pixel / 2) * col_dir  # plane centred on (0, 0, z)
        pts = origin + ii[..., None] * pixel * row_dir + jj[..., None] * pixel * col_dir
        hu = field_hu(pts)
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID, ds.FrameOfReferenceUID, ds.SOPInstanceUID = series_uid, for_uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.InstanceNumber = k + 1
        ds.Rows = ds.Columns = size
        ds.PixelSpacing = [pixel, pixel]
        ds.ImageOrientationPatient = [*row_dir, *(round(c, 10) for c in col_dir)]
        ds.ImagePositionPatient = [round(float(c), 6) for c in origin]
        ds.GantryDetectorTilt = tilt_deg
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.round(hu + 1024).astype(np.int16).tobytes()
        ds["PixelData"].VR = "OW"
        out.append(ds)
    if order == "reversed":
        out.reverse()
    elif order == "shuffled":
        random.Random(7).shuffle(out)
    return out


def peak_lps(vol, near: np.ndarray, radius_mm=8.0) -> np.ndarray:
    """HU-weighted centroid of the blob around ``near``, in LPS."""
    centre = vol.lps_to_index(near)
    r = np.ceil(radius_mm / np.array(vol.spacing)).astype(int)
    lo = np.maximum(np.floor(centre).astype(int) - r, 0)
    hi = np.minimum(np.floor(centre).astype(int) + r + 1, vol.shape)
    box = vol.array[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] + 1000
    box = np.where(box > 600, box, 0)  # the blob's core only; neighbours stay out
    idx = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1)
    return vol.index_to_lps((idx * box[..., None]).sum((0, 1, 2)) / box.sum())


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(order="reversed"),
        dict(order="shuffled"),
        dict(tilt_deg=15.0, order="shuffled"),
        dict(tilt_deg=-20.0),
        dict(gaps=[1.5] * 20 + [3.0] + [1.0] * 15 + [2.0] * 12 + [1.5] * 10),
        dict(tilt_deg=12.0, gaps=[1.5] * 20 + [3.0] + [1.0] * 15 + [2.0] * 12 + [1.5] * 10, order="reversed"),
    ],
    ids=["straight", "reversed", "shuffled", "tilt15-shuffled", "tilt-20", "uneven-gaps", "tilt-gaps-reversed"],
)
def test_landmarks_map_to_the_same_content(options):
    vol = load_series(analytic_series(**options))
    tilted = bool(options.get("tilt_deg"))
    assert vol.resampled == (tilted or "gaps" in options)
    assert vol.gantry_tilt_deg == pytest.approx(abs(options.get("tilt_deg", 0.0)), abs=0.01)
    half_voxel = 0.5 * min(vol.spacing)
    for blob in BLOBS:
        found = peak_lps(vol, blob)
        assert np.linalg.norm(found - blob) < half_voxel, (blob, found, vol.spacing)
    # HU on the blobs' flanks (one sigma out along each axis, where the field is steepest and its curvature
    # along that axis is zero): a shift of 0.5 voxel would change them by > 100 HU; interpolation error < 50 HU.
    flanks = (BLOBS[:, None, :] + SIGMA * np.concatenate([np.eye(3), -np.eye(3)])[None]).reshape(-1, 3)
    got = map_coordinates(vol.array, vol.lps_to_index(flanks).T, order=1)
    np.testing.assert_allclose(got, field_hu(flanks), atol=50)
    # The output grid is orthogonal, with axes along the row/column directions and their normal.
    axes = vol.affine[:3, :3] / np.array(vol.spacing)
    np.testing.assert_allclose(axes.T @ axes, np.eye(3), atol=1e-9)


@pytest.mark.parametrize("shift", [(-40.3, 0.0), (3.7, -2.2), (10.0, 0.25), (0.0, 0.0), (-600.5, 3.0)])
def test_translate_matches_scipy(shift):
    from scipy.ndimage import affine_transform

    from pacs_landmarks.dicom.series import translate

    image = np.random.default_rng(0).normal(size=(64, 48)).astype(np.float32)
    want = affine_transform(image, np.ones(2), offset=shift, output_shape=(80, 50), order=1,
                            mode="grid-constant", cval=-5.0)
    np.testing.assert_allclose(translate(image, shift, (80, 50), -5.0), want, atol=1e-5)


def test_resampled_slices_reference_the_nearest_real_image():
    series = analytic_series(tilt_deg=15.0, gaps=[1.5] * 10 + [3.0] + [1.0] * 10)
    by_uid = {ds.SOPInstanceUID: ds for ds in series}
    vol = load_series(series)
    normal = vol.affine[:3, 0] / np.linalg.norm(vol.affine[:3, 0])
    source_d = sorted(np.array([float(v) for v in ds.ImagePositionPatient]) @ normal for ds in series)
    for k, src in enumerate(vol.slice_sources):
        d = vol.index_to_lps([k, 0, 0]) @ normal
        used = np.array([float(v) for v in by_uid[src.sop_instance_uid].ImagePositionPatient]) @ normal
        assert abs(used - d) == pytest.approx(min(abs(s - d) for s in source_d), abs=1e-6)


def test_plan_from_headers_matches_load(tmp_path):
    paths = write(analytic_series(tilt_deg=10.0, n=20), tmp_path)
    plan = plan_series(paths)
    vol = load_series(paths)
    assert plan.shape == vol.shape and plan.resampled and vol.resampled
    np.testing.assert_allclose(plan.affine, vol.affine)


# ---------------------------------------------------------------------------------------------- grouping


def test_group_series(tmp_path):
    a, b = ct_series(3), ct_series(2)
    write(a, tmp_path / "x" / "a")
    write(b, tmp_path / "y")
    (tmp_path / "x" / "README").write_text("hello")
    shutil.copy(get_testdata_file("MR_small.dcm"), tmp_path / "mr.dcm")
    groups = group_series([tmp_path])
    assert {uid: len(p) for uid, p in groups.items()} == {
        a[0].SeriesInstanceUID: 3,
        b[0].SeriesInstanceUID: 2,
        pydicom.dcmread(get_testdata_file("MR_small.dcm")).SeriesInstanceUID: 1,
    }


# ---------------------------------------------------------------------------------------------- phantom


@pytest.fixture(scope="module")
def phantom_reference(tmp_path_factory):
    from pacs_landmarks.inference.phantom import make_case, write_case

    # Noise-free, and blurred wider than the 2 mm voxels: the phantom's label boundaries are point-sampled, so a
    # sharper one aliases differently on each grid (apparent shifts up to ~1 mm that are not geometry).
    case = make_case(3, noise_hu=0.0, psf_fwhm_mm=4.0)
    root = tmp_path_factory.mktemp("phantom")
    straight = load_series(sorted(write_case(case, root / "straight", pixel_spacing=2.0, slice_thickness=2.0,
                                             size=128).glob("*.dcm")))
    return case, root, straight


def patch_shift(vol, ref, centre: np.ndarray, half_mm=12.0, step_mm=1.5) -> np.ndarray:
    """The LPS shift d (mm) that best aligns ``vol`` sampled at p + d with ``ref`` at p, over a patch around
    ``centre`` (Gauss-Newton on trilinear samples)."""
    ax = np.arange(-half_mm, half_mm + 1e-9, step_mm)
    pts = centre + np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)

    def sample(v, p):
        return map_coordinates(v.array, v.lps_to_index(p).T, order=1, mode="nearest")

    target = sample(ref, pts)
    d = np.zeros(3)
    for _ in range(4):
        here = sample(vol, pts + d)
        grad = np.stack([(sample(vol, pts + d + e) - sample(vol, pts + d - e)) / 1.0 for e in 0.5 * np.eye(3)], -1)
        step, *_ = np.linalg.lstsq(grad, target - here, rcond=None)
        d = d + np.clip(step, -2, 2)
    return d


@pytest.mark.parametrize(
    "options",
    [
        dict(order="shuffled"),
        dict(order="reversed"),
        dict(tilt_deg=15.0, order="shuffled"),
        dict(gaps=[1.0 if k % 9 == 4 else 0.0 for k in range(200)], order="reversed"),
        dict(tilt_deg=-10.0, gaps=[2.0 if k == 40 else 0.0 for k in range(200)], order="shuffled"),
    ],
    ids=["shuffled", "reversed", "tilt15-shuffled", "gaps-reversed", "tilt-10-gap-shuffled"],
)
def test_phantom_landmarks_map_to_the_same_content(phantom_reference, options, tmp_path):
    """Landmark-centred patches of a tilted / gapped / reordered phantom match the straight reference
    within 0.5 voxel."""
    from pacs_landmarks.inference.phantom import write_case

    case, _, straight = phantom_reference
    folder = write_case(case, tmp_path / "case", pixel_spacing=2.0, slice_thickness=2.0, size=128, **options)
    vol = load_series(sorted(folder.glob("*.dcm")))
    assert vol.frame_of_reference_uid == straight.frame_of_reference_uid
    assert vol.resampled == ("tilt_deg" in options or "gaps" in options)
    assert vol.gantry_tilt_deg == pytest.approx(abs(options.get("tilt_deg", 0.0)), abs=0.01)
    half_voxel = 0.5 * min(straight.spacing)
    for name, position in case.landmarks.items():
        shift = patch_shift(vol, straight, position)
        assert np.linalg.norm(shift) < half_voxel, (name, shift)


def test_more_exclusion_reasons():
    series = ct_series(4)
    other_for = copy.deepcopy(series[0])
    other_for.SOPInstanceUID, other_for.FrameOfReferenceUID = generate_uid(), generate_uid()
    other_for.ImagePositionPatient = [0, 0, 123]
    coarse = copy.deepcopy(series[1])
    coarse.SOPInstanceUID, coarse.PixelSpacing = generate_uid(), [0.9, 0.9]
    coarse.ImagePositionPatient = [0, 0, 124]
    rgb = copy.deepcopy(series[2])
    rgb.SOPInstanceUID, rgb.SamplesPerPixel, rgb.PhotometricInterpretation = generate_uid(), 3, "RGB"
    skew = copy.deepcopy(series[3])
    skew.SOPInstanceUID, skew.ImageOrientationPatient = generate_uid(), [1, 0, 0, 0.5, 0.5, 0]
    short = copy.deepcopy(series[3])
    short.SOPInstanceUID, short.ImagePositionPatient = generate_uid(), [1.0, 2.0]
    vol = load_series([*series, other_for, coarse, rgb, skew, short])
    got = reasons(vol)
    assert vol.shape[0] == 4
    assert "other Frame of Reference" in got[other_for.SOPInstanceUID]
    assert "other pixel spacing (0.9x0.9 mm)" in got[coarse.SOPInstanceUID]
    assert "not a grayscale image" in got[rgb.SOPInstanceUID]
    assert "not perpendicular" in got[skew.SOPInstanceUID]
    assert "Image Position (Patient) needs 3" in got[short.SOPInstanceUID]


def test_damaged_file_is_left_out_with_a_reason(tmp_path):
    paths = write(ct_series(3), tmp_path)
    damaged = tmp_path / "damaged.dcm"
    damaged.write_bytes(paths[0].read_bytes()[:300])  # preamble, file meta and a cut-off dataset
    vol = load_series([*paths, damaged])
    assert vol.shape[0] == 3
    reason = reasons(vol)[str(damaged)]
    assert reason.startswith("incomplete dataset: no SOP Class UID"), reason


def test_folder_is_read_recursively(tmp_path):
    series = ct_series(4)
    write(series[:2], tmp_path / "a")
    write(series[2:], tmp_path / "b" / "c")
    vol = load_series([tmp_path])
    assert [s.sop_instance_uid for s in vol.slice_sources] == [ds.SOPInstanceUID for ds in series]


def test_ct_images_without_usable_slices():
    series = ct_series(3)
    for ds in series:
        del ds.PixelSpacing
    with pytest.raises(SeriesError, match="none of the 3 CT image"):
        load_series(series)
