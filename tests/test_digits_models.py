"""Paper A.3 models: FCN, CNN, ST-FCN, ST-CNN (affine / projective / TPS) at about 400k parameters."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.models import create_model, list_models
from pipeline.models.digits import TARGET_PARAMS, count_params

# (input size, pooling after the transformer) of each experiment: R/P/E, RTS, TC
EXPERIMENTS = {"R,P,E": (28, False), "RTS": (42, True), "TC": (60, True)}
NAMES = ("digits_fcn", "digits_cnn", "digits_st_fcn", "digits_st_cnn")


def experiment_models(input_size: int, pooled: bool):
    for name in NAMES:
        if "_st_" in name:
            for transform in ("affine", "projective", "tps"):
                yield f"{name}/{transform}", create_model(name, input_size=input_size, transform=transform,
                                                          pool_after_st=pooled)
        else:
            yield name, create_model(name, input_size=input_size)


def test_registered():
    assert set(NAMES) <= set(list_models())


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_parameter_counts_match_within_ten_percent(experiment):
    counts = {name: count_params(m) for name, m in experiment_models(*EXPERIMENTS[experiment])}
    assert len(counts) == 8
    low, high = min(counts.values()), max(counts.values())
    assert high <= 1.1 * low, counts
    assert all(abs(c - TARGET_PARAMS) <= 0.05 * TARGET_PARAMS for c in counts.values()), counts


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_forward_groups_and_attention(experiment):
    size, pooled = EXPERIMENTS[experiment]
    x = torch.rand(3, 1, size, size)
    for name, model in experiment_models(size, pooled):
        assert model.task == "classification"
        assert model(x).shape == (3, 10), name
        groups = model.parameter_groups()
        ids = [id(p) for params in groups.values() for p in params]
        assert len(ids) == len(set(ids)) == len(list(model.parameters())), name  # a partition
        if "_st_" not in name:
            assert set(groups) == {"backbone", "head"}
            continue
        assert set(groups) == {"localisation", "backbone", "head"} and model.num_streams == 1
        got = model.attend(x)
        assert got["crops"].shape == (3, 1, 1, size, size) and got["boxes"].shape == (3, 1, 4)
        # Identity initialisation: the transformer starts by passing the image through unchanged.
        torch.testing.assert_close(got["crops"][:, 0], x, atol=1e-5, rtol=0)
        torch.testing.assert_close(got["boxes"][:, 0], torch.tensor([[-1.0, -1.0, 1.0, 1.0]]).expand(3, 4),
                                   atol=1e-5, rtol=0)


def test_pooling_after_the_transformer_halves_what_the_classifier_sees():
    pooled = create_model("digits_st_fcn", input_size=42, transform="affine", pool_after_st=True)
    full = create_model("digits_st_fcn", input_size=42, transform="affine", pool_after_st=False)
    assert pooled.features[1].in_features == 21 * 21 and full.features[1].in_features == 42 * 42


def test_localisation_gets_gradients_through_the_sampler():
    torch.manual_seed(0)
    model = create_model("digits_st_cnn", input_size=28, transform="tps")
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    F.cross_entropy(model(x), y).backward()
    head = model.transformer.head
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    # The head's zero weights block the path to the localisation net at first ...
    assert all(float(p.grad.abs().sum()) == 0 for p in model.transformer.localisation.parameters())
    # ... so only the head moves; one SGD step then changes theta ...
    before = model.attend(x)["theta"]
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not torch.allclose(model.attend(x)["theta"], before)
    # ... and from then on every localisation parameter gets a gradient through the sampler.
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert all(float(p.grad.abs().sum()) > 0 for p in model.transformer.localisation.parameters())


def test_explicit_width_and_bad_arguments():
    assert create_model("digits_fcn", width=64).features[1].out_features == 64
    with pytest.raises(ValueError, match="transform='attention'"):
        create_model("digits_st_cnn", transform="attention")
    with pytest.raises(ValueError, match="input_size=20 is too small"):
        create_model("digits_st_cnn", input_size=20, pool_after_st=True)
    with pytest.raises(ValueError, match="attend"):
        create_model("digits_cnn").attend(torch.zeros(1, 1, 28, 28))


@pytest.mark.parametrize("size, side", [(28, 1), (42, 4), (60, 9)])
def test_st_cnn_localisation_is_paper_a3_at_28_42_60(size, side):
    """On the 2x-downsampled input: conv 5x5 (20, unpadded) - max 2 - conv 5x5 (20, unpadded) - FC 20."""
    from pipeline.models.digits import cnn_localisation

    net = cnn_localisation(size)
    convs = [m for m in net if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.padding) for c in convs] == [(20, (5, 5), (0, 0))] * 2
    x = torch.rand(3, 1, size, size)
    assert net[:-3](x).shape == (3, 20, side, side)  # the map before flatten and FC
    assert net(x).shape == (3, 20)
    model = create_model("digits_st_cnn", input_size=size, transform="affine")
    assert model(x).shape == (3, 10)
    with pytest.raises(ValueError, match="input_size=26 is too small for the ST-CNN localisation net"):
        cnn_localisation(26)
