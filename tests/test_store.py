"""Activation stores: equal to a direct forward-hook reference, resumable, keyed by identity."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from unitmatch import core
from unitmatch.core._compat import import_timm
from unitmatch.core.extract import ModelSpec, extract_activations, extract_to_store, prepare_store
from unitmatch.core.store import ActivationStore, BatchWriter, IncompleteStoreError
from unitmatch.core.synthetic import generate_stimuli, plant_neurons
from unitmatch.core.units import as_layers, catalogue_of

LAYERS = ["layer1", "layer3.0"]


@pytest.fixture(scope="module")
def stimuli():
    return generate_stimuli(n_categories=2, objects_per_category=2, variations=5, size=48)  # 20 images


@pytest.fixture(scope="module")
def reference(stimuli):
    """Direct forward hooks, same batches, float32."""
    spec = ModelSpec("test_resnet", seed=0)
    return extract_activations(spec.create(), stimuli, LAYERS, batch_size=8, dtype=np.float32)


def _stored(store):
    return {name: np.asarray(arr[:]) for name, arr in store.layers().items()}


def test_float32_store_equals_the_forward_hook_reference_exactly(tmp_path, stimuli, reference):
    report = extract_to_store(ModelSpec("test_resnet", seed=0), stimuli, LAYERS, tmp_path, batch_size=8,
                              dtype="float32")
    assert report.written == [0, 1, 2] and report.skipped == 0 and report.store.complete
    # every chunk is on disk (write_empty_chunks is effective), so a missing chunk file is damage
    assert all(a.nchunks_initialized == a.nchunks for a in report.store._arrays("r").values())
    assert ActivationStore.open(report.store.path).verify().ok
    stored = _stored(ActivationStore.open(report.store.path))
    for name in LAYERS:
        np.testing.assert_array_equal(stored[name], reference[name].reshape(len(stimuli), -1))


def test_float16_store_is_labelled_for_xarray_and_matchable(tmp_path, stimuli, reference):
    import xarray as xr

    store = extract_to_store(ModelSpec("test_resnet", seed=0), stimuli, LAYERS, tmp_path, batch_size=8).store
    stored = _stored(store)
    for name in LAYERS:
        np.testing.assert_array_equal(stored[name], reference[name].reshape(len(stimuli), -1).astype(np.float16))
        with warnings.catch_warnings():  # consolidated metadata: xarray opens it without a warning
            warnings.simplefilter("error")
            ds = xr.open_zarr(store.path / "store.zarr", group=name)
        assert ds.activations.dims == ("image_id", "unit") and ds.activations.dtype == np.float16
        # every dimension has coordinates, and the unit coordinates are coordinates, not data variables
        assert set(ds.activations.dims) <= set(ds.coords) and list(ds.data_vars) == ["activations"]
        assert {"channel", "y", "x"} <= set(ds.coords) and "Dimensions without coordinates" not in repr(ds)
        assert list(ds.image_id.values) == list(stimuli.image_ids)
        c, h, w = reference[name].shape[1:]
        assert (int(ds.channel[-1]), int(ds.y[-1]), int(ds.x[-1])) == (c - 1, h - 1, w - 1)
        # the README's selection of one unit by its coordinates gives that unit's responses
        unit = ds.activations.set_index(unit=["channel", "y", "x"]).sel(unit=(c - 1, 1, 2))
        assert unit.dims == ("image_id",)
        np.testing.assert_array_equal(unit.values, reference[name][:, c - 1, 1, 2].astype(np.float16))
    key = json.loads((store.path / "key.json").read_text())
    assert key["model"] == "test_resnet@random:0" and key["stimuli"] == stimuli.content_hash
    assert key["layers"] == LAYERS and key["dtype"] == "float16" and "version" not in key
    import unitmatch
    import zarr

    assert zarr.open_group(str(store.path / "store.zarr"), mode="r").attrs["unitmatch_version"] == unitmatch.__version__
    # the engine streams the store's 2-D arrays with the store's unit shapes
    y = plant_neurons(stored["layer1"].astype(np.float32), n_planted=3, snr=50.0, seed=0).responses
    result = core.run_matching(store.layers(), y, [(np.arange(14), np.arange(14, 20))],
                               catalogue=store.catalogue(), block_units=store.unit_chunk)
    assert set(result.matches.layer) == {"layer1"}


def test_resume_after_a_writer_failure_recomputes_only_the_missing_batches(tmp_path, stimuli, monkeypatch):
    spec = ModelSpec("test_resnet", seed=0)
    real_write = BatchWriter.write_layer

    def failing_write(self, batch, layer, values):
        if (batch, layer) == (1, LAYERS[1]):  # batch 1's first layer may be on disk, its second is not
            raise OSError("disk full (simulated)")
        return real_write(self, batch, layer, values)

    monkeypatch.setattr(BatchWriter, "write_layer", failing_write)
    with pytest.raises(OSError, match="disk full"):
        extract_to_store(spec, stimuli, LAYERS, tmp_path, batch_size=8, writer_threads=2)
    monkeypatch.setattr(BatchWriter, "write_layer", real_write)
    path = next(p for p in tmp_path.iterdir() if not p.name.startswith("."))
    half = ActivationStore._load(path)
    assert half.done_batches() == {0} and not half.complete
    with pytest.raises(IncompleteStoreError, match="1 of 3 image batches written"):
        ActivationStore.open(path)
    resumed = extract_to_store(spec, stimuli, LAYERS, tmp_path, batch_size=8)
    assert resumed.written == [1, 2] and resumed.skipped == 1 and resumed.store.complete
    clean = extract_to_store(spec, stimuli, LAYERS, tmp_path / "clean", batch_size=8).store
    for name, values in _stored(clean).items():
        np.testing.assert_array_equal(_stored(resumed.store)[name], values)
    again = extract_to_store(spec, stimuli, LAYERS, tmp_path, batch_size=8)
    assert again.written == [] and again.skipped == 3


def test_identity_changes_with_image_size_weights_and_images(tmp_path, stimuli):
    def digest(spec, stim=stimuli):
        return prepare_store(spec, stim, LAYERS, tmp_path, batch_size=8).path.name

    base = digest(ModelSpec("test_resnet", seed=0))
    assert digest(ModelSpec("test_resnet", seed=0)) == base
    assert digest(ModelSpec("test_resnet", seed=0, input_size=(3, 96, 96))) != base
    assert digest(ModelSpec("test_resnet", seed=1)) != base
    images = stimuli.source.copy()
    images[3, 0, 0, 0] ^= 1  # one pixel of one image
    changed = core.StimulusSet.from_array(images, stimuli.image_ids, stimuli.metadata)
    assert digest(ModelSpec("test_resnet", seed=0), changed) != base
    import torch

    weights = tmp_path / "w.pth"
    torch.save(ModelSpec("test_resnet", seed=5).create().state_dict(), weights)
    from_file = ModelSpec("test_resnet", checkpoint=str(weights))
    assert from_file.identity().startswith("test_resnet@sha256:")
    assert digest(from_file) != base


def test_clear_errors(tmp_path, stimuli):
    with pytest.raises(ValueError, match="unknown timm model 'resnet_nope'"):
        extract_to_store(ModelSpec("resnet_nope"), stimuli, LAYERS, tmp_path)
    with pytest.raises(ValueError, match="layer9"):
        extract_to_store(ModelSpec("test_resnet"), stimuli, ["layer9"], tmp_path)
    with pytest.raises(ValueError, match="at least one image"):
        core.StimulusSet.from_array(np.zeros((0, 8, 8, 3), np.uint8))
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        buf = io.BytesIO()
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(buf, format="PNG")
        (folder / f"im{i}.png").write_bytes(buf.getvalue())
    (folder / "im1.png").write_bytes(b"not a png at all")
    broken = core.StimulusSet.from_files(folder)
    with pytest.raises(ValueError, match="image 'im1'"):
        extract_to_store(ModelSpec("test_resnet"), broken, LAYERS, tmp_path / "broken", batch_size=2)
    with pytest.raises(ValueError, match="dtype must be"):
        extract_to_store(ModelSpec("test_resnet"), stimuli, LAYERS, tmp_path, dtype="int8")


def test_hooks_copy_outputs_before_in_place_ops(tmp_path, stimuli):
    """timm ResNets apply ReLU in place after bn1: the stored bn1 output must keep its negative values."""
    import torch

    spec = ModelSpec("test_resnet", seed=0)
    model = spec.create()
    captured = {}
    handle = model.bn1.register_forward_hook(lambda _m, _i, out: captured.__setitem__("bn1", out.clone()))
    images = np.stack([np.asarray(stimuli.load_image(i)) for i in range(8)])
    with torch.inference_mode():
        from unitmatch.core.extract import preprocess

        model(preprocess(model, images))
    handle.remove()
    expected = captured["bn1"].numpy().reshape(8, -1)
    assert expected.min() < 0
    # on the CPU like the reference: this is about hooks; GPU-vs-CPU agreement is tests/test_gpu.py's
    direct = extract_activations(model, stimuli, ["bn1"], batch_size=8, dtype=np.float32, device="cpu")["bn1"]
    np.testing.assert_array_equal(direct[:8].reshape(8, -1), expected)
    store = extract_to_store(spec, stimuli, ["bn1"], tmp_path, batch_size=8, dtype="float32", device="cpu").store
    np.testing.assert_array_equal(np.asarray(store.layers()["bn1"][:8]), expected)


def test_prepare_store_creates_the_store_and_writes_no_batch(tmp_path, stimuli):
    import zarr

    spec = ModelSpec("test_resnet", seed=0)
    store = prepare_store(spec, stimuli, LAYERS, tmp_path, batch_size=8, dtype="float32")
    assert not store.complete and store.done_batches() == set() and store.pending_batches() == [0, 1, 2]
    assert all(arr.nchunks_initialized == 0 for arr in store._arrays("r").values())  # not one chunk written
    with pytest.raises(IncompleteStoreError, match="0 of 3 image batches written"):
        ActivationStore.open(store.path)
    assert store.attrs["tf32"] is False  # the float32 policy of the extraction that will fill it
    group = zarr.open_group(str(store.path / "store.zarr"), mode="r")
    assert group["layer1"].attrs["prefix_tokens"] == 0 and group["layer1"].attrs["dims"] == ["channel", "y", "x"]
    assert prepare_store(spec, stimuli, LAYERS, tmp_path, batch_size=8, dtype="float32").path == store.path
    report = extract_to_store(spec, stimuli, LAYERS, tmp_path, batch_size=8, dtype="float32", batches=[2, 0])
    assert report.written == [0, 2] and report.skipped == 0 and not report.store.complete
    with pytest.raises(ValueError, match=r"batches \[3, 7\] are not batches of the store \(3 batches: 0 to 2\)"):
        extract_to_store(spec, stimuli, LAYERS, tmp_path, batch_size=8, dtype="float32", batches=[1, 3, 7])
    with pytest.raises(ValueError, match="batch_size must be a positive integer; got -8"):
        prepare_store(spec, stimuli, LAYERS, tmp_path / "other", batch_size=-8)


def _small_swin():
    """timm's Swin architecture made small (64 px, one block per stage, 24 channels): fast on a CPU."""
    import torch

    torch.manual_seed(0)
    return import_timm().create_model(
        "swin_tiny_patch4_window7_224", img_size=64, window_size=4, embed_dim=24, depths=(1, 1, 1, 1),
        num_heads=(1, 1, 1, 1), pretrained_cfg_overlay=dict(input_size=(3, 64, 64))).eval()


def _both_paths(tmp_path, stimuli, spec, model, selection):
    """(in-memory activations, the store) of one model, float16, through the shared extraction loop."""
    acts = extract_activations(model, stimuli, selection, batch_size=8)
    store = extract_to_store(spec, stimuli, list(acts), tmp_path, batch_size=8, model=model).store
    assert list(store.layer_units) == list(acts.layer_units)  # one description, through both paths
    for name, values in _stored(store).items():
        np.testing.assert_array_equal(values, acts[name].reshape(len(stimuli), -1))
    return acts, ActivationStore.open(store.path)


def _match_both(acts, store, planted_units):
    """The match tables of neurons that copy the given global units, from memory and from the store."""
    cat = catalogue_of(as_layers(acts))
    x = np.concatenate([a.reshape(len(a), -1) for a in acts.values()], axis=1).astype(np.float64)
    rng = np.random.default_rng(0)
    y = x[:, planted_units].T + 1e-3 * rng.standard_normal((len(planted_units), x.shape[0]))
    splits = [(np.arange(14), np.arange(14, 20))]
    memory = core.match_neurons(acts, y, splits, block_units=store.unit_chunk)
    stored = core.match_neurons(store.layers(), y, splits, catalogue=store.catalogue(), block_units=store.unit_chunk)
    pd.testing.assert_frame_equal(memory, stored)
    assert memory.unit.tolist() == list(planted_units)
    return memory, cat


def test_vit_class_token_is_flagged_the_same_in_memory_and_in_the_store(tmp_path, stimuli):
    import zarr

    spec = ModelSpec("test_vit", seed=0)
    acts, store = _both_paths(tmp_path, stimuli, spec, spec.create(), ["patch_embed", "blocks.0", "blocks.2"])
    group = zarr.open_group(str(store.path / "store.zarr"), mode="r")
    assert [group[n].attrs["prefix_tokens"] for n in acts] == [0, 1, 1]
    assert store.catalogue().layer("blocks.2").dims == ("token", "channel")
    cat = store.catalogue()
    width = cat.layer("blocks.2").shape[1]
    planted = [cat.offset("blocks.2") + 0 * width + 7,  # class token, channel 7
               cat.offset("blocks.2") + 12 * width + 3,  # patch token 12, channel 3
               cat.offset("blocks.0") + 1 * width + 5]  # the first patch token, right after the class token
    matches, _ = _match_both(acts, store, planted)
    assert matches.layer.tolist() == ["blocks.2", "blocks.2", "blocks.0"]
    assert matches.token.tolist() == [0, 12, 1] and matches.channel.tolist() == [7, 3, 5]
    assert matches.prefix_token.tolist() == [True, False, False]


def test_swin_stages_are_y_x_channel_the_same_in_memory_and_in_the_store(tmp_path, stimuli):
    model = _small_swin()
    # the identity names the architecture only; this store holds the small configuration above
    spec = ModelSpec("swin_tiny_patch4_window7_224", seed=0)
    acts, store = _both_paths(tmp_path, stimuli, spec, model, "stages")
    assert list(acts) == ["layers.0", "layers.1", "layers.2", "layers.3"]
    assert all(u.dims == ("y", "x", "channel") for u in store.layer_units)
    stage0 = store.catalogue().layer("layers.0")
    assert stage0.shape == (16, 16, 24)  # NHWC: 64 px / patch 4, 24 channels
    cat = store.catalogue()
    planted = [cat.offset("layers.0") + int(np.ravel_multi_index((2, 9, 17), stage0.shape)),
               cat.offset("layers.2") + int(np.ravel_multi_index((3, 1, 40), cat.layer("layers.2").shape))]
    matches, memory_cat = _match_both(acts, store, planted)
    assert memory_cat.layers == cat.layers
    assert matches[["layer", "y", "x", "channel"]].values.tolist() == [["layers.0", 2, 9, 17], ["layers.2", 3, 1, 40]]
    assert not matches.prefix_token.any()
    # a plain dict of the same arrays knows no layout: its names come from the rank (channels first)
    assert catalogue_of(dict(acts)).layer("layers.0").dims == ("channel", "y", "x")


# ---------------------------------------------------------------------------------------------------
# The write path: a writer pool, one shard per image batch x layer, the codec in the key
# ---------------------------------------------------------------------------------------------------
def _block_by_block(root, stimuli, reference, **key):
    """A store of the float16 reference written by BatchWriter.write: one batch at a time, one layer after another."""
    from unitmatch.core.store import StoreKey

    acts = {name: np.asarray(reference[name]).reshape(len(stimuli), -1).astype(np.float16) for name in LAYERS}
    units = list(reference.layer_units)
    store = ActivationStore.create(root, StoreKey("reference", {}, stimuli.content_hash, tuple(LAYERS), **key), units,
                                   list(stimuli.image_ids), batch_size=8, unit_chunk=1000)
    writer = store.writer()
    for b in range(store.n_batches):
        writer.write(b, {name: values[store.batch_rows(b)] for name, values in acts.items()})
    store.finalize()
    return ActivationStore.open(store.path)


def _bits(store):
    return {name: values.view(np.uint16) for name, values in _stored(store).items()}


@pytest.mark.parametrize("codec, sharded", [("blosc:lz4:shuffle:5", True), ("zstd:-1", False), ("none", True)])
def test_a_store_written_by_the_writer_pool_equals_one_written_block_by_block(tmp_path, stimuli, reference, codec,
                                                                              sharded):
    spec = ModelSpec("test_resnet", seed=0)
    pooled = extract_to_store(spec, stimuli, LAYERS, tmp_path / "pool", batch_size=8, writer_threads=4, codec=codec,
                              sharded=sharded, unit_chunk=1000).store
    assert pooled.key["codec"] == codec and pooled.key["sharded"] is sharded and pooled.complete
    plain = _block_by_block(tmp_path / "plain", stimuli, reference, codec="zstd:1", sharded=False)
    assert pooled.verify().ok and plain.verify().ok
    pooled_bits, plain_bits = _bits(pooled), _bits(plain)
    for name in LAYERS:  # the same float16 values, bit for bit, and the same chunk digests
        np.testing.assert_array_equal(pooled_bits[name], plain_bits[name])
        np.testing.assert_array_equal(pooled._digests()[name], plain._digests()[name])
    files = {name: sorted(p.relative_to(pooled.path / "store.zarr" / name / "activations" / "c").parts
                          for p in (pooled.path / "store.zarr" / name / "activations" / "c").rglob("*") if p.is_file())
             for name in LAYERS}
    chunks = {name: -(-a.shape[1] // 1000) for name, a in pooled._arrays("r").items()}
    for name in LAYERS:  # sharded: one file per image batch and layer; else one per chunk
        per_batch = 1 if sharded else chunks[name]
        assert len(files[name]) == pooled.n_batches * per_batch, (name, files[name][:5])


def test_the_codec_and_sharding_are_part_of_the_identity(tmp_path, stimuli):
    spec = ModelSpec("test_resnet", seed=0)
    paths = {(codec, sharded): prepare_store(spec, stimuli, LAYERS, tmp_path, batch_size=8, codec=codec,
                                             sharded=sharded).path
             for codec in ("blosc:lz4:shuffle:5", "zstd:1") for sharded in (True, False)}
    assert len(set(paths.values())) == 4
    # the codec is kept canonical, so spellings of one codec are one store
    assert prepare_store(spec, stimuli, LAYERS, tmp_path, batch_size=8, codec=" ZSTD:01").path == \
        paths[("zstd:1", True)]
    import zarr

    array = zarr.open_group(str(paths[("zstd:1", False)] / "store.zarr"), mode="r")["layer1"]["activations"]
    assert [type(c).__name__ for c in array.compressors] == ["ZstdCodec"] and array.shards is None
    array = zarr.open_group(str(paths[("blosc:lz4:shuffle:5", True)] / "store.zarr"), mode="r")["layer1"]["activations"]
    c = min(16384, array.shape[1])  # the default unit chunk; a shard is one batch x the whole layer, in whole chunks
    assert array.chunks == (8, c) and array.shards == (8, -(-array.shape[1] // c) * c)


@pytest.mark.parametrize("codec, why", [
    ("zstd", None), ("zstd:23", "outside -7..22"), ("zstd:x", "not an integer"), ("lz4", None),
    ("blosc:lz5:shuffle:5", "'lz5' is not one of"), ("blosc:lz4:byteshuffle:5", "'byteshuffle' is not one of"),
    ("blosc:lz4:shuffle:10", "outside 0..9"), (1, None)])
def test_a_bad_codec_is_named_with_the_valid_forms(tmp_path, stimuli, codec, why):
    with pytest.raises(ValueError, match=r"codec=.* is not a store codec") as err:
        prepare_store(ModelSpec("test_resnet", seed=0), stimuli, LAYERS, tmp_path, codec=codec)
    text = str(err.value)
    assert repr(codec) in text and "valid: none, zstd:<level -7..22>, blosc:<lz4|" in text, text
    if why:
        assert why in text, text
    assert not any(tmp_path.iterdir())  # refused before anything was created


def test_bad_write_options_are_named(tmp_path, stimuli):
    spec = ModelSpec("test_resnet", seed=0)
    for kwargs, message in [({"writer_threads": 0}, "writer_threads must be a positive integer; got 0"),
                            ({"writer_threads": 1.5}, "writer_threads must be a positive integer; got 1.5"),
                            ({"num_workers": -1}, "num_workers must be an integer >= 0; got -1"),
                            ({"unit_chunk": 0}, "unit_chunk must be a positive integer; got 0"),
                            ({"sharded": "yes"}, r"sharded='yes': expected True .* or False"),
                            ({"pinned": "yes"}, r"pinned must be None \(on CUDA\), True or False; got 'yes'")]:
        with pytest.raises(ValueError, match=message):
            extract_to_store(spec, stimuli, LAYERS, tmp_path, batch_size=8, **kwargs)
    assert not any(tmp_path.iterdir())
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"pinned=True needs CUDA .* use pinned=None or False"):
            extract_to_store(spec, stimuli, LAYERS, tmp_path, batch_size=8, pinned=True, device="cpu")
        assert not any(tmp_path.iterdir())


def test_a_bad_codec_in_the_sweep_config_is_named(monkeypatch, tmp_path):
    from hydra import compose, initialize_config_module

    from unitmatch.sweep.config import ConfigError, validate

    with initialize_config_module(version_base="1.3", config_module="unitmatch.conf"):
        cfg = compose(config_name="config", overrides=["compute.codec=zstd:99", "logger=none"])
    with pytest.raises(ConfigError, match=r"compute\.codec='zstd:99' is not a store codec \(level 99 is outside"):
        validate(cfg)
    with initialize_config_module(version_base="1.3", config_module="unitmatch.conf"):
        cfg = compose(config_name="config", overrides=["cluster.writer_threads=0", "logger=none"])
    with pytest.raises(ConfigError, match=r"cluster\.writer_threads=0 is out of range"):
        validate(cfg)


def test_a_sharded_store_names_flipped_swapped_and_missing_shards(tmp_path, stimuli):
    from unitmatch.core.store import StoreDamagedError

    spec = ModelSpec("test_resnet", seed=0)
    store = extract_to_store(spec, stimuli, LAYERS, tmp_path, batch_size=8, unit_chunk=1000).store
    shard = store.path / "store.zarr" / "layer1" / "activations" / "c"
    assert sorted(p.name for p in shard.iterdir()) == ["0", "1", "2"]  # c/<batch>/0: one shard per batch
    files = [shard / str(b) / "0" for b in range(3)]
    original = [f.read_bytes() for f in files]
    n_cols = -(-store.layer_units[0].size // 1000)

    files[0].write_bytes(original[1])  # another valid shard of the same layer, in batch 0's place
    with pytest.raises(StoreDamagedError, match=r"layer 'layer1', chunk \(0, 0\) .*c/0/0: it holds other values"):
        store.layers()["layer1"][:8]
    files[0].write_bytes(original[0])

    data = bytearray(original[2])
    data[len(data) // 3] ^= 0xFF  # one flipped byte inside a compressed inner chunk
    files[2].write_bytes(bytes(data))
    problems = store.verify().problems
    assert problems and all(p.layer == "layer1" and p.chunk[0] == 2 and p.file == "store.zarr/layer1/activations/c/2/0"
                            for p in problems), problems
    files[2].write_bytes(original[2])

    files[1].unlink()
    problems = ActivationStore.open(store.path).verify().problems
    assert [(p.chunk, p.problem) for p in problems] == [((1, j), "its shard file is missing") for j in range(n_cols)]
    with pytest.raises(StoreDamagedError, match=r"chunk \(1, 0\).*its shard file is missing"):
        ActivationStore.open(store.path).layers()["layer1"][8:16]
    files[1].write_bytes(original[1])
    assert ActivationStore.open(store.path).verify().ok


def test_a_format_4_store_is_refused_with_what_to_do(tmp_path, stimuli):
    from unitmatch.core.store import StoreFormatError

    store = extract_to_store(ModelSpec("test_resnet", seed=0), stimuli, LAYERS, tmp_path, batch_size=8).store
    key = json.loads((store.path / "key.json").read_text())
    (store.path / "key.json").write_text(json.dumps({**key, "format": 4}))
    with pytest.raises(StoreFormatError, match=r"has format 4; this unitmatch .* reads format 5 only .*Delete"):
        ActivationStore.open(store.path)


@pytest.mark.parametrize("codec, dtype", [("blosc:lz4:shuffle:5", "float16"), ("blosc:zstd:bitshuffle:1", "float16"),
                                          ("blosc:lz4:noshuffle:9", "float32"), ("zstd:1", "float16"),
                                          ("zstd:-1", "float32"), ("none", "float16")])
def test_shards_written_by_our_encoder_are_zarrs_own_files_byte_for_byte(tmp_path, codec, dtype):
    """Full batches of a sharded store are encoded by core/_shards.py (over a pool, or in the
    calling thread) instead of Zarr's event loop: every shard file is the one Zarr writes for the
    same values, byte for byte (the last unit chunk padded with the fill value; a last, partial
    batch still goes through Zarr), so Zarr and the checked reads read them as before."""
    from unitmatch.core._shards import ShardWriter
    from unitmatch.core.store import StoreKey
    from unitmatch.core.units import LayerUnits

    rng = np.random.default_rng(7)
    layers = [LayerUnits("conv", (5, 13, 11), ("channel", "y", "x")), LayerUnits("head", (2000,), ("channel",))]
    n_images = 21  # batches of 8: the last has 5 rows
    values = {layer.name: np.maximum(rng.standard_normal((n_images, layer.size)), 0).astype(dtype) for layer in layers}
    values["head"][:, :700] = 0  # chunks of constant values compress to little, as Zarr's do
    stores = {}
    for how in ("zarr", "ours", "ours_pooled"):
        key = StoreKey(model=f"m-{how}", preprocessing={}, stimuli="s", layers=("conv", "head"), dtype=dtype,
                       codec=codec)
        store = ActivationStore.create(tmp_path / how, key, layers, [f"im{i}" for i in range(n_images)],
                                       batch_size=8, unit_chunk=300)
        writer = store.writer(threads=3 if how == "ours_pooled" else 1)
        assert all(isinstance(w, ShardWriter) for w in writer.shards.values())
        if how == "zarr":
            writer.shards = {}  # every batch through Zarr
        for b in range(store.n_batches):
            writer.write(b, {name: v[store.batch_rows(b)] for name, v in values.items()})
        writer.close()
        store.finalize()
        stores[how] = ActivationStore.open(store.path)
    for name in ("conv", "head"):
        folder = {how: s.path / "store.zarr" / name / "activations" / "c" for how, s in stores.items()}
        files = {how: sorted(p.relative_to(f) for p in f.rglob("*") if p.is_file()) for how, f in folder.items()}
        assert files["zarr"] == files["ours"] == files["ours_pooled"] and len(files["zarr"]) == 3
        for rel in files["zarr"]:
            ref = (folder["zarr"] / rel).read_bytes()
            assert (folder["ours"] / rel).read_bytes() == ref and (folder["ours_pooled"] / rel).read_bytes() == ref, rel
    for how, store in stores.items():
        assert store.verify().ok
        for name, array in store.layers().items():
            np.testing.assert_array_equal(np.asarray(array[:]), values[name])
        for name, digests in store._digests().items():
            np.testing.assert_array_equal(digests, stores["zarr"]._digests()[name])
    unsharded = ActivationStore.create(tmp_path / "unsharded", StoreKey("u", {}, "s", ("head",), sharded=False),
                                       layers[1:], [f"im{i}" for i in range(8)], batch_size=8)
    assert unsharded.writer().shards == {"head": None}  # written through Zarr
    from unitmatch.core._shards import ShardReader

    assert ShardReader.for_array(unsharded._arrays("r")["head"]) is None  # and read through Zarr


@pytest.mark.parametrize("codec", ["blosc:lz4:shuffle:5", "zstd:3", "none"])
def test_shard_reads_equal_zarrs_and_fall_back_to_zarr_on_a_bad_index(tmp_path, codec):
    """Checked reads of whole-layer shards go through core/_shards.py's reader: every region (the
    last, partial batch and the padded last unit chunk included) equals Zarr's read; a shard whose
    index fails its CRC-32C is read by Zarr instead, which names the shard."""
    from unitmatch.core._shards import ShardReader
    from unitmatch.core.integrity import StoreDamagedError
    from unitmatch.core.store import StoreKey
    from unitmatch.core.units import LayerUnits

    rng = np.random.default_rng(3)
    layer = LayerUnits("head", (1700,), ("channel",))
    values = rng.standard_normal((21, layer.size)).astype(np.float16)
    store = ActivationStore.create(tmp_path, StoreKey("r", {}, "s", ("head",), codec=codec), [layer],
                                   [f"im{i}" for i in range(21)], batch_size=8, unit_chunk=300)
    writer = store.writer()
    for b in range(store.n_batches):
        writer.write(b, {"head": values[store.batch_rows(b)]})
    store.finalize()
    checked = ActivationStore.open(store.path).layers()["head"]
    assert isinstance(checked._shard_reader(), ShardReader)
    bare = checked.array
    for rows, cols in [(slice(None), slice(None)), (slice(16, 21), slice(1500, 1700)), (slice(3, 19), slice(250, 1234)),
                       (slice(8, 16), slice(0, 300)), (slice(20, 21), slice(1699, 1700))]:
        np.testing.assert_array_equal(checked[rows, cols], np.asarray(bare[rows, cols]))
        np.testing.assert_array_equal(checked[rows, cols], values[rows, cols])
    np.testing.assert_array_equal(checked.oindex[2:20, [5, 1699, 601, 0]], values[2:20][:, [5, 1699, 601, 0]])
    # one chunk wide: whole batches decode straight into the output, the last (5 rows) through a scratch
    # chunk, as do blocks of several chunks; every chunk's CRC-32 is its recorded digest
    reader = checked._shard_reader()
    for rows, cols in [(range(0, 3), range(1, 2)), (range(0, 3), range(0, 6)), (range(1, 3), range(5, 6))]:
        got, crcs = reader.read(rows, cols)
        np.testing.assert_array_equal(got, values[rows.start * 8:rows.stop * 8, cols.start * 300:cols.stop * 300])
        np.testing.assert_array_equal(crcs, checked.digests[rows.start:rows.stop, cols.start:cols.stop])
    # into a given out: a view of a wider array (its rows are not one run: through the scratch chunk)
    # or a contiguous one (decoded in place); the wrong shape or dtype is refused
    wide = np.zeros((21, 1000), np.float16)
    for out in (wide[:, 100:700], np.empty((21, 600), np.float16)):
        got, crcs = reader.read(range(0, 3), range(1, 3), out)
        assert got is out
        np.testing.assert_array_equal(out, values[:, 300:900])
        np.testing.assert_array_equal(crcs, checked.digests[0:3, 1:3])
    assert not wide[:, :100].any() and not wide[:, 700:].any()
    for bad in (np.empty((21, 599), np.float16), np.empty((21, 600), np.float32)):
        with pytest.raises(ValueError, match=r"out must be a writeable \(21, 600\) float16 array for row chunks "
                                             r"range\(0, 3\) x column chunks range\(1, 3\); got"):
            reader.read(range(0, 3), range(1, 3), bad)
    # blocks read on threads, whole-chunk tiles in place (one chunk wide: rows split), ends partial
    for threads in (1, 2, 8):
        for start, stop in ((0, 1700), (300, 600), (300, 1500), (250, 1234), (1500, 1700), (1650, 1700)):
            np.testing.assert_array_equal(checked.read_units(start, stop, threads), values[:, start:stop])
            out = np.full((21, stop - start), np.nan, np.float16)  # into a given buffer (a pinned one on CUDA)
            assert checked.read_units(start, stop, threads, out=out) is out
            np.testing.assert_array_equal(out, values[:, start:stop])
    with pytest.raises(ValueError, match=r"out must be a writeable \(21, 300\) float16 array for units 300..600 of "
                                         r"layer 'head'; got \(21, 300\) float32$"):
        checked.read_units(300, 600, 2, out=np.empty((21, 300), np.float32))
    frozen = np.empty((21, 300), np.float16)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match=r"got \(21, 300\) float16, read-only$"):
        checked.read_units(300, 600, 2, out=frozen)
    from unitmatch.core.integrity import CheckedArray

    sliced, getitem = [], CheckedArray.__getitem__
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CheckedArray, "__getitem__", lambda self, key: sliced.append(key) or getitem(self, key))
        np.testing.assert_array_equal(checked.read_units(300, 1500, 2), values[:, 300:1500])
        assert sliced == []  # every tile whole chunks: read in place
        np.testing.assert_array_equal(checked.read_units(250, 1234, 2), values[:, 250:1234])
        assert len(sliced) == 2  # the two tiles with a partial chunk at an end
    # a chunk whose bytes decode to another size (another chunk's encoding, one batch row short, put
    # in its place with a valid index): the reader refuses it, and the checked read names it
    shard = checked.chunk_file(0, 0)
    raw = shard.read_bytes()
    tail = 16 * reader.n_chunks + 4
    index = np.frombuffer(raw[-tail:-4], dtype="<u8").reshape(-1, 2).copy()
    short = np.zeros((7, 300), np.float16)
    encoded = reader.codec.encode(short) if reader.codec is not None else short.tobytes()
    index[2] = (len(raw) - tail, len(encoded))
    import google_crc32c

    shard.write_bytes(raw[:-tail] + encoded + index.tobytes() + google_crc32c.value(index.tobytes()).to_bytes(4, "little"))
    with pytest.raises(ValueError, match=r"shard 0: chunk 2 decodes to 4200 bytes, not 4800"):
        reader.read(range(0, 1), range(2, 3))
    if codec.startswith("blosc"):  # a frame whose header gives another length than its bytes: refused
        padded = reader.codec.encode(np.zeros((8, 300), np.float16)) + b"\0"
        index[2] = (len(raw) - tail, len(padded))
        shard.write_bytes(raw[:-tail] + padded + index.tobytes()
                          + google_crc32c.value(index.tobytes()).to_bytes(4, "little"))
        with pytest.raises(ValueError, match=r"shard 0: chunk 2's Blosc frame does not hold \d+ bytes"):
            reader.read(range(0, 1), range(2, 3))
    with pytest.raises(ValueError, match=r"out must be a writeable \(8, 300\) float16 array for row chunks "
                                         r"range\(0, 1\) x column chunks range\(2, 3\) of layer 'head'; got "
                                         r"\(8, 300\) float32$"):
        checked.check_chunks(range(0, 1), range(2, 3), np.empty((8, 300), np.float32))  # not read at all
    with pytest.raises(StoreDamagedError, match=r"c/0/0"):
        checked[0:8, 600:900]
    np.testing.assert_array_equal(checked[0:8, 0:600], values[0:8, 0:600])  # its other chunks read as before
    shard.write_bytes(raw)
    shard = checked.chunk_file(1, 0)
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0x01  # the index's last byte: its CRC-32C no longer matches
    shard.write_bytes(bytes(raw))
    with pytest.raises(StoreDamagedError, match=r"c/1/0"):
        checked[8:16, :]
    np.testing.assert_array_equal(checked[0:8, :], values[0:8])  # the other shards read as before



_CHURN = """
import tempfile, threading, time, warnings
from pathlib import Path
from unitmatch.core.store import ActivationStore, StoreKey
from unitmatch.core.units import LayerUnits

stop = threading.Event()

def churn():
    while not stop.is_set():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # as numba does, for its own categories
            time.sleep(1e-4)

root = Path(tempfile.mkdtemp())
with warnings.catch_warnings(record=True) as seen:
    other = threading.Thread(target=churn)
    other.start()
    try:
        for i in range(8):
            ActivationStore.create(root, StoreKey(f"m{i}", {}, "s", ("a", "b")),
                                   [LayerUnits("a", (40,), ("channel",)), LayerUnits("b", (30,), ("channel",))],
                                   [f"im{j}" for j in range(10)], batch_size=4)
    finally:
        stop.set()
        other.join()
print(sorted(p.name.startswith(".") for p in root.iterdir()).count(False), "stores")
print(sum("Consolidated metadata" in str(w.message) for w in seen), "warnings")
"""


def test_store_creation_warns_nothing_while_another_thread_enters_and_leaves_catch_warnings():
    """Zarr's consolidated-metadata warning stays filtered while another thread (in a sweep, the decoder
    warm-up compiling with numba beside the store creation) enters and leaves ``warnings.catch_warnings``,
    which restores the filters it found: a filter set around the call by the creator itself was undone
    (`make demo` printed the warning; this test failed in 4 runs of 4 then). In a child process:
    pytest's collection drops the filter the store module sets at import, a sweep's process keeps it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import unitmatch  # the child imports the same package, wherever this process found it

    found = str(Path(unitmatch.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([found, *filter(None, [os.environ.get("PYTHONPATH")])])}
    out = subprocess.run([sys.executable, "-c", _CHURN], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["8", "stores", "0", "warnings"], (out.stdout, out.stderr)
