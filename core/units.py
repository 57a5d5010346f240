"""Candidate units: which layers exist, how many units each has, and what a unit's coordinates are.

A unit is one scalar of one layer's output for one image. :class:`LayerUnits` is the one
description of a layer (name, per-image unit shape, dimension names, leading prefix tokens) used by
probing (:func:`core.layers.probe_layers`), activation stores, in-memory activations
(:class:`Activations`), the matching engine and the result columns; :func:`infer_dims` is the one
place where dimension names are derived from a shape. Units get global integer ids: layers in
catalogue order, each layer's units in C order of its per-image shape (channel, y, x for NCHW
maps; y, x, channel for NHWC maps; token, channel for transformers). A :class:`UnitBlock` is a
slice of one layer's units for all images; the matching engine consumes blocks, so it never needs
all units at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

from ._checks import check_count

#: dimension names by rank of the per-image unit shape, for channels-first layers that do not name
#: them themselves (see :func:`infer_dims`)
DEFAULT_DIMS = {1: ("channel",), 2: ("token", "channel"), 3: ("channel", "y", "x")}


def infer_dims(shape: Sequence[int], *, channels_last: bool = False) -> tuple[str, ...]:
    """Dimension names of a per-image unit shape, from its rank.

    ``("channel",)`` for vectors, ``("token", "channel")`` for token sequences, ``("channel", "y",
    "x")`` for maps, or ``("y", "x", "channel")`` when ``channels_last`` (NHWC outputs: Swin,
    MambaOut), and ``("d0", "d1", ...)`` for other ranks.
    """
    rank = len(shape)
    if rank == 3 and channels_last:
        return ("y", "x", "channel")
    return DEFAULT_DIMS.get(rank) or tuple(f"d{i}" for i in range(rank))


@dataclass(frozen=True)
class LayerUnits:
    """One layer's units.

    Attributes:
        name: the layer (module) name.
        shape: the per-image unit shape (a layer output's shape without the batch axis).
        dims: the names of those axes (see :func:`infer_dims`), all different.
        prefix_tokens: how many class / register tokens lead the ``token`` axis (ViT: 1); their
            units are flagged in result tables (``prefix_token``), since they are not spatial. 0 for
            layers without such tokens.
    """

    name: str
    shape: tuple[int, ...]
    dims: tuple[str, ...]
    prefix_tokens: int = 0

    def __post_init__(self):
        shape, dims = tuple(self.shape), tuple(self.dims)
        if len(shape) != len(dims):
            raise ValueError(f"layer {self.name!r}: shape {shape} does not match dims {dims}")
        if not shape or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s <= 0 for s in shape):
            raise ValueError(f"layer {self.name!r}: unit shape must be positive integers; got {shape}")
        if len(set(dims)) != len(dims) or not all(isinstance(d, str) and d for d in dims):
            raise ValueError(f"layer {self.name!r}: dims must be distinct non-empty names; got {dims}")
        n = self.prefix_tokens
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"layer {self.name!r}: prefix_tokens must be a non-negative integer; got {n!r}")
        if n and "token" not in dims:
            raise ValueError(f"layer {self.name!r}: prefix_tokens={n} needs a 'token' axis; dims are {dims}")
        if n and n > shape[dims.index("token")]:
            raise ValueError(f"layer {self.name!r}: prefix_tokens={n} exceeds its {shape[dims.index('token')]} "
                             f"tokens")
        # normalized, so that equal descriptions compare equal (numpy ints, lists from JSON)
        object.__setattr__(self, "shape", tuple(int(s) for s in shape))
        object.__setattr__(self, "dims", dims)
        object.__setattr__(self, "prefix_tokens", int(n))

    @classmethod
    def infer(cls, name: str, shape: Sequence[int], *, channels_last: bool = False, prefix_tokens: int = 0
              ) -> "LayerUnits":
        """A layer whose dimension names come from its rank (:func:`infer_dims`)."""
        return cls(name, tuple(shape), infer_dims(shape, channels_last=channels_last), prefix_tokens)

    @property
    def size(self) -> int:
        """Number of units (scalars per image)."""
        return int(np.prod(self.shape))

    def as_attrs(self) -> dict:
        """JSON-able description (a store's layer group attributes); :meth:`from_attrs` reads it back."""
        return {"layer": self.name, "shape": list(self.shape), "dims": list(self.dims),
                "prefix_tokens": self.prefix_tokens}

    @classmethod
    def from_attrs(cls, attrs: Mapping) -> "LayerUnits":
        return cls(attrs["layer"], tuple(attrs["shape"]), tuple(attrs["dims"]), int(attrs.get("prefix_tokens", 0)))


def check_layer_subset(wanted, names, owner: str) -> set[str]:
    """The layer names ``wanted`` (a non-empty subset of ``names``) as a set, or a ValueError naming
    the unknown ones and ``owner``'s layers (``owner``: e.g. "the activations have")."""
    unknown = [name for name in wanted if name not in names]
    if unknown or not len(wanted):
        raise ValueError(f"layers={list(wanted)!r}: {'unknown layers ' + repr(unknown) if unknown else 'empty'}; "
                         f"{owner} {list(names)}")
    return set(wanted)


class UnitCatalogue:
    """Ordered layers with global unit ids.

    Args:
        layers: the layers in order; names must be unique.
    """

    def __init__(self, layers: Sequence[LayerUnits]):
        names = [layer.name for layer in layers]
        if not layers:
            raise ValueError("a unit catalogue needs at least one layer")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate layer names: {sorted({n for n in names if names.count(n) > 1})}")
        self.layers = list(layers)
        sizes = np.array([layer.size for layer in layers], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self._index = {name: i for i, name in enumerate(names)}

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def n_units(self) -> int:
        return int(self.offsets[-1])

    def layer(self, name: str) -> LayerUnits:
        return self.layers[self.index(name)]

    def index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"unknown layer {name!r}; layers are {list(self._index)}") from None

    def offset(self, name: str) -> int:
        return int(self.offsets[self.index(name)])

    def describe(self, units: np.ndarray) -> pd.DataFrame:
        """Layer name and coordinates of global unit ids (-1 gives an empty row).

        Returns:
            One row per id: ``unit``, ``layer``, then one integer column per dimension name used by
            any layer (channel, y, x, token...), -1 where a layer has no such dimension, then
            ``prefix_token``: whether the unit belongs to a class / register token (its token index
            is below its layer's ``prefix_tokens``), False for every other unit.
        """
        units = np.asarray(units, dtype=np.int64).ravel()
        valid = (units >= 0) & (units < self.n_units)
        layer_idx = np.full(units.shape, -1)
        layer_idx[valid] = np.searchsorted(self.offsets, units[valid], side="right") - 1
        dims = list(dict.fromkeys(d for layer in self.layers for d in layer.dims))
        out = {"unit": units, "layer": np.full(units.shape, None, dtype=object)}
        coords = {d: np.full(units.shape, -1, dtype=np.int64) for d in dims}
        prefix = np.zeros(units.shape, dtype=bool)
        for li, layer in enumerate(self.layers):
            sel = layer_idx == li
            if not sel.any():
                continue
            out["layer"][sel] = layer.name
            local = np.unravel_index(units[sel] - self.offsets[li], layer.shape)
            for d, values in zip(layer.dims, local):
                coords[d][sel] = values
            if layer.prefix_tokens:
                prefix[sel] = local[layer.dims.index("token")] < layer.prefix_tokens
        return pd.DataFrame({**out, **coords, "prefix_token": prefix})


class Activations(Mapping):
    """In-memory activations that know their layers: ``{layer: (images, *unit_shape)}`` plus descriptions.

    A read-only mapping from layer name to array (numpy or torch), in layer order, that also carries
    each layer's :class:`LayerUnits`. :func:`core.extract.extract_activations` returns one, so that
    :func:`core.match_neurons`, :func:`core.run_matching` and :func:`core.analyze` name units with
    the probed dimensions (Swin's NHWC stages as y, x, channel) and flag prefix tokens, exactly as
    they do from an activation store. A plain ``dict`` of arrays carries no descriptions: its
    dimension names come from each array's rank (:func:`infer_dims`, channels first), and no
    token is flagged; ``dict(activations)`` drops the descriptions the same way.

    Args:
        arrays: ``{layer: array (images, *unit_shape)}``.
        layers: one description per array, in the same order; each array's shape after the image
            axis must be its layer's shape, and all arrays must have the same number of images.
    """

    def __init__(self, arrays: Mapping[str, object], layers: Sequence[LayerUnits]):
        layers = tuple(layers)
        if [layer.name for layer in layers] != list(arrays):
            raise ValueError(f"layer descriptions {[layer.name for layer in layers]} do not match the arrays' "
                             f"layers {list(arrays)} (same names, same order)")
        if not layers:
            raise ValueError("no activations given (no layers)")
        n_images = None
        for layer in layers:
            shape = tuple(int(s) for s in getattr(arrays[layer.name], "shape", ()))
            if shape[1:] != layer.shape:
                raise ValueError(f"layer {layer.name!r}: array of shape {shape} does not hold (images, *{layer.shape})")
            if n_images is not None and shape[0] != n_images:
                raise ValueError(f"layer {layer.name!r} has {shape[0]} images, earlier layers have {n_images}")
            n_images = shape[0]
        self._arrays = dict(arrays)
        self.layer_units = layers

    def __getitem__(self, name: str):
        return self._arrays[name]

    def __iter__(self):
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def __repr__(self) -> str:
        layers = ", ".join(f"{u.name}: {tuple(self._arrays[u.name].shape)} {dict(zip(u.dims, u.shape))}"
                           for u in self.layer_units)
        return f"Activations({layers})"

    @property
    def n_images(self) -> int:
        return int(next(iter(self._arrays.values())).shape[0])

    def catalogue(self) -> UnitCatalogue:
        return UnitCatalogue(self.layer_units)


@dataclass(frozen=True)
class UnitBlock:
    """Activations of a contiguous run of one layer's units for all images.

    Attributes:
        data: (images, units) numpy array or torch tensor, float16 or float32.
        layer: the layer's name.
        first_unit: global id of the block's first unit.
    """

    data: object
    layer: str
    first_unit: int

    @property
    def n_units(self) -> int:
        return int(self.data.shape[1])


@dataclass(frozen=True)
class BlockRead:
    """A block of a store's checked layer, read when its values are asked for: ``np.asarray(read)``
    reads it into a new array, ``read.read_into(out)`` into a given one (a staging thread's pinned
    buffer: :func:`core.engine.staged_blocks`), both through :meth:`core.integrity.CheckedArray.read_units`
    on ``threads`` threads. Has the ``shape`` and ``dtype`` of the block."""

    array: object  # a CheckedArray (anything with read_units, shape and dtype)
    start: int
    stop: int
    threads: int = 1

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.array.shape[0]), self.stop - self.start)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    @property
    def ndim(self) -> int:
        return 2

    def read_into(self, out: np.ndarray) -> np.ndarray:
        return self.array.read_units(self.start, self.stop, self.threads, out=out)

    def __array__(self, dtype=None, copy=None):
        if copy is False:
            raise ValueError("a store's block is read into a new array: copy=False cannot be honoured")
        values = self.array.read_units(self.start, self.stop, self.threads)
        return values if dtype is None else values.astype(dtype, copy=False)


def as_layers(activations) -> Mapping[str, object]:
    """Normalize in-memory activations to ``{layer: array (images, *unit_shape)}``.

    :class:`Activations` come back as they are (with their layer descriptions). A bare 2-D array
    (images, units) becomes :class:`Activations` of the single layer ``"units"`` with dimension
    ``unit``; any other bare array, a single layer ``"units"`` named by rank.
    """
    if isinstance(activations, Activations):
        return activations
    if isinstance(activations, Mapping):
        layers = dict(activations)
    else:
        layers = {"units": activations}
    if not layers:
        raise ValueError("no activations given (an empty mapping of layers)")
    n_images = None
    for name, a in layers.items():
        if not hasattr(a, "shape") or len(a.shape) < 2:
            raise ValueError(
                f"activations of layer {name!r} must be an array of shape (images, units...); "
                f"got {type(a).__name__} {getattr(a, 'shape', '')}"
            )
        if n_images is None:
            n_images = a.shape[0]
        elif a.shape[0] != n_images:
            raise ValueError(f"layer {name!r} has {a.shape[0]} images, earlier layers have {n_images}")
    if not isinstance(activations, Mapping) and len(activations.shape) == 2:
        return Activations(layers, [LayerUnits("units", (int(activations.shape[1]),), ("unit",))])
    return layers


def catalogue_of(layers: Mapping[str, object], dims: Mapping[str, Sequence[str]] | None = None) -> UnitCatalogue:
    """The catalogue of in-memory layers.

    Layers of :class:`Activations` keep their descriptions; those of a plain mapping are named by
    rank (:func:`infer_dims`, channels first, no prefix tokens). ``dims`` overrides the dimension
    names of the layers it names (a layer's prefix tokens are kept when the new names still have a
    ``token`` axis).
    """
    described = {u.name: u for u in layers.layer_units} if isinstance(layers, Activations) else {}
    out = []
    for name, a in layers.items():
        shape = tuple(int(s) for s in a.shape[1:])
        layer = described.get(name) or LayerUnits.infer(name, shape)
        if dims and name in dims:
            new = tuple(dims[name])
            layer = LayerUnits(name, shape, new, layer.prefix_tokens if "token" in new else 0)
        out.append(layer)
    return UnitCatalogue(out)


def iter_blocks(
    layers: Mapping[str, np.ndarray], catalogue: UnitCatalogue, block_units: int, read_threads: int = 1,
    deferred: bool = False,
) -> Iterator[UnitBlock]:
    """Blocks of at most ``block_units`` units, layer by layer.

    numpy layers give views (no copies); 2-D Zarr arrays (images x units) are read block by block,
    so pick ``block_units`` as a multiple of their unit chunk size (:func:`chunk_aligned`). A store's
    checked layers (:class:`core.integrity.CheckedArray`) are read on ``read_threads`` threads per
    block (its ``read_units``: the chunks decoded and checked in parallel); one thread reads each
    block in the thread that asks for it. ``deferred``: a store's blocks come as :class:`BlockRead`
    (read when the consumer asks for the values; :func:`core.engine.staged_blocks` reads them
    straight into its pinned buffers).
    """
    _check_block_options(block_units, read_threads)
    for name, a in layers.items():
        flat = _flat(a)
        yield from _range_blocks(flat, name, catalogue.offset(name), 0, flat.shape[1], block_units, read_threads,
                                 deferred)


def range_blocks(array, layer: str, first_unit: int, start: int, stop: int, block_units: int, read_threads: int = 1,
                 deferred: bool = False) -> Iterator[UnitBlock]:
    """The units ``start..stop`` of one layer's (images, units) array in blocks of at most
    ``block_units``, read as :func:`iter_blocks` reads a layer's blocks (``read_threads``,
    ``deferred`` as there); ``first_unit``: the global id of unit ``start`` (a sweep's block task
    scores its block in pieces: :mod:`sweep.reduce`).

    Raises:
        ValueError: a range outside the array's units, or bad ``block_units`` / ``read_threads``.
    """
    _check_block_options(block_units, read_threads)
    flat = _flat(array)
    if not 0 <= start <= stop <= flat.shape[1]:
        raise ValueError(f"units {start}..{stop} of layer {layer!r}: the array has {flat.shape[1]} units")
    return _range_blocks(flat, layer, first_unit - start, start, stop, block_units, read_threads, deferred)


def _check_block_options(block_units, read_threads) -> None:
    check_count(block_units, "block_units", 1)
    check_count(read_threads, "read_threads", 1)


def _range_blocks(flat, name: str, base: int, start: int, stop: int, block_units: int, read_threads: int,
                  deferred: bool) -> Iterator[UnitBlock]:
    """Blocks of ``flat``'s units ``start..stop`` (``base``: the global id of its unit 0)."""
    checked = hasattr(flat, "read_units")
    for a in range(start, stop, block_units):
        b = min(a + block_units, stop)
        if checked and deferred:
            data = BlockRead(flat, a, b, int(read_threads))
        elif checked and read_threads > 1:
            data = flat.read_units(a, b, read_threads)
        else:
            data = flat[:, a:b]
        yield UnitBlock(data, name, base + a)


def whole_chunks(block_units: int, chunk: int) -> int:
    """``block_units`` rounded down to a multiple of ``chunk``, at least one chunk: a block of a
    chunked layer that reads each of its chunks once (and no other)."""
    return max(chunk, block_units // chunk * chunk)


def chunk_aligned(block_units: int, layers: Mapping[str, np.ndarray]) -> int:
    """``block_units`` in whole unit chunks (:func:`whole_chunks`) where the layers are chunked 2-D
    arrays (a store's layers, Zarr arrays) and those of several chunks share one chunk width (a layer
    of one chunk is one block either way); else ``block_units``. A block of 17,920 units over
    16,384-unit chunks straddled two chunks and decoded each twice: 3.8 s of reads for a 3200 x
    200,704 float16 store that a chunk-aligned read takes 1.8 s for (benchmarks/RESULTS.md)."""
    widths = set()
    for a in layers.values():
        chunks = getattr(a, "chunks", None)
        if len(a.shape) != 2 or not isinstance(chunks, tuple) or len(chunks) != 2:
            return block_units  # numpy or torch (no chunks), an n-d layer (reshaped), dask's chunk tuples
        if not isinstance(chunks[1], (int, np.integer)):
            return block_units
        if a.shape[1] > chunks[1]:
            widths.add(int(chunks[1]))
    return whole_chunks(block_units, widths.pop()) if len(widths) == 1 else block_units


def gather_columns(layers: Mapping[str, np.ndarray], catalogue: UnitCatalogue, units: np.ndarray,
                   dtype=np.float64) -> np.ndarray:
    """(images, len(units)) activations of global unit ids from in-memory layers or stores.

    ``dtype``: of the result (float64 by default); None: as stored (the layers' common type, e.g.
    float16 for a store's columns: a quarter of float64's memory, and no cast on the host, which
    numpy does one value at a time for float16: 2.2 s of 8.3 for 100,000 columns of 960 images).
    From a store, each layer's columns are read by :class:`core.integrity.CheckedArray`'s ``oindex``
    (every chunk holding one of them read once, checked, on several threads).
    """
    units = np.asarray(units, dtype=np.int64)
    first = next(iter(layers.values()))
    layer_idx = np.searchsorted(catalogue.offsets, units, side="right") - 1
    parts = []  # (positions in the result: a slice where they run in order, else a mask; the columns)
    for li in np.unique(layer_idx):
        layer = catalogue.layers[li]
        at = np.flatnonzero(layer_idx == li)
        flat = _flat(layers[layer.name])
        cols = units[at] - catalogue.offsets[li]
        # orthogonal selection reads only the chunks holding these columns (Zarr), or indexes (numpy)
        picked = flat.oindex[:, cols] if hasattr(flat, "oindex") else flat[:, cols]
        if hasattr(picked, "detach"):  # a torch tensor, perhaps on a GPU
            picked = picked.detach().cpu().numpy()
        where = slice(int(at[0]), int(at[-1]) + 1) if at[-1] - at[0] + 1 == at.size else at
        parts.append((where, np.asarray(picked)))
    if dtype is None:
        dtype = np.result_type(*[p.dtype for _, p in parts]) if parts else np.float64
    if len(parts) == 1 and isinstance(parts[0][0], slice) and parts[0][0] == slice(0, units.size) \
            and parts[0][1].dtype == dtype and parts[0][1].flags.c_contiguous:
        return parts[0][1]  # one layer's columns, as asked: no copy
    out = np.empty((first.shape[0], units.size), dtype=dtype)
    for where, picked in parts:
        if picked.dtype == np.float16 and out.dtype in (np.float32, np.float64) and isinstance(where, slice):
            import torch  # numpy casts float16 one value at a time; torch in vector registers

            source = picked if picked.flags.writeable else picked.copy()  # torch warns on read-only arrays
            torch.from_numpy(out[:, where]).copy_(torch.from_numpy(source))
        else:
            out[:, where] = picked
    return out


def _flat(a):
    """(images, units) view of a layer: 2-D arrays (numpy, torch, Zarr) as they are, others reshaped."""
    return a if len(a.shape) == 2 else a.reshape(a.shape[0], -1)
