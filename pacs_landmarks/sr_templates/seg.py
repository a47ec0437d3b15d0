"""The landmark SEG: BINARY Segmentation (PS3.3 A.51), one segment per landmark, a small sphere around it.

Sphere radius = max(2 mm, 1.5 x the largest voxel dimension), so that even 5 mm slices show every landmark on
at least one slice. Segment category SCT 309825002 "Spatial and Relational Concept" (CID 7150), type SCT 711101009 "Anatomical
point", anatomic region = the landmark's structure; algorithm family DCM 123110 "Artificial Intelligence",
AUTOMATIC; Tracking UID shared with the landmark SR groups of the same landmark.

Speed: only the source slices a sphere touches are passed to highdicom, as headers without pixel data, with
empty frames omitted and no compression (never JPEG-LS: its codec crashes inside the Orthanc process).
"""
from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset

from pacs_landmarks.dicom.volume import Volume
from pacs_landmarks.inference.landmark import FOUND, Landmark
from pacs_landmarks.sr_templates.common import Algorithm, evidence_headers, finish, image_result_identity
from pacs_landmarks.sr_templates.geometry import SourcePlane, plane_distances, source_planes
from pacs_landmarks.landmark_sets import coded, landmark_definition, rgb_to_cielab
from pacs_landmarks.sr_templates.uids import tracking_uid

MIN_RADIUS_MM = 2.0
RADIUS_VOXELS = 1.5


def sphere_radius(volume: Volume) -> float:
    return max(MIN_RADIUS_MM, RADIUS_VOXELS * max(volume.spacing))


def _disc(plane: SourcePlane, centre: np.ndarray, radius: float, d: float) -> tuple[slice, slice, np.ndarray] | None:
    """The pixels of a slice within ``radius`` mm of ``centre`` (pixel centres; ``d``: the centre's distance
    from the plane), as a box and its mask."""
    if abs(d) > radius:
        return None
    r_in = np.sqrt(radius * radius - d * d)
    c0, r0 = plane.pixel_index(centre)
    sr, sc = plane.pixel_spacing
    cols = np.arange(max(0, int(np.floor(c0 - r_in / sc))), min(plane.columns, int(np.ceil(c0 + r_in / sc)) + 1))
    rows = np.arange(max(0, int(np.floor(r0 - r_in / sr))), min(plane.rows, int(np.ceil(r0 + r_in / sr)) + 1))
    if cols.size == 0 or rows.size == 0:
        return None
    mask = ((cols[None, :] - c0) * sc) ** 2 + ((rows[:, None] - r0) * sr) ** 2 <= r_in * r_in
    if not mask.any():
        return None
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1), mask


def _frames_and_sources(planes: list[SourcePlane], used: list[int]) -> dict:
    """highdicom arguments tying the SEG frames to the source slices / frames they lie on.

    Single-frame sources: the used slices themselves, one SEG plane each. A multi-frame (Enhanced CT) source:
    that instance plus the positions of the used frames, which highdicom matches back to source frames.
    """
    import highdicom as hd

    if not any(p.source.frame_number for p in planes):
        return {"source_images": evidence_headers([planes[p].header for p in used])}
    instances = {p.source.sop_instance_uid for p in planes}
    if len(instances) != 1:
        raise ValueError("SEG on a series of several multi-frame instances is not supported")
    first = planes[0]
    patient = hd.CoordinateSystemNames.PATIENT
    return {
        "source_images": evidence_headers([first.header]),
        "plane_positions": [hd.PlanePositionSequence(patient, planes[p].origin.tolist()) for p in used],
        "plane_orientation": hd.PlaneOrientationSequence(patient, [*first.row_dir, *first.col_dir]),
        "pixel_measures": hd.PixelMeasuresSequence(
            pixel_spacing=list(first.pixel_spacing),
            slice_thickness=float(_thickness(first.header)),
        ),
    }


def _thickness(header: Dataset) -> float:
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        if group in header and "PixelMeasuresSequence" in header[group][0]:
            measures = header[group][0].PixelMeasuresSequence[0]
            if "SliceThickness" in measures:
                return float(measures.SliceThickness)
    return float(header.get("SliceThickness", 1.0))


def build_landmark_seg(volume: Volume, landmarks: list[Landmark], algorithm: Algorithm) -> Dataset:
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import ExplicitVRLittleEndian

    # Segments for found landmarks only: a landmark that is not found has no position to draw.
    landmarks = [lm for lm in landmarks if lm.status == FOUND]
    if not landmarks:
        raise ValueError("no found landmark: nothing to segment")
    planes = source_planes(volume)
    radius = sphere_radius(volume)
    discs: list[tuple[int, int, tuple]] = []  # (plane index, segment index, disc)
    for s, lm in enumerate(landmarks):
        centre = np.asarray(lm.position_lps_mm, float)
        distances = plane_distances(planes, centre)
        for p in np.flatnonzero(np.abs(distances) <= radius):
            disc = _disc(planes[p], centre, radius, float(distances[p]))
            if disc is not None:
                discs.append((p, s, disc))
    # No sphere inside the imaged volume (a failed detection): still a valid SEG, one empty frame per segment
    # on the first slice, so that the result set stays complete and a re-run replaces it.
    used = sorted({p for p, _, _ in discs}) or [0]
    slot = {p: n for n, p in enumerate(used)}
    rows, columns = planes[0].rows, planes[0].columns
    # A label map (one byte per pixel, value = segment number) is ~16x less data for highdicom to check and
    # split than one boolean plane per segment; it can only be used while no two spheres share a pixel.
    labels = np.zeros((len(used), rows, columns), dtype=np.uint8)
    overlap = False
    for p, s, (rs, cs, mask) in discs:
        box = labels[slot[p], rs, cs]
        overlap |= bool(np.any(box[mask]))
        box[mask] = s + 1
    if overlap:
        # Spheres that share pixels (Menton and Gnathion are 3-5 mm apart) need one plane per segment. The
        # array highdicom takes is (planes, rows, columns, segments); stored segment-major (a transposed
        # view), each per-segment plane highdicom cuts from it is contiguous: 1.2 s -> 0.5 s (bench/outputs.py).
        stack = np.zeros((len(landmarks), len(used), rows, columns), dtype=bool)
        for p, s, (rs, cs, mask) in discs:
            stack[s, slot[p], rs, cs] |= mask
        pixels = stack.transpose(1, 2, 3, 0)
    else:
        pixels = labels

    family = codes.cid7162.ArtificialIntelligence
    alg_id = hd.AlgorithmIdentificationSequence(name=algorithm.name, family=family, version=algorithm.version)
    series = volume.series_instance_uid
    descriptions = []
    for n, lm in enumerate(landmarks, start=1):
        definition = landmark_definition(lm.name, algorithm.landmark_set)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=n,
                segment_label=lm.name,
                segmented_property_category=codes.SCT.SpatialAndRelationalConcept,
                segmented_property_type=codes.SCT.AnatomicalPoint,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=alg_id,
                tracking_uid=tracking_uid(series, algorithm.name, algorithm.version, lm.name),
                tracking_id=lm.name,
                anatomic_regions=[coded(definition["structure"])],
                display_color=rgb_to_cielab(tuple(definition["color_rgb"])),
            )
        )
    ds = hd.seg.Segmentation(
        **_frames_and_sources(planes, used),
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        **image_result_identity(volume, "seg", algorithm),
        content_label="LANDMARKS",
        content_description="AI landmark spheres",
        omit_empty_frames=True,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    # Laterality and topographic modifier of the structure (Anatomic Region Modifier Sequence, PS3.3 10.5
    # Basic Code Sequence Macro inside C.8.20.2 Segment Description); highdicom takes codes only.
    for segment, lm in zip(ds.SegmentSequence, landmarks):
        definition = landmark_definition(lm.name, algorithm.landmark_set)
        modifiers = [definition[k] for k in ("modifier", "laterality") if definition.get(k)]
        if modifiers:
            items = []
            for entry in modifiers:
                item = Dataset()
                item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = (
                    entry["value"], entry["scheme"], entry["meaning"]
                )
                items.append(item)
            segment.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = items
    return finish(ds, "seg", algorithm)
