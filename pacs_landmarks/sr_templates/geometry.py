"""Where a landmark falls on the source images: the plane of every source slice (or frame).

The SR's 2D points and the SEG's frames are drawn on the *source* images, in their own geometry (Image
Position / Orientation (Patient) and Pixel Spacing, PS3.3 C.7.6.2), not on the loader's possibly resampled
volume: a tilted or gappy series is described exactly as it was acquired.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from pacs_landmarks.dicom.volume import SliceSource, Volume


@dataclass(frozen=True)
class SourcePlane:
    source: SliceSource
    header: Dataset
    origin: np.ndarray  # LPS mm of the centre of the first transmitted pixel
    row_dir: np.ndarray  # unit vector along a row (increasing column index)
    col_dir: np.ndarray  # unit vector along a column (increasing row index)
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm, as in Pixel Spacing
    rows: int
    columns: int
    normal: np.ndarray  # row_dir x col_dir

    def distance(self, lps: np.ndarray) -> float:
        """Signed distance in mm from the plane."""
        d = np.asarray(lps, float) - self.origin
        n = self.normal
        return float(d[0] * n[0] + d[1] * n[1] + d[2] * n[2])

    def pixel_index(self, lps: np.ndarray) -> tuple[float, float]:
        """(column, row) index of the projection of a point; pixel centres are integers."""
        d = np.asarray(lps, float) - self.origin
        return float(d @ self.row_dir / self.pixel_spacing[1]), float(d @ self.col_dir / self.pixel_spacing[0])

    def pixel_lps(self, column: np.ndarray, row: np.ndarray) -> np.ndarray:
        """LPS of pixel centres at (column, row) indices."""
        column = np.asarray(column, float)[..., None]
        row = np.asarray(row, float)[..., None]
        return self.origin + column * self.pixel_spacing[1] * self.row_dir + row * self.pixel_spacing[0] * self.col_dir


def _functional(header: Dataset, frame: int | None, group: str) -> Dataset | None:
    """A functional group macro item for a frame of a multi-frame image (PS3.3 C.7.6.16)."""
    if frame is not None and "PerFrameFunctionalGroupsSequence" in header:
        item = header.PerFrameFunctionalGroupsSequence[frame - 1]
        if group in item:
            return item[group].value[0]
    if "SharedFunctionalGroupsSequence" in header:
        item = header.SharedFunctionalGroupsSequence[0]
        if group in item:
            return item[group].value[0]
    return None


def _plane(source: SliceSource, header: Dataset) -> SourcePlane:
    pos = header.get("ImagePositionPatient")
    ori = header.get("ImageOrientationPatient")
    spacing = header.get("PixelSpacing")
    if pos is None:
        pos = _functional(header, source.frame_number, "PlanePositionSequence").ImagePositionPatient
    if ori is None:
        ori = _functional(header, source.frame_number, "PlaneOrientationSequence").ImageOrientationPatient
    if spacing is None:
        spacing = _functional(header, source.frame_number, "PixelMeasuresSequence").PixelSpacing
    ori = np.asarray([float(v) for v in ori])
    row_dir, col_dir = ori[:3] / np.linalg.norm(ori[:3]), ori[3:] / np.linalg.norm(ori[3:])
    return SourcePlane(
        source=source,
        header=header,
        origin=np.asarray([float(v) for v in pos]),
        row_dir=row_dir,
        col_dir=col_dir,
        normal=np.cross(row_dir, col_dir),
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        rows=int(header.Rows),
        columns=int(header.Columns),
    )


# The planes of the last volume asked for: the landmark SR and the SEG of one series share them (reading
# 300 headers' geometry through pydicom costs ~15 ms). A weak reference, so a volume is not kept alive.
_last_planes: tuple[weakref.ref, list[SourcePlane]] | None = None


def source_planes(volume: Volume) -> list[SourcePlane]:
    """One plane per distinct source slice / frame of the volume: those its slices came from, plus any other
    single-frame source image it used (a resampled volume may name only the nearest ones)."""
    global _last_planes
    last = _last_planes
    if last is not None and last[0]() is volume:
        return last[1]
    planes = _source_planes(volume)
    _last_planes = (weakref.ref(volume), planes)
    return planes


def _source_planes(volume: Volume) -> list[SourcePlane]:
    headers = {str(h.SOPInstanceUID): h for h in volume.source_headers}
    planes: list[SourcePlane] = []
    seen: set[tuple[str, int | None]] = set()
    for src in volume.slice_sources:
        key = (src.sop_instance_uid, src.frame_number)
        if key in seen or src.sop_instance_uid not in headers:
            continue
        seen.add(key)
        planes.append(_plane(src, headers[src.sop_instance_uid]))
    for uid, header in headers.items():
        if (uid, None) not in seen and "ImagePositionPatient" in header and int(header.get("NumberOfFrames", 1) or 1) == 1:
            seen.add((uid, None))
            planes.append(_plane(SliceSource(uid, str(header.SOPClassUID)), header))
    if not planes:
        raise ValueError("the volume carries no source image headers to reference")
    return planes


def plane_distances(planes: list[SourcePlane], lps: np.ndarray) -> np.ndarray:
    """Signed distance in mm of a point from every plane."""
    origins = np.array([p.origin for p in planes])
    normals = np.array([p.normal for p in planes])
    return np.einsum("ij,ij->i", np.asarray(lps, float) - origins, normals)


def nearest_plane(planes: list[SourcePlane], lps: np.ndarray) -> SourcePlane:
    """The source slice nearest to a point (smallest distance to its plane)."""
    return planes[int(np.argmin(np.abs(plane_distances(planes, lps))))]
