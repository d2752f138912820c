"""The `make demo` path (generate -> shard -> 2-rank torchrun training -> evaluate -> report) on a tiny setting."""
import json

import pytest

from pipeline import demo


@pytest.mark.slow
@pytest.mark.multiprocess
def test_demo_end_to_end_tiny(tmp_path):
    out = tmp_path / "demo"
    rc = demo.main(["--out", str(out), "--classes", "3", "--images-per-class", "6", "--size", "96",
                    "model.input_size=96", "data.resize=96", "model.crop_size=48", "train.max_steps=4", "train.eval_every=2",
                    "train.checkpoint_every=2", "train.global_batch_size=8", "train.num_workers=0", "train.num_viz=2",
                    "optim.lr_start.localisation=1"])  # the demo's localisation starts after 4 steps
    assert rc == 0
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["dataset"] == "cub" and len(manifest["classes"]) == 3
    run = out / "run"
    assert (run / "checkpoints" / "last.pt").exists() and (run / "checkpoints" / "best.pt").exists()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 4
    assert [r["world_size"] for r in records if r["split"] == "setup"] == [2]  # torchrun started 2 ranks
    assert sorted(p.name for p in (run / "viz").glob("*.png")) == ["step_0000002.png", "step_0000004.png"]
    report = (out / "report.md").read_text()
    test_images = manifest["splits"]["test"]["num_samples"]
    assert f"on {test_images} images" in report
    hit_table = report.split("Part hit-rate")[1]
    assert all(f" {part} |" in hit_table for part in manifest["parts"])  # one column per part, both streams
    found = json.loads((out / "report.json").read_text())
    assert found["st"]["num_samples"] == test_images and found["baseline"] is None
    import torch
    best = torch.load(run / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    assert found["st"]["top1"] == pytest.approx(best["metrics"]["top1"])  # the report scores best.pt
    for rates in (found["st"]["part_hit_rate"], found["st"]["initial_part_hit_rate"]):
        assert sorted(rates) == ["stream_0", "stream_1"]
        assert all(0.0 <= v <= 1.0 for stream in rates.values() for v in stream.values())
    initial = found["st"]["initial_part_hit_rate"]["stream_0"]
    assert set(initial) == set(found["st"]["part_hit_rate"]["stream_0"])
    assert (out / "attention.png").stat().st_size > 0 and "attention.png" in report
    # the localisation net trains: its head starts at zero weights (one window for every image) and
    # after a few steps predicts windows that differ between images; a frozen one fails here
    state = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert state["model"]["transformer.head.weight"].abs().sum() > 0
    assert all(w["spread_x"] > 0 and w["spread_y"] > 0 for w in found["st"]["windows"])

    # the window-gradient probe runs on the demo's checkpoint and scores every stream
    from pipeline.experiments import window_gradient
    probed = window_gradient.probe(run / "checkpoints" / "best.pt", limit=8)
    assert probed["images"] == test_images  # every tiny test image has visible parts
    assert len(probed["gradient_cosine"]) == 2 and all(-1 <= c <= 1 for c in probed["gradient_cosine"])
    assert {(c["stream"], c["step"]) for c in probed["loss_change_towards_bird"]} == {
        (s, step) for s in (0, 1) for step in window_gradient.STEPS}
    on_bird = probed["top1"]["windows_on_bird"] * test_images  # correct images of the test split (rounded to 4 places)
    assert on_bird == pytest.approx(round(on_bird), abs=1e-3)


def test_window_gradient_probe_names_a_missing_checkpoint(tmp_path, capsys):
    from pipeline.experiments.__main__ import main as experiments

    assert experiments(["window-gradient", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.pt" in err
