"""``LandmarkModel``: the model file, loaded once; ``predict(volume) -> list[Landmark]`` for a CT model,
``predict_image(image) -> list[Landmark2D]`` for a cephalogram model.

Model file (one ``torch.save`` file, read with ``torch.load(..., weights_only=True)``, so loading a model runs
no pickled code)::

    {"format": "pacs-landmarks-model", "format_version": 1,
     "metadata": "<JSON text>",            # see below
     "weights": {"<param name>": tensor}}  # Cascade.state_dict()

metadata JSON: ``name``, ``version``, ``landmark_set``, ``landmark_names`` (in output order), ``dim`` (3: CT
volumes, points in LPS mm; 2: projection images, points in mm on the face-right image; absent = 3, and it
must be the landmark set's dimension), ``stages`` (list of StageConfig: name, kind, size, spacing_mm,
width), ``intensity`` (``unit`` "HU" for CT, "xray" for 0..1 X-ray grey values, and how they are
normalised; absent unit = HU),
``training`` (data summary, epochs, seeds, final metrics; ``null`` for an untrained file), ``fuse_stages``
(inference option, see ``cascade.run_cascade``), ``created``; from model 2.0 also ``shape_model`` (the
Procrustes + PCA model of the training truth, ``shape.ShapeModel.to_json``) and ``calibration`` (optional:
the confidence threshold and, from 2.1.1, ``shape_prior``, ``shape.ShapePrior.to_json``, which moves each last
point towards where the other landmarks put it along the axes its map cannot tell); ``chin_midline``
(optional, CT, from 2.1.2: landmark names, the chin points, that after the shape prior are moved from side
to side onto the chin's mirror-symmetry plane, ``symmetry.onto_midline``); ``midplane_pairs`` (optional, CT,
from 2.1.3: bilateral landmark names, the Orbitales, whose pair is then moved together onto the mirror plane of
the anatomy around it, ``symmetry.pairs_onto_midplane``);
``tta`` (optional, CT only): ``"mirror"`` runs the cascade also on the head mirrored left-right and reports
the mean (``cascade.run_cascade``), absent or ``null`` runs it once; ``evaluate --calibrate`` records it with
the threshold (``calibration.tta``), since the confidence differs with it.

Status of each landmark (``Landmark.status``, see ``landmark_statuses``):
``outside_field_of_view`` when the model's presence output says the landmark is not in the scanned volume
(< 0.5) or less than half of the last stage's crop lies inside the volume; else, for CT, ``not_found`` when
the point lies within ``MIN_EDGE_MM`` of the scanned volume's edge ("at the edge of the scanned volume":
the first or last slice, the array's sides, a cone-beam CT's or reconstruction's circle); else
``not_found`` when the confidence is below ``LOW_CONFIDENCE`` ("low confidence") or the image's point (before
the shape prior) does not fit the other landmarks under the shape model ("implausible position", confidence
halved); else ``found``.  Last, for CT, where the found landmarks put the others (``ShapeModel.predict``)
decides between absent and not found: a landmark at the edge is ``outside_field_of_view`` ("cut off by
it") unless they put it inside the volume, any other ``not_found`` one is when they put it more than
``BEYOND_EDGE_MM`` outside, and one the presence output calls absent is ``not_found`` when they and its own
point both lie ``MIN_EDGE_MM`` or more inside.  A model file without a presence output or shape model (1.x)
uses the crop rule alone and skips the plausibility check.
On a projection image (``predict_image``) the same rules apply with "image" for "scanned volume": a
cephalogram holds every landmark unless collimation cut it off.  There is no bone volume to tell a head
from something else, so the image as a whole confirms it: when fewer than ``MIN_FOUND_SHARE`` of the set's
landmarks pass the rules above, the image is not a lateral cephalogram (a chest, a hand, a panoramic) or is
one unlike those the model learnt from, and every landmark is ``not_found`` (reason "not a lateral
cephalogram, or one unlike ..."): the presence output is not trusted either, since on real cephalograms a
model trained on synthetic ones called most landmarks outside the image (docs/accuracy.md, "Real
cephalograms").
A cephalogram is read both ways round, facing right and facing left (``read_facing``): Patient Orientation is
often empty or defaulted on CR and scanned film, and an image read the wrong way round gives a few confident
"landmarks" on mirrored anatomy. The reading with the higher median confidence wins; the header's facing
stands unless the other reading beats it by more than ``FACING_MARGIN``.
Everything is checked at load, so a missing, corrupt or foreign file fails there, not at the first series.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pacs_landmarks.inference.landmark import FOUND, NOT_FOUND, OUTSIDE_FIELD_OF_VIEW, Landmark
from pacs_landmarks.inference.landmark2d import ImageLandmarks, Landmark2D
from pacs_landmarks.inference.sampling import image_affine  # noqa: F401  (part of this module's API)
from pacs_landmarks.inference.symmetry import SymmetryRules
from pacs_landmarks.landmark_sets import mirror_names

log = logging.getLogger(__name__)

FORMAT = "pacs-landmarks-model"
FORMAT_VERSION = 1
MODELS_DIR = Path(__file__).resolve().parent / "models"
DEFAULT_MODEL = MODELS_DIR / "craniofacial16-demo.pt"
# Without a physical pixel size a cephalogram is read as if its height covered this many mm (the usual
# cephalostat field: 0.1 mm x 2400 rows in ISBI 2015, ~0.13 mm x 1700 rows on our synthetic ones).
NOMINAL_IMAGE_HEIGHT_MM = 230.0
# Below this a landmark is not_found ("low confidence").
LOW_CONFIDENCE = 0.3
# At or above this presence probability a landmark counts as inside the scanned volume.
PRESENCE_THRESHOLD = 0.5
# Less than this share of the last stage's crop inside the volume: the point is at or past the scan's edge.
MIN_INSIDE_FRACTION = 0.5
# CT: a point closer than this to the edge of the scanned volume is not found: its anatomy is cut off.  Where a
# scan range cuts through bone, the cut looks like anatomy -- a bone that ends, an angle, a lowest point -- and
# the model may put a landmark that lies outside the scan there (on held-out phantoms: Gonion 18-19 mm outside a
# dental CBCT's cylinder found 3.3 mm inside it; Menton 3.4 mm below the last slice found on it, 6.6 mm off).
# Over 18 held-out phantom sets 4 mm removed all 4 points found outside the scan and 13 of 1,208 found inside
# it; a later draw found two Gonions 4.2-4.3 mm inside a CBCT cylinder that they lie outside of.  At 5 mm, a
# point found whose anatomy is outside the scan is more than 5 mm off, the tolerance a reader allows
# (docs/accuracy.md, "Scan edges").
MIN_EDGE_MM = 5.0
# CT: a landmark that is not found, and that the shape model puts more than this far outside the scanned volume
# from the found ones, is not in it.  The presence output misses anatomy just beyond a cut (a mandible-only
# scan's ANS 5-17 mm above its first slice, with presence 0.64-0.74); the found landmarks place it.  A point at
# the edge is cut off by it unless the found landmarks put it inside: of those more than 5 mm from the edge on
# 17 held-out sets, 28 of 29 lay outside the scan.  Together these raise presence correct on those sets from
# 96.4 to 98.7 % (docs/accuracy.md, "Presence from the found landmarks").  The other way, with MIN_EDGE_MM:
# three Orbitales 6-9 mm inside a mandible or CBCT scan's top, found within 1.3 mm of the truth on two, had
# presence 0.35-0.46; no landmark outside a scan, on any set, has both its point and that estimate so deep.
BEYOND_EDGE_MM = 2.0
# Midline landmarks whose side-to-side position a local crop cannot tell on a broad chin, and which a new CT
# model puts onto the chin's mirror-symmetry plane (metadata ``chin_midline``; docs/accuracy.md, "Chin midline").
CHIN_MIDLINE = ("B point", "Pogonion", "Menton", "Gnathion")
# Pairs whose common side-to-side position a local crop cannot tell on a flat orbital floor, and which a new CT
# model moves together onto the orbits' mirror plane (metadata ``midplane_pairs``; docs/accuracy.md, "Orbitales on
# the orbits' mirror plane").
MIDPLANE_PAIRS = ("Orbitale R", "Orbitale L")
# 2D: fewer found landmarks than this share of the set's: not a cephalogram, or one the model cannot read,
# and none found. Counted against every landmark, not only those the presence output puts inside the image: on
# 141 real cephalograms the synthetic-only model put 3-17 landmarks outside and "found" 2-8 of the rest, half of
# them more than 5 mm off; on synthetic ones it finds 17-19.
MIN_FOUND_SHARE = 0.5
# A cephalogram is read facing right and facing left; the header's facing (Patient Orientation) stands unless
# the other reading's median confidence is higher by more than this. On 30 held-out synthetic cephalograms the
# right reading had a median of 0.52-0.61 and the wrong one 0.19-0.30, so 0.05 only breaks near-ties.
FACING_MARGIN = 0.05
# Test-time augmentations a model file may ask for (metadata ``tta``); None: the cascade runs once.
TTA_MODES = (None, "mirror")


def check_tta(tta, dim: int) -> None:
    """``ValueError`` unless ``tta`` is a test-time augmentation (``TTA_MODES``) that a ``dim``-D model can use."""
    if tta not in TTA_MODES:
        raise ValueError(f"unknown test-time augmentation {tta!r} (known: mirror, or none)")
    if tta is not None and dim != 3:
        raise ValueError(f"test-time augmentation {tta!r} is for CT (3D) models only")


def landmark_statuses(out, shape=None, low_confidence: float = LOW_CONFIDENCE, min_edge_mm: float = 0.0):
    """(status (L,), reason (L,), confidence (L,)) for one ``CascadeOutput`` (see the module docstring);
    ``min_edge_mm`` 0: no edge rule (a cephalogram's)."""
    n = out.positions.shape[1]
    conf = np.array(out.confidence, float)
    status = np.array([FOUND] * n, dtype=object)
    reason = np.array([""] * n, dtype=object)
    inside = out.inside_fraction if out.inside_fraction is not None else np.ones(n)
    absent = inside < MIN_INSIDE_FRACTION
    if out.presence is not None:
        absent |= out.presence < PRESENCE_THRESHOLD
    status[absent] = OUTSIDE_FIELD_OF_VIEW
    reason[absent] = "not in the scanned volume"
    edge = np.zeros(n, bool)
    if min_edge_mm > 0 and out.edge_mm is not None:
        edge = ~absent & (out.edge_mm < min_edge_mm)
        status[edge] = NOT_FOUND
        reason[edge] = "at the edge of the scanned volume"
    low = ~absent & ~edge & (conf < low_confidence)
    status[low] = NOT_FOUND
    reason[low] = "low confidence"
    cand = status == FOUND
    # what the image says, not where the shape prior pulled it: a point moved towards the others fits them
    own = out.image_positions if out.image_positions is not None else out.positions[-1]
    if shape is not None and cand.any():
        bad, _ = shape.check(own, cand)
        status[bad] = NOT_FOUND
        reason[bad] = "implausible position"
        conf[bad] *= 0.5
    if min_edge_mm > 0 and shape is not None and out.region is not None:
        # how deep the found landmarks put each landmark in the scanned volume (NaN with fewer than 3 found)
        depth = out.region.depth_mm(shape.predict(own, status == FOUND))
        cut = edge & ~(depth >= 0)
        status[cut] = OUTSIDE_FIELD_OF_VIEW
        reason[cut] = "at the edge of the scanned volume (cut off by it)"
        beyond = (status == NOT_FOUND) & ~edge & (depth < -BEYOND_EDGE_MM)
        status[beyond] = OUTSIDE_FIELD_OF_VIEW
        reason[beyond] = "not in the scanned volume (the found landmarks put it beyond the edge)"
        if out.edge_mm is not None:
            # the other way: the presence output calls it absent, yet its own point and where the found
            # landmarks put it both lie clear of the edge
            inside = absent & (out.edge_mm >= min_edge_mm) & (depth >= min_edge_mm)
            status[inside] = NOT_FOUND
            reason[inside] = "presence uncertain (the found landmarks put it inside the scanned volume)"
    return status, reason, conf


def _why_none_found(out, status, low_confidence: float) -> str:
    """What a user can do about a CT series in which no landmark is found, from what the cascade saw."""
    from pacs_landmarks.inference.cascade import MIN_HEAD_BONE_ML

    if out.bone_ml is not None and out.bone_ml < MIN_HEAD_BONE_ML:
        return (f"{out.bone_ml:.0f} ml of bone in the scan, less than a head's part ({MIN_HEAD_BONE_ML:.0f} ml): "
                "not a head CT?")
    if (status == OUTSIDE_FIELD_OF_VIEW).all():
        return f"{out.bone_ml:.0f} ml of bone, and none of the landmarks is in the scanned part of the head"
    return (f"{out.bone_ml:.0f} ml of bone, but no landmark confident enough (highest confidence "
            f"{float(np.max(out.confidence)):.2f}, threshold {low_confidence:.2f}); thick slices, a soft-tissue "
            "kernel or an unusual anatomy lower it: look at the estimates with `pacs-landmarks review`")


class ModelError(Exception):
    """The model file cannot be used (missing, corrupt, wrong format or landmark set)."""


def default_model_path(landmark_set: str | None = None) -> Path:
    """The shipped demo model of a landmark set (``None``: craniofacial16): ``models/<set>-demo.pt``."""
    return MODELS_DIR / f"{landmark_set or 'craniofacial16'}-demo.pt"


def _threads() -> None:
    import torch

    # On a shared CPU node more threads than cores only adds contention.
    want = int(os.environ.get("PACS_LANDMARKS_THREADS", "0")) or min(4, os.cpu_count() or 1)
    if torch.get_num_threads() != want:
        torch.set_num_threads(want)


def save_model_file(path: str | Path, cascade, metadata: dict[str, Any]) -> Path:
    """Write ``cascade`` weights + metadata atomically (a crash never leaves a half-written model)."""
    import torch

    from pacs_landmarks.inference.cascade import stages_to_json

    meta = dict(metadata)
    meta["stages"] = stages_to_json(cascade.stages)
    meta.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "metadata": json.dumps(meta, indent=1, sort_keys=True),
        "weights": {k: v.detach().cpu().contiguous() for k, v in cascade.state_dict().items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def read_model_file(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metadata, weights) of a model file, validated; ``ModelError`` with a clear reason otherwise."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated / foreign files
        raise ModelError(f"{path} is not a readable model file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelError(f"{path} is not a pacs-landmarks model file")
    if payload.get("format_version") != FORMAT_VERSION:
        raise ModelError(f"{path}: model format version {payload.get('format_version')} is not supported "
                         f"(this software reads version {FORMAT_VERSION})")
    try:
        meta = json.loads(payload["metadata"])
        weights = payload["weights"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{path}: model metadata is damaged ({exc})") from exc
    return meta, weights


def torch_device(name: str):
    """``torch.device(name)``, or ``ModelError`` saying what this machine has instead of torch's assertion."""
    import torch

    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ModelError(f"device {name!r}: {exc}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            raise ModelError(f"device {name!r}: this machine has {count} CUDA device(s) that torch "
                             f"{torch.__version__} can use; use cpu or leave the device out (automatic)")
    return dev


class LandmarkModel:
    """A loaded cascade. Load once, reuse for every series; ``predict`` is thread-safe."""

    def __init__(self, cascade, metadata: dict[str, Any], device, path: Path | None = None,
                 autocast: bool = False):
        from pacs_landmarks.inference.shape import ShapeModel, ShapePrior

        self.cascade = cascade
        self.metadata = metadata
        self.device = device
        self.path = path
        # float32 everywhere unless told: the threshold was calibrated in float32, and float16 autocast was no
        # faster for these small crops on an H200 (bench/device.py, docs/benchmarks.md)
        self.autocast = bool(autocast)
        self._lock = threading.Lock()
        doc = metadata.get("shape_model")
        self.shape_model = ShapeModel.from_json(doc) if doc else None
        doc = (metadata.get("calibration") or {}).get("shape_prior")
        self.shape_prior = ShapePrior.from_json(doc) if doc and self.shape_model is not None else None
        self.symmetry = SymmetryRules.from_metadata(metadata, mirror_names(metadata["landmark_names"]), MIN_EDGE_MM)

    name = property(lambda self: self.metadata["name"])
    version = property(lambda self: self.metadata["version"])
    landmark_set = property(lambda self: self.metadata["landmark_set"])
    landmark_names = property(lambda self: list(self.metadata["landmark_names"]))
    stages = property(lambda self: self.cascade.stages)
    trained = property(lambda self: bool(self.metadata.get("training")))
    dim = property(lambda self: int(self.metadata.get("dim", 3)))
    tta = property(lambda self: self.metadata.get("tta"))

    def with_tta(self, tta: str | None) -> "LandmarkModel":
        """The same loaded cascade with another test-time augmentation (``TTA_MODES``), e.g. to evaluate a
        model with and without it; the calibrated threshold stays the file's."""
        check_tta(tta, self.dim)
        return LandmarkModel(self.cascade, dict(self.metadata, tta=tta), self.device, self.path, self.autocast)

    def with_shape_prior(self, prior) -> "LandmarkModel":
        """The same loaded cascade with another ``shape.ShapePrior`` (None: the image's points alone), e.g. to
        calibrate one (``evaluate --calibrate``) or to compare with and without it."""
        cal = dict(self.metadata.get("calibration") or {})
        cal.pop("shape_prior", None)
        if prior is not None:
            cal["shape_prior"] = prior.to_json()
        return LandmarkModel(self.cascade, dict(self.metadata, calibration=cal or None), self.device, self.path,
                             self.autocast)

    @classmethod
    def load(cls, path: str | Path | None = None, device: str | None = None,
             landmark_set: str | None = None) -> "LandmarkModel":
        """Load a model file; CUDA when present unless ``device`` says.

        ``path`` None: the shipped demo model of ``landmark_set`` (``default_model_path``; None =
        craniofacial16).  ``landmark_set``: when given, the file must be for that set (else ``ModelError``).
        """
        import torch

        from pacs_landmarks.inference.cascade import Cascade, stages_from_json
        from pacs_landmarks.landmark_sets import landmark_names, load_landmark_set, set_dimension

        if path is None:
            path = default_model_path(landmark_set)
            if not path.is_file() and landmark_set is not None:
                raise ModelError(f"no shipped model for landmark set {landmark_set!r} ({path.name}): train one "
                                 "with `pacs-landmarks train` and pass it as the model file")
        path = Path(path)
        meta, weights = read_model_file(path)
        for key in ("name", "version", "landmark_set", "landmark_names", "stages"):
            if key not in meta:
                raise ModelError(f"{path}: model metadata lacks {key!r}")
        if landmark_set is not None and meta["landmark_set"] != landmark_set:
            raise ModelError(f"{path} is for landmark set {meta['landmark_set']!r}, not {landmark_set!r}")
        try:
            load_landmark_set(meta["landmark_set"])
        except KeyError:
            raise ModelError(f"{path}: unknown landmark set {meta['landmark_set']!r}") from None
        if list(meta["landmark_names"]) != landmark_names(meta["landmark_set"]):
            raise ModelError(f"{path}: its landmark names do not match landmark set {meta['landmark_set']!r}")
        dim = meta.get("dim", 3)
        if dim != set_dimension(meta["landmark_set"]):
            raise ModelError(f"{path}: a {dim}D model for landmark set {meta['landmark_set']!r}, which is "
                             f"{set_dimension(meta['landmark_set'])}D")
        unit = (meta.get("intensity") or {}).get("unit", "HU")
        try:
            cascade = Cascade(stages_from_json(meta["stages"]), len(meta["landmark_names"]), dim, unit)
            cascade.load_state_dict(weights)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ModelError(f"{path}: weights do not fit the stages described in the file ({exc})") from exc
        if meta.get("shape_model") is not None:
            from pacs_landmarks.inference.shape import ShapeModel

            try:
                sm = ShapeModel.from_json(meta["shape_model"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ModelError(f"{path}: shape model is damaged ({exc})") from exc
            if sm.n_landmarks != len(meta["landmark_names"]):
                raise ModelError(f"{path}: shape model has {sm.n_landmarks} landmarks, the set has "
                                 f"{len(meta['landmark_names'])}")
            doc = (meta.get("calibration") or {}).get("shape_prior")
            if doc is not None:
                from pacs_landmarks.inference.shape import ShapePrior

                try:
                    sp = ShapePrior.from_json(doc)
                except (KeyError, TypeError, ValueError) as exc:
                    raise ModelError(f"{path}: shape prior is damaged ({exc})") from exc
                if sp.shape_sd.shape != sm.mean.shape:
                    raise ModelError(f"{path}: shape prior is for {sp.shape_sd.shape[0]} landmarks in "
                                     f"{sp.shape_sd.shape[1]}D, the shape model {sm.mean.shape[0]} in "
                                     f"{sm.mean.shape[1]}D")
        try:
            check_tta(meta.get("tta"), dim)
        except ValueError as exc:
            raise ModelError(f"{path}: {exc}") from None
        try:
            if SymmetryRules.from_metadata(meta, mirror_names(meta["landmark_names"])) and dim != 3:
                raise ValueError("they are for CT models")
        except (ValueError, TypeError, AttributeError) as exc:
            raise ModelError(f"{path}: chin_midline / midplane_pairs do not fit: {exc}") from None
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch_device(device)
        if dev.type == "cpu":
            _threads()
        cascade.to(dev).eval()
        if not meta.get("training"):
            log.warning("model %s %s is UNTRAINED (random weights): its landmarks are meaningless",
                        meta["name"], meta["version"])
        return cls(cascade, meta, dev, path)

    def run(self, volume):
        """The raw cascade output for one Volume (positions of every stage, spreads, confidence)."""
        if self.dim != 3:
            raise ValueError(f"model {self.name} reads {self.dim}D images: use predict_image")
        if volume.array.ndim != 3 or min(volume.array.shape) < 1:
            raise ValueError(f"volume must be 3D and non-empty, got shape {volume.array.shape}")
        return self._run(volume.array, volume.affine)

    def run_array(self, array, affine):
        """The raw cascade output for an array in this model's dimension and intensity unit (a CT volume in
        HU with its 4x4 affine, or a face-right image 0..1 with its 3x3 affine, ``image_affine``)."""
        return self._run(array, affine)

    def _run(self, array, affine):
        from pacs_landmarks.inference.cascade import run_cascade

        mirror = mirror_names(self.landmark_names) if self.tta == "mirror" else None
        with self._lock:
            t0 = time.perf_counter()
            sampler = self.cascade.sampler(array, affine, self.device)
            t_sampler = time.perf_counter() - t0
            out = run_cascade(self.cascade, sampler, autocast=self.autocast,
                              fuse=bool(self.metadata.get("fuse_stages", False)), shape=self.shape_model,
                              mirror=mirror, prior=self.shape_prior, symmetry=self.symmetry)
        # the copy to the device and, for CT, the reconstruction circle and the check for Hounsfield units
        out.timings = {"sampler": t_sampler, **out.timings}
        return out

    def run_image(self, image):
        """The raw cascade output for one ``XRayImage``, read the way round that fits it best
        (``read_facing``): ``(out, spacing, spacing_source, facing, facing_source)``. Points are in mm on the
        image turned to face ``facing`` right (x = column * column spacing, y = row * row spacing). Without a
        physical spacing, a nominal one from the image height (``NOMINAL_IMAGE_HEIGHT_MM``), said so in the
        source."""
        if self.dim != 2:
            raise ValueError(f"model {self.name} reads {self.dim}D volumes: use predict")
        pixels = np.asarray(image.pixels)
        if pixels.ndim != 2 or min(pixels.shape) < 2:
            raise ValueError(f"image must be 2D and non-empty, got shape {pixels.shape}")
        if image.spacing is not None:
            spacing, source = (float(image.spacing.row_mm), float(image.spacing.col_mm)), image.spacing.source
        else:
            nominal = NOMINAL_IMAGE_HEIGHT_MM / pixels.shape[0]
            spacing = (nominal, nominal)
            source = (f"none in the image: nominal {nominal:.4f} mm from its height ({pixels.shape[0]} rows read as "
                      f"{NOMINAL_IMAGE_HEIGHT_MM:.0f} mm)")
            log.warning("image %s has no pixel spacing: landmarks found at a nominal %.4f mm/pixel (positions "
                        "in pixels are usable, mm are not)", image.sop_instance_uid, nominal)
        out, facing, facing_source = self.read_facing(pixels, spacing, image.facing, image.facing_source)
        if facing != image.facing and image.facing != "unknown":
            log.warning("image %s: the header says facing %s, the image reads as facing %s: %s",
                        image.sop_instance_uid, image.facing, facing, facing_source)
        return out, spacing, source, facing, facing_source

    def read_facing(self, pixels, spacing, stated: str = "unknown", stated_source: str = ""):
        """Run the cascade on a 2D image (0..1, in its own orientation) as facing right and as facing left;
        ``(out, facing, how)`` for the reading kept: the ``stated`` facing ("right", "left" or "unknown")
        unless the other reading's median confidence is higher by more than ``FACING_MARGIN``. ``out`` is in
        mm on the image turned to face right from ``facing``; ``how`` says why, for the user."""
        affine = image_affine(spacing)
        readings = {}
        for face in ("right", "left"):
            canonical = pixels[:, ::-1] if face == "left" else pixels
            t0 = time.perf_counter()
            out = self._run(np.ascontiguousarray(canonical, np.float32), affine)
            readings[face] = (out, float(np.median(self.statuses(out)[2])), time.perf_counter() - t0)
        best = max(readings, key=lambda f: readings[f][1])
        keep = stated if stated in readings and readings[stated][1] >= readings[best][1] - FACING_MARGIN else best
        other = "left" if keep == "right" else "right"
        out = readings[keep][0]
        out.timings = {**out.timings, "other facing": readings[other][2]}
        how = (f"the image (median confidence {readings[keep][1]:.2f} facing {keep}, {readings[other][1]:.2f} "
               f"facing {other}); header: {stated_source or 'no Patient Orientation'}")
        return out, keep, how

    @property
    def low_confidence(self) -> float:
        """The confidence below which a landmark is not found: calibrated on held-out cases when the file
        says so (``metadata.calibration.low_confidence``, ``evaluate --calibrate``), else ``LOW_CONFIDENCE``."""
        return float((self.metadata.get("calibration") or {}).get("low_confidence", LOW_CONFIDENCE))

    def statuses(self, out):
        """(status, reason, confidence) per landmark of a ``run`` output (``landmark_statuses``; for a 2D
        model also the whole-image check, see the module docstring)."""
        status, reason, conf = landmark_statuses(out, self.shape_model, self.low_confidence,
                                                 MIN_EDGE_MM if self.dim == 3 else 0.0)
        if self.dim == 2:
            reason[reason == "not in the scanned volume"] = "not in the image (collimation)"
            found = int((status == FOUND).sum())
            if found < MIN_FOUND_SHARE * len(status):
                status[:] = NOT_FOUND
                reason[:] = (f"not a lateral cephalogram, or one unlike those the model learnt from ({found} of "
                             f"{len(status)} landmarks found)")
        return status, reason, conf

    def predict(self, volume) -> list[Landmark]:
        """Every landmark of the set, in order, with status, confidence and every stage's position (LPS mm);
        ``position_lps_mm`` only for ``found`` ones."""
        out = self.run(volume)
        status, reason, conf = self.statuses(out)
        n_found = int((status == FOUND).sum())
        if n_found == 0:
            log.warning("series %s: no landmark found: %s", volume.series_instance_uid,
                        _why_none_found(out, status, self.low_confidence))
        else:
            log.info("series %s: %d of %d landmarks found, %d outside the field of view, %d not found",
                     volume.series_instance_uid, n_found, len(status), int((status == OUTSIDE_FIELD_OF_VIEW).sum()),
                     int((status == NOT_FOUND).sum()))
        result = []
        for i, name in enumerate(self.landmark_names):
            stage_pos = tuple(tuple(float(v) for v in out.positions[k, i]) for k in range(out.positions.shape[0]))
            result.append(Landmark(name=name, position_lps_mm=stage_pos[-1] if status[i] == FOUND else None,
                                   confidence=float(conf[i]), stage_positions=stage_pos,
                                   status=str(status[i]), reason=str(reason[i])))
        return result

    def predict_image(self, image) -> ImageLandmarks:
        """Every landmark of the set, in order, on one ``XRayImage`` (a 2D model): status, confidence,
        ``position_px`` (column, row) in the image's OWN SCOORD pixel coordinates (a left-facing image is
        read mirrored and its points mirrored back), only for ``found`` ones, and every stage's position.
        The list also says which pixel spacing was used and where it came from, and which way the face was
        read to look (``ImageLandmarks``; ``run_image``)."""
        out, spacing, source, facing, facing_source = self.run_image(image)
        status, reason, conf = self.statuses(out)
        scale = np.array([spacing[1], spacing[0]])  # (x, y) mm per (column, row)
        # (stages, L, 2) SCOORD (column, row) in the image as stored, from the reading kept
        px = dataclasses.replace(image, facing=facing).from_canonical(out.positions / scale)
        n_found = int((status == FOUND).sum())
        if n_found == 0:
            log.warning("image %s: no landmark found: %s (best confidence %.2f, threshold %.2f)",
                        image.sop_instance_uid, "; ".join(dict.fromkeys(str(r) for r in reason if r)) or "-",
                        float(conf.max()), self.low_confidence)
        else:
            log.info("image %s: %d of %d landmarks found, %d outside the image, %d not found", image.sop_instance_uid,
                     n_found, len(status), int((status == OUTSIDE_FIELD_OF_VIEW).sum()),
                     int((status == NOT_FOUND).sum()))
        result = ImageLandmarks(pixel_spacing_mm=spacing, spacing_source=source,
                                spacing_nominal=image.spacing is None, facing=facing,
                                facing_source=facing_source)
        for i, name in enumerate(self.landmark_names):
            stage_pos = tuple((float(px[k, i, 0]), float(px[k, i, 1])) for k in range(px.shape[0]))
            result.append(Landmark2D(name=name, position_px=stage_pos[-1] if status[i] == FOUND else None,
                                     confidence=float(conf[i]), status=str(status[i]),
                                     stage_positions=stage_pos, reason=str(reason[i])))
        return result


def new_metadata(landmark_set: str = "craniofacial16", version: str = "0.0.0", name: str | None = None,
                 training: dict | None = None) -> dict[str, Any]:
    from pacs_landmarks.landmark_sets import landmark_names, set_dimension

    dim = set_dimension(landmark_set)
    meta = {
        "name": name or f"{landmark_set}-cascade",
        "version": version,
        "landmark_set": landmark_set,
        "landmark_names": landmark_names(landmark_set),
        "dim": dim,
        "intensity": {"unit": "HU", "clip": [-1000, 2500], "scale": 1000.0, "outside": -1000},
        # local stages fuse their point with the previous stage's (see cascade.run_cascade)
        "fuse_stages": True,
        "training": training,
        "description": "Coarse-to-fine 3D landmark cascade. Trained on synthetic phantoms only: "
                       "not for clinical use.",
    }
    chin = [n for n in meta["landmark_names"] if n in CHIN_MIDLINE]
    pairs = [n for n in meta["landmark_names"] if n in MIDPLANE_PAIRS]
    if dim == 3 and chin:
        # an inference rule, not learnt: the chin points onto the chin's symmetry plane (symmetry.onto_midline)
        meta["chin_midline"] = chin
    if dim == 3 and len(pairs) == 2:
        # likewise the Orbitales, as a pair, onto the orbits' symmetry plane (symmetry.pairs_onto_midplane)
        meta["midplane_pairs"] = pairs
    if dim == 2:
        meta["intensity"] = {"unit": "xray", "range": [0.0, 1.0], "dense": "bright", "outside": 0.0,
                             "normalised": "2 * value - 1"}
        meta["description"] = "Coarse-to-fine 2D landmark cascade for lateral cephalograms."
    return meta


def make_untrained(path: str | Path, seed: int = 0, landmark_set: str = "craniofacial16") -> Path:
    """A random-weight model in the final format (lets the rest of the system run end to end)."""
    import torch

    from pacs_landmarks.inference.cascade import Cascade, default_stages

    torch.manual_seed(seed)
    meta = new_metadata(landmark_set, name=f"{landmark_set}-demo", version="0.0.0-untrained")
    if meta["dim"] == 2:
        meta["description"] += " Untrained (random weights): not for clinical use."
    cascade = Cascade(default_stages(meta["dim"]), len(meta["landmark_names"]), meta["dim"],
                      meta["intensity"]["unit"])
    return save_model_file(path, cascade, meta)
