"""Models that are not timm models: a factory (any importable callable returning a ``torch.nn.Module``),
an optional local weights file, and the preprocessing they declare.

A factory is named as ``"package.module:callable"`` (imported from ``sys.path``) or
``"path/to/file.py:callable"`` (a Python file, loaded under a module name derived from its absolute
path, so two files with the same name do not collide). :class:`core.extract.ModelSpec` holds the
factory, its keyword arguments, the weights file and the preprocessing; what travels to Ray workers
is the spec, and each worker imports the factory itself (:func:`resolve_factory`).

Identity (:func:`source_sha256`, :func:`module_digest`): a factory model's store identity includes the
sha256 of the file that defines the callable, so editing the model's code makes a new store. Code the
factory imports from other files is not hashed.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import numbers
import sys
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

#: weights file suffixes :func:`load_weights` reads
WEIGHTS_SUFFIXES = (".pt", ".pth", ".safetensors")
#: channel orders of a model's input (images are decoded as RGB; BGR reverses the channels)
CHANNEL_ORDERS = ("RGB", "BGR")
#: interpolations timm's eval transform understands
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


def _split(factory: str) -> tuple[str, str]:
    if not isinstance(factory, str) or factory.count(":") < 1:
        raise ValueError(f"factory={factory!r}: expected 'package.module:callable' or 'path/to/file.py:callable'")
    where, _, attr = factory.rpartition(":")
    if not where or not attr or not all(part.isidentifier() for part in attr.split(".")):
        raise ValueError(f"factory={factory!r}: expected 'package.module:callable' or 'path/to/file.py:callable' "
                         f"(the part after the last ':' must be a Python name, e.g. 'my_models:make_net')")
    return where, attr


def absolute_factory(factory: str) -> str:
    """``factory`` with a file path made absolute (a relative one is relative to the current folder)."""
    where, attr = _split(factory)
    if where.endswith(".py"):
        return f"{Path(where).expanduser().resolve()}:{attr}"
    return factory


def _file_module(path: Path):
    """The module of a Python file, under a name derived from its absolute path; loaded again when the
    file's content changed (so that the code that runs is the code whose sha256 the identity holds)."""
    from .store import file_sha256

    name = "unitmatch_factory_" + hashlib.sha256(str(path).encode()).hexdigest()[:12] + "_" + (
        "".join(c if c.isalnum() else "_" for c in path.stem))
    sha = file_sha256(path)
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__unitmatch_sha256__", None) == sha:
        return loaded
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    module.__unitmatch_sha256__ = sha
    sys.modules[name] = module  # before executing: dataclasses and pickling look the module up
    try:
        spec.loader.exec_module(module)
    except BaseException:
        if loaded is not None:
            sys.modules[name] = loaded
        else:
            del sys.modules[name]
        raise
    return module


def resolve_factory(factory: str) -> Callable:
    """The callable a factory string names, imported in this process.

    Raises:
        ValueError: malformed string; the module or file cannot be imported (the module path, the
            file or the ``sys.path`` folders tried, and the import error, are named); no such
            attribute (the module's public names listed); the attribute is not callable.
    """
    where, attr = _split(factory)
    if where.endswith(".py"):
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"factory={factory!r}: no Python file {str(path)!r} (relative paths are relative to "
                             f"the current folder, {str(Path.cwd())!r})")
        try:
            module = _file_module(path)
        except Exception as err:  # noqa: BLE001 - any error while executing the user's file
            raise ValueError(f"factory={factory!r}: executing {str(path)!r} failed: "
                             f"{type(err).__name__}: {err}") from err
    else:
        try:
            module = importlib.import_module(where)
        except Exception as err:  # noqa: BLE001 - ImportError, or any error while importing the module
            raise ValueError(
                f"factory={factory!r}: cannot import module {where!r} ({type(err).__name__}: {err}); tried the "
                f"sys.path folders {sys.path}. Put its folder on PYTHONPATH (on Ray: a shared filesystem, or "
                f"cluster.runtime_env py_modules / working_dir), or name a file: 'path/to/file.py:{attr}'"
            ) from err
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n in vars(module) if not n.startswith("_"))
            raise ValueError(f"factory={factory!r}: {getattr(module, '__file__', where)!r} has no attribute {attr!r}; "
                             f"its names: {names[:30]}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"factory={factory!r} is a {type(obj).__name__}, not callable; name a function or class "
                         f"that returns a torch.nn.Module")
    return obj


def source_file(fn: Callable) -> Path | None:
    """The file that defines ``fn`` (None for builtins)."""
    try:
        path = inspect.getsourcefile(inspect.unwrap(fn))
    except TypeError:
        return None
    return Path(path) if path else None


def source_sha256(fn: Callable) -> str:
    """sha256 of the file that defines ``fn`` ("none" where it has no source file)."""
    from .store import file_sha256

    path = source_file(fn)
    return file_sha256(path) if path is not None and path.is_file() else "none"


def kwargs_items(kwargs: Mapping | None) -> tuple[tuple[str, str], ...]:
    """Keyword arguments as a sorted tuple of ``(name, JSON value)`` pairs: hashable and canonical.

    Raises:
        ValueError: not a mapping, a name that is not a Python name, or a value JSON cannot hold.
    """
    if kwargs is None:
        return ()
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"kwargs must be a mapping of argument names to values; got {type(kwargs).__name__} "
                         f"{kwargs!r}")
    out = {}
    for key, value in kwargs.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise ValueError(f"kwargs: argument names must be Python names; got {key!r}")
        try:
            out[key] = json.dumps(value, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ValueError(f"kwargs.{key}={value!r}: factory arguments must be JSON values (numbers, strings, "
                             f"booleans, null, lists, mappings): {err}") from None
    return tuple(sorted(out.items()))


def check_module(obj, factory: str) -> nn.Module:
    if not isinstance(obj, nn.Module):
        raise ValueError(f"factory={factory!r} returned a {type(obj).__module__}.{type(obj).__qualname__}, not a "
                         f"torch.nn.Module")
    return obj


def load_weights(module: nn.Module, path: str) -> None:
    """Load a state dict file (``.pt`` / ``.pth`` / ``.safetensors``) into ``module``, strictly.

    A file that holds ``{"state_dict": ...}`` or ``{"model": ...}`` (a training checkpoint) is read
    from that entry.

    Raises:
        ValueError: no such file, an unknown suffix, a file that is not a state dict, missing or
            unexpected keys (both lists given) or a shape mismatch.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"checkpoint={path!r}: no such weights file")
    if p.suffix not in WEIGHTS_SUFFIXES:
        raise ValueError(f"checkpoint={path!r}: a weights file must be one of {list(WEIGHTS_SUFFIXES)}; got {p.suffix!r}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - pickles that are not plain state dicts
            raise ValueError(f"checkpoint={path!r}: not a loadable state dict ({type(err).__name__}: {err})") from None
    for entry in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(entry), dict):
            state = state[entry]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint={path!r}: not a state dict (a mapping of parameter names to tensors)")
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"checkpoint={path!r} does not match {type(module).__qualname__}: missing keys {missing}; "
                         f"unexpected keys {unexpected}")
    shapes = [f"{k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
              for k in own if tuple(state[k].shape) != tuple(own[k].shape)]
    if shapes:
        raise ValueError(f"checkpoint={path!r} does not match {type(module).__qualname__}: shapes differ: {shapes}")
    module.load_state_dict(state, strict=True)


def module_digest(module: nn.Module) -> str:
    """sha256 of a ready module: its class (qualified name and source file) and its state dict.

    Parameters and buffers are hashed by name, dtype, shape and bytes; two modules with equal
    digests compute the same function unless their ``forward`` code changed in a file other than
    the class's own.
    """
    h = hashlib.sha256()
    kind = type(module)
    h.update(f"{kind.__module__}.{kind.__qualname__}\0{source_sha256(kind)}\0".encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim too
    return h.hexdigest()


def check_preprocessing(input_size, crop_pct, interpolation, mean, std, channel_order=None) -> None:
    """Declared preprocessing of a model without a pretrained config.

    Raises:
        ValueError: a missing ``input_size``/``mean``/``std``, sizes that are not positive, 3 channels
            (images are RGB), mean/std not one value per channel, std <= 0, crop_pct outside (0, 1],
            an unknown interpolation.
    """
    missing = [k for k, v in (("input_size", input_size), ("mean", mean), ("std", std)) if v is None]
    if missing:
        raise ValueError(f"{missing} not set: a factory model has no pretrained config, so declare input_size "
                         f"[3, H, W], mean and std (per channel, on the 0-1 pixel scale; e.g. ImageNet's "
                         f"mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225])")
    check_overrides(input_size, crop_pct, interpolation, mean, std, channel_order)


def check_overrides(input_size, crop_pct, interpolation, mean, std, channel_order=None) -> None:
    """Whatever of the preprocessing is given is consistent (see :func:`check_preprocessing`)."""
    if input_size is not None:
        size = tuple(input_size)
        if (len(size) != 3 or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in size)
                or min(size) <= 0 or size[0] != 3):
            raise ValueError(f"input_size={list(size)!r}: expected [3, height, width] with positive heights and "
                             f"widths (images are RGB, 3 channels)")
    for key, value in (("mean", mean), ("std", std)):
        if value is None:
            continue
        values = tuple(value)
        if len(values) != 3 or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
                                       for v in values):
            raise ValueError(f"{key}={list(values)!r}: expected 3 finite numbers, one per channel (R, G, B), on the "
                             f"0-1 pixel scale")
        if key == "std" and min(values) <= 0:
            raise ValueError(f"std={list(values)!r}: every std must be > 0 (0-255 inputs without scaling: "
                             f"std = 1/255)")
    if crop_pct is not None and not (isinstance(crop_pct, (int, float)) and 0 < crop_pct <= 1):
        raise ValueError(f"crop_pct={crop_pct!r}: expected 0 < crop_pct <= 1 (1: resize to the input size, "
                         f"0.875: resize to input/0.875 and center-crop)")
    if channel_order is not None and channel_order not in CHANNEL_ORDERS:
        raise ValueError(f"channel_order={channel_order!r}: expected one of {list(CHANNEL_ORDERS)} (mean and std are "
                         f"given in that order)")
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r}: expected one of {list(INTERPOLATIONS)}")
