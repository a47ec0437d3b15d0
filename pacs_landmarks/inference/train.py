"""Training the cascade on cases with known landmarks (``pacs-landmarks train``).

All stages train together, each on its own inputs:

- stage 1 sees the whole head box, moved (+-15 mm), turned (+-12 deg about a random axis) and scaled
  (+-10 %) at random;
- stage k > 1 sees one crop per landmark centred on the truth plus a random offset as large as stage k-1's
  current error (a running mean over recent batches, never below a floor), so it learns to correct the
  errors it will be given; crops are also turned and scaled.

Augmentation is free: crops are read through a rotated/scaled box of points in mm (``grid_sample``).  Intensity
augmentation: gain, offset and noise in HU (``augment_hu``).

The same loop trains a 2D model on cephalograms (the landmark set, from ``--landmark-set`` or the data, says
which): boxes turn by +-10 deg in the image plane, scale +-10 %, and intensities get what real X-rays vary in
(``augment_xray``: gamma, contrast, brightness, inversion, blur, sharpening, noise), so that nothing depends
on the look of our synthetic images; collimation cuts (a side of the image blanked, white or black) teach
the presence output.  Loss per stage: distance of the soft-argmax point to the truth (in
voxels of that stage) plus cross-entropy of the probability map against a Gaussian at the truth (keeps maps
peaked, so their spread is a usable confidence).  A checkpoint after every epoch makes training resumable;
the model file is rewritten after every epoch too, so an interrupted run still leaves a usable model.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_cases: int = 4
    lr: float = 2e-3
    weight_decay: float = 1e-5
    seed: int = 0
    val_cases: int = 3  # last N cases held out for per-epoch validation (0: none)
    max_minutes: float = 0.0  # stop after the epoch that passes this wall time (0: no limit)
    threads: int = 2
    rotate_deg: float = 12.0
    scale: float = 0.10
    shift_mm: float = 15.0
    offset_floor_mm: tuple[float, ...] = (2.5, 1.0)  # minimum offset sigma per local stage
    ce_weight: float = 0.5
    local_landmarks: int = 8  # crops per case per step for each local stage
    presence_weight: float = 2.0  # weight of the presence loss (binary cross-entropy)
    outside_weight: float = 0.1  # stage-1 location loss weight of landmarks outside the scan range
    only: str = ""  # "presence": train the presence output alone (everything else frozen), e.g. after --init
    coverage: bool = True  # cut inputs to clinical scan ranges (coverage.TRAIN_WEIGHTS) and learn presence
    coverage_weights: dict = field(default_factory=dict)  # changes to coverage.TRAIN_WEIGHTS (scan range -> weight)
    domain: dict = field(default_factory=lambda: dict(DOMAIN))  # domain randomisation (see DOMAIN)
    extra: dict = field(default_factory=dict)
    landmark_set: str = ""  # "" = from the data (the first case's landmarks.json)
    truth: str = ""  # 2D cases: "" = landmarks.json's landmarks, "mean" of the annotators, or one annotator
    rotate_deg_2d: float = 10.0  # 2D: in-plane turns, global and local boxes
    offset_floor_mm_2d: tuple[float, ...] = (2.0, 0.4)
    image_cut_p: float = 0.2  # 2D: share of images with one side blanked (collimation)
    xray: dict = field(default_factory=lambda: dict(XRAY_DOMAIN))  # 2D intensity augmentation (XRAY_DOMAIN)


# Training-time domain randomisation of intensities (issue 10 section 4); each entry is a probability or range.
DOMAIN = {
    "gain": 0.05, "offset_hu": 30.0,  # every crop: gain +-5 %, offset +-30 HU
    "noise_hu": 60.0, "correlated_noise_p": 0.5,  # noise SD up to 60 HU, half of it spatially correlated
    "bone_density_p": 0.3, "bone_density": (0.45, 1.1),  # bone HU above soft tissue scaled
    "sharp_p": 0.3, "sharp": (0.3, 1.5), "soft_p": 0.15,  # bone kernel (edge overshoot) / soft kernel
    "cbct_p": 0.15, "cbct_gain": (0.6, 1.4), "cbct_offset_hu": 300.0, "cupping_hu": 250.0,  # no HU calibration
}


# Intensity augmentation of X-ray crops (0..1, dense bright), per crop; each entry a probability or range.
XRAY_DOMAIN = {
    "gamma": 0.5,  # grey ** exp(U(-0.5, 0.5)): 0.6 .. 1.65, vendor tone curves
    "gain": 0.25, "offset": 0.15,  # contrast and brightness (windowing)
    "invert_p": 0.1,  # MONOCHROME1 shown wrong / negative film
    "blur_p": 0.25, "sharp_p": 0.35, "sharp": (0.3, 2.0),  # soft detectors / unsharp-masked presentation
    "noise": 0.04, "correlated_noise_p": 0.5,
}


def augment_xray(x: torch.Tensor, gen: torch.Generator, domain: dict | None = None) -> torch.Tensor:
    """Random tone curve, contrast, inversion, blur / sharpening and noise of X-ray crops (N, H, W) 0..1."""
    d = XRAY_DOMAIN if domain is None else domain
    n = x.shape[0]
    shape = (n,) + (1,) * (x.dim() - 1)
    x = x.clamp(0.0, 1.0)
    x = torch.where(torch.rand(shape, generator=gen) < d["invert_p"], 1.0 - x, x)
    x = x.clamp_min(1e-4) ** torch.exp(_uniform(shape, -d["gamma"], d["gamma"], gen))
    pool = lambda v: F.avg_pool2d(v[:, None], 3, 1, 1, count_include_pad=False)[:, 0]  # noqa: E731
    r = torch.rand(shape, generator=gen)
    smooth = pool(x)
    sharp = torch.where(r < d["sharp_p"], _uniform(shape, *d["sharp"], gen), torch.zeros(shape))
    x = x + sharp * (x - smooth)
    x = torch.where((r >= d["sharp_p"]) & (r < d["sharp_p"] + d["blur_p"]), smooth, x)
    noise = torch.randn(x.shape, generator=gen)
    noise = torch.where(torch.rand(shape, generator=gen) < d["correlated_noise_p"], pool(noise) * 3.0, noise)
    x = x + torch.rand(shape, generator=gen) * d["noise"] * noise
    gain = 1 + (torch.rand(shape, generator=gen) * 2 - 1) * d["gain"]
    offset = (torch.rand(shape, generator=gen) * 2 - 1) * d["offset"]
    return (x - 0.5) * gain + 0.5 + offset


@dataclass
class ImageCut:
    """A 2D training image blanked outside [x0, x1] x [y0, y1] mm with ``fill`` (collimation; "full" = none)."""

    kind: str
    x0: float = -np.inf
    x1: float = np.inf
    y0: float = -np.inf
    y1: float = np.inf
    fill: float = 0.0

    def contains(self, pts: np.ndarray) -> np.ndarray:
        return (pts[..., 0] >= self.x0) & (pts[..., 0] <= self.x1) & (pts[..., 1] >= self.y0) & (pts[..., 1] <= self.y1)

    def mask(self, pts: torch.Tensor) -> torch.Tensor:
        return (pts[..., 0] >= self.x0) & (pts[..., 0] <= self.x1) & (pts[..., 1] >= self.y0) & (pts[..., 1] <= self.y1)


def draw_image_cut(extent_mm: tuple[float, float], p: float, rng: np.random.Generator) -> ImageCut:
    """With probability ``p`` one side of an image (width, height mm) blanked 10-70 mm deep, white or black."""
    if rng.random() >= p:
        return ImageCut("full")
    w, h = extent_mm
    depth = float(rng.uniform(10.0, 70.0))
    side = int(rng.integers(4))
    bounds = [(0.0 + depth, np.inf, -np.inf, np.inf), (-np.inf, w - depth, -np.inf, np.inf),
              (-np.inf, np.inf, 0.0 + depth, np.inf), (-np.inf, np.inf, -np.inf, h - depth)][side]
    return ImageCut("cut", *bounds, fill=float(rng.integers(2)))


def _gaussian_ce(prob_log: torch.Tensor, pts: torch.Tensor, truth: torch.Tensor, sigma: float) -> torch.Tensor:
    d2 = ((pts - truth[:, None, :]) ** 2).sum(-1)
    target = torch.softmax(-d2 / (2 * sigma * sigma), dim=1)
    return -(target * prob_log).sum(1)


def _stage_loss(logits: torch.Tensor, pts: torch.Tensor, truth: torch.Tensor, spacing: float, ce_weight: float,
                weight: torch.Tensor | None = None):
    n = logits.shape[0]
    flat = logits.reshape(n, -1).float()
    logp = torch.log_softmax(flat, 1)
    p = logp.exp()
    pts = pts.reshape(n, -1, pts.shape[-1])
    pos = torch.einsum("np,npc->nc", p, pts)
    valid = torch.isfinite(truth).all(1)
    t = torch.where(valid[:, None], truth, pos.detach())
    dist = (pos - t).norm(dim=1)
    ce = _gaussian_ce(logp, pts, t, 1.5 * spacing)
    per = dist / spacing + ce_weight * ce
    w = valid.float() if weight is None else valid.float() * weight
    loss = (per * w).sum() / valid.sum().clamp_min(1)
    scored = valid if weight is None else valid & (weight >= 1.0)
    return loss, dist.detach()[scored], pos.detach()


def _uniform(shape, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=gen)


def augment_hu(hu: torch.Tensor, gen: torch.Generator, domain: dict | None = None) -> torch.Tensor:
    """Domain randomisation of sampled HU (N, D, H, W): what real scanners do to intensities (``DOMAIN``).

    Bone density (elderly, children, physical phantoms), reconstruction kernel (sharp: unsharp masking with
    edge overshoot; soft: smoothing), noise up to 60 HU, white or correlated, and cone-beam CT's missing HU
    calibration (per-crop gain and offset) with cupping (a darker centre).  Air outside the volume stays air:
    the sampler pads with it, and the network must see where the data ends.
    """
    d = DOMAIN if domain is None else domain
    n = hu.shape[0]
    shape = (n,) + (1,) * (hu.dim() - 1)
    pad = hu <= -999.5
    x = hu
    f = torch.where(torch.rand(shape, generator=gen) < d["bone_density_p"],
                    _uniform(shape, *d["bone_density"], gen), torch.ones(shape))
    x = torch.where(x > 100.0, 100.0 + (x - 100.0) * f, x)
    pool = lambda v: F.avg_pool3d(v[:, None], 3, 1, 1, count_include_pad=False)[:, 0]  # noqa: E731
    r = torch.rand(shape, generator=gen)
    sharp = torch.where(r < d["sharp_p"], _uniform(shape, *d["sharp"], gen), torch.zeros(shape))
    soft = (r >= d["sharp_p"]) & (r < d["sharp_p"] + d["soft_p"])
    smooth = pool(x)
    x = x + sharp * (x - smooth)
    x = torch.where(soft, smooth, x)
    sigma = torch.rand(shape, generator=gen) * d["noise_hu"]
    noise = torch.randn(hu.shape, generator=gen)
    corr = torch.rand(shape, generator=gen) < d["correlated_noise_p"]
    noise = torch.where(corr, pool(noise) * 3.0, noise)  # a 3^3 mean keeps 1/sqrt(27) of the SD: scale back ~
    x = x + sigma * noise
    gain = 1 + (torch.rand(shape, generator=gen) * 2 - 1) * d["gain"]
    offset = (torch.rand(shape, generator=gen) * 2 - 1) * d["offset_hu"]
    cb = torch.rand(shape, generator=gen) < d["cbct_p"]
    gain = torch.where(cb, _uniform(shape, *d["cbct_gain"], gen), gain)
    offset = torch.where(cb, (torch.rand(shape, generator=gen) * 2 - 1) * d["cbct_offset_hu"], offset)
    x = x * gain + offset
    if hu.dim() == 4:  # cupping across the axial plane (box axes h, w = LPS y, x)
        s = hu.shape[-1]
        c = torch.linspace(-1, 1, s)
        r2 = (c[:, None] ** 2 + c[None, :] ** 2).clamp(max=1.0)
        cup = torch.rand(shape, generator=gen) * d["cupping_hu"] * cb
        x = x - cup * (1 - r2)[None, None]
    return torch.where(pad, hu, x)


def _region_mask(region, pts: torch.Tensor) -> torch.Tensor:
    """Inside ``region`` (coverage.Region for LPS points (..., 3), ``ImageCut`` for 2D points)."""
    if isinstance(region, ImageCut):
        return region.mask(pts)
    z = pts[..., 2]
    ok = (z >= region.z_lo) & (z <= region.z_hi)
    if region.cylinder is not None:
        cx, cy, rad = region.cylinder
        ok &= (pts[..., 0] - cx) ** 2 + (pts[..., 1] - cy) ** 2 <= rad * rad
    return ok


def _cut_centre(points: np.ndarray, soft: np.ndarray, region, voxel_ml: float, fallback: np.ndarray) -> np.ndarray:
    """Where inference would put the stage-1 box on the cut volume (as ``cascade.head_centre``)."""
    bone = points[region.contains(points)] if len(points) else points
    if len(bone) * voxel_ml > 20.0:
        return bone.mean(0)
    s = soft[region.contains(soft)] if len(soft) else soft
    return s.mean(0) if len(s) else fallback


def _blank(values: torch.Tensor, pts: torch.Tensor, regions: list, per_case: int, outside: float) -> torch.Tensor:
    """Values outside each case's region replaced: air (CT scan range) or the cut's fill (2D collimation);
    ``per_case`` boxes per region, in order."""
    keep = torch.cat([_region_mask(r, pts[j * per_case:(j + 1) * per_case]) for j, r in enumerate(regions)])
    fill = torch.cat([torch.full((per_case,) + (1,) * (values.dim() - 1), getattr(r, "fill", outside))
                      for r in regions])
    return torch.where(keep, values, fill.to(values.dtype))


def train(data_dir: str | Path, out: str | Path, config: TrainConfig, cache_dir: str | Path | None = None,
          resume: bool = False, init: str | Path | None = None, progress: bool = True,
          label_map: dict[str, str] | None = None) -> dict:
    """Train and write the model file ``out`` (and ``out``.ckpt for resuming). Returns the summary."""
    from tqdm import tqdm

    from pacs_landmarks.inference.cascade import (BONE_HU, Cascade, default_stages, head_centre, image_centre,
                                                  pick_channels, run_cascade)
    from pacs_landmarks.inference.data import DataError, detect_landmark_set, load_cases
    from pacs_landmarks.inference.model import LandmarkModel, new_metadata, save_model_file
    from pacs_landmarks.inference.sampling import box_points, random_rotations
    from pacs_landmarks.landmark_sets import landmark_names, set_dimension

    t_start = time.monotonic()
    torch.set_num_threads(config.threads)
    out = Path(out)
    ckpt_path = out.with_name(out.name + ".ckpt")
    landmark_set = config.landmark_set or detect_landmark_set(data_dir)
    try:
        names = landmark_names(landmark_set)
    except KeyError:
        raise DataError(f"unknown landmark set {landmark_set!r}") from None
    dim = set_dimension(landmark_set)
    n_lm = len(names)
    meta0 = new_metadata(landmark_set)
    log.info("training a %dD model for landmark set %s", dim, landmark_set)

    cases = load_cases(data_dir, names, landmark_set, cache_dir, progress, label_map, config.truth or None)
    n_val = min(config.val_cases, max(0, len(cases) - 1))
    train_cases, val_cases = (cases[:-n_val], cases[-n_val:]) if n_val else (cases, [])
    if not train_cases:
        raise DataError("no training cases")

    from pacs_landmarks.inference.coverage import draw_region, draw_training_kind, training_weights
    from pacs_landmarks.inference.shape import ShapeModel

    cut_weights = training_weights(config.coverage_weights)
    stages = default_stages(dim)
    cascade = Cascade(stages, n_lm, dim, meta0["intensity"]["unit"])
    rotate_deg = config.rotate_deg if dim == 3 else config.rotate_deg_2d
    local_rotate_deg = 15.0 if dim == 3 else config.rotate_deg_2d
    offset_floor = config.offset_floor_mm if dim == 3 else config.offset_floor_mm_2d
    augment = ((lambda v: augment_hu(v, gen, config.domain)) if dim == 3  # noqa: E731
               else (lambda v: augment_xray(v, gen, config.xray)))
    if init is not None:
        # weights of another model where they fit (a model without the presence head starts it from zero)
        own = cascade.state_dict()
        got = {k: v for k, v in LandmarkModel.load(init, device="cpu").cascade.state_dict().items()
               if k in own and own[k].shape == v.shape}
        cascade.load_state_dict(got, strict=False)
        log.info("initialised %d of %d tensors from %s", len(got), len(own), init)
    complete = np.stack([c.landmarks for c in train_cases])
    n_complete = int(np.isfinite(complete).all(axis=(1, 2)).sum())
    shape_model = ShapeModel.fit_shapes(complete) if n_complete >= 3 else None
    if shape_model is None:
        log.warning("only %d cases have every landmark: no shape model (no plausibility check)", n_complete)
    else:
        log.info("shape model: %d modes from %d shapes", len(shape_model.sd), n_complete)
    if config.only not in ("", "presence"):
        raise ValueError(f"only must be '' or 'presence', not {config.only!r}")
    if config.only == "presence":
        for name, prm in cascade.named_parameters():
            prm.requires_grad = ".presence_" in name
    params = [prm for prm in cascade.parameters() if prm.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train_cases) / config.batch_cases)
    total_steps = steps_per_epoch * config.epochs
    step_count = 0
    trained_s = 0.0  # training wall time so far (carried over by --resume)
    budget_s = config.max_minutes * 60.0

    def progress_frac() -> float:
        # Cosine decay over whichever ends first, the epochs or the time budget, so that a run cut short by
        # the budget still ends with a small learning rate.
        frac = step_count / max(total_steps, 1)
        if budget_s > 0:
            frac = max(frac, trained_s / budget_s)
        return min(frac, 1.0)

    def set_lr() -> float:
        lr = config.lr * min(1.0, (step_count + 1) / 20) * 0.5 * (1 + math.cos(math.pi * progress_frac()))
        for g in opt.param_groups:
            g["lr"] = lr
        return lr
    gen = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    # running mean error of each stage, used as the offset scale of the next one
    err_ema = [8.0] + [3.0] * (len(stages) - 1)
    history: list[dict] = []
    start_epoch = 0
    if resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        cascade.load_state_dict(ck["weights"])
        opt.load_state_dict(ck["optimizer"])
        step_count = int(ck["step_count"])
        trained_s = float(ck["trained_s"])
        gen.set_state(ck["torch_rng"])
        rng = np.random.default_rng(int(ck["np_seed"]))
        err_ema = list(ck["err_ema"])
        history = json.loads(ck["history"])
        start_epoch = int(ck["epoch"])
        log.info("resuming from %s at epoch %d", ckpt_path, start_epoch + 1)
    elif resume:
        log.info("no checkpoint at %s: starting from scratch", ckpt_path)

    # Stage-1 inputs come from a box-filtered copy made once per case; local crops from the full volume.
    centres = []
    coarse = []
    bone_pts, soft_pts, voxel_mls, extents = [], [], [], []
    for c in train_cases:
        s = cascade.sampler(c.array, c.affine, as_scanned=False)
        vol, inv = s._level(stages[0].spacing_mm)
        aff = np.linalg.inv(inv.double().numpy())
        coarse.append(cascade.sampler(vol[0, 0].clone(), aff, as_scanned=False))
        if dim == 2:
            centres.append(image_centre(s))
            extents.append((s.shape[1] * s.spacing[1], s.shape[0] * s.spacing[0]))  # (width, height) mm
            continue
        centre, _ = head_centre(s, stages[0].spacing_mm)
        centres.append(centre)
        arr = vol[0, 0]
        to_lps = lambda m: torch.nonzero(m).double().numpy() @ aff[:3, :3].T + aff[:3, 3]  # noqa: E731
        bone_pts.append(to_lps(arr > BONE_HU))
        soft_pts.append(to_lps(arr > -300.0)[::4])
        voxel_mls.append(abs(np.linalg.det(aff[:3, :3])) / 1000.0)
    truths = [torch.as_tensor(c.landmarks, dtype=torch.float32) for c in train_cases]

    summary_training = {
        "cases": len(train_cases), "validation_cases": len(val_cases),
        "case_names": [c.name for c in train_cases],
        "pixel_spacing_mm": sorted({round(c.spacing[-1], 3) for c in train_cases}),
        "config": {k: v for k, v in config.__dict__.items() if k != "extra"} | config.extra,
    }
    if dim == 3:
        summary_training["slice_thickness_mm"] = sorted({round(c.slice_thickness, 3) for c in train_cases})
    else:
        summary_training["data"] = ("synthetic cephalograms only (pacs-landmarks phantom --ceph)"
                                    if all(c.synthetic for c in cases) else "imported cephalograms")
        summary_training["image_size_px"] = sorted({tuple(int(v) for v in c.array.shape) for c in train_cases})[:5]
    cov_rng = np.random.default_rng(config.seed + 17)

    def val_metrics() -> dict:
        if not val_cases:
            return {}
        cascade.eval()
        errs = []
        for c in val_cases:
            o = run_cascade(cascade, cascade.sampler(c.array, c.affine))
            errs.append(np.linalg.norm(o.positions - c.landmarks[None], axis=-1))
        cascade.train()
        e = np.nanmean(np.stack(errs), axis=(0, 2))
        return {f"val_mre_{s.name}": round(float(v), 3) for s, v in zip(stages, e)}

    def save(epoch: int, final: bool) -> None:
        name = config.extra.get("name") or ("craniofacial16-demo" if landmark_set == "craniofacial16"
                                            else f"{landmark_set}-model")
        meta = new_metadata(landmark_set, name=name, version=config.extra.get("version", "1.0.0"))
        if dim == 2 and summary_training["data"].startswith("synthetic"):
            meta["description"] += " Trained on synthetic cephalograms only: not for clinical use."
        elif dim == 2:
            meta["description"] += " Trained on imported cephalograms: research use only, not for clinical use."
        meta["training"] = dict(summary_training, epochs_done=epoch, history=history[-3:],
                                wall_minutes=round((time.monotonic() - t_start) / 60, 1), final=final)
        meta["shape_model"] = shape_model.to_json() if shape_model is not None else None
        save_model_file(out, cascade, meta)
        ck = {"weights": cascade.state_dict(), "optimizer": opt.state_dict(), "step_count": step_count, "trained_s": trained_s,
              "torch_rng": gen.get_state(), "np_seed": int(rng.integers(2**31)), "err_ema": err_ema,
              "history": json.dumps(history), "epoch": epoch}
        tmp = ckpt_path.with_name(ckpt_path.name + ".tmp")
        torch.save(ck, tmp)
        tmp.replace(ckpt_path)

    cascade.train()
    for epoch in range(start_epoch, config.epochs):
        order = rng.permutation(len(train_cases))
        sums = np.zeros(len(stages))
        counts = np.zeros(len(stages))
        sums_p = [0.0, 0]
        loss_sum = 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", unit="step",
                   disable=not progress, leave=False)
        for step in bar:
            t_step = time.monotonic()
            lr = set_lr()
            idx = order[step * config.batch_cases:(step + 1) * config.batch_cases]
            if len(idx) == 0:
                continue
            b = len(idx)
            truth = torch.stack([truths[i] for i in idx])  # (B, L, 3)
            total = 0.0
            # scan ranges: each case of the batch cut to a clinical range (or left whole)
            regions, present, case_centres = [], [], []
            for j, i in enumerate(idx):
                tnp = truths[i].numpy().astype(np.float64)
                if dim == 2:
                    region = draw_image_cut(extents[i], config.image_cut_p, cov_rng)
                    inside = region.contains(tnp) & np.isfinite(tnp).all(1)
                    if not inside.any():
                        region = ImageCut("full")
                        inside = np.isfinite(tnp).all(1)
                    regions.append(region)
                    present.append(inside)
                    case_centres.append(centres[i])
                    continue
                kind = draw_training_kind(cov_rng, cut_weights) if config.coverage else "full"
                region = draw_region(kind, dict(zip(names, tnp)), cov_rng)
                inside = region.contains(tnp) & np.isfinite(tnp).all(1)
                if not inside.any():
                    region = draw_region("full", {}, cov_rng)
                    inside = np.isfinite(tnp).all(1)
                regions.append(region)
                present.append(inside)
                case_centres.append(centres[i] if region.kind == "full" else
                                    _cut_centre(bone_pts[i], soft_pts[i], region, voxel_mls[i], centres[i]))
            present_t = torch.as_tensor(np.stack(present))  # (B, L) bool
            # stage 1
            st = stages[0]
            shift = (torch.rand(b, dim, generator=gen) * 2 - 1) * config.shift_mm
            ctr = torch.as_tensor(np.stack(case_centres), dtype=torch.float32) + shift
            rot = random_rotations(b, rotate_deg, gen, dim)
            scl = 1 + (torch.rand(b, generator=gen) * 2 - 1) * config.scale
            pts = box_points(ctr, st.size, st.spacing_mm, rot, scl)
            hu = torch.cat([coarse[i].sample(pts[j:j + 1], st.spacing_mm) for j, i in enumerate(idx)])
            hu = _blank(hu, pts, regions, 1, cascade.outside)
            logits, pres = cascade.nets[0](cascade.global_input(augment(hu)), with_presence=True)
            lp = logits.reshape(b * n_lm, *logits.shape[2:])
            p_all = pts[:, None].expand(b, n_lm, *pts.shape[1:]).reshape(b * n_lm, *pts.shape[1:])
            # A landmark outside the scan range still has a (weak) target: where the head continues, so its map
            # points past the cut and the presence output sees air or an edge there.
            w_out = torch.where(present_t.reshape(-1), 1.0, config.outside_weight)
            loss, dist, _ = _stage_loss(lp, p_all, truth.reshape(-1, dim), st.spacing_mm, config.ce_weight, w_out)
            if config.only != "presence":
                total = total + loss
            if pres is not None:
                total = total + config.presence_weight * F.binary_cross_entropy_with_logits(
                    pres, present_t.float())
                pres_acc = float(((pres > 0) == present_t).float().mean())
                sums_p[0] += pres_acc
                sums_p[1] += 1
            sums[0] += float(dist.sum())
            counts[0] += dist.numel()
            err_ema[0] = 0.9 * err_ema[0] + 0.1 * float(dist.mean()) if dist.numel() else err_ema[0]
            if config.only == "presence":  # the local stages are frozen: nothing to run for them
                opt.zero_grad(set_to_none=True)
                total.backward()
                opt.step()
                step_count += 1
                trained_s += time.monotonic() - t_step
                loss_sum += float(total.detach())
                continue
            # local stages: crops around truth + offsets as large as the previous stage's error
            # (a random subset of landmarks per case: the local stages cost most, and every landmark still
            # comes round often)
            samplers = {int(i): cascade.sampler(train_cases[i].array, train_cases[i].affine, as_scanned=False)
                        for i in idx}
            m = min(n_lm, config.local_landmarks)
            lm_idx = torch.stack([torch.randperm(n_lm, generator=gen)[:m] for _ in range(b)])  # (B, m)
            t_flat = torch.gather(truth, 1, lm_idx[..., None].expand(b, m, dim)).reshape(-1, dim)
            # a landmark outside the scan range has no local truth to learn from
            in_range = torch.gather(present_t, 1, lm_idx).reshape(-1)
            t_flat = torch.where(in_range[:, None], t_flat, torch.full_like(t_flat, float("nan")))
            lm_idx = lm_idx.reshape(-1)
            ok = torch.isfinite(t_flat).all(1)
            t_centre = torch.where(ok[:, None], t_flat, torch.as_tensor(
                np.repeat(np.stack([centres[i] for i in idx]), m, 0), dtype=torch.float32))
            for k, st in enumerate(stages[1:], start=1):
                floor = offset_floor[min(k - 1, len(offset_floor) - 1)]
                lim = 0.35 * st.extent_mm
                sigma = min(max(floor, err_ema[k - 1]), 0.5 * lim)
                off = torch.randn(b * m, dim, generator=gen) * sigma
                off = off * (lim / off.norm(dim=1, keepdim=True).clamp_min(lim)).clamp(max=1.0)
                rot = random_rotations(b * m, local_rotate_deg, gen, dim)
                scl = 1 + (torch.rand(b * m, generator=gen) * 2 - 1) * config.scale
                pts = box_points(t_centre + off, st.size, st.spacing_mm, rot, scl)
                hu = torch.cat([samplers[int(i)].sample(pts[j * m:(j + 1) * m], st.spacing_mm)
                                for j, i in enumerate(idx)])
                hu = _blank(hu, pts, regions, m, cascade.outside)
                logits = cascade.nets[k](cascade.local_input(augment(hu)))
                loss, dist, _ = _stage_loss(pick_channels(logits, lm_idx), pts, t_flat, st.spacing_mm,
                                            config.ce_weight)
                total = total + loss
                sums[k] += float(dist.sum())
                counts[k] += dist.numel()
                if dist.numel():
                    err_ema[k] = 0.9 * err_ema[k] + 0.1 * float(dist.mean())
            opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            step_count += 1
            trained_s += time.monotonic() - t_step
            loss_sum += float(total.detach())
            bar.set_postfix({s.name: f"{sums[k] / max(counts[k], 1):.2f}mm" for k, s in enumerate(stages)})
        row = {"epoch": epoch + 1, "loss": round(loss_sum / steps_per_epoch, 4),
               "lr": round(lr, 6),
               "minutes": round((time.monotonic() - t_start) / 60, 2)}
        row |= {f"train_err_{s.name}": round(float(sums[k] / max(counts[k], 1)), 3) for k, s in enumerate(stages)}
        if sums_p[1]:
            row["train_presence_acc"] = round(sums_p[0] / sums_p[1], 4)
        row |= val_metrics()
        history.append(row)
        line = "  ".join(f"{k}={v}" for k, v in row.items())
        log.info("%s", line)
        if progress:
            print(line, flush=True)
        out_of_time = budget_s > 0 and trained_s >= budget_s
        save(epoch + 1, final=(epoch + 1 == config.epochs) or bool(out_of_time))
        if out_of_time and epoch + 1 < config.epochs:
            log.warning("time budget of %.1f min reached after epoch %d: stopping", config.max_minutes, epoch + 1)
            break
    if start_epoch >= config.epochs:
        save(config.epochs, final=True)
    return {"model": str(out), "checkpoint": str(ckpt_path), "history": history}
