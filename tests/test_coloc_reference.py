"""benchmarks/coloc_reference.py, the plain-PyTorch reference of paper A.2, end to end on a tiny budget:
it reads a `data_prep coloc` folder, trains its own e() (and loads a saved one), runs two variants
side by side and writes the JSON the docs' tables come from."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from data_prep.coloc import ColocOptions, prepare

REPO = Path(__file__).resolve().parents[1]
MNIST = REPO / "tests" / "data" / "mnist"


def run_reference(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "coloc_reference.py"), *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def test_reference_runs_variants_and_writes_rates(tmp_path):
    data = tmp_path / "coloc-T-class3"
    prepare(ColocOptions(idx_root=str(MNIST), out=str(data), clutter="T", classes="3", count=8))
    out, cache = tmp_path / "ref.json", tmp_path / "cache"
    done = run_reference("--data", str(data), "--idx-root", str(MNIST), "--feature-steps", "3", "--steps", "4",
                         "--seeds", "2", "--variants", "ours,whole+rts+allpos", "--cache", str(cache), "--out", str(out))
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["variant"], r["clutter"], r["class"]) for r in rows] == [("ours", "T", 3), ("whole+rts+allpos", "T", 3)]
    for row in rows:
        summary = row["summary"]
        assert len(summary["rates"]) == 2 and all(0 <= r <= 1 for r in summary["rates"])
        assert 0 <= summary["initial_rate"] <= 1 and 0 < summary["scale"] < 1
        assert [s["step"] for s in row["runs"][0]["trace"]] == [0, 4]
    assert rows[0]["settings"]["init"] < 0.34 < rows[1]["settings"]["init"]  # centred 28 px vs whole image
    assert rows[1]["settings"]["positive"] == "all" and rows[1]["settings"]["features"] == "rts"
    # the same seeds give the same start: the centred 28 px window's rate is the images', not the seed's
    assert rows[0]["runs"][0]["initial_rate"] == rows[0]["runs"][1]["initial_rate"]
    # a cached e() is reused, and a saved state dict loads as --features
    again = run_reference("--data", str(data), "--features", str(cache / "cnn-none-3steps-shift8.pt"),
                          "--steps", "2", "--seeds", "1", "--variants", "ours")
    assert again.returncode == 0, again.stderr
    assert "| ours | T | 3 | 1 |" in again.stdout


def test_unknown_variant_token_is_a_one_line_error(tmp_path):
    done = run_reference("--data", str(tmp_path), "--variants", "ours+bogus")
    assert done.returncode != 0 and "unknown token 'bogus'" in done.stderr
