"""Data-prep jobs: raw datasets -> webdataset tar shards + manifest.json (the contract: docs/design.md)."""


class DataPrepError(Exception):
    """Bad input: the message is one line naming the file, key or value."""
