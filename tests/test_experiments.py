"""python -m pipeline.experiments distorted: the Table 1 runner, end to end on a tiny budget."""
from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from conftest import PYTHON, REPO, SAMPLE_DATA, subprocess_env
from data_prep.digits import write_synthetic_idx
from pipeline.experiments.__main__ import main
from pipeline.experiments.distorted import MODEL_KEYS, format_table, results_json


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
    assert row["cnn"][3] == "2.00 ± 1.00 (n=3)"    # RTS: mean ± sample std over 3 seeds
    assert row["st-cnn-aff"][3] == "0.50"          # one seed: no spread
    assert row["st-fcn-tps"][6] == "diverged" and row["cnn"][2] == "–"
    # A variant asked for comes below Table 1's rows.
    with_variant = format_table(records + [{"model": "st-cnn-aff-nopool", "distortion": "RTS", "seed": 0,
                                            "test_error": 4.0}], models=("st-cnn-aff-nopool", "cnn"))
    assert with_variant.splitlines()[2].startswith("| CNN |")
    assert with_variant.splitlines()[3].startswith("| ST-CNN, no pooling after ST | Aff | – | 4.00 |")
    # The same numbers where a program reads them.
    summary = results_json(records, "mnist", "standard")
    assert summary["dataset"] == "mnist" and summary["profile"] == "standard"
    assert summary["errors"]["RTS"]["cnn"] == {"mean": 2.0, "std": 1.0, "n": 3}
    assert summary["errors"]["RTS"]["st-cnn-aff"] == {"mean": 0.5, "std": 0.0, "n": 1}
    assert "TC" not in summary["errors"]  # a diverged run has no error to report


@pytest.mark.slow
def test_quick_profile_trains_through_the_trainer_and_resumes_an_interrupted_table(tmp_path, capsys):
    from pipeline.experiments.distorted import make_profile, prepare_data, run_config
    from pipeline.train import run

    out = tmp_path / "out"
    argv = ["distorted", "--idx-root", str(SAMPLE_DATA / "mnist"), "--train-count", "8000", "--out", str(out),
            "--profile", "quick", "--steps", "8", "--batch-size", "32", "--train-limit", "256", "--test-limit", "128",
            "--distortions", "RTS", "--models", "fcn,cnn,st-cnn-aff", "--threads", "1", "--num-examples", "3"]
    # An interrupted table: the ST-CNN's run stopped at its step-4 checkpoint (as after a SIGTERM).
    profile = make_profile("quick", str(SAMPLE_DATA / "mnist"), out=str(out), steps=8, batch_size=32,
                           train_count=8000, train_limit=256, test_limit=128)
    interrupted = run_config(profile, "st-cnn-aff", "RTS", 0, prepare_data(profile, "RTS"))
    run(replace(interrupted, train=replace(interrupted.train, max_steps=4)))
    assert main(argv) == 0
    printed = capsys.readouterr().out
    table = (out / "table.md").read_text()
    assert "| Model | | RTS |" in table and "ST-CNN | Aff" in table and table.split("\n\n")[1] in printed
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["model"] for r in results) == ["cnn", "fcn", "st-cnn-aff"]
    assert all(r["num_test"] == 128 and r["test_error"] * 1.28 == pytest.approx(round(r["test_error"] * 1.28), abs=1e-3)
               for r in results)  # wrong digits of the 128
    for r in results:  # each run is an ordinary Trainer run directory
        run_dir = Path(r["run_dir"])
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [rec["top1"] for rec in records if rec["split"] == "test"][-1] == pytest.approx(1 - r["test_error"] / 100, abs=1e-6)
        assert (run_dir / "checkpoints" / "last.pt").is_file() and (run_dir / "config.yaml").is_file()
        assert any((run_dir / "tb").iterdir())
        assert "distortion: RTS" in (run_dir / "config.yaml").read_text()
    st_run = Path(next(r["run_dir"] for r in results if r["model"] == "st-cnn-aff"))
    assert list((st_run / "viz").glob("step_*.png"))  # the trainer's attention pictures
    records = [json.loads(line) for line in (st_run / "metrics.jsonl").read_text().splitlines()]
    # the interrupted run went on from its step-4 checkpoint, not from scratch
    assert [rec["step"] for rec in records if rec["split"] == "setup"] == [0, 4]
    # The shards come from data_prep digits --fresh-train: undistorted training digits, distorted test digits.
    manifest = json.loads(next((out / "data").glob("RTS-*/manifest.json")).read_text())
    assert manifest["train_distortion"] == "fresh" and manifest["splits"]["train"]["num_samples"] == 256
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["errors"]["RTS"]) == {"fcn", "cnn", "st-cnn-aff"} and summary["profile"] == "quick"
    assert Image.open(out / "distorted_RTS.png").size[1] > 3 * 42 * 2
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

    from pipeline.experiments.distorted import transform_stats
    from pipeline.models import create_model

    model = create_model("digits_st_cnn", input_size=42, transform="affine", pool_after_st=True).eval()
    images = torch.randint(0, 255, (4, 1, 42, 42), dtype=torch.uint8)
    assert transform_stats(model, images, "affine") == pytest.approx({"grid_shift_px": 0.0, "sampled_area": 1.0},
                                                                      abs=1e-4)
    # Sample the central half: area 1/4; a point p moves by |p| / 2, and |p| averages 0.765 x 21 px over the square.
    with torch.no_grad():
        model.transformer.head.bias.copy_(torch.tensor([0.5, 0, 0, 0, 0.5, 0]))
    stats = transform_stats(model, images, "affine")
    assert stats["sampled_area"] == pytest.approx(0.25, abs=0.01)
    assert stats["grid_shift_px"] == pytest.approx(0.765 * 21 / 2, rel=0.03)


def test_help_describes_every_experiment_and_data_prep_command(capsys):
    from data_prep.__main__ import COMMANDS
    from data_prep.__main__ import main as data_prep_main
    from pipeline.experiments.__main__ import EXPERIMENTS

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in EXPERIMENTS) and "Table 1" in out
    assert data_prep_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in COMMANDS) and "IDX" in out
    assert main([]) == 2 and "usage:" in capsys.readouterr().err  # no experiment named: usage on stderr
