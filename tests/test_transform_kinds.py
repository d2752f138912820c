"""The transform-kind registry: a new kind is one registered class, used end to end by the config,
`warp`, `SpatialTransformer` and a digits ST-CNN; the choices everywhere come from the registry."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError, load_config
from pipeline.models import build_model
from pipeline.models.spatial_transformer import KINDS, SpatialTransformer, identity_theta, warp, window_boxes
from data_prep.transform_kinds import TRANSFORM_KINDS, TransformKind, transform_kind


class Zoom(TransformKind):
    """A test-only kind: theta (B, 1) = s, an isotropic zoom about the image centre."""

    name = "zoom"

    def theta_shape(self, num_control_points=16):
        return (1,)

    def from_windows(self, windows, num_control_points=16):
        return windows[..., :1].clone()

    def map_points(self, points, theta, scale, basis=None):
        return theta[:, None, :] * points[None]


@pytest.fixture
def zoom():
    TRANSFORM_KINDS.register(Zoom)
    yield transform_kind("zoom")
    TRANSFORM_KINDS.unregister("zoom")


def test_the_registry_holds_the_documented_kinds():
    assert KINDS == TRANSFORM_KINDS.names() == ("affine", "attention", "translation", "projective", "tps")
    assert [k.name for k in TRANSFORM_KINDS if k.window] == ["attention", "translation"]
    assert [k.name for k in TRANSFORM_KINDS if k.affine] == ["affine", "attention", "translation"]
    with pytest.raises(ValueError, match="transform kind 'translation' registered twice"):
        TRANSFORM_KINDS.register(type(transform_kind("translation")))


def test_a_bad_kind_names_the_registered_choices(zoom):
    choices = "affine, attention, translation, projective, tps, zoom"
    with pytest.raises(ConfigError, match=f"model.transform='spiral' is not one of {choices}$"):
        load_config(None, ["model.transform=spiral"])
    with pytest.raises(ValueError, match=f"unknown transform kind 'spiral'; expected one of {choices}$"):
        warp(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1), "spiral", 4)
    with pytest.raises(ValueError, match="bound='tanh' applies to attention and translation windows, not kind 'zoom'"):
        SpatialTransformer(torch.nn.Flatten(), 16, "zoom", 4, bound="tanh")


def test_a_new_kind_is_one_class_end_to_end(zoom):
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(identity_theta("zoom", 2), torch.ones(2, 1))
    torch.testing.assert_close(warp(x, identity_theta("zoom", 2), "zoom", 8), x)
    # a zoom by s is the centred attention window of side s
    half = warp(x, torch.full((2, 1), 0.5), "zoom", 8)
    torch.testing.assert_close(half, warp(x, torch.tensor([[0.5, 0.0, 0.0]] * 2), "attention", 8))
    assert not torch.allclose(half, x)
    torch.testing.assert_close(window_boxes(torch.full((3, 1), 0.5), "zoom"), torch.tensor([[-0.5, -0.5, 0.5, 0.5]] * 3))
    # the config accepts it, the digits ST-CNN takes it (a kind that warps the whole image), and it trains
    cfg = load_config(None, ["model.name=digits_st_cnn", "model.transform=zoom", "model.input_size=28",
                             "model.num_classes=10"])
    model = build_model(cfg.model)
    assert model.transformer.transform_kind is zoom and model.transformer.head.bias.tolist() == [1.0]
    F.cross_entropy(model(torch.rand(2, 1, 28, 28)), torch.tensor([1, 2])).backward()
    assert model.transformer.head.bias.grad is not None


def test_window_models_refuse_warp_kinds_and_the_digits_nets_window_kinds(zoom):
    from pipeline.models import create_model

    with pytest.raises(ValueError, match="transform='attention' is not one of affine, projective, tps, zoom$"):
        create_model("digits_st_cnn", transform="attention")
    with pytest.raises(ValueError, match="model.extra.transform='zoom': expected a window kind: attention and translation"):
        create_model("digits_coloc_st", transform="zoom", feature_checkpoint="random")
