"""A statistical shape model of the landmark configuration: Procrustes alignment + PCA (a point distribution
model, Cootes et al. 1995), learnt from the training truth and stored in the model file's metadata (JSON).

Landmarks of one head are not independent: given most of them, the rest lie within a few mm of where the
shape model puts them.  The cascade uses this twice:

- after the global stage, a landmark whose estimate does not fit the others is re-seeded from them, so the
  local stages start near the right place (``ShapeModel.check`` then ``predict``);
- after the last stage, a landmark that does not fit the others (leave-one-out residual beyond its
  threshold) is flagged ``implausible`` (``not_found``, "implausible position"); with only 2-4 of them (a
  dental CBCT, a mandible-only scan) too few to fit a shape, their distances in pairs are checked instead
  (``misfit_pairs``);
- after the last stage, each plausible point is combined, axis by axis, with where the others put it
  (``ShapePrior``): along an axis in which the image says little (a flat chin from side to side, the floor
  of the orbit, 5 mm slices along z) the configuration carries more weight.

Bilateral pairs and midline landmarks need no rule of their own: a Porion 30 mm away from its partner does
not fit any shape the model has seen.  Nothing here depends on the dimension: points are (L, D) with D = 3
for CT (a 2D cephalogram would use D = 2).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

# Leave-one-out residuals beyond max(FLOOR_MM, SIGMAS x the landmark's training residual SD) are implausible.
FLOOR_MM = 10.0
SIGMAS = 4.0
MIN_POINTS = 5  # fewer observed landmarks than this say too little about the rest
# Below MIN_POINTS, pairs of points are checked instead, in the same form: a pair whose distance is off its mean
# by more than max(FLOOR_MM, PAIR_SIGMAS x its SD) does not fit.  The SD is the model's shapes' and head
# size's in quadrature: the Procrustes model keeps no size; adult heads' S-N and N-Me lengths span about
# +-12 % (craniofacial-reference.md), the phantoms' size 0.88-1.08 (SD 4.7 %), so SIZE_SD 8 % of the mean.
# 3, not SIGMAS: few points carry less evidence each way, and at 4 a B point found 17 mm up on an incisor,
# 18.6 mm from A point (mean 42.5, SD 5.4), passed (docs/accuracy.md, "Too few points for a shape").
PAIR_SIGMAS = 3.0
SIZE_SD = 0.08


def _similarity(src: np.ndarray, dst: np.ndarray, w: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Weighted least-squares similarity (scale s, rotation R, translation t) with dst ~ s R src + t
    (Umeyama 1991; no reflections)."""
    w = w / w.sum()
    ms, md = w @ src, w @ dst
    a, b = src - ms, dst - md
    cov = (b * w[:, None]).T @ a
    u, sv, vt = np.linalg.svd(cov)
    d = np.ones(len(sv))
    d[-1] = np.sign(np.linalg.det(u @ vt)) or 1.0
    r = u @ np.diag(d) @ vt
    var = float(w @ (a * a).sum(1))
    s = float((sv * d).sum() / var) if var > 0 else 1.0
    return s, r, md - s * r @ ms


@dataclass
class ShapePrior:
    """How far to trust the image and the shape model for each landmark, measured on held-out cases
    (``evaluate --calibrate``; model metadata ``calibration.shape_prior``).

    The last stage's point has, per axis, the variance of its probability map; its error variance is
    ``image_scale`` times that (a map's width is not its error: a sharp map can be 0.3 mm off, a flat one 2 mm).
    The shape model's leave-one-out estimate from the other landmarks has error SD ``shape_sd`` along each of
    the head's axes (``ShapeModel.frame``).  ``fuse`` takes the inverse-covariance mean of the two -- the rule
    by which a local stage already combines its point with the previous stage's, per axis
    (``cascade.run_cascade``, ``fuse``).
    """

    image_scale: np.ndarray  # (L,) image error variance per mm^2 of map variance; 0: the image alone
    shape_sd: np.ndarray  # (L, D) mm, error SD of the leave-one-out estimate along the shape model's axes
    cases: int = 0

    # A point this far from the truth is a gross error, which the plausibility check is for: it does not
    # enter the variances (one such point would make a landmark's image look twice as unreliable as it is).
    GROSS_MM = 10.0
    MIN_CASES = 5
    # The estimate from the others is only as good as the others: with a quarter of the set missing (a scan
    # range that cuts the head, a small cone-beam field) its error grows beyond what complete heads show.
    MIN_SHARE = 0.75

    @classmethod
    def fit(cls, points: np.ndarray, variance: np.ndarray, estimate: np.ndarray, truth: np.ndarray,
            frames: np.ndarray, cases: int | None = None) -> "ShapePrior":
        """From held-out cases: ``points`` (N, L, D) the last stage's points, ``variance`` (N, L, D) their
        maps' variances (mm^2), ``estimate`` (N, L, D) the shape model's leave-one-out estimates, ``truth``
        (N, L, D), NaN where a landmark is not in the scan or has no estimate; ``frames`` (N, D, D) each
        head's rotation from the shape model's axes to the patient's (``ShapeModel.frame``)."""
        pts, var, est, tru, rot = (np.asarray(a, float) for a in (points, variance, estimate, truth, frames))
        n, n_lm, dim = pts.shape
        image_scale = np.zeros(n_lm)
        shape_sd = np.full((n_lm, dim), np.inf)
        for i in range(n_lm):
            # the estimate's error along the head's own axes, so that a tilted head is read as an upright one
            e_img, e_est = pts[:, i] - tru[:, i], np.einsum("nd,nde->ne", est[:, i] - tru[:, i], rot)
            ok = (np.isfinite(e_img).all(1) & np.isfinite(e_est).all(1) & np.isfinite(var[:, i]).all(1)
                  & (np.linalg.norm(e_img, axis=1) < cls.GROSS_MM) & (np.linalg.norm(e_est, axis=1) < cls.GROSS_MM))
            if ok.sum() < cls.MIN_CASES:
                continue  # too few to tell: the image alone
            image_scale[i] = float((e_img[ok] ** 2 / np.maximum(var[ok, i], 1e-4)).mean())
            shape_sd[i] = np.sqrt((e_est[ok] ** 2).mean(0))
        return cls(image_scale, shape_sd, n if cases is None else cases)

    def fuse(self, points: np.ndarray, variance: np.ndarray, estimate: np.ndarray, frame: np.ndarray) -> np.ndarray:
        """(L, D): each point with a finite ``estimate`` replaced by the inverse-covariance mean of the two (the
        image's covariance diagonal in patient axes, the estimate's in the head's, turned by ``frame``)."""
        pts = np.asarray(points, float).copy()
        est = np.asarray(estimate, float)
        var = np.maximum(np.asarray(variance, float), 1e-4)
        rot = np.asarray(frame, float)
        use = np.isfinite(est).all(1) & (self.image_scale > 0) & np.isfinite(self.shape_sd).all(1)
        for i in np.flatnonzero(use):
            a_img = np.diag(1.0 / (self.image_scale[i] * var[i]))
            a_est = rot @ np.diag(1.0 / np.maximum(self.shape_sd[i] ** 2, 1e-6)) @ rot.T
            pts[i] = np.linalg.solve(a_img + a_est, a_img @ pts[i] + a_est @ est[i])
        return pts

    def to_json(self) -> dict:
        return {"kind": "image-and-shape", "cases": self.cases, "image_scale": np.round(self.image_scale, 4).tolist(),
                "shape_sd": [[None if not np.isfinite(v) else round(float(v), 4) for v in row]
                             for row in self.shape_sd]}

    @classmethod
    def from_json(cls, doc: dict) -> "ShapePrior":
        if doc.get("kind") != "image-and-shape":
            raise ValueError(f"unknown shape prior kind {doc.get('kind')!r}")
        sd = np.array([[np.inf if v is None else v for v in row] for row in doc["shape_sd"]], float)
        scale = np.asarray(doc["image_scale"], float)
        if scale.ndim != 1 or sd.shape[0] != len(scale) or (scale < 0).any() or (sd <= 0).any():
            raise ValueError("shape prior: image_scale must be (L,) >= 0 and shape_sd (L, D) > 0")
        return cls(scale, sd, int(doc.get("cases", 0)))


@dataclass
class ShapeModel:
    mean: np.ndarray  # (L, D) mm, centred
    components: np.ndarray  # (K, L*D) orthonormal modes
    sd: np.ndarray  # (K,) mm, SD of each mode's coefficient
    residual_sd: np.ndarray  # (L,) mm, leave-one-out prediction error SD per landmark on the training shapes
    noise_mm: float = 1.5  # observation noise assumed when fitting

    @property
    def n_landmarks(self) -> int:
        return self.mean.shape[0]

    # ----------------------------------------------------------------------------------- learning
    @classmethod
    def fit_shapes(cls, shapes: np.ndarray, variance: float = 0.97, max_modes: int = 10) -> "ShapeModel":
        """Learn from complete training shapes (N, L, D) (shapes with a NaN are left out)."""
        x = np.asarray(shapes, float)
        x = x[np.isfinite(x).all(axis=(1, 2))]
        if len(x) < 3:
            raise ValueError("a shape model needs at least 3 complete shapes")
        x = x - x.mean(1, keepdims=True)
        mean = x[0].copy()
        for _ in range(20):  # generalised Procrustes analysis (scale kept in mm: mean size restored)
            aligned = np.stack([s * xi @ r.T + t for xi in x
                                for s, r, t in [_similarity(xi, mean, np.ones(len(xi)))]])
            new = aligned.mean(0)
            new -= new.mean(0)
            new *= np.sqrt((x ** 2).sum((1, 2)).mean() / (new ** 2).sum())
            if np.abs(new - mean).max() < 1e-6:
                break
            mean = new
        dev = (aligned - mean).reshape(len(x), -1)
        _, sv, vt = np.linalg.svd(dev, full_matrices=False)
        var = sv ** 2 / max(len(x) - 1, 1)
        k = int(min(max_modes, np.searchsorted(np.cumsum(var) / var.sum(), variance) + 1, len(x) - 1))
        model = cls(mean, vt[:k], np.sqrt(var[:k]), np.ones(mean.shape[0]))
        # Leave-one-out residual per landmark on the training shapes: what "fits the others" means.
        every = np.ones(model.n_landmarks, bool)
        res = np.stack([np.linalg.norm(model.leave_one_out(xi, every) - xi, axis=1) for xi in x])
        model.residual_sd = np.sqrt((res ** 2).mean(0))
        return model

    # ----------------------------------------------------------------------------------- using
    def predict(self, points: np.ndarray, observed: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """All L points (L, D) of the model shape that fits ``points[observed]`` best (pose + modes)."""
        pts = np.asarray(points, float)
        obs = np.asarray(observed, bool) & np.isfinite(pts).all(1)
        w = np.ones(len(pts)) if weights is None else np.asarray(weights, float)
        w = np.where(obs, np.maximum(w, 1e-3), 0.0)
        if obs.sum() < 3:
            return np.full_like(pts, np.nan)
        dim = pts.shape[1]
        b = np.zeros(len(self.sd))
        p = self.components.reshape(len(self.sd), -1, dim)  # (K, L, D)
        for _ in range(6):
            tmpl = self.mean + np.einsum("k,kld->ld", b, p)
            s, r, t = _similarity(tmpl[obs], pts[obs], w[obs])
            y = (pts[obs] - t) @ r / s  # observed points in the model frame
            a = p[:, obs].reshape(len(self.sd), -1).T  # (n*D, K)
            ww = np.repeat(w[obs], dim)
            rhs = (y - self.mean[obs]).ravel()
            lhs = a.T @ (a * ww[:, None]) + np.diag((self.noise_mm / s) ** 2 / self.sd ** 2)
            b = np.linalg.solve(lhs, a.T @ (ww * rhs))
            b = np.clip(b, -3 * self.sd, 3 * self.sd)
        tmpl = self.mean + np.einsum("k,kld->ld", b, p)
        return s * tmpl @ r.T + t

    def leave_one_out(self, points: np.ndarray, observed: np.ndarray,
                      weights: np.ndarray | None = None) -> np.ndarray:
        """(L, D): for each observed landmark, where the other observed ones put it (``predict`` without it);
        NaN for the rest."""
        pts = np.asarray(points, float)
        obs = np.asarray(observed, bool) & np.isfinite(pts).all(1)
        out = np.full_like(pts, np.nan)
        for i in np.flatnonzero(obs):
            others = obs.copy()
            others[i] = False
            out[i] = self.predict(pts, others, weights)[i]
        return out

    def frame(self, points: np.ndarray, observed: np.ndarray) -> np.ndarray:
        """(D, D) rotation from the shape model's axes (an upright head) to the patient's, by aligning the mean
        shape to ``points[observed]``; the identity with fewer than 3."""
        pts = np.asarray(points, float)
        obs = np.asarray(observed, bool) & np.isfinite(pts).all(1)
        if obs.sum() < 3:
            return np.eye(pts.shape[1])
        return _similarity(self.mean[obs], pts[obs], np.ones(int(obs.sum())))[1]

    def thresholds(self) -> np.ndarray:
        return np.maximum(FLOOR_MM, SIGMAS * self.residual_sd)

    def check(self, points: np.ndarray, candidates: np.ndarray, weights: np.ndarray | None = None,
              max_drop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Which candidate points do not fit the others: (implausible (L,) bool, leave-one-out residual (L,) mm,
        NaN where not computed).  Drops the worst misfit and re-checks, so one wild point cannot make its
        neighbours look wrong."""
        pts = np.asarray(points, float)
        keep = np.asarray(candidates, bool) & np.isfinite(pts).all(1)
        bad = np.zeros(len(pts), bool)
        res = np.full(len(pts), np.nan)
        thr = self.thresholds()
        max_drop = len(pts) // 3 if max_drop is None else max_drop
        for _ in range(max_drop + 1):
            if keep.sum() < MIN_POINTS:
                bad |= self.misfit_pairs(pts, keep)
                break
            res = np.linalg.norm(self.leave_one_out(pts, keep, weights) - pts, axis=1)  # NaN where not kept
            score = np.where(keep, res / thr, -np.inf)
            worst = int(np.argmax(score))
            if score[worst] <= 1.0:
                break
            bad[worst] = True
            keep[worst] = False
        return bad, res

    @cached_property
    def pair_distances(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, SD), each (L, L) mm: every pair's distance over 2,000 shapes drawn from the model (mean size)."""
        draws = np.random.default_rng(0).standard_normal((2000, len(self.sd))) * self.sd
        shapes = self.mean + (draws @ self.components).reshape(len(draws), *self.mean.shape)
        d = np.linalg.norm(shapes[:, :, None] - shapes[:, None], axis=-1)
        return d.mean(0), d.std(0)

    def misfit_pairs(self, points: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """(L,) bool: the candidates too few for a shape fit (2 to MIN_POINTS - 1) whose distances to the others
        no head has.  Drops the candidate in the most such pairs (all of them on a tie: two points too far
        apart do not say which is wrong) and looks again."""
        pts = np.asarray(points, float)
        idx = np.flatnonzero(np.asarray(candidates, bool) & np.isfinite(pts).all(1))
        bad = np.zeros(len(pts), bool)
        mean, sd = self.pair_distances
        while len(idx) >= 2:
            sub = np.ix_(idx, idx)
            d = np.linalg.norm(pts[idx][:, None] - pts[idx][None], axis=-1)
            allowed = np.maximum(FLOOR_MM, PAIR_SIGMAS * np.hypot(SIZE_SD * mean[sub], sd[sub]))
            wrong = np.abs(d - mean[sub]) > allowed
            np.fill_diagonal(wrong, False)
            count = wrong.sum(1)
            if not count.any():
                break
            worst = count == count.max()
            bad[idx[worst]] = True
            idx = idx[~worst]
        return bad

    # ----------------------------------------------------------------------------------- storage
    def to_json(self) -> dict:
        return {"kind": "procrustes-pca", "mean": np.round(self.mean, 4).tolist(),
                "components": np.round(self.components, 6).tolist(), "sd": np.round(self.sd, 4).tolist(),
                "residual_sd": np.round(self.residual_sd, 4).tolist(), "noise_mm": self.noise_mm}

    @classmethod
    def from_json(cls, doc: dict) -> "ShapeModel":
        if doc.get("kind") != "procrustes-pca":
            raise ValueError(f"unknown shape model kind {doc.get('kind')!r}")
        return cls(np.asarray(doc["mean"], float), np.asarray(doc["components"], float),
                   np.asarray(doc["sd"], float), np.asarray(doc["residual_sd"], float), float(doc["noise_mm"]))
