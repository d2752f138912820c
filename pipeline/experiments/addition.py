"""Paper Table 4 (appendix A.1): MNIST addition with two spatial transformers in parallel.

    python -m pipeline.experiments addition --idx-root tests/data/mnist --train-count 8000 --profile standard

Two MNIST digits, each RTS-distorted on its own (as in A.3) into its own channel of a 42x42 image;
the class is their sum (19 classes). Four models of about the same size (the profile's
target_params): FCN, CNN, ST-FCN (one affine transformer warping both channels) and 2xST-FCN (two
transformers, each with its own localisation net, each warping both channels; their 2-channel
outputs concatenated into 4 channels for the FCN). The paper's point: the two transformers
co-adapt, each one stabilising one digit, i.e. one channel.

Every run is an ordinary training run of the project's Trainer on the shards of `data_prep digits
--addition --fresh-train` (the test pairs fixed, the training digits paired and distorted afresh in
every batch), in OUT/runs/<model>-seed<S>-<id>/; a rerun skips the runs OUT/results.jsonl holds with
the same settings and resumes an interrupted one. OUT/table.md gets the test error in % (mean ± std
over seeds) beside the paper's, and per transformer the share of its output's energy that comes
from each input channel; OUT/addition_mnist.json the same for programs
({"seeds", "errors": {model: {"mean", "std"}}, "channel_share": [[a, b], [c, d]]}); and
OUT/addition.png the two transformers' outputs on test pairs (Table 4, right).
"""
from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .distorted import (CONFIGS, _cell, _choices, append_result, as_input, given_options, load_results, load_run,
                        make_preset)

# Table 4's rows: key -> (label, config under configs/digits, model.extra overrides)
# Every classifier sees the image average-pooled 2x (21x21 a channel): the transformers' outputs as in A.3
# on RTS, the FCN's and CNN's input likewise (`pool_input`), so a transformer's gain is where it looks.
ST = {"pool_after_st": True}
ROWS: Dict[str, Tuple[str, str, Dict[str, object]]] = {
    "fcn": ("FCN", "fcn", {"pool_input": True}),
    "cnn": ("CNN", "cnn", {"pool_input": True}),
    "st-fcn": ("ST-FCN", "st_fcn", ST | {"num_transformers": 1}),
    "2xst-fcn": ("2xST-FCN", "addition_2xst_fcn", ST | {"num_transformers": 2}),
}
PAPER_ERROR = {"fcn": 47.7, "cnn": 14.7, "st-fcn": 18.5, "2xst-fcn": 5.8}  # Table 4, test error %
SIZE = 42            # the RTS canvas, one per digit
STATS_IMAGES = 1000  # test pairs for the channel shares


@dataclass
class AdditionProfile:
    """Everything the table depends on; `PROFILES` holds the presets, options override them."""
    idx_root: str
    out: str = "runs/addition"
    name: str = "standard"
    models: Tuple[str, ...] = tuple(ROWS)
    seeds: int = 3
    first_seed: int = 0            # train seeds first_seed..seeds-1 (two runners sharing OUT split the seeds)
    steps: int = 6000
    batch_size: int = 128
    lr: float = 0.001
    milestones: Tuple[float, ...] = (0.85, 0.95)  # fractions of the run where lr is divided by 10: late,
    #   as the models are still learning fast (an early drop at 2/3 stalled the 2xST-FCN, measured)
    target_params: int = 400_000   # paper A.3's size; the 2xST-FCN's two localisation nets (FC 32-32-32 on
    #   2 x 42 x 42) take 226k of it (200k with them on the input pooled 2x reached
    #   21 % accuracy in 6,000 steps where these reach 57-64 %, measured)
    train_count: Optional[int] = 8000
    train_limit: Optional[int] = None
    test_limit: Optional[int] = None
    data_seed: int = 0
    threads: Optional[int] = None
    num_examples: int = 8
    frontier_images: int = 250     # test pairs the best-window search runs on (analysis only, ~0.45 s a pair)
    extra: Dict[str, object] = field(default_factory=dict)  # recorded in the results, e.g. the command

    def run_settings(self) -> Dict[str, object]:
        """The settings that make two runs of one (model, seed) the same run."""
        keys = ("steps", "batch_size", "lr", "milestones", "target_params", "train_count", "train_limit",
                "test_limit", "data_seed")
        settings = {k: getattr(self, k) for k in keys} | {"idx_root": str(Path(self.idx_root).resolve())}
        return json.loads(json.dumps(settings))

    def overrides(self) -> List[str]:
        milestones = sorted({max(1, round(self.steps * m)) for m in self.milestones})  # a tiny run: distinct
        return ["optim.name=adamw", f"optim.lr={self.lr}", "optim.weight_decay=0.0",
                f"schedule.milestones={milestones}", f"train.global_batch_size={self.batch_size}",
                f"train.max_steps={self.steps}", f"train.eval_every={self.steps}",
                f"train.checkpoint_every={max(1, self.steps // 4)}", f"train.log_every={max(1, self.steps // 10)}",
                "train.keep_checkpoints=1", "train.device=cpu", f"model.extra.target_params={self.target_params}"]


PROFILES = {
    "quick": dict(name="quick", steps=40, batch_size=64, seeds=1, train_limit=512, test_limit=256, frontier_images=8),
    "standard": dict(name="standard"),
}


def make_profile(preset: str, idx_root: str, **overrides) -> AdditionProfile:
    return make_preset(AdditionProfile, PROFILES, preset, idx_root, **overrides)


def profile_from_args(args) -> AdditionProfile:
    overrides = given_options(args, ("seeds", "first_seed", "steps", "batch_size", "train_count", "train_limit",
                                     "test_limit", "lr", "threads", "num_examples", "out"))
    overrides["models"] = _choices(args.models, tuple(ROWS), "--models")
    overrides.setdefault("out", f"runs/addition_{args.profile}")
    return make_profile(args.profile, args.idx_root, **overrides)


# ---- data and runs -----------------------------------------------------------------------------

def prepare_data(profile: AdditionProfile) -> Path:
    """The shards of `data_prep digits --addition --fresh-train` (kept when OUT already holds them)."""
    from data_prep.digits import DigitsOptions, prepare
    from data_prep.jobs import JobOptions

    limits = f"train{profile.train_limit or 'all'}-test{profile.test_limit or 'all'}"
    out = Path(profile.out) / "data" / f"addition-count{profile.train_count}-{limits}-seed{profile.data_seed}"
    opts = DigitsOptions(idx_root=profile.idx_root, out=str(out), distortion="RTS", seed=profile.data_seed,
                         limit=profile.train_limit, test_limit=profile.test_limit, train_count=profile.train_count,
                         fresh_train=True, addition=True, shard_size=2000)
    prepare(opts, JobOptions(overwrite=True))
    return out


def run_config(profile: AdditionProfile, key: str, seed: int, data_root: Path):
    """configs/digits/<row's config>.yaml, made a 2-channel, 19-class model, + the profile + the run."""
    from pipeline.config import load_config

    _, config_name, extra = ROWS[key]
    settings_id = hashlib.sha256(json.dumps(profile.run_settings(), sort_keys=True).encode()).hexdigest()[:8]
    run_dir = Path(profile.out) / "runs" / f"{key}-seed{seed}-{settings_id}"
    overrides = profile.overrides() + [
        f"data.root={data_root}", "data.distortion=RTS", "data.channels=2", "data.mean=[0.0,0.0]",
        "data.std=[1.0,1.0]", f"model.input_size={SIZE}", "model.num_classes=19", "model.extra.in_channels=2",
        *(f"model.extra.{k}={str(v).lower()}" for k, v in extra.items()),
        f"train.seed={seed}", f"run.dir={run_dir}", "train.resume=auto"]
    if "num_transformers" in extra:
        overrides.append("model.transform=affine")
    return load_config(CONFIGS / f"{config_name}.yaml", overrides)


def train_one(profile: AdditionProfile, key: str, seed: int, data_root: Path) -> Dict:
    from pipeline.train import NonFiniteLoss, run

    cfg = run_config(profile, key, seed, data_root)
    cores = profile.threads or torch.get_num_threads()
    torch.set_num_threads(cores if key == "cnn" else 1)  # the FCNs' ops are too small to split (distorted.py)
    start = time.time()
    record = {"model": key, "seed": seed, "run_dir": cfg.run.dir}
    try:
        summary = run(cfg)
    except NonFiniteLoss as err:
        print(f"warning: {key}, seed {seed}: {err}", flush=True)
        return record | {"test_error": None, "diverged": str(err), "wall_s": time.time() - start}
    model, _, _ = load_run(cfg.run.dir)
    return record | {"test_error": round(100.0 * (1.0 - summary["metrics"]["top1"]), 4),
                     "num_test": summary["metrics"]["num_samples"],
                     "num_params": sum(p.numel() for p in model.parameters()), "wall_s": time.time() - start}


# ---- what the transformers learnt ----------------------------------------------------------------

def test_pairs(data_root: Path, limit: int) -> Tuple[torch.Tensor, torch.Tensor, List[Dict]]:
    """The first `limit` test pairs as stored: (uint8 (N, 2, 42, 42), sums (N,), each pair's JSON record
    with the two digits' distortion parameters, for scoring only)."""
    import io

    import numpy as np
    import webdataset as wds

    from pipeline.data import read_manifest

    images, labels, records = [], [], []
    samples = wds.DataPipeline(wds.SimpleShardList(read_manifest(data_root).shard_paths("test")),
                               wds.tarfile_to_samples())
    for sample in samples:
        images.append(torch.from_numpy(np.load(io.BytesIO(sample["npy"]))).permute(2, 0, 1))
        labels.append(int(sample["cls"]))
        records.append(json.loads(sample["json"]))
        if len(images) == limit:
            break
    return torch.stack(images), torch.tensor(labels), records


@torch.no_grad()
def channel_share(model, images: torch.Tensor) -> List[List[float]]:
    """Per transformer, the share of its output's energy (sum of squared pixels) in each output channel,
    i.e. coming from each input channel (a transformer warps every channel alike), averaged over images."""
    crops = model.attend(as_input(images))["crops"].float()       # (B, N, C, S, S)
    return _shares(crops.pow(2).flatten(3).sum(-1))


def _shares(energy: torch.Tensor) -> List[List[float]]:
    """(B, N, C) energies -> per row n the mean over B of each channel's share."""
    share = energy / energy.sum(-1, keepdim=True).clamp_min(1e-12)
    return [[round(float(v), 4) for v in row] for row in share.mean(0)]


def window_share_bound(images: torch.Tensor) -> List[float]:
    """What a window can reach at best: per channel c, the share of channel c in the energy inside the
    tight box around channel c's digit, averaged over pairs. RTS places both 28 px digits near the 42 px
    canvas's centre, so a window holding one digit whole holds much of the other: this bounds the
    energy share of any transformer that keeps its digit in view."""
    x = images.float().div(255.0)
    bound = []
    for c in range(x.shape[1]):
        shares = []
        for pair in x:
            ys, xs = (pair[c] > 0.1).nonzero(as_tuple=True)
            if len(ys):
                inside = pair[:, ys.min():ys.max() + 1, xs.min():xs.max() + 1].pow(2).flatten(1).sum(-1)
                shares.append(float(inside[c] / inside.sum()))
        bound.append(round(statistics.fmean(shares), 4))
    return bound


FRONTIER_KEEPS = (0.5, 0.7, 0.8, 0.9, 1.0)   # shares of its own digit's energy a window must keep
FRONTIER_ANGLES = tuple(range(-45, 46, 15))  # window rotations tried (degrees)


@torch.no_grad()
def window_share_frontier(images: torch.Tensor, keeps: Sequence[float] = FRONTIER_KEEPS,
                          angles: Sequence[float] = FRONTIER_ANGLES, min_side: int = 4) -> Dict[str, List[float]]:
    """The most any window could reach, as a trade-off: per kept share k and channel c, the mean over pairs
    of the best energy share of channel c in a window that still holds at least k of channel c's own
    energy. Searched exhaustively per pair over every rectangle (sides min_side..canvas, every
    position) at every rotation in `angles`: the windows an affine transformer can take, but shear.
    A transformer that takes > 80 % of its output from one channel must drop whatever share of its
    digit this says."""
    energy = images.float().div(255.0).pow(2)
    n, channels, size, _ = energy.shape
    pad = math.ceil(size * (math.sqrt(2) - 1) / 2)  # room for the canvas's corners at 45 degrees
    energy = F.pad(energy, (pad,) * 4)
    keep = torch.tensor(list(keeps))[:, None, None, None]                     # (K, 1, 1, 1)
    best = torch.zeros(len(keeps), n, channels)
    for degrees in angles:
        cos, sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
        theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]]).expand(n, 2, 3)
        rotated = F.grid_sample(energy, F.affine_grid(theta, list(energy.shape), align_corners=False),
                                align_corners=False)
        table = F.pad(rotated.cumsum(-1).cumsum(-2), (1, 0, 1, 0))             # summed-area table
        total = table[..., -1, -1].clamp_min(1e-12)[..., None]                 # (n, C, 1)
        for h in range(min_side, size + 1):
            for w in range(min_side, size + 1):
                inside = (table[..., h:, w:] - table[..., :-h, w:] - table[..., h:, :-w]
                          + table[..., :-h, :-w]).flatten(2)                   # (n, C, windows)
                share = inside / inside.sum(1, keepdim=True).clamp_min(1e-12)
                holds = inside / total >= keep - 1e-6                          # (K, n, C, windows)
                best = torch.maximum(best, torch.where(holds, share, 0.0).amax(-1))
    return {f"{k:g}": [round(float(v), 4) for v in best[i].mean(0)] for i, k in enumerate(keeps)}


@torch.no_grad()
def pose_spread(model, images: torch.Tensor, records: Sequence[Dict]) -> List[List[float]]:
    """The paper's "each transformer stabilises one digit", measured: per transformer k and channel c, how
    much the pose of channel c's digit still varies in transformer k's output, relative to the input
    (1: as much as in the input, as with the identity; 0: every digit in one pose). A digit's pose in
    the output is the affine map from output coordinates to the digit's own: the transformer's warp,
    then the inverse of the digit's recorded RTS distortion; its spread is the mean distance of the
    2x3 maps from their mean over the pairs."""
    from data_prep.distortions import rotation_scale_theta

    theta = model.attend(as_input(images))["theta"].double()          # (B, N, 2, 3): output -> canvas
    spreads = []
    for k in range(theta.shape[1]):
        row = []
        for c in range(images.shape[1]):
            p = {key: torch.tensor([r["params"][c][key] for r in records], dtype=torch.float64)
                 for key in ("rotation_deg", "scale", "center_offset_px")}
            to_digit = rotation_scale_theta(p["rotation_deg"], p["scale"], p["center_offset_px"], SIZE)  # canvas -> digit
            pose = torch.cat([to_digit[..., :2] @ theta[:, k, :, :2],
                              to_digit[..., :2] @ theta[:, k, :, 2:] + to_digit[..., 2:]], -1)
            row.append(round(_spread(pose) / _spread(to_digit), 4))
        spreads.append(row)
    return spreads


def _spread(maps: torch.Tensor) -> float:
    return float((maps - maps.mean(0)).flatten(1).norm(dim=1).mean())


def pairs_picture(model, images: torch.Tensor, labels: torch.Tensor, path: Path) -> Path:
    """Table 4 (right): each test pair (first digit red, second green) with both transformers' windows,
    then each transformer's 2-channel output, and the true and predicted sum."""
    from pipeline.train.viz import attention_picture

    with torch.no_grad():
        x = as_input(images)
        out = model.attend(x)
        predicted = model(x).argmax(-1)
    captions = [f"sum {int(t)}\npred {int(p)}" for t, p in zip(labels, predicted)]
    legend = [f"transformer {k + 1}" for k in range(out["boxes"].shape[1])]
    return attention_picture(images, out["boxes"], out["crops"], [0.0, 0.0], [1.0, 1.0], path, captions, legend)


# ---- the experiment ----------------------------------------------------------------------------

def run(profile: AdditionProfile, train_missing: bool = True) -> Dict:
    """Train every (model, seed) not done yet; write the table, the JSON and the picture."""
    started = time.time()
    out = Path(profile.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    settings = profile.run_settings()
    root = prepare_data(profile)
    for seed in range(profile.first_seed, profile.seeds):  # seed by seed: a run cut short has every model once
        for key in profile.models:
            done = {(r["model"], r["seed"]) for r in load_results(results_path) if r.get("settings") == settings}
            if not train_missing or (key, seed) in done:
                continue
            record = train_one(profile, key, seed, root) | {"settings": settings}
            append_result(results_path, record)
            error = "diverged" if record["test_error"] is None else f"{record['test_error']:.2f}%"
            print(f"{key:<9} seed {seed}: test error {error} ({record['wall_s']:.0f} s)", flush=True)
    records = [r for r in load_results(results_path) if r.get("settings") == settings
               and r["model"] in profile.models and r["seed"] < profile.seeds]
    stats: Dict[str, List[Dict[str, List[List[float]]]]] = {}  # model -> per seed {"channel_share", "pose_spread"}
    picture, reach = None, None
    if records:
        images, labels, pairs = test_pairs(root, STATS_IMAGES)
        reach = {"whole_digit_box": window_share_bound(images),
                 "frontier": window_share_frontier(images[:profile.frontier_images])}
        for r in sorted(records, key=lambda r: r["seed"]):
            if "num_transformers" in ROWS[r["model"]][2] and r["test_error"] is not None:
                model = load_run(r["run_dir"])[0]
                stats.setdefault(r["model"], []).append({"channel_share": channel_share(model, images),
                                                         "pose_spread": pose_spread(model, images, pairs)})
                if r["model"] == "2xst-fcn" and picture is None:
                    picture = pairs_picture(model, images[:profile.num_examples], labels[:profile.num_examples],
                                            out / "addition.png")
    return write_report(profile, records, stats, reach, picture, time.time() - started)


def _mean_over_seeds(per_seed: List[Dict], name: str) -> List[List[float]]:
    """Mean over seeds of a (transformers, channels) statistic, each seed's transformers ordered by the
    digit they stabilise most (the lowest pose spread: digit 0's first): which of two identical
    transformers takes which digit is the seed's draw, and averaging unaligned they would cancel."""
    values = []
    for seed in per_seed:
        order = sorted(range(len(seed["pose_spread"])), key=lambda k: min(range(len(seed["pose_spread"][k])),
                                                                            key=seed["pose_spread"][k].__getitem__))
        values.append([seed[name][k] for k in order])
    return [[round(float(v), 4) for v in row] for row in torch.tensor(values).mean(0)]


def summary_json(records: Sequence[Dict], stats: Dict[str, List], seeds: int, reach: Optional[Dict]) -> Dict:
    """{"seeds", "errors": {model: {"mean", "std", "n"}}, "channel_share": the 2xST-FCN's [[a, b], [c, d]]
    (mean over seeds, the transformer that stabilises digit 0 first), "pose_spread": the same for the
    pose spread, "window_share_bound": per channel, the share a window around one whole digit holds,
    "window_share_frontier": {kept share: per channel, the best share a window keeping it holds},
    "per_seed": {model: [{"channel_share", "pose_spread"} per seed]}}."""
    errors = {}
    for key in ROWS:
        done = [r["test_error"] for r in records if r["model"] == key and r["test_error"] is not None]
        if done:
            errors[key] = {"mean": round(statistics.fmean(done), 3),
                           "std": round(statistics.stdev(done), 3) if len(done) > 1 else 0.0, "n": len(done)}
    two = stats.get("2xst-fcn")
    return {"seeds": seeds, "errors": errors,
            "channel_share": _mean_over_seeds(two, "channel_share") if two else None,
            "pose_spread": _mean_over_seeds(two, "pose_spread") if two else None,
            "window_share_bound": (reach or {}).get("whole_digit_box"),
            "window_share_frontier": (reach or {}).get("frontier"), "per_seed": stats}


def format_table(records: Sequence[Dict], models: Sequence[str]) -> str:
    lines = ["| Model | parameters | test error % (ours) | paper |", "|---|---|---|---|"]
    for key in (k for k in ROWS if k in models):
        values = [r["test_error"] for r in records if r["model"] == key]
        params = {r.get("num_params") for r in records if r["model"] == key and r.get("num_params")}
        lines.append(f"| {ROWS[key][0]} | {', '.join(f'{p:,}' for p in sorted(params)) or '–'} | {_cell(values)} "
                     f"| {PAPER_ERROR[key]} |")
    return "\n".join(lines)


def transformer_table(stats: Dict[str, List]) -> str:
    """Per seed and transformer: the share of its output energy from channel 0 (first digit) / 1, and how
    much each digit's pose still varies in its output (1: as in the input, 0: one pose)."""
    lines = ["| Model | seed | transformer | energy from channel 0 | from channel 1 | pose spread, digit 0 "
             "| digit 1 |", "|---|---|---|---|---|---|---|"]
    for key, per_seed in stats.items():
        for seed, got in enumerate(per_seed):
            for k, ((a, b), (p, q)) in enumerate(zip(got["channel_share"], got["pose_spread"])):
                lines.append(f"| {ROWS[key][0]} | {seed} | {k + 1} | {a:.2f} | {b:.2f} | {p:.2f} | {q:.2f} |")
    return "\n".join(lines)


def frontier_table(frontier: Dict[str, List[float]]) -> str:
    """The best share of one channel any window reaches, against the share of its digit it keeps."""
    lines = ["| window keeps of its digit's energy | best share, channel 0 | channel 1 |", "|---|---|---|"]
    lines += [f"| >= {float(k):.0%} | {a:.2f} | {b:.2f} |" for k, (a, b) in frontier.items()]
    return "\n".join(lines)


def write_report(profile: AdditionProfile, records: List[Dict], stats: Dict, reach: Optional[Dict],
                 picture: Optional[Path], wall: float) -> Dict:
    out = Path(profile.out)
    table = format_table(records, profile.models)
    header = (f"MNIST addition, profile '{profile.name}': test error (%) on {records[0]['num_test'] if records else 0} "
              f"fixed test pairs, {profile.steps} steps of {profile.batch_size} pairs (AdamW, lr {profile.lr}), "
              f"training pairs drawn and RTS-distorted afresh in every batch from "
              f"{profile.train_limit or profile.train_count or 'all the'} training digits, "
              f"{profile.seeds} seed(s), mean ± std over seeds; {len(records)} runs took "
              f"{sum(r['wall_s'] for r in records) / 60:.1f} min.\n\n")
    text = header + table
    if stats:
        text += (f"\n\nWhat each transformer does on the first {STATS_IMAGES} test pairs: the share of its output's "
                 "energy from each input channel (a window holding a whole digit reaches at most "
                 f"{' / '.join(f'{b:.2f}' for b in reach['whole_digit_box'])} for channel 0 / 1: the two digits "
                 "overlap), and how much each digit's pose varies in its output (1: as in the input, 0: one "
                 "canonical pose):\n\n" + transformer_table(stats) + "\n\nThe most one channel's share can be in any window (every "
                 f"rectangle, place and rotation in 15-degree steps, searched on the first {profile.frontier_images} "
                 "pairs), by how much of its own digit the window keeps:\n\n" + frontier_table(reach["frontier"]))
    table_path = out / "table.md"
    table_path.write_text(text + "\n")
    summary = {**summary_json(records, stats, profile.seeds, reach), "steps": profile.steps,
               "batch_size": profile.batch_size}  # the budget the errors belong to
    (out / "addition_mnist.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.json").write_text(json.dumps({"profile": asdict(profile), "wall_s": wall, "runs": records},
                                                 indent=1, default=str))
    return {"table": text, "table_path": str(table_path), "json": summary, "pictures": [str(picture)] if picture else [],
            "wall_s": wall, "runs": records}
