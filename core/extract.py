"""Models, their preprocessing, and the one extraction loop that reads every unit of chosen layers.

What this module owns:

- models: :func:`create_model` (timm, random or published weights) and :class:`ModelSpec`, a model
  and its preprocessing as an identity; :func:`data_config` / :func:`eval_transform`, timm's eval
  preprocessing of each model (images decoded with Pillow);
- the extraction loop (:func:`_extract`), one for every output: images are decoded and transformed
  by a DataLoader (:func:`image_batches`, ``num_workers`` processes), the model runs under
  ``torch.inference_mode`` with forward hooks that copy each chosen layer's output in the output
  dtype (float16 or float32) as soon as it is produced (later in-place operations cannot change
  it): on the CPU straight into a host buffer, on CUDA on the device, then to pinned host buffers
  asynchronously while the next batch's forward runs (:class:`_Staging`). Each batch goes to a
  *sink*: in memory (:func:`extract_activations` returns :class:`~core.units.Activations`, arrays
  that carry their layers' :class:`~core.units.LayerUnits`) or into an activation store
  (:func:`extract_to_store`: a pool of ``writer_threads`` compresses and writes the layers
  concurrently, see :mod:`core.store`);
- store creation (:func:`prepare_store`): the store of an identity, created or resumed, its layers
  probed, no batch written.

Guarantees of the loop:

- the caller's model comes back as it went in: every parameter and buffer on its device, every
  module in its train/eval mode, no hook left (extraction itself runs in eval mode, on ``device``);
- full float32: CUDA matmuls and cuDNN convolutions run without TF32 (:func:`full_float32`), so
  stores written on a GPU agree with CPU stores to float32 rounding (tests/test_gpu.py checks it on
  a GPU); the policy is recorded in each store's attributes and each batch's record (``"tf32": false``);
- both sinks see the same values: a float16 store equals float16 in-memory activations exactly.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from queue import Queue
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from . import custom
from ._checks import check_count
from ._compat import forced_tf32, import_timm
from .engine import default_device
from .layers import OUTPUT, eval_mode, layer_names, probe_layers
from .stimuli import StimulusSet
from .units import Activations, LayerUnits

from .store import DEFAULT_CODEC, DEFAULT_UNIT_CHUNK

if TYPE_CHECKING:
    from .store import ActivationStore

log = logging.getLogger(__name__)

#: output dtypes of extraction, by name
DTYPES = {"float16": torch.float16, "float32": torch.float32}
#: store writer threads (benchmarks/RESULTS.md, bench_extract.py)
DEFAULT_WRITER_THREADS = 2
#: image batches :func:`extract_to_store` lets wait for the disk (each holds one set of host buffers)
SINK_QUEUE = 2


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


def data_config(model, overrides: dict | None = None) -> dict:
    """A model's eval preprocessing (input size, interpolation, crop, mean, std), JSON-able and sorted.

    The model's pretrained config, with ``overrides`` applied (see :class:`ModelSpec`).

    Raises:
        ValueError: a model without a pretrained config (not a timm model) and no declared
            ``input_size``, ``mean`` and ``std`` (timm's ImageNet defaults would be a silent guess).
    """
    timm = import_timm()
    overrides = dict(overrides or {})
    order = overrides.pop("channel_order", None)
    if not (getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)):
        missing = [k for k in ("input_size", "mean", "std") if overrides.get(k) is None]
        if missing:
            raise ValueError(f"{type(model).__name__} has no pretrained config, so its preprocessing must be declared "
                             f"({missing} missing): describe it with ModelSpec.from_module(model, input_size=..., "
                             f"mean=..., std=...) or ModelSpec.from_factory and pass spec=")
    cfg = timm.data.resolve_data_config(overrides, model=model)
    if order not in (None, "RGB"):
        cfg["channel_order"] = order  # only when not RGB: RGB stores keep their keys
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(cfg.items())}


def eval_transform(cfg: dict):
    """timm's eval transform (resize, center crop, to tensor, normalize) for a data config.

    ``channel_order: BGR`` reverses the channels after normalizing; its mean and std are in BGR order.
    """
    timm = import_timm()
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    if args.pop("channel_order", "RGB") == "BGR":
        args["mean"], args["std"] = args["mean"][::-1], args["std"][::-1]  # normalize RGB, then reverse
        return _ReverseChannels(timm.data.create_transform(**args, is_training=False))
    return timm.data.create_transform(**args, is_training=False)


class _ReverseChannels:
    """A transform followed by reversing the channel axis of its (C, H, W) tensor (RGB -> BGR)."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image):
        return self.transform(image).flip(0)


def preprocess(model, images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) images to a normalized float batch at the model's input size.

    Uses the model's pretrained config (input size, interpolation, mean, std); images are resized
    (shorter side to the crop's size / crop_pct) and center-cropped as timm's eval transform does.
    """
    from PIL import Image

    transform = eval_transform(data_config(model))
    return torch.stack([transform(Image.fromarray(im)) for im in images])


# ---------------------------------------------------------------------------------------------------
# The extraction loop and what it guarantees
# ---------------------------------------------------------------------------------------------------
@contextmanager
def full_float32():
    """CUDA matmuls and cuDNN convolutions in full float32 (no TF32) inside the block.

    PyTorch lets cuDNN convolutions use TF32 by default (10-bit mantissa products): GPU activations
    then differ from CPU ones by up to about 1e-3 of the largest value, far beyond float32
    rounding. oneDNN's CPU matmuls, which ``torch.set_float32_matmul_precision`` also governs, run
    in full float32 too. Every setting is restored afterwards, also on errors. The settings are
    process-wide (other threads see them while the block runs).

    torch >= 2.9 keeps a per-operator precision (``torch.backends.cuda.matmul``,
    ``torch.backends.cudnn.conv`` / ``.rnn``: ``fp32_precision``) beside the legacy settings
    (``torch.set_float32_matmul_precision``, ``torch.backends.cudnn.allow_tf32``) and raises where
    the two disagree, so both are set to full precision, in this order: legacy first (it resets the
    per-operator values), then per-operator ``"ieee"`` (explicit, so that no ``"tf32"`` inherited
    from ``torch.backends.fp32_precision`` applies). A legacy setting that torch refuses to report
    (the caller's settings already disagree) is left alone. Older torch has only the legacy settings.
    """
    b = torch.backends
    ops = [getattr(b.cuda, "matmul", None), getattr(b.cudnn, "conv", None), getattr(b.cudnn, "rnn", None)]
    ops = [op for op in ops if hasattr(op, "fp32_precision")]
    # oneDNN's matmul precision is saved too: the legacy matmul setting changes it
    saved = [(op, op.fp32_precision) for op in [*ops, getattr(b.mkldnn, "matmul", None)]
             if hasattr(op, "fp32_precision")]
    matmul = _legacy_setting(torch.get_float32_matmul_precision)
    cudnn = _legacy_setting(lambda: b.cudnn.allow_tf32)
    try:
        if matmul is not None:
            torch.set_float32_matmul_precision("highest")
        if cudnn is not None:
            b.cudnn.allow_tf32 = False
        for op in ops:
            op.fp32_precision = "ieee"
        yield
    finally:
        if matmul is not None:
            torch.set_float32_matmul_precision(matmul)
        if cudnn is not None:
            b.cudnn.allow_tf32 = cudnn
        for op, value in saved:
            op.fp32_precision = value


def _legacy_setting(read):
    """A legacy TF32 setting, or None where torch refuses to report it (it disagrees with a new one)."""
    try:
        return read()
    except RuntimeError:
        return None


def _device(device) -> torch.device:
    """The extraction device: as given (``"cuda"`` as the current CUDA device), default cuda when available.

    Raises:
        ValueError: CUDA with an environment variable that forces TF32 in cuBLAS matmuls
            (:func:`core._compat.forced_tf32`): :func:`full_float32` cannot turn that off, and stores
            promise full float32.
    """
    device = default_device(device or None)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    forced = forced_tf32() if device.type == "cuda" else []
    if forced:
        raise ValueError(
            f"{', '.join(forced)} makes torch run CUDA float32 matmuls in TF32 whatever its settings say "
            f"(NGC's PyTorch containers set it), so the stores would not hold full-float32 activations; unset "
            f"it (or set it to 0) for extraction"
        )
    return device


@contextmanager
def _on_device(model, device: torch.device):
    """``model`` on ``device`` inside the block, and back on its own device afterwards (also on errors).

    ``Module.to`` moves parameters and buffers in place (the same Parameter objects), so nothing
    the caller holds goes stale and no moved copy stays behind.

    Raises:
        ValueError: the model is spread over several devices (it cannot be moved and put back).
    """
    tensors = [*model.parameters(), *model.buffers()]
    where = {t.device for t in tensors}
    if not tensors or all(d.type == device.type and device.index in (None, d.index) for d in where):
        yield model
        return
    if len(where) > 1:
        raise ValueError(f"the model's parameters and buffers are on several devices {sorted(map(str, where))}; "
                         f"extraction moves a model to one device (here {device}) and back, so place it on one")
    (home,) = where
    model.to(device)
    try:
        yield model
    finally:
        model.to(home)


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


def image_batches(stimuli: StimulusSet, cfg: dict, batches: Sequence[int], batch_size: int, *, num_workers: int = 0,
                  device: torch.device | None = None) -> torch.utils.data.DataLoader:
    """``(batch, images)`` per image batch: decoded and preprocessed in ``num_workers`` DataLoader workers
    (0: in this process), in pinned memory for a CUDA ``device``."""
    return torch.utils.data.DataLoader(
        _Batches(stimuli, list(batches), batch_size, eval_transform(cfg)), batch_size=None, shuffle=False,
        num_workers=check_count(num_workers, "num_workers", 0),
        pin_memory=device is not None and device.type == "cuda")


class _Staging:
    """Each batch's layer outputs, from the forward hooks to host buffers that a sink reads.

    A ring of ``slots`` host buffer sets (per layer a (batch_size, *shape) tensor of the output
    dtype) bounds the batches in flight: one being computed, one being copied, the others held by
    the sink, which gives a slot back (:meth:`release`) once it no longer reads it. Allocated on
    first use.

    - ``device_copies`` (on CUDA): the hooks keep a copy of each output in the output dtype on the
      device (cast before the copy: float16 halves the bytes to move; a copy because later in-place
      operations would change the output); after the forward they go to the slot on a second
      stream (asynchronous into ``pinned`` host memory), so batch b's copy overlaps the forward of
      b + 1, and :meth:`ready` waits for a batch's copy only when it hands the batch on. On the CPU
      the same logic runs with plain buffers and synchronous copies (tests exercise it there).
    - otherwise (the CPU default): the hooks cast each output straight into the slot, one copy.
    """

    def __init__(self, layers: Sequence[LayerUnits], batch_size: int, dtype: torch.dtype, device: torch.device, *,
                 slots: int, device_copies: bool, pinned: bool):
        self.layers = {layer.name: layer for layer in layers}
        self.batch_size, self.dtype, self.device = batch_size, dtype, device
        self.device_copies, self.pinned = device_copies, pinned
        self.stream = torch.cuda.Stream(device) if device_copies and device.type == "cuda" else None
        self.buffers: list[dict | None] = [None] * slots
        self.free: Queue = Queue()
        for slot in range(slots):
            self.free.put(slot)
        self.current: tuple[int, int] | None = None  # (slot, images) of the batch being computed
        self.captured: dict = {}
        self.pending: deque = deque()  # (batch, slot, images, copy event) copied or being copied
        #: batches handed on before the newest one's copy is waited for (1 when copies are asynchronous)
        self.lag = 1 if device_copies else 0

    def _host(self, slot: int) -> dict[str, torch.Tensor]:
        if self.buffers[slot] is None:
            self.buffers[slot] = {name: torch.empty((self.batch_size, *layer.shape), dtype=self.dtype,
                                                    pin_memory=self.pinned) for name, layer in self.layers.items()}
        return self.buffers[slot]

    def begin(self, n: int) -> None:
        """A slot for the next batch of ``n`` images (waits while the sink holds every slot)."""
        self.current = (self.free.get(), n)
        self.captured = {}

    def hook(self, name: str):
        """The forward hook of layer ``name``: copies its output before in-place operations can change it."""
        expected = self.layers[name].shape

        def hook(_module, _inputs, out):
            if isinstance(out, (tuple, list)):
                out = out[0]
            slot, n = self.current
            if tuple(out.shape) != (n, *expected):
                self.captured[name] = tuple(out.shape)  # end() names it
            elif self.device_copies:
                self.captured[name] = out.detach().to(self.dtype, copy=True)
            else:
                self.captured[name] = self._host(slot)[name][:n].copy_(out.detach())
        return hook

    def end(self, batch: int) -> None:
        """After the forward: every layer's output is checked and its copy to the host queued.

        Raises:
            ValueError: a layer gave no output or one of another shape than probed.
        """
        slot, n = self.current
        self.current = None
        for name, layer in self.layers.items():
            out = self.captured.get(name)
            if not isinstance(out, torch.Tensor):
                self.free.put(slot)
                got = "no output" if out is None else f"output {out}"
                raise ValueError(f"layer {name!r} gave {got} for a batch of {n} images; probing found "
                                 f"{layer.shape} per image")
        event = None
        if self.device_copies:
            host = self._host(slot)
            if self.stream is not None:
                self.stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self.stream):
                    for name, out in self.captured.items():
                        host[name][:n].copy_(out, non_blocking=True)
                        out.record_stream(self.stream)  # not reused by the allocator before the copy is done
                    event = torch.cuda.Event()
                    event.record(self.stream)
            else:
                for name, out in self.captured.items():
                    host[name][:n].copy_(out)
        self.captured = {}
        self.pending.append((batch, slot, n, event))

    def ready(self, final: bool = False):
        """``(batch, slot, {layer: (images, *shape) numpy view})`` of the batches to hand on now: all
        but the newest ``lag`` ones, or all when ``final``. Waits for each one's copy."""
        while len(self.pending) > (0 if final else self.lag):
            batch, slot, n, event = self.pending.popleft()
            if event is not None:
                event.synchronize()
            host = self._host(slot)
            yield batch, slot, {name: host[name][:n].numpy() for name in self.layers}

    def release(self, slot: int) -> None:
        """The sink no longer reads ``slot``: the next batch may be copied into it."""
        self.free.put(slot)

    def close(self) -> None:
        """No copy into host memory is left running (also after an error)."""
        if self.stream is not None:
            self.stream.synchronize()


def _extract(model, stimuli: StimulusSet, cfg: dict, layers: Sequence[LayerUnits], sink, *, batches: Sequence[int],
             batch_size: int, dtype: torch.dtype, device: torch.device, num_workers: int = 0,
             pinned: bool | None = None, device_copies: bool | None = None, desc: str = "extract",
             progress: bool = False) -> None:
    """The extraction loop: ``sink.put(batch, {layer: (images, *shape) numpy array}, release)`` per image batch.

    Batch ``b`` holds images ``b * batch_size`` to ``(b + 1) * batch_size`` (fewer for the last).
    The arrays are views of host buffers that the loop reuses once the sink calls ``release()``;
    ``sink.slots`` says how many batches the sink may hold (its queue). ``pinned`` (default: on
    CUDA) and ``device_copies`` (default: on CUDA): see :class:`_Staging`. See the module
    docstring for what the loop guarantees.

    Raises:
        ValueError: a layer's output per image is not its probed shape; an undecodable image;
            ``pinned=True`` without CUDA.
    """
    from tqdm.auto import tqdm

    cuda = device.type == "cuda"
    device_copies = cuda if device_copies is None else bool(device_copies)
    pinned = cuda if pinned is None else bool(pinned)
    _check_pinned(pinned, device)
    staging = _Staging(layers, batch_size, dtype, device, slots=1 + int(device_copies) + sink.slots,
                       device_copies=device_copies, pinned=pinned)
    modules = {**dict(model.named_modules()), OUTPUT: model}
    hooks = [modules[layer.name].register_forward_hook(staging.hook(layer.name)) for layer in layers]
    loader = image_batches(stimuli, cfg, batches, batch_size, num_workers=num_workers, device=device)
    try:
        with _on_device(model, device), eval_mode(model), full_float32(), torch.inference_mode():
            for b, images in tqdm(loader, desc=desc, unit="batch", disable=not progress):
                staging.begin(len(images))
                model(images.to(device, non_blocking=True))
                staging.end(b)
                for batch, slot, outputs in staging.ready():
                    sink.put(batch, outputs, partial(staging.release, slot))
            for batch, slot, outputs in staging.ready(final=True):
                sink.put(batch, outputs, partial(staging.release, slot))
    finally:
        staging.close()
        for h in hooks:
            h.remove()


class _MemorySink:
    """Fills one (images, *shape) array per layer."""

    slots = 1

    def __init__(self, layers: Sequence[LayerUnits], n_images: int, batch_size: int, dtype):
        self.batch_size, self.n_images = batch_size, n_images
        self.arrays = {layer.name: np.empty((n_images, *layer.shape), dtype=dtype) for layer in layers}

    def put(self, batch: int, outputs: dict[str, np.ndarray], release) -> None:
        rows = slice(batch * self.batch_size, min((batch + 1) * self.batch_size, self.n_images))
        try:
            for name, values in outputs.items():
                self.arrays[name][rows] = values
        finally:
            release()


class _StoreSink:
    """Writes batches into a store with a pool of ``threads`` writer threads (a context manager).

    Each layer of a batch is one task (:meth:`core.store.BatchWriter.write_layer`): the layers of a
    batch, and of consecutive batches, are written concurrently; the last task of a batch writes
    its ``done`` record (:meth:`~core.store.BatchWriter.mark_done`), so a batch is trusted only once
    all its layers are on disk. ``queue`` batches may wait for the disk (backpressure: the loop's
    host buffers). A write error stops all further writes and is raised in the caller's thread,
    by the next :meth:`put` or on leaving the block; batches already marked done stay valid.
    """

    def __init__(self, store: "ActivationStore", info: dict | None = None, *, threads: int = 2, queue: int = 2):
        from concurrent.futures import ThreadPoolExecutor

        threads = check_count(threads, "writer_threads", 1)
        # the same number of threads compress a full batch's shards (numcodecs releases the GIL)
        self.writer = store.writer(threads=threads)
        self.info = dict(info or {})  # recorded with every batch: how it was made
        self.slots = queue
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="store-writer")
        self.lock = threading.Lock()
        self.failure: list[BaseException] = []
        self.written: list[int] = []

    def __enter__(self) -> "_StoreSink":
        return self

    def put(self, batch: int, outputs: dict[str, np.ndarray], release) -> None:
        if self.failure:
            release()
            raise self.failure[0]
        left, digests = [len(outputs)], {}

        def write(name: str, values: np.ndarray) -> None:
            try:
                if not self.failure:  # after a failure nothing more is written
                    found = self.writer.write_layer(batch, name, values.reshape(len(values), -1))
                    with self.lock:
                        digests[name] = found
            except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
                with self.lock:
                    self.failure.append(err)
            finally:
                with self.lock:
                    left[0] -= 1
                    last = left[0] == 0
                if last:
                    self._finish(batch, digests, len(outputs), release)

        for name, values in outputs.items():
            self.pool.submit(write, name, values)

    def _finish(self, batch: int, digests: dict, n_layers: int, release) -> None:
        try:
            if len(digests) == n_layers:  # every layer of the batch is on disk
                self.writer.mark_done(batch, digests, self.info)
                with self.lock:
                    self.written.append(batch)
        except BaseException as err:  # noqa: BLE001
            with self.lock:
                self.failure.append(err)
        finally:
            release()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.pool.shutdown(wait=True)
        self.writer.close()
        if self.failure and exc is None:
            raise self.failure[0]


def _check_pinned(pinned, device) -> None:
    if pinned and not torch.cuda.is_available():
        raise ValueError(f"pinned=True needs CUDA (page-locked host memory for asynchronous copies from the GPU); "
                         f"this torch sees no GPU (device {device}): use pinned=None or False")


# ---------------------------------------------------------------------------------------------------
# In memory
# ---------------------------------------------------------------------------------------------------
def extract_activations(model, stimuli: StimulusSet, layers, *, batch_size: int = 32, dtype=np.float16, device=None,
                        num_workers: int = 0, progress: bool = False, spec: ModelSpec | None = None) -> Activations:
    """Every unit of every chosen layer for every image, in memory.

    Args:
        model: a torch model (e.g. :func:`create_model`); preprocessing comes from its pretrained
            config (:func:`data_config`), or from ``spec``. It is left as it was: same devices, same modes, no hooks.
        stimuli: the images.
        layers: module names (in the order wanted), or a preset / selection as
            :func:`core.layers.layer_names` takes it (``"stages"``, ``"blocks"``, ``"leaves"``).
        batch_size: images per forward pass.
        dtype: float16 (default) or float32.
        device: where to run (default cuda when available); the model is moved there for the call
            and back afterwards.
        num_workers: DataLoader workers decoding images in parallel (0: in this process).
        progress: show a progress bar.
        spec: the model's :class:`ModelSpec`, whose preprocessing is used (needed for factory models
            and ready modules, which have no pretrained config).

    Returns:
        :class:`~core.units.Activations`: ``{layer: (images, *unit_shape)}`` arrays of ``dtype`` in
        layer order, carrying each layer's probed :class:`~core.units.LayerUnits` (dimension names,
        prefix tokens), so that matching names units as it does from a store.

    Raises:
        ValueError: unknown layer names (close valid names listed), a bad dtype or batch size, an
            undecodable image (named).
    """
    out_dtype = np.dtype(dtype)
    if out_dtype.name not in DTYPES:
        raise ValueError(f"dtype must be float16 or float32; got {dtype!r}")
    batch_size = check_count(batch_size, "batch_size", 1)
    cfg = spec.data_config(model) if spec is not None else data_config(model)
    names = layer_names(model, layers, input_size=tuple(cfg["input_size"])) if isinstance(layers, str) else list(layers)
    units = probe_layers(model, names, tuple(cfg["input_size"]))
    sink = _MemorySink(units, len(stimuli), batch_size, out_dtype)
    _extract(model, stimuli, cfg, units, sink, batches=range(-(-len(stimuli) // batch_size)), batch_size=batch_size,
             dtype=DTYPES[out_dtype.name], device=_device(device), num_workers=num_workers, progress=progress)
    return Activations(sink.arrays, units)


# ---------------------------------------------------------------------------------------------------
# Models as identities, and extraction into activation stores
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """A model and its preprocessing, as an identity.

    Three kinds of model:

    - a timm model: ``name`` is a timm name (with a pretrained tag when ``pretrained``);
    - a factory model (:meth:`from_factory`): ``factory`` names any importable callable
      (``"package.module:callable"`` or ``"path/to/file.py:callable"``) called with ``kwargs`` that
      returns a ``torch.nn.Module``; ``name`` is only a label. Preprocessing must be declared
      (``input_size``, ``mean``, ``std``; ``crop_pct`` defaults to 1, ``interpolation`` to
      bilinear). The identity holds the factory, its arguments, the sha256 of the callable's source
      file and of the weights file, so editing the code or the weights makes a new store;
    - a ready module (:meth:`from_module`): identified by its class and a hash of its state dict;
      the module travels with the spec (Ray workers get a pickled copy).

    Attributes:
        name: timm model name, with a pretrained tag when ``pretrained`` (``resnet50.a1_in1k``); a
            label for factory models and ready modules.
        pretrained: load the tag's published weights (timm only).
        checkpoint: a local weights file instead (its sha256 enters the identity); for factory models
            a state dict (``.pt``, ``.pth``, ``.safetensors``) loaded strictly.
        seed: random initialisation seed (untrained controls; a factory model without weights).
        input_size, crop_pct, interpolation, mean, std: overrides of a timm model's pretrained
            config, or a factory model's declared preprocessing (mean and std on the 0-1 pixel scale).
        channel_order: ``"RGB"`` (default) or ``"BGR"`` (channels reversed after normalizing; mean and
            std then in BGR order).
        factory: ``"package.module:callable"`` or ``"path/to/file.py:callable"`` (made absolute).
        kwargs: the factory's keyword arguments, as sorted ``(name, JSON value)`` pairs; a mapping
            given here is converted.
        module_digest: :func:`core.custom.module_digest` of a ready module.
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
    channel_order: str | None = None
    factory: str | None = None
    kwargs: tuple = ()
    module_digest: str | None = None
    module: torch.nn.Module | None = field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self):
        def put(key, value):
            object.__setattr__(self, key, value)

        for key in ("input_size", "mean", "std"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, tuple):
                try:
                    put(key, tuple(value))
                except TypeError:
                    raise ValueError(f"{key}={value!r}: expected a list of 3 numbers") from None
        if not isinstance(self.kwargs, tuple):
            put("kwargs", custom.kwargs_items(self.kwargs))
        elif not all(isinstance(p, tuple) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in self.kwargs):
            raise ValueError(f"kwargs={self.kwargs!r}: give a mapping of argument names to values")
        if self.factory is not None or self.module_digest is not None:
            if self.factory is not None and self.module_digest is not None:
                raise ValueError("a ModelSpec has a factory or a ready module (module_digest), not both")
            if self.pretrained:
                raise ValueError(f"pretrained=True is for timm tags; {self.name!r} is not a timm model: give its "
                                 f"weights as checkpoint (a state dict file)")
            if self.factory is not None:
                put("factory", custom.absolute_factory(self.factory))
            custom.check_preprocessing(self.input_size, self.crop_pct, self.interpolation, self.mean, self.std,
                                       self.channel_order)
        else:
            if self.kwargs:
                raise ValueError(f"kwargs are factory arguments; {self.name!r} is a timm model (no factory)")
            custom.check_overrides(self.input_size, self.crop_pct, self.interpolation, self.mean, self.std,
                                   self.channel_order)

    @classmethod
    def from_factory(cls, factory: str, kwargs: dict | None = None, *, name: str | None = None,
                     checkpoint: str | None = None, seed: int = 0, **preprocessing) -> "ModelSpec":
        """A factory model: ``factory(**kwargs)``, weights from ``checkpoint`` (else random, ``seed``).

        ``preprocessing``: ``input_size`` (3, H, W), ``mean``, ``std`` (required), ``crop_pct``,
        ``interpolation``. Nothing is imported here; :meth:`check` or :meth:`create` import.
        """
        label = name or custom._split(factory)[1].rsplit(".", 1)[-1]
        return cls(label, checkpoint=checkpoint, seed=seed, factory=factory, kwargs=custom.kwargs_items(kwargs),
                   **preprocessing)

    @classmethod
    def from_module(cls, module: torch.nn.Module, *, name: str | None = None, **preprocessing) -> "ModelSpec":
        """A ready module, identified by its class and state dict (:func:`core.custom.module_digest`).

        ``preprocessing`` as for :meth:`from_factory`. The module must not change afterwards: a store
        is checked against the digest when it is prepared.
        """
        custom.check_module(module, "from_module(module)")
        return cls(name or type(module).__qualname__, module_digest=custom.module_digest(module), module=module,
                   **preprocessing)

    @property
    def arch(self) -> str:
        """The architecture: timm's name without tag, the factory's callable, or the module's class."""
        if self.factory is not None:
            return custom._split(self.factory)[1].rsplit(".", 1)[-1]
        if self.module_digest is not None:
            return self.name
        return self.name.split(".")[0]

    def check(self) -> None:
        """What can be checked without building the model: the factory imports and is callable, the
        weights file exists. Raises ValueError."""
        if self.factory is not None:
            custom.resolve_factory(self.factory)
        if self.checkpoint is not None and not os.path.isfile(self.checkpoint):
            raise ValueError(f"checkpoint={self.checkpoint!r}: no such weights file")

    def identity(self) -> str:
        from .store import file_sha256

        if self.module_digest is not None:
            return f"module:{self.name}@sha256:{self.module_digest}"
        if self.factory is not None:
            where, attr = custom._split(self.factory)
            where = os.path.basename(where) if where.endswith(".py") else where  # the content is hashed
            args = ",".join(f"{k}={v}" for k, v in self.kwargs)
            source = custom.source_sha256(custom.resolve_factory(self.factory))
            weights = f"sha256:{file_sha256(self.checkpoint)}" if self.checkpoint else f"random:{self.seed}"
            return f"factory:{where}:{attr}({args})@source:{source}@{weights}"
        if self.checkpoint:
            return f"{self.name}@sha256:{file_sha256(self.checkpoint)}"
        if self.pretrained:
            return self.name
        return f"{self.name}@random:{self.seed}"

    def create(self):
        """The model in eval mode (a ready module: that module)."""
        if self.module_digest is not None:
            if self.module is None:
                raise ValueError(f"ModelSpec {self.name!r} stands for a ready module that did not come with it; "
                                 f"pass the module (model=...)")
            return self.module
        if self.factory is None:
            return create_model(self.name, pretrained=self.pretrained, checkpoint=self.checkpoint, seed=self.seed)
        fn = custom.resolve_factory(self.factory)
        torch.manual_seed(self.seed)
        kwargs = {k: json.loads(v) for k, v in self.kwargs}
        try:
            model = fn(**kwargs)
        except Exception as err:  # noqa: BLE001 - any failure of the user's code, named with its call
            raise ValueError(f"factory={self.factory!r} called with kwargs {kwargs} raised {type(err).__name__}: "
                             f"{err}") from err
        model = custom.check_module(model, self.factory)
        if self.checkpoint:
            custom.load_weights(model, self.checkpoint)
        return model.eval()

    def check_model(self, model) -> None:
        """A model passed for a ready-module spec is that module, unchanged (else ValueError)."""
        if self.module_digest is not None and custom.module_digest(model) != self.module_digest:
            raise ValueError(f"the model passed for ModelSpec {self.name!r} is not the module it was made from (its "
                             f"class or state dict differs); make a new spec with ModelSpec.from_module")

    def data_config(self, model) -> dict:
        """The preprocessing actually used: the model's pretrained config with the overrides applied
        (factory models and ready modules: the declared preprocessing, crop_pct 1 and bilinear unless set)."""
        overrides = {k: v for k, v in (("input_size", self.input_size), ("crop_pct", self.crop_pct),
                                       ("interpolation", self.interpolation), ("mean", self.mean),
                                       ("std", self.std), ("channel_order", self.channel_order)) if v is not None}
        if self.factory is not None or self.module_digest is not None:
            overrides = {"crop_pct": 1.0, "interpolation": "bilinear", "crop_mode": "center", **overrides}
        return data_config(model, overrides)


@dataclass
class ExtractionReport:
    """What one call of :func:`extract_to_store` did."""

    store: "ActivationStore"
    written: list[int]
    skipped: int
    seconds: float


def prepare_store(spec: ModelSpec, stimuli: StimulusSet, selection, root, *, batch_size: int = 32,
                  dtype: str = "float16", codec: str = DEFAULT_CODEC, sharded: bool = True,
                  unit_chunk: int = DEFAULT_UNIT_CHUNK, model=None) -> "ActivationStore":
    """The store for this identity, created (or found, to resume), with no batch written.

    Validates model, layers and arguments before any work: this is what a driver calls before
    handing batches to workers. Layers are probed (one forward pass on a zero image) only when the
    store is new, on the model's device: CPU for a model created here.

    Args:
        spec: the model and its preprocessing.
        stimuli: the images.
        selection: layers: a preset ("blocks", "stages", "leaves"), or names / globs / "re:" regexes.
        root: folder of stores.
        batch_size: images per extraction batch and per store chunk row (a resumed store keeps its own).
        dtype: "float16" (default) or "float32".
        codec: how chunks are compressed (:func:`core.store.parse_codec`: ``"zstd:<level>"``,
            ``"blosc:<cname>:<shuffle>:<level>"``, ``"none"``); part of the store's identity.
        sharded: each layer's chunks of one image batch in one shard file; part of the identity.
        unit_chunk: units per chunk of a new store (a resumed store keeps its own).
        model: an already created model for ``spec`` (default: ``spec.create()`` on the CPU).

    Raises:
        ValueError: empty stimulus set, unknown model or layer, bad dtype, codec, batch size or
            unit chunk.
    """
    from .store import ActivationStore, StoreKey

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}; got {dtype!r}")
    unit_chunk = check_count(unit_chunk, "unit_chunk", 1)
    if len(stimuli) == 0:
        raise ValueError("the stimulus set is empty")
    batch_size = check_count(batch_size, "batch_size", 1)
    if model is None:
        model = spec.create()
    else:
        spec.check_model(model)
    cfg = spec.data_config(model)
    names = layer_names(model, selection, input_size=tuple(cfg["input_size"]))
    key = StoreKey(spec.identity(), cfg, stimuli.content_hash, tuple(names), dtype, codec=codec, sharded=sharded)
    store = ActivationStore.find(root, key)
    if store is not None:
        return store
    units = probe_layers(model, names, tuple(cfg["input_size"]))
    return ActivationStore.create(root, key, units, list(stimuli.image_ids), batch_size=batch_size,
                                  unit_chunk=unit_chunk, attrs={"tf32": False})


def extract_to_store(spec: ModelSpec, stimuli: StimulusSet, selection, root, *, batch_size: int = 32,
                     dtype: str = "float16", device=None, batches: Sequence[int] | None = None,
                     num_workers: int = 0, writer_threads: int = DEFAULT_WRITER_THREADS, pinned: bool | None = None,
                     model=None, codec: str = DEFAULT_CODEC, sharded: bool = True,
                     unit_chunk: int = DEFAULT_UNIT_CHUNK, progress: bool = False) -> ExtractionReport:
    """Extract every unit of the selected layers into the store for this identity; resume if present.

    Args:
        spec: the model and its preprocessing.
        stimuli: the images.
        selection: layers: a preset ("blocks", "stages", "leaves"), or names / globs / "re:" regexes.
        root: folder of stores.
        batch_size: images per forward pass and per store chunk row.
        dtype: "float16" (default) or "float32".
        device: torch device (default cuda when available); a caller's ``model`` is moved there for
            the call and back afterwards.
        batches: only these image batches (a shard, e.g. one Ray work item); default all pending.
        num_workers: DataLoader workers decoding images in parallel (0: in this process).
        writer_threads: threads compressing and writing layers concurrently (each layer of a batch
            is one task; a batch's ``done`` record follows its last layer).
        pinned: copy from a CUDA device into page-locked host buffers, asynchronously, overlapping
            the next batch's forward (default: on CUDA; True without CUDA is an error).
        model: an already created model for ``spec`` (Ray actors load a model once).
        codec, sharded, unit_chunk: the layout of a new store (:func:`prepare_store`).
        progress: show a progress bar.

    Returns:
        The store (complete when no batch is pending any more), the batches written by this call,
        and how many asked-for batches were already done.

    Raises:
        ValueError: empty stimulus set, unknown model or layer, batches outside the store,
            undecodable image (named), an environment that forces TF32 on CUDA (see :func:`_device`).
    """
    t0 = time.perf_counter()
    own = model is None
    model = spec.create() if own else model
    writer_threads = check_count(writer_threads, "writer_threads", 1)
    check_count(num_workers, "num_workers", 0)
    if pinned not in (None, True, False):
        raise ValueError(f"pinned must be None (on CUDA), True or False; got {pinned!r}")
    _check_pinned(pinned, device)
    device = _device(device)  # before the store exists: a device it refuses leaves nothing behind
    store = prepare_store(spec, stimuli, selection, root, batch_size=batch_size, dtype=dtype, codec=codec,
                          sharded=sharded, unit_chunk=unit_chunk, model=model)
    if batches is not None:
        outside = sorted({int(b) for b in batches} - set(range(store.n_batches)))
        if outside:
            raise ValueError(f"batches {outside[:10]} are not batches of the store ({store.n_batches} batches: "
                             f"0 to {store.n_batches - 1})")
    pending = store.pending_batches()
    wanted = pending if batches is None else [b for b in dict.fromkeys(int(b) for b in batches) if b in set(pending)]
    skipped = (store.n_batches if batches is None else len(batches)) - len(wanted)
    written: list[int] = []
    if wanted:
        if own:
            model.to(device)  # ours: no need to move it back
        info = {"device": str(device), "host": platform.node(), "torch": torch.__version__, "tf32": False}
        with _StoreSink(store, info, threads=writer_threads, queue=SINK_QUEUE) as sink:
            _extract(model, stimuli, spec.data_config(model), store.layer_units, sink, batches=wanted,
                     batch_size=store.batch_size, dtype=DTYPES[store.key["dtype"]], device=device,
                     num_workers=num_workers, pinned=pinned, desc=f"extract {spec.name}", progress=progress)
        written = sink.written
    if not store.pending_batches():
        store.finalize()
    return ExtractionReport(store, sorted(written), skipped, time.perf_counter() - t0)
