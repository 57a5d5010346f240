"""Layer selection (presets, names, globs, regexes) and output-shape probing on timm models.

Tiny timm test models (random weights) in the default run; full-size architectures, still with
random weights, in the slow run (``pytest -m slow``), where the docs/SCIENCE.md unit counts are checked.
"""

from __future__ import annotations

import fnmatch
import math

import numpy as np
import pytest
import torch
from torch import nn

from unitmatch.core.extract import create_model
from unitmatch.core.layers import OUTPUT, PRESETS, eval_mode, layer_names, probe_layers
from unitmatch.core.units import LayerUnits, UnitCatalogue, infer_dims

PASS_THROUGH = ("Identity", "Dropout", "DropPath", "DropBlock2d", "PatchDropout")


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = create_model(name)
        return cache[name]

    return get


def _leaf_names(model):
    return [n for n, m in model.named_modules() if n and next(m.children(), None) is None]


def _expected_blocks(model, kind):
    """Blocks computed from named_children, independently of core.layers."""
    if kind == "resnet":  # layerN Sequential of blocks
        return [f"{stage}.{child}" for stage, mod in model.named_children() if stage.startswith("layer")
                for child, _ in mod.named_children()]
    if kind == "convnext":  # stages.i.blocks.j
        return [f"stages.{i}.blocks.{j}" for i, stage in model.stages.named_children()
                for j, _ in stage.blocks.named_children()]
    if kind == "vit":  # blocks.i
        return [f"blocks.{i}" for i, _ in model.blocks.named_children()]
    if kind == "efficientnet":  # blocks.i.j
        return [f"blocks.{i}.{j}" for i, stage in model.blocks.named_children() for j, _ in stage.named_children()]
    raise AssertionError(kind)


# ------------------------------------------------------------------------------------------------
# presets on tiny models
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["test_resnet", "test_convnext", "test_vit", "test_efficientnet"])
def test_stages_are_the_feature_info_modules(models, name):
    model = models(name)
    assert layer_names(model, "stages") == [f["module"] for f in model.feature_info]


@pytest.mark.parametrize("name, kind", [("test_resnet", "resnet"), ("test_convnext", "convnext"),
                                        ("test_vit", "vit"), ("test_efficientnet", "efficientnet")])
def test_blocks_follow_the_model_structure(models, name, kind):
    model = models(name)
    blocks = layer_names(model, "blocks")
    assert blocks == _expected_blocks(model, kind)
    assert blocks
    modules = dict(model.named_modules())
    for b in blocks:  # compound modules (blocks), never single layers or the stem activation
        assert next(modules[b].children(), None) is not None, b
    if kind == "resnet":
        assert "act1" in layer_names(model, "stages") and "act1" not in blocks


def test_blocks_include_stages_that_feature_info_skips(models):
    # test_byobnet's feature_info lists stages.0-2 (and stem, final_conv) but the model has stages.3
    model = models("test_byobnet")
    stages = [f["module"] for f in model.feature_info]
    assert "stages.3" not in stages and hasattr(model.stages, "3")
    expected = [f"stages.{i}.{j}" for i, s in model.stages.named_children() for j, _ in s.named_children()]
    assert layer_names(model, "blocks") == expected
    assert "stem" not in layer_names(model, "blocks")


@pytest.mark.parametrize("name", ["test_resnet", "test_convnext", "test_vit"])
def test_leaves_are_childless_modules_without_pass_throughs(models, name):
    model = models(name)
    leaves = layer_names(model, "leaves")
    modules = dict(model.named_modules())
    assert leaves, name
    for n in leaves:
        assert next(modules[n].children(), None) is None, n
        assert not isinstance(modules[n], (nn.Identity, nn.Dropout))
        assert not any(type(modules[n]).__name__.startswith(p) for p in PASS_THROUGH), n
    # independently: every childless module except Identity / Dropout / DropPath (all are called here)
    expected = [n for n in _leaf_names(model) if not type(modules[n]).__name__.startswith(PASS_THROUGH)]
    assert leaves == expected
    dropped = set(_leaf_names(model)) - set(leaves)
    assert dropped and all(type(modules[n]).__name__.startswith(PASS_THROUGH) for n in dropped)


def test_leaves_leave_out_modules_the_forward_pass_never_calls(models):
    model = models("test_maxvit")
    leaves = layer_names(model, "leaves")
    infos = probe_layers(model, leaves)  # would raise for a leaf that produces no output
    assert [i.name for i in infos] == leaves and all(i.size > 0 for i in infos)
    model.unused = nn.Linear(2, 2)  # a parameter holder no forward reaches
    try:
        assert "unused" in _leaf_names(model) and "unused" not in layer_names(model, "leaves")
    finally:
        del model.unused


# ------------------------------------------------------------------------------------------------
# names, globs, regexes
# ------------------------------------------------------------------------------------------------


def test_glob_is_fnmatch_on_full_names_in_forward_order(models):
    model = models("test_resnet")
    expected = [n for n, _ in model.named_modules() if fnmatch.fnmatchcase(n, "layer*.0")]
    got = layer_names(model, ["layer*.0"])
    assert got == expected and got[0] == "layer1.0" and "layer4.0" in got
    assert "layer2.0.downsample.0" in got  # '*' crosses dots, as fnmatch does
    assert layer_names(model, ["layer?.0.conv[12]"]) == [
        f"layer{i}.0.conv{j}" for i in range(1, 5) for j in (1, 2)]


def test_regex_is_searched_and_anchorable(models):
    model = models("test_resnet")
    assert layer_names(model, [r"re:^layer\d\.0$"]) == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    vit = models("test_vit")
    assert layer_names(vit, [r"re:blocks\.\d+$"]) == _expected_blocks(vit, "vit")
    assert layer_names(vit, ["re:attn.qkv"]) == [f"blocks.{i}.attn.qkv" for i in range(len(vit.blocks))]
    # a module named like a preset: the preset wins, a regex reaches the module
    assert layer_names(vit, ["blocks"]) == layer_names(vit, "blocks") != ["blocks"]
    assert layer_names(vit, ["re:^blocks$"]) == ["blocks"]


def test_mixed_entries_come_back_in_forward_order_without_duplicates(models):
    model = models("test_resnet")
    got = layer_names(model, ["fc", "layer2", "stages", "layer2", "re:^layer1\\.0\\.conv1$", "conv1.0", "act1"])
    assert got == ["conv1.0", "act1", "layer1", "layer1.0.conv1", "layer2", "layer3", "layer4", "fc"]
    order = [n for n, _ in model.named_modules()]
    assert got == sorted(set(got), key=order.index)
    assert layer_names(model, ("blocks", "layer*.0")) == layer_names(model, ["layer*.0", "blocks"])
    assert layer_names(model, ["blocks", "stages"]) == sorted(
        set(layer_names(model, "blocks")) | set(layer_names(model, "stages")), key=order.index)


def test_selection_errors_name_the_bad_value_and_the_valid_options(models):
    model = models("test_resnet")
    with pytest.raises(ValueError, match=r"unknown layer preset 'block'.*'blocks', 'stages', 'leaves'"):
        layer_names(model, "block")
    with pytest.raises(ValueError, match=r"unknown layer 'layer1\.O'.*close module names: \['layer1\.0'") as err:
        layer_names(model, ["layer1.O"])
    assert "preset" in str(err.value)
    with pytest.raises(ValueError, match=r"layer glob 'layer9\*' matches no module"):
        layer_names(model, ["layer1.0", "layer9*"])
    with pytest.raises(ValueError, match=r"layer regex 're:\^stage' matches no module.*top-level modules"):
        layer_names(model, ["re:^stage"])
    with pytest.raises(ValueError, match=r"layer regex 're:\(' does not compile"):
        layer_names(model, ["re:("])
    with pytest.raises(ValueError, match="empty layer selection"):
        layer_names(model, [])
    with pytest.raises(TypeError, match="entries must be strings"):
        layer_names(model, ["layer1", 3])
    with pytest.raises(TypeError, match="must be a preset name"):
        layer_names(model, 3)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match="Sequential has no feature_info"):
        layer_names(plain, "blocks")
    assert layer_names(plain, "leaves") == ["0", "1"]
    assert set(PRESETS) == {"blocks", "stages", "leaves", "children"}


class _Areas(nn.Module):
    """A module of one's own (no feature_info): named areas, an unused child, an Identity, a head."""

    def __init__(self):
        super().__init__()
        self.V1 = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU())
        self.skip = nn.Identity()
        self.unused = nn.Linear(3, 3)
        self.IT = nn.Sequential(nn.Conv2d(4, 6, 3), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2))

    def forward(self, x):
        return self.head(self.IT(self.skip(self.V1(x))))


def test_children_preset_and_output_work_for_any_module():
    model = _Areas()
    # top-level children, without pass-throughs and modules the forward pass never calls
    assert layer_names(model, "children", input_size=(3, 24, 24)) == ["V1", "IT", "head"]
    assert [n for n, _ in model.named_children()] == ["V1", "skip", "unused", "IT", "head"]
    # @output is the model's own output: last in order, never matched by globs or regexes
    assert layer_names(model, [OUTPUT, "V1"]) == ["V1", OUTPUT]
    assert OUTPUT not in layer_names(model, ["*"]) and OUTPUT not in layer_names(model, ["re:.*"])
    x = torch.rand(2, 3, 24, 24)
    with torch.no_grad():
        v1, out = model.V1(x), model(x)
    infos = probe_layers(model, ["V1", OUTPUT], (3, 24, 24))
    assert [(i.name, i.shape) for i in infos] == [("V1", tuple(v1.shape[1:])), (OUTPUT, tuple(out.shape[1:]))]
    # leaves: childless, called, not pass-through (skip and unused are left out), at the given input size
    assert layer_names(model, "leaves", input_size=(3, 24, 24)) == ["V1.0", "V1.1", "IT.0", "IT.1", "head.0",
                                                                   "head.1", "head.2"]
    with pytest.raises(ValueError, match=r"unknown layer 'V2'.*'@output' \(the model's output\)"):
        layer_names(model, ["V2"])


def test_output_of_a_timm_model_is_its_logits(models):
    model = models("test_resnet")
    assert layer_names(model, ["layer4", OUTPUT]) == ["layer4", OUTPUT]
    (info,) = probe_layers(model, [OUTPUT], (3, 64, 64))
    assert info.shape == (model.num_classes,) and info.dims == ("channel",)


# ------------------------------------------------------------------------------------------------
# probing shapes
# ------------------------------------------------------------------------------------------------


def test_probe_conv_maps_and_vectors_match_a_direct_forward(models):
    model = models("test_resnet")
    x = torch.zeros(1, 3, 64, 48)
    with torch.inference_mode():
        features = model.forward_features(x)
        logits = model(x)
    infos = probe_layers(model, ["conv1.0", "layer4", "fc"], (3, 64, 48))
    assert [i.name for i in infos] == ["conv1.0", "layer4", "fc"]
    conv, last, fc = infos
    assert conv.dims == last.dims == ("channel", "y", "x") and conv.shape[1:] == (32, 24)
    assert last.shape == tuple(features.shape[1:])
    assert fc.shape == tuple(logits.shape[1:]) == (model.num_classes,) and fc.dims == ("channel",)
    assert all(i.prefix_tokens == 0 for i in infos)
    assert last.size == math.prod(last.shape) and last == LayerUnits("layer4", tuple(features.shape[1:]),
                                                                     ("channel", "y", "x"))


def test_probe_tokens_flag_the_class_token_only_where_it_is(models):
    model = models("test_vit")
    n_patches = (160 // 16) ** 2
    infos = {i.name: i for i in probe_layers(model, ["patch_embed", "blocks.0", "blocks.5.mlp.fc1", "norm",
                                                      "head"], (3, 160, 160))}
    assert infos["blocks.0"].shape == (n_patches + 1, model.embed_dim)
    assert infos["blocks.0"].dims == ("token", "channel") and infos["blocks.0"].prefix_tokens == 1
    assert infos["blocks.5.mlp.fc1"].shape == (n_patches + 1, model.blocks[5].mlp.fc1.out_features)
    assert infos["blocks.5.mlp.fc1"].prefix_tokens == 1 and infos["norm"].prefix_tokens == 1
    patches = infos["patch_embed"]  # before the class token is prepended: no prefix
    assert patches.prefix_tokens == 0 and patches.size == n_patches * model.embed_dim
    if len(patches.shape) == 3:  # dynamic_img_size: PatchEmbed keeps the NHWC grid (output_fmt NHWC)
        assert patches.dims == ("y", "x", "channel") and patches.shape == (10, 10, model.embed_dim)
    else:
        assert patches.dims == ("token", "channel")
    assert infos["head"].dims == ("channel",) and infos["head"].prefix_tokens == 0
    # another input size: other token count, same flag
    (block,) = probe_layers(model, ["blocks.0"], (3, 96, 64))
    assert block.shape == ((96 // 16) * (64 // 16) + 1, model.embed_dim) and block.prefix_tokens == 1


def test_probe_names_channels_last_maps(models):
    model = models("test_mambaout")  # NHWC stages; its convs still run NCHW
    infos = {i.name: i for i in probe_layers(model, ["stem.conv2", "stem.norm2", "stages.0.blocks.0", "stages.3"],
                                              (3, 64, 64))}
    assert infos["stem.conv2"].dims == ("channel", "y", "x") and infos["stem.conv2"].shape == (16, 16, 16)
    assert infos["stem.norm2"].dims == ("y", "x", "channel")
    assert infos["stages.0.blocks.0"].dims == ("y", "x", "channel") and infos["stages.0.blocks.0"].shape[-1] == 16
    assert infos["stages.3"].shape[-1] == model.feature_info[-1]["num_chs"]


def test_probe_restores_mode_removes_hooks_and_defaults_input_size(models):
    model = models("test_convnext")
    model.train()
    try:
        default = probe_layers(model, ["stages.1"])  # the model's pretrained_cfg input size (160 px)
        assert model.training
    finally:
        model.eval()
    assert default[0].shape == (model.feature_info[1]["num_chs"], 160 // 8, 160 // 8)
    assert all(not m._forward_hooks for m in model.modules())


def test_probe_warns_about_outputs_changed_in_place(models, caplog):
    model = models("test_resnet")  # BatchNorm -> ReLU(inplace=True) inside every block
    assert model.layer1[0].act1.inplace
    with caplog.at_level("WARNING", logger="unitmatch.core.layers"):
        probe_layers(model, ["layer1.0.bn1", "layer1.0.conv1", "layer1"], (3, 32, 32))
    (record,) = [r for r in caplog.records if "in place" in r.getMessage()]
    assert "'layer1.0.bn1'" in record.getMessage() and "conv1" not in record.getMessage()
    assert "'layer1'" not in record.getMessage()


def test_probe_errors(models):
    model = models("test_resnet")
    with pytest.raises(ValueError, match=r"unknown layers \['layer9'\]"):
        probe_layers(model, ["layer1", "layer9"], (3, 32, 32))
    with pytest.raises(ValueError, match="input_size must be"):
        probe_layers(model, ["layer1"], (32, 32))
    with pytest.raises(ValueError, match="duplicate layer names"):
        probe_layers(model, ["layer1", "layer1"], (3, 32, 32))

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)
            self.unused = nn.Linear(2, 2)

        def forward(self, x):
            return self.conv(x).sum()

    class Scalar(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Odd()

        def forward(self, x):
            return self.inner(x)

    with pytest.raises(ValueError, match=r"layers \['inner.unused'\] .*produced no output"):
        probe_layers(Scalar(), ["inner.conv", "inner.unused"], (3, 4, 4))
    with pytest.raises(ValueError, match=r"layer 'inner' outputs shape \(\) \(rank 0\)"):
        probe_layers(Scalar(), ["inner"], (3, 4, 4))


def test_probed_layers_make_the_catalogue_that_describes_and_flags_units(models):
    model = models("test_vit")
    infos = probe_layers(model, layer_names(model, ["blocks.0", "head"]), (3, 64, 64))
    cat = UnitCatalogue(infos)
    assert len(cat) == 2 and cat.n_units == sum(i.size for i in infos) == 17 * 64 + 1000
    unit = cat.offset("blocks.0") + 3 * 64 + 5  # token 3, channel 5
    cls = cat.offset("blocks.0") + 63  # token 0 (the class token), channel 63
    rows = cat.describe(np.array([unit, cat.offset("head") + 7, cls, -1]))
    assert rows.layer.tolist()[:3] == ["blocks.0", "head", "blocks.0"] and rows.layer.isna().tolist()[3]
    assert rows.token.tolist() == [3, -1, 0, -1] and rows.channel.tolist() == [5, 7, 63, -1]
    assert rows.prefix_token.dtype == bool and rows.prefix_token.tolist() == [False, False, True, False]
    with pytest.raises(ValueError):
        UnitCatalogue([])


def test_layer_units_validate_their_description():
    normalized = LayerUnits("x", (np.int64(2), 3), ["token", "channel"], 1)  # as read back from JSON / numpy
    assert normalized == LayerUnits("x", (2, 3), ("token", "channel"), 1)
    with pytest.raises(ValueError, match="does not match dims"):
        LayerUnits("x", (2, 3), ("channel",))
    with pytest.raises(ValueError, match="needs a 'token' axis"):
        LayerUnits("x", (2,), ("channel",), prefix_tokens=1)
    with pytest.raises(ValueError, match="prefix_tokens=3 exceeds its 2 tokens"):
        LayerUnits("x", (2, 5), ("token", "channel"), prefix_tokens=3)
    with pytest.raises(ValueError, match="non-negative integer; got -1"):
        LayerUnits("x", (2, 5), ("token", "channel"), prefix_tokens=-1)
    with pytest.raises(ValueError, match="distinct"):
        LayerUnits("x", (2, 5), ("channel", "channel"))
    with pytest.raises(ValueError, match=r"positive integers; got \(0, 5\)"):
        LayerUnits("x", (0, 5), ("token", "channel"))
    # dimension names come from one place
    assert infer_dims((4, 5, 6)) == ("channel", "y", "x")
    assert infer_dims((4, 5, 6), channels_last=True) == ("y", "x", "channel")
    assert infer_dims((7,)) == ("channel",) and infer_dims((3, 7)) == ("token", "channel")
    assert infer_dims((1, 2, 3, 4)) == ("d0", "d1", "d2", "d3")
    layer = LayerUnits.infer("blocks.0", (5, 8), prefix_tokens=1)
    assert LayerUnits.from_attrs(layer.as_attrs()) == layer


def test_eval_mode_restores_each_modules_own_mode(models):
    model = models("test_resnet")
    model.train()
    model.bn1.eval()  # a caller's frozen BatchNorm
    try:
        with eval_mode(model):
            assert not any(m.training for m in model.modules())
        assert model.training and model.layer1.training and not model.bn1.training
    finally:
        model.eval()


# ------------------------------------------------------------------------------------------------
# full-size architectures (random weights): block lists and the docs/SCIENCE.md unit counts
# ------------------------------------------------------------------------------------------------


def _units(model, selection, size=224):
    return sum(i.size for i in probe_layers(model, layer_names(model, selection), (3, size, size)))


@pytest.mark.slow
def test_full_size_block_lists_and_unit_counts():
    resnet18 = create_model("resnet18")
    blocks = layer_names(resnet18, "blocks")
    assert blocks == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert _units(resnet18, "blocks") == 752_640 and abs(752_640 / 0.75e6 - 1) < 0.01

    resnet50 = create_model("resnet50")
    blocks = layer_names(resnet50, "blocks")
    assert len(blocks) == 16 and blocks == _expected_blocks(resnet50, "resnet") and "layer1.0" in blocks
    (layer1_0,) = probe_layers(resnet50, ["layer1.0"], (3, 224, 224))
    assert layer1_0.shape == (256, 56, 56) and layer1_0.size == 802_816
    assert round(_units(resnet50, "blocks") / 1e6, 1) == 5.5

    convnext = create_model("convnext_tiny")
    blocks = layer_names(convnext, "blocks")
    assert len(blocks) == 18 and blocks == _expected_blocks(convnext, "convnext")
    assert round(_units(convnext, "blocks") / 1e6, 1) == 2.1

    vit = create_model("vit_small_patch16_224")
    blocks = layer_names(vit, "blocks")
    assert blocks == [f"blocks.{i}" for i in range(12)]
    infos = probe_layers(vit, blocks, (3, 224, 224))
    assert all(i.shape == (197, 384) and i.dims == ("token", "channel") and i.prefix_tokens == 1 for i in infos)
    assert round(sum(i.size for i in infos) / 1e6, 2) == 0.91

    effnet = create_model("efficientnet_b0")
    blocks = layer_names(effnet, "blocks")
    assert blocks == _expected_blocks(effnet, "efficientnet") and len(blocks) == 16
    assert len(layer_names(effnet, "stages")) == 5  # feature_info skips stages 3 and 5; blocks do not


@pytest.mark.slow
@pytest.mark.parametrize("name, table_millions", [("resnet18", 9.0), ("resnet50", 34.8),
                                                  ("vit_small_patch16_224", 29.5), ("convnext_tiny", 48.9)])
def test_leaf_units_against_the_science_table(name, table_millions):
    """docs/SCIENCE.md's leaf counts include Identity / Dropout / DropPath outputs; 'leaves' leaves them out."""
    model = create_model(name)
    modules = dict(model.named_modules())
    sizes: dict[str, int] = {}
    hooks = [modules[n].register_forward_hook(lambda _m, _i, out, n=n: sizes.__setitem__(n, out[0].numel()))
             for n in _leaf_names(model)]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, 224, 224))
    finally:
        for h in hooks:
            h.remove()
    assert round(sum(sizes.values()) / 1e6, 1) == table_millions  # every leaf the forward pass calls
    leaves = layer_names(model, "leaves")
    assert leaves == [n for n in _leaf_names(model)
                      if n in sizes and not type(modules[n]).__name__.startswith(PASS_THROUGH)]
    assert _units(model, "leaves") == sum(sizes[n] for n in leaves) < sum(sizes.values())


@pytest.mark.slow
@pytest.mark.parametrize("name, n_blocks, kind", [
    ("swin_tiny_patch4_window7_224", 12, "SwinTransformerBlock"),
    ("regnetx_002", 13, "Bottleneck"),
    ("densenet121", 58, "DenseLayer"),
    ("deit_tiny_patch16_224", 12, "Block"),
    ("resnetv2_50", 16, "PreActBottleneck"),
    ("mobilenetv3_small_100", 12, None),
])
def test_blocks_on_other_families(name, n_blocks, kind):
    model = create_model(name)
    blocks = layer_names(model, "blocks")
    modules = dict(model.named_modules())
    assert len(blocks) == n_blocks
    if kind:
        assert {type(modules[b]).__name__ for b in blocks} == {kind}
    infos = probe_layers(model, blocks, (3, 224, 224))
    if name.startswith("swin"):
        assert all(i.dims == ("y", "x", "channel") for i in infos)
