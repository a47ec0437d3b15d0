"""A statistical shape model of the landmark configuration: Procrustes alignment + PCA (a point distribution
model, Cootes et al. 1995), learnt from the training truth and stored in the model file's metadata (JSON).

Landmarks of one head are not independent: given most of them, the rest lie within a few mm of where the
shape model puts them.  The cascade uses this twice:

- after the global stage, a landmark whose estimate does not fit the others is re-seeded from them, so the
  local stages start near the right place (``ShapeModel.check`` then ``predict``);
- after the last stage, a landmark that does not fit the others (leave-one-out residual beyond its
  threshold) is flagged ``implausible`` (``not_found``, "implausible position").

Bilateral pairs and midline landmarks need no rule of their own: a Porion 30 mm away from its partner does
not fit any shape the model has seen.  Nothing here depends on the dimension: points are (L, D) with D = 3
for CT (a 2D cephalogram would use D = 2).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Leave-one-out residuals beyond max(FLOOR_MM, SIGMAS x the landmark's training residual SD) are implausible.
FLOOR_MM = 10.0
SIGMAS = 4.0
MIN_POINTS = 5  # fewer observed landmarks than this say too little about the rest


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
        res = np.zeros((len(x), model.n_landmarks))
        for n, xi in enumerate(x):
            for i in range(model.n_landmarks):
                obs = np.ones(model.n_landmarks, bool)
                obs[i] = False
                pred = model.predict(xi, obs)
                res[n, i] = np.linalg.norm(pred[i] - xi[i])
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
                break
            res[:] = np.nan
            for i in np.flatnonzero(keep):
                others = keep.copy()
                others[i] = False
                pred = self.predict(pts, others, weights)
                res[i] = np.linalg.norm(pred[i] - pts[i])
            score = np.where(keep, res / thr, -np.inf)
            worst = int(np.argmax(score))
            if score[worst] <= 1.0:
                break
            bad[worst] = True
            keep[worst] = False
        return bad, res

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
