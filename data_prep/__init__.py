"""Data-prep jobs: raw datasets -> webdataset tar shards + manifest.json (see DESIGN.md's contract)."""


class DataPrepError(Exception):
    """Bad input: the message is one line naming the file, key or value."""
