"""The coarse-to-fine cascade: a global stage on the whole head, then local stages on crops in mm.

One implementation for a CT volume (``dim`` 3, points in patient LPS mm, intensities in HU) and a
cephalogram (``dim`` 2, points in mm on the face-right image, intensities 0..1): the dimension and the
intensity unit are parameters of the ``Cascade`` (model metadata ``dim`` and ``intensity.unit``).

Stage 1 reads one box centred on the head (e.g. 64^3 at 4 mm, or 128^2 at 2 mm over the whole
cephalogram) and finds every landmark at once.  Each later stage reads one crop per landmark centred on the
previous stage's estimate (e.g. 24^3 at 1.25 mm, then at 0.6 mm) through one network shared by all
landmarks, so all crops of a stage are a single batch.  Points come from a soft-argmax over the physical
positions of the box, so they are sub-voxel and in mm throughout.

Confidence per landmark combines how concentrated each local stage's probability map is (spread in voxels)
with how well consecutive stages agree, and, for CT, is cut down when the volume does not look like a head
(too little bone in the stage-1 box).

Mirror test-time augmentation (CT, model metadata ``tta: "mirror"``): the same cascade runs a second time
on the head mirrored left-right through a mirroring view of the sampler, and the two estimates, mapped back,
are averaged; their disagreement enters the confidence (``run_cascade``, ``mirror_confidence``).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from pacs_landmarks.dicom.volume import air_and_soft_tissue, reconstruction_circle
from pacs_landmarks.inference.networks import build_network
from pacs_landmarks.inference.sampling import (ScanRegion, VolumeSampler, box_offsets, box_points, intensity,
                                              normalise_hu, soft_argmax)
from pacs_landmarks.inference.shape import ShapePrior
from pacs_landmarks.inference.symmetry import SymmetryRules, lateral_axis, onto_midline, pairs_onto_midplane

log = logging.getLogger(__name__)

BONE_HU = 250.0
# A whole skull holds several hundred ml of bone, the part of a head in a small dental CBCT cylinder (teeth,
# alveolar bone, a piece of the mandible) 40-100 ml; an empty volume or soft tissue none. Below this there is
# no head to find landmarks on. (150 ml, until 2.1.0, left every small-field CBCT with nothing found.)
MIN_HEAD_BONE_ML = 40.0
# Air in the values a CT model was trained on: training reads uncalibrated cone-beam CT as HU x gain + offset,
# gain 0.6-1.4, offset +-300 HU (train.DOMAIN), so air from -1700 to -300.  Above that (a series stored
# without its Rescale Intercept: air at 0) the values are mapped to HU from where air and soft tissue are.
MAX_TRAINED_AIR_HU = -300.0
# A mapping needs a clear air peak at the bottom of the values and an air-to-soft-tissue step of a plausible size
# (gain 0.5-2).  A calibrated scan without air (a small field inside the face) has soft tissue as its lowest
# peak and bone as the next: fat and noise below that peak tell it from air, below which there is nothing.
MIN_AIR_SHARE = 0.1
MAX_BELOW_AIR = 0.1  # of the air-to-soft-tissue step: how far the lowest values (0.5th percentile) may lie below air
AIR_TO_SOFT_TISSUE_HU = 1040.0  # -1000 -> 40
# Mirror test-time augmentation: mm of disagreement between the two passes per factor e of confidence
# (``mirror_confidence``).
MIRROR_DISAGREEMENT_MM = 6.0


@dataclass(frozen=True)
class StageConfig:
    name: str
    kind: str  # "global" or "local"
    size: int  # box edge in voxels
    spacing_mm: float
    width: int  # base channel count of the network
    presence: bool = False  # global stage: a per-landmark "inside the scanned volume" output (models >= 2.0)

    @property
    def extent_mm(self) -> float:
        return self.size * self.spacing_mm


DEFAULT_STAGES = (
    StageConfig("global", "global", 64, 4.0, 16, presence=True),
    StageConfig("local", "local", 24, 1.25, 8),
    StageConfig("fine", "local", 24, 0.6, 8),
)


# 2D (a cephalogram, ~200-240 mm high): the whole image at 2 mm, crops of 24 mm at 0.5 mm, then of 8 mm
# at 0.17 mm (about the detector's own resolution); 48 px, about what the local network's receptive field spans.
DEFAULT_STAGES_2D = (
    StageConfig("global", "global", 128, 2.0, 16, presence=True),
    StageConfig("local", "local", 48, 0.5, 12),
    StageConfig("fine", "local", 48, 0.17, 12),
)


def default_stages(dim: int = 3) -> tuple[StageConfig, ...]:
    return DEFAULT_STAGES if dim == 3 else DEFAULT_STAGES_2D


def stages_from_json(items: list[dict]) -> tuple[StageConfig, ...]:
    return tuple(StageConfig(**item) for item in items)


def stages_to_json(stages: tuple[StageConfig, ...]) -> list[dict]:
    return [asdict(s) for s in stages]


class Cascade(nn.Module):
    """The networks of all stages, in order, for images of ``dim`` dimensions whose intensities are in
    ``unit`` ("HU" for CT, "xray" for 0..1 projection images; ``sampling.INTENSITY``)."""

    def __init__(self, stages: tuple[StageConfig, ...], n_landmarks: int, dim: int = 3, unit: str = "HU"):
        super().__init__()
        if len(stages) < 2 or stages[0].kind != "global" or any(s.kind != "local" for s in stages[1:]):
            raise ValueError("a cascade is one global stage followed by local stages")
        if dim not in (2, 3):
            raise ValueError(f"a cascade works on 2D or 3D images, not {dim}D")
        self.stages = tuple(stages)
        self.n_landmarks = n_landmarks
        self.dim = dim
        self.unit = unit
        self.normalise, self.outside = intensity(unit)
        self.nets = nn.ModuleList(build_network(s.kind, n_landmarks, s.width, s.presence, dim) for s in stages)

    def sampler(self, array, affine, device="cpu", as_scanned: bool = True) -> VolumeSampler:
        """A sampler of one image / volume that reads this cascade's "outside" value beyond the array.

        ``as_scanned`` (CT): the series is what a scanner sent, so look for its round field of view
        (``dicom.volume.reconstruction_circle``) and map its values to HU when they are not
        (``as_hounsfield``); training data made here are HU in a box and skip both.
        """
        circle = None
        if as_scanned and self.dim == 3 and self.unit == "HU":
            spacing = np.linalg.norm(np.asarray(affine, np.float64)[:3, :3], axis=0)
            circle = reconstruction_circle(np.asarray(array), (spacing[1], spacing[2]))
            array = as_hounsfield(np.asarray(array))
        sampler = VolumeSampler(array, affine, device, outside=self.outside, circle=circle)
        if sampler.dim != self.dim:
            raise ValueError(f"this cascade reads {self.dim}D images, not {sampler.dim}D")
        return sampler

    def global_input(self, values: torch.Tensor) -> torch.Tensor:
        return global_input(values, self.normalise)

    def local_input(self, values: torch.Tensor) -> torch.Tensor:
        return local_input(values, self.normalise)


def as_hounsfield(array: np.ndarray) -> np.ndarray:
    """``array`` as the CT model reads it: unchanged when its air lies where training put air (HU, or a
    cone-beam CT's values within the trained gain and offset); else mapped linearly so that its air is -1000
    HU and its soft tissue 40 HU (``dicom.volume.air_and_soft_tissue``), with a warning."""
    peaks = air_and_soft_tissue(array)
    if peaks is None:
        return array
    air, tissue, share, lowest = peaks
    if air <= MAX_TRAINED_AIR_HU:
        return array
    step = tissue - air
    if (share < MIN_AIR_SHARE or air - lowest > MAX_BELOW_AIR * step
            or not 0.5 * AIR_TO_SOFT_TISSUE_HU <= step <= 2.0 * AIR_TO_SOFT_TISSUE_HU):
        log.warning("the series' values do not look like Hounsfield units (air at %.0f) and cannot be mapped "
                    "to them (soft tissue at %.0f): read as they are", air, tissue)
        return array
    gain = AIR_TO_SOFT_TISSUE_HU / step
    log.warning("the series' values are not Hounsfield units (air at %.0f, soft tissue at %.0f; a missing "
                "Rescale Intercept?): read as HU = %.3f x value %+.0f", air, tissue, gain, -1000.0 - gain * air)
    return (array * np.float32(gain) + np.float32(-1000.0 - gain * air)).astype(np.float32)


def coordinate_channels(size: int, device=None, dim: int = 3) -> torch.Tensor:
    """(dim, size, ..., size): position within the box, -1..1 along ((d,) h, w)."""
    offs = box_offsets(size, 2.0 / max(size - 1, 1), device, dim)
    return offs.permute(dim, *range(dim))


def global_input(values: torch.Tensor, normalise=normalise_hu) -> torch.Tensor:
    """Stage-1 network input (N, 1 + D, S, ...) from sampled intensities (N, S, ...) of a D-dim box."""
    n, dim, s = values.shape[0], values.dim() - 1, values.shape[1]
    coords = coordinate_channels(s, values.device, dim).expand(n, dim, *values.shape[1:])
    return torch.cat([normalise(values)[:, None], coords], 1)


def local_input(values: torch.Tensor, normalise=normalise_hu) -> torch.Tensor:
    return normalise(values)[:, None]


def pick_channels(logits: torch.Tensor, landmark_idx: torch.Tensor) -> torch.Tensor:
    """(N, L, ...) logits and (N,) landmark indices -> (N, ...): each crop's own landmark map."""
    return logits[torch.arange(logits.shape[0], device=logits.device), landmark_idx]


def head_centre(sampler: VolumeSampler, spacing_mm: float) -> tuple[np.ndarray, float]:
    """Where to put the stage-1 box, and the volume of bone (ml) in the scan.

    The centre is the centroid of bone (of soft tissue if there is little bone, of the volume if neither):
    a head CT's bone is mostly skull, so this sits near the middle of the head even when the field of view
    also shows the neck or the head rest.
    """
    vol, inv = sampler._level(spacing_mm)
    aff = np.linalg.inv(inv.cpu().numpy().astype(np.float64))
    arr = vol[0, 0].float()
    voxel_ml = abs(np.linalg.det(aff[:3, :3])) / 1000.0
    bone = arr > BONE_HU
    bone_ml = float(bone.sum()) * voxel_ml
    mask = bone if bone_ml > 20.0 else arr > -300.0
    if int(mask.sum()) == 0:
        idx = (np.array(arr.shape, dtype=np.float64) - 1) / 2.0
    else:
        idx = torch.nonzero(mask).double().mean(0).cpu().numpy()
    return idx @ aff[:3, :3].T + aff[:3, 3], bone_ml


def image_centre(sampler: VolumeSampler) -> np.ndarray:
    """The middle of the array in mm: where the stage-1 box goes on a projection image, which a cephalostat
    frames on the head."""
    idx = (np.asarray(sampler.shape, np.float64) - 1) / 2.0
    d = sampler.dim
    return sampler.affine[:d, :d] @ idx + sampler.affine[:d, d]


def stage1_centre(cascade: "Cascade", sampler: VolumeSampler) -> tuple[np.ndarray, float | None]:
    """(centre of the stage-1 box, bone in the scan in ml; None for a projection image)."""
    if cascade.unit == "HU":
        return head_centre(sampler, cascade.stages[0].spacing_mm)
    return image_centre(sampler), None


@dataclass
class CascadeOutput:
    positions: np.ndarray  # (stages, L, D) mm (LPS for CT), each stage's point (after fusion, when fusing)
    spreads: np.ndarray  # (stages, L) mm, RMS width of each stage's own probability map
    confidence: np.ndarray  # (L,) 0..1
    bone_ml: float | None  # CT: bone in the scan (ml); None for a projection image
    timings: dict[str, float]
    presence: np.ndarray | None = None  # (L,) 0..1 "inside the scanned volume / image" (None: no such output)
    inside_fraction: np.ndarray | None = None  # (L,) share of the last stage's crop inside the volume / image
    edge_mm: np.ndarray | None = None  # (L,) mm from the final point to the scanned region's edge (< 0 outside)
    reseeded: np.ndarray | None = None  # (L,) bool: local stages started from the shape model's estimate
    centre: np.ndarray | None = None  # (D,) mm, centre of the stage-1 box
    # mirror test-time augmentation (``run_cascade(mirror=...)``): distance (L,) mm between the estimate on the
    # image and the one on its mirror image mapped back; each pass's confidence (2, L)
    disagreement: np.ndarray | None = None
    pass_confidence: np.ndarray | None = None
    # with a shape model: the last stage's own point and its map's variance per axis (mm^2), before the
    # shape prior (``run_cascade(prior=...)``) moved it, and the shape model's leave-one-out estimate (NaN where
    # none: not a candidate, or implausible)
    image_positions: np.ndarray | None = None  # (L, D)
    image_variance: np.ndarray | None = None  # (L, D)
    shape_estimate: np.ndarray | None = None  # (L, D)
    shape_frame: np.ndarray | None = None  # (D, D) rotation from the shape model's axes to the patient's
    # where the image or volume has data, for rules about points other than these (``model.landmark_statuses``)
    region: ScanRegion | None = None


def inside_fraction(sampler: VolumeSampler, points: np.ndarray, extent_mm: float, n: int = 5) -> np.ndarray:
    """Share of a box of ``extent_mm`` around each point (L, D) that lies inside the scanned volume / image
    (``VolumeSampler.depth_mm``: a CT's reconstruction circle included)."""
    d = sampler.dim
    offs = (np.arange(n) - (n - 1) / 2) * (extent_mm / n)
    grid = np.stack(np.meshgrid(*([offs] * d), indexing="ij"), -1).reshape(-1, d)
    pts = np.asarray(points, float)[:, None, :] + grid[None]
    return (sampler.depth_mm(pts) >= 0).mean(1)


def confidence_from(stages: tuple[StageConfig, ...], positions: np.ndarray, spreads: np.ndarray,
                    bone_ml: float | None = None) -> np.ndarray:
    """Per-landmark confidence in 0..1 (see module docstring); ``bone_ml`` None: not a CT, no head check."""
    conf = np.ones(positions.shape[1])
    for k in range(1, len(stages)):
        s = stages[k].spacing_mm
        # a map as peaked as in training (~3-4 voxels RMS) -> ~0.6; one spread over the whole crop -> ~0.2
        conf *= np.exp(-spreads[k] / (8.0 * s))
        # consecutive stages should agree to within the finer stage's crop
        jump = np.linalg.norm(positions[k] - positions[k - 1], axis=-1)
        conf *= np.exp(-0.5 * (jump / (0.25 * stages[k].extent_mm)) ** 2)
    conf = conf ** (1.0 / (len(stages) - 1))
    if bone_ml is not None:
        conf *= min(1.0, bone_ml / MIN_HEAD_BONE_ML) ** 2
    return np.clip(conf, 0.0, 1.0)


@torch.no_grad()
def run_cascade(cascade: Cascade, sampler: VolumeSampler, autocast: bool = False, fuse: bool = False,
                shape=None, mirror: list[int] | None = None, prior=None,
                symmetry: SymmetryRules | None = None) -> CascadeOutput:
    """All stages on one image or volume (``cascade.sampler``); positions of every stage come back for
    reporting and evaluation (``_one_pass`` for ``fuse``, ``shape``, ``prior`` and ``symmetry``).

    ``mirror`` (CT only; the landmark permutation of ``landmark_sets.mirror_names``): mirror test-time
    augmentation.  The same cascade runs a second time on the head mirrored left-right about the sagittal
    plane through the stage-1 box centre (``VolumeSampler.mirrored``: the same box, mirrored content), its
    points are mirrored back and the bilateral names swapped, and every stage's point is the mean of the two
    estimates.  How far apart the two final estimates are (``CascadeOutput.disagreement``) enters the
    confidence (``mirror_confidence``).
    """
    first = _one_pass(cascade, sampler, autocast, fuse, shape, prior=prior, symmetry=symmetry)
    if mirror is None:
        return first
    if cascade.dim != 3:
        # a cephalogram has no valid mirror: left-right turns the face around, top-bottom is no anatomy
        raise ValueError("mirror test-time augmentation is for CT volumes (3D) only")
    perm = np.asarray(mirror, int)
    if sorted(perm.tolist()) != list(range(cascade.n_landmarks)):
        raise ValueError(f"mirror must be a permutation of the {cascade.n_landmarks} landmarks, got {mirror}")
    x0 = float(first.centre[0])
    second = _one_pass(cascade, sampler.mirrored(x0), autocast, fuse, shape, start=(first.centre, first.bone_ml),
                       prior=prior, symmetry=symmetry)

    def mirrored_back(points):
        if points is None:
            return None
        back = points.copy()
        back[..., 0] = 2.0 * x0 - back[..., 0]
        return back[..., perm, :]

    back = mirrored_back(second.positions)
    positions = 0.5 * (first.positions + back)
    image = {}
    if first.image_positions is not None:
        image = {"image_positions": 0.5 * (first.image_positions + mirrored_back(second.image_positions)),
                 "image_variance": 0.5 * (first.image_variance + second.image_variance[perm]),
                 "shape_estimate": 0.5 * (first.shape_estimate + mirrored_back(second.shape_estimate)),
                 "shape_frame": first.shape_frame}
    disagreement = np.linalg.norm(first.positions[-1] - back[-1], axis=-1)
    pass_conf = np.stack([first.confidence, second.confidence[perm]])
    presence = None if first.presence is None else 0.5 * (first.presence + second.presence[perm])
    timings = {k: v + second.timings.get(k, 0.0) for k, v in first.timings.items()}
    return CascadeOutput(positions, 0.5 * (first.spreads + second.spreads[:, perm]),
                         mirror_confidence(pass_conf, disagreement), first.bone_ml, timings, presence,
                         inside_fraction(sampler, positions[-1], cascade.stages[-1].extent_mm),
                         sampler.depth_mm(positions[-1]), first.reseeded | second.reseeded[perm], first.centre,
                         disagreement, pass_conf, region=sampler.region, **image)


def mirror_confidence(pass_confidence: np.ndarray, disagreement: np.ndarray) -> np.ndarray:
    """Confidence (L,) of the mean of an estimate and its mirror estimate, from each pass's
    ``confidence_from`` (2, L) and their distance (L,) mm: the passes' geometric mean, cut by e per
    ``MIRROR_DISAGREEMENT_MM`` of disagreement.

    The confidence is read against a threshold calibrated for "within 2 mm" (``evaluate --calibrate``), so
    only the ranking matters, and that is set by one number, how many mm of disagreement weigh as much as a
    factor e in heat-map confidence.  A logistic fit of "within 2 mm" on log confidence and disagreement
    over the calibration cases (12 phantoms + 4 held-out warps of the real training head, model 2.1.0) puts
    it at 5.7 mm: a point the two passes put 2 mm apart keeps 72 % of its confidence.  A model unsure on
    real bone tends to disagree with itself under the flip; agreement cannot reveal an error both passes
    share (a bias), which is why the heat maps' own sharpness keeps its weight.
    """
    base = np.sqrt(pass_confidence[0] * pass_confidence[1])
    return np.clip(base * np.exp(-disagreement / MIRROR_DISAGREEMENT_MM), 0.0, 1.0)


@torch.no_grad()
def _one_pass(cascade: Cascade, sampler: VolumeSampler, autocast: bool = False, fuse: bool = False,
              shape=None, start: tuple[np.ndarray, float | None] | None = None, prior=None,
              symmetry: SymmetryRules | None = None) -> CascadeOutput:
    """``run_cascade`` on one view of the image; ``start``: (centre of the stage-1 box, bone ml) when known.

    ``fuse``: a local stage's point is the inverse-variance mean, per axis, of its own soft-argmax and the
    previous stage's point (variances = widths of the probability maps along x, y, z).  Where a fine crop
    holds little information along one axis (5 mm slices along z), its map is wide along that axis and the
    coarser stage keeps more weight there.

    ``shape`` (a ``shape.ShapeModel``): a global estimate that does not fit the other landmarks is replaced by
    where the others put it before the local stages start (``CascadeOutput.reseeded``).  After the last stage,
    when at least ``ShapePrior.MIN_SHARE`` of the landmarks are plausible candidates, the shape model's
    leave-one-out estimate of each is recorded (``CascadeOutput.shape_estimate``), and with ``prior`` (a
    ``shape.ShapePrior``) the final point is the inverse-covariance mean of the image's point and that estimate
    (``ShapePrior.fuse``; the image's own point stays in ``CascadeOutput.image_positions``).

    ``symmetry`` (CT, with ``prior``; ``symmetry.SymmetryRules``): then, on complete and partial scans alike,
    the plausible chin candidates are moved from side to side onto the chin's mirror-symmetry plane
    (``symmetry.onto_midline``), and each pair whose two sides are plausible and at least
    ``SymmetryRules.min_depth_mm`` inside the scan together onto the symmetry plane around them
    (``symmetry.pairs_onto_midplane``).
    """
    import time

    dev = sampler.device
    stages = cascade.stages
    n_lm = cascade.n_landmarks
    timings: dict[str, float] = {}
    positions, spreads = [], []
    lm_idx = torch.arange(n_lm, device=dev)
    amp = torch.autocast(device_type=dev.type, enabled=autocast and dev.type == "cuda")

    t0 = time.perf_counter()
    st = stages[0]
    centre, bone_ml = start if start is not None else stage1_centre(cascade, sampler)
    pts = box_points(torch.as_tensor(centre, dtype=torch.float32, device=dev)[None], st.size, st.spacing_mm)
    values = sampler.sample(pts, st.spacing_mm)
    with amp:
        logits, pres = cascade.nets[0](cascade.global_input(values), with_presence=True)
    presence = torch.sigmoid(pres[0].float()).cpu().double().numpy() if pres is not None else None
    pts_all = pts.expand(n_lm, *pts.shape[1:])
    pos, var, _ = soft_argmax(logits[0].float(), pts_all)
    positions.append(pos)
    spreads.append(var.sum(-1).sqrt())
    reseeded = np.zeros(n_lm, bool)
    if shape is not None:
        p1 = pos.cpu().double().numpy()
        cand = presence >= 0.5 if presence is not None else np.ones(n_lm, bool)
        bad, _ = shape.check(p1, cand)
        if bad.any():
            seed = shape.predict(p1, cand & ~bad)
            ok = bad & np.isfinite(seed).all(1)
            if ok.any():
                reseeded = ok
                pos = pos.clone()
                positions[-1] = pos
                pos[torch.as_tensor(ok, device=pos.device)] = torch.as_tensor(seed[ok], dtype=pos.dtype,
                                                                              device=pos.device)
                # the re-seeded start is as uncertain as the shape model's threshold
                var = var.clone()
                var[torch.as_tensor(ok, device=var.device)] = 25.0
    timings[f"stage1_{st.name}"] = _elapsed(t0, dev)

    for k, st in enumerate(stages[1:], start=2):
        t0 = time.perf_counter()
        pts = box_points(pos, st.size, st.spacing_mm)
        values = sampler.sample(pts, st.spacing_mm)
        with amp:
            logits = cascade.nets[k - 1](cascade.local_input(values))
        new_pos, new_var, _ = soft_argmax(pick_channels(logits.float(), lm_idx), pts)
        spreads.append(new_var.sum(-1).sqrt())
        if fuse:
            w_new, w_old = 1.0 / new_var.clamp_min(1e-4), 1.0 / var.clamp_min(1e-4)
            pos = (new_pos * w_new + pos * w_old) / (w_new + w_old)
            var = 1.0 / (w_new + w_old)
        else:
            pos, var = new_pos, new_var
        positions.append(pos)
        timings[f"stage{k}_{st.name}"] = _elapsed(t0, dev)

    positions_np = torch.stack(positions).cpu().double().numpy()
    spreads_np = torch.stack(spreads).cpu().double().numpy()
    # confidence from the maps and the stages' agreement, before the shape prior moves the last point
    conf = confidence_from(stages, positions_np, spreads_np, bone_ml)
    image = {}
    if shape is not None:
        t0 = time.perf_counter()
        own = positions_np[-1].copy()
        cand = presence >= 0.5 if presence is not None else np.ones(n_lm, bool)
        bad, _ = shape.check(own, cand)
        others = cand & ~bad
        frame = shape.frame(own, others)
        estimate = np.full_like(own, np.nan)
        if others.sum() >= ShapePrior.MIN_SHARE * n_lm:
            estimate = shape.leave_one_out(own, others)
        image = {"image_positions": own, "image_variance": var.cpu().double().numpy(), "shape_estimate": estimate,
                 "shape_frame": frame}
        if prior is not None:
            positions_np[-1] = prior.fuse(own, image["image_variance"], estimate, frame)
        timings["shape_prior"] = time.perf_counter() - t0
        if prior is not None and symmetry is not None:
            # the head's left-right axis from the found landmarks (few on a partial scan) and the scanner's:
            # patients lie about straight
            axes = [lateral_axis(frame, shape.mean, symmetry.mirror), np.array([1.0, 0.0, 0.0])]
            if symmetry.chin is not None:
                t0 = time.perf_counter()
                positions_np[-1], _ = onto_midline(positions_np[-1], symmetry.chin & others, sampler, axes)
                timings["chin_midline"] = time.perf_counter() - t0
            if symmetry.pairs:
                t0 = time.perf_counter()
                deep = others & (sampler.depth_mm(positions_np[-1]) >= symmetry.min_depth_mm)
                pairs = [(i, j) for i, j in symmetry.pairs if deep[i] and deep[j]]
                positions_np[-1], _ = pairs_onto_midplane(positions_np[-1], pairs, sampler, axes)
                timings["midplane_pairs"] = time.perf_counter() - t0
    inside = inside_fraction(sampler, positions_np[-1], stages[-1].extent_mm)
    return CascadeOutput(positions_np, spreads_np, conf, bone_ml, timings, presence, inside,
                         sampler.depth_mm(positions_np[-1]), reseeded, np.asarray(centre, np.float64),
                         region=sampler.region, **image)


def _elapsed(t0: float, dev: torch.device) -> float:
    """Seconds since ``t0``, after the device's queued work: CUDA kernels run asynchronously, so without the
    wait a stage's time would be its launches' and the next stage would be charged for it."""
    import time

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t0


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
