"""Where `model.pretrained=true` weights come from, checked before anything is queued or built.

    python -m pipeline.models.weights inception_v3 --out /weights/inception_v3.pth   # on a login node
    ... model.pretrained=/weights/inception_v3.pth                                   # works on any node

`model.pretrained=true` asks timm for its hub weights: from the local Hugging Face cache when they
are there (what HF_HUB_OFFLINE=1 allows), else over the network. Compute nodes of most clusters
have no network: there the hub retries for about a minute and fails with a message that names
neither the config key nor a fix. `check_pretrained` says in one line, before any allocation or
model is built, where the weights would come from and what to do when they cannot.
"""
from __future__ import annotations

import argparse
import functools
import os
import socket
import sys
from pathlib import Path
from typing import Optional, Sequence

HUB_HOST = ("huggingface.co", 443)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm tries, in its order


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_id(name: str) -> Optional[str]:
    """The Hugging Face repo of timm model `name`'s default (or tagged) weights; None if timm has none there."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    return getattr(cfg, "hf_hub_id", None) if cfg is not None else None


def cached_weights(name: str) -> Optional[Path]:
    """The weights file of `name` in the local Hugging Face cache, if there is one."""
    from huggingface_hub import try_to_load_from_cache

    repo = hub_id(name)
    if not repo:
        return None
    for filename in WEIGHT_FILES:
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return Path(found)
    return None


@functools.lru_cache(maxsize=1)  # once per process: every stream and the localisation trunk ask
def hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(HUB_HOST, timeout=timeout).close()
        return True
    except OSError:
        return False


def fix(name: str) -> str:
    return (f"fetch them once where the hub is reachable (python -m pipeline.models.weights {name} --out "
            f"WEIGHTS.pth) and set model.pretrained=WEIGHTS.pth")


def check_pretrained(name: str, pretrained, probe_network: bool = False) -> str:
    """Where the weights of backbone `name` come from: 'none', 'file', 'cache' or 'network'.

    Raises ValueError naming model.pretrained when they cannot come from anywhere: a missing file,
    or `true` with no cached copy while offline (HF_HUB_OFFLINE=1) or, with `probe_network`, while
    the hub does not answer from this machine."""
    if pretrained is None or pretrained is False:
        return "none"
    if pretrained is not True:
        path = Path(str(pretrained)).expanduser()
        if not path.is_file():
            raise ValueError(f"model.pretrained={str(pretrained)!r}: no such weights file for '{name}'")
        return "file"
    if cached_weights(name) is not None:
        return "cache"
    if offline():
        raise ValueError(f"model.pretrained=true: the weights of '{name}' are not in the local hub cache and "
                         f"HF_HUB_OFFLINE is set; {fix(name)}")
    if probe_network and not hub_reachable():
        raise ValueError(f"model.pretrained=true: the weights of '{name}' are not in the local hub cache and the "
                         f"hub ({HUB_HOST[0]}) does not answer from here; {fix(name)}")
    return "network"


def fetch(name: str, out: Path) -> Path:
    """Download `name`'s pretrained weights (through timm) and save its state dict to `out`, atomically."""
    import timm
    import torch

    model = timm.create_model(name, pretrained=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(out)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.models.weights",
                                     description="Save a timm backbone's pretrained weights to a file "
                                                 "(run where the hub is reachable; then model.pretrained=FILE).")
    parser.add_argument("name", help="timm model name, e.g. inception_v3 or inception_v3.tv_in1k")
    parser.add_argument("--out", required=True, type=Path, help="weights file to write (.pth)")
    args = parser.parse_args(argv)
    try:
        check_pretrained(args.name, True, probe_network=True)
        path = fetch(args.name, args.out)
    except (ValueError, RuntimeError, OSError) as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"wrote {path}: use model.pretrained={path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
