"""python -m pipeline.experiments distorted: the Table 1 runner, end to end on a tiny budget."""
from __future__ import annotations

import json
import subprocess

import pytest
from PIL import Image

from conftest import PYTHON, REPO, subprocess_env
from data_prep.digits import write_synthetic_idx
from pipeline.experiments.__main__ import main
from pipeline.experiments.distorted import MODEL_KEYS, format_table


def test_table_layout_mean_and_spread():
    records = [{"model": "cnn", "distortion": "RTS", "seed": s, "test_error": e} for s, e in enumerate([1.0, 2.0, 3.0])]
    records += [{"model": "st-cnn-aff", "distortion": "RTS", "seed": 0, "test_error": 0.5},
                {"model": "st-fcn-tps", "distortion": "TC", "seed": 0, "test_error": None}]
    lines = format_table(records).splitlines()
    assert lines[0] == "| Model | | R | RTS | P | E | TC |"
    assert len(lines) == 2 + len(MODEL_KEYS)
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in lines[2:]]
    assert [c[:2] for c in cells] == [["FCN", ""], ["CNN", ""], ["ST-FCN", "Aff"], ["", "Proj"], ["", "TPS"],
                                      ["ST-CNN", "Aff"], ["", "Proj"], ["", "TPS"]]
    row = dict(zip(MODEL_KEYS, cells))
    assert row["cnn"][3] == "2.0 ± 1.0"            # RTS: mean ± sample std over 3 seeds
    assert row["st-cnn-aff"][3] == "0.5"           # one seed: no spread
    assert row["st-fcn-tps"][6] == "diverged" and row["cnn"][2] == "–"
    # A variant asked for comes below Table 1's rows.
    with_variant = format_table(records + [{"model": "st-cnn-aff-nopool", "distortion": "RTS", "seed": 0,
                                            "test_error": 4.0}], models=("st-cnn-aff-nopool", "cnn"))
    assert with_variant.splitlines()[2].startswith("| CNN |")
    assert with_variant.splitlines()[3].startswith("| ST-CNN, no pooling after ST | Aff | – | 4.0 |")


@pytest.mark.slow
def test_runner_end_to_end_on_a_tiny_budget(tmp_path, capsys):
    idx = write_synthetic_idx(tmp_path / "idx", num_train=48, num_test=16)
    out = tmp_path / "out"
    argv = ["distorted", "--idx-root", str(idx), "--out", str(out), "--quick", "--steps", "3", "--batch-size", "16",
            "--distortions", "RTS,E", "--models", "fcn,st-cnn-aff,st-fcn-tps", "--threads", "1", "--num-examples", "3"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    table = (out / "table.md").read_text()
    assert "| Model | | RTS | E |" in table and "ST-CNN | Aff" in table and table.strip() in printed + table
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["model"], r["distortion"]) for r in results) == sorted(
        (m, d) for m in ("fcn", "st-cnn-aff", "st-fcn-tps") for d in ("RTS", "E"))
    assert all(r["num_train"] == 48 and r["num_test"] == 16 and 0 <= r["test_error"] <= 100 for r in results)
    # The shards come from data_prep digits, cached per distortion.
    manifest = json.loads((out / "data" / "RTS-train10000-test2000-seed0" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["num_samples"] == 48
    # The picture: 3 test images, input + output columns for each ST-CNN model (ST-FCN when none ran).
    picture = Image.open(out / "distorted_RTS.png")
    assert picture.size[1] > 3 * 42 * 2 and picture.size[0] >= 2 * 42 * 2
    # A rerun with the same settings trains nothing and gives the same table.
    assert main(argv) == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == len(results)
    assert (out / "table.md").read_text() == table
    assert main(argv + ["--report-only"]) == 0 and (out / "table.md").read_text() == table


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    idx = write_synthetic_idx(tmp_path / "idx", num_train=4, num_test=2)
    assert main(["distorted", "--idx-root", str(idx), "--out", str(tmp_path / "o"), "--distortions", "R,XY"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--distortions 'R,XY'" in err
    assert main(["tables"]) == 2 and "unknown experiment 'tables'" in capsys.readouterr().err
    assert main(["distorted", "--idx-root", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--steps", "1"]) == 2
    assert "none: not a directory" in capsys.readouterr().err


def test_the_module_runs_as_a_program():
    result = subprocess.run([PYTHON, "-m", "pipeline.experiments", "distorted", "--help"],
                            capture_output=True, text=True, cwd=REPO, env=subprocess_env())
    assert result.returncode == 0 and "--idx-root" in result.stdout and "--quick" in result.stdout


def test_transform_stats_tell_identity_from_zoom():
    import torch

    from pipeline.experiments.distorted import build, transform_stats

    model = build("st-cnn-aff", "RTS").eval()
    images = torch.randint(0, 255, (4, 1, 42, 42), dtype=torch.uint8)
    assert transform_stats(model, images, "affine") == pytest.approx({"grid_shift_px": 0.0, "sampled_area": 1.0},
                                                                      abs=1e-4)
    # Sample the central half: area 1/4; a point p moves by |p| / 2, and |p| averages 0.765 x 21 px over the square.
    with torch.no_grad():
        model.transformer.head.bias.copy_(torch.tensor([0.5, 0, 0, 0, 0.5, 0]))
    stats = transform_stats(model, images, "affine")
    assert stats["sampled_area"] == pytest.approx(0.25, abs=0.01)
    assert stats["grid_shift_px"] == pytest.approx(0.765 * 21 / 2, rel=0.03)
