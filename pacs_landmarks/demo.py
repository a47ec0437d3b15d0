"""``make demo``: the whole product once, end to end, with real DICOM tools.

Orthanc with the plugin starts in a private network namespace (nothing listens outside it); one synthetic
head CT is generated (``pacs-landmarks phantom``), sent with dcmtk's ``storescu``, analysed by the plugin;
the results are found with ``findscu`` (SERIES level, Modality SR and SEG), the landmark SR is read back
and compared with the phantom's ground truth, the measurements are printed, dcmtk's ``dsr2html`` renders the
SR, and Orthanc is stopped -- also when a step fails. Everything is kept under ``var/demo/``.

Then the cephalogram step (``--ceph-only``: only this one, ``make demo-ceph``): one synthetic lateral
cephalogram (``pacs-landmarks phantom --ceph``, a DX For Presentation) is sent with ``storescu``; the plugin
makes an image job as soon as it is stored; ``findscu`` finds its landmark SR, measurements SR and tracing
presentation state, and the tracing table (landmarks in image pixels against the phantom's truth, in mm with
the pixel spacing and its source) and the measurements are printed. It uses the shipped ceph19 model (or
``--ceph-model``); an untrained one finds no landmark, and the demo says so.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from pacs_landmarks.dicom.dcmtk import ToolNotFound, dcmtk_tool, program
from pacs_landmarks.plugin.config import REPO_ROOT, write_runtime_config
from pacs_landmarks.plugin.launch import OrthancError, OrthancProcess

DEMO_DIR = REPO_ROOT / "var" / "demo"
SEED = 7


class DemoError(Exception):
    """A step failed: printed as one line, with where to look."""


class Progress:
    def __init__(self, total: int):
        self.total, self.step, self.t0 = total, 0, time.perf_counter()

    def __call__(self, text: str) -> None:
        self.step += 1
        print(f"[{self.step}/{self.total} {time.perf_counter() - self.t0:6.1f} s] {text}", flush=True)

    def note(self, text: str) -> None:
        print(f"    {text}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pacs_landmarks.demo",
        description="End-to-end demo: Orthanc + plugin, one phantom head CT in, SR/SEG out, compared with the truth.",
    )
    parser.add_argument("--out", type=Path, default=DEMO_DIR, help="working folder, emptied first (default var/demo)")
    parser.add_argument("--seed", type=int, default=SEED, help="phantom seed")
    parser.add_argument("--size", type=int, default=256, help="phantom image size in pixels (rows = columns)")
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds to wait for the results")
    parser.add_argument("--ceph-only", action="store_true", help="only the cephalogram step (make demo-ceph)")
    parser.add_argument("--no-ceph", action="store_true", help="only the CT steps")
    parser.add_argument("--ceph-seed", type=int, default=SEED, help="seed of the synthetic cephalogram")
    parser.add_argument("--ceph-model", type=Path, default=None,
                        help="2D model file for the cephalogram (default: the shipped ceph19 model)")
    parser.add_argument(
        "--host-network", action="store_true",
        help="run Orthanc on the host network instead of a private namespace (when not root; listens on all interfaces)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_demo(args)
    except (DemoError, OrthancError, ToolNotFound) as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        return 130
    return 0


def run_demo(args: argparse.Namespace) -> None:
    import os

    out: Path = args.out.resolve()
    ct, ceph = not args.ceph_only, not args.no_ceph
    if not (ct or ceph):
        raise DemoError("--ceph-only and --no-ceph leave nothing to do")
    progress = Progress(2 + 7 * ct + 4 * ceph)
    for tool in ("Orthanc", "curl"):
        program(tool)
    for tool in ("storescu", "findscu", "dsr2html"):  # by path, never pynetdicom's namesakes (dicom/dcmtk.py)
        dcmtk_tool(tool)
    if not args.host_network and os.geteuid() != 0:
        raise DemoError("a private network namespace needs root (unshare -n); run as root or add --host-network")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    progress(f"bootstrap ok; working in {out}")

    config = write_runtime_config(
        out / "orthanc.json",
        {
            "StorageDirectory": str(out / "orthanc"),
            "IndexDirectory": str(out / "orthanc"),
            "PacsLandmarks": {"WorkDirectory": str(out / "pacs-landmarks"),
                              **({"CephModel": str(args.ceph_model.resolve())} if args.ceph_model else {})},
        },
    )
    orthanc = OrthancProcess(config, private_network=not args.host_network, log_path=out / "orthanc.log")
    try:
        orthanc.start(timeout=90)
        health = _wait_model(orthanc, 60)
        ceph_model = health.get("ceph_model") or {}
        progress(
            f"Orthanc started (AE {orthanc.aet}, DICOM {orthanc.dicom_port}, HTTP {orthanc.http_port}); "
            f"model {health['model']['name']} {health['model']['version']} loaded"
            + (f", cephalograms: {ceph_model['name']} {ceph_model['version']}" if ceph_model.get("loaded") else "")
            + f"; log {out / 'orthanc.log'}"
        )
        if ct:
            _ct_steps(args, orthanc, out, progress, health)
        if ceph:
            ceph_step(args, orthanc, out, progress, ceph_model)
    finally:
        orthanc.stop()
        print("demo: Orthanc stopped", flush=True)


def _ct_steps(args: argparse.Namespace, orthanc: OrthancProcess, out: Path, progress: Progress,
              health: dict[str, Any]) -> None:
    """The CT part: a phantom head CT in, SR/SEG/GSPS found by findscu, compared with the truth."""
    case_dir, truth = _make_phantom(out, args.seed, args.size)
    files = sorted(case_dir.glob("*.dcm"))
    progress(f"phantom generated: {len(files)} slices in {case_dir}")

    t = time.perf_counter()
    orthanc.storescu(case_dir)
    sent_at = time.time()
    progress(f"sent with storescu in {time.perf_counter() - t:.1f} s; waiting for the plugin (StableAge + cascade)")

    job = _wait_job(orthanc, truth["series_instance_uid"], args.timeout, progress)
    timings = ", ".join(
        f"{k} {v:.1f} s" for k, v in {"stable wait": job["created_at"] - sent_at, **job["timings"]}.items()
    )
    progress(f"job {job['id']} done, {time.time() - sent_at:.1f} s after the last instance ({timings})")

    study_uid = job["study_instance_uid"]
    study_id = orthanc.get_json(f"/series/{job['source']}")["ParentStudy"]
    found = {m: orthanc.findscu_series(study_uid, m) for m in ("SR", "SEG")}
    if not found["SR"] or not found["SEG"]:
        raise DemoError(f"findscu did not find the results in study {study_uid}: {found}")
    progress("findscu (SERIES level) finds the results in the study:")
    for modality, matches in found.items():
        for m in matches:
            progress.note(
                f"{modality:3s} series {m.get('SeriesNumber', '?'):>4s}  {m.get('SeriesDescription', '')!s:40s} "
                f"{m.get('NumberOfSeriesRelatedInstances', '?')} instance(s)  {m.get('SeriesInstanceUID')}"
            )

    results_dir = out / "results"
    results_dir.mkdir()
    paths = _download_results(orthanc, job, results_dir)
    landmark_sr = _read_dataset(paths[0])
    from pacs_landmarks.sr_templates import read_landmark_sr

    predicted = read_landmark_sr(landmark_sr, include_missing=True)
    n_found = sum(lm.position_lps_mm is not None for lm in predicted)
    progress(f"landmark SR read back from Orthanc ({n_found} of {len(predicted)} landmarks found) vs the "
             "phantom's truth:")
    print_landmark_table(predicted, truth)
    if str(health["model"]["version"]).endswith("untrained"):
        progress.note("NOTE: the shipped model is untrained (random weights): these errors are meaningless;")
        progress.note("      train it with `make train-demo`.")

    progress("measurements (from the measurements SR):")
    for line in measurement_lines(_read_dataset(paths[1]), truth):
        progress.note(line)

    html = results_dir / "landmarks-sr.html"
    proc = subprocess.run([dcmtk_tool("dsr2html"), str(paths[0]), str(html)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise DemoError(f"dsr2html failed: {proc.stderr.strip()}")
    progress(f"SR rendered with dsr2html: {html}")
    print(
        "\nWhere to look:\n"
        f"  results (SR, measurements SR, SEG, HTML): {results_dir}\n"
        f"  the demo's archive in Orthanc Explorer: `.venv/bin/python -m pacs_landmarks.plugin.serve "
        f"--storage {out}` then http://localhost:8042/app/explorer.html#study?uuid={study_id}\n"
        f"  plugin jobs: http://localhost:8042/pacs-landmarks/jobs (while it runs)",
        flush=True,
    )


def ceph_step(args: argparse.Namespace, orthanc: OrthancProcess, out: Path, progress: Progress,
              ceph_model: dict[str, Any]) -> None:
    """The cephalogram part (module docstring)."""
    if not ceph_model.get("loaded"):
        raise DemoError(f"the plugin has no cephalogram model: {ceph_model.get('error') or 'not loaded'}")
    folder = out / "ceph"
    cli = Path(sys.executable).with_name("pacs-landmarks")
    proc = subprocess.run([str(cli) if cli.exists() else "pacs-landmarks", "phantom", str(folder), "--ceph",
                           "--count", "1", "--seed", str(args.ceph_seed)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise DemoError(f"pacs-landmarks phantom --ceph failed: {(proc.stderr or proc.stdout).strip()[-1500:]}")
    image, truth = folder / "ceph-0001" / "image.dcm", json.loads((folder / "ceph-0001" / "landmarks.json").read_text())
    progress(f"synthetic lateral cephalogram: {truth['rows']} x {truth['columns']} px, {image}")

    t = time.perf_counter()
    orthanc.storescu([image])
    sent_at = time.time()
    progress(f"sent with storescu in {time.perf_counter() - t:.1f} s; the plugin starts an image job at once")
    job = _wait_job(orthanc, truth["series_instance_uid"], args.timeout, progress)
    timings = ", ".join(f"{k} {v:.2f} s" for k, v in {"queued after": job["created_at"] - sent_at,
                                                     **job["timings"]}.items())
    progress(f"job {job['id']} {job['state']}, {time.time() - sent_at:.1f} s after the image ({timings})")
    if job["details"].get("nothing_found") or not job["details"].get("result_instances"):
        untrained = str(ceph_model.get("version", "")).endswith("untrained")
        progress(f"no tracing: no landmark found ({job.get('reason') or 'no result objects'})")
        if untrained:
            progress.note(f"NOTE: the cephalogram model {ceph_model['name']} {ceph_model['version']} is UNTRAINED "
                          "(random weights): it finds nothing, so no SR was stored. Train one with")
            progress.note("      `make train-demo-ceph` (or pass a model with --ceph-model).")
        return
    study_uid = str(truth["study_instance_uid"])
    found = {m: orthanc.findscu_series(study_uid, m) for m in ("SR", "PR")}
    if not found["SR"]:
        raise DemoError(f"findscu did not find the cephalogram's SR in study {study_uid}")
    progress.note("findscu (SERIES level) finds the results in the study:")
    for modality, matches in found.items():
        for m in matches:
            progress.note(f"{modality:3s} series {m.get('SeriesNumber', '?'):>4s}  "
                          f"{m.get('SeriesDescription', '')!s:40s} {m.get('SeriesInstanceUID')}")
    results_dir = out / "ceph-results"
    results_dir.mkdir()
    names = ("landmarks-sr.dcm", "measurements-sr.dcm", "gsps.dcm")
    paths = []
    for iid, name in zip(job["details"]["result_instances"], names):
        status, data = orthanc.request("GET", f"/instances/{iid}/file")
        if status != 200:
            raise DemoError(f"could not download result {iid} from Orthanc: HTTP {status}")
        (results_dir / name).write_bytes(data)
        paths.append(results_dir / name)
    from pacs_landmarks.sr_templates.landmark_sr_2d import read_landmark_sr_2d, read_spacing_2d

    sr = _read_dataset(paths[0])
    spacing, source = read_spacing_2d(sr)
    progress(f"the tracing, read back from the SR (pixel spacing {source}):")
    print_tracing_table(read_landmark_sr_2d(sr, include_missing=True), truth, spacing)
    if str(ceph_model.get("version", "")).endswith("untrained"):
        progress.note("NOTE: the cephalogram model is untrained (random weights): these points are meaningless.")
    for line in measurement_lines(_read_dataset(paths[1]), truth, "ceph19"):
        progress.note(line)
    progress.note(f"results (SR, measurements SR, GSPS with the tracing): {results_dir}")


def print_tracing_table(landmarks: list[Any], truth: dict[str, Any], spacing: tuple[float, float] | None) -> None:
    """Every landmark: the SR's point (column, row), the truth's, and the distance in mm (px without spacing)."""
    true = {lm["name"]: lm["position_px"] for lm in truth["landmarks"]}
    unit = "mm" if spacing else "px"
    print(f"    {'landmark':24s} {'status':21s} {'SR (col, row)':>18s} {'truth (col, row)':>18s} {'error':>9s}")
    errors = []
    for lm in landmarks:
        t = true.get(lm.name)
        fmt = lambda v: "(" + ", ".join(f"{x:7.1f}" for x in v) + ")"  # noqa: E731
        if lm.position_px is None or t is None:
            print(f"    {lm.name:24s} {lm.status:21s} {'-':>18s} {fmt(t) if t else '-':>18s}")
            continue
        d = np.subtract(lm.position_px, t) * (np.array([spacing[1], spacing[0]]) if spacing else 1.0)
        errors.append(float(np.hypot(*d)))
        print(f"    {lm.name:24s} {lm.status:21s} {fmt(lm.position_px):>18s} {fmt(t):>18s} {errors[-1]:6.2f} {unit}")
    if errors:
        print(f"    mean error {np.mean(errors):.2f} {unit}, max {np.max(errors):.2f} {unit} over {len(errors)} landmarks")


def _wait_model(orthanc: OrthancProcess, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        health = orthanc.get_json("/pacs-landmarks/health")
        if health["model"]["loaded"] and not health["model"]["loading"]:  # the cephalogram model loads after it
            return health
        if health["model"]["error"] or time.monotonic() > deadline:
            raise DemoError(f"the plugin has no model: {health['model']['error'] or 'still loading'}")
        time.sleep(0.3)


def _make_phantom(out: Path, seed: int, size: int) -> tuple[Path, dict[str, Any]]:
    phantom_dir = out / "phantom"
    cli = Path(sys.executable).with_name("pacs-landmarks")
    cmd = [str(cli) if cli.exists() else "pacs-landmarks", "phantom", str(phantom_dir), "--count", "1",
           "--seed", str(seed), "--size", str(size)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DemoError(f"pacs-landmarks phantom failed: {(proc.stderr or proc.stdout).strip()[-1500:]}")
    cases = sorted(p for p in phantom_dir.iterdir() if p.is_dir())
    if not cases or not (cases[0] / "landmarks.json").exists():
        raise DemoError(f"pacs-landmarks phantom wrote no case with landmarks.json into {phantom_dir}")
    return cases[0], json.loads((cases[0] / "landmarks.json").read_text())


def _wait_job(orthanc: OrthancProcess, series_uid: str, timeout: float, progress: Progress) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        jobs = [j for j in orthanc.get_json("/pacs-landmarks/jobs") if j["series_instance_uid"] == series_uid]
        if jobs:
            job = jobs[0]
            if job["state"] != seen:
                seen = job["state"]
                progress.note(f"job {job['id']}: {seen}")
            if job["state"] == "done":
                return job
            if job["state"] == "failed":
                raise DemoError(f"the job failed: {job['reason']} (log: {orthanc.log_path})")
        time.sleep(0.5)
    raise DemoError(f"no results within {timeout:.0f} s (last state: {seen or 'no job'}; log: {orthanc.log_path})")


def _download_results(orthanc: OrthancProcess, job: dict[str, Any], out: Path) -> list[Path]:
    """The results as Orthanc stored them (landmark SR, measurements SR, SEG, GSPS: the worker's order)."""
    ids = job["details"].get("result_instances") or []
    names = ("landmarks-sr.dcm", "measurements-sr.dcm", "seg.dcm", "gsps.dcm")
    if len(ids) != len(names):
        raise DemoError(f"the job recorded {len(ids)} stored results, expected {len(names)}")
    paths = []
    for iid, name in zip(ids, names):
        status, data = orthanc.request("GET", f"/instances/{iid}/file")
        if status != 200:
            raise DemoError(f"could not download result {iid} from Orthanc: HTTP {status}")
        (out / name).write_bytes(data)
        paths.append(out / name)
    return paths


def _read_dataset(path: Path) -> Any:
    import pydicom

    return pydicom.dcmread(path)


def print_landmark_table(predicted: list[Any], truth: dict[str, Any]) -> list[float]:
    """Predicted vs true LPS positions and the 3D error per landmark; returns the errors (mm)."""
    true = {lm["name"]: np.asarray(lm["position_lps_mm"], dtype=float) for lm in truth["landmarks"]}
    print(f"    {'landmark':12s} {'predicted LPS (mm)':>26s} {'truth LPS (mm)':>26s} {'error':>8s}")
    errors = []
    fmt = lambda v: "(" + ", ".join(f"{x:7.1f}" for x in v) + ")"  # noqa: E731
    for lm in predicted:
        if lm.position_lps_mm is None:  # stated in the SR as not found / outside the field of view
            status = lm.status.replace("_", " ") + (f" ({lm.reason})" if lm.reason else "")
            print(f"    {lm.name:12s} {status}")
            continue
        p = np.asarray(lm.position_lps_mm, dtype=float)
        t = true.get(lm.name)
        if t is None:
            print(f"    {lm.name:12s} {fmt(p):>26s} {'(not in truth)':>26s}")
            continue
        err = float(np.linalg.norm(p - t))
        errors.append(err)
        print(f"    {lm.name:12s} {fmt(p):>26s} {fmt(t):>26s} {err:6.1f} mm")
    if errors:
        print(f"    mean error {np.mean(errors):.1f} mm, max {np.max(errors):.1f} mm over {len(errors)} landmarks")
    return errors


# The phantom's names for the measurements whose code value differs (landmarks.json "measurements").
_TRUTH_KEYS = {"PoR-PoL": "inter-porion", "OrR-OrL": "inter-orbitale", "GoR-GoL": "bigonial"}


def measurement_rows(sr: Any) -> list[tuple[str, str, float, str]]:
    """(code value, meaning, value, UCUM unit) per NUM content item of an SR (PS3.3 C.17.3.2.1)."""
    rows: list[tuple[str, str, float, str]] = []

    def walk(items: Any) -> None:
        for item in items or []:
            if getattr(item, "ValueType", None) == "NUM" and "MeasuredValueSequence" in item:
                concept = item.ConceptNameCodeSequence[0]
                mv = item.MeasuredValueSequence[0]
                unit = mv.MeasurementUnitsCodeSequence[0].CodeValue
                rows.append((concept.CodeValue, concept.CodeMeaning, float(mv.NumericValue), unit))
            walk(getattr(item, "ContentSequence", None))

    walk(getattr(sr, "ContentSequence", None))
    return rows


def measurement_lines(sr: Any, truth: dict[str, Any] | None = None, set_name: str = "craniofacial16") -> list[str]:
    """The measurements of an SR with the landmark set's typical range and, for a phantom, the true value."""
    from pacs_landmarks.landmark_sets import load_landmark_set

    measures = load_landmark_set(set_name).get("measurements", [])
    ranges = {m["code"]["value"]: m.get("range") for m in measures}
    true = dict((truth or {}).get("measurements") or {})
    true.update({m["code"]["value"]: true[m["name"]] for m in measures if m["name"] in true})  # 2D truth: by name
    codes = {m["code"]["value"] for m in measures}
    rows = [r for r in measurement_rows(sr) if r[0] in codes]  # not the pixel spacing, not the confidences
    if not rows:
        return ["(no numeric measurements in the SR)"]
    width = max(len("measurement"), *(len(meaning) for _, meaning, _, _ in rows))
    lines = [f"{'measurement':{width}s} {'value':>10s} {'typical':>13s} {'truth':>8s}"]
    for code, meaning, value, unit in rows:
        lo_hi = ranges.get(code)
        typical = f"{lo_hi[0]:g}-{lo_hi[1]:g}" if lo_hi else ""
        flag = " " if not lo_hi or lo_hi[0] <= value <= lo_hi[1] else "*"
        t = true.get(_TRUTH_KEYS.get(code, code))
        lines.append(
            f"{meaning:{width}s} {value:7.1f} {unit:3s}{flag}{typical:>12s} {'' if t is None else f'{t:7.1f}':>8s}"
        )
    lines.append("* outside the typical range")
    return lines


if __name__ == "__main__":
    sys.exit(main())
