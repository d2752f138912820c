"""python -m pipeline.train --config configs/X.yaml [section.key=value ...]  (see pipeline.train)"""
import sys

from pipeline.train import main

if __name__ == "__main__":
    sys.exit(main())
