"""Writes the tables of docs/accuracy.md (to docs/accuracy-tables.md, to paste) from build/eval/*.json
(the output of scripts/eval-demo)."""
import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pacs_landmarks.inference.evaluate import HEADER, _row, reliability  # noqa: E402

EV = Path(__file__).resolve().parent.parent / "build" / "eval"
EVAL_DEMO = Path(__file__).resolve().parent / "eval-demo"
# What each set of scripts/eval-demo is, in the order of the tables; its phantom options come from the script.
LABELS = [
    ("thin", "complete heads, 1.0 mm slices"),
    ("5mm", "complete heads, 5 mm slices"),
    ("cov-routine", "routine head (foramen magnum to vertex)"),
    ("cov-sinus", "sinus"),
    ("cov-facial", "facial bones"),
    ("cov-mandible", "mandible only"),
    ("cov-cbct-small", "dental CBCT, small cylinder"),
    ("cov-cbct-medium", "dental CBCT, medium cylinder"),
    ("cov-random", "random cuts at both ends (calibration set)"),
    ("cov2-mandible", "mandible only, second draw"),
    ("cov2-cbct-small", "dental CBCT, small cylinder, second draw"),
    ("cov2-cbct-medium", "dental CBCT, medium cylinder, second draw"),
    ("cov2-random", "random cuts at both ends, second draw"),
    ("cov3-mandible", "mandible only, third draw"),
    ("cov3-cbct-small", "dental CBCT, small cylinder, third draw"),
    ("cov3-cbct-medium", "dental CBCT, medium cylinder, third draw"),
    ("cov3-random", "random cuts at both ends, third draw"),
    ("cov3-routine", "routine head, third draw"),
    ("cov4-mandible", "mandible only, fourth draw"),
    ("cov4-cbct-small", "dental CBCT, small cylinder, fourth draw"),
    ("cov4-cbct-medium", "dental CBCT, medium cylinder, fourth draw"),
    ("cov4-random", "random cuts at both ends, fourth draw"),
    ("cov4-routine", "routine head, fourth draw"),
    ("cov5-mandible", "mandible only, fifth draw"),
    ("cov5-cbct-medium", "dental CBCT, medium cylinder, fifth draw"),
    ("cov5-routine", "routine head, fifth draw"),
    ("cov5-sinus", "sinus, fifth draw"),
    ("cov5-random", "random cuts at both ends, fifth draw"),
    ("cov6-mandible", "mandible only, sixth draw"),
    ("cov6-cbct-small", "dental CBCT, small cylinder, sixth draw"),
    ("cov6-cbct-medium", "dental CBCT, medium cylinder, sixth draw"),
    ("cov6-random", "random cuts at both ends, sixth draw"),
    ("cov6-routine", "routine head, sixth draw"),
    ("cov7-mandible", "mandible only, seventh draw"),
    ("cov7-cbct-medium", "dental CBCT, medium cylinder, seventh draw"),
    ("cov7-routine", "routine head, seventh draw"),
    ("cov7-random", "random cuts at both ends, seventh draw"),
    ("cov8-routine", "routine head, eighth draw"),
    ("cov8-sinus", "sinus, eighth draw"),
    ("cov8-facial", "facial bones, eighth draw"),
    ("cov8-random", "random cuts at both ends, eighth draw"),
    ("cov8-cbct-medium", "dental CBCT, medium cylinder, eighth draw"),
    ("cov9-routine", "routine head, ninth draw"),
    ("cov9-sinus", "sinus, ninth draw"),
    ("cov9-random", "random cuts at both ends, ninth draw"),
    ("cov9-mandible", "mandible only, ninth draw"),
    ("cov9-cbct-medium", "dental CBCT, medium cylinder, ninth draw"),
    ("cov10-cbct-small", "dental CBCT, small cylinder, tenth draw"),
    ("cov10-cbct-medium", "dental CBCT, medium cylinder, tenth draw"),
    ("cov10-mandible", "mandible only, tenth draw"),
    ("cov10-random", "random cuts at both ends, tenth draw"),
    ("cov10-routine", "routine head, tenth draw"),
    ("metal", "16 filled teeth with streaks (600 HU)"),
    ("cbct", "CBCT-like intensity (gain 0.75, +250 HU, cupping 150 HU, rings 40 HU)"),
    ("variety", "full domain randomisation (calibration set)"),
    ("routine-tilt-metal", "routine head, 20° gantry tilt, head turned, fillings with streaks"),
    ("routine-tilt-metal3", "the same, second draw"),
]


def phantom_sets(script: Path = EVAL_DEMO) -> list[tuple[str, range, list[str]]]:
    """(name, seeds, phantom options) of every set the script's ``mk`` makes, ``for k in ...`` loops expanded:
    the options as the script passes them (``phantom --seed S --count N`` makes the cases of seeds S..S+N-1)."""
    sets, loop = [], [None]
    for line in script.read_text().splitlines():
        line = line.strip()
        if m := re.match(r"for k in (.+); do$", line):
            loop = m.group(1).split()
        elif line == "done":
            loop = [None]
        elif line.startswith("mk ") and not line.startswith("mk()"):
            for k in loop:
                words = shlex.split(line.replace("$k", k) if k else line)
                name, opts = words[1], words[2:]
                seed = int(opts[opts.index("--seed") + 1])
                sets.append((name, range(seed, seed + int(opts[opts.index("--count") + 1])), opts))
    return sets


def sets() -> list[tuple[str, str, str]]:
    """(name, label, options) of every set, in LABELS' order; a set without a label, or a label without a
    set, is an error (the script and the tables would disagree)."""
    made = {name: shlex.join(opts) for name, _, opts in phantom_sets()}
    labels = dict(LABELS)
    if set(made) != set(labels):
        raise SystemExit(f"scripts/eval-demo and LABELS differ: {sorted(set(made) ^ set(labels))}")
    return [(name, label, made[name]) for name, label in LABELS]


def load(name):
    p = EV / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def pct(v):
    return "-" if v is None else f"{100 * v:.1f}"


def summary_row(name, label, r):
    st = r["status"]
    fe = st["found_error"]
    fine = r["overall"][r["stages"][-1]]
    found_within = fe["sdr"]["2"] if fe.get("n") else None
    return (f"| {label} | {r['cases']} | {fine.get('mre', float('nan')):.2f} | {pct(fine['sdr']['2']) if fine.get('n') else '-'} | "
            f"{(format(fe['mre'], '.2f') if fe.get('n') else '-')} | {pct(found_within)} | {pct(st['found_of_in_scan'])} | "
            f"{pct(st['presence_correct_beyond_5mm'])} ({st['presence_n_beyond_5mm']}) | {st['found_not_in_scan']} | "
            f"{st['found_beyond_5mm']} |")


def main():
    calib = json.loads((EV / "calib.json").read_text()) if (EV / "calib.json").is_file() else None
    import torch  # noqa: F401

    from pacs_landmarks.inference.model import LandmarkModel

    model = LandmarkModel.load()
    cal = model.metadata.get("calibration") or {}
    out = []
    w = out.append
    w("# Accuracy of the shipped demo model (synthetic phantoms)\n")
    w(f"The shipped model `craniofacial16-demo` {model.version} is trained on synthetic phantoms only "
      "(docs/training.md); these figures are on **held-out phantoms** (seeds never used in training: training "
      "used 1000–1095) and say nothing about real patients. **Not for clinical use.**\n")
    w("Radial error = Euclidean distance (mm, patient LPS) between predicted and true landmark. SDR = share of "
      "points within 2 / 2.5 / 3 / 4 mm. Landmarks whose truth lies outside the scanned volume (cut series) have "
      "no error. \"All in scan\" rows score every landmark inside the scan whatever its status; \"found\" rows "
      "only those reported `found` (the only ones that reach the SR and SEG). Presence is correct when a landmark "
      "is `outside_field_of_view` exactly when its truth is outside the scan; it is scored for landmarks more than "
      "5 mm from the scan's edge. Machine: 2-core x86-64 CPU, torch 2.13.0 CPU.\n")
    w("## Commands\n")
    w("    # held-out sets (256 × 256 at 1.0 mm; each line adds the options in the table below)")
    w("    pacs-landmarks phantom build/demo-data/eval-NAME --size 256 --pixel-spacing 1.0 OPTIONS")
    w("    # calibration (scripts/train-real, step 6): the shape prior, then the confidence threshold; then each set")
    w("    pacs-landmarks evaluate --data build/real-data/calib-prior --model M.pt --calibrate M.pt --fit-shape-prior")
    w("    pacs-landmarks evaluate --data build/real-data/calib --model M.pt --calibrate M.pt")
    w("    pacs-landmarks evaluate --data build/demo-data/eval-NAME --json build/eval/NAME.json\n")
    w("| NAME | OPTIONS |\n|---|---|")
    for name, label, opts in sets():
        w(f"| {name} | `{opts}` |")
    w("")
    w("## Summary\n")
    w("| set | cases | MRE all in scan (mm) | SDR@2 all in scan % | MRE found (mm) | SDR@2 found % | found of in scan % | "
      "presence correct > 5 mm from edge % (n) | found but not in scan | found > 5 mm off |")
    w("|---|---|---|---|---|---|---|---|---|---|")
    results = {}
    for name, label, _ in sets():
        r = load(name)
        if r is None:
            continue
        results[name] = r
        w(summary_row(name, label, r))
    w("")
    # presence over all cut sets
    w("Targets (issue 10): complete heads with ≤ 1.25 mm slices MRE ≤ 1.0 mm and SDR@2 ≥ 95 % (model 1.0.0: "
      "0.78 mm, 95.6 %); 5 mm slices ≤ 1.5 mm; presence correct for ≥ 99 % of landmarks more than 5 mm from the "
      "edge; no landmark found that is not in the scan. See \"Targets\" below for what is met.\n")
    # reliability over everything
    confs, errs = [], []
    for r in results.values():
        confs.append(np.asarray(r["confidences"], float).ravel())
        errs.append(np.asarray(r["errors"], float)[:, -1].ravel())
    c, e = np.concatenate(confs), np.concatenate(errs)
    w("## Confidence: reliability table\n")
    thr = cal.get("low_confidence")
    w(f"The confidence threshold below which a landmark is `not_found` is calibrated on the two calibration sets "
      f"plus 4 held-out warps of the real training head (`make train-real`; `evaluate --calibrate`, stored in the model file's metadata): the lowest threshold at which ≥ 95 % of the "
      f"points at or above it are within 2 mm. Calibrated threshold: **{thr}** "
      f"({pct(cal.get('share'))} % of {cal.get('n')} calibration points at or above it within 2 mm). "
      "Reliability over every in-scan landmark of every set above (status not considered):\n")
    w("| confidence | n | within 2 mm % | MRE (mm) |\n|---|---|---|---|")
    for row in reliability(c, e):
        mre = "-" if row["mre"] is None else f"{row['mre']:.2f}"
        w(f"| {row['from']:.1f}–{row['to']:.1f} | {row['n']} | {pct(row['within_2mm'])} | {mre} |")
    fe_all = np.concatenate([np.asarray(r["errors"], float)[:, -1][np.asarray([[s == 'found' for s in pc['statuses']] for pc in r['per_case']])] for r in results.values()])
    fe_all = fe_all[np.isfinite(fe_all)]
    w(f"\nAmong all `found` landmarks of all sets: {100 * (fe_all <= 2).mean():.1f} % within 2 mm (n = {fe_all.size}).\n")
    for name, title in (("thin", "Complete heads, 1.0 mm slices (20 phantoms)"), ("5mm", "Complete heads, 5 mm slices (8 phantoms)")):
        r = results.get(name)
        if not r:
            continue
        w(f"## {title}\n")
        w(HEADER.format(what="stage (all landmarks)", axes="x / y / z"))
        for st in r["stages"]:
            w(_row(st, r["overall"][st]))
        w("")
        w(HEADER.format(what="landmark (fine stage)", axes="x / y / z"))
        for n in r["landmarks"]:
            w(_row(n, r["per_landmark"][r["stages"][-1]][n]))
        w("")
        w(HEADER.format(what="found landmarks", axes="x / y / z"))
        w(_row("found", r["status"]["found_error"]))
        w("")
    w("## Per scan range and condition: statuses\n")
    w("| set | found / not found / outside FOV | per landmark: share found (in scan) |\n|---|---|---|")
    for name, label, _ in sets():
        r = results.get(name)
        if not r:
            continue
        st = r["status"]["counts"]
        statuses = np.array([pc["statuses"] for pc in r["per_case"]])
        per = []
        for i, n in enumerate(r["landmarks"]):
            per.append(f"{n} {100 * (statuses[:, i] == 'found').mean():.0f}")
        w(f"| {label} | {st['found']} / {st['not_found']} / {st['outside_field_of_view']} | {', '.join(per)} |")
    w("")
    (Path(__file__).resolve().parent.parent / "docs" / "accuracy-tables.md").write_text("\n".join(out) + "\n", encoding="utf-8")
    print("\n".join(out))


if __name__ == "__main__":
    main()
