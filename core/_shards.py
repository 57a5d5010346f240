"""Whole shards of an activation store, encoded by our threads and written as one file each.

A sharded store (:meth:`core.store.ActivationStore.create`) holds one shard per image batch x layer:
the batch's rows of the whole layer, cut into inner chunks of ``unit_chunk`` units. Zarr-python
writes such a shard through its single event-loop thread, which hands each inner chunk to its own
pool and assembles the shard there: on the 2-core VM uncompressed writes were no faster than lz4
ones, and on an H200 node 16 writer threads wrote no faster than 8 (benchmarks/RESULTS.md). Here a
full batch's shard is encoded in the calling thread, or over a pool of encoder threads (numcodecs
releases the GIL while it compresses), into the bytes that Zarr's sharding format specifies
(Zarr v3 ``sharding_indexed``, index at the end):

    inner chunk 0 | inner chunk 1 | ... | index: (offset, nbytes) per inner chunk, uint64 little
    endian, in C order | CRC-32C of the index, uint32 little endian

Each inner chunk is the (rows, unit_chunk) block in C order, the last one padded with the array's
fill value, through the array's own codecs (bytes, little endian; then Blosc, Zstd or nothing).
tests/test_store.py checks the files equal Zarr's own byte for byte for every codec form, and the
reads. :class:`ShardReader` reads chunks of such shards back the same way (the index, its CRC-32C,
then each chunk's bytes, decoded in the calling thread, and each chunk's CRC-32 while it is in cache); the checked reads of
:class:`core.integrity.CheckedArray` use it and fall back to Zarr, which names what is wrong, on
anything unexpected. Arrays of any other layout (unsharded, another index layout, codecs this module
does not know, a store that is not a local folder) get neither; their reads and writes go through Zarr.
"""

from __future__ import annotations

from concurrent.futures import Executor
from pathlib import Path

import google_crc32c  # what Zarr's Crc32cCodec uses
import numpy as np
from numcodecs import Blosc

from .integrity import _crc, check_out, chunk_digest

#: inner chunks per encoding task when a shard's chunks are shared over a pool
_CHUNKS_PER_TASK = 4


class _Shards:
    """The whole-layer shards of one sharded Zarr array: where they are and how they are cut and coded."""

    def __init__(self, folder: Path, array, rows: int, width: int, chunk: int, dtype: np.dtype, fill, codec):
        self.folder = folder  # the array's folder
        self.key = array.metadata.encode_chunk_key  # (shard row, 0) -> the shard file's path in it
        self.n_images = array.shape[0]
        self.rows, self.width, self.chunk = rows, width, chunk
        self.dtype, self.fill, self.codec = dtype, fill, codec
        self.n_chunks = -(-width // chunk)

    @classmethod
    def for_array(cls, array):
        """One for ``array`` (a Zarr array), or None where :func:`_layout` finds another layout."""
        layout = _layout(array)
        return None if layout is None else cls(*layout)


class ShardWriter(_Shards):
    """Writes whole shards (a full image batch x the whole layer) of one sharded Zarr array."""

    def write(self, shard_row: int, values: np.ndarray, pool: Executor | None = None) -> list[str]:
        """Write shard ``shard_row`` (image batch) from ``values`` (rows, width); returns the digests
        (:func:`core.integrity.chunk_digest`) of its unit chunks, of the values as given, in order."""
        if values.shape != (self.rows, self.width):
            raise ValueError(f"a whole shard is ({self.rows}, {self.width}); got {values.shape}")
        values = np.asarray(values, dtype=self.dtype)
        starts = range(0, self.n_chunks, _CHUNKS_PER_TASK)
        if pool is None or self.n_chunks <= _CHUNKS_PER_TASK:
            parts = [self._encode(values, j, min(j + _CHUNKS_PER_TASK, self.n_chunks)) for j in starts]
        else:
            parts = list(pool.map(lambda j: self._encode(values, j, min(j + _CHUNKS_PER_TASK, self.n_chunks)),
                                  starts))
        encoded = [e for part in parts for e, _ in part]
        digests = [d for part in parts for _, d in part]
        sizes = np.array([len(e) for e in encoded], dtype=np.uint64)
        index = np.zeros((self.n_chunks, 2), dtype="<u8")  # (offset, nbytes) of each inner chunk
        index[1:, 0] = np.cumsum(sizes)[:-1]
        index[:, 1] = sizes
        index_bytes = index.tobytes()
        path = self.folder / self.key((int(shard_row), 0))
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.writelines(encoded)
            f.write(index_bytes)
            f.write(google_crc32c.value(index_bytes).to_bytes(4, "little"))
        return digests

    def _encode(self, values: np.ndarray, first: int, stop: int) -> list[tuple[bytes, str]]:
        """Inner chunks ``first:stop``: their encoded bytes and the digest of their values."""
        out = []
        for j in range(first, stop):
            a = j * self.chunk
            b = min(a + self.chunk, self.width)
            part = values[:, a:b]
            if b - a == self.chunk:
                block = np.ascontiguousarray(part)
                digest = chunk_digest(block)
            else:  # the layer's last chunk: padded with the fill value, as Zarr stores it
                block = np.full((self.rows, self.chunk), self.fill, dtype=self.dtype)
                block[:, : b - a] = part
                digest = chunk_digest(part)
            out.append((self.codec.encode(block) if self.codec is not None else block.tobytes(), digest))
        return out


class ShardReader(_Shards):
    """Reads chunks of whole-layer shards of one sharded Zarr array (the layout :func:`_layout` accepts)."""

    def read(self, rows: range, cols: range, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Row chunks (image batches, one shard each) ``rows`` x column chunks ``cols`` as one array,
        trimmed to the array's bounds (into ``out`` where given: that shape, any strides), and the
        CRC-32 (:func:`core.integrity.chunk_digest`'s, as an integer) of each chunk's values,
        (len(rows), len(cols)) uint32.

        Each chunk is read into one reused buffer and decoded straight into its place where that is
        one contiguous run of the output (a block one chunk wide, the output's whole rows), else into
        a scratch chunk; its CRC-32 is taken right after, while it is in cache.

        Raises:
            OSError, ValueError: a missing or short file, an index whose CRC-32C does not match, an
                empty chunk, a chunk that does not decode to its shape (the caller reads through Zarr
                instead, which says what is wrong).
        """
        r, c = self.rows, self.chunk
        top, left = rows.start * r, cols.start * c
        shape = (min(rows.stop * r, self.n_images) - top, min(cols.stop * c, self.width) - left)
        if out is None:
            out = np.empty(shape, self.dtype)
        else:
            check_out(out, shape, self.dtype, f"row chunks {rows} x column chunks {cols}")
        crcs = np.empty((len(rows), len(cols)), dtype=np.uint32)
        chunk_bytes = r * c * self.dtype.itemsize
        raw_buf = bytearray(chunk_bytes + 64 * 1024)  # grown where a chunk compresses to more than its size
        scratch = None
        tail = 16 * self.n_chunks + 4
        for i in rows:
            with open(self.folder / self.key((i, 0)), "rb", buffering=0) as f:
                f.seek(-tail, 2)
                raw = f.read(tail)
                if len(raw) != tail or google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                    raise ValueError(f"shard {i}: its index does not match its CRC-32C")
                index = np.frombuffer(raw[:-4], dtype="<u8").reshape(self.n_chunks, 2)
                y0, y1 = i * r - top, min((i + 1) * r, self.n_images) - top
                for j in cols:
                    offset, size = (int(v) for v in index[j])
                    if offset == 2 ** 64 - 1:
                        raise ValueError(f"shard {i}: chunk {j} is empty")
                    if size > len(raw_buf):
                        raw_buf = bytearray(size)
                    data = memoryview(raw_buf)[:size]
                    f.seek(offset)
                    if _read_fully(f, data) != size:
                        raise ValueError(f"shard {i}: chunk {j} is cut short")
                    x0, x1 = j * c - left, min((j + 1) * c, self.width) - left
                    block = out[y0:y1, x0:x1]
                    whole = y1 - y0 == r and x1 - x0 == c and block.flags.c_contiguous  # its place is one run
                    if not whole:
                        if scratch is None:
                            scratch = np.empty((r, c), self.dtype)
                        block = scratch
                    self._decode(data, block, i, j)
                    values = block if whole else block[: y1 - y0, : x1 - x0]
                    crcs[i - rows.start, j - cols.start] = _crc(values)
                    if not whole:
                        out[y0:y1, x0:x1] = values
        return out, crcs

    def _decode(self, data: memoryview, block: np.ndarray, i: int, j: int) -> None:
        """Chunk (i, j)'s encoded bytes ``data`` decoded into ``block`` (one chunk, C order); a
        ValueError where they do not decode to exactly its size (numcodecs fills a larger ``out``
        without a word, so the sizes are checked first: Blosc's header holds them)."""
        want = block.nbytes
        if self.codec is None:
            got = len(data)
        elif isinstance(self.codec, Blosc):  # its header: nbytes at 4:8, the frame's own size at 12:16
            if len(data) < 16 or int.from_bytes(data[12:16], "little") != len(data):
                raise ValueError(f"shard {i}: chunk {j}'s Blosc frame does not hold {len(data)} bytes")
            got = int.from_bytes(data[4:8], "little")
        else:  # Zstd: decoded to new bytes, then copied
            decoded = self.codec.decode(data)
            got = len(decoded)
            data = decoded
        if got != want:
            raise ValueError(f"shard {i}: chunk {j} decodes to {got} bytes, not {want}")
        if isinstance(self.codec, Blosc):
            self.codec.decode(data, out=block)
        else:
            block.reshape(-1).view(np.uint8)[:] = np.frombuffer(data, np.uint8)


def _read_fully(f, buffer: memoryview) -> int:
    """Bytes read from ``f`` into ``buffer`` until it is full or the file ends (one system call
    returns at most about 2 GiB on Linux)."""
    done = 0
    while done < len(buffer):
        n = f.readinto(buffer[done:])
        if not n:
            break
        done += n
    return done


def _layout(array) -> tuple | None:
    """The layout of ``array`` as :class:`ShardWriter` / :class:`ShardReader` take it: (folder,
    array, shard rows, width, chunk width, dtype, fill value, numcodecs codec or None); None unless
    it is one shard per row block spanning every column, with an end index of little-endian
    (offset, nbytes) pairs and CRC-32C, in a local folder, compressed by Blosc, Zstd or nothing."""
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
    from zarr.storage import LocalStore

    meta = array.metadata
    if getattr(meta, "zarr_format", None) != 3 or len(meta.codecs) != 1 or array.ndim != 2:
        return None
    sharding = meta.codecs[0]
    if not isinstance(sharding, ShardingCodec) or getattr(sharding.index_location, "value", None) != "end":
        return None
    index = tuple(sharding.index_codecs)
    if (len(index) != 2 or not isinstance(index[0], BytesCodec) or not _little(index[0])
            or not isinstance(index[1], Crc32cCodec)):
        return None
    inner = tuple(sharding.codecs)
    if not inner or not isinstance(inner[0], BytesCodec) or not _little(inner[0]) or len(inner) > 2:
        return None
    codec = _numcodecs(inner[1]) if len(inner) == 2 else None
    if len(inner) == 2 and codec is None:
        return None
    shard, chunks = tuple(array.shards or ()), tuple(sharding.chunk_shape)
    width = array.shape[1]
    if len(shard) != 2 or len(chunks) != 2 or shard[0] != chunks[0] or shard[1] != -(-width // chunks[1]) * chunks[1]:
        return None
    dtype = np.dtype(array.dtype)
    if dtype.kind != "f" or dtype.byteorder == ">":
        return None
    store = array.store_path.store
    if not isinstance(store, LocalStore):
        return None
    folder = Path(store.root) / array.store_path.path
    return folder, array, shard[0], width, chunks[1], dtype.newbyteorder("<"), meta.fill_value, codec


def _little(codec) -> bool:
    endian = getattr(codec, "endian", None)
    return endian is None or getattr(endian, "value", endian) == "little"


def _numcodecs(codec):
    """The numcodecs encoder that gives the bytes of a Zarr Blosc or Zstd codec, else None."""
    from numcodecs import Blosc, Zstd
    from zarr.codecs import BloscCodec, ZstdCodec

    if isinstance(codec, ZstdCodec):
        return Zstd(level=codec.level, checksum=codec.checksum)
    if isinstance(codec, BloscCodec) and codec.typesize is not None:
        shuffle = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}
        name = getattr(codec.shuffle, "value", codec.shuffle)
        if name not in shuffle:
            return None
        return Blosc(cname=getattr(codec.cname, "value", codec.cname), clevel=codec.clevel, shuffle=shuffle[name],
                     blocksize=codec.blocksize, typesize=codec.typesize)
    return None
