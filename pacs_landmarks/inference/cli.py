"""Subcommands of the landmark cascade: ``train``, ``evaluate``, ``predict`` (heavy imports inside handlers)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _error(msg: str):
    from pacs_landmarks.cli import CommandError

    return CommandError(msg)


def _load_model(path):
    from pacs_landmarks.inference.model import LandmarkModel, ModelError

    try:
        return LandmarkModel.load(path)
    except ModelError as exc:
        raise _error(str(exc)) from None


def _cases(args, names):
    from pacs_landmarks.inference.data import DataError, load_cases, read_label_map

    try:
        return load_cases(args.data, names, cache_dir=args.cache, progress=not args.quiet,
                          label_map=read_label_map(args.label_map))
    except DataError as exc:
        raise _error(str(exc)) from None


def cmd_train(args: argparse.Namespace) -> int:
    from pacs_landmarks.inference.data import DataError, read_label_map
    from pacs_landmarks.inference.train import TrainConfig, train

    config = TrainConfig(epochs=args.epochs, batch_cases=args.batch_cases, lr=args.lr, seed=args.seed,
                         val_cases=args.val_cases, max_minutes=args.max_minutes, threads=args.threads,
                         only=args.only or "")
    if args.model_version:
        config.extra["version"] = args.model_version
    try:
        summary = train(args.data, args.out, config, cache_dir=args.cache, resume=args.resume, init=args.init,
                        progress=not args.quiet, label_map=read_label_map(args.label_map))
    except DataError as exc:
        raise _error(str(exc)) from None
    print(f"model written to {summary['model']} (checkpoint {summary['checkpoint']})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pacs_landmarks.inference.evaluate import box_plots, evaluate_cases, format_report, write_json

    model = _load_model(args.model)
    cases = _cases(args, model.landmark_names)
    result = evaluate_cases(model, cases, progress=not args.quiet)
    print(f"model {model.name} {model.version}: {len(cases)} cases from {args.data}")
    print(format_report(result))
    if args.json:
        write_json(result, args.json)
    if args.calibrate:
        from pacs_landmarks.inference.evaluate import calibrate_model

        cal = calibrate_model(model, result, args.calibrate)
        print(f"calibrated threshold {cal['low_confidence']:.2f}: {cal.get('share')} of {cal['n']} points at or "
              f"above it within 2 mm; model written to {args.calibrate}")
    if args.plots:
        paths = box_plots(result, args.plots)
        print(f"{len(paths)} box plots in {args.plots}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pacs_landmarks.dicom.series import SeriesError, load_series
    from pacs_landmarks.inference.data import dicom_files
    from pacs_landmarks.inference.landmark import landmark_json, landmark_table

    model = _load_model(args.model)
    series = Path(args.series)
    if not series.exists():
        raise _error(f"not found: {series}")
    files = dicom_files(series) if series.is_dir() else [series]
    if not files:
        raise _error(f"no DICOM files in {series}")
    try:
        volume = load_series(files)
    except SeriesError as exc:
        raise _error(f"cannot build a volume from {series}: {exc}") from None
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
    p.add_argument("--batch-cases", type=int, default=4, help="cases per step (x16 crops per local stage)")
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
    p.add_argument("--only", choices=("presence",), default=None,
                   help="train only the presence output (the rest frozen; use with --init)")
    p.add_argument("--model-version", default=None, help="version string stored in the model file")
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
    p.add_argument("--calibrate", default=None, metavar="OUT.pt",
                   help="write the model with the lowest confidence threshold at which >= 95 %% of the points "
                   "at or above it are within 2 mm on these cases (use held-out cases)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "predict", help="landmarks of one CT series, as a table or JSON",
        description="Load one DICOM CT series (a directory or a file), run the landmark cascade and print the "
                    "landmarks in patient LPS mm with their confidence.")
    p.add_argument("series", metavar="SERIES_DIR", help="directory holding one CT series")
    p.add_argument("--model", default=None, help="model file (default: the shipped demo model)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_predict)
