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
}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command '{argv[0]}'; commands: {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        print(f"usage: python -m data_prep {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 0 if argv else 2
    module = importlib.import_module(COMMANDS[argv[0]])
    try:
        return int(module.main(argv[1:]) or 0)
    except DataPrepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
