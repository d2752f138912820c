"""python -m pipeline.evaluate on a real tiny checkpoint (the readable summary, --json), the checkpoint
format read in one place (old files load, others fail naming the format), and the trainer's
components setting every attribute when they are built."""
from __future__ import annotations

import ast
import json

import pytest
import torch

from conftest import REPO
from shard_fixtures import train_tiny_two_stream_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(last.pt of a 2-step N x ST-CNN run with 2 streams on tiny CUB shards with parts, its data root)."""
    root = tmp_path_factory.mktemp("evaluate")
    data = train_tiny_two_stream_run(root, "train.num_viz=0")
    return root / "run" / "checkpoints" / "last.pt", data


def evaluate_cli(capsys, *argv: str) -> str:
    from pipeline.evaluate import main

    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_json_output_parses_and_keeps_the_keys_scripts_read(trained, capsys):
    checkpoint, _ = trained
    result = json.loads(evaluate_cli(capsys, "--checkpoint", str(checkpoint), "--split", "test", "--json"))
    assert {"checkpoint", "step", "split", "num_samples", "num_skipped", "top1", "loss", "windows",
            "part_hit_rate", "seconds"} <= set(result)
    assert (result["checkpoint"], result["step"], result["split"]) == (str(checkpoint), 2, "test")
    assert result["num_samples"] == 6 and len(result["windows"]["streams"]) == 2 and len(result["part_hit_rate"]) == 2
    # the metrics the trainer logged at its last evaluation are the ones the CLI scores
    stored = torch.load(checkpoint, weights_only=True)["metrics"]
    assert result["top1"] == pytest.approx(stored["top1"]) and result["loss"] == pytest.approx(stored["loss"])


def test_default_output_is_a_readable_summary_of_the_same_result(trained, capsys):
    checkpoint, _ = trained
    result = json.loads(evaluate_cli(capsys, "--checkpoint", str(checkpoint), "--json"))
    lines = evaluate_cli(capsys, "--checkpoint", str(checkpoint)).splitlines()
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[0])
    assert lines[0] == f"checkpoint  {checkpoint} (step 2)"
    assert lines[1] == "split       test: 6 samples"
    assert f"top1        {result['top1']:.4f}" in lines and f"loss        {result['loss']:.4f}" in lines
    assert not any(line.startswith("seconds") for line in lines)  # timing belongs to --json
    start = next(i for i, line in enumerate(lines) if line.startswith("windows"))
    assert lines[start].split() == ["windows", "stream", "centre", "x,", "y", "spread", "x,", "y", "scale", "w,",
                                    "h", "outside"]
    for n, stream in enumerate(result["windows"]["streams"]):
        cells = lines[start + 1 + n].split()
        assert cells[0] == str(n)
        assert cells[1:3] == [f"{stream['center_x']:+.2f},", f"{stream['center_y']:+.2f}"]
        assert cells[3:5] == [f"{stream['spread_x']:.2f},", f"{stream['spread_y']:.2f}"]
        assert cells[5:7] == [f"{stream['width'] / 2:.2f},", f"{stream['height'] / 2:.2f}"]
    parts = next(i for i, line in enumerate(lines) if line.startswith("part hits"))
    seen = set(result["part_hit_rate"][0]) | set(result["part_hit_rate"][1])
    assert len(lines) == parts + 1 + len(seen)  # one line per part seen, after the header
    for line in lines[parts + 1:]:
        name, *cells = line.strip().rsplit(maxsplit=2)
        assert cells == [f"{hits[name]:.2f}" if name in hits else "-" for hits in result["part_hit_rate"]]
    # columns line up: each row's cells start where the header's columns start
    header = lines[start]
    for row in lines[start + 1:start + 3]:
        assert row[header.index("stream")] in "01" and row[header.index("spread"):][:4].strip()[0].isdigit()


def test_summary_of_a_model_without_windows_is_the_metrics_alone():
    from pipeline.evaluate import summary_lines

    lines = summary_lines({"checkpoint": "c.pt", "step": 7, "split": "test", "num_samples": 10, "num_skipped": 1,
                           "sequence_accuracy": 0.5, "digit_accuracy": 0.75, "loss": 1.25, "seconds": 3.0})
    # the label column widens to the longest metric name
    assert lines == ["checkpoint         c.pt (step 7)", "split              test: 10 samples, 1 skipped as corrupt",
                     "sequence_accuracy  0.5000", "digit_accuracy     0.7500", "loss               1.2500"]


# ----- the checkpoint format, read in one place ----------------------------------------------------

def test_a_written_checkpoint_holds_exactly_the_format_entries(trained):
    from dataclasses import fields
    from pipeline.train import checkpoint as ckpt

    checkpoint, _ = trained
    state = torch.load(checkpoint, weights_only=True)
    assert state["format"] == ckpt.FORMAT == 1
    assert set(state) == {f.name for f in fields(ckpt.Checkpoint)} - {"path"} | {"format"}
    read = ckpt.read(checkpoint)
    assert (read.step, read.metric_name, len(read.rng)) == (2, "top1", 1)
    assert read.images_seen == 2 * read.config["train"]["global_batch_size"]
    assert read.classes == state["classes"] and read.path == checkpoint


def test_a_checkpoint_from_before_the_format_entry_still_loads(trained, tmp_path, capsys):
    from pipeline.evaluate import load_model

    checkpoint, _ = trained
    old = {k: v for k, v in torch.load(checkpoint, weights_only=True).items() if k not in ("format", "classes")}
    torch.save(old, tmp_path / "old.pt")  # the entries of a run from before either existed
    model, cfg, read = load_model(tmp_path / "old.pt")
    assert read.step == 2 and read.classes is None and cfg.model.num_streams == 2
    new = json.loads(evaluate_cli(capsys, "--checkpoint", str(checkpoint), "--json"))
    same = json.loads(evaluate_cli(capsys, "--checkpoint", str(tmp_path / "old.pt"), "--json"))
    assert same["top1"] == new["top1"] and same["loss"] == pytest.approx(new["loss"])


@pytest.mark.parametrize("change, message", [
    ({"format": 2}, "checkpoint format 2; this version of pipeline reads format 1"),
    ({"step": None}, "not a pipeline checkpoint (format 1 needs model, step, config; no 'step' entry)"),
])
def test_other_formats_fail_with_one_line_naming_the_format(trained, tmp_path, capsys, change, message):
    from pipeline.evaluate import main

    checkpoint, _ = trained
    state = torch.load(checkpoint, weights_only=True)
    state.update({k: v for k, v in change.items() if v is not None})
    for key in [k for k, v in change.items() if v is None]:
        del state[key]
    torch.save(state, tmp_path / "other.pt")
    assert main(["--checkpoint", str(tmp_path / "other.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'other.pt'}: {message}"]


def test_resuming_from_a_checkpoint_without_training_state_names_the_format(trained, tmp_path, capsys):
    from pipeline.train import main

    checkpoint, data = trained
    state = torch.load(checkpoint, weights_only=True)
    del state["optimizer"]  # a weights-only export: fine to evaluate, not to resume
    torch.save(state, tmp_path / "weights.pt")
    argv = [f"{k}={v}" for k, v in _flat(state["config"]).items() if k.startswith(("model.", "data."))]
    assert main([*argv, f"run.dir={tmp_path / 'run'}", f"train.resume={tmp_path / 'weights.pt'}",
                 "train.max_steps=3", "train.device=cpu", "train.num_workers=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"error: {tmp_path / 'weights.pt'}: a format 1 checkpoint without 'optimizer': it cannot resume "
                   "training (evaluate or predict with it)")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        elif not isinstance(value, dict):
            out[f"{prefix}{key}"] = "null" if value is None else json.dumps(value) if isinstance(value, list) else value
    return out


# ----- components own their state -------------------------------------------------------------------

COMPONENTS = {"pipeline/train/trainer.py": ("Trainer", "Learner"),
              "pipeline/train/evaluator.py": ("Evaluator",),
              "pipeline/train/checkpoint.py": ("Checkpointer", "Progress", "CheckpointDir")}


def attributes_set_outside_init(source: str, class_name: str) -> dict:
    """{attribute: [methods]} for each self.<attribute> a method assigns that __init__ does not."""
    cls = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == class_name)
    assigned: dict = {}
    for method in (n for n in cls.body if isinstance(n, ast.FunctionDef)):
        for node in ast.walk(method):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for target in targets:
                for e in ast.walk(target):
                    if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name) and e.value.id == "self":
                        assigned.setdefault(e.attr, set()).add(method.name)
    return {attr: sorted(where) for attr, where in assigned.items() if "__init__" not in where}


def test_attributes_set_outside_init_are_found():
    source = "class T:\n    def __init__(self):\n        self.a = 1\n    def later(self):\n" \
             "        self.a += 1\n        self.b, self.c = 2, 3\n"
    assert attributes_set_outside_init(source, "T") == {"b": ["later"], "c": ["later"]}


@pytest.mark.parametrize("path, class_name", [(p, c) for p, names in COMPONENTS.items() for c in names])
def test_trainer_components_set_every_attribute_in_init(path, class_name):
    assert attributes_set_outside_init((REPO / path).read_text(), class_name) == {}


def test_the_attention_picture_of_an_evaluation_reaches_tensorboard_once(tmp_path):
    from pipeline.config import load_config
    from pipeline.train.distributed import DistEnv
    from pipeline.train.evaluator import Evaluator

    class Monitor:
        def __init__(self):
            self.images, self.records = [], []

        def add_image(self, tag, path, step):
            self.images.append((tag, path, step))

        def record(self, step, split, values):
            self.records.append((step, split))

        def message(self, text):
            pass

    evaluator = Evaluator(load_config(None, []), DistEnv(0, 1, 0, torch.device("cpu"), owns_group=False), None,
                          "classification")
    monitor = Monitor()

    def drawing():  # what Evaluator.evaluate does on rank 0 of an attention model (the trainer's hook calls it)
        evaluator.picture = tmp_path / "step_0000002.png"
        return {"top1": 0.5}

    assert evaluator.run(None, 2, monitor, drawing) == ({"top1": 0.5}, True)
    assert evaluator.run(None, 4, monitor, lambda: {"top1": 0.25}) == ({"top1": 0.25}, False)
    assert monitor.images == [("attention", tmp_path / "step_0000002.png", 2)]
    assert monitor.records == [(2, "test"), (4, "test")] and evaluator.best == 0.5


def test_the_colocalisation_model_reads_its_feature_cnn_through_the_same_reader(tmp_path):
    from pipeline.config import load_config, to_dict
    from pipeline.models import build_model
    from pipeline.models.coloc import load_feature_cnn

    cfg = load_config(None, ["model.name=digits_cnn", "model.input_size=28", "model.num_classes=10"])
    cnn = build_model(cfg.model)
    torch.save({"model": cnn.state_dict(), "step": 3, "config": to_dict(cfg)}, tmp_path / "cnn.pt")  # format 1, no entry
    loaded = load_feature_cnn(str(tmp_path / "cnn.pt"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), cnn.state_dict().values()))
    torch.save({"model": cnn.state_dict(), "step": 3, "config": to_dict(cfg), "format": 2}, tmp_path / "new.pt")
    with pytest.raises(ValueError, match="new.pt: checkpoint format 2; this version of pipeline reads format 1"):
        load_feature_cnn(str(tmp_path / "new.pt"))
