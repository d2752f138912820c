"""model.pretrained=true on a node without network: the weights come from the local hub cache, or the
pre-flight and the trainer stop in one line naming model.pretrained and the fix (no network here:
the cache is written by the test, in huggingface_hub's layout)."""
from __future__ import annotations

import json
import subprocess

import pytest

from conftest import PYTHON, REPO, subprocess_env

NAME = "test_resnet.r160_in1k"

PROBE = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from pipeline.models.localisation import create_timm
from pipeline.models.weights import check_pretrained
from jobs.preflight import PreflightError, check_weights
from pipeline.config import load_config
out = {}
try:
    out["source"] = check_pretrained("%(name)s", True)
    model = create_timm("%(name)s", True)
    out["stem"] = float(model.state_dict()["conv1.0.weight"].sum())
except ValueError as err:
    out["error"] = str(err)
cfg = load_config(None, ["model.backbone=%(name)s", "model.pretrained=true"])
try:
    check_weights(cfg)
    out["preflight"] = "ok"
except PreflightError as err:
    out["preflight"] = str(err)
print(json.dumps(out))
""" % {"name": NAME}


def probe(hf_home, **env) -> dict:
    run = subprocess.run([PYTHON, "-c", PROBE, str(REPO)], cwd=REPO, capture_output=True, text=True, timeout=240,
                         env=subprocess_env(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", **env))
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_pretrained_true_offline_loads_the_cached_copy_or_fails_in_one_line(tmp_path):
    import timm
    import torch
    from safetensors.torch import save_file

    # the cache as huggingface_hub writes it: blobs behind snapshots/<revision>, refs/main naming it
    repo = tmp_path / "cached" / "hub" / f"models--timm--{NAME}"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    torch.manual_seed(3)
    state = timm.create_model(NAME, pretrained=False).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(repo / "snapshots" / "abc123" / "model.safetensors"))

    cached = probe(tmp_path / "cached")
    assert cached["source"] == "cache" and cached["preflight"] == "ok"
    assert cached["stem"] == pytest.approx(float(state["conv1.0.weight"].sum()))  # these weights, not others

    empty = probe(tmp_path / "empty")
    for message in (empty["error"], empty["preflight"]):
        assert message.startswith("model.pretrained=true: the weights of 'test_resnet.r160_in1k' are not in the local")
        assert "python -m pipeline.models.weights test_resnet.r160_in1k --out" in message and "\n" not in message


def test_fetch_command_offline_is_a_one_line_error(tmp_path):
    run = subprocess.run([PYTHON, "-m", "pipeline.models.weights", NAME, "--out", str(tmp_path / "w.pth")], cwd=REPO,
                         capture_output=True, text=True, timeout=120,
                         env=subprocess_env(HF_HOME=str(tmp_path / "empty"), HF_HUB_OFFLINE="1"))
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "HF_HUB_OFFLINE is set" in run.stderr
    assert not (tmp_path / "w.pth").exists()
