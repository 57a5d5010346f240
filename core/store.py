"""Activation stores: every unit of every selected layer for every image, on disk, written once.

Layout of one store, a directory named by its identity (:meth:`StoreKey.digest`)::

    <root>/<digest>/
        key.json        what the store holds: model identity, preprocessing, stimuli hash, layers,
                        dtype, codec, sharding, store format (the digest is a hash of exactly this;
                        the unitmatch version that wrote it is recorded in the Zarr group's
                        attributes, and is not part of the identity: a release that does not
                        change what is stored reuses every store, one that does bumps
                        ``STORE_FORMAT``)
        store.zarr/     Zarr v3 with consolidated metadata; one group per layer: ``activations``
                        (image_id, unit) float16 by default, Blosc lz4 + byte shuffle by default,
                        chunked (extraction batch x unit_chunk), and sharded: all chunks of one
                        image batch of a layer in one file (``c/<batch>/0``; unsharded: one file per
                        chunk, ``c/<batch>/<column>``); dimension coordinates ``image_id`` and
                        ``unit`` (the unit's index within its layer), and one array per unit
                        dimension (channel, y, x / y, x, channel / token, channel) on ``unit``,
                        named in the ``coordinates`` attribute of
                        ``activations``, so ``xarray.open_zarr(path, group=layer)`` gives a Dataset
                        whose every dimension has coordinates. The layer group's attributes
                        hold its :class:`~core.units.LayerUnits` (``layer``, ``shape``, ``dims``,
                        ``prefix_tokens``: class / register tokens leading the token axis); the root
                        group's hold the layer order, batch size, writing version and whatever
                        provenance the creator adds (extraction records ``"tf32": false``)
        done/           one JSON record per finished image batch (written after all its layers): how it
                        was made (device, host, tf32) and ``chunks``, the CRC-32 of every chunk of the
                        batch, per layer
        COMPLETE        written last, once every batch is done

Each writer owns whole chunks and whole shards (a chunk's and a shard's rows are exactly one
extraction batch), so writers on several processes or nodes never share a file and need no locks
(a shard spanning several batches would be rewritten by each of their writers, losing data). Within
one process, a pool of writer threads writes the layers of a batch concurrently
(:meth:`BatchWriter.write_layer`); the batch's ``done`` record follows its last layer. A crash
leaves a batch without its ``done`` file: a rerun redoes that batch and skips the finished ones.
Readers (:meth:`ActivationStore.open`) refuse a store without ``COMPLETE``, so a half-written store
is never trusted.

Integrity (formats 4 and 5; the parts live in :mod:`core.integrity`). Two checks guard every chunk
read:

- with a zstd codec, zstd's frame checksum (``ZstdCodec(checksum=True)``): flipped or truncated bytes
  fail to decode (Blosc and ``none`` have no byte checksum: there the digest table below catches
  damaged bytes, on checked reads only).
- A digest table: when a batch is written, the CRC-32 of each of its chunks' values (the decoded
  array in the store's dtype, C order) is recorded in the batch's ``done`` record, keyed by layer
  and unit-chunk index. A byte checksum cannot catch a chunk file replaced by another valid chunk
  of the same array (its own checksum is valid); the table does, because it says which values
  belong at which chunk position. Every read through :meth:`ActivationStore.layers` (the engine's
  blocks, the Dask block tasks, the float64 re-scoring's column gathers, decoding) goes through a
  :class:`~core.integrity.CheckedArray`, which reads whole chunks, compares each with its recorded
  digest and raises :class:`~core.integrity.StoreDamagedError` naming the store folder, the layer,
  the chunk (row, column), its file and what to do. Two chunks with identical values are
  interchangeable, so a swap the table cannot see changes no value. The CRC is 32 bits: a damaged
  chunk passes with probability 2^-32. Within :meth:`ActivationStore.chunk_cache`, the chunks that
  passed are kept in memory (a store that fits its budget only), so the later reads of one
  analysis decode and check nothing again; a damaged chunk is never kept.

Also: every chunk exists on disk (``write_empty_chunks`` in the arrays' own config when writing;
inside shards too), so a missing chunk or shard file is damage named as such, never read as the
fill value (NaN); a store of another format is refused (:class:`StoreFormatError`); :meth:`ActivationStore.verify` (and
:func:`verify_store`, which also reports stores that cannot be opened) checks a store end to end:
key, metadata files, coordinates, done records, every chunk.

Cost (``benchmarks/bench_store_read.py``, RESULTS.md): reading a 256-image, 2 x 65,536-unit float16
store (67 MB, zstd level 1, one file per chunk: format 4) in 16,384-unit blocks took 1.13-1.21x the
CPU time of the same reads from the bare Zarr arrays (zlib's CRC-32 runs at about 1.3 GB/s on one
core). Sharded stores read 1.16-1.26x slower than unsharded ones on a local disk
(``bench_extract.py --read-back``).
"""

from __future__ import annotations

import contextlib
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
from .integrity import (  # noqa: F401 - the store's errors and checks, importable from here too
    CacheSlot, CheckedArray, ChunkCache, ChunkProblem, StoreDamagedError, VerifyReport, broken_metadata, chunk_digest,
    metadata_error, read_json,
)
from .units import LayerUnits, UnitCatalogue

log = logging.getLogger(__name__)


def _quiet_consolidation() -> None:
    """Zarr warns at every consolidation that consolidated metadata is not in the v3 specification
    yet; it is what zarr-python and xarray both read, and a reader without it still opens the groups.
    The filter is process-wide and for that message only, set at import and again (it moves to the
    front; set twice it is still one filter) before each consolidation, where a ``catch_warnings()``
    exit elsewhere may have dropped it (pytest's collection does). One set inside
    ``warnings.catch_warnings()`` around the call was undone by any other thread entering and
    leaving its own (the sweep's decoder warm-up compiles with numba beside the store creation:
    `make demo` printed the warning twice)."""
    warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part", category=UserWarning,
                            module=r"zarr\.")


_quiet_consolidation()

#: 3: layer groups record ``prefix_tokens`` and stores are extracted with TF32 off on CUDA (format 2
#: stores had neither: a ViT's class token was not flagged, and GPU values differed from CPU ones
#: by up to 1e-3 of the largest value). 4: zstd checksums, every chunk written, a digest per chunk
#: in the done records (older stores cannot be checked and are refused). 5: the codec is part of the
#: key, and each layer's chunks of one image batch are stored as one shard file (``sharded``)
STORE_FORMAT = 5
DEFAULT_UNIT_CHUNK = 16384
#: the codec of new stores (benchmarks/RESULTS.md, bench_extract.py: the variants measured)
DEFAULT_CODEC = "blosc:lz4:shuffle:5"
#: bytes of checked chunks :meth:`ActivationStore.chunk_cache` keeps by default
DEFAULT_CACHE_BYTES = 512 << 20
_BLOSC_NAMES = ("lz4", "lz4hc", "blosclz", "zstd", "zlib")
_BLOSC_SHUFFLES = ("noshuffle", "shuffle", "bitshuffle")
CODEC_FORMS = ("none", "zstd:<level -7..22>",
               f"blosc:<{'|'.join(_BLOSC_NAMES)}>:<{'|'.join(_BLOSC_SHUFFLES)}>:<level 0..9>")


def parse_codec(codec, name: str = "codec") -> str:
    """The canonical form of a store codec: ``"none"``, ``"zstd:<level>"`` or ``"blosc:<cname>:<shuffle>:<level>"``.

    zstd levels run from -7 (fastest) to 22; Blosc compresses with ``cname`` after a byte
    (``shuffle``) or bit (``bitshuffle``) transposition of the elements, level 0 to 9.

    Raises:
        ValueError: naming ``name``, the value and the valid forms.
    """
    def bad(why: str = ""):
        return ValueError(f"{name}={codec!r} is not a store codec{why}; valid: {', '.join(CODEC_FORMS)} "
                          f"(e.g. 'zstd:1', 'blosc:lz4:bitshuffle:5')")

    if not isinstance(codec, str):
        raise bad()
    parts = codec.strip().lower().split(":")

    def level(text: str, low: int, high: int) -> int:
        try:
            value = int(text)
        except ValueError:
            raise bad(f" (level {text!r} is not an integer)") from None
        if not low <= value <= high:
            raise bad(f" (level {value} is outside {low}..{high})")
        return value

    if parts == ["none"]:
        return "none"
    if parts[0] == "zstd" and len(parts) == 2:
        return f"zstd:{level(parts[1], -7, 22)}"
    if parts[0] == "blosc" and len(parts) == 4:
        if parts[1] not in _BLOSC_NAMES:
            raise bad(f" (Blosc compressor {parts[1]!r} is not one of {list(_BLOSC_NAMES)})")
        if parts[2] not in _BLOSC_SHUFFLES:
            raise bad(f" (Blosc shuffle {parts[2]!r} is not one of {list(_BLOSC_SHUFFLES)})")
        return f"blosc:{parts[1]}:{parts[2]}:{level(parts[3], 0, 9)}"
    raise bad()


def codec_pipeline(codec: str) -> list:
    """The Zarr bytes-to-bytes codecs of a canonical codec (zstd with its frame checksum)."""
    from zarr.codecs import BloscCodec, ZstdCodec

    parts = parse_codec(codec).split(":")
    if parts[0] == "zstd":
        return [ZstdCodec(level=int(parts[1]), checksum=True)]
    if parts[0] == "blosc":
        return [BloscCodec(cname=parts[1], shuffle=parts[2], clevel=int(parts[3]))]
    return []


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
        codec: how chunks are compressed (:func:`parse_codec`; given in any case, kept canonical).
        sharded: each layer's chunks of one image batch in one shard file (one file per batch and
            layer; else one file per chunk).
        format: the store layout version (:data:`STORE_FORMAT`).

    Raises:
        ValueError: a bad codec (named).
    """

    model: str
    preprocessing: dict
    stimuli: str
    layers: tuple[str, ...]
    dtype: str = "float16"
    codec: str = DEFAULT_CODEC
    sharded: bool = True
    format: int = STORE_FORMAT

    def __post_init__(self):
        object.__setattr__(self, "codec", parse_codec(self.codec))
        if not isinstance(self.sharded, bool):
            raise ValueError(f"sharded={self.sharded!r}: expected True (one shard file per image batch and layer) "
                             f"or False (one file per chunk)")

    def as_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, default=list)  # what key_digest hashes

    def digest(self) -> str:
        return key_digest(asdict(self))


def key_digest(key: Mapping) -> str:
    """The folder name of a store whose ``key.json`` holds ``key`` (:meth:`StoreKey.digest`)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=list).encode()).hexdigest()[:24]


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class IncompleteStoreError(RuntimeError):
    """A store whose extraction has not finished (no COMPLETE marker)."""


class StoreFormatError(RuntimeError):
    """A store written in a format this version does not read."""


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
        self._digest_table: dict[str, np.ndarray] | None = None  # read from the done records on first use
        self._slot = CacheSlot()  # the chunk cache of :meth:`chunk_cache`, shared by every layers() array

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
               batch_size: int = 32, unit_chunk: int = DEFAULT_UNIT_CHUNK,
               attrs: Mapping | None = None) -> "ActivationStore":
        """Create the store for ``key``, or resume the one already there.

        Creation is staged in a temporary directory and moved into place in one rename, so a crash
        during creation leaves nothing that looks like a store.

        The codec and the sharding are the key's (:class:`StoreKey`); chunks are (``batch_size``
        images x ``unit_chunk`` units), a layer smaller than ``unit_chunk`` one chunk wide.

        Args:
            attrs: JSON-able provenance for the root group's attributes (e.g. the extraction's
                float32 policy); ignored when resuming.
        """
        import zarr

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
            c = min(unit_chunk, layer.size)
            g.create_array("activations", shape=(n, layer.size), chunks=(batch_size, c), dtype=key.dtype,
                           # one shard: a batch's rows x the whole layer (a multiple of the chunk width)
                           shards=(batch_size, -(-layer.size // c) * c) if key.sharded else None,
                           compressors=codec_pipeline(key.codec) or None,
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
        # (xarray asks for it; Zarr's warning about it filtered: _quiet_consolidation)
        _quiet_consolidation()
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
            if (path / "store.zarr").exists():
                raise StoreDamagedError.of(path, ChunkProblem("key.json", "missing: the store's identity is unknown"))
            raise FileNotFoundError(f"no activation store at {path} (no key.json)")
        key = read_json(path / "key.json", path, "the store's key")
        fmt = key.get("format", 0) if isinstance(key, dict) else None
        if isinstance(fmt, int) and fmt > STORE_FORMAT:
            raise StoreFormatError(f"store {path} has format {fmt}, written by a newer unitmatch than this one "
                                   f"({__version__}, format {STORE_FORMAT}): read it with that version")
        if fmt != STORE_FORMAT:
            raise StoreFormatError(
                f"store {path} has format {fmt}; this unitmatch ({__version__}) reads format {STORE_FORMAT} only "
                f"(format 4 added a checksum to every chunk, without which damage cannot be detected; format 5 "
                f"records the codec in the key and stores each image batch of a layer as one shard file). Delete "
                f"{path}: the next extraction writes a format-{STORE_FORMAT} store (in a new folder: the format is "
                f"part of a store's identity)")
        try:
            group = zarr.open_group(str(path / "store.zarr"), mode="r")
            layers = [LayerUnits.from_attrs({"layer": name, **group[name.replace("/", "_")].attrs})
                      for name in group.attrs["layers"]]
            first = group[layers[0].name.replace("/", "_")]
            store = cls(path, key, layers, first["image_id"][:], group.attrs["batch_size"], dict(group.attrs))
        except Exception as err:  # noqa: BLE001 - any failure to read the metadata is damage; name the file
            raise metadata_error(path, err, "store.zarr", "its Zarr metadata or image ids cannot be read") from err
        return store

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

    def done_records(self) -> dict[int, dict]:
        """``{batch: its done record}``: how it was made, and its chunk digests (``"chunks"``).

        Raises:
            StoreDamagedError: a record that is not valid JSON (naming its file).
        """
        records = {}
        for path in sorted((self.path / "done").glob("b*")):
            record = read_json(path, self.path, f"the done record of batch {int(path.name[1:])}")
            if not isinstance(record, dict):
                raise StoreDamagedError.of(self.path, ChunkProblem(
                    str(path.relative_to(self.path)), f"the done record is {type(record).__name__}, not a JSON object"))
            records[int(path.name[1:])] = record
        return records

    def extraction_records(self) -> dict[str, int]:
        """How the batches were extracted: ``"<device> on <host>, tf32 <policy>"`` -> number of batches."""
        counts: dict[str, int] = {}
        for info in self.done_records().values():
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

        arrays, layer = {}, None
        try:
            group = zarr.open_group(str(self.path / "store.zarr"), mode=mode)
            for layer in self.layer_units:
                arrays[layer.name] = group[layer.name.replace("/", "_")]["activations"]
        except Exception as err:  # noqa: BLE001 - metadata that cannot be read is damage; name the file
            if layer is None:  # the group itself
                raise metadata_error(self.path, err, "store.zarr", "its Zarr metadata cannot be read") from err
            raise metadata_error(self.path, err, f"store.zarr/{layer.name.replace('/', '_')}/activations",
                                 "the array's metadata cannot be read", layer.name) from err
        return arrays

    def writer(self, threads: int = 1) -> "BatchWriter":
        """A :class:`BatchWriter`; ``threads``: encoder threads for full batches' shards."""
        return BatchWriter(self, threads=threads)

    def finalize(self) -> None:
        """Write COMPLETE if every batch is done.

        Raises:
            IncompleteStoreError: batches are missing.
        """
        missing = self.pending_batches()
        if missing:
            raise IncompleteStoreError(f"store {self.path}: {len(missing)} batches not written, e.g. {missing[:5]}")
        atomic_write(self.path / "COMPLETE")

    # ------------------------------------------------------------------ reading
    def layers(self) -> dict[str, CheckedArray]:
        """``{layer: array (images, units)}`` for the matching engine; every read is checked (:class:`CheckedArray`).

        Raises:
            StoreDamagedError: a done record that is not valid JSON or lacks a layer's chunk digests.
        """
        digests = self._digests()
        return {name: CheckedArray(self.path, name, array, digests[name], self._slot)
                for name, array in self._arrays("r").items()}

    @property
    def nbytes(self) -> int:
        """Bytes of all the store's activations, as stored (uncompressed)."""
        return self.n_images * sum(layer.size for layer in self.layer_units) * self.itemsize

    @property
    def itemsize(self) -> int:
        """Bytes of one stored activation (2 for float16, 4 for float32)."""
        return np.dtype(self.key.get("dtype", "float16")).itemsize

    @contextlib.contextmanager
    def chunk_cache(self, budget_bytes: int = DEFAULT_CACHE_BYTES):
        """Within: reads of this store's layers (:meth:`layers`, whenever called) keep the chunks
        they checked in memory (:class:`core.integrity.ChunkCache`), so reading them again (a
        re-scoring, an assignment, a decoding after the matching) decodes nothing. On leaving, the
        cache is dropped. Nested uses share the outer cache.

        Only a store whose activations fit in ``budget_bytes`` (:attr:`nbytes`) is cached: a larger
        one is read in sweeps over all its chunks, which a smaller cache would copy in and evict
        before any is read again. For it the context caches nothing and yields None.

        Yields:
            The :class:`core.integrity.ChunkCache` (its ``hits``, ``misses`` and ``nbytes``), or None.
        """
        if self._slot.cache is not None:
            yield self._slot.cache
            return
        cache = ChunkCache(budget_bytes)  # checks the budget
        if self.nbytes > cache.budget:
            yield None
            return
        self._slot.cache = cache
        try:
            yield self._slot.cache
        finally:
            self._slot.cache = None

    def _digests(self) -> dict[str, np.ndarray]:
        """Per layer, the recorded CRC-32 of every chunk: (row chunks, column chunks) uint32."""
        if self._digest_table is None:
            records = self.done_records()
            table = {}
            for name, array in self._arrays("r").items():
                n_cols = -(-array.shape[1] // array.chunks[1])
                grid = np.zeros((self.n_batches, n_cols), dtype=np.uint32)
                for batch in range(self.n_batches):
                    record = records.get(batch)
                    file = f"done/b{batch:06d}"
                    if record is None:
                        raise StoreDamagedError.of(self.path, ChunkProblem(
                            file, f"the done record of batch {batch} is missing"))
                    row = record.get("chunks", {}).get(name) if isinstance(record.get("chunks"), dict) else None
                    try:
                        parsed = [int(h, 16) for h in row if isinstance(h, str) and len(h) == 8]
                    except (TypeError, ValueError):
                        parsed = []
                    if not isinstance(row, list) or len(parsed) != len(row) or len(row) != n_cols:
                        raise StoreDamagedError.of(self.path, ChunkProblem(
                            file, f"the done record of batch {batch} does not hold the {n_cols} chunk digests of "
                                  f"layer {name!r} as 8 hex digits each (got {row!r:.80})"))
                    grid[batch] = parsed
                table[name] = grid
            self._digest_table = table
        return self._digest_table

    def catalogue(self) -> UnitCatalogue:
        return UnitCatalogue(self.layer_units)

    @property
    def unit_chunk(self) -> int:
        """Units per Zarr chunk that matching blocks should be a multiple of.

        A layer smaller than the configured chunk is stored as one chunk of its own size and any
        block covers it whole, so the alignment that matters is the largest chunk of any layer.
        """
        return int(max(a.chunks[1] for a in self._arrays("r").values()))

    # ------------------------------------------------------------------ checking
    def verify(self, progress: bool = False) -> VerifyReport:
        """Check the whole store: key, metadata files, done records, then every chunk of every layer.

        Every chunk file must exist, decode (zstd checksum) and hold the values whose digest its
        batch's done record holds. Reads the store once, a batch of one layer at a time on each of
        :func:`core.integrity.read_threads` threads.

        Returns:
            the report: ``ok``, or every problem found (nothing is raised for damage).
        """
        from tqdm.auto import tqdm

        from .integrity import READ_BYTES, _on_threads, read_threads

        report = VerifyReport(self.path)
        problems = report.problems
        expected = key_digest(self.key)
        if expected != self.path.name:
            problems.append(ChunkProblem("key.json", f"the key's digest is {expected}, not the folder's name "
                                                     f"{self.path.name}: the key was edited or the folder renamed"))
        problems += broken_metadata(self.path)
        problems += self._check_coordinates()
        if not self.complete:
            problems.append(ChunkProblem("COMPLETE", f"missing: {len(self.pending_batches())} of {self.n_batches} "
                                                     f"image batches are not written"))
        try:
            arrays = self.layers()
        except StoreDamagedError as err:
            problems += err.problems
            return report
        for name, a in arrays.items():
            n_cols = a.digests.shape[1]
            bar = tqdm(total=self.n_batches, desc=f"verify {name}", unit="batch", disable=not progress)

            def check(i: int, a=a, n_cols=n_cols, bar=bar) -> list[ChunkProblem]:
                _, found = a.check_chunks(range(i, i + 1), range(n_cols))
                missing = {p.chunk for p in found}
                # every chunk is written, so a missing file is damage even where the fill value matches
                found += [a._problem(i, j, a._missing) for j in range(n_cols)
                          if (i, j) not in missing and not a.chunk_file(i, j).exists()]
                with bar.get_lock():  # (updated from the read threads)
                    bar.update()
                return found

            # batches on the read threads (decoding, file reads and CRC-32s release the GIL), at most
            # READ_BYTES of decoded batches at once; the problems in batch order
            batch_bytes = a.chunks[0] * a.shape[1] * np.dtype(a.dtype).itemsize
            threads = min(read_threads(), self.n_batches, max(1, READ_BYTES // max(1, batch_bytes)))
            with bar:
                for found in _on_threads(check, range(self.n_batches), threads):
                    problems += found
            report.n_chunks += n_cols * self.n_batches
        return report


    def _check_coordinates(self) -> list[ChunkProblem]:
        """The coordinate arrays of every layer hold what they are defined to (image ids, unit indices, dims)."""
        import zarr

        problems = []
        group = zarr.open_group(str(self.path / "store.zarr"), mode="r")
        for layer in self.layer_units:
            name = layer.name.replace("/", "_")
            local = np.unravel_index(np.arange(layer.size), layer.shape)
            expected = {"image_id": self.image_ids, "unit": np.arange(layer.size), **dict(zip(layer.dims, local))}
            for coord, want in expected.items():
                file = f"store.zarr/{name}/{coord}"
                try:
                    got = group[name][coord][:]
                except Exception as err:  # noqa: BLE001 - reported, like every other damage
                    problems.append(ChunkProblem(file, f"cannot be read ({type(err).__name__}: {err})", layer.name))
                    continue
                if got.shape != want.shape or not np.array_equal(got, want):
                    what = ("the image ids of the first layer" if coord == "image_id" else
                            f"the {coord} of each unit of shape {layer.shape}")
                    problems.append(ChunkProblem(file, f"the coordinate does not hold {what}", layer.name))
        return problems


def verify_store(path: str | Path, progress: bool = False) -> VerifyReport:
    """:meth:`ActivationStore.verify` of the store at ``path``, also for a store that cannot be opened.

    A store with unreadable metadata or a wrong format is reported as damaged, not raised.

    Raises:
        FileNotFoundError: no store at ``path``.
    """
    path = Path(path)
    try:
        store = ActivationStore._load(path)
    except StoreDamagedError as err:
        return VerifyReport(path, 0, err.problems)
    except StoreFormatError as err:
        return VerifyReport(path, 0, [ChunkProblem("key.json", str(err))])
    return store.verify(progress=progress)


class BatchWriter:
    """Writes whole image batches (all layers), then marks each done with the digests of its chunks.

    :meth:`write` writes one batch, layer after layer; a writer pool calls :meth:`write_layer` for
    the layers of a batch concurrently (any threads: each call writes its own chunks) and
    :meth:`mark_done` once all have returned. Either way a batch is trusted only once its ``done``
    record exists, written after all its layers. A full batch of a sharded layer is one shard,
    encoded by :class:`core._shards.ShardWriter` (Zarr's own bytes, 1.8-2.4x faster than through
    Zarr with 2 threads on 2 cores); other writes go through Zarr.
    """

    def __init__(self, store: ActivationStore, threads: int = 1):
        """``threads``: encoder threads a full batch's shard is compressed on (1: in the calling thread)."""
        from ._shards import ShardWriter

        self.store = store
        # every chunk of a batch is written, even one equal to the fill value: a missing file is then damage
        self.arrays = {name: a.with_config({"write_empty_chunks": True}) for name, a in store._arrays("r+").items()}
        # a full batch of a sharded layer is one shard, encoded and written by us (core/_shards.py)
        self.shards = {name: ShardWriter.for_array(a) for name, a in self.arrays.items()}
        self.pool = None
        if threads > 1 and any(self.shards.values()):
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(threads, thread_name_prefix="store-encoder")

    def close(self) -> None:
        """Stop the encoder threads (a writer with ``threads`` > 1; later writes encode in the caller)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None

    def write(self, batch: int, activations: Mapping[str, np.ndarray], info: Mapping | None = None) -> None:
        """Write one image batch of every layer, then its ``done`` record.

        The record holds ``info`` (how the batch was made) and ``chunks``: per layer, the digest
        (:func:`chunk_digest`) of each unit chunk of the batch, of the values as stored (in the
        store's dtype).
        """
        info = self._check_info(info)
        digests = {layer.name: self.write_layer(batch, layer.name, activations[layer.name])
                   for layer in self.store.layer_units}
        self.mark_done(batch, digests, info)

    def write_layer(self, batch: int, layer: str, values: np.ndarray) -> list[str]:
        """Write one layer's rows of one image batch; returns the digests of its unit chunks, in order.

        Raises:
            ValueError: ``values`` is not (the batch's images, the layer's units).
        """
        array = self.arrays[layer]
        rows = self.store.batch_rows(batch)
        values = np.asarray(values, dtype=array.dtype)  # exactly what is stored
        expected = (rows.stop - rows.start, array.shape[1])
        if values.shape != expected:
            raise ValueError(f"batch {batch} of layer {layer!r} has shape {values.shape}; expected {expected}")
        shard = self.shards.get(layer)
        if shard is not None and expected[0] == shard.rows:  # a full batch: one whole shard
            return shard.write(batch, values, self.pool)
        array[rows] = values
        c = array.chunks[1]
        return [chunk_digest(values[:, j:j + c]) for j in range(0, array.shape[1], c)]

    def mark_done(self, batch: int, digests: Mapping[str, list[str]], info: Mapping | None = None) -> None:
        """The batch's ``done`` record: ``info`` and the chunk digests of every layer (all must be written).

        Raises:
            ValueError: a layer's digests are missing (the batch is not complete).
        """
        info = self._check_info(info)
        missing = [layer.name for layer in self.store.layer_units if layer.name not in digests]
        if missing:
            raise ValueError(f"batch {batch} cannot be marked done: layers {missing} were not written")
        chunks = {layer.name: list(digests[layer.name]) for layer in self.store.layer_units}
        atomic_write(self.store.path / "done" / f"b{batch:06d}", json.dumps({**info, "chunks": chunks}).encode())

    @staticmethod
    def _check_info(info: Mapping | None) -> dict:
        info = dict(info or {})
        if "chunks" in info:
            raise ValueError("info must not hold the key 'chunks': the done record keeps the chunk digests there")
        return info


def atomic_write(path: Path, content: bytes = b"") -> None:
    """Write ``content`` to ``path`` so that a reader sees the previous file or the whole new one, never
    a part: written beside it under a hidden name, then renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(content)
    os.replace(tmp, path)
