"""Rows of docs/models.md's 'paper says / project does' table that no other test pins down."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from pipeline.config import load_config
from pipeline.data import eval_transform, train_augment
from pipeline.models import create_model

REPO = Path(__file__).resolve().parents[1]


def test_cub_view_is_a_random_448_crop_of_the_image_at_512_flipped_half_the_time():
    cfg = load_config(REPO / "configs" / "cub" / "st2_448.yaml")
    image = np.tile(np.linspace(0, 255, 800).astype(np.uint8)[None, :, None], (600, 1, 3))  # dark left, bright right
    augment = train_augment(cfg)
    views = [augment(image=image)["image"] for _ in range(40)]
    assert all(v.shape == (448, 448, 3) for v in views)
    left_darker = [int(v[0, 0, 0]) < int(v[0, -1, 0]) for v in views]
    assert 5 < sum(left_darker) < 35                                  # horizontal flips, p = 0.5
    assert len({int(v[0, 0, 0]) for v in views}) > 5                  # random places
    view, _ = eval_transform(image, (800, 600), cfg)                  # evaluation: the centre 448 of 512 x 683
    assert view.shape == (448, 448, 3) and int(view[0, 0, 0]) < int(view[0, -1, 0])


def test_svhn_cnn_is_goodfellows_eleven_hidden_layers():
    model = create_model("svhn_cnn", input_size=64)
    convs = [m for m in model.convs.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [48, 64, 128, 160, 192, 192, 192, 192]
    assert all(c.kernel_size == (5, 5) and c.stride == (1, 1) and c.padding == (2, 2) for c in convs)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.convs.modules()) == 4
    fcs = [m for m in model.fcs if isinstance(m, nn.Linear)]
    assert [f.out_features for f in fcs] == [3072, 3072, 3072] and len(model.heads) == 5
    assert all(h.out_features == 11 for h in model.heads)                # 10 digits + "no digit"
    # dropout 0.5 on every hidden layer but the first conv
    assert not any(isinstance(m, nn.Dropout) for m in model.convs[0].modules())
    assert all(any(isinstance(m, nn.Dropout) and m.p == 0.5 for m in block.modules()) for block in model.convs[1:])


def test_svhn_st_localisation_nets_are_a4s():
    single = create_model("svhn_st_single", input_size=64)
    loc = single.transformers["0"].localisation
    convs = [m for m in loc.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.padding) for c in convs] == [(32, (5, 5), (2, 2))] * 2
    assert [f.out_features for f in loc.modules() if isinstance(f, nn.Linear)] == [32, 32]
    assert single.transformers["0"].kind == "affine" and list(single.transformers) == ["0"]
    multi = create_model("svhn_st_multi", input_size=64, width=0.125)
    assert list(multi.transformers) == ["0", "1", "2", "3"]              # before each of the first four convs
    for st in multi.transformers.values():
        assert st.kind == "affine"
        assert [f.out_features for f in st.localisation.modules() if isinstance(f, nn.Linear)] == [32, 32]
        assert not any(isinstance(m, nn.Conv2d) for m in st.localisation.modules())
    x = torch.randn(2, 3, 64, 64)
    assert multi(x).shape == (2, 5, 11)
