"""Models and in-memory activation extraction with forward hooks.

This is the direct, in-process path: a timm model, its own preprocessing, forward hooks on the
chosen layers, every unit of every chosen layer kept. It serves notebooks, the built-in demo and, as
the reference, the tests of the scaled-out extraction into Zarr stores.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from ._compat import import_timm
from .stimuli import StimulusSet

if TYPE_CHECKING:
    from .store import ActivationStore

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


def eval_transform(cfg: dict):
    """timm's eval transform (resize, center crop, to tensor, normalize) for a data config."""
    timm = import_timm()
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    return timm.data.create_transform(**args, is_training=False)


def preprocess(model, images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) images to a normalized float batch at the model's input size.

    Uses the model's pretrained config (input size, interpolation, mean, std); images are resized
    (shorter side to the crop's size / crop_pct) and center-cropped as timm's eval transform does.
    """
    timm = import_timm()
    from PIL import Image

    transform = eval_transform(timm.data.resolve_data_config({}, model=model))
    return torch.stack([transform(Image.fromarray(im)) for im in images])


def _capture(captured: dict, name: str, dtype: torch.dtype):
    """A forward hook storing a copy of the module's output in ``dtype`` (on its device).

    The copy is taken inside the hook: later in-place operations (timm's ``ReLU(inplace=True)``
    after a BatchNorm) would otherwise change what was recorded.
    """
    def hook(_module, _inputs, out):
        if isinstance(out, (tuple, list)):
            out = out[0]
        captured[name] = out.detach().to(dtype, copy=True)
    return hook


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
    hooks = [modules[name].register_forward_hook(_capture(captured, name, torch.float32)) for name in layers]
    out: dict[str, np.ndarray] = {}
    try:
        with torch.inference_mode():
            for start in range(0, len(stimuli), batch_size):
                idx = range(start, min(start + batch_size, len(stimuli)))
                images = np.stack([np.asarray(stimuli.load_image(i)) for i in idx])
                model(preprocess(model, images).to(device))
                for name in layers:
                    act = captured[name].to("cpu").numpy().astype(dtype)
                    if name not in out:
                        out[name] = np.empty((len(stimuli),) + act.shape[1:], dtype=dtype)
                    out[name][idx.start:idx.stop] = act
    finally:
        for h in hooks:
            h.remove()
    return out


# ---------------------------------------------------------------------------------------------------
# Models as identities, and extraction into activation stores
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """A model and its preprocessing, as an identity.

    Attributes:
        name: timm model name, with a pretrained tag when ``pretrained`` (``resnet50.a1_in1k``).
        pretrained: load the tag's published weights.
        checkpoint: a local weights file instead (its sha256 enters the identity).
        seed: random initialisation seed (untrained controls).
        input_size, crop_pct, interpolation, mean, std: overrides of the model's pretrained config.
    """

    name: str
    pretrained: bool = False
    checkpoint: str | None = None
    seed: int = 0
    input_size: tuple[int, int, int] | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def identity(self) -> str:
        if self.checkpoint:
            from .store import file_sha256

            return f"{self.name}@sha256:{file_sha256(self.checkpoint)}"
        if self.pretrained:
            return self.name
        return f"{self.name}@random:{self.seed}"

    def create(self):
        return create_model(self.name, pretrained=self.pretrained, checkpoint=self.checkpoint, seed=self.seed)

    def data_config(self, model) -> dict:
        """The preprocessing actually used: the model's pretrained config with the overrides applied."""
        timm = import_timm()
        overrides = {k: v for k, v in (("input_size", self.input_size), ("crop_pct", self.crop_pct),
                                       ("interpolation", self.interpolation), ("mean", self.mean),
                                       ("std", self.std)) if v is not None}
        cfg = timm.data.resolve_data_config(overrides, model=model)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(cfg.items())}


@dataclass
class ExtractionReport:
    """What one call of :func:`extract_to_store` did."""

    store: "ActivationStore"
    written: list[int]
    skipped: int
    seconds: float


class _Batches(torch.utils.data.Dataset):
    """Decodes (Pillow) and transforms one image batch per item, so DataLoader workers can do it."""

    def __init__(self, stimuli: StimulusSet, batches: list[int], batch_size: int, transform):
        self.stimuli, self.batches, self.batch_size, self.transform = stimuli, batches, batch_size, transform

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        b = self.batches[i]
        idx = range(b * self.batch_size, min((b + 1) * self.batch_size, len(self.stimuli)))
        return b, torch.stack([self.transform(self.stimuli.load_image(k)) for k in idx])


def extract_to_store(spec: ModelSpec, stimuli: StimulusSet, selection, root, *, batch_size: int = 32,
                     dtype: str = "float16", device=None, batches: Sequence[int] | None = None,
                     num_workers: int = 0, model=None, compression_level: int | None = 1,
                     progress: bool = False) -> ExtractionReport:
    """Extract every unit of the selected layers into the store for this identity; resume if present.

    Args:
        spec: the model and its preprocessing.
        stimuli: the images.
        selection: layers: a preset ("blocks", "stages", "leaves"), or names / globs / "re:" regexes.
        root: folder of stores.
        batch_size: images per forward pass and per store chunk row.
        dtype: "float16" (default) or "float32".
        device: torch device (default cuda when available).
        batches: only these image batches (a shard, e.g. one Ray work item); default all pending.
        num_workers: DataLoader workers decoding images in parallel (0: in this process).
        model: an already created model for ``spec`` (Ray actors load a model once).
        compression_level: zstd level of a new store (None: uncompressed; -1 is faster, 1 smaller).
        progress: show a progress bar.

    Returns:
        The store (complete when no batch is pending any more), the batches written by this call,
        and how many asked-for batches were already done.

    Raises:
        ValueError: empty stimulus set, unknown model or layer, undecodable image (named).
    """
    import threading
    import time
    from queue import Queue

    from tqdm.auto import tqdm

    from .layers import layer_names, probe_layers
    from .store import ActivationStore, StoreKey

    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be 'float16' or 'float32'; got {dtype!r}")
    if len(stimuli) == 0:
        raise ValueError("the stimulus set is empty")
    t0 = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = (model if model is not None else spec.create()).to(device).eval()
    cfg = spec.data_config(model)
    names = layer_names(model, selection)
    infos = probe_layers(model, names, tuple(cfg["input_size"]))
    key = StoreKey(spec.identity(), cfg, stimuli.content_hash, tuple(names), dtype)
    store = ActivationStore.create(root, key, [info.units() for info in infos], list(stimuli.image_ids),
                                   batch_size=batch_size, compression_level=compression_level)
    pending = store.pending_batches()
    wanted = pending if batches is None else [b for b in batches if b in set(pending)]
    skipped = (store.n_batches if batches is None else len(batches)) - len(wanted)
    written: list[int] = []
    if wanted:
        transform = eval_transform(cfg)
        loader = torch.utils.data.DataLoader(
            _Batches(stimuli, wanted, store.batch_size, transform), batch_size=None, shuffle=False,
            num_workers=num_workers, pin_memory=device.type == "cuda")
        writer = store.writer()
        queue: Queue = Queue(maxsize=2)  # backpressure: at most two batches wait for the disk
        failure: list[BaseException] = []

        def drain():
            while (item := queue.get()) is not None:
                if failure:
                    continue
                try:
                    writer.write(*item)
                    written.append(item[0])
                except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
                    failure.append(err)

        thread = threading.Thread(target=drain, name="store-writer", daemon=True)
        thread.start()
        captured: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        out_dtype = torch.float16 if dtype == "float16" else torch.float32
        hooks = [modules[name].register_forward_hook(_capture(captured, name, out_dtype)) for name in names]
        try:
            with torch.inference_mode():
                for b, images in tqdm(loader, desc=f"extract {spec.name}", unit="batch", disable=not progress):
                    if failure:
                        break
                    model(images.to(device, non_blocking=True))
                    host = {name: captured[name].reshape(len(images), -1).to("cpu", non_blocking=True)
                            for name in names}
                    if device.type == "cuda":
                        torch.cuda.current_stream(device).synchronize()
                    queue.put((b, {name: t.numpy() for name, t in host.items()}))
        finally:
            queue.put(None)
            thread.join()
            for h in hooks:
                h.remove()
        if failure:
            raise failure[0]
    if not store.pending_batches():
        store.finalize()
    return ExtractionReport(store, sorted(written), skipped, time.perf_counter() - t0)
