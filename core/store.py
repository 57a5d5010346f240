"""Activation stores: every unit of every selected layer for every image, on disk, written once.

Layout of one store, a directory named by its identity (:meth:`StoreKey.digest`)::

    <root>/<digest>/
        key.json        what the store holds: model identity, preprocessing, stimuli hash, layers,
                        dtype, store format (the digest is a hash of exactly this; the unitmatch
                        version that wrote it is recorded in the Zarr group's attributes, and is not
                        part of the identity: a release that does not change what is stored reuses
                        every store, one that does bumps ``STORE_FORMAT``)
        store.zarr/     Zarr v3 with consolidated metadata; one group per layer: ``activations``
                        (image_id, unit) float16 by default, zstd, chunked (extraction batch x
                        unit_chunk); dimension coordinates ``image_id`` and ``unit`` (the unit's index
                        within its layer), and one array per unit dimension (channel, y, x / y, x,
                        channel / token, channel) on ``unit``, named in the ``coordinates`` attribute of
                        ``activations``, so ``xarray.open_zarr(path, group=layer)`` gives a Dataset
                        whose every dimension has coordinates. The layer group's attributes
                        hold its :class:`~core.units.LayerUnits` (``layer``, ``shape``, ``dims``,
                        ``prefix_tokens``: class / register tokens leading the token axis); the root
                        group's hold the layer order, batch size, writing version and whatever
                        provenance the creator adds (extraction records ``"tf32": false``)
        done/           one empty file per finished image batch (written after all its layers)
        COMPLETE        written last, once every batch is done

Each writer owns whole chunks (a chunk's rows are exactly one extraction batch), so writers on
several processes or nodes never share a chunk and need no locks; nothing is sharded (concurrent
writes into one shard lose data). A crash leaves a batch without its ``done`` file: a rerun redoes
that batch and skips the finished ones. Readers (:meth:`ActivationStore.open`) refuse a store
without ``COMPLETE``, so a half-written store is never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .. import __version__
from .units import LayerUnits, UnitCatalogue

log = logging.getLogger(__name__)

#: 3: layer groups record ``prefix_tokens`` and stores are extracted with TF32 off on CUDA (format 2
#: stores had neither: a ViT's class token was not flagged, and GPU values differed from CPU ones
#: by up to 1e-3 of the largest value)
STORE_FORMAT = 3
DEFAULT_UNIT_CHUNK = 16384


@dataclass(frozen=True)
class StoreKey:
    """Everything that decides what a store holds. Change any field and a different store is made.

    Attributes:
        model: model identity: ``name.tag`` for published weights, ``name@random:<seed>`` for random
            weights, ``name@sha256:<digest>`` for a local weights file; ``factory:...`` and ``module:...``
            for models of your own (:meth:`core.extract.ModelSpec.identity`).
        preprocessing: input size, interpolation, crop, mean, std actually used.
        stimuli: the stimulus set's content hash.
        layers: layer names in order.
        dtype: stored dtype.
        format: the store layout version (:data:`STORE_FORMAT`).
    """

    model: str
    preprocessing: dict
    stimuli: str
    layers: tuple[str, ...]
    dtype: str = "float16"
    format: int = STORE_FORMAT

    def as_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, default=list)

    def digest(self) -> str:
        return hashlib.sha256(self.as_json().encode()).hexdigest()[:24]


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class IncompleteStoreError(RuntimeError):
    """A store whose extraction has not finished (no COMPLETE marker)."""


class ActivationStore:
    """One store on disk; see the module docstring for the layout.

    Use :meth:`create` (writers: creates or resumes) or :meth:`open` (readers: complete stores only).
    """

    def __init__(self, path: Path, key: dict, layers: list[LayerUnits], image_ids: np.ndarray, batch_size: int,
                 attrs: Mapping | None = None):
        self.path = Path(path)
        self.key = key
        self.layer_units = layers
        self.image_ids = image_ids
        self.batch_size = int(batch_size)
        #: the root group's attributes (layers, batch_size, unitmatch_version, creator's provenance)
        self.attrs = dict(attrs or {})

    # ------------------------------------------------------------------ constructors
    @classmethod
    def find(cls, root: str | Path, key: StoreKey) -> "ActivationStore | None":
        """The store for ``key`` under ``root`` (complete or not), or None when there is none yet.

        Raises:
            RuntimeError: the directory of that digest holds another key.
        """
        path = Path(root) / key.digest()
        if not path.exists():
            return None
        store = cls._load(path)
        if json.loads(key.as_json()) != store.key:
            raise RuntimeError(f"{path} holds a different key than its digest promises; delete it")
        return store

    @classmethod
    def create(cls, root: str | Path, key: StoreKey, layers: Sequence[LayerUnits], image_ids: Sequence[str], *,
               batch_size: int = 32, unit_chunk: int = DEFAULT_UNIT_CHUNK, compression_level: int | None = 1,
               attrs: Mapping | None = None) -> "ActivationStore":
        """Create the store for ``key``, or resume the one already there.

        Creation is staged in a temporary directory and moved into place in one rename, so a crash
        during creation leaves nothing that looks like a store.

        Args:
            attrs: JSON-able provenance for the root group's attributes (e.g. the extraction's
                float32 policy); ignored when resuming.
        """
        import zarr
        from zarr.codecs import ZstdCodec

        if not image_ids:
            raise ValueError("cannot create a store for an empty stimulus set")
        if batch_size <= 0 or unit_chunk <= 0:
            raise ValueError(f"batch_size and unit_chunk must be positive; got {batch_size}, {unit_chunk}")
        store = cls.find(root, key)
        if store is not None:
            if store.batch_size != batch_size:
                log.info("resuming %s with its own batch size %d (asked %d)", store.path, store.batch_size,
                         batch_size)
            return store
        path = Path(root) / key.digest()
        staging = Path(root) / f".{key.digest()}.staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "done").mkdir(parents=True)
        group = zarr.open_group(str(staging / "store.zarr"), mode="w")
        n = len(image_ids)
        ids = np.asarray(image_ids, dtype=str)
        for layer in layers:
            g = group.create_group(layer.name.replace("/", "_"))
            g.attrs.update(layer.as_attrs())
            g.create_array("activations", shape=(n, layer.size), chunks=(batch_size, min(unit_chunk, layer.size)),
                           dtype=key.dtype,
                           compressors=None if compression_level is None else [ZstdCodec(level=compression_level)],
                           dimension_names=("image_id", "unit"), fill_value=np.nan,
                           # xarray (CF conventions) reads these as the unit's coordinates
                           attributes={"coordinates": " ".join(layer.dims)})
            image_id = g.create_array("image_id", shape=(n,), dtype=str, dimension_names=("image_id",))
            image_id[:] = ids  # variable-length UTF-8: the string type Zarr v3 specifies
            g.create_array("unit", data=np.arange(layer.size, dtype=np.int64), dimension_names=("unit",))
            local = np.unravel_index(np.arange(layer.size), layer.shape)
            for dim, values in zip(layer.dims, local):
                g.create_array(dim, data=values.astype(np.int32), dimension_names=("unit",))
        group.attrs.update({**dict(attrs or {}), "layers": [layer.name for layer in layers],
                            "batch_size": batch_size, "unitmatch_version": __version__})
        # every array and attribute exists now and batches only write chunks: one metadata read for readers
        # (xarray asks for it). Zarr warns that consolidation is not in the v3 spec yet; it is what
        # zarr-python and xarray both read, and a reader without it still opens the groups.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
            zarr.consolidate_metadata(str(staging / "store.zarr"))
        (staging / "key.json").write_text(key.as_json())
        try:
            staging.rename(path)
        except OSError:  # another writer created it first: use theirs
            shutil.rmtree(staging, ignore_errors=True)
            if not path.exists():
                raise
        return cls._load(path)

    @classmethod
    def open(cls, path: str | Path) -> "ActivationStore":
        """A complete store, for reading.

        Raises:
            FileNotFoundError: no store there.
            IncompleteStoreError: extraction has not finished (says how far it got).
        """
        store = cls._load(Path(path))
        if not store.complete:
            done, total = len(store.done_batches()), store.n_batches
            raise IncompleteStoreError(
                f"store {store.path} is incomplete ({done} of {total} image batches written); "
                f"rerun the extraction to finish it"
            )
        return store

    @classmethod
    def _load(cls, path: Path) -> "ActivationStore":
        import zarr

        if not (path / "key.json").exists():
            raise FileNotFoundError(f"no activation store at {path} (no key.json)")
        key = json.loads((path / "key.json").read_text())
        group = zarr.open_group(str(path / "store.zarr"), mode="r")
        layers = [LayerUnits.from_attrs({"layer": name, **group[name.replace("/", "_")].attrs})
                  for name in group.attrs["layers"]]
        if key.get("format", 0) < 3:
            log.warning("store %s has format %s: its layers do not record prefix tokens (none are flagged)",
                        path, key.get("format"))
        first = group[layers[0].name.replace("/", "_")]
        return cls(path, key, layers, first["image_id"][:], group.attrs["batch_size"], dict(group.attrs))

    # ------------------------------------------------------------------ progress
    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    @property
    def n_batches(self) -> int:
        return -(-self.n_images // self.batch_size)

    def batch_rows(self, batch: int) -> slice:
        return slice(batch * self.batch_size, min((batch + 1) * self.batch_size, self.n_images))

    def done_batches(self) -> set[int]:
        return {int(p.name[1:]) for p in (self.path / "done").glob("b*")}

    def extraction_records(self) -> dict[str, int]:
        """How the batches were extracted: ``"<device> on <host>, tf32 <policy>"`` -> number of batches."""
        counts: dict[str, int] = {}
        for path in sorted((self.path / "done").glob("b*")):
            text = path.read_text()
            info = json.loads(text) if text.strip() else {}
            label = (f"{info.get('device', 'unrecorded device')} on {info.get('host', 'unrecorded host')}, "
                     f"tf32 {info.get('tf32', self.attrs.get('tf32', 'unrecorded'))}")
            counts[label] = counts.get(label, 0) + 1
        return counts

    def pending_batches(self) -> list[int]:
        done = self.done_batches()
        return [b for b in range(self.n_batches) if b not in done]

    @property
    def complete(self) -> bool:
        return (self.path / "COMPLETE").exists()

    # ------------------------------------------------------------------ writing
    def _arrays(self, mode: str):
        import zarr

        group = zarr.open_group(str(self.path / "store.zarr"), mode=mode)
        return {layer.name: group[layer.name.replace("/", "_")]["activations"] for layer in self.layer_units}

    def writer(self) -> "BatchWriter":
        return BatchWriter(self)

    def finalize(self) -> None:
        """Write COMPLETE if every batch is done.

        Raises:
            IncompleteStoreError: batches are missing.
        """
        missing = self.pending_batches()
        if missing:
            raise IncompleteStoreError(f"store {self.path}: {len(missing)} batches not written, e.g. {missing[:5]}")
        _atomic_touch(self.path / "COMPLETE")

    # ------------------------------------------------------------------ reading
    def layers(self) -> dict[str, object]:
        """``{layer: zarr array (images, units)}`` for the matching engine."""
        return self._arrays("r")

    def catalogue(self) -> UnitCatalogue:
        return UnitCatalogue(self.layer_units)

    @property
    def unit_chunk(self) -> int:
        """Units per Zarr chunk that matching blocks should be a multiple of.

        A layer smaller than the configured chunk is stored as one chunk of its own size and any
        block covers it whole, so the alignment that matters is the largest chunk of any layer.
        """
        return int(max(a.chunks[1] for a in self.layers().values()))


class BatchWriter:
    """Writes whole image batches (all layers), then marks each done."""

    def __init__(self, store: ActivationStore):
        self.store = store
        self.arrays = store._arrays("r+")

    def write(self, batch: int, activations: Mapping[str, np.ndarray], info: Mapping | None = None) -> None:
        """Write one image batch of every layer, then its ``done`` record (``info`` as JSON: how it was made)."""
        import zarr

        rows = self.store.batch_rows(batch)
        # every chunk of a batch is fully written: skip zarr's comparison against the fill value
        with zarr.config.set({"array.write_empty_chunks": True}):
            for layer in self.store.layer_units:
                values = activations[layer.name]
                expected = (rows.stop - rows.start, layer.size)
                if values.shape != expected:
                    raise ValueError(
                        f"batch {batch} of layer {layer.name!r} has shape {values.shape}; expected {expected}")
                self.arrays[layer.name][rows] = values
        _atomic_touch(self.store.path / "done" / f"b{batch:06d}", json.dumps(dict(info or {})).encode())


def _atomic_touch(path: Path, content: bytes = b"") -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(content)
    os.replace(tmp, path)
