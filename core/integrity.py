"""Integrity of activation stores: chunk digests, checked reads, and what damage is reported as.

:mod:`core.store` states the design (store format 4); this module holds its parts: the digest of a
chunk (:func:`chunk_digest`, a CRC-32 of its values), :class:`CheckedArray` (a layer's Zarr array
whose every read is checked chunk by chunk against the digests recorded when it was written),
:class:`ChunkCache` (checked chunks kept in memory while a store is read several times over),
:class:`StoreDamagedError` and the :class:`ChunkProblem` / :class:`VerifyReport` that name what is
damaged: the store folder, the layer, the chunk, its file, and what to do.
"""

from __future__ import annotations

import json
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

try:  # ISA-L's CRC-32: zlib's polynomial and values, about 5x faster (benchmarks/RESULTS.md)
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # a declared dependency; missing only in hand-made environments
    _crc32 = zlib.crc32


class StoreDamagedError(RuntimeError):
    """A store whose files do not hold what was written; the message names the store, layer and chunk.

    Attributes:
        path: the store folder.
        problems: the :class:`ChunkProblem` found (the first one for a read, all of them for verify).
    """

    def __init__(self, message: str, path: str | Path | None = None, problems: Sequence["ChunkProblem"] = ()):
        super().__init__(message)
        self.path = None if path is None else Path(path)
        self.problems = list(problems)

    def __reduce__(self):  # picklable with its attributes (Ray sends it back from block tasks)
        return type(self), (str(self), self.path, self.problems)

    @classmethod
    def of(cls, path: Path, problem: "ChunkProblem") -> "StoreDamagedError":
        return cls(f"activation store {path} is damaged: {problem.describe()}. {_remedy(path)}", path, [problem])


def _remedy(path: Path) -> str:
    return (f"Delete {path} to re-extract it (`unitmatch stage=verify` or ActivationStore.verify() lists every "
            f"damaged chunk of a store)")


@dataclass(frozen=True)
class ChunkProblem:
    """One damaged part of a store: a chunk (``layer`` and ``chunk`` = (row, column) chunk index) or a file."""

    file: str  # relative to the store folder
    problem: str
    layer: str | None = None
    chunk: tuple[int, int] | None = None
    rows: tuple[int, int] | None = None  # image rows [start, stop) of the chunk
    units: tuple[int, int] | None = None  # units [start, stop) of the chunk, within its layer

    def describe(self) -> str:
        if self.layer is None:
            return f"{self.file}: {self.problem}"
        if self.chunk is None:
            return f"layer {self.layer!r}, file {self.file}: {self.problem}"
        where = f"layer {self.layer!r}, chunk {self.chunk}"
        if self.rows is not None:
            where += f" (images {self.rows[0]}-{self.rows[1] - 1}, units {self.units[0]}-{self.units[1] - 1})"
        return f"{where}, file {self.file}: {self.problem}"


@dataclass
class VerifyReport:
    """What :meth:`ActivationStore.verify` found: ``ok`` when nothing is damaged."""

    path: Path
    n_chunks: int = 0
    problems: list[ChunkProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        if self.ok:
            return f"OK {self.path} ({self.n_chunks} chunks checked)"
        lines = [f"DAMAGED {self.path}: {len(self.problems)} problem(s) in {self.n_chunks} chunks checked"]
        lines += [f"  {p.describe()}" for p in self.problems]
        lines.append(f"  {_remedy(self.path)}")
        return "\n".join(lines)


def chunk_digest(values: np.ndarray) -> str:
    """CRC-32 (8 hex digits) of a chunk's values in C order: what the done records hold per chunk."""
    return f"{_crc(values):08x}"


def check_out(out: np.ndarray, shape: tuple, dtype, what: str) -> None:
    """Raise ValueError unless ``out`` is a writeable ``shape`` array of ``dtype`` (a read's given
    output: values cast into another dtype would fail their CRC-32 as if damaged); ``what`` names
    the read in the message."""
    if out.shape != tuple(shape) or out.dtype != dtype or not out.flags.writeable:
        raise ValueError(f"out must be a writeable {tuple(shape)} {np.dtype(dtype)} array for {what}; got {out.shape} "
                         f"{out.dtype}" + ("" if out.flags.writeable else ", read-only"))


def _crc(values: np.ndarray) -> int:
    """zlib's CRC-32 of the values' bytes in C order (through ISA-L where it is installed)."""
    return _crc32(np.ascontiguousarray(values).data) & 0xFFFFFFFF


def read_json(path: Path, store: Path, what: str):
    """A JSON file of a store, or :class:`StoreDamagedError` naming it."""
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as err:
        raise StoreDamagedError.of(store, ChunkProblem(str(path.relative_to(store)),
                                                       f"{what} is not valid JSON ({err})")) from err


class ChunkCache:
    """Checked chunks of a store, kept in memory within a byte budget (least recently used out first).

    An analysis reads the same chunks several times: the matching reads every block, then the
    float64 re-scoring, the strict assignment and the decoding each read scattered columns, and
    a column read decodes (and checks) its whole chunk of every row chunk. With a cache, a chunk
    is decoded and checked once while it stays in the cache. Only chunks whose digest matched are
    put in, as copies; a complete store is never written again, so what is kept stays true.
    Thread-safe (Dask's threaded scheduler reads blocks from several threads).
    """

    def __init__(self, budget_bytes: int):
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, np.integer)) or budget_bytes < 0:
            raise ValueError(f"budget_bytes must be an integer >= 0 (bytes of chunks kept); got {budget_bytes!r}")
        self.budget = int(budget_bytes)
        self.nbytes = 0
        self.hits = self.misses = 0
        self._chunks: "OrderedDict[tuple, np.ndarray]" = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"<ChunkCache {len(self._chunks)} chunks, {self.nbytes / 2**20:.0f} of {self.budget / 2**20:.0f} MiB; "
                f"{self.hits} hits, {self.misses} misses>")

    def get(self, key: tuple) -> np.ndarray | None:
        with self._lock:
            value = self._chunks.get(key)
            if value is None:
                self.misses += 1
            else:
                self.hits += 1
                self._chunks.move_to_end(key)
            return value

    def put(self, key: tuple, value: np.ndarray) -> None:
        if value.nbytes > self.budget:
            return
        with self._lock:
            old = self._chunks.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            self._chunks[key] = value
            self.nbytes += value.nbytes
            while self.nbytes > self.budget:
                _, dropped = self._chunks.popitem(last=False)
                self.nbytes -= dropped.nbytes


class CacheSlot:
    """Where the arrays of one store find its current :class:`ChunkCache` (None: reads are not
    cached); the store sets and clears it (:meth:`core.store.ActivationStore.chunk_cache`)."""

    def __init__(self):
        self.cache: ChunkCache | None = None


class CheckedArray:
    """One layer's activations (images x units) on disk, whose every read is checked chunk by chunk.

    Reads whole chunks, compares each with the digest recorded when it was written and raises
    :class:`StoreDamagedError` (store folder, layer, chunk, file, remedy) on a chunk that cannot be
    decoded, is missing or holds other values. Supports what the engine uses: basic indexing with
    integers and slices of step >= 1 (``a[:, start:stop]``, ``a[rows]``, ``a[:]``) and
    ``a.oindex[rows, columns]`` with a slice of rows and integer columns. Picklable (Dask-on-Ray;
    a pickled copy reads without the cache). With a cache in ``slot`` (see :class:`ChunkCache`),
    chunks checked once are served from memory while they stay in it.
    """

    def __init__(self, store_path: Path, layer: str, array, digests: np.ndarray, slot: CacheSlot | None = None):
        self.store_path, self.layer, self.array = Path(store_path), layer, array
        self.digests = digests  # (row chunks, column chunks) uint32: the recorded CRC-32 of each chunk
        self.shape = tuple(array.shape)
        self.chunks = tuple(array.chunks)
        self.dtype = array.dtype
        self.ndim = 2
        self.slot = slot if slot is not None else CacheSlot()
        self._reader = None  # core._shards.ShardReader, made at the first read (False: none for this layout)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["slot"] = CacheSlot()  # a cache stays in its process
        state["_reader"] = None
        return state

    def _shard_reader(self):
        if self._reader is None:
            from ._shards import ShardReader

            self._reader = ShardReader.for_array(self.array) or False
        return self._reader

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"<CheckedArray {self.layer!r} {self.shape} {self.dtype} chunks {self.chunks} of {self.store_path}>"

    def chunk_file(self, i: int, j: int) -> Path:
        """The file that holds chunk (i, j): its own, or its shard's in a sharded array."""
        shards = self.array.shards
        if shards is not None:
            (r, c), (sr, sc) = self.chunks, shards
            i, j = i * r // sr, j * c // sc
        return self.store_path / "store.zarr" / self.array.path / self.array.metadata.encode_chunk_key((i, j))

    @property
    def _missing(self) -> str:
        return "its shard file is missing" if self.array.shards is not None else "its chunk file is missing"

    def _problem(self, i: int, j: int, text: str) -> ChunkProblem:
        (r, c) = self.chunks
        return ChunkProblem(str(self.chunk_file(i, j).relative_to(self.store_path)), text, self.layer, (i, j),
                            (i * r, min((i + 1) * r, self.shape[0])), (j * c, min((j + 1) * c, self.shape[1])))

    def check_chunks(self, rows: range, cols: range, out: np.ndarray | None = None
                     ) -> tuple[np.ndarray | None, list[ChunkProblem]]:
        """The values of row chunks ``rows`` x column chunks ``cols`` (in ``out`` where given: the
        region's shape, trimmed to the array's bounds), and the problems of those chunks.

        The values are None when a chunk could not be decoded.
        """
        (r, c), (n, m) = self.chunks, self.shape
        region = (slice(rows.start * r, min(rows.stop * r, n)), slice(cols.start * c, min(cols.stop * c, m)))
        if out is not None:
            check_out(out, (region[0].stop - region[0].start, region[1].stop - region[1].start), self.dtype,
                      f"row chunks {rows} x column chunks {cols} of layer {self.layer!r}")
        data = crcs = None
        reader = self._shard_reader()
        if reader:  # whole-layer shards: read by core/_shards.py, without Zarr's event loop
            try:
                data, crcs = reader.read(rows, cols, out)  # and each chunk's CRC-32, taken while in cache
            except Exception:  # noqa: BLE001 - Zarr reads it again below and says what is wrong
                data = crcs = None
        try:
            if data is None:
                data = np.asarray(self.array[region])
                if out is not None:
                    out[...] = data
                    data = out
        except Exception:  # noqa: BLE001 - find the chunk(s) that fail, or re-raise
            problems = []
            for i in rows:
                for j in cols:
                    try:
                        self.array[i * r:(i + 1) * r, j * c:(j + 1) * c]
                    except Exception as chunk_err:  # noqa: BLE001
                        missing = not self.chunk_file(i, j).exists()
                        problems.append(self._problem(i, j, self._missing if missing else
                                                      f"it cannot be decoded ({type(chunk_err).__name__}: "
                                                      f"{chunk_err})"))
            if not problems:
                raise
            return None, problems
        problems = []
        for i in rows:
            for j in cols:
                y, x = (i - rows.start) * r, (j - cols.start) * c
                got = _crc(data[y:y + r, x:x + c]) if crcs is None else int(crcs[i - rows.start, j - cols.start])
                want = int(self.digests[i, j])
                if got != want:
                    if not self.chunk_file(i, j).exists():
                        problems.append(self._problem(i, j, self._missing))
                    else:
                        problems.append(self._problem(
                            i, j, f"it holds other values than were written there (CRC-32 {got:08x}, recorded "
                                  f"{want:08x}): a chunk file swapped, overwritten or corrupted"))
        return data, problems

    def _read(self, rows: range, cols: range, out: np.ndarray | None = None) -> np.ndarray:
        """Row chunks ``rows`` x column chunks ``cols``, checked (into ``out`` where given)."""
        cache = self.slot.cache
        if cache is not None:
            data = self._cached(cache, rows, cols)
            if data is not None:
                if out is not None:
                    out[...] = data
                    return out
                return data
        data, problems = self.check_chunks(rows, cols, out)
        if problems:
            raise StoreDamagedError.of(self.store_path, problems[0])
        if cache is not None:
            (r, c) = self.chunks
            for i in rows:
                for j in cols:
                    y, x = (i - rows.start) * r, (j - cols.start) * c
                    cache.put((self.layer, i, j), data[y:y + r, x:x + c].copy())
        return data

    def _cached(self, cache: ChunkCache, rows: range, cols: range) -> np.ndarray | None:
        """The region from the cache when every chunk of it is there, else None."""
        (r, c), (n, m) = self.chunks, self.shape
        pieces = []
        for i in rows:
            for j in cols:
                piece = cache.get((self.layer, i, j))
                if piece is None:
                    return None
                pieces.append((i, j, piece))
        out = np.empty((min(rows.stop * r, n) - rows.start * r, min(cols.stop * c, m) - cols.start * c), self.dtype)
        for i, j, piece in pieces:
            y, x = (i - rows.start) * r, (j - cols.start) * c
            out[y:y + piece.shape[0], x:x + piece.shape[1]] = piece
        return out

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if len(key) > 2:
            raise IndexError(f"too many indices for the 2-D activations of layer {self.layer!r}: {key!r}")
        key = key + (slice(None),) * (2 - len(key))
        bounds, local = [], []
        for axis, (k, n, c) in enumerate(zip(key, self.shape, self.chunks)):
            if isinstance(k, (int, np.integer)) and not isinstance(k, bool):
                i = int(k) + n if k < 0 else int(k)
                if not 0 <= i < n:
                    raise IndexError(f"index {k} is out of bounds for axis {axis} of size {n} (layer {self.layer!r})")
                r, loc = range(i, i + 1), None
            elif isinstance(k, slice) and (k.step is None or k.step >= 1):
                r = range(*k.indices(n))
                loc = slice(0, (len(r) - 1) * r.step + 1, r.step) if len(r) else None
            else:
                raise TypeError(f"activations of layer {self.layer!r} are read with integers and slices of step >= 1 "
                                f"(and .oindex[rows, columns]); got {k!r}")
            if len(r) == 0:
                return np.empty(tuple(len(range(*kk.indices(nn))) for kk, nn in zip(key, self.shape)
                                      if isinstance(kk, slice)), dtype=self.dtype)
            first = r.start // c
            chunk_range = range(first, (r[-1]) // c + 1)
            offset = r.start - first * c
            bounds.append(chunk_range)
            local.append(offset if loc is None else slice(offset + loc.start, offset + loc.stop, loc.step))
        data = self._read(*bounds)
        out = data[tuple(local)]
        return out if out.shape == data.shape else np.array(out)

    def read_units(self, start: int, stop: int, threads: int = 1, out: np.ndarray | None = None) -> np.ndarray:
        """Every image's values of units ``start .. stop`` (``a[:, start:stop]``, checked), read on up
        to ``threads`` threads in tiles of whole chunks (contiguous groups of column chunks, then of
        row chunks: a block of one chunk's width still has a row chunk per image batch; decoding,
        file reads and CRC-32 checks release the GIL), each tile of whole chunks read into its place
        in the result (no tile array in between): ``out`` where given (images, units) of the layer's
        dtype, e.g. a pinned staging buffer. For a block task whose products run on a GPU, where one
        thread's decoding of its block is the host's whole share of the work, and
        :func:`core.units.iter_blocks`' ``read_threads``."""
        start, stop, _ = slice(start, stop).indices(self.shape[1])
        stop = max(start, stop)
        (r, c), n = self.chunks, self.shape[0]
        if out is not None:
            check_out(out, (n, stop - start), self.dtype, f"units {start}..{stop} of layer {self.layer!r}")
        first, last = start // c, (max(stop, start + 1) - 1) // c
        threads = max(1, int(threads))
        col_groups = min(threads, last - first + 1)
        row_groups = min(max(1, threads // col_groups), -(-n // r))
        if stop <= start or n == 0:
            return np.empty((n, stop - start), dtype=self.dtype) if out is None else out
        if col_groups * row_groups <= 1 and out is None:
            return np.asarray(self[:, start:stop])
        if out is None:
            out = np.empty((n, stop - start), dtype=self.dtype)
        tiles = [(rows, cols) for rows in np.array_split(np.arange(-(-n // r)), row_groups)
                 for cols in np.array_split(np.arange(first, last + 1), col_groups)]

        def one(tile) -> None:
            rows, cols = tile
            y0, y1 = int(rows[0]) * r, min(n, (int(rows[-1]) + 1) * r)
            g0, g1 = max(start, int(cols[0]) * c), min(stop, (int(cols[-1]) + 1) * c)
            dest = out[y0:y1, g0 - start:g1 - start]
            if g0 == int(cols[0]) * c and g1 == min(self.shape[1], (int(cols[-1]) + 1) * c):
                # whole chunks: read into their place in the block (no tile array in between; a chunk
                # decodes straight into it where its rows are one run: a block one chunk wide)
                self._read(range(int(rows[0]), int(rows[-1]) + 1), range(int(cols[0]), int(cols[-1]) + 1), dest)
            else:  # part of a chunk at an end of the range: read, then copied
                dest[...] = self[y0:y1, g0:g1]

        _on_threads(one, tiles, len(tiles))
        return out

    @property
    def oindex(self) -> "_CheckedOIndex":
        return _CheckedOIndex(self)

    def __array__(self, dtype=None, copy=None):
        values = self[:]
        return values if dtype is None else values.astype(dtype)


class _CheckedOIndex:
    """``a.oindex[rows, columns]``: a slice of rows, integer columns (any order, repeats allowed).

    The columns are read a column chunk at a time (every row chunk of it, checked), the column
    chunks on up to :func:`read_threads` threads (the decoding, the file reads and the CRC-32 checks
    release the GIL) and at most :data:`READ_BYTES` of decoded chunks at once; each chunk's columns
    go to a slice of the output in sorted column order, then to their places. Reading the
    candidates of a permutation null (columns spread over every chunk of a layer) one chunk after
    the other with boolean scatters took about 4x a whole read of the layer (benchmarks/RESULTS.md,
    "the float64 re-scoring's read of a permutation null's candidates").
    """

    def __init__(self, array: CheckedArray):
        self.a = array

    def __getitem__(self, key) -> np.ndarray:
        a = self.a
        rows, cols = key if isinstance(key, tuple) and len(key) == 2 else (key, slice(None))
        if not isinstance(rows, slice):
            raise TypeError(f"oindex of layer {a.layer!r} takes a slice of rows; got {rows!r}")
        if isinstance(cols, slice):
            return a[rows, cols]
        cols = np.asarray(cols, dtype=np.int64).reshape(-1)
        if cols.size and (cols.min() < -a.shape[1] or cols.max() >= a.shape[1]):
            raise IndexError(f"columns out of bounds for layer {a.layer!r} with {a.shape[1]} units")
        cols = np.where(cols < 0, cols + a.shape[1], cols)
        c = a.chunks[1]
        first = a[rows, 0:0]  # the row selection's length and checks, without reading
        out = np.empty((first.shape[0], cols.size), dtype=a.dtype)
        if not cols.size:
            return out
        order = np.argsort(cols, kind="stable")
        ordered = cols[order]
        in_order = bool((order == np.arange(order.size)).all())
        dest = out if in_order else np.empty_like(out)
        chunk_of = ordered // c
        starts = np.flatnonzero(np.r_[True, chunk_of[1:] != chunk_of[:-1]])
        ends = np.r_[starts[1:], ordered.size]

        def one(p0: int, p1: int) -> None:  # the columns of one column chunk: dest[:, p0:p1]
            j = int(chunk_of[p0])
            # np.take along the columns: 7x faster than a fancy index (block[:, local]) here
            dest[:, p0:p1] = np.take(a[rows, j * c:(j + 1) * c], ordered[p0:p1] - j * c, axis=1)

        chunk_bytes = out.shape[0] * c * out.itemsize  # the rows read, one column chunk wide
        threads = min(read_threads(), starts.size, max(1, READ_BYTES // max(1, chunk_bytes)))
        _on_threads(lambda span: one(*span), list(zip(starts.tolist(), ends.tolist())), threads)
        if not in_order:  # column k of the request is dest's column inverse[k]
            inverse = np.empty_like(order)
            inverse[order] = np.arange(order.size)
            np.take(dest, inverse, axis=1, out=out, mode="clip")  # "clip": not buffered (indices valid)
        return out


def _on_threads(fn, items: list, threads: int) -> list:
    """``[fn(item) for item in items]``, on ``threads`` threads (here where 1); the first error is
    raised once the items already started have ended (the others are not started)."""
    if threads <= 1:
        return [fn(item) for item in items]
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(threads, thread_name_prefix="unitmatch-reads")
    try:
        results = list(pool.map(fn, items))
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return results


#: the most threads a scattered-column read uses
MAX_READ_THREADS = 16
#: the most bytes of decoded column chunks a scattered-column read holds at once (one chunk column of
#: a 3200-image float16 store with 16,384-unit chunks is 105 MB: 16 threads need 1.7 GB)
READ_BYTES = 2 << 30


def read_threads() -> int:
    """Threads for a read of scattered columns (:class:`CheckedArray`'s ``oindex``): torch's
    intra-op threads (``OMP_NUM_THREADS`` where it is set, as Ray sets it for its workers; else the
    cores), within :func:`usable_cores`, at most :data:`MAX_READ_THREADS`."""
    import torch

    return max(1, min(usable_cores(), torch.get_num_threads(), MAX_READ_THREADS))


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (which SLURM sets), else the machine's."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def broken_metadata(path: Path) -> list[ChunkProblem]:
    """The metadata files (``zarr.json``) of a store that are not valid JSON, or are missing."""
    zarr_root = path / "store.zarr"
    problems = []
    files = sorted(zarr_root.rglob("zarr.json")) if zarr_root.is_dir() else []
    if zarr_root / "zarr.json" not in files:
        problems.append(ChunkProblem("store.zarr/zarr.json", "the store's root metadata file is missing"))
    for file in files:
        try:
            json.loads(file.read_bytes())
        except (ValueError, UnicodeDecodeError) as err:
            problems.append(ChunkProblem(str(file.relative_to(path)), f"the Zarr metadata is not valid JSON ({err})"))
    return problems


def metadata_error(path: Path, err: BaseException, file: str, what: str, layer: str | None = None) -> "StoreDamagedError":
    """The error for a store whose metadata could not be read: its broken ``zarr.json`` if one is
    found (:func:`broken_metadata`), else ``file`` (relative to the store) with ``what`` and ``err``."""
    broken = broken_metadata(path)
    problem = broken[0] if broken else ChunkProblem(file, f"{what} ({type(err).__name__}: {err})", layer)
    return StoreDamagedError.of(path, problem)
