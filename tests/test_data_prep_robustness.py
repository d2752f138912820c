"""Bad input, interrupted jobs, pieces over several jobs, and verify: data_prep cub on real CUB samples."""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import PYTHON, SAMPLE_DATA, subprocess_env
from data_prep import DataPrepError, cub
from data_prep.__main__ import main as data_prep_main
from data_prep.jobs import job_options_from_env
from data_prep.shards import write_json_atomic, write_shard
from data_prep.verify import verify
from pipeline.data import decode_rgb
from test_data_prep_cub import cub_root, raw_records, read_back  # noqa: F401 (cub_root: the fixture, one per module)

TEXT_FILES = ("classes.txt", "images.txt", "image_class_labels.txt", "train_test_split.txt",
              "bounding_boxes.txt", "parts/parts.txt", "parts/part_locs.txt")


def light_copy(root: Path, dest: Path, copy_images: bool = False) -> Path:
    """A CUB root whose text files can be edited; images linked (or copied, to edit them too)."""
    new = dest / "CUB_200_2011"
    (new / "parts").mkdir(parents=True)
    for name in TEXT_FILES:
        shutil.copy(root / name, new / name)
    if copy_images:
        shutil.copytree(root / "images", new / "images")
    else:
        (new / "images").symlink_to(root / "images")
    return new


def image_path(root: Path, image_id: int) -> Path:
    return root / "images" / raw_records(root)[image_id]["file"]


def shard_digests(manifest: dict) -> dict:
    return {s["name"]: s["sha256"] for v in manifest["splits"].values() for s in v["shards"]}


# ---- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("missing", TEXT_FILES + ("images", "parts"))
def test_missing_metadata_is_one_line_error_and_writes_nothing(cub_root, tmp_path, capsys, missing):
    root = light_copy(cub_root, tmp_path)
    target = root / missing
    shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
    out = tmp_path / "out"
    assert data_prep_main(["cub", "--root", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and str(target) in err
    assert not out.exists()


def test_missing_image_is_error_or_skipped(cub_root, tmp_path, capsys):
    root = light_copy(cub_root, tmp_path)
    images = root / "images.txt"
    images.write_text(images.read_text().replace("Black_Footed_Albatross_0002_55.jpg", "gone.jpg"))
    out = tmp_path / "out"
    assert data_prep_main(["cub", "--root", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "gone.jpg" in err and "id 3" in err and "--skip-missing" in err and not out.exists()
    manifest = cub.prepare(root, out, skip_missing=True, shard_size=10)
    assert manifest["skipped"] == [{"key": "000003", "reason": "missing: images/001.Black_footed_Albatross/gone.jpg"}]
    assert manifest["splits"]["train"]["num_samples"] + manifest["splits"]["test"]["num_samples"] == 59


@pytest.mark.multiprocess  # --workers 2: a process pool
def test_corrupt_and_truncated_images_skipped_or_strict_error(cub_root, tmp_path, capsys):
    root = light_copy(cub_root, tmp_path, copy_images=True)
    truncated, garbage = image_path(root, 4), image_path(root, 9)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    garbage.write_bytes(os.urandom(5000))
    out = tmp_path / "out"
    assert data_prep_main(["cub", "--root", str(root), "--out", str(out), "--shard-size", "8"]) == 0
    err = capsys.readouterr().err
    assert "warning: 2 sample(s) left out (corrupt: 2)" in err
    manifest = json.loads((out / "manifest.json").read_text())
    reasons = {s["key"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"000004", "000009"}
    assert "truncated" in reasons["000004"] and "not a JPEG" in reasons["000009"]
    assert sum(v["num_samples"] for v in manifest["splits"].values()) == 58
    assert verify(out)[0] == []

    strict_out = tmp_path / "strict"
    assert data_prep_main(["cub", "--root", str(root), "--out", str(strict_out), "--strict", "--workers", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and (truncated.name in err or garbage.name in err)
    assert not (strict_out / "manifest.json").exists()
    assert not [p for p in strict_out.iterdir() if ".partial-" in p.name]


def test_grayscale_and_cmyk_jpegs_kept_and_decode_to_rgb(cub_root, tmp_path):
    root = light_copy(cub_root, tmp_path, copy_images=True)
    for image_id, mode in ((2, "L"), (4, "CMYK")):  # ids 2 and 4 are both train
        path = image_path(root, image_id)
        Image.open(path).convert(mode).save(path, format="JPEG", quality=90)
    manifest = cub.prepare(root, tmp_path / "out", shard_size=8)
    assert manifest["skipped"] == []
    samples = {s["__key__"]: s for s in read_back(tmp_path / "out", manifest)["train"]}
    for image_id, mode in ((2, "L"), (4, "CMYK")):
        sample = samples[f"{image_id:06d}"]
        assert sample["jpg"] == image_path(root, image_id).read_bytes()  # kept as is, not re-encoded
        assert json.loads(sample["json"])["mode"] == mode
        array, _ = decode_rgb(sample["jpg"])  # the training pipeline's decoder, not PIL's convert
        reference = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"), dtype=np.float64)
        assert array.shape == reference.shape and np.abs(array - reference).mean() < 3.0, mode


def test_crlf_blank_lines_and_spaces_read_like_clean_metadata(cub_root, tmp_path):
    root = light_copy(cub_root, tmp_path)
    for name in TEXT_FILES:
        path = root / name
        lines = path.read_text().splitlines()
        path.write_bytes(("\r\n\r\n" + "\r\n\r\n".join(l + "  " for l in lines) + "\r\n\r\n").encode())
    messy = cub.prepare(root, tmp_path / "messy", shard_size=8)
    clean = cub.prepare(cub_root, tmp_path / "clean", shard_size=8)
    assert messy["parts"] == clean["parts"] and "left eye" in messy["parts"] and len(messy["parts"]) == 15
    assert messy["classes"] == clean["classes"] and messy["splits"] == clean["splits"]
    assert shard_digests(messy) == shard_digests(clean)


def test_output_holding_other_data_refused_unless_overwrite(cub_root, tmp_path, capsys):
    out = tmp_path / "out"
    cub.prepare(cub_root, out, shard_size=5)
    assert (out / "train-000005.tar").exists()
    with pytest.raises(DataPrepError, match=r"different data-prep output \(options.shard_size: 5 there, 7 now\).*--overwrite"):
        cub.prepare(cub_root, out, shard_size=7)
    with pytest.raises(DataPrepError, match=r"different data-prep output \(options.classes: null there, \[1, 2\] now\)"):
        cub.prepare(cub_root, out, classes="1-2", shard_size=5)
    assert data_prep_main(["svhn", "--root", str(SAMPLE_DATA / "svhn"), "--split", "test", "--skip-missing",
                           "--out", str(out)]) == 2
    assert "dataset: \"cub\" there, \"svhn\" now" in capsys.readouterr().err
    manifest = cub.prepare(cub_root, out, shard_size=7, overwrite=True)
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(shard_digests(manifest))
    assert not (out / "train-000005.tar").exists()  # the old run's extra shard is gone
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(DataPrepError, match="a_file: --out exists and is not a folder"):
        cub.prepare(cub_root, tmp_path / "a_file")
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "data-000000.tar").write_bytes(b"x")
    with pytest.raises(DataPrepError, match="shards of unknown origin"):
        cub.prepare(cub_root, stranger)


# ---- pieces, jobs, resume -----------------------------------------------------------------------

@pytest.mark.multiprocess  # --workers 2: a process pool
def test_jobs_and_workers_give_the_same_bytes(cub_root, tmp_path, monkeypatch):
    single = cub.prepare(cub_root, tmp_path / "single", shard_size=6)
    out = tmp_path / "jobs"
    assert cub.prepare(cub_root, out, shard_size=6, num_jobs=3, job_index=0) is None  # others missing
    with pytest.raises(DataPrepError, match=r"shard\(s\) not written yet"):
        cub.prepare(cub_root, out, shard_size=6, finalize_only=True)
    assert cub.prepare(cub_root, out, shard_size=6, num_jobs=3, job_index=2, workers=2) is None
    assert not (out / "manifest.json").exists()
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    assert job_options_from_env(None, None) == (3, 1)
    assert job_options_from_env(None, 2) == (3, 2)  # flags win over the environment
    with monkeypatch.context() as env:  # --array=1-5:2 -> ids 1, 3, 5 -> pieces 0, 1, 2
        env.setenv("SLURM_ARRAY_TASK_ID", "5")
        env.setenv("SLURM_ARRAY_TASK_MIN", "1")
        env.setenv("SLURM_ARRAY_TASK_STEP", "2")
        assert job_options_from_env(None, None) == (3, 2)
    assert data_prep_main(["cub", "--root", str(cub_root), "--out", str(out), "--shard-size", "6", "--no-finalize"]) == 0
    assert not (out / "manifest.json").exists()
    assert cub.prepare(cub_root, out, shard_size=6, finalize_only=True) == single
    assert json.loads((out / "manifest.json").read_text()) == single
    parallel = cub.prepare(cub_root, tmp_path / "workers", shard_size=6, workers=2)
    assert parallel == single


@pytest.mark.multiprocess
def test_workers_started_without_fork_from_a_threaded_parent_write_the_same(cub_root, tmp_path, monkeypatch):
    """A parent with another thread running does not fork (the child could inherit a held lock):
    its workers start afresh and receive the shard list pickled, and write the same shards."""
    import multiprocessing

    methods, get_context = [], multiprocessing.get_context
    monkeypatch.setattr(multiprocessing, "get_context", lambda method=None: methods.append(method) or get_context(method))
    forked = cub.prepare(cub_root, tmp_path / "forked", shard_size=6, workers=2)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        started = cub.prepare(cub_root, tmp_path / "started", shard_size=6, workers=2)
    finally:
        stop.set()
        other.join()
    assert started == forked
    assert methods == ["fork", "forkserver"]


@pytest.mark.multiprocess
def test_concurrent_array_jobs_leave_one_complete_manifest(cub_root, tmp_path):
    """Three jobs at once, as a SLURM array runs them: whichever finishes last writes the manifest."""
    out = tmp_path / "out"
    procs = [subprocess.Popen([PYTHON, "-m", "data_prep", "cub", "--root", str(cub_root), "--out", str(out),
                               "--shard-size", "5"], stderr=subprocess.PIPE,
                              env=subprocess_env(SLURM_ARRAY_TASK_COUNT="3", SLURM_ARRAY_TASK_ID=str(i)))
             for i in range(3)]
    errors = [proc.communicate(timeout=120)[1].decode() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], errors
    assert sum("wrote 4 shard(s)" in err for err in errors) == 3  # 12 shards, 4 per job
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == cub.prepare(cub_root, tmp_path / "single", shard_size=5)
    assert verify(out)[0] == []


@pytest.mark.multiprocess
def test_sigkill_mid_shard_then_rerun_matches_uninterrupted(cub_root, tmp_path):
    """The job blocks inside shard train-000002 on a FIFO standing in for an image; we SIGKILL it there."""
    root = light_copy(cub_root, tmp_path, copy_images=True)
    train_ids = sorted(i for i, r in raw_records(root).items() if r["split"] == "train")
    blocked = image_path(root, train_ids[9])  # shard_size 4: train-000002's second sample
    real_bytes = blocked.read_bytes()
    blocked.unlink()
    os.mkfifo(blocked)
    out = tmp_path / "out"
    cmd = [PYTHON, "-m", "data_prep", "cub", "--root", str(root), "--out", str(out), "--shard-size", "4"]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while (writer := _open_fifo_writer(blocked)) is None:  # succeeds once the job opens the FIFO
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "job never reached shard train-000002"
            time.sleep(0.05)
        # the job's reader is inside shard train-000002, waiting for the bytes of its second image; its
        # writer thread opens the shard's temporary file (after renaming train-000001) on its own time
        while not list(out.glob(".train-000002.tar.partial-*")):
            assert time.monotonic() < deadline, "the writer never opened train-000002's temporary file"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        os.close(writer)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
    assert not (out / "manifest.json").exists()
    complete = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.tar")}

    blocked.unlink()
    blocked.write_bytes(real_bytes)
    assert data_prep_main(cmd[3:]) == 0  # the rerun, same flags
    assert {n: (out / n).stat().st_ino for n in complete} == {n: v[0] for n, v in complete.items()}
    assert {n: (out / n).stat().st_mtime_ns for n in complete} == {n: v[1] for n, v in complete.items()}
    assert not [p for p in out.iterdir() if ".partial-" in p.name]
    resumed = json.loads((out / "manifest.json").read_text())
    uninterrupted = cub.prepare(root, tmp_path / "clean", shard_size=4, workers=2)
    assert resumed == uninterrupted
    assert shard_digests(resumed) == shard_digests(uninterrupted)
    assert verify(out)[0] == []


def _open_fifo_writer(fifo: Path):
    """A write end of `fifo`, or None while no process has it open for reading."""
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as err:
        if err.errno == errno.ENXIO:
            return None
        raise


# ---- verify -------------------------------------------------------------------------------------

def test_verify_reports_what_is_wrong(cub_root, tmp_path, capsys):
    out = tmp_path / "out"
    manifest = cub.prepare(cub_root, out, shard_size=10)
    assert verify(out)[0] == []
    with open(out / "train-000001.tar", "r+b") as f:  # flip a byte inside a JPEG
        f.seek(5000)
        byte = f.read(1)
        f.seek(5000)
        f.write(bytes([byte[0] ^ 0xFF]))
    (out / "test-000002.tar").unlink()
    # a shard whose checksum matches the manifest but whose image does not decode
    entry = write_shard(out / "test-000001.tar", [{"__key__": "999999", "jpg": b"\xff\xd8junk", "cls": 0,
                                                    "json": {"label": 0}}])
    manifest["splits"]["test"]["shards"][1] = entry
    manifest["splits"]["test"]["num_samples"] = 999
    write_json_atomic(out / "manifest.json", manifest)
    assert data_prep_main(["verify", str(out)]) == 1
    err = capsys.readouterr().err
    assert "train-000001.tar: sha256 differs" in err
    assert "test-000002.tar: listed in manifest.json (split 'test') but missing" in err
    assert "test-000001.tar: sample 999999: jpg does not decode" in err
    assert "json lacks id" in err
    assert "split 'test' says num_samples 999" in err
    assert data_prep_main(["verify", str(tmp_path / "nothing")]) == 2


def test_jpeg_check_finds_truncation_but_keeps_trailing_data(cub_root):
    data = image_path(cub_root, 1).read_bytes()
    size = Image.open(io.BytesIO(data)).size
    assert cub.inspect_jpeg(data)[:2] == size
    assert cub.inspect_jpeg(data + b"\0" * 5000)[:2] == size  # data after the end marker: decoded, kept
    progressive = io.BytesIO()
    Image.open(io.BytesIO(data)).save(progressive, format="JPEG", progressive=True)
    assert cub.inspect_jpeg(progressive.getvalue()) == (*size, "RGB")
    for cut in (len(data) - 10, len(data) // 2, 300):
        with pytest.raises(cub.BadImage):
            cub.inspect_jpeg(data[:cut])
    with pytest.raises(cub.BadImage, match="not a JPEG"):
        cub.inspect_jpeg(b"GIF89a" + data)


def test_part_rows_in_any_order_read_alike_and_duplicates_refused(cub_root, tmp_path):
    root = light_copy(cub_root, tmp_path)
    locs = root / "parts" / "part_locs.txt"
    lines = locs.read_text().splitlines()
    locs.write_text("\n".join(reversed(lines)) + "\n")
    shuffled = cub.read_metadata(root)
    assert shuffled.part_locs == cub.read_metadata(cub_root).part_locs
    # the same JSON text as the in-order fast path (byte-identical samples), and the values of the rows
    assert json.loads(shuffled.part_locs[2])[1] == [float(v) for v in lines[16].split()[2:4]] + [int(lines[16].split()[4])]
    locs.write_text("\n".join(lines + [lines[3]]) + "\n")
    with pytest.raises(DataPrepError, match="image 1 has two rows for part 4"):
        cub.read_metadata(root)


@pytest.mark.parametrize("name, line, bad", [
    ("bounding_boxes.txt", 3, "3 14.0 112.0 wide 186.0"),
    ("parts/part_locs.txt", 5, "1 5 10.0 20.0"),
    ("images.txt", 2, "2"),
])
def test_malformed_metadata_line_named_with_its_number(cub_root, tmp_path, name, line, bad):
    root = light_copy(cub_root, tmp_path)
    lines = (root / name).read_text().splitlines()
    lines[line - 1] = bad
    (root / name).write_text("\n".join(lines) + "\n")
    with pytest.raises(DataPrepError, match=rf"{name}:{line}: expected .*{bad[:8]}"):
        cub.make_plan(root)
