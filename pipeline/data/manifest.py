"""Reading and checking a shard folder's manifest.json: the data_prep contract (docs/design.md),
which `data_prep.contract` defines once for prep, verify and these loaders.

The checks run before any rank starts streaming: a listed shard that is missing or whose size
differs from the manifest would otherwise surface as a hang or a short evaluation much later.
"""
from data_prep.contract import DataError, Manifest, read_manifest  # noqa: F401
# Tasks the loaders and evaluation know; a manifest without "task" gets its dataset's.
from data_prep.contract import DEFAULT_MAX_LENGTH, DEFAULT_TASK, TASK_OF_DATASET, TASKS  # noqa: F401
