"""Time to assemble a CT series from files: 512 x 512 x 300 by default, straight, shuffled, tilted, uneven gaps,
and compressed (JPEG 2000 lossless, RLE lossless).

Target (docs/benchmarks.md): a 512 x 512 x 300 uncompressed series loads in a few seconds on the 2-core CI
machine. Files are written to a temporary folder first (so they are in the page cache: this measures parsing,
decoding, sorting and resampling, not the disk). Prints one table.

    .venv/bin/python bench/series.py [--slices 300] [--size 512] [--compressed-slices 60] [--repeat 3]
"""
from __future__ import annotations

import argparse
import math
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid

from pacs_landmarks.dicom.series import load_series, plan_series


def write_series(folder: Path, slices: int, size: int, *, tilt_deg=0.0, gaps=None, syntax=ExplicitVRLittleEndian,
                 shuffle=False) -> list[Path]:
    folder.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    t = math.radians(tilt_deg)
    col_dir = [0.0, math.cos(t), -math.sin(t)]
    zs = np.cumsum([0.0, *(gaps if gaps is not None else [0.625] * (slices - 1))])
    yy, xx = np.mgrid[0:size, 0:size]
    head = ((xx - size / 2) ** 2 + (yy - size / 2) ** 2 < (size * 0.4) ** 2).astype(np.int16)
    paths = []
    order = list(range(len(zs)))
    if shuffle:
        random.Random(0).shuffle(order)
    for n, k in enumerate(order):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.Modality, ds.ImageType = CTImageStorage, "CT", ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [-size * 0.25, -size * 0.25 * col_dir[1], float(zs[k]) + size * 0.25 * math.sin(t)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, *col_dir]
        ds.PixelSpacing, ds.SliceThickness = [0.5, 0.5], 0.625
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (head * (1024 + 40 + (k % 50)) + (xx % 7)).astype(np.int16).tobytes()
        ds["PixelData"].VR = "OW"
        if syntax != ExplicitVRLittleEndian:
            ds.compress(syntax)
        path = folder / f"{n:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def timed(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--compressed-slices", type=int, default=60)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    n, size = args.slices, args.size
    uneven = [0.625] * (n // 3) + [1.25] + [0.625] * (n - n // 3 - 3) + [0.9]
    cases = [
        ("straight, sorted files", dict()),
        ("straight, shuffled files", dict(shuffle=True)),
        ("gantry tilt 15 deg", dict(tilt_deg=15.0)),
        ("uneven gaps", dict(gaps=uneven)),
        (f"JPEG 2000 lossless ({args.compressed_slices} slices)", dict(syntax=JPEG2000Lossless)),
        (f"RLE lossless ({args.compressed_slices} slices)", dict(syntax=RLELossless)),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, options) in enumerate(cases):
            count = args.compressed_slices if "syntax" in options else n
            paths = write_series(Path(tmp) / str(i), count, size, **options)
            t_plan, _ = timed(lambda: plan_series(paths), args.repeat)
            t_load, vol = timed(lambda: load_series(paths), args.repeat)
            rows.append((name, count, "x".join(map(str, vol.shape)), vol.resampled, t_plan, t_load,
                         1000 * t_load / count))
            for p in paths:
                p.unlink()
    print(f"load_series, {size}x{size} slices, median of {args.repeat}")
    print(f"{'case':38} {'files':>5} {'volume shape':>14} {'resampled':>9} {'headers s':>9} {'load s':>7} {'ms/slice':>8}")
    for name, count, shape, resampled, t_plan, t_load, per in rows:
        print(f"{name:38} {count:5d} {shape:>14} {str(resampled):>9} {t_plan:9.2f} {t_load:7.2f} {per:8.1f}")


if __name__ == "__main__":
    main()
