import pytest

from pipeline.config import ConfigError, load_config, per_rank_batch, save_config


def test_overrides_apply_with_types(tmp_path):
    cfg = load_config(None, ["optim.lr=0.01", "model.num_streams=4", "optim.lr_scale.localisation=1e-4"])
    assert cfg.optim.lr == 0.01 and cfg.model.num_streams == 4
    assert cfg.optim.lr_scale == {"localisation": 1e-4}


def test_unknown_key_names_section_and_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown key 'model.num_stream'.*num_streams"):
        load_config(None, ["model.num_stream=3"])


def test_unknown_key_in_file_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'optim.lrr'"):
        load_config(path)


@pytest.mark.parametrize("override, key", [
    ("data.distortion=XY", "data.distortion"),
    ("data.channels=0", "data.channels"),
    ("model.transform=spiral", "model.transform"),
    ("train.global_batch_size=0", "train.global_batch_size"),
    ("model.num_streams=abc", "model.num_streams"),
])
def test_impossible_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_compile_mode_is_checked_and_needs_compile():
    assert load_config(None, []).train.compile_mode is None  # torch.compile's own default
    cfg = load_config(None, ["train.compile=true", "train.compile_mode=max-autotune-no-cudagraphs"])
    assert cfg.train.compile_mode == "max-autotune-no-cudagraphs"
    with pytest.raises(ConfigError, match=r"train\.compile_mode='fastest' is not one of null, default"):
        load_config(None, ["train.compile=true", "train.compile_mode=fastest"])
    with pytest.raises(ConfigError, match=r"train\.compile_mode='default' needs train\.compile=true"):
        load_config(None, ["train.compile_mode=default"])


def test_batch_split_over_ranks():
    cfg = load_config(None, ["train.global_batch_size=256", "train.micro_batch_size=32"])
    assert per_rank_batch(cfg, 4) == (32, 2)
    with pytest.raises(ConfigError, match="not divisible by the world size 3"):
        per_rank_batch(cfg, 3)


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(None, ["optim.lr=0.05", "data.root=/x"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
