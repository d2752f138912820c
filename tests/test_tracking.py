"""train.report_to: real short runs reporting to a local MLflow file store and to W&B in offline
mode, read back with MLflow's client and from W&B's own offline transaction log; a resumed run
continues the same tracker run; a missing tracker package and a misspelt tracker fail at once."""
from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.train import main
from pipeline.train.monitor import Monitor
from pipeline.train.signals import Preempted
from shard_fixtures import write_tiny_cub_shards
from test_train_helpers import explain, run_cli, tiny_run

# Two evaluations and two checkpoints in four steps; the resumed attempt trains two more.
SHORT = ["train.max_steps=4", "train.eval_every=2", "train.checkpoint_every=2"]
LONGER = ["train.max_steps=6", "train.eval_every=2", "train.checkpoint_every=2", "train.resume=auto"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_tiny_cub_shards(tmp_path_factory.mktemp("cub"))


def train(shards: Path, run_dir: Path, *overrides: str) -> None:
    result = run_cli(tiny_run(shards, run_dir, *overrides))
    assert result.returncode == 0, explain(result)


def logged(metrics_jsonl: Path, split: str, key: str) -> list:
    """[(step, value)] of one metric as metrics.jsonl holds it."""
    lines = [json.loads(line) for line in metrics_jsonl.read_text().splitlines()]
    return [(line["step"], line[key]) for line in lines if line["split"] == split]


@pytest.fixture(scope="module")
def tracked(shards, tmp_path_factory) -> dict:
    """One run reporting to TensorBoard, MLflow (a file store) and W&B (offline), then its resumed
    attempt; what the first attempt left is copied aside before the second starts."""
    root = tmp_path_factory.mktemp("tracked")
    paths = {"run": root / "run", "store": root / "mlruns", "wandb": root / "wandb",
             "first_store": root / "mlruns_first", "first_metrics": root / "metrics_first.jsonl"}
    common = ["train.report_to=tensorboard,mlflow,wandb", f"train.mlflow_uri={paths['store']}",
              "train.experiment=tiny", "run.name=tiny"]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # no usage telemetry from the tests
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_DIR", str(root))
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT", "WANDB_ENTITY"):
            env.delenv(name, raising=False)
        train(shards, paths["run"], *common, *SHORT)
        shutil.copytree(paths["store"], paths["first_store"])
        shutil.copy(paths["run"] / "metrics.jsonl", paths["first_metrics"])
        paths["first_ids"] = json.loads((paths["run"] / "trackers.json").read_text())
        train(shards, paths["run"], *common, *LONGER)
    return paths


@pytest.fixture
def mlflow_client(monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for this process's client; the run sets it itself
    from mlflow import MlflowClient

    return lambda store: MlflowClient(store.as_uri())


@pytest.mark.slow
def test_mlflow_file_store_gets_params_metrics_pictures_best_and_the_resumed_run(tracked, mlflow_client):
    client, run_dir, first = mlflow_client(tracked["first_store"]), tracked["run"], tracked["first_metrics"]
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert tracked["first_ids"]["mlflow"] == run.info.run_id
    assert (run.info.status, run.info.run_name) == ("FINISHED", "tiny")
    params = run.data.params
    assert (params["optim.lr"], params["train.max_steps"], params["model.backbone"]) == ("0.01", "4", "test_convnext")
    assert params["optim.lr_scale.localisation"] == "0.0001"
    assert params["train.report_to"] == '["tensorboard", "mlflow", "wandb"]'

    def history(key):
        return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]

    assert history("train/loss") == logged(first, "train", "loss") and len(history("train/loss")) == 4
    assert history("train/lr.localisation") == logged(first, "train", "lr/localisation")
    assert [step for step, _ in history("train/images_per_s")] == [1, 2, 3, 4]
    assert history("test/top1") == logged(first, "test", "top1") and [s for s, _ in history("test/top1")] == [2, 4]
    assert history("best/top1") == [(4, max(v for _, v in logged(first, "test", "top1")))]
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))  # TensorBoard beside them

    client = mlflow_client(tracked["store"])  # after the resumed attempt: the same MLflow run, continued
    (again,) = client.search_runs([run.info.experiment_id])
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert again.data.params["train.max_steps"] == "4"  # MLflow params are write-once: the first value stays
    assert history("train/loss") == logged(run_dir / "metrics.jsonl", "train", "loss")
    assert [step for step, _ in history("train/loss")] == [1, 2, 3, 4, 5, 6]
    # (the run's artifacts stay where the store first put them: the copy above points to them too)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "attention")] == \
        [f"attention/step_{step:07d}.png" for step in (2, 4, 6)]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_report_one_mlflow_run_from_rank_0(shards, tmp_path, monkeypatch, mlflow_client):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    store, run_dir = tmp_path / "mlruns", tmp_path / "run"
    result = run_cli(tiny_run(shards, run_dir, "train.max_steps=2", "train.eval_every=2", "train.report_to=mlflow",
                              f"train.mlflow_uri={store}"), nproc=2)
    assert result.returncode == 0, explain(result)
    client = mlflow_client(store)
    (run,) = client.search_runs([client.get_experiment_by_name("stn-pipeline").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"  # the run directory's name
    assert run.data.params["train.global_batch_size"] == "4"
    losses = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert losses == logged(run_dir / "metrics.jsonl", "train", "loss") and len(losses) == 2  # once per step
    assert client.get_metric_history(run.info.run_id, "setup/world_size")[0].value == 2


# --- W&B's offline transaction log (run-<id>.wandb): a LevelDB-style log of protobuf Records.
WANDB_HEADER, BLOCK, CHUNK_HEADER = 7, 32768, 7  # ":W&B" + magic + version; 32 KiB blocks; crc, length, type
FULL, LAST = 1, 4  # chunk types that end a record (FIRST = 2 and MIDDLE = 3 continue one)


def wandb_records(path: Path):
    """The Records of an offline run file, decoded with W&B's own protobuf schema."""
    from wandb.proto import wandb_internal_pb2

    data, pos, parts = path.read_bytes(), WANDB_HEADER, []
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    while pos + CHUNK_HEADER <= len(data):
        if BLOCK - pos % BLOCK < CHUNK_HEADER:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK_HEADER])
        if kind == 0:
            break
        parts.append(data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length])
        pos += CHUNK_HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def read_wandb_run(path: Path) -> dict:
    """{"run": RunRecord, "config": {key: value}, "history": {step: {key: value}}, "summary": {...}, "exit": code}."""
    out = {"config": {}, "history": {}, "summary": {}, "exit": None}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run"] = record.run
            out["config"].update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            out["config"].update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            out["history"].setdefault(row["_step"], {}).update(row)
        elif kind == "summary":
            out["summary"].update({item.key: json.loads(item.value_json) for item in record.summary.update if item.key})
        elif kind == "exit":
            out["exit"] = record.exit.exit_code
    return out


@pytest.mark.slow
def test_wandb_offline_run_holds_config_metrics_best_and_the_resumed_run_continues_it(tracked):
    run_id, first = tracked["first_ids"]["wandb"], tracked["first_metrics"]
    files = sorted(tracked["wandb"].glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2  # both attempts under one run id: `wandb sync` makes them one run
    run = read_wandb_run(files[0])
    assert (run["run"].run_id, run["run"].project, run["run"].display_name) == (run_id, "tiny", "tiny")
    assert run["config"]["optim"]["lr"] == 0.01 and run["config"]["train"]["max_steps"] == 4
    history = run["history"]
    assert [(step, history[step]["train/loss"]) for step in (1, 2, 3, 4)] == logged(first, "train", "loss")
    assert [(step, history[step]["train/lr"]) for step in (1, 2, 3, 4)] == logged(first, "train", "lr")
    assert all(history[step]["train/images_per_s"] > 0 for step in (1, 2, 3, 4))
    assert [(step, history[step]["test/top1"]) for step in (2, 4)] == logged(first, "test", "top1")
    assert run["summary"]["best/top1"] == max(v for _, v in logged(first, "test", "top1"))
    assert run["exit"] == 0

    assert json.loads((tracked["run"] / "trackers.json").read_text())["wandb"] == run_id
    later = read_wandb_run(files[1])
    assert later["run"].run_id == run_id and later["exit"] == 0
    assert later["config"]["train"]["max_steps"] == 6
    assert [(step, later["history"][step]["train/loss"]) for step in (5, 6)] == \
        logged(tracked["run"] / "metrics.jsonl", "train", "loss")[4:]


def test_a_missing_tracker_package_is_one_line_naming_the_key_and_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed: find_spec and import both fail
    code = main(tiny_run(tmp_path / "shards", tmp_path / "run", "train.report_to=tensorboard,mlflow"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "train.report_to" in err and "mlflow" in err and "pip install -e '.[track]'" in err
    assert "mlflow-skinny" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_wandb_online_without_an_api_key_is_one_line_saying_how_to_log_in_or_go_offline(tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no W&B settings: never logged in
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    cfg = load_config(None, ["train.report_to=wandb", f"run.dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"train.report_to includes wandb, but W&B refused to start: .*API key.*"
                                          r"WANDB_MODE=offline and wandb sync later"):
        Monitor(tmp_path / "run", True, 10, 0, cfg)


def test_report_to_parses_lists_and_comma_strings_and_names_the_choices_on_a_typo(tmp_path, capsys):
    assert load_config(None, []).train.report_to == ["tensorboard"]
    assert load_config(None, ["train.report_to=tensorboard, mlflow"]).train.report_to == ["tensorboard", "mlflow"]
    assert load_config(None, ["train.report_to=[wandb]"]).train.report_to == ["wandb"]
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  report_to: mlflow,wandb\n")
    assert load_config(config).train.report_to == ["mlflow", "wandb"]
    with pytest.raises(ConfigError, match="'none' cannot be combined"):
        load_config(None, ["train.report_to=none,wandb"])
    assert main(["train.report_to=tensorboard,mlfow", f"run.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: train.report_to: 'mlfow' is not one of tensorboard, mlflow, wandb, none "
                   "(a list, or comma-separated: train.report_to=tensorboard,mlflow)")


def test_report_to_none_keeps_metrics_jsonl_only(tmp_path):
    """No tracker at all: no tb/ folder, no trackers.json (and the Monitor never imports tensorboard)."""
    cfg = load_config(None, ["train.report_to=none", f"run.dir={tmp_path}"])
    monitor = Monitor(tmp_path, True, 10, 0, cfg)
    monitor.record(1, "train", {"loss": 0.5, "lr": 0.1})
    monitor.close(best={"top1": None})
    assert monitor.trackers == [] and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 0.5


@pytest.mark.parametrize("error, status", [(None, "FINISHED"), (RuntimeError("NaN"), "FAILED"),
                                           (Preempted(3, "SIGTERM", None), "KILLED")])
def test_how_a_run_ends_is_its_status_in_mlflow_and_its_exit_code_in_wandb(tmp_path, monkeypatch, error, status):
    """Monitor.close() runs in fit()'s `finally`: the exception on its way out decides the status."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run_dir = tmp_path / "run"
    cfg = load_config(None, ["train.report_to=mlflow,wandb", f"train.mlflow_uri={tmp_path / 'mlruns'}",
                             f"run.dir={run_dir}"])
    monitor = Monitor(run_dir, True, 10, 0, cfg)
    monitor.record(3, "train", {"loss": 0.5, "lr": 0.1, "lr/head": 0.1})
    try:
        try:
            if error is not None:
                raise error
        finally:
            monitor.close(best={"top1": 0.25})
    except type(error or RuntimeError):
        pass
    from mlflow import MlflowClient
    ids = json.loads((run_dir / "trackers.json").read_text())
    run = MlflowClient((tmp_path / "mlruns").as_uri()).get_run(ids["mlflow"])
    assert run.info.status == status and run.data.metrics == {"train/loss": 0.5, "train/lr": 0.1,
                                                               "train/lr.head": 0.1, "best/top1": 0.25}
    (log,) = tmp_path.glob(f"wandb/offline-run-*-{ids['wandb']}/run-{ids['wandb']}.wandb")
    wandb_run = read_wandb_run(log)
    assert wandb_run["exit"] == (0 if status == "FINISHED" else 1) and wandb_run["summary"]["best/top1"] == 0.25
    assert wandb_run["history"][3]["train/lr/head"] == 0.1
