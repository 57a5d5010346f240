"""Candidate units: which layers exist, how many units each has, and what a unit's coordinates are.

A unit is one scalar of one layer's output for one image. Units get global integer ids: layers in
catalogue order, each layer's units in C order of its per-image shape (channel, y, x for conv maps;
token, channel for transformers). A :class:`UnitBlock` is a slice of one layer's units for all
images; the matching engine consumes blocks, so it never needs all units at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

#: dimension names by rank of the per-image unit shape, when a layer does not name them itself
DEFAULT_DIMS = {1: ("channel",), 2: ("token", "channel"), 3: ("channel", "y", "x")}


@dataclass(frozen=True)
class LayerUnits:
    """One layer's units: name, per-image shape and the names of those dimensions."""

    name: str
    shape: tuple[int, ...]
    dims: tuple[str, ...]

    def __post_init__(self):
        if len(self.shape) != len(self.dims):
            raise ValueError(f"layer {self.name!r}: shape {self.shape} does not match dims {self.dims}")
        if any(int(s) <= 0 for s in self.shape):
            raise ValueError(f"layer {self.name!r}: empty unit shape {self.shape}")

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


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
            any layer (channel, y, x, token...), -1 where a layer has no such dimension.
        """
        units = np.asarray(units, dtype=np.int64).ravel()
        valid = (units >= 0) & (units < self.n_units)
        layer_idx = np.full(units.shape, -1)
        layer_idx[valid] = np.searchsorted(self.offsets, units[valid], side="right") - 1
        dims = list(dict.fromkeys(d for layer in self.layers for d in layer.dims))
        out = {"unit": units, "layer": np.full(units.shape, None, dtype=object)}
        coords = {d: np.full(units.shape, -1, dtype=np.int64) for d in dims}
        for li, layer in enumerate(self.layers):
            sel = layer_idx == li
            if not sel.any():
                continue
            out["layer"][sel] = layer.name
            local = np.unravel_index(units[sel] - self.offsets[li], layer.shape)
            for d, values in zip(layer.dims, local):
                coords[d][sel] = values
        return pd.DataFrame({**out, **coords})


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


def as_layers(activations) -> dict[str, np.ndarray]:
    """Normalize in-memory activations to ``{layer: array (images, *unit_shape)}``.

    A bare 2-D array becomes the single layer ``"units"``.
    """
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
    return layers


def catalogue_of(layers: Mapping[str, np.ndarray], dims: Mapping[str, Sequence[str]] | None = None) -> UnitCatalogue:
    """A catalogue for in-memory layers; dims default by rank (see ``DEFAULT_DIMS``)."""
    out = []
    for name, a in layers.items():
        shape = tuple(int(s) for s in a.shape[1:])
        d = tuple(dims[name]) if dims and name in dims else DEFAULT_DIMS.get(len(shape))
        if d is None:
            d = tuple(f"d{i}" for i in range(len(shape)))
        if name == "units" and len(shape) == 1 and not (dims and name in dims):
            d = ("unit",)
        out.append(LayerUnits(name, shape, d))
    return UnitCatalogue(out)


def iter_blocks(
    layers: Mapping[str, np.ndarray], catalogue: UnitCatalogue, block_units: int
) -> Iterator[UnitBlock]:
    """Blocks of at most ``block_units`` units, layer by layer.

    numpy layers give views (no copies); 2-D Zarr arrays (images x units) are read block by block,
    so pick ``block_units`` as a multiple of their unit chunk size.
    """
    if block_units <= 0:
        raise ValueError(f"block_units must be positive; got {block_units}")
    for name, a in layers.items():
        flat = _flat(a)
        base = catalogue.offset(name)
        for start in range(0, flat.shape[1], block_units):
            yield UnitBlock(flat[:, start:start + block_units], name, base + start)


def gather_columns(layers: Mapping[str, np.ndarray], catalogue: UnitCatalogue, units: np.ndarray) -> np.ndarray:
    """(images, len(units)) float64 activations of global unit ids from in-memory layers."""
    units = np.asarray(units, dtype=np.int64)
    first = next(iter(layers.values()))
    out = np.empty((first.shape[0], units.size))
    layer_idx = np.searchsorted(catalogue.offsets, units, side="right") - 1
    for li in np.unique(layer_idx):
        layer = catalogue.layers[li]
        sel = layer_idx == li
        flat = _flat(layers[layer.name])
        cols = units[sel] - catalogue.offsets[li]
        # orthogonal selection reads only the chunks holding these columns (Zarr), or indexes (numpy)
        picked = flat.oindex[:, cols] if hasattr(flat, "oindex") else flat[:, cols]
        out[:, sel] = np.asarray(picked, dtype=np.float64)
    return out


def _flat(a):
    """(images, units) view of a layer: 2-D arrays (numpy, torch, Zarr) as they are, others reshaped."""
    return a if len(a.shape) == 2 else a.reshape(a.shape[0], -1)
