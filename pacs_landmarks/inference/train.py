"""Training the cascade on cases with known landmarks (``pacs-landmarks train``).

All stages train together, each on its own inputs:

- stage 1 sees the whole head box, moved (+-15 mm), turned (+-12 deg about a random axis) and scaled
  (+-10 %) at random;
- stage k > 1 sees one crop per landmark centred on the truth plus a random offset as large as stage k-1's
  current error (a running mean over recent batches, never below a floor), so it learns to correct the
  errors it will be given; crops are also turned and scaled.

Augmentation is free: crops are read through a rotated/scaled box of LPS points (``grid_sample``).  Intensity
augmentation: gain, offset and noise in HU.  Loss per stage: distance of the soft-argmax point to the truth (in
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
    extra: dict = field(default_factory=dict)


def _gaussian_ce(prob_log: torch.Tensor, pts: torch.Tensor, truth: torch.Tensor, sigma: float) -> torch.Tensor:
    d2 = ((pts - truth[:, None, :]) ** 2).sum(-1)
    target = torch.softmax(-d2 / (2 * sigma * sigma), dim=1)
    return -(target * prob_log).sum(1)


def _stage_loss(logits: torch.Tensor, pts: torch.Tensor, truth: torch.Tensor, spacing: float, ce_weight: float):
    n = logits.shape[0]
    flat = logits.reshape(n, -1).float()
    logp = torch.log_softmax(flat, 1)
    p = logp.exp()
    pts = pts.reshape(n, -1, 3)
    pos = torch.einsum("np,npc->nc", p, pts)
    valid = torch.isfinite(truth).all(1)
    t = torch.where(valid[:, None], truth, pos.detach())
    dist = (pos - t).norm(dim=1)
    ce = _gaussian_ce(logp, pts, t, 1.5 * spacing)
    per = dist / spacing + ce_weight * ce
    loss = (per * valid).sum() / valid.sum().clamp_min(1)
    return loss, dist.detach()[valid], pos.detach()


def _augment_hu(hu: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = hu.shape[0]
    shape = (n,) + (1,) * (hu.dim() - 1)
    gain = 1 + (torch.rand(shape, generator=gen) * 2 - 1) * 0.05
    offset = (torch.rand(shape, generator=gen) * 2 - 1) * 30
    noise = torch.rand(shape, generator=gen) * 20
    air = hu <= -990  # keep air at air: the sampler pads outside the volume with it
    out = hu * gain + offset + noise * torch.randn(hu.shape, generator=gen)
    return torch.where(air, hu, out)


def train(data_dir: str | Path, out: str | Path, config: TrainConfig, cache_dir: str | Path | None = None,
          resume: bool = False, init: str | Path | None = None, progress: bool = True) -> dict:
    """Train and write the model file ``out`` (and ``out``.ckpt for resuming). Returns the summary."""
    from tqdm import tqdm

    from pacs_landmarks.inference.cascade import (DEFAULT_STAGES, Cascade, global_input, head_centre,
                                                  local_input, pick_channels, run_cascade)
    from pacs_landmarks.inference.data import DataError, load_cases
    from pacs_landmarks.inference.model import LandmarkModel, new_metadata, save_model_file
    from pacs_landmarks.inference.sampling import VolumeSampler, box_points, random_rotations
    from pacs_landmarks.landmark_sets import landmark_names

    t_start = time.monotonic()
    torch.set_num_threads(config.threads)
    out = Path(out)
    ckpt_path = out.with_name(out.name + ".ckpt")
    landmark_set = "craniofacial16"
    names = landmark_names(landmark_set)
    n_lm = len(names)

    cases = load_cases(data_dir, names, landmark_set, cache_dir, progress)
    n_val = min(config.val_cases, max(0, len(cases) - 1))
    train_cases, val_cases = (cases[:-n_val], cases[-n_val:]) if n_val else (cases, [])
    if not train_cases:
        raise DataError("no training cases")

    stages = DEFAULT_STAGES
    cascade = Cascade(stages, n_lm)
    if init is not None:
        cascade.load_state_dict(LandmarkModel.load(init, device="cpu").cascade.state_dict())
    opt = torch.optim.AdamW(cascade.parameters(), lr=config.lr, weight_decay=config.weight_decay)
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
    for c in train_cases:
        s = VolumeSampler(c.array, c.affine)
        centre, _ = head_centre(s, stages[0].spacing_mm)
        vol, inv = s._level(stages[0].spacing_mm)
        coarse.append(VolumeSampler(vol[0, 0].clone(), np.linalg.inv(inv.double().numpy())))
        centres.append(centre)
    truths = [torch.as_tensor(c.landmarks, dtype=torch.float32) for c in train_cases]

    summary_training = {
        "cases": len(train_cases), "validation_cases": len(val_cases),
        "case_names": [c.name for c in train_cases],
        "slice_thickness_mm": sorted({round(c.slice_thickness, 3) for c in train_cases}),
        "pixel_spacing_mm": sorted({round(c.spacing[2], 3) for c in train_cases}),
        "config": {k: v for k, v in config.__dict__.items() if k != "extra"} | config.extra,
    }

    def val_metrics() -> dict:
        if not val_cases:
            return {}
        cascade.eval()
        errs = []
        for c in val_cases:
            o = run_cascade(cascade, VolumeSampler(c.array, c.affine))
            errs.append(np.linalg.norm(o.positions - c.landmarks[None], axis=-1))
        cascade.train()
        e = np.nanmean(np.stack(errs), axis=(0, 2))
        return {f"val_mre_{s.name}": round(float(v), 3) for s, v in zip(stages, e)}

    def save(epoch: int, final: bool) -> None:
        meta = new_metadata(name="craniofacial16-demo", version=config.extra.get("version", "1.0.0"))
        meta["training"] = dict(summary_training, epochs_done=epoch, history=history[-3:],
                                wall_minutes=round((time.monotonic() - t_start) / 60, 1), final=final)
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
            # stage 1
            st = stages[0]
            shift = (torch.rand(b, 3, generator=gen) * 2 - 1) * config.shift_mm
            ctr = torch.as_tensor(np.stack([centres[i] for i in idx]), dtype=torch.float32) + shift
            rot = random_rotations(b, config.rotate_deg, gen)
            scl = 1 + (torch.rand(b, generator=gen) * 2 - 1) * config.scale
            pts = box_points(ctr, st.size, st.spacing_mm, rot, scl)
            hu = torch.cat([coarse[i].sample(pts[j:j + 1], st.spacing_mm) for j, i in enumerate(idx)])
            logits = cascade.nets[0](global_input(_augment_hu(hu, gen)))
            lp = logits.reshape(b * n_lm, *logits.shape[2:])
            p_all = pts[:, None].expand(b, n_lm, *pts.shape[1:]).reshape(b * n_lm, *pts.shape[1:])
            loss, dist, _ = _stage_loss(lp, p_all, truth.reshape(-1, 3), st.spacing_mm, config.ce_weight)
            total = total + loss
            sums[0] += float(dist.sum())
            counts[0] += dist.numel()
            err_ema[0] = 0.9 * err_ema[0] + 0.1 * float(dist.mean()) if dist.numel() else err_ema[0]
            # local stages: crops around truth + offsets as large as the previous stage's error
            # (a random subset of landmarks per case: the local stages cost most, and every landmark still
            # comes round often)
            samplers = {int(i): VolumeSampler(train_cases[i].array, train_cases[i].affine) for i in idx}
            m = min(n_lm, config.local_landmarks)
            lm_idx = torch.stack([torch.randperm(n_lm, generator=gen)[:m] for _ in range(b)])  # (B, m)
            t_flat = torch.gather(truth, 1, lm_idx[..., None].expand(b, m, 3)).reshape(-1, 3)
            lm_idx = lm_idx.reshape(-1)
            ok = torch.isfinite(t_flat).all(1)
            t_centre = torch.where(ok[:, None], t_flat, torch.as_tensor(
                np.repeat(np.stack([centres[i] for i in idx]), m, 0), dtype=torch.float32))
            for k, st in enumerate(stages[1:], start=1):
                floor = config.offset_floor_mm[min(k - 1, len(config.offset_floor_mm) - 1)]
                lim = 0.35 * st.extent_mm
                sigma = min(max(floor, err_ema[k - 1]), 0.5 * lim)
                off = torch.randn(b * m, 3, generator=gen) * sigma
                off = off * (lim / off.norm(dim=1, keepdim=True).clamp_min(lim)).clamp(max=1.0)
                rot = random_rotations(b * m, 15.0, gen)
                scl = 1 + (torch.rand(b * m, generator=gen) * 2 - 1) * config.scale
                pts = box_points(t_centre + off, st.size, st.spacing_mm, rot, scl)
                hu = torch.cat([samplers[int(i)].sample(pts[j * m:(j + 1) * m], st.spacing_mm)
                                for j, i in enumerate(idx)])
                logits = cascade.nets[k](local_input(_augment_hu(hu, gen)))
                loss, dist, _ = _stage_loss(pick_channels(logits, lm_idx), pts, t_flat, st.spacing_mm,
                                            config.ce_weight)
                total = total + loss
                sums[k] += float(dist.sum())
                counts[k] += dist.numel()
                if dist.numel():
                    err_ema[k] = 0.9 * err_ema[k] + 0.1 * float(dist.mean())
            opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(cascade.parameters(), 5.0)
            opt.step()
            step_count += 1
            trained_s += time.monotonic() - t_step
            loss_sum += float(total.detach())
            bar.set_postfix({s.name: f"{sums[k] / max(counts[k], 1):.2f}mm" for k, s in enumerate(stages)})
        row = {"epoch": epoch + 1, "loss": round(loss_sum / steps_per_epoch, 4),
               "lr": round(lr, 6),
               "minutes": round((time.monotonic() - t_start) / 60, 2)}
        row |= {f"train_err_{s.name}": round(float(sums[k] / max(counts[k], 1)), 3) for k, s in enumerate(stages)}
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
