"""python -m data_prep <command> ...   (python -m data_prep --help lists the commands)"""
from __future__ import annotations

import importlib
import sys
from typing import List, Optional

from . import DataPrepError

# command -> module with a `main(argv) -> int`
COMMANDS = {
    "cub": "data_prep.cub",
    "svhn": "data_prep.svhn",
    "verify": "data_prep.verify",
    "synthetic-cub": "data_prep.synthetic_cub",
    "digits": "data_prep.digits",
    "coloc": "data_prep.coloc",
}
SUMMARY = {
    "cub": "CUB-200-2011 as downloaded -> shards (original JPEGs, boxes, 15 parts) + manifest.json",
    "svhn": "SVHN format 1 (digitStruct.mat) or 2 (*_32x32.mat) -> cropped multi-digit shards + manifest.json",
    "verify": "re-read every shard of an output folder against its manifest (sizes, sha256, samples)",
    "synthetic-cub": "draw the demo's CUB-layout bird dataset (no download needed)",
    "digits": "MNIST / Fashion-MNIST IDX files -> distorted digits (R, RTS, P, E, TC; paper A.3)",
    "coloc": "MNIST IDX files -> one digit per 84x84 image, alone or cluttered (co-localisation; paper A.2)",
}
USAGE = "usage: python -m data_prep <command> [--help | options]\n\ncommands:\n" + "".join(
    f"  {name:<14} {SUMMARY[name]}\n" for name in COMMANDS)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command '{argv[0]}'; commands: {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        print(USAGE, end="", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    module = importlib.import_module(COMMANDS[argv[0]])
    try:
        return int(module.main(argv[1:]) or 0)
    except DataPrepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
