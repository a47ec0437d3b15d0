"""The held-out sets of scripts/eval-demo are what docs/accuracy.md reports, so each of their cases must be new.

`phantom --seed S --count N` makes cases with seeds S..S+N-1 (and the scan range of case k is drawn from its own
seed), so two sets made with the same options and overlapping seed ranges share whole cases: a "fresh" draw would
repeat cases already looked at, and pooled figures would count them twice. The sixth and seventh draws once did.
"""
import importlib.util
import re
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _tables():
    """scripts/accuracy_tables.py, which reads the sets from scripts/eval-demo for docs/accuracy.md."""
    spec = importlib.util.spec_from_file_location("accuracy_tables", SCRIPTS / "accuracy_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def phantom_sets(script: Path) -> list[tuple[str, range, tuple[str, ...]]]:
    """(name, seed range, the phantom options other than --seed and --count) of every set of ``script``."""
    out = []
    for name, seeds, opts in _tables().phantom_sets(script):
        rest = tuple(w for i, w in enumerate(opts)
                     if w not in ("--seed", "--count") and opts[i - 1] not in ("--seed", "--count"))
        out.append((name, seeds, rest))
    return out


def test_parser_reads_the_script_as_bash_would():
    sets = {name: (seeds, rest) for name, seeds, rest in phantom_sets(SCRIPTS / "eval-demo")}
    assert sets["thin"] == (range(5000, 5020), ("--slice-thickness", "1.0"))
    assert sets["cov3-routine"][1] == ("--slice-thickness", "1.25", "--coverage", "routine")
    assert len(sets) == len(phantom_sets(SCRIPTS / "eval-demo"))  # no name made twice


@pytest.mark.parametrize("a, b", [((9990, 8), (9995, 8)), ((9995, 8), (9997, 8))])
def test_overlapping_draws_would_be_caught(a, b, tmp_path):
    script = tmp_path / "eval-demo"
    script.write_text("for k in mandible routine; do\n"
                      f"  mk x-$k --count {a[1]} --seed {a[0]} --coverage $k\n"
                      f"  mk y-$k --count {b[1]} --seed {b[0]} --coverage $k\n"
                      "done\n")
    assert shared_cases(phantom_sets(script))


def shared_cases(sets) -> list[str]:
    shared = []
    for i, (name_a, seeds_a, rest_a) in enumerate(sets):
        for name_b, seeds_b, rest_b in sets[i + 1:]:
            common = set(seeds_a) & set(seeds_b)
            if common and rest_a == rest_b:
                shared.append(f"{name_a} and {name_b} share the cases of seeds {sorted(common)}")
    return shared


def test_no_two_held_out_sets_share_a_case():
    assert shared_cases(phantom_sets(SCRIPTS / "eval-demo")) == []


def test_the_tables_label_every_set_the_script_makes():
    tables = _tables()
    rows = tables.sets()  # exits when the two lists differ
    assert [r[0] for r in rows] == [name for name, _ in tables.LABELS]
    assert dict((r[0], r[2]) for r in rows)["metal"].startswith("--count 6 --seed 9300 --slice-thickness 1.25 --param")


def test_no_held_out_case_is_a_training_phantom():
    train = set()
    for script in ("train-demo", "train-real"):
        text = (SCRIPTS / script).read_text()
        for m in re.finditer(r'phantom "\$(DATA|WORK/phantoms|PRI)" --count "\$(\w+)" --seed (\d+)', text):
            count = int(re.search(rf"{m.group(2)}=\$\{{{m.group(2)}:-(\d+)\}}", text).group(1))
            train |= set(range(int(m.group(3)), int(m.group(3)) + count))
    assert {1000, 1095, 7000, 7023} <= train  # the parse found train-demo's phantoms and the prior's
    for name, seeds, _ in phantom_sets(SCRIPTS / "eval-demo"):
        assert not train & set(seeds), f"held-out set {name} uses training seeds {sorted(train & set(seeds))}"
