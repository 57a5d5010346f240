"""Which layers of a model to read units from, and what shape each layer's units have.

A *layer* is a module of the model, named as in ``model.named_modules()``; its output for one image
is a tensor whose every scalar is a candidate unit. :func:`layer_names` turns a user's selection
into module names:

- a preset: ``"stages"`` (timm's ``feature_info`` modules), ``"blocks"`` (the residual or
  transformer blocks of every stage) or ``"leaves"`` (every module without children that the
  forward pass calls, except Identity / Dropout / DropPath, whose output repeats their input; one
  forward pass on a zero image finds the uncalled ones) or ``"children"`` (the model's top-level
  children, found the same way: CORnet's V1, V2, V4, IT, decoder); ``leaves`` and ``children`` work
  for any module, ``stages`` and ``blocks`` need timm's ``feature_info``;
- ``"@output"``: the model's own output (the root module's);
- or a list of entries, each an exact module name (``"layer1.0"``), a glob (``"layer*.0"``, fnmatch
  on the full dotted name, so ``*`` also crosses dots), a regex prefixed ``"re:"``
  (``"re:blocks\\.\\d+$"``, searched anywhere in the name; anchor with ``^`` and ``$``) or a preset
  name. Preset names win over a module of the same name (ViT has a module called ``blocks``); select
  such a module with a regex (``"re:^blocks$"``).

The result is always in forward (registration) order without duplicates, whatever the order of
the entries. :func:`probe_layers` then runs one forward pass on a zero image to read every layer's
per-image output shape and describes it as a :class:`~core.units.LayerUnits` (shape, dimension
names, prefix tokens): the one layer description that stores, in-memory activations, the engine's
:class:`~core.units.UnitCatalogue` and the result columns all use.
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
import re
from contextlib import contextmanager
from typing import Sequence

import torch
from torch import nn

from .units import LayerUnits

log = logging.getLogger(__name__)

#: the named selections :func:`layer_names` understands
PRESETS = ("blocks", "stages", "leaves", "children")
#: the selection entry (and layer name) of the model's own output (the root module)
OUTPUT = "@output"

_GLOB_CHARS = "*?["
_REGEX_PREFIX = "re:"
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
#: leaf modules whose output equals their input in eval mode (matched by class name, so timm's own
#: DropPath / DropBlock2d / PatchDropout count without importing timm here)
_PASS_THROUGH_NAMES = ("Identity", "DropPath", "DropBlock2d", "PatchDropout", "PatchDropoutWithIndices")
#: leaf modules that always produce NCHW maps, even inside NHWC models (swin, mambaout)
_NCHW_MODULES = (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample)


# ----------------------------------------------------------------------------------------------
# selection
# ----------------------------------------------------------------------------------------------


def layer_names(model: nn.Module, selection, *, input_size: tuple[int, int, int] | None = None) -> list[str]:
    """Module names to hook, in forward (registration) order, no duplicates.

    Args:
        model: a torch module, usually a timm model.
        selection: a preset name (see :data:`PRESETS`), or a list of entries; each entry is an exact
            module name, a glob (``"layer*.0"``, fnmatch on module names), a regex prefixed ``"re:"``
            (``"re:blocks\\.\\d+$"``, ``re.search`` on module names), a preset name, or
            :data:`OUTPUT` (``"@output"``: the model's own output; globs and regexes never match it).
        input_size: (C, H, W) of the forward pass that the ``leaves`` and ``children`` presets run to
            leave out modules that are never called; default the model's pretrained config's.

    Returns:
        The selected module names, ordered as ``model.named_modules()`` lists them (``"@output"`` last).

    Raises:
        ValueError: an unknown preset; an exact name that is not a module (close valid names are
            listed); a glob or regex that matches nothing or does not compile; an empty selection
            or one that resolves to no module (e.g. ``"blocks"`` on a model without blocks).
        TypeError: a selection that is neither a string nor a list of strings.
    """
    modules = _named_modules(model)
    order = {name: i for i, name in enumerate([*modules, OUTPUT])}
    if isinstance(selection, str):
        if selection not in PRESETS:
            raise ValueError(
                f"unknown layer preset {selection!r}; presets are {list(PRESETS)}. To select modules by "
                f"name, glob or 're:' regex, pass a list, e.g. [{selection!r}]"
                + _close_hint(selection, modules)
            )
        entries = [selection]
    else:
        try:
            entries = list(selection)
        except TypeError:
            raise TypeError(
                f"layer selection must be a preset name {list(PRESETS)} or a list of module names, globs "
                f"and 're:' regexes; got {type(selection).__name__} {selection!r}"
            ) from None
    if not entries:
        raise ValueError(
            f"empty layer selection; give a preset {list(PRESETS)} or a list of module names, globs "
            f"('layer*.0') and 're:' regexes"
        )
    chosen: set[str] = set()
    for entry in entries:
        if not isinstance(entry, str):
            raise TypeError(f"layer selection entries must be strings; got {type(entry).__name__} {entry!r}")
        chosen.update(_resolve(model, modules, entry, input_size))
    if not chosen:
        raise ValueError(f"layer selection {entries!r} selects no module of {type(model).__name__}")
    return sorted(chosen, key=order.__getitem__)


def _resolve(model: nn.Module, modules: dict[str, nn.Module], entry: str, input_size=None) -> list[str]:
    """The module names one selection entry stands for (unordered, possibly with duplicates)."""
    kind = type(model).__name__
    if entry == OUTPUT:
        return [OUTPUT]
    if entry in PRESETS:
        names = _PRESET_FUNCTIONS[entry](model, modules, input_size)
        if not names:
            hint = f" (its feature_info modules are {_stages(model, modules)})" if entry == "blocks" else ""
            raise ValueError(
                f"layer preset {entry!r} finds no module in {kind}{hint}; use another preset "
                f"{[p for p in PRESETS if p != entry]} or name the layers (names, globs, 're:' regexes)"
            )
        return names
    return select_names(modules, entry, kind)


def select_names(names, entry: str, owner: str, what: str = "module") -> list[str]:
    """The names one entry stands for: an exact name, a glob (``*?[``) or an ``"re:"`` regex.

    The part of layer selection that needs no model: also used to pick among a store's layers.

    Args:
        names: the names to choose from (module names, or a store's layer names), in order.
        entry: the selection entry.
        owner: what the names belong to, for messages (``"ResNet"``, ``"the store"``).
        what: what a name is, for messages: ``"module"`` (the hint then offers the presets) or
            another word (``"layer"``: a plain list of names).

    Raises:
        ValueError: a regex that does not compile, or an entry that matches no name (close names listed).
    """
    names = list(names)
    if entry.startswith(_REGEX_PREFIX):
        pattern = entry[len(_REGEX_PREFIX):]
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise ValueError(f"layer regex {entry!r} does not compile: {err}") from None
        found = [name for name in names if regex.search(name)]
        if not found:
            raise ValueError(f"layer regex {entry!r} matches no {what} of {owner}"
                             + _close_hint(pattern, names, what))
        return found
    if any(c in entry for c in _GLOB_CHARS):
        found = [name for name in names if fnmatch.fnmatchcase(name, entry)]
        if not found:
            raise ValueError(f"layer glob {entry!r} matches no {what} of {owner}" + _close_hint(entry, names, what))
        return found
    if entry not in names:
        raise ValueError(f"unknown layer {entry!r}: no {what} of {owner} has that name"
                         + _close_hint(entry, names, what))
    return [entry]


def _close_hint(text: str, modules, what: str = "module") -> str:
    """Error-message tail: up to 8 close names (or the top-level ones) and the other syntaxes."""
    close = difflib.get_close_matches(text, list(modules), n=8, cutoff=0.6)
    if close:
        names = f"; close {what} names: {close}"
    else:
        top = [name for name in modules if name and "." not in name]
        names = f"; top-level {what}s: {top[:20]}" + (" ..." if len(top) > 20 else "")
    if what != "module":
        return names + ". Or use a glob ('layer*.0') or a regex ('re:blocks\\.\\d+$')"
    return (
        names + f". Or use a preset {list(PRESETS)}, a glob ('layer*.0'), a regex ('re:blocks\\.\\d+$') or "
        f"{OUTPUT!r} (the model's output)"
    )


def _named_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` for every submodule; the root ('') is left out (it is the whole model)."""
    return {name: module for name, module in model.named_modules() if name}


# ----------------------------------------------------------------------------------------------
# presets
# ----------------------------------------------------------------------------------------------


def _stages(model: nn.Module, modules: dict[str, nn.Module], input_size=None) -> list[str]:
    """timm's ``feature_info`` modules that exist in the model (the root '' left out)."""
    info = getattr(model, "feature_info", None)
    if not info:
        raise ValueError(
            f"{type(model).__name__} has no feature_info, so the presets 'stages' and 'blocks' are "
            f"undefined for it; use 'leaves' or name the layers (names, globs, 're:' regexes)"
        )
    if hasattr(info, "module_name") and callable(info.module_name):  # timm FeatureInfo (features_only)
        names = list(info.module_name())
    else:
        names = [f["module"] for f in info]
    missing = [n for n in names if n and n not in modules]
    if missing:
        log.warning("%s: feature_info names %s are not modules; left out", type(model).__name__, missing)
    return list(dict.fromkeys(n for n in names if n in modules))


def _blocks(model: nn.Module, modules: dict[str, nn.Module], input_size=None) -> list[str]:
    """Residual / transformer blocks, found from timm's ``feature_info`` modules.

    A feature_info module that is a *stage* (see :func:`_stage_blocks`) gives its blocks: a
    ``blocks`` list child (ConvNeXt, Swin, CSPNet, ResNetV2, MaxViT), its own children when it is a
    list of blocks (ResNet ``layerN``, EfficientNet ``blocks.i``, DenseNet ``denseblockN``), a
    numbered series of blocks (RegNet ``sN.b1``...) or its one list child of blocks (NesT). When
    such a stage sits in a Sequential / ModuleList of stages, every stage of that list counts, also
    those feature_info skips (EfficientNet-B0 lists 5 of its 7 stages).

    A feature_info module that is not a stage is a block, or a layer inside one, when it or an
    ancestor is a compound module in a Sequential / ModuleList whose elements are mostly (at least
    half, at least two) of its class (ViT ``blocks.i``; Xception lists ``blocks.0.stack.act3``; DPN
    ``features.conv2_3``); then every element of that class counts (all 12 of Hiera's blocks, of
    which feature_info lists 4). Anything else (a stem activation such as ResNet's ``act1``, a stem
    conv, a final norm or conv) gives no block.
    """
    out: list[str] = []
    for name in _stages(model, modules):
        blocks = _stage_blocks(name, modules)
        if blocks is not None:
            parent = _parent(name)
            if parent and isinstance(modules[parent], _CONTAINERS):
                for child in _children(parent, modules):  # a list of stages: take every stage
                    out.extend(_stage_blocks(child, modules) or [])
            else:
                out.extend(blocks)
            continue
        while name:  # a block, or a layer inside one: the nearest list of such blocks enclosing it
            parent = _parent(name)
            if parent and isinstance(modules[parent], _CONTAINERS) and _has_children(modules[name]):
                kind = type(modules[name])
                siblings = _children(parent, modules)
                same = [c for c in siblings if type(modules[c]) is kind]
                if len(same) >= 2 and 2 * len(same) >= len(siblings):
                    out.extend(same)
                    break
            name = parent
    return list(dict.fromkeys(out))


def _stage_blocks(name: str, modules: dict[str, nn.Module], depth: int = 0) -> list[str] | None:
    """Full names of the blocks of a stage module, or None when the module is not a stage.

    A block is a module with children (a compound module, not a single layer). A stage is, in
    this order of precedence: a module with a ``blocks`` list child holding blocks (its leaves
    left out); a list, or a module with other children too, whose one list child of blocks is a
    stage (NesT ``transformer_encoder``, RDNet); a list of blocks; a module whose children are
    blocks named as a numbered series (RegNet ``b1, b2``).
    """
    module = modules[name]
    children = list(module.named_children())
    blocks = dict(children).get("blocks")
    if isinstance(blocks, _CONTAINERS):
        inner = [f"{name}.blocks.{c}" for c, m in blocks.named_children() if _has_children(m)]
        if inner:  # a few leaves may sit between the blocks (EfficientFormer's Flat)
            return inner
    if depth < 4 and (isinstance(module, _CONTAINERS) or len(children) > 1):
        # one list of blocks among other layers (NesT: pool + transformer_encoder), or inside a list
        lists = [c for c, m in children if isinstance(m, _CONTAINERS) and _all_containers(m)]
        alone = len(children) == 1 or not (isinstance(module, _CONTAINERS) and _all_containers(module))
        if len(lists) == 1 and alone:
            inner = _stage_blocks(f"{name}.{lists[0]}", modules, depth + 1)
            if inner is not None:
                return inner
    if not _all_containers(module):
        return None
    if isinstance(module, _CONTAINERS) or _numbered_series([c for c, _ in children]):
        return _children(name, modules)
    return None


def _numbered_series(names: list[str]) -> bool:
    """Whether names read like ``b1, b2, ...`` or ``denselayer1, ...`` (one prefix, then a number)."""
    matches = [re.fullmatch(r"([A-Za-z_]*?)(\d+)", n) for n in names]
    return bool(names) and all(matches) and len({m.group(1) for m in matches}) == 1


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _children(name: str, modules: dict[str, nn.Module]) -> list[str]:
    return [f"{name}.{child}" for child, _ in modules[name].named_children()]


def _has_children(module: nn.Module) -> bool:
    return next(module.children(), None) is not None


def _all_containers(module: nn.Module) -> bool:
    """Whether ``module`` has children and every child has children (blocks, not single layers)."""
    children = list(module.children())
    return bool(children) and all(_has_children(c) for c in children)


def _leaves(model: nn.Module, modules: dict[str, nn.Module], input_size=None) -> list[str]:
    """Every module without children that a forward pass calls, except pass-through ones.

    Pass-through modules (Identity, Dropout, DropPath) are left out because their output repeats
    their input. Leaves that hold parameters for a parent but are never called themselves (MaxViT's
    ``attn.rel_pos`` with fused attention), or whose output is not a tensor with a per-image axis,
    are found with one forward pass on a zero image at ``input_size`` (default the model's
    pretrained config's, else 224 px) and left out too.
    """
    leaves = [name for name, module in modules.items() if not _has_children(module) and not _passes_through(module)]
    return _called(model, modules, leaves, input_size, "leaves")


def _top_children(model: nn.Module, modules: dict[str, nn.Module], input_size=None) -> list[str]:
    """The model's top-level children (CORnet's V1, V2, V4, IT, decoder) that a forward pass calls
    with a per-image tensor output, except pass-through ones; found as for ``leaves``."""
    children = [name for name, module in model.named_children() if not _passes_through(module)]
    return _called(model, modules, children, input_size, "children")


def _called(model: nn.Module, modules: dict[str, nn.Module], names: list[str], input_size, preset: str) -> list[str]:
    """``names`` without the modules that give no per-image tensor in a forward pass on a zero image."""
    try:
        size = _input_size(model, input_size)
    except ValueError:
        size = (3, 224, 224)
    try:
        outputs, _, _ = _forward_with_hooks(model, {n: modules[n] for n in names}, size)
    except Exception as err:  # noqa: BLE001 - the static list is still a fair answer
        log.warning("%s: forward pass at %s failed (%s); %r not checked for unused modules",
                    type(model).__name__, size, err, preset)
        return names
    dropped = [n for n in names if _first_tensor(outputs.get(n)) is None or _first_tensor(outputs[n]).dim() < 2]
    if dropped:
        log.info("%s: %s without a per-image tensor output in a forward pass left out: %s",
                 type(model).__name__, preset, dropped)
    dropped_set = set(dropped)
    return [n for n in names if n not in dropped_set]


def _passes_through(module: nn.Module) -> bool:
    if isinstance(module, (nn.Identity, nn.modules.dropout._DropoutNd)):
        return True
    kind = type(module).__name__
    return kind in _PASS_THROUGH_NAMES or kind.endswith("Dropout")


_PRESET_FUNCTIONS = {"blocks": _blocks, "stages": _stages, "leaves": _leaves, "children": _top_children}


# ----------------------------------------------------------------------------------------------
# shapes
# ----------------------------------------------------------------------------------------------


def probe_layers(model: nn.Module, names: Sequence[str], input_size: tuple[int, int, int] | None = None
                 ) -> list[LayerUnits]:
    """Per-image output shape of each named layer, from one forward pass on a zero image.

    The model runs in eval mode (its mode is restored afterwards) under ``torch.no_grad`` on a
    (1, C, H, W) batch of zeros on the model's device and dtype, with forward hooks on the layers.
    Tuple / list outputs count by their first element. A module called more than once per forward
    pass reports its last call (as hooks that keep the latest output see it), with a warning. Layers
    whose output a later operation modifies in place (timm ResNets' BatchNorm before an inplace
    ReLU) get a warning too: a hook that keeps a reference and reads it after the forward pass
    would see the modified values.

    Args:
        model: the model (e.g. from :func:`core.extract.create_model`).
        names: module names, e.g. from :func:`layer_names`.
        input_size: (C, H, W) of the preprocessed images; default the model's pretrained config's.

    Dimension names come from :func:`core.units.infer_dims`: rank-3 outputs are channels-last
    (y, x, channel) where the module (or, for modules that are not always NCHW, the model) says its
    output format is NHWC (Swin, MambaOut stages), else (channel, y, x). Token outputs get the
    model's ``num_prefix_tokens`` (ViT's class token, register tokens) as prefix tokens once those
    tokens are in the sequence (its length is the patch count plus them; ViT's ``patch_embed``
    output has none).

    Returns:
        One :class:`~core.units.LayerUnits` per name, in the order given.

    Raises:
        ValueError: an unknown module name, a bad ``input_size``, a layer that produced no output
            during the pass or a non-tensor output, or an output of rank < 2 (no per-image axis).
    """
    names = list(names)
    modules = {**_named_modules(model), OUTPUT: model}
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise ValueError(f"unknown layers {unknown} in {type(model).__name__}" + _close_hint(unknown[0], modules))
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate layer names: {sorted({n for n in names if names.count(n) > 1})}")
    input_size = _input_size(model, input_size)
    patch_tokens = _patch_token_probe(model)
    hooked = {n: modules[n] for n in names}
    if patch_tokens is not None:
        hooked[_PATCH_KEY] = patch_tokens
    outputs, calls, changed = _forward_with_hooks(model, hooked, input_size)
    missing = [n for n in names if n not in outputs]
    if missing:
        raise ValueError(
            f"layers {missing} of {type(model).__name__} produced no output in a forward pass at input size "
            f"{input_size} (modules the forward pass never calls); leave them out of the selection"
        )
    repeated = [n for n in names if calls[n] > 1]
    if repeated:
        log.warning("layers %s run more than once per forward pass; their last output counts", repeated)
    in_place = [n for n in names if n in changed]
    if in_place:
        log.warning(
            "the outputs of layers %s are changed in place later in the forward pass (e.g. by an inplace "
            "ReLU after a BatchNorm); hooks must copy them when called, not after the forward pass", in_place)
    n_prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    n_patches = _patch_count(outputs.get(_PATCH_KEY))
    model_fmt = getattr(model, "output_fmt", None) or "NCHW"
    infos = []
    for name in names:
        out = _first_tensor(outputs[name])
        if out is None:
            raise ValueError(f"layer {name!r} outputs {type(outputs[name]).__name__}, not a tensor; pick another layer")
        if out.dim() < 2:
            raise ValueError(
                f"layer {name!r} outputs shape {tuple(out.shape)} (rank {out.dim()}); a layer needs a batch axis "
                f"and at least one unit axis"
            )
        shape = tuple(int(s) for s in out.shape[1:])
        prefix = 0
        if len(shape) == 2 and n_prefix and shape[0] > n_prefix and (n_patches is None
                                                                     or shape[0] == n_patches + n_prefix):
            prefix = n_prefix
        channels_last = len(shape) == 3 and _is_nhwc(modules[name], model_fmt)
        infos.append(LayerUnits.infer(name, shape, channels_last=channels_last, prefix_tokens=prefix))
    return infos


def _input_size(model: nn.Module, input_size) -> tuple[int, int, int]:
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        input_size = cfg.get("input_size")
        if input_size is None:
            raise ValueError(f"{type(model).__name__} has no pretrained_cfg input_size; pass input_size=(C, H, W)")
    try:
        size = tuple(int(s) for s in input_size)
    except (TypeError, ValueError):
        size = ()
    if len(size) != 3 or min(size) <= 0:
        raise ValueError(f"input_size must be (channels, height, width) of positive ints; got {input_size!r}")
    return size


_PATCH_KEY = "\0patch_embed"  # not a module name: an extra hook counting patch tokens


def _patch_token_probe(model: nn.Module) -> nn.Module | None:
    """The module whose output counts the patch tokens, for models with prefix tokens; else None.

    Token outputs carry the class / register tokens only once they have been prepended, i.e. when
    their length is patches + prefix tokens (ViT's ``patch_embed`` output has 196 tokens, no class
    token; its blocks have 197).
    """
    if not int(getattr(model, "num_prefix_tokens", 0) or 0):
        return None
    patch_embed = getattr(model, "patch_embed", None)
    return patch_embed if isinstance(patch_embed, nn.Module) else None


def _patch_count(output) -> int | None:
    """Patch tokens in a patch embedding's output: (N, P, C) -> P, NHWC (N, H, W, C) -> H * W."""
    out = _first_tensor(output)
    if out is None or out.dim() < 3:
        return None
    n = 1
    for s in out.shape[1:-1]:
        n *= int(s)
    return n


def _first_tensor(output) -> torch.Tensor | None:
    """A hooked output as a tensor: tuples / lists by their first element; None if not a tensor."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    return output if isinstance(output, torch.Tensor) else None


@contextmanager
def eval_mode(model: nn.Module):
    """Every module of ``model`` in eval mode inside the block; each module's own train/eval flag
    restored afterwards, also on errors (a caller may keep some modules, e.g. frozen BatchNorms,
    in a mode that differs from the rest)."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for module, training in modes:
            module.training = training


def _forward_with_hooks(model: nn.Module, hooked: dict[str, nn.Module], input_size: tuple[int, int, int]):
    """Run a zero batch of one image with forward hooks.

    Eval mode and ``torch.no_grad`` (not inference mode, so that tensors keep version counters) on
    the model's device and dtype; every module's train/eval mode is restored and every hook removed
    afterwards, also on errors.

    Returns:
        ``({key: last output}, {key: calls}, {keys whose output a later op changed in place})``.
    """
    outputs: dict[str, object] = {}
    calls: dict[str, int] = {}
    versions: dict[str, int] = {}

    def hook(key):
        def record(_module, _inputs, output):
            outputs[key] = output
            calls[key] = calls.get(key, 0) + 1
            out = _first_tensor(output)
            if out is not None:
                versions[key] = out._version
        return record

    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    handles = [module.register_forward_hook(hook(key)) for key, module in hooked.items()]
    try:
        with eval_mode(model), torch.no_grad():
            model(torch.zeros((1, *input_size), device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
    changed = {k for k, v in versions.items() if _first_tensor(outputs[k])._version != v}
    return outputs, calls, changed


def _is_nhwc(module: nn.Module, model_fmt) -> bool:
    """Whether a rank-4 output is channels-last: the module says so, else the model's output_fmt."""
    fmt = getattr(module, "output_fmt", None)
    if fmt is not None:
        return str(getattr(fmt, "value", fmt)).upper() == "NHWC"
    if isinstance(module, _NCHW_MODULES):
        return False
    return str(getattr(model_fmt, "value", model_fmt)).upper() == "NHWC"
