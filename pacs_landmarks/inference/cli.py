"""Subcommands of the landmark cascade: ``train``, ``evaluate``, ``predict`` (heavy imports inside handlers).

Each accepts CT cases / series and cephalogram cases / images alike: the kind follows from the data (the
landmark set of the cases' ``landmarks.json``; an X-ray SOP class for ``predict``)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pacs_landmarks.errors import CommandError


def _load_model(path, landmark_set=None, device=None):
    from pacs_landmarks.inference.model import LandmarkModel, ModelError

    try:
        return LandmarkModel.load(path, device=device, landmark_set=landmark_set if path is None else None)
    except ModelError as exc:
        raise CommandError(str(exc)) from None


def _data_set(args) -> str | None:
    """The landmark set of the data directory (None for CT data without one: the default set)."""
    from pacs_landmarks.inference.data import DataError, detect_landmark_set

    try:
        found = detect_landmark_set(args.data)
    except DataError as exc:
        raise CommandError(str(exc)) from None
    return None if found == "craniofacial16" else found


def _cases(args, model):
    from pacs_landmarks.inference.data import DataError, load_cases, read_label_map

    try:
        return load_cases(args.data, model.landmark_names, model.landmark_set, cache_dir=args.cache,
                          progress=not args.quiet, label_map=read_label_map(args.label_map),
                          truth=getattr(args, "truth", None))
    except DataError as exc:
        raise CommandError(str(exc)) from None


def _coverage_weights(text: str | None) -> dict[str, float]:
    """``--coverage-weights KIND=W,...`` -> {KIND: W}, checked against the known scan ranges."""
    from pacs_landmarks.inference.coverage import training_weights

    changes = {}
    for item in filter(None, (text or "").split(",")):
        kind, sep, value = item.partition("=")
        try:
            changes[kind.strip()] = float(value) if sep else float("nan")
        except ValueError:
            changes[kind.strip()] = float("nan")
    try:
        training_weights(changes)
    except ValueError as exc:
        raise CommandError(f"--coverage-weights: {exc}") from None
    return changes


def cmd_train(args: argparse.Namespace) -> int:
    from pacs_landmarks.inference.data import DataError, read_label_map
    from pacs_landmarks.inference.train import TrainConfig, train

    config = TrainConfig(epochs=args.epochs, batch_cases=args.batch_cases, lr=args.lr, seed=args.seed,
                         val_cases=args.val_cases, max_minutes=args.max_minutes, threads=args.threads,
                         only=args.only or "", landmark_set=args.landmark_set or "", truth=args.truth or "",
                         local_landmarks=args.local_landmarks, coverage_weights=_coverage_weights(args.coverage_weights))
    if args.model_version:
        config.extra["version"] = args.model_version
    if args.model_name:
        config.extra["name"] = args.model_name
    try:
        summary = train(args.data, args.out, config, cache_dir=args.cache, resume=args.resume, init=args.init,
                        progress=not args.quiet, label_map=read_label_map(args.label_map))
    except DataError as exc:
        raise CommandError(str(exc)) from None
    print(f"model written to {summary['model']} (checkpoint {summary['checkpoint']})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pacs_landmarks.inference.evaluate import box_plots, evaluate_cases, format_report, write_json

    model = _load_model(args.model, _data_set(args), args.device)
    if args.tta is not None:
        try:
            model = model.with_tta(None if args.tta == "none" else args.tta)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
    cases = _cases(args, model)
    if args.fit_shape_prior:
        if not args.calibrate:
            raise CommandError("--fit-shape-prior needs --calibrate OUT.pt (the file to write it to)")
        if model.shape_model is None:
            raise CommandError(f"model {model.name} {model.version} has no shape model to fit a prior for")
        from pacs_landmarks.inference.evaluate import fit_shape_prior

        # the prior first (it moves the points), then the threshold for the points it gives
        model = model.with_shape_prior(fit_shape_prior(model, cases, progress=not args.quiet))
    elif args.shape_prior == "off":
        model = model.with_shape_prior(None)
    result = evaluate_cases(model, cases, progress=not args.quiet)
    print(f"model {model.name} {model.version}, test-time augmentation {model.tta or 'none'}, shape prior "
          f"{'on' if model.shape_prior is not None else 'off'}: {len(cases)} cases from {args.data}")
    print(format_report(result))
    if args.json:
        write_json(result, args.json)
    if args.calibrate:
        from pacs_landmarks.inference.evaluate import calibrate_model

        cal = calibrate_model(model, result, args.calibrate)
        print(f"calibrated threshold {cal['low_confidence']:.2f} (test-time augmentation {cal['tta'] or 'none'}): "
              f"{cal.get('share')} of {cal['n']} points at or above it within 2 mm; {model.name} {model.version} "
              f"({model.path}) written to {args.calibrate}")
    if args.plots:
        paths = box_plots(result, args.plots)
        print(f"{len(paths)} box plots in {args.plots}")
    return 0


def _xray_file(files) -> Path | None:
    """The file to read as a cephalogram when the input is one X-ray image, else None (a CT series)."""
    import pydicom

    from pacs_landmarks.dicom.xray import is_xray_class

    if len(files) != 1:
        return None
    try:
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    except Exception:  # noqa: BLE001 -- load_series gives the clear error for an unreadable file
        return None
    return files[0] if is_xray_class(str(ds.get("SOPClassUID", ""))) else None


def _predict_image(args, path: Path, model) -> int:
    from pacs_landmarks.dicom.xray import XRayError, load_xray

    try:
        image = load_xray(path, pixel_spacing=args.pixel_spacing, require_ceph=False)
    except XRayError as exc:
        raise CommandError(str(exc)) from None
    model = model or _load_model(None, "ceph19", args.device)
    if model.dim != 2:
        raise CommandError(f"model {model.name} is for CT series, {path} is an X-ray image")
    lms = model.predict_image(image)
    row_mm, col_mm = lms.pixel_spacing_mm
    mm = None if lms.spacing_nominal else (col_mm, row_mm)
    if args.json:
        json.dump({"sop_instance_uid": image.sop_instance_uid, "model": model.name, "model_version": model.version,
                   "landmark_set": model.landmark_set, "facing": lms.facing,
                   "facing_source": lms.facing_source,
                   "pixel_spacing_mm": None if mm is None else [row_mm, col_mm],
                   "pixel_spacing_source": lms.spacing_source,
                   "landmarks": [{"name": lm.name, "status": lm.status,
                                  "position_px": None if lm.position_px is None else [round(v, 4) for v in lm.position_px],
                                  "position_mm": None if lm.position_px is None or mm is None else
                                  [round(lm.position_px[0] * mm[0], 4), round(lm.position_px[1] * mm[1], 4)],
                                  "confidence": round(lm.confidence, 4), "reason": lm.reason,
                                  "stage_positions_px": [[round(v, 4) for v in p] for p in lm.stage_positions]}
                                 for lm in lms]}, sys.stdout, indent=1)
        print()
        return 0
    print(f"image {image.sop_instance_uid}  model {model.name} {model.version}  facing {lms.facing}")
    print(f"facing read from {lms.facing_source}")
    print(f"pixel spacing: " + (f"{row_mm:.4f} x {col_mm:.4f} mm (row x column) from {lms.spacing_source}"
                                if mm else f"unknown ({lms.spacing_source}): positions in pixels only"))
    print(f"{'landmark':<24} {'status':<21} {'column':>9} {'row':>9} {'x (mm)':>8} {'y (mm)':>8} {'conf':>5}  reason")
    for lm in lms:
        if lm.position_px is not None:
            c, r = lm.position_px
            xy = f"{c * mm[0]:8.2f} {r * mm[1]:8.2f}" if mm else f"{'-':>8} {'-':>8}"
            pos = f"{c:9.2f} {r:9.2f} {xy}"
        else:
            pos = f"{'-':>9} {'-':>9} {'-':>8} {'-':>8}"
        print(f"{lm.name:<24} {lm.status:<21} {pos} {lm.confidence:5.2f}  {lm.reason}".rstrip())
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pacs_landmarks.dicom.series import SeriesError, load_series
    from pacs_landmarks.inference.data import dicom_files
    from pacs_landmarks.inference.landmark import landmark_json, landmark_table

    # a given model file is checked first: a bad one is the error to report whatever the input
    model = _load_model(args.model, device=args.device) if args.model is not None else None
    series = Path(args.series)
    if not series.exists():
        raise CommandError(f"not found: {series}")
    files = dicom_files(series) if series.is_dir() else [series]
    if not files:
        raise CommandError(f"no DICOM files in {series}")
    xray = _xray_file(files)
    if xray is not None:
        return _predict_image(args, xray, model)
    model = model or _load_model(None, device=args.device)
    if model.dim != 3:
        raise CommandError(f"model {model.name} is for cephalograms (2D), {series} is not an X-ray image")
    try:
        volume = load_series(files)
    except SeriesError as exc:
        raise CommandError(f"cannot build a volume from {series}: {exc}") from None
    landmarks = model.predict(volume)
    if args.json:
        json.dump({"series_instance_uid": volume.series_instance_uid, "model": model.name,
                   "model_version": model.version, "landmark_set": model.landmark_set,
                   "landmarks": [landmark_json(lm, 6) | {"stage_positions": [list(p) for p in lm.stage_positions]}
                                 for lm in landmarks]}, sys.stdout, indent=1)
        print()
        return 0
    print(f"series {volume.series_instance_uid}  model {model.name} {model.version}")
    print(landmark_table(landmarks))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this part's subcommands; its heavy imports happen inside the handlers."""
    p = sub.add_parser(
        "train", help="train the landmark cascade on cases with known landmarks",
        description="Train the 3-stage landmark cascade on a directory of cases (as `pacs-landmarks phantom` "
                    "writes them: a DICOM series and landmarks.json per sub-directory). Decoded volumes are "
                    "cached; a checkpoint (OUT.ckpt) is written after every epoch, and so is the model file.")
    p.add_argument("--data", required=True, help="directory of case sub-directories")
    p.add_argument("--out", required=True, help="model file to write (e.g. model.pt)")
    p.add_argument("--epochs", type=int, default=30, help="passes over the training cases (default 30)")
    p.add_argument("--batch-cases", type=int, default=4,
                   help="cases per step (each gives --local-landmarks crops per local stage)")
    p.add_argument("--local-landmarks", type=int, default=8,
                   help="crops per case and step for each local stage (default 8; landmarks drawn at random)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (cosine decay)")
    p.add_argument("--seed", type=int, default=0, help="random seed (augmentation, order, initial weights)")
    p.add_argument("--val-cases", type=int, default=3, help="last N cases used for per-epoch validation")
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop after the epoch passing this wall time")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--cache", default=None, help="cache directory for decoded volumes (default: CASE/.cache)")
    p.add_argument("--label-map", default=None, metavar="FILE.json",
                   help="Slicer markups labels -> landmark names ({\"label\": \"name\"}); default: by name "
                   "or abbreviation")
    p.add_argument("--resume", action="store_true", help="continue from OUT.ckpt")
    p.add_argument("--init", default=None, help="start from this model file's weights")
    p.add_argument("--coverage-weights", metavar="KIND=W,...",
                   help="how often each scan range is drawn for the training cuts, relative; give only the ones to "
                        "change, e.g. cbct-small=0.2,mandible=0.18 (defaults: docs/training.md, 'Scan ranges')")
    p.add_argument("--only", choices=("presence",), default=None,
                   help="train only the presence output (the rest frozen; use with --init)")
    p.add_argument("--model-version", default=None, help="version string stored in the model file")
    p.add_argument("--model-name", default=None, help="name stored in the model file (default: SET-model)")
    p.add_argument("--landmark-set", default=None,
                   help="landmark set to train (default: the one the cases' landmarks.json name); a 2D set "
                   "(ceph19, aariz29) trains the 2D cascade on cephalograms")
    p.add_argument("--truth", default=None, metavar="mean|NAME",
                   help="cephalograms with several annotators: train on their mean or on one (e.g. senior); "
                   "default: the landmarks of landmarks.json")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "evaluate", help="accuracy of a model on cases with known landmarks",
        description="Run a model on every case of a directory and report the radial error per landmark and "
                    "overall, one row per cascade stage: MRE ± SD, median (IQR), SDR at 2/2.5/3/4 mm, error "
                    "per axis.")
    p.add_argument("--data", required=True, help="directory of case sub-directories")
    p.add_argument("--model", default=None, help="model file (default: the shipped demo model)")
    p.add_argument("--json", default=None, metavar="OUT.json", help="write all statistics and raw errors here")
    p.add_argument("--plots", default=None, metavar="DIR", help="write a box plot PNG per landmark here")
    p.add_argument("--cache", default=None, help="cache directory for decoded volumes (default: CASE/.cache)")
    p.add_argument("--label-map", default=None, metavar="FILE.json",
                   help="Slicer markups labels -> landmark names; default: by name or abbreviation")
    p.add_argument("--truth", default=None, metavar="mean|NAME",
                   help="cephalograms: score against the annotators' mean or one annotator (default: the "
                   "landmarks of landmarks.json); every annotator is scored besides, with the inter-observer "
                   "distance")
    p.add_argument("--calibrate", default=None, metavar="OUT.pt",
                   help="write the evaluated model (--model; without it the shipped one) with the lowest confidence threshold at which >= 95 %% of the points "
                   "at or above it are within 2 mm on these cases (use held-out cases), the test-time "
                   "augmentation (--tta) and shape prior it was calibrated with as the model's")
    p.add_argument("--fit-shape-prior", action="store_true",
                   help="with --calibrate: first measure on these cases how far to trust the image and the other "
                   "landmarks, per landmark and axis (the shape prior, docs/training.md), then the threshold")
    p.add_argument("--shape-prior", choices=("on", "off"), default="on",
                   help="off: the image's points alone, without the model file's shape prior (to compare; with "
                   "--calibrate the file is written without one)")
    p.add_argument("--tta", choices=("mirror", "none"), default=None,
                   help="test-time augmentation for this evaluation instead of the model file's (CT only): "
                   "mirror = also run on the head mirrored left-right and report the mean; none = run once")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: automatic)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "predict", help="landmarks of one CT series or one cephalogram, as a table or JSON",
        description="Load one DICOM CT series (a directory or a file) or one X-ray image (DX/CR/SC: a lateral "
                    "cephalogram), run the landmark cascade and print the landmarks with their confidence: "
                    "patient LPS mm for CT; for a cephalogram (column, row) pixels in the image's own "
                    "coordinates and mm, with the pixel spacing and where it came from.")
    p.add_argument("series", metavar="SERIES_DIR", help="directory holding one CT series, or one X-ray image file")
    p.add_argument("--model", default=None,
                   help="model file (default: the shipped demo model of the input kind: craniofacial16 for CT, "
                   "ceph19 for a cephalogram)")
    p.add_argument("--pixel-spacing", type=float, default=None, metavar="MM",
                   help="cephalogram: pixel size in mm, instead of what the header says")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: automatic)")
    p.set_defaults(func=cmd_predict)
