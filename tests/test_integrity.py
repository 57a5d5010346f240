"""Store integrity: damage to a store (flipped bytes, a chunk swapped for another valid chunk, a deleted
chunk file, broken metadata or done records, an old format) is detected on every read path and by
verify, and the error names the store folder, the layer, the chunk and what to do."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from unitmatch import core
from unitmatch.core.store import (
    ActivationStore, CheckedArray, StoreDamagedError, StoreFormatError, StoreKey, chunk_digest, verify_store,
)
from unitmatch.core.units import LayerUnits, gather_columns
from unitmatch.sweep.reduce import match_store

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES, BATCH, UNIT_CHUNK = 20, 8, 40  # 3 row chunks (8, 8, 4 images)
LAYERS = [LayerUnits("conv", (4, 5, 5), ("channel", "y", "x")), LayerUnits("fc", (30,), ("channel",))]


def _write_store(root, values, model="test_resnet@random:0", nan_batch=None):
    """A complete store of ``values`` ({layer: (images, units)}), written batch by batch."""
    # zstd (its frame checksum) and one file per chunk: test_store.py checks the sharded Blosc default
    key = StoreKey(model, {}, "stimuli-hash", tuple(layer.name for layer in LAYERS), codec="zstd:1", sharded=False)
    store = ActivationStore.create(root, key, LAYERS, [f"im{i}" for i in range(N_IMAGES)], batch_size=BATCH,
                                   unit_chunk=UNIT_CHUNK)
    writer = store.writer()
    for b in range(store.n_batches):
        writer.write(b, {name: v[store.batch_rows(b)] for name, v in values.items()}, info={"device": "cpu"})
    store.finalize()
    return ActivationStore.open(store.path)


@pytest.fixture()
def values():
    rng = np.random.default_rng(0)
    return {layer.name: rng.standard_normal((N_IMAGES, layer.size)).astype(np.float16) for layer in LAYERS}


@pytest.fixture()
def store(tmp_path, values):
    return _write_store(tmp_path / "stores", values)


def _chunk(store, layer, i, j) -> Path:
    return store.path / "store.zarr" / layer / "activations" / "c" / str(i) / str(j)


def _assert_names(err, store, layer, chunk, what):
    text = str(err)
    assert str(store.path) in text and f"layer {layer!r}" in text and f"chunk {chunk}" in text, text
    assert f"c/{chunk[0]}/{chunk[1]}" in text and what in text, text
    assert f"Delete {store.path} to re-extract it" in text and "stage=verify" in text, text


def test_a_clean_store_reads_back_exactly_what_was_written_and_verifies_ok(tmp_path, values):
    values["fc"][BATCH:2 * BATCH] = np.nan  # a whole batch of the fill value: its chunk is still written
    store = _write_store(tmp_path, values)
    arrays = store.layers()
    for name, ref in values.items():
        a = arrays[name]
        assert isinstance(a, CheckedArray) and a.shape == ref.shape and a.dtype == np.float16
        np.testing.assert_array_equal(a[:], ref)
        np.testing.assert_array_equal(np.asarray(a), ref)
        np.testing.assert_array_equal(a[3:17, 5:29], ref[3:17, 5:29])  # across chunk boundaries
        np.testing.assert_array_equal(a[1:19:3, ::7], ref[1:19:3, ::7])
        np.testing.assert_array_equal(a[5], ref[5])
        np.testing.assert_array_equal(a[-1, -2], ref[-1, -2])
        np.testing.assert_array_equal(a[:, 7], ref[:, 7])
        assert a[4:4].shape == (0, ref.shape[1])
        cols = np.array([29, 3, 0, 17, 3])
        np.testing.assert_array_equal(a.oindex[:, cols], ref[:, cols])
        np.testing.assert_array_equal(a.oindex[2:9, cols], ref[2:9][:, cols])
        # every chunk exists on disk (write_empty_chunks is effective), the all-NaN one included
        assert store._arrays("r")[name].nchunks_initialized == store._arrays("r")[name].nchunks
    assert _chunk(store, "fc", 1, 0).exists()
    # the done records hold the CRC-32 of every chunk, computed here independently with zlib
    import zlib

    record = json.loads((store.path / "done" / "b000002").read_text())
    assert record["device"] == "cpu"
    tile = np.ascontiguousarray(values["conv"][16:20, 40:80])
    assert record["chunks"]["conv"][1] == f"{zlib.crc32(tile.tobytes()):08x}" == chunk_digest(tile)
    assert len(record["chunks"]["conv"]) == 3 and len(record["chunks"]["fc"]) == 1
    # the column gather of the float64 re-scoring equals float64 numpy
    cat = store.catalogue()
    units = np.array([0, 99, 41, 100, 129])
    reference = np.concatenate([values["conv"], values["fc"]], axis=1).astype(np.float64)[:, units]
    np.testing.assert_array_equal(gather_columns(arrays, cat, units), reference)
    report = store.verify()
    assert report.ok and report.n_chunks == 3 * 3 + 3 * 1 and report.problems == []
    assert report.describe() == f"OK {store.path} (12 chunks checked)"
    with pytest.raises(TypeError, match=r"layer 'conv' are read with integers and slices of step >= 1"):
        arrays["conv"][::-1]
    with pytest.raises(IndexError, match="index 20 is out of bounds for axis 0 of size 20"):
        arrays["conv"][20]


def test_the_chunk_digest_is_zlibs_crc32_through_isal_and_without_it(monkeypatch):
    """A chunk's digest is zlib's CRC-32 of its values in C order, through ISA-L (a dependency, ~5x
    faster) and through zlib where isal is not importable: stores stay readable by either."""
    import zlib

    from unitmatch.core import integrity

    rng = np.random.default_rng(5)
    arrays = [rng.standard_normal((64, 4099)).astype(np.float16), rng.standard_normal((3, 5)).astype(np.float32),
              rng.standard_normal((40, 300)).astype(np.float16)[:, 7:290],  # not contiguous: its C-order copy
              np.zeros((0, 16), np.float16), np.full((2, 2), np.nan, np.float16)]
    want = [zlib.crc32(np.ascontiguousarray(a).tobytes()) for a in arrays]
    from isal.isal_zlib import crc32  # a declared dependency (pyproject.toml)

    assert integrity._crc32 is crc32
    assert [integrity._crc(a) for a in arrays] == want
    assert [chunk_digest(a) for a in arrays] == [f"{w:08x}" for w in want]
    monkeypatch.setattr(integrity, "_crc32", zlib.crc32)  # as without isal
    assert [integrity._crc(a) for a in arrays] == want


def test_a_chunk_swapped_for_another_valid_chunk_is_detected_and_named(store, values, monkeypatch):
    a, b = _chunk(store, "conv", 0, 1), _chunk(store, "conv", 1, 1)
    first, second = a.read_bytes(), b.read_bytes()
    a.write_bytes(second)
    b.write_bytes(first)
    # both files are valid zstd frames with valid checksums: Zarr alone reads the swapped values silently
    bare = np.asarray(store._arrays("r")["conv"][:])
    np.testing.assert_array_equal(bare[:8, 40:80], values["conv"][8:16, 40:80])
    # the checked reads refuse, naming store, layer and chunk: a plain read, the engine, the Dask reduction
    with pytest.raises(StoreDamagedError) as err:
        store.layers()["conv"][:, 40:80]
    _assert_names(err.value, store, "conv", (0, 1), "holds other values than were written there")
    assert err.value.path == store.path and err.value.problems[0].chunk == (0, 1)
    assert err.value.problems[0].rows == (0, 8) and err.value.problems[0].units == (40, 80)
    y = np.random.default_rng(1).standard_normal((3, N_IMAGES))
    splits = [(np.arange(14), np.arange(14, 20))]
    with pytest.raises(StoreDamagedError) as err:
        core.run_matching(store.layers(), y, splits, catalogue=store.catalogue(), block_units=UNIT_CHUNK)
    _assert_names(err.value, store, "conv", (0, 1), "swapped")
    with pytest.raises(StoreDamagedError) as err:
        match_store(store, y, splits, block_units=UNIT_CHUNK, scheduler="threads")
    _assert_names(err.value, store, "conv", (0, 1), "swapped")
    # columns outside the damaged chunks still read (only what is read is checked)
    np.testing.assert_array_equal(store.layers()["conv"][:, :40], values["conv"][:, :40])
    report = store.verify()
    assert not report.ok and [(p.layer, p.chunk) for p in report.problems] == [("conv", (0, 1)), ("conv", (1, 1))]
    assert "DAMAGED" in report.describe() and "store.zarr/conv/activations/c/1/1" in report.describe()
    # verify checks the batches on the read threads: the same problems, in batch order, on 1 and on 3
    from unitmatch.core import integrity

    asked, on_threads = [], integrity._on_threads
    monkeypatch.setattr(integrity, "_on_threads",
                        lambda fn, items, threads: asked.append((len(items), threads)) or on_threads(fn, items, threads))
    for n in (1, 3):
        monkeypatch.setattr(integrity, "read_threads", lambda n=n: n)
        asked.clear()
        again = store.verify()
        assert asked == [(3, n), (3, n)]  # each layer's 3 batches on n threads
        assert again.problems == report.problems and again.n_chunks == report.n_chunks == 3 * 3 + 3 * 1


def test_flipped_bytes_fail_zstds_checksum_and_are_named(store):
    path = _chunk(store, "fc", 2, 0)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreDamagedError) as err:
        store.layers()["fc"][:]
    _assert_names(err.value, store, "fc", (2, 0), "cannot be decoded")
    assert "checksum" in str(err.value)
    report = store.verify()
    assert [(p.layer, p.chunk) for p in report.problems] == [("fc", (2, 0))]


def test_a_deleted_chunk_file_is_named_as_missing_not_read_as_nan(store):
    _chunk(store, "conv", 1, 2).unlink()
    y = np.random.default_rng(1).standard_normal((3, N_IMAGES))
    with pytest.raises(StoreDamagedError) as err:
        core.run_matching(store.layers(), y, [(np.arange(14), np.arange(14, 20))], catalogue=store.catalogue(),
                          block_units=UNIT_CHUNK)
    _assert_names(err.value, store, "conv", (1, 2), "its chunk file is missing")
    assert "NaN" not in str(err.value)
    assert [(p.chunk, p.problem) for p in store.verify().problems] == [((1, 2), "its chunk file is missing")]


def test_broken_metadata_and_done_records_are_named(tmp_path, values):
    store = _write_store(tmp_path / "a", values)
    meta = store.path / "store.zarr" / "zarr.json"
    meta.write_bytes(meta.read_bytes().replace(b'"', b"\x01", 1))  # one control character
    with pytest.raises(StoreDamagedError, match=r"store\.zarr/zarr\.json: the Zarr metadata is not valid JSON") as err:
        ActivationStore.open(store.path)
    assert str(store.path) in str(err.value) and f"Delete {store.path}" in str(err.value)
    report = verify_store(store.path)
    assert not report.ok and [p.file for p in report.problems] == ["store.zarr/zarr.json"]

    store = _write_store(tmp_path / "b", values)
    layer_meta = store.path / "store.zarr" / "fc" / "activations" / "zarr.json"
    layer_meta.write_bytes(layer_meta.read_bytes()[:-10])
    # reads use the consolidated copy (still right); verify names the broken file
    np.testing.assert_array_equal(store.layers()["fc"][:], values["fc"])
    assert [p.file for p in store.verify().problems] == ["store.zarr/fc/activations/zarr.json"]

    store = _write_store(tmp_path / "c", values)
    (store.path / "done" / "b000001").write_text('{"device": "cpu", "chunks": {')
    with pytest.raises(StoreDamagedError, match=r"done/b000001: the done record of batch 1 is not valid JSON"):
        ActivationStore.open(store.path).layers()
    assert [p.file for p in verify_store(store.path).problems] == ["done/b000001"]

    store = _write_store(tmp_path / "d", values)
    record = json.loads((store.path / "done" / "b000000").read_text())
    conv = record["chunks"]["conv"]
    record["chunks"]["conv"] = conv[:2] + ["not hex!"]
    (store.path / "done" / "b000000").write_text(json.dumps(record))
    with pytest.raises(StoreDamagedError, match=r"batch 0 does not hold the 3 chunk digests of layer 'conv' as 8 hex"):
        ActivationStore.open(store.path).layers()
    record["chunks"]["conv"] = conv
    del record["chunks"]["fc"]
    (store.path / "done" / "b000000").write_text(json.dumps(record))
    with pytest.raises(StoreDamagedError, match=r"batch 0 does not hold the 1 chunk digests of layer 'fc' as 8 hex"):
        ActivationStore.open(store.path).layers()

    store = _write_store(tmp_path / "e", values)
    (store.path / "key.json").unlink()
    with pytest.raises(StoreDamagedError, match=r"key\.json: missing: the store's identity is unknown"):
        ActivationStore.open(store.path)
    assert [p.file for p in verify_store(store.path).problems] == ["key.json"]
    with pytest.raises(FileNotFoundError, match="no activation store at"):
        verify_store(tmp_path / "nothing here")


def test_an_older_format_is_refused_with_what_to_do(store):
    key = json.loads((store.path / "key.json").read_text())
    (store.path / "key.json").write_text(json.dumps({**key, "format": 3}))
    with pytest.raises(StoreFormatError, match=r"has format 3; this unitmatch .* reads format 5 only") as err:
        ActivationStore.open(store.path)
    assert f"Delete {store.path}" in str(err.value)
    report = verify_store(store.path)
    assert not report.ok and "has format 3" in report.problems[0].problem


def test_an_edited_key_is_reported_by_verify(store):
    key = json.loads((store.path / "key.json").read_text())
    (store.path / "key.json").write_text(json.dumps({**key, "dtype": "float32"}))
    problems = ActivationStore.open(store.path).verify().problems
    assert [p.file for p in problems] == ["key.json"] and "not the folder's name" in problems[0].problem


def test_checked_arrays_and_their_errors_survive_pickling(store, values):
    """Dask-on-Ray ships the arrays to workers and the errors back."""
    a = pickle.loads(pickle.dumps(store.layers()["conv"]))
    np.testing.assert_array_equal(a[:, 40:80], values["conv"][:, 40:80])
    _chunk(store, "conv", 0, 0).unlink()
    with pytest.raises(StoreDamagedError) as err:
        a[:]
    back = pickle.loads(pickle.dumps(err.value))
    assert str(back) == str(err.value) and back.path == store.path and back.problems == err.value.problems


def _sweep(outputs, *args):
    cmd = [sys.executable, "-m", "unitmatch.sweep", "stage=verify", "logger=none", "models=[demo_test_resnet]",
           "untrained_controls=[]", "sweep_name=verify", *args]
    env = {**os.environ, "UNITMATCH_OUTPUTS": str(outputs)}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def test_the_sweeps_verify_stage_exits_1_and_names_the_damaged_chunk(tmp_path, values):
    # a store of demo_test_resnet's identity (test_resnet, random weights, seed 0), and one of another model
    store = _write_store(tmp_path / "stores", values)
    other = _write_store(tmp_path / "stores", values, model="test_vit@random:0")
    proc = _sweep(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"OK {store.path} (12 chunks checked)" in proc.stdout + proc.stderr
    assert str(other.path) not in proc.stdout + proc.stderr  # not a selected model's store
    a, b = _chunk(store, "fc", 0, 0), _chunk(store, "fc", 2, 0)
    first = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(first)
    shutil.rmtree(other.path)
    proc = _sweep(tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "FAILED demo_test_resnet (verify)" in proc.stdout
    assert f"DAMAGED {store.path}: 2 problem(s)" in out
    assert "layer 'fc', chunk (0, 0)" in out and "layer 'fc', chunk (2, 0)" in out
    [failures] = tmp_path.rglob("failures.json")
    assert json.loads(failures.read_text())["demo_test_resnet"]["stage"] == "verify"
    # repaired (the chunks swapped back): the next verify passes and clears the model's verify failure
    second = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(second)
    proc = _sweep(tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "demo_test_resnet" not in json.loads(failures.read_text())


def test_a_swapped_chunk_is_named_from_a_dask_on_ray_block_task(store, ray_local):
    """The block task runs in a Ray worker: the error that comes back still names store, layer and chunk."""
    a, b = _chunk(store, "conv", 2, 0), _chunk(store, "conv", 0, 0)
    first = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(first)
    y = np.random.default_rng(1).standard_normal((3, N_IMAGES))
    with pytest.raises(StoreDamagedError) as err:  # Ray's task error derives from the task's own exception
        match_store(store, y, [(np.arange(14), np.arange(14, 20))], block_units=UNIT_CHUNK, scheduler="ray",
                    gpus_per_task=0)
    text = str(err.value)
    assert str(store.path) in text and "layer 'conv', chunk (0, 0)" in text and "holds other values" in text, text


def test_verify_checks_the_coordinates_too(store):
    """A coordinate chunk swapped for another valid one (conv's x values in its y array) is reported."""
    coords = store.path / "store.zarr" / "conv"
    (coords / "y" / "c" / "0").write_bytes((coords / "x" / "c" / "0").read_bytes())
    (problem,) = store.verify().problems
    assert problem.layer == "conv" and problem.file == "store.zarr/conv/y" and problem.chunk is None
    assert problem.describe() == ("layer 'conv', file store.zarr/conv/y: the coordinate does not hold the y of each "
                                  "unit of shape (4, 5, 5)")


def test_an_activations_array_without_its_metadata_is_named(store):
    """Without consolidated metadata Zarr reads each array's own zarr.json: its loss names the layer's array."""
    root = store.path / "store.zarr" / "zarr.json"
    meta = json.loads(root.read_text())
    meta.pop("consolidated_metadata")
    root.write_text(json.dumps(meta))
    (store.path / "store.zarr" / "fc" / "activations" / "zarr.json").unlink()
    with pytest.raises(StoreDamagedError) as err:
        ActivationStore.open(store.path).layers()
    text = str(err.value)
    assert f"activation store {store.path} is damaged: layer 'fc', file store.zarr/fc/activations:" in text, text
    assert f"Delete {store.path}" in text
    assert [p.file for p in verify_store(store.path).problems] == ["store.zarr/fc/activations"]


def test_a_store_whose_zarr_group_is_gone_after_opening_is_named_not_a_crash(store):
    """The group itself fails to open in ``layers()`` (no layer read yet): the error names the store's group."""
    opened = ActivationStore.open(store.path)
    shutil.rmtree(store.path / "store.zarr")
    with pytest.raises(StoreDamagedError) as err:
        opened.layers()
    text = str(err.value)
    assert f"activation store {store.path} is damaged: store.zarr/zarr.json:" in text, text
    assert f"Delete {store.path}" in text


def test_the_chunk_cache_keeps_recent_chunks_within_its_budget():
    from unitmatch.core.integrity import ChunkCache

    cache = ChunkCache(300)
    a, b, c = (np.full(100, i, np.uint8) for i in range(3))
    cache.put(("l", 0, 0), a)
    cache.put(("l", 0, 1), b)
    cache.put(("l", 0, 2), c)
    assert cache.nbytes == 300 and cache.get(("l", 0, 0)) is a  # a is now the most recent
    cache.put(("l", 1, 0), np.zeros(100, np.uint8))  # evicts b, the least recently used
    assert cache.get(("l", 0, 1)) is None and cache.get(("l", 0, 0)) is a and cache.get(("l", 0, 2)) is c
    cache.put(("l", 9, 9), np.zeros(301, np.uint8))  # larger than the budget: not kept, nothing evicted
    assert cache.get(("l", 9, 9)) is None and cache.nbytes == 300
    assert (cache.hits, cache.misses) == (3, 2)
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match=r"budget_bytes must be an integer >= 0.*got"):
            ChunkCache(bad)


def test_reads_within_a_chunk_cache_equal_plain_reads_and_decode_each_chunk_once(store, values, monkeypatch):
    cols = np.array([3, 125, 41, 99, 0, 80])  # conv units 0..99, fc 100..129
    plain = gather_columns(store.layers(), store.catalogue(), cols)
    decoded = []
    check = CheckedArray.check_chunks
    monkeypatch.setattr(CheckedArray, "check_chunks",
                        lambda self, rows, cs, out=None: decoded.append((self.layer, rows, cs)) or check(self, rows, cs, out))
    layers = store.layers()  # arrays made before the context use its cache too
    with store.chunk_cache() as cache:
        assert cache is not None and store.nbytes == N_IMAGES * (100 + 30) * 2
        blocks = [layers["conv"][:, 0:80], layers["conv"][:, 80:100], layers["fc"][:]]  # as the matching reads
        n_block_reads = len(decoded)
        again = gather_columns(store.layers(), store.catalogue(), cols)  # the re-scoring's scattered columns
        with store.chunk_cache() as inner:  # nested: the same cache
            assert inner is cache
            twice = gather_columns(layers, store.catalogue(), cols)
    assert len(decoded) == n_block_reads == 3  # nothing decoded after the blocks
    np.testing.assert_array_equal(again, plain)
    np.testing.assert_array_equal(twice, plain)
    np.testing.assert_array_equal(np.concatenate(blocks[:2], axis=1), values["conv"])
    np.testing.assert_array_equal(blocks[2], values["fc"])
    assert cache.hits > 0 and store._slot.cache is None  # dropped on leaving
    gather_columns(layers, store.catalogue(), cols)
    assert len(decoded) > n_block_reads  # outside the context every read decodes again
    # pickled arrays (Dask-on-Ray block tasks) read without the driver's cache
    with store.chunk_cache():
        layers["fc"][:]
        shipped = pickle.loads(pickle.dumps(layers["fc"]))
        assert shipped.slot.cache is None
        np.testing.assert_array_equal(shipped[:], values["fc"])


def test_a_store_larger_than_the_cache_budget_is_not_cached(store, values):
    with store.chunk_cache(budget_bytes=store.nbytes - 1) as cache:
        assert cache is None
        np.testing.assert_array_equal(store.layers()["fc"][:], values["fc"])
        assert store._slot.cache is None


def test_a_damaged_chunk_is_never_cached_and_stays_an_error(store, values):
    path = _chunk(store, "fc", 1, 0)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    layer = store.layers()["fc"]
    with store.chunk_cache() as cache:
        np.testing.assert_array_equal(layer[0:8], values["fc"][0:8])  # a good row chunk is kept
        for _ in range(2):
            with pytest.raises(StoreDamagedError) as err:
                layer[:]
            _assert_names(err.value, store, "fc", (1, 0), "cannot be decoded")
        assert [key for key in cache._chunks] == [("fc", 0, 0)]


@pytest.mark.parametrize("threads", [1, 4])
def test_scattered_columns_read_on_threads_equal_numpys_indexing_and_name_a_damaged_chunk(
        store, values, monkeypatch, threads):
    """``oindex`` (the float64 re-scoring's reads: a permutation null's candidates lie in every chunk)
    reads its column chunks on threads, in any column order, repeats and negative indices included;
    ``gather_columns(..., dtype=None)`` keeps the stored float16. A damaged chunk among them is named."""
    from unitmatch.core import integrity

    monkeypatch.setattr(integrity, "MAX_READ_THREADS", threads)
    assert 1 <= integrity.read_threads() <= threads
    monkeypatch.setattr(integrity, "read_threads", lambda: threads)  # threads even on a one-core runner
    a = store.layers()["conv"]
    ref = values["conv"]
    for cols in (np.array([99, 0, 41, 40, 39, 80, 0, -1, 7, 79]), np.arange(100), np.arange(100)[::-3],
                 np.array([], np.int64)):
        np.testing.assert_array_equal(a.oindex[:, cols], ref[:, cols])
        np.testing.assert_array_equal(a.oindex[3:17, cols], ref[3:17][:, cols])
        np.testing.assert_array_equal(a.oindex[1:19:3, cols], ref[1:19:3][:, cols])
    monkeypatch.setattr(integrity, "READ_BYTES", 1)  # one chunk at a time: the same values
    np.testing.assert_array_equal(a.oindex[:, [99, 0, 41]], ref[:, [99, 0, 41]])
    both = np.concatenate([values["conv"], values["fc"]], axis=1)  # global unit ids 0..129
    for units in (np.array([5, 41, 99, 100, 129, 80]), np.array([129, 5, 100, 41, 5]), np.arange(130)):
        stored = gather_columns(store.layers(), store.catalogue(), units, dtype=None)
        assert stored.dtype == np.float16
        np.testing.assert_array_equal(stored, both[:, units])
        np.testing.assert_array_equal(gather_columns(store.layers(), store.catalogue(), units),
                                      both[:, units].astype(np.float64))
    path = _chunk(store, "conv", 1, 2)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreDamagedError) as err:
        store.layers()["conv"].oindex[:, np.array([99, 0, 41, 85, 50])]
    assert err.value.problems[0].layer == "conv" and err.value.problems[0].chunk == (1, 2)


@pytest.mark.parametrize("threads", [1, 2, 8])
def test_a_block_read_on_threads_equals_the_plain_read_and_names_a_damaged_chunk(store, values, threads):
    """``read_units`` (a GPU block task's read: tiles of whole chunks on several threads, rows split
    too where the block is one chunk wide) gives ``a[:, start:stop]``, within a chunk, across
    chunks, to the layer's end, negative, empty; damage is named."""
    a = store.layers()["conv"]
    ref = values["conv"]
    for start, stop in ((0, 100), (5, 35), (0, 40), (39, 81), (40, 120), (80, 100), (7, 7), (-30, -5), (50, 20)):
        got = a.read_units(start, stop, threads)
        assert got.dtype == np.float16 and got.shape == ref[:, start:stop].shape
        np.testing.assert_array_equal(got, ref[:, start:stop])
        into = np.full(got.shape, np.nan, np.float16)  # into a given buffer: through Zarr here (unsharded)
        assert a.read_units(start, stop, threads, out=into) is into
        np.testing.assert_array_equal(into, ref[:, start:stop])
    path = _chunk(store, "conv", 2, 1)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreDamagedError) as err:
        store.layers()["conv"].read_units(0, 100, threads)
    assert err.value.problems[0].layer == "conv" and err.value.problems[0].chunk == (2, 1)
