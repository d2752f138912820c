"""data_prep.shards: the same bytes as webdataset's TarWriter, with fixed tar times; the writer thread."""
from __future__ import annotations

import errno
import hashlib
import io
import os
import tarfile

import numpy as np
import pytest

from data_prep.shards import SHARD_MTIME, ShardWriter, write_shard


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


def _samples(count: int, size: int = 300_000, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [{"__key__": f"{i:06d}", "jpg": rng.bytes(size), "cls": i} for i in range(count)]


def test_shard_writer_pipelines_several_shards_with_the_bytes_of_write_shard(tmp_path):
    """Batches of ~1 MiB cross the thread boundary: 10 x 300 kB samples span several of them."""
    shards = {f"s{i}.tar": _samples(10, seed=i) for i in range(3)}
    entries = []
    with ShardWriter(durable=False, on_written=entries.append) as writer:
        for name, samples in shards.items():
            writer.write(tmp_path / name, samples)
    assert [e["name"] for e in entries] == list(shards)  # in order, each once
    for entry, (name, samples) in zip(entries, shards.items()):
        alone = write_shard(tmp_path / f"alone-{name}", samples)
        assert entry == {**alone, "name": name}
        assert (tmp_path / name).read_bytes() == (tmp_path / f"alone-{name}").read_bytes()
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]


def test_error_while_reading_samples_leaves_no_partial_file_and_keeps_finished_shards(tmp_path):
    def broken():
        yield from _samples(5)
        raise ValueError("corrupt image 000005")

    entries = []
    with pytest.raises(ValueError, match="corrupt image 000005"):
        with ShardWriter(durable=False, on_written=entries.append) as writer:
            writer.write(tmp_path / "good.tar", _samples(4))
            writer.write(tmp_path / "bad.tar", broken())
    assert [e["name"] for e in entries] == ["good.tar"]
    assert sorted(os.listdir(tmp_path)) == ["good.tar"]  # no bad.tar, no temporary file


def test_writer_error_reaches_the_caller_and_removes_the_temporary_file(tmp_path, monkeypatch):
    """A failing write (here: ENOSPC from the file object) is raised in the caller's thread."""
    real_open = open

    class FullDisk(io.FileIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("builtins.open", lambda path, mode="r", *a, **k: FullDisk(path, "wb")
                        if ".partial-" in str(path) else real_open(path, mode, *a, **k))
    with pytest.raises(OSError, match="No space left"):
        write_shard(tmp_path / "a.tar", _samples(20))  # 6 MB: the error comes while samples are still read
    assert os.listdir(tmp_path) == []


def test_files_read_ahead_whole_in_order_through_short_reads_and_errors_in_turn(tmp_path, monkeypatch):
    from data_prep import shards

    rng = np.random.default_rng(1)
    contents = [rng.bytes(3 * (1 << 20) + 17), b"", rng.bytes(1000)] + [rng.bytes(n) for n in range(5, 50)]
    paths = []
    for i, data in enumerate(contents):
        paths.append(str(tmp_path / f"{i}.jpg"))
        (tmp_path / f"{i}.jpg").write_bytes(data)
    open_fds = len(os.listdir("/proc/self/fd"))
    assert list(shards.read_files_ahead(paths, depth=4)) == contents
    real_read = os.read
    monkeypatch.setattr(shards.os, "read", lambda fd, n: real_read(fd, min(n, 100_000)))  # as NFS may
    assert list(shards.read_files_ahead(paths)) == contents
    monkeypatch.undo()
    # a file that vanished is an error when its turn comes, after the files before it
    missing = paths[:2] + [str(tmp_path / "gone.jpg")] + paths[2:]
    reader = shards.read_files_ahead(missing, depth=8)
    assert [next(reader), next(reader)] == contents[:2]
    with pytest.raises(FileNotFoundError):
        next(reader)
    # stopped early (as a --strict error stops a shard): the files opened ahead are closed
    reader = shards.read_files_ahead(paths, depth=8)
    next(reader)
    reader.close()
    assert len(os.listdir("/proc/self/fd")) == open_fds


@pytest.mark.parametrize("name_length, size", [(1, 0), (10, 1), (99, 70_000), (100, 8**11 - 1)])
def test_member_headers_equal_tarfiles(name_length, size):
    from data_prep.shards import _TAR_MODE, _TAR_USER, _ustar_header

    info = tarfile.TarInfo("n" * name_length)
    info.size, info.mtime, info.mode = size, SHARD_MTIME, _TAR_MODE
    info.uname = info.gname = _TAR_USER
    assert _ustar_header(info.name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
