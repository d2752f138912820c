"""The model zoo: every registered model builds small, trains a step, and declares its parameter groups."""
from __future__ import annotations

import math

import pytest
import timm
import torch

from pipeline.models import create_model, list_models
from pipeline.models.localisation import TrunkLocalisation
from pipeline.models.spatial_transformer import SpatialTransformer, tiling_windows, window_boxes, window_theta

# Small settings per model family: tiny timm test models, small inputs, thin SVHN nets.
SMALL = {
    "nxst_cnn": dict(backbone="test_resnet", input_size=64, crop_size=32, num_streams=2, num_classes=7),
    "cub_baseline": dict(backbone="test_resnet", input_size=32, num_classes=7),
    "svhn_cnn": dict(input_size=64, width=0.125),
    "svhn_st_single": dict(input_size=64, width=0.125),
    "svhn_st_multi": dict(input_size=64, width=0.125),
}
OUR_MODELS = sorted(name for name in list_models() if not name.startswith("digits_"))


def _input(model_kwargs, batch=2, seed=0):
    size = model_kwargs.get("input_size", 64)
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_every_model_has_small_settings():
    assert set(OUR_MODELS) == set(SMALL), "add small test settings for new models to SMALL"


@pytest.mark.parametrize("name", OUR_MODELS)
def test_model_forward_backward_and_groups(name):
    torch.manual_seed(0)
    kwargs = SMALL[name]
    model = create_model(name, **kwargs)
    x = _input(kwargs)
    logits = model(x)
    expected = {"classification": (2, kwargs.get("num_classes", 200)), "sequence": (2, 5, 11)}[model.task]
    assert logits.shape == expected
    assert torch.isfinite(logits).all()
    logits.logsumexp(-1).sum().backward()
    params = list(model.parameters())
    assert all(p.grad is not None for p in params), "a parameter is outside the graph"
    # The parameter groups partition the parameters: each in exactly one group.
    groups = model.parameter_groups()
    grouped = [id(p) for group in groups.values() for p in group]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in params}
    assert all(groups.values()), f"empty group in {list(groups)}"
    assert "head" in groups


@pytest.mark.parametrize("name", [n for n in OUR_MODELS if n in ("nxst_cnn", "svhn_st_single", "svhn_st_multi")])
def test_attend_shapes_and_boxes(name):
    kwargs = SMALL[name]
    model = create_model(name, **kwargs).eval()
    x = _input(kwargs)
    seen = model.attend(x)
    n = model.num_streams
    assert seen["theta"].shape[:2] == (2, n)
    assert seen["boxes"].shape == (2, n, 4)
    assert seen["crops"].shape[:3] == (2, n, 3)
    assert seen["boxes"].abs().max() <= 1.0 + 1e-6


@pytest.mark.parametrize("num_streams", [1, 2, 4])
def test_nxst_init_windows_tile_the_image(num_streams):
    model = create_model("nxst_cnn", backbone="test_resnet", input_size=64, crop_size=32,
                         num_streams=num_streams, num_classes=5)
    boxes = model.attend(_input(SMALL["nxst_cnn"], batch=3))["boxes"]
    expected = window_boxes(window_theta("attention", tiling_windows(num_streams, 0.5).float()), "attention")
    torch.testing.assert_close(boxes, expected.expand_as(boxes), atol=1e-6, rtol=0)
    assert boxes.min() >= -1.0 and boxes.max() <= 1.0
    if num_streams == 2:  # the left and right halves of the middle band: the full width, no overlap
        torch.testing.assert_close(boxes[0], torch.tensor([[-1.0, -0.5, 0.0, 0.5], [0.0, -0.5, 1.0, 0.5]]))


def test_nxst_four_windows_start_on_the_quadrants_exactly():
    """Paper A.5: the 4 x ST-CNN's windows are 'initialised to tile the image plane': at scale 0.5
    of the input, each window is one quadrant (its crop is that quadrant's pixels), their union the image."""
    model = create_model("nxst_cnn", backbone="test_resnet", input_size=64, crop_size=32, num_streams=4,
                         num_classes=5).eval()
    x = _input(SMALL["nxst_cnn"], batch=3)
    seen = model.attend(x)
    quadrants = torch.tensor([[-1.0, -1.0, 0.0, 0.0], [0.0, -1.0, 1.0, 0.0],    # [x0, y0, x1, y1]: top-left, top-right,
                              [-1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0]])     # bottom-left, bottom-right
    torch.testing.assert_close(seen["boxes"], quadrants.expand(3, 4, 4), atol=1e-6, rtol=0)
    for i, (rows, cols) in enumerate([(slice(0, 32), slice(0, 32)), (slice(0, 32), slice(32, 64)),
                                      (slice(32, 64), slice(0, 32)), (slice(32, 64), slice(32, 64))]):
        torch.testing.assert_close(seen["crops"][:, i], x[:, :, rows, cols], atol=1e-5, rtol=0)
    # the tanh bound holds the start strictly inside: the windows can still move either way
    st = model.transformer
    assert st.bound == "tanh" and seen["theta"].abs().max() < st.window_room()


def test_nxst_one_localisation_net_shared_by_all_streams():
    model = create_model("nxst_cnn", backbone="test_resnet", input_size=64, crop_size=32, num_streams=4, num_classes=5)
    transformers = [m for m in model.modules() if isinstance(m, SpatialTransformer)]
    trunks = [m for m in model.modules() if isinstance(m, TrunkLocalisation)]
    assert len(transformers) == 1 and len(trunks) == 1
    assert transformers[0].head.out_features == 4 * 2  # (tx, ty) for each of the 4 streams
    loc_ids = {id(p) for p in model.parameter_groups()["localisation"]}
    assert loc_ids == {id(p) for p in transformers[0].parameters()}
    assert len(model.streams) == 4 and not loc_ids & {id(p) for p in model.streams.parameters()}
    # Every stream's window moves with the one localisation net's output.
    x = _input(SMALL["nxst_cnn"])
    before = model.attend(x)["theta"]
    with torch.no_grad():
        transformers[0].head.weight.normal_(std=0.5)
    after = model.attend(x)["theta"]
    assert ((after - before).abs().flatten(2).amax(-1) > 1e-4).all()


def test_nxst_localisation_sees_downscaled_input_and_gets_gradients():
    model = create_model("nxst_cnn", backbone="test_resnet", input_size=64, crop_size=32, num_streams=2, num_classes=5)
    seen = {}
    model.transformer.localisation.trunk.register_forward_pre_hook(lambda m, args: seen.update(shape=args[0].shape))
    model(_input(SMALL["nxst_cnn"])).sum().backward()
    assert tuple(seen["shape"][-2:]) == (32, 32)  # paper A.5: 448 -> 224 before the localisation net
    assert model.transformer.head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("loc_grid, cells", [(None, 4 * 4), (2, 2 * 2)])
def test_nxst_localisation_fc_reads_the_whole_map_in_place_by_default(loc_grid, cells):
    """Paper A.5 flattens the trunk's last map into the fc layer: at a 256 px input (128 px for the
    trunk) test_resnet's stride-32 map is 4 x 4, and the fc reads its 16 cells as they are, so it
    knows where each feature is. loc_grid=k, the option, average-pools the map to k x k first."""
    model = create_model("nxst_cnn", backbone="test_resnet", input_size=256, crop_size=128, num_streams=2,
                         num_classes=5, loc_grid=loc_grid)
    loc = model.transformer.localisation
    assert loc.fc.in_features == 128 * cells
    seen = {}
    loc.fc.register_forward_pre_hook(lambda m, args: seen.update(fc_input=args[0]))
    x = _input({"input_size": 256})
    model(x)
    with torch.no_grad():
        feature_map = loc.feature_map(x)
    assert feature_map.shape[-2:] == (4, 4)
    expected = feature_map.flatten(1) if loc_grid is None else torch.nn.functional.adaptive_avg_pool2d(
        feature_map, loc_grid).flatten(1)
    torch.testing.assert_close(seen["fc_input"], expected)


@pytest.mark.parametrize("loc_downscale, side", [(1, 64), (4, 16)])
def test_nxst_loc_downscale_sets_what_the_localisation_net_sees(loc_downscale, side):
    model = create_model("nxst_cnn", backbone="test_resnet", input_size=64, crop_size=32, num_streams=2,
                         num_classes=5, loc_downscale=loc_downscale)
    seen = {}
    model.transformer.localisation.trunk.register_forward_pre_hook(lambda m, args: seen.update(shape=args[0].shape))
    model(_input(SMALL["nxst_cnn"]))
    assert tuple(seen["shape"][-2:]) == (side, side)
    with pytest.raises(ValueError, match="loc_downscale=0"):
        create_model("nxst_cnn", backbone="test_resnet", input_size=64, crop_size=32, loc_downscale=0)


def test_finite_difference_theta_estimates_the_gradient_of_a_smooth_loss():
    """Averaged over many samples the estimate is the loss's gradient / n (E[e e^T] = I/n), and the
    backward pass hands it to whatever produced theta."""
    from pipeline.models.spatial_transformer import finite_difference_theta

    torch.manual_seed(0)
    target = torch.tensor([0.3, -0.2])
    source = torch.zeros(4096, 1, 2, requires_grad=True)

    def losses(theta):  # smooth: 0.5 |theta - target|^2 per sample
        return 0.5 * ((theta[:, 0] - target) ** 2).sum(-1)

    theta = finite_difference_theta(source * 1.0, losses, step=0.05)
    assert torch.equal(theta, source)  # the forward value is theta itself
    theta.sum().backward()
    mean = source.grad.mean(0)[0] * len(source)  # undo the 1/B of a mean loss
    assert torch.allclose(mean, (0 - target) / 2, atol=0.03)


def test_finite_differences_along_the_axes_estimate_the_whole_gradient_of_each_window():
    """directions="axes": 2 passes per axis, each window a random sign; another window's effect on
    the sample's loss averages out of a window's estimate."""
    from pipeline.models.spatial_transformer import finite_difference_theta

    torch.manual_seed(0)
    targets = torch.tensor([[0.3, -0.2], [-0.4, 0.1]])
    source = torch.zeros(4096, 2, 2, requires_grad=True)
    calls = []

    def losses(theta):  # two windows, one loss per sample: 0.5 |theta_n - target_n|^2 summed
        calls.append(1)
        return 0.5 * ((theta - targets) ** 2).sum((-1, -2))

    finite_difference_theta(source * 1.0, losses, step=0.05, directions="axes").sum().backward()
    assert len(calls) == 4
    mean = source.grad.mean(0) * len(source)
    assert torch.allclose(mean, 0 - targets, atol=0.03)
    with pytest.raises(ValueError, match="directions='sideways'"):
        finite_difference_theta(source, losses, step=0.05, directions="sideways")


def test_nxst_finite_difference_windows_train_from_the_loss():
    torch.manual_seed(0)
    model = create_model("nxst_cnn", **SMALL["nxst_cnn"], window_gradient="finite_difference", fd_step=0.1)
    assert model.wants_targets and not create_model("nxst_cnn", **SMALL["nxst_cnn"]).wants_targets
    x, y = _input(SMALL["nxst_cnn"], batch=4), torch.tensor([0, 1, 2, 3])
    model.train()
    torch.nn.functional.cross_entropy(model(x, targets=y), y).backward()
    assert model.transformer.head.weight.grad.abs().sum() > 0  # the localisation net gets the estimate
    assert all(p.grad is not None for p in model.streams.parameters())  # the streams learn as usual
    model.eval()
    assert torch.equal(model(x, targets=y), model(x))  # evaluation ignores targets
    with pytest.raises(ValueError, match="window_gradient='slope'"):
        create_model("nxst_cnn", **SMALL["nxst_cnn"], window_gradient="slope")
    with pytest.raises(ValueError, match="fd_directions='diagonal'"):
        create_model("nxst_cnn", **SMALL["nxst_cnn"], window_gradient="finite_difference", fd_directions="diagonal")


def test_nxst_zero_streams_is_the_resized_backbone():
    model = create_model("nxst_cnn", backbone="test_resnet", input_size=64, crop_size=32, num_streams=0, num_classes=5)
    assert set(model.parameter_groups()) == {"backbone", "head"} and model.num_streams == 0
    seen = {}
    model.backbone.register_forward_pre_hook(lambda m, args: seen.update(shape=args[0].shape))
    assert model(_input(SMALL["nxst_cnn"])).shape == (2, 5)
    assert tuple(seen["shape"][-2:]) == (32, 32)


@pytest.mark.parametrize("transform", ["affine", "attention", "projective", "tps"])
def test_nxst_other_transform_kinds(transform):
    model = create_model("nxst_cnn", backbone="test_resnet", input_size=64, crop_size=32, num_streams=2,
                         num_classes=5, transform=transform)
    seen = model.attend(_input(SMALL["nxst_cnn"]))
    expected = window_boxes(window_theta("attention", tiling_windows(2, 0.5).float()), "attention")
    torch.testing.assert_close(seen["boxes"], expected.expand_as(seen["boxes"]), atol=1e-5, rtol=0)


def test_pretrained_weights_from_a_file(tmp_path):
    reference = timm.create_model("test_resnet", num_classes=0)
    path = tmp_path / "test_resnet.pth"
    torch.save(reference.state_dict(), path)
    model = create_model("cub_baseline", backbone="test_resnet", input_size=32, num_classes=3, pretrained=str(path))
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[key], value)
    nxst = create_model("nxst_cnn", backbone="test_resnet", input_size=64, crop_size=32, num_classes=3,
                        pretrained=str(path))
    first = next(iter(reference.state_dict()))
    for module in (nxst.transformer.localisation.trunk, *nxst.streams):
        torch.testing.assert_close(module.state_dict()[first], reference.state_dict()[first])


def test_pretrained_file_of_another_architecture_names_it(tmp_path):
    path = tmp_path / "test_resnet.pth"
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), path)
    with pytest.raises(ValueError, match=r"test_resnet.pth.*'test_efficientnet'") as err:
        create_model("cub_baseline", backbone="test_efficientnet", input_size=32, pretrained=str(path))
    assert "\n" not in str(err.value)


def test_missing_pretrained_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        create_model("cub_baseline", backbone="test_resnet", pretrained=str(tmp_path / "nope.pth"))


def test_svhn_transformers_start_as_identity():
    x = _input(SMALL["svhn_st_multi"])
    seen = create_model("svhn_st_multi", **SMALL["svhn_st_multi"]).eval().attend(x)
    torch.testing.assert_close(seen["crops"], x[:, None].expand_as(seen["crops"]), atol=1e-4, rtol=0)
    torch.testing.assert_close(seen["boxes"], torch.tensor([-1.0, -1.0, 1.0, 1.0]).expand(2, 4, 4))


def test_svhn_multi_boxes_compose_the_transformers():
    model = create_model("svhn_st_multi", **SMALL["svhn_st_multi"]).eval()
    with torch.no_grad():  # transformer 1: half size, right by 0.2; transformer 2: half size, down by 0.4
        model.transformers["0"].head.bias.copy_(torch.tensor([0.5, 0, 0.2, 0, 0.5, 0]))
        model.transformers["1"].head.bias.copy_(torch.tensor([0.5, 0, 0, 0, 0.5, 0.4]))
    boxes = model.attend(_input(SMALL["svhn_st_multi"]))["boxes"][0]
    # p -> A1(A2 p) = 0.5 (0.5 p + (0, 0.4)) + (0.2, 0) = 0.25 p + (0.2, 0.2)
    torch.testing.assert_close(boxes[1], torch.tensor([-0.05, -0.05, 0.45, 0.45]))
    torch.testing.assert_close(boxes[3], boxes[1])  # the later transformers are still the identity


@pytest.mark.parametrize("name", OUR_MODELS)
def test_wrong_input_size_names_the_setting(name):
    model = create_model(name, **SMALL[name])
    size = SMALL[name].get("input_size", 64) + 16
    with pytest.raises(ValueError, match=f"model.input_size={SMALL[name].get('input_size', 64)}"):
        model(torch.zeros(1, 3, size, size))


def test_svhn_rejects_bad_input_size():
    with pytest.raises(ValueError, match="input_size=12"):
        create_model("svhn_cnn", input_size=12)


@pytest.mark.parametrize("name", ["svhn_cnn", "svhn_st_single", "svhn_st_multi"])
def test_svhn_goodfellow_54px_crops(name):
    model = create_model(name, input_size=54, width=0.125)
    assert model(torch.randn(2, 3, 54, 54)).shape == (2, 5, 11)


@pytest.mark.slow
def test_nxst_with_the_paper_backbone_inception_v3():
    # The paper's setting at a reduced size (inception_v3 needs >= 75 px per crop).
    model = create_model("nxst_cnn", backbone="inception_v3", input_size=152, crop_size=76, num_streams=1, num_classes=4)
    logits = model(torch.randn(2, 3, 152, 152))
    logits.sum().backward()
    assert logits.shape == (2, 4)
    assert model.classifier.in_features == 2048


def test_nxst_vmapped_streams_match_the_loop():
    # Fast path (issue 9): the N streams as one vmapped call give the loop's outputs, gradients and
    # batch-norm statistics. In float64 (grouped and single convs sum in other orders; BN backward on
    # a batch of 4 amplifies float32 rounding to ~1e-3): tolerance 1e-9 relative, 1e-10 absolute.
    import copy
    torch.manual_seed(0)
    loop = create_model("nxst_cnn", backbone="test_resnet", input_size=64, crop_size=32, num_streams=3,
                        num_classes=5, dropout=0.0).double()
    fast = copy.deepcopy(loop)
    fast.stream_mode = "vmap"
    with torch.no_grad():  # non-zero head weights so the localisation net gets gradients too
        for model in (loop, fast):
            model.transformer.head.weight.copy_(0.01 * torch.arange(model.transformer.head.weight.numel()).reshape(
                model.transformer.head.weight.shape).sin())
    x = _input(SMALL["nxst_cnn"], batch=4).double()
    out_loop, out_fast = loop(x), fast(x)
    torch.testing.assert_close(out_fast, out_loop, atol=1e-10, rtol=1e-9)
    out_loop.square().sum().backward()
    out_fast.square().sum().backward()
    for (name, p_loop), p_fast in zip(loop.named_parameters(), fast.parameters()):
        torch.testing.assert_close(p_fast.grad, p_loop.grad, atol=1e-10, rtol=1e-9, msg=lambda m: f"{name}: {m}")
    for (name, b_loop), b_fast in zip(loop.named_buffers(), fast.buffers()):
        torch.testing.assert_close(b_fast, b_loop, atol=1e-10, rtol=1e-9, msg=lambda m: f"{name}: {m}")
    assert set(fast.state_dict()) == set(loop.state_dict())
    loop.eval(), fast.eval()
    torch.testing.assert_close(fast(x), loop(x), atol=1e-10, rtol=1e-9)


def test_nxst_vmapped_streams_refuse_sync_batchnorm():
    model = create_model("nxst_cnn", backbone="test_resnet", input_size=64, crop_size=32, num_streams=2,
                         num_classes=5, stream_mode="vmap")
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    with pytest.raises(ValueError, match="stream_mode='vmap'.*sync_bn"):
        model(_input(SMALL["nxst_cnn"]))


def test_model_extra_reaches_the_nxst_model_and_a_wrong_key_is_named():
    from pipeline.config import load_config
    from pipeline.models import build_model
    small = ["model.name=nxst_cnn", "model.backbone=resnet10t", "model.input_size=64", "model.crop_size=32",
             "model.pretrained=null"]
    model = build_model(load_config(None, [*small, "model.extra.stream_mode=vmap"]).model)
    assert model.stream_mode == "vmap"
    with pytest.raises(TypeError, match="stream_mod"):
        build_model(load_config(None, [*small, "model.extra.stream_mod=vmap"]).model)
    with pytest.raises(ValueError, match=r"model\.extra\.width is not an argument of model 'cub_baseline'"):
        build_model(load_config(None, ["model.name=cub_baseline", "model.extra.width=2"]).model)


def test_build_model_refuses_a_set_field_its_model_ignores():
    from pipeline.config import load_config
    from pipeline.models import build_model

    cfg = load_config(None, ["model.name=svhn_cnn", "model.input_size=64", "model.backbone=resnet50",
                             "model.extra.width=0.125"])
    with pytest.raises(ValueError, match="model.backbone='resnet50' has no effect on model 'svhn_cnn'"):
        build_model(cfg.model)
    # a field left at its default is passed over silently, a taken one is used
    cfg = load_config(None, ["model.name=svhn_cnn", "model.input_size=64", "model.extra.width=0.125"])
    assert build_model(cfg.model).input_size == 64


def test_softargmax_head_starts_near_the_tiling_for_every_image_and_keeps_windows_inside():
    model = create_model("nxst_cnn", **{**SMALL["nxst_cnn"], "input_size": 128, "crop_size": 64},
                         loc_head="softargmax", loc_downscale=1)
    head = model.transformer.head
    assert head.cells.shape == (4 * 4, 2)  # test_resnet's stride-32 map of a 128 px input
    seen = model.attend(_input({"input_size": 128}, batch=3))
    start = model.transformer.initial_theta()
    torch.testing.assert_close(seen["theta"], start.expand_as(seen["theta"]), atol=1e-6, rtol=0)
    assert start[0, 0] < -0.1 and start[1, 0] > 0.1 and start[:, 1].abs().max() < 1e-6  # left | right
    assert not hasattr(model.transformer.localisation.fc, "weight")  # no unused fc: DDP would refuse it
    with torch.no_grad():  # whatever the scores, the windows stay inside the image
        head.score.bias.copy_(torch.tensor([1e4, -1e4]))
        head.score.weight.normal_(std=50.0)
    boxes = model.attend(_input({"input_size": 128}, batch=3, seed=1))["boxes"]
    assert boxes.min() >= -1.0 - 1e-6 and boxes.max() <= 1.0 + 1e-6


def test_softargmax_head_finds_a_feature_wherever_it_is():
    """One 1x1 scorer for every cell: a feature that attracts the window in one corner attracts
    it in the opposite corner too (a linear head would have to learn each place on its own)."""
    from pipeline.models.spatial_transformer import SoftArgmaxHead

    head = SoftArgmaxHead(channels=3, map_size=(4, 4), num_windows=1, scale=0.5)
    with torch.no_grad():
        head.score.weight.zero_()
        head.score.weight[0, 2] = 30.0  # channel 2 = "the bird is here"
    for row, col in [(0, 0), (3, 3), (0, 3)]:
        feature_map = torch.zeros(1, 3, 4, 4)
        feature_map[0, 2, row, col] = 1.0
        centre = head(feature_map)[0, 0]
        expected = head.cells[row * 4 + col]
        torch.testing.assert_close(centre, expected, atol=1e-3, rtol=0)
    assert head.cells.abs().max() <= 0.5  # cell centres pulled in by (1 - scale): windows inside the image


def test_calibrated_softargmax_starts_where_the_plain_one_does_and_learns_a_gain_and_an_offset():
    """loc_calibrate: centre = expected place x exp(log_gain) + offset, clamped inside the image."""
    from pipeline.models.spatial_transformer import SoftArgmaxHead

    torch.manual_seed(0)
    plain = SoftArgmaxHead(channels=3, map_size=(4, 4), num_windows=2, scale=0.5, spread=2.0)
    calibrated = SoftArgmaxHead(channels=3, map_size=(4, 4), num_windows=2, scale=0.5, spread=2.0, calibrate=True)
    calibrated.load_state_dict(plain.state_dict(), strict=False)
    feature_map = torch.randn(5, 3, 4, 4)
    with torch.no_grad():
        plain.score.weight.normal_()
        calibrated.score.weight.copy_(plain.score.weight)
    torch.testing.assert_close(calibrated(feature_map), plain(feature_map))  # gain 1, offset 0 at the start
    torch.testing.assert_close(calibrated.initial_centres(), plain.initial_centres())
    with torch.no_grad():
        calibrated.log_gain.fill_(math.log(2.0))
        calibrated.offset[1, 1] = 0.1
    expected = (plain(feature_map) * 2.0 + torch.tensor([[0.0, 0.0], [0.0, 0.1]])).clamp(-0.5, 0.5)
    torch.testing.assert_close(calibrated(feature_map), expected)
    with torch.no_grad():
        calibrated.offset.fill_(5.0)  # far outside: the windows stay inside the image
    assert calibrated(feature_map).max() <= 0.5
    calibrated.offset.data.zero_()
    calibrated(feature_map).sum().backward()
    assert calibrated.log_gain.grad.abs().sum() > 0 and calibrated.offset.grad.abs().sum() > 0
    assert not hasattr(plain, "log_gain") or plain.log_gain is None


def test_softargmax_head_trains_from_finite_differences_and_refuses_other_kinds():
    torch.manual_seed(0)
    model = create_model("nxst_cnn", **SMALL["nxst_cnn"], loc_head="softargmax", loc_downscale=1,
                         window_gradient="finite_difference")  # 64 px: a 2 x 2 map
    x, y = _input(SMALL["nxst_cnn"], batch=4), torch.tensor([0, 1, 2, 3])
    torch.nn.functional.cross_entropy(model(x, targets=y), y).backward()
    head = model.transformer.head
    assert head.score.weight.grad.abs().sum() > 0 and head.prior.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="loc_head='softargmax' predicts translation windows"):
        create_model("nxst_cnn", **SMALL["nxst_cnn"], loc_head="softargmax", transform="attention")
    with pytest.raises(ValueError, match="at least 2 x 2 cells to choose among, got 1 x 1"):
        create_model("nxst_cnn", **SMALL["nxst_cnn"], loc_head="softargmax")  # 32 px for the localisation net
    with pytest.raises(ValueError, match="loc_head='peak'"):
        create_model("nxst_cnn", **SMALL["nxst_cnn"], loc_head="peak")


def test_loc_stride_cuts_the_localisation_trunk_at_a_finer_map():
    kw = dict(SMALL["nxst_cnn"], input_size=128, crop_size=64, loc_head="softargmax", loc_downscale=1)
    assert create_model("nxst_cnn", **kw).transformer.head.cells.shape == (4 * 4, 2)  # stride 32
    fine = create_model("nxst_cnn", **kw, loc_stride=16)
    assert fine.transformer.head.cells.shape == (8 * 8, 2)
    assert fine.attend(_input({"input_size": 128}))["theta"].shape == (2, 2, 2)
    with pytest.raises(ValueError, match="loc_stride=12: 'test_resnet' has feature maps of stride 2, 4, 8, 16, 32"):
        create_model("nxst_cnn", **kw, loc_stride=12)


def test_loc_stride_on_stream_features_stacks_the_finer_stage_and_the_last_map():
    kw = dict(SMALL["nxst_cnn"], input_size=128, crop_size=64, loc_head="softargmax", loc_downscale=1,
              loc_features="stream")
    model = create_model("nxst_cnn", **kw, loc_stride=16)
    stream, x = model.streams[0], _input({"input_size": 128})
    features = model._loc_input(x)
    fine, last = stream.feature_info[3], stream.feature_info[4]
    assert features.shape == (2, fine["num_chs"] + last["num_chs"], 8, 8)
    with torch.no_grad():  # the last map's 4 x 4 cells, each repeated over 2 x 2 of the finer ones
        coarse = stream.eval().forward_features(x)
    torch.testing.assert_close(features[:, fine["num_chs"]:, ::2, ::2], coarse)
    assert model.transformer.head.cells.shape == (8 * 8, 2)
    assert model.attend(x)["theta"].shape == (2, 2, 2)
    with pytest.raises(ValueError, match="loc_stride=12: 'test_resnet' has feature maps of stride"):
        create_model("nxst_cnn", **kw, loc_stride=12)


def test_finite_difference_margin_objective_is_the_true_class_lead(monkeypatch):
    """fd_objective=margin: the windows follow how far the true class leads the best other class
    (negated, to be minimised), a slope that does not vanish once the cross-entropy saturates."""
    from pipeline.models import multistream

    logits = torch.tensor([[5.0, 2.0, 1.0], [0.0, 1.0, 0.5], [1.0, 4.0, 4.0]])
    assert multistream.negative_margin(logits, torch.tensor([0, 0, 2])).tolist() == [-3.0, 1.0, 0.0]
    torch.manual_seed(0)
    model = create_model("nxst_cnn", **SMALL["nxst_cnn"], window_gradient="finite_difference", fd_objective="margin")
    calls = []
    monkeypatch.setattr(multistream, "negative_margin",
                        lambda lg, t: calls.append(len(t)) or multistream.F.cross_entropy(lg, t, reduction="none") * 0)
    x, y = _input(SMALL["nxst_cnn"], batch=4), torch.tensor([0, 1, 2, 3])
    torch.nn.functional.cross_entropy(model.train()(x, targets=y), y).backward()
    assert calls == [4, 4]  # the two perturbed windows of the finite difference, scored by the margin
    assert model.transformer.head.weight.grad.abs().sum() == 0  # a flat objective moves no window
    with pytest.raises(ValueError, match="fd_objective='lead'"):
        create_model("nxst_cnn", **SMALL["nxst_cnn"], fd_objective="lead")


def test_loc_features_stream_reads_the_first_streams_map_without_training_it():
    kw = dict(SMALL["nxst_cnn"], input_size=128, crop_size=64, loc_head="softargmax", loc_downscale=1)
    model = create_model("nxst_cnn", **kw, loc_features="stream").train()
    groups = model.parameter_groups()
    loc_ids = {id(p) for p in groups["localisation"]}
    assert not loc_ids & {id(p) for p in groups["streams"]}  # no weight in two optimiser groups
    assert sum(p.numel() for p in groups["localisation"]) < 20_000  # a 1x1 reduction and the scorer only
    stats = {k: v.clone() for k, v in model.streams[0].state_dict().items() if "running" in k}
    with torch.no_grad():
        model.transformer.head.score.weight.normal_(std=1.0)
    x = _input({"input_size": 128}, batch=2)
    before = model.attend(x)["theta"]
    assert model.streams[0].training  # put back in training mode after its no-grad pass
    assert all(torch.equal(model.streams[0].state_dict()[k], v) for k, v in stats.items())  # BN stats untouched
    with torch.no_grad():  # the windows follow what the first stream's weights see
        next(model.streams[0].parameters()).mul_(-1.0)
    assert not torch.allclose(model.attend(x)["theta"], before)
    y = torch.tensor([0, 1])
    model2 = create_model("nxst_cnn", **kw, loc_features="stream", window_gradient="finite_difference")
    torch.nn.functional.cross_entropy(model2.train()(x, targets=y), y).backward()
    assert model2.transformer.localisation.reduce.weight.grad is not None
    with pytest.raises(ValueError, match="loc_features='stream' needs loc_head='softargmax'"):
        create_model("nxst_cnn", **kw | {"loc_head": "linear"}, loc_features="stream")


def test_a_checkpoint_of_the_pooled_localisation_fc_names_the_setting_that_loads_it(tmp_path):
    from pipeline.train.checkpoint import CheckpointError, load_weights

    old = dict(loc_grid=4, bound="tanh_inside")  # the earlier layout: fc on the map pooled to 4 x 4, inset windows
    before = create_model("nxst_cnn", **SMALL["nxst_cnn"], **old)
    flat = create_model("nxst_cnn", **SMALL["nxst_cnn"])                  # now: the 1 x 1 map of a 32 px trunk input
    with pytest.raises(CheckpointError, match="model.extra.loc_grid=4 model.extra.bound=tanh_inside"):
        load_weights(flat, before.state_dict(), tmp_path / "old.pt", "nxst_cnn")
    again = create_model("nxst_cnn", **SMALL["nxst_cnn"], **old)
    load_weights(again, before.state_dict(), tmp_path / "old.pt", "nxst_cnn")
    x = _input(SMALL["nxst_cnn"])
    theta = again.eval().attend(x)["theta"]
    torch.testing.assert_close(theta, torch.tensor([[-0.25, 0.0], [0.25, 0.0]]).expand_as(theta), atol=1e-6, rtol=0)
    assert again.transformer.window_room() == 0.5   # windows kept inside the image, as they were trained
