"""data_prep.shards.write_shard: the same bytes as webdataset's TarWriter, with fixed tar times."""
from __future__ import annotations

import hashlib
import io
import os
import tarfile

import numpy as np

from data_prep.shards import SHARD_MTIME, write_shard


def test_shard_bytes_equal_webdataset_tarwriter_and_are_reproducible(tmp_path):
    import webdataset as wds

    rng = np.random.default_rng(0)
    samples = [
        {"__key__": "000001", "jpg": rng.bytes(70_000), "cls": 3, "json": {"bbox": [1.5, 2.0], "name": "a b"}},
        {"__key__": "000002", "png": np.zeros((4, 4, 3), np.uint8), "cls": 0, "txt": "héllo", "__url__": "x"},
        {"__key__": "k" * 120, "bin": b""},  # a name over 100 bytes needs a pax header
    ]
    entry = write_shard(tmp_path / "a.tar", samples)
    data = (tmp_path / "a.tar").read_bytes()
    buf = io.BytesIO()
    with wds.TarWriter(buf, mtime=SHARD_MTIME) as sink:
        for sample in samples:
            sink.write(sample)
    assert data == buf.getvalue()
    assert entry == {"name": "a.tar", "num_samples": 3, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert write_shard(tmp_path / "b.tar", samples)["sha256"] == entry["sha256"]  # no time in the bytes
    with tarfile.open(tmp_path / "a.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members][:3] == ["000001.cls", "000001.jpg", "000001.json"]
    assert {m.mtime for m in members} == {SHARD_MTIME}
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]
