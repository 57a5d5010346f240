"""Models and in-memory activation extraction with forward hooks.

This is the direct, in-process path: a timm model, its own preprocessing, forward hooks on the
chosen layers, every unit of every chosen layer kept. It serves notebooks, the built-in demo and, as
the reference, the tests of the scaled-out extraction into Zarr stores.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from ._compat import import_timm
from .stimuli import StimulusSet

log = logging.getLogger(__name__)


def create_model(name: str, *, pretrained: bool = False, checkpoint: str | None = None, seed: int = 0):
    """A timm model in eval mode.

    Args:
        name: a timm model name, optionally with a pretrained tag (``resnet50.a1_in1k``).
        pretrained: load the tag's published weights (needs the hub or a local cache).
        checkpoint: a local weights file instead (``timm.create_model(checkpoint_path=...)``).
        seed: seeds the random initialisation (untrained controls are reproducible).

    Raises:
        ValueError: unknown model name (with close matches).
    """
    timm = import_timm()
    base = name.split(".")[0]
    if not timm.is_model(base):
        close = timm.list_models(f"*{base[:4]}*")[:10]
        raise ValueError(f"unknown timm model {name!r}; close names: {close}")
    torch.manual_seed(seed)
    kwargs = {"checkpoint_path": checkpoint} if checkpoint else {}
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    return model.eval()


def stage_layers(model) -> list[str]:
    """Module names of the model's stage outputs, from timm's ``feature_info``."""
    info = getattr(model, "feature_info", None)
    if not info:
        raise ValueError(f"{type(model).__name__} has no feature_info; name the layers explicitly")
    return [f["module"] for f in info]


def preprocess(model, images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) images to a normalized float batch at the model's input size.

    Uses the model's pretrained config (input size, interpolation, mean, std); images are resized
    (shorter side to the crop's size / crop_pct) and center-cropped as timm's eval transform does.
    """
    timm = import_timm()
    from PIL import Image

    cfg = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**cfg, is_training=False)
    return torch.stack([transform(Image.fromarray(im)) for im in images])


def extract_activations(
    model, stimuli: StimulusSet, layers: Sequence[str], *, batch_size: int = 32, dtype=np.float16, device=None
) -> dict[str, np.ndarray]:
    """Every unit of every named layer for every image, in memory.

    Returns:
        ``{layer: (images, *unit_shape)}`` arrays of ``dtype``, in ``layers`` order.

    Raises:
        ValueError: unknown layer names (with the valid names listed).
    """
    modules = dict(model.named_modules())
    unknown = [name for name in layers if name not in modules]
    if unknown:
        valid = [n for n in modules if n]
        raise ValueError(f"unknown layers {unknown} for {type(model).__name__}; valid names include {valid[:40]}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device)
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        modules[name].register_forward_hook(lambda _m, _i, out, name=name: captured.__setitem__(name, out))
        for name in layers
    ]
    out: dict[str, np.ndarray] = {}
    try:
        with torch.inference_mode():
            for start in range(0, len(stimuli), batch_size):
                idx = range(start, min(start + batch_size, len(stimuli)))
                images = np.stack([np.asarray(stimuli.load_image(i)) for i in idx])
                model(preprocess(model, images).to(device))
                for name in layers:
                    act = captured[name]
                    if isinstance(act, (tuple, list)):
                        act = act[0]
                    act = act.detach().to("cpu", torch.float32).numpy().astype(dtype)
                    if name not in out:
                        out[name] = np.empty((len(stimuli),) + act.shape[1:], dtype=dtype)
                    out[name][idx.start:idx.stop] = act
    finally:
        for h in hooks:
            h.remove()
    return out
