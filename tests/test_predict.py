"""python -m pipeline.predict: a trained checkpoint on image files, as the evaluation sees them."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from shard_fixtures import train_tiny_two_stream_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint, data root, folder of the test split's JPEGs named by their keys)."""
    root = tmp_path_factory.mktemp("predict")
    data = train_tiny_two_stream_run(root)
    images = root / "images"
    images.mkdir()
    for shard in sorted(data.glob("test-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".jpg"):
                    (images / member.name).write_bytes(tar.extractfile(member).read())
    return root / "run" / "checkpoints" / "last.pt", data, images


def predictions(capsys, argv) -> list:
    from pipeline.predict import main

    assert main(argv) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_top_classes_by_name_and_windows_as_the_evaluation_sees_the_image(trained, capsys, tmp_path):
    from pipeline.data import build_eval_loader, normalize, read_manifest
    from pipeline.evaluate import load_model

    checkpoint, data, images = trained
    files = sorted(images.iterdir())
    got = predictions(capsys, ["--checkpoint", str(checkpoint), str(images), str(files[0]), "--top-k", "2",
                               "--draw", str(tmp_path / "drawn")])
    assert [r["image"] for r in got] == [str(f) for f in files] + [str(files[0])]  # folder sorted, then the file
    manifest = read_manifest(data)
    model, cfg, _ = load_model(checkpoint)
    loader = build_eval_loader(cfg, manifest, "test", 0, 1, batch_size=64, num_workers=0)
    expected = {}
    for batch, _, metas in loader:
        with torch.no_grad():
            probs = model(normalize(batch, cfg.data.mean, cfg.data.std)).softmax(-1)
        expected.update({meta["key"]: (probs[i], meta) for i, meta in enumerate(metas)})
    for record in got:
        probs, meta = expected[Path(record["image"]).stem]
        top = probs.topk(2)
        assert [t["index"] for t in record["top"]] == top.indices.tolist()  # the evaluation's view and scores
        assert [t["class"] for t in record["top"]] == [manifest.classes[i] for i in top.indices.tolist()]
        assert record["top"][0]["prob"] == pytest.approx(float(top.values[0]), abs=1e-4)
        assert record["size"] == meta["size"] and len(record["windows"]) == model.num_streams
        assert all(len(box) == 4 and box[0] < box[2] and box[1] < box[3] for box in record["windows"])
    assert sorted(p.name for p in (tmp_path / "drawn").iterdir()) == sorted(f"{f.stem}.png" for f in files)


def test_windows_are_in_the_images_own_pixels():
    from pipeline.data.augment import View
    from pipeline.predict import original_box

    view = View(scale_x=0.5, scale_y=0.25, offset_x=4.0, offset_y=2.0, size=32)  # input = original * scale - offset
    assert original_box([-1.0, -1.0, 1.0, 1.0], view) == [8.0, 8.0, 72.0, 136.0]


def test_bad_input_is_one_line_naming_the_file(trained, capsys, tmp_path):
    from pipeline.predict import main

    checkpoint, _, images = trained
    for bad, named in ((tmp_path / "missing.jpg", "missing.jpg: no such file"),
                       (tmp_path / "empty", "empty: no jpg/jpeg/png/webp images"),
                       (tmp_path / "notes.jpg", "notes.jpg: cannot read the image")):
        if bad.name == "empty":
            bad.mkdir()
        elif bad.name == "notes.jpg":
            bad.write_text("not an image")
        assert main(["--checkpoint", str(checkpoint), str(bad), "--draw", str(tmp_path / "drawn")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and named in err, err
    assert not (tmp_path / "drawn").exists()
    assert main(["--checkpoint", str(checkpoint), str(images), "--top-k", "0"]) == 2
    assert "--top-k 0" in capsys.readouterr().err
