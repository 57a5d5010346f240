"""The streaming matching engine against an independent float64 reference (core.reference)."""

from __future__ import annotations

import pickle
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
import torch

from unitmatch import core
from unitmatch.core.synthetic import plant_neurons
from unitmatch.core.engine import MatchEngine, merge, merge_all, run_matching, stack_permutations
from unitmatch.core.reference import match_reference, pearson_columns, varying_images
from unitmatch.core.units import LayerUnits, UnitBlock, UnitCatalogue, as_layers, catalogue_of, gather_columns, iter_blocks

N_IMAGES = 300


def _activations(seed=0, n_images=N_IMAGES):
    """Three layers of different ranks, with awkward units: constant, all-zero, duplicated, large mean."""
    rng = np.random.default_rng(seed)
    conv = np.maximum(rng.standard_normal((n_images, 4, 5, 6)), 0).astype(np.float32)  # 120 units
    conv[:, 0, 0, 0] = 0.0  # dead ReLU unit
    conv[:, 1, 2, 3] = 7.5  # constant unit
    tokens = rng.standard_normal((n_images, 10, 16)).astype(np.float32)  # 160 units
    tokens[:, 3, :] += 300.0  # massive-activation token: mean >> spread
    flat = rng.standard_normal((n_images, 500)).astype(np.float32)
    flat[:, 42] = flat[:, 17]  # exact duplicate: a tie the lower id must win
    return {"stage1": conv, "stage2": tokens, "head": flat}


def _flat(layers):
    return np.concatenate([a.reshape(a.shape[0], -1) for a in layers.values()], axis=1)


def _responses(x, seed=1, n_planted=20, n_noise=10, snr=2.0):
    brain = plant_neurons(x, n_planted=n_planted, n_noise=n_noise, snr=snr, seed=seed)
    return brain.responses, brain.truth


#: the same claims on the GPU (tests/test_gpu.py has the other GPU-only tests)
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available())")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("n_splits", [1, 10])
def test_agrees_with_float64_reference(dtype, n_splits, device):
    layers = {k: v.astype(dtype) for k, v in _activations().items()}
    x = _flat(layers)
    y, _ = _responses(x.astype(np.float32))
    splits = core.brainscore_splits(n_images=N_IMAGES, n_splits=n_splits, stratify=None)
    result = run_matching(layers, y, splits, top_k=4, block_units=64, device=device)
    ref = match_reference(x.astype(np.float64), y, splits)
    m = result.matches
    for s, r in enumerate(ref):
        got = m[m.split == s].sort_values("neuron")
        # identical argmax (exact ties resolve to the lower unit id in both)
        np.testing.assert_array_equal(got.unit.to_numpy(), r["unit"])
        np.testing.assert_allclose(got.train_r.to_numpy(), r["train_r"], atol=1e-10)
        np.testing.assert_allclose(got.test_r.to_numpy(), r["test_r"], atol=1e-10)
        # screening top-k: the right units, r within float32 error
        order = np.argsort(-np.where(np.isfinite(r["r"]), r["r"], -np.inf), axis=1, kind="stable")[:, :4]
        topk = np.stack(got.topk_unit.to_numpy())
        ref_top = np.take_along_axis(r["r"], order, 1)
        np.testing.assert_allclose(np.stack(got.topk_r.to_numpy()), ref_top, atol=1e-5)
        same = (topk == order).mean()
        assert same > 0.98, f"top-k units differ from the reference in {1 - same:.1%} of slots"
    assert m["float64"].all()


def test_float32_screening_alone_is_within_1e_5():
    """finalize without a column source reports the float32 screen: still the right units, r within 1e-5."""
    layers = _activations(seed=3)
    x = _flat(layers)
    y, _ = _responses(x, seed=4)
    splits = core.brainscore_splits(n_images=N_IMAGES, n_splits=3, stratify=None)
    cat = catalogue_of(layers)
    engine = MatchEngine(y, splits, top_k=3)
    partial = merge_all(engine.process(b) for b in iter_blocks(layers, cat, 100))
    m = engine.finalize(partial, cat).matches
    ref = match_reference(x.astype(np.float64), y, splits)
    for s, r in enumerate(ref):
        got = m[m.split == s]
        np.testing.assert_array_equal(got.unit.to_numpy(), r["unit"])
        np.testing.assert_allclose(got.train_r.to_numpy(), r["train_r"], atol=1e-5)
        np.testing.assert_allclose(got.test_r.to_numpy(), r["test_r"], atol=1e-5)
    assert not m["float64"].any()


def test_recovers_planted_units_at_high_snr():
    rng = np.random.default_rng(7)
    layers = {
        "conv": np.maximum(rng.standard_normal((400, 16, 8, 8)), 0).astype(np.float16),  # 1024 units
        "fc": rng.standard_normal((400, 3000)).astype(np.float16),
    }
    x = _flat(layers).astype(np.float32)
    brain = plant_neurons(x, n_planted=200, n_noise=0, snr=10.0, seed=8)
    splits = core.brainscore_splits(n_images=400, stratify=None)
    m = core.match_neurons(layers, brain.responses, splits, block_units=700)
    truth = brain.truth.set_index("neuron").unit
    recovered = (m.unit.to_numpy() == truth.loc[m.neuron].to_numpy()).mean()
    assert recovered >= 0.99, f"recovered {recovered:.3f} of planted units"
    assert m.test_r.median() > 0.9  # r = sqrt(snr / (1 + snr)) = 0.95 for the planted unit


def test_unit_coordinates_and_layers():
    layers = _activations()
    x = _flat(layers)
    y, truth = _responses(x, n_planted=30, n_noise=0, snr=50.0)
    m = core.match_neurons(layers, y, core.brainscore_splits(n_images=N_IMAGES, n_splits=1, stratify=None))
    cat = catalogue_of(layers)
    for row in m.itertuples():
        layer = cat.layer(row.layer)
        local = np.unravel_index(row.unit - cat.offset(row.layer), layer.shape)
        coords = {d: getattr(row, d) for d in layer.dims}
        assert tuple(coords[d] for d in layer.dims) == tuple(int(v) for v in local)
        for d in {"channel", "y", "x", "token"} - set(layer.dims):
            assert getattr(row, d) == -1
    assert set(m.layer) <= set(layers)
    assert (m.unit.to_numpy() == truth.unit.to_numpy()).all()


def test_best_unit_per_layer_matches_reference():
    layers = _activations(seed=5)
    y, _ = _responses(_flat(layers), seed=6)
    splits = core.brainscore_splits(n_images=N_IMAGES, n_splits=2, stratify=None)
    res = run_matching(layers, y, splits, block_units=50)
    cat = catalogue_of(layers)
    for name, a in layers.items():
        flat = a.reshape(a.shape[0], -1).astype(np.float64)
        ref = match_reference(flat, y, splits)
        for s, r in enumerate(ref):
            got = res.layer_matches.query("layer == @name and split == @s")
            np.testing.assert_array_equal(got.unit.to_numpy(), r["unit"] + cat.offset(name))
            # per-layer values come from the float32 pass (shifted copy for the large-mean layer)
            np.testing.assert_allclose(got.train_r.to_numpy(), r["train_r"], atol=1e-5)
            np.testing.assert_allclose(got.test_r.to_numpy(), r["test_r"], atol=1e-6)


def test_partials_merge_in_any_order_and_grouping():
    layers = _activations(seed=9)
    y, _ = _responses(_flat(layers), seed=10)
    cat = catalogue_of(layers)
    engine = MatchEngine(y, core.brainscore_splits(n_images=N_IMAGES, n_splits=4, stratify=None), top_k=5)
    parts = [engine.process(b) for b in iter_blocks(layers, cat, 37)]
    assert len(parts) > 10

    def left(ps):
        out = ps[0]
        for p in ps[1:]:
            out = merge(out, p)
        return out

    def right(ps):
        out = ps[-1]
        for p in reversed(ps[:-1]):
            out = merge(p, out)
        return out

    def random_tree(ps, rng):
        ps = list(ps)
        while len(ps) > 1:
            i, j = sorted(rng.sample(range(len(ps)), 2))
            b, a = ps.pop(j), ps.pop(i)
            ps.append(merge(a, b) if rng.random() < 0.5 else merge(b, a))
        return ps[0]

    rng = random.Random(0)
    shuffled = parts[:]
    rng.shuffle(shuffled)
    results = [left(parts), right(parts), merge_all(shuffled), random_tree(parts, rng), random_tree(shuffled, rng)]
    first = results[0]
    for other in results[1:]:
        np.testing.assert_array_equal(first.top_r, other.top_r)
        np.testing.assert_array_equal(first.top_unit, other.top_unit)
        assert first.layers.keys() == other.layers.keys()
        for name in first.layers:
            for field in ("unit", "train_r", "test_r"):
                np.testing.assert_array_equal(getattr(first.layers[name], field), getattr(other.layers[name], field))
        assert first.n_units == other.n_units == cat.n_units
    columns = lambda u: gather_columns(layers, cat, u)  # noqa: E731
    a = engine.finalize(results[0], cat, columns=columns).matches
    b = engine.finalize(results[-1], cat, columns=columns).matches
    pd.testing.assert_frame_equal(a, b)


def test_constant_units_are_never_chosen_even_when_all_correlations_are_negative():
    rng = np.random.default_rng(11)
    u1, u2 = rng.standard_normal((2, 200))
    x = np.stack([np.full(200, 3.0), u1, np.zeros(200), u2], axis=1).astype(np.float32)
    y = (-u1 - u2 + 0.1 * rng.standard_normal(200))[None, :]
    m = core.match_neurons(x, y, core.brainscore_splits(n_images=200, stratify=None))
    assert set(m.unit) <= {1, 3}
    assert (m.train_r < 0).all()


def test_unit_constant_on_train_images_only_is_never_chosen():
    rng = np.random.default_rng(12)
    splits = core.brainscore_splits(n_images=200, n_splits=1, stratify=None)
    train, test = splits[0]
    y = rng.standard_normal((3, 200))
    x = rng.standard_normal((200, 50)).astype(np.float32)
    x[:, 7] = 0.0
    x[test, 7] = y[0, test] * 100  # varies only on test images
    m = core.match_neurons(x, y, splits)
    assert 7 not in set(m.unit)


@pytest.mark.parametrize("n_splits", [1, 3])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_in_activations_names_the_layer(n_splits, bad):
    layers = _activations()
    splits = core.brainscore_splits(n_images=N_IMAGES, n_splits=n_splits, stratify=None)
    y, _ = _responses(_flat(layers))
    # a test image (never in train) of split 0, so the single-split path must see it too
    layers["stage2"][splits[0][1][0], 2, 3] = bad
    with pytest.raises(ValueError, match="layer 'stage2' contain NaN or inf"):
        core.match_neurons(layers, y, splits)


def test_inputs_are_not_modified():
    layers = _activations()
    copies = {k: v.copy() for k, v in layers.items()}
    y, _ = _responses(_flat(layers))
    y_copy = y.copy()
    core.match_neurons(layers, y, core.brainscore_splits(n_images=N_IMAGES, n_splits=2, stratify=None))
    for k in layers:
        np.testing.assert_array_equal(layers[k], copies[k])
    np.testing.assert_array_equal(y, y_copy)


def test_torch_tensor_blocks_and_threads_and_pickling():
    layers = _activations(seed=13)
    y, _ = _responses(_flat(layers), seed=14)
    cat = catalogue_of(layers)
    engine = MatchEngine(y, core.brainscore_splits(n_images=N_IMAGES, n_splits=3, stratify=None))
    blocks = list(iter_blocks(layers, cat, 64))
    sequential = merge_all(engine.process(b) for b in blocks)
    with ThreadPoolExecutor(2) as pool:
        threaded = merge_all(pool.map(engine.process, blocks))
    clone = pickle.loads(pickle.dumps(engine))
    tensors = [UnitBlock(torch.from_numpy(np.ascontiguousarray(b.data)), b.layer, b.first_unit) for b in blocks]
    from_tensors = merge_all(clone.process(b) for b in tensors)
    for other in (threaded, from_tensors):
        np.testing.assert_array_equal(sequential.top_unit, other.top_unit)
        np.testing.assert_array_equal(sequential.top_r, other.top_r)


@pytest.mark.parametrize("numpy_gemm", [True, False])
def test_one_engine_from_several_threads_with_share_threads_agrees_with_one_thread(numpy_gemm, monkeypatch):
    """One split on CPU, blocks wide enough to be shared out (more than one tile), processed on one
    engine from three threads at once (as Dask's threaded scheduler does) with two torch threads:
    the same top-k as block by block on one thread, and torch's threads restored afterwards; with
    either BLAS in the share threads (the CPU's choice, :func:`core.engine._numpy_gemm_faster`)."""
    from unitmatch.core import engine as engine_module

    monkeypatch.setattr(engine_module, "_numpy_gemm_faster", lambda threads=1: numpy_gemm)
    rng = np.random.default_rng(30)
    x = np.maximum(rng.standard_normal((N_IMAGES, 12_000)), 0).astype(np.float16)
    y = plant_neurons(x.astype(np.float32), n_planted=8, n_noise=2, snr=3.0, seed=31).responses
    engine = MatchEngine(y, core.brainscore_splits(n_images=N_IMAGES, n_splits=1, stratify=None), top_k=3,
                         device="cpu")
    blocks = [UnitBlock(x[:, a:a + 3000], "l", a) for a in range(0, 12_000, 3000)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        sequential = merge_all(engine.process(b) for b in blocks)
        torch.set_num_threads(2)
        for _ in range(3):
            with ThreadPoolExecutor(3) as pool:
                threaded = merge_all(pool.map(engine.process, blocks))
            np.testing.assert_array_equal(sequential.top_unit, threaded.top_unit)
            np.testing.assert_allclose(sequential.top_r, threaded.top_r, rtol=0, atol=1e-6)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_statistics_for_a_tiny_case_by_hand():
    """train_r / test_r / gap on a case small enough to check with np.corrcoef."""
    rng = np.random.default_rng(15)
    x = rng.standard_normal((40, 6)).astype(np.float32)
    y = (x[:, 2] + 0.5 * rng.standard_normal(40))[None, :]
    train, test = np.arange(30), np.arange(30, 40)
    m = core.match_neurons(x, y, [(train, test)], top_k=3).iloc[0]
    r_all = [np.corrcoef(x[train, u].astype(np.float64), y[0, train])[0, 1] for u in range(6)]
    order = np.argsort(r_all)[::-1]
    assert m.unit == order[0] == 2
    assert m.train_r == pytest.approx(r_all[2], abs=1e-12)
    assert m.test_r == pytest.approx(np.corrcoef(x[test, 2].astype(np.float64), y[0, test])[0, 1], abs=1e-12)
    assert m.second_r == pytest.approx(r_all[order[1]], abs=1e-5)
    assert m.gap == pytest.approx(r_all[2] - r_all[order[1]], abs=1e-5)
    assert list(m.topk_unit) == list(order[:3])
    assert (m.n_train, m.n_test) == (30, 10)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(responses=np.ones(10)), "neurons x images"),
        (dict(responses=np.full((2, N_IMAGES), np.nan)), "contain NaN"),
        (dict(top_k=1), "top_k must be an integer >= 2"),
        (dict(splits=[]), "no splits given"),
        (dict(splits=[(np.arange(10), np.arange(5, 15))]), "in both train and test"),
    ],
)
def test_bad_engine_inputs(kwargs, message):
    rng = np.random.default_rng(0)
    args = dict(responses=rng.standard_normal((2, N_IMAGES)),
                splits=core.brainscore_splits(n_images=N_IMAGES, stratify=None),
                top_k=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        MatchEngine(args["responses"], args["splits"], top_k=args["top_k"])


def test_constant_neuron_on_train_images_is_named():
    y = np.random.default_rng(0).standard_normal((3, 50))
    y[1] = 4.0
    with pytest.raises(ValueError, match=r"neurons \[1\] have the same response"):
        MatchEngine(y, [(np.arange(40), np.arange(40, 50))])


def test_mismatched_images_and_bad_blocks():
    y = np.random.default_rng(0).standard_normal((3, 50))
    splits = [(np.arange(40), np.arange(40, 50))]
    with pytest.raises(ValueError, match="activations have 60 images but responses have 50"):
        core.match_neurons(np.zeros((60, 5), np.float32), y, splits)
    with pytest.raises(ValueError, match="float16 or float32"):
        core.match_neurons(np.zeros((50, 5), np.int32), y, splits)
    with pytest.raises(ValueError, match="shape"):
        core.match_neurons({"a": np.zeros(50, np.float32)}, y, splits)
    engine = MatchEngine(y, splits)
    with pytest.raises(ValueError, match=r"block of layer 'x' has shape \(49, 4\)"):
        engine.process(UnitBlock(np.zeros((49, 4), np.float32), "x", 0))


def test_all_units_constant_is_a_clear_error():
    y = np.random.default_rng(0).standard_normal((2, 50))
    with pytest.raises(ValueError, match="every unit is constant"):
        core.match_neurons(np.ones((50, 4), np.float32), y, [(np.arange(40), np.arange(40, 50))])


def test_layer_dims_override_and_catalogue_describe():
    layers = as_layers({"blk": np.zeros((5, 3, 4), np.float32)})
    cat = catalogue_of(layers, dims={"blk": ("token", "channel")})
    d = cat.describe(np.array([0, 5, 11, -1]))
    assert d.layer.tolist()[:3] == ["blk", "blk", "blk"] and d.layer.isna().tolist() == [False] * 3 + [True]
    assert d.token.tolist() == [0, 1, 2, -1] and d.channel.tolist() == [0, 1, 3, -1]


def test_pearson_columns_matches_numpy_corrcoef():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((30, 4)), rng.standard_normal((30, 2))
    expected = np.corrcoef(np.concatenate([y, x], axis=1).T)[:2, 2:]
    np.testing.assert_allclose(pearson_columns(x, y), expected, atol=1e-12)


def test_matching_from_zarr_arrays_equals_in_memory(tmp_path):
    zarr = pytest.importorskip("zarr")
    layers = _activations(seed=21)
    layers = {k: v.astype(np.float16) for k, v in layers.items()}
    y, _ = _responses(_flat(layers).astype(np.float32), seed=22)
    splits = core.brainscore_splits(n_images=N_IMAGES, n_splits=2, stratify=None)
    cat = catalogue_of(layers)
    stored = {}
    for name, a in layers.items():
        flat = a.reshape(N_IMAGES, -1)
        arr = zarr.create_array(store=str(tmp_path / f"{name}.zarr"), shape=flat.shape, chunks=(N_IMAGES, 32),
                                dtype="float16", dimension_names=("image", "unit"))
        arr[:] = flat
        stored[name] = arr
    from_store = run_matching(stored, y, splits, block_units=64, catalogue=cat)
    in_memory = run_matching(layers, y, splits, block_units=64)
    pd.testing.assert_frame_equal(from_store.matches, in_memory.matches)
    pd.testing.assert_frame_equal(from_store.layer_matches, in_memory.layer_matches)
    bad = UnitCatalogue([LayerUnits(n, (7,), ("unit",)) for n in layers])
    with pytest.raises(ValueError, match="stores 120 units per image; the catalogue says 7"):
        run_matching(stored, y, splits, catalogue=bad)


# ------------------------------------------------------------------------------ sparse units, settings
def _sparse_activations(seed=30, n_images=N_IMAGES):
    """Dense units plus units that vary on 1, 2, 3 or 4 images (ReLU-like zeros or saturated at a ceiling),
    with float16-friendly values and a block with a large mean (shifted in the engine)."""
    rng = np.random.default_rng(seed)
    dense = np.maximum(rng.standard_normal((n_images, 200)), 0)
    sparse = np.zeros((n_images, 80))
    for u in range(80):
        k = 1 + u % 4
        sparse[rng.choice(n_images, k, replace=False), u] = rng.uniform(0.5, 4.0, k).round(2)
    saturated = np.full((n_images, 20), 6.0)  # ReLU6 at its ceiling except on a few images
    for u in range(20):
        k = 1 + u % 4
        saturated[rng.choice(n_images, k, replace=False), u] = rng.uniform(0.0, 5.0, k).round(2)
    # mean >> spread: the engine shifts this block before the products (other images than the sparse
    # block's: a unit active on one image has the same r whatever its value, an exact tie)
    shifted = np.full((n_images, 40), 500.0)
    for u in range(40):
        k = 1 + u % 4
        shifted[rng.choice(n_images, k, replace=False), u] += rng.uniform(0.5, 4.0, k).round(2)
    return {"dense": dense.astype(np.float32), "sparse": sparse.astype(np.float32),
            "saturated": saturated.astype(np.float32), "shifted": shifted.astype(np.float32)}


def _spiky_neurons(x, seed=31, n=40):
    """Neurons that spike on the images where sparse units are active, plus dense-unit copies."""
    rng = np.random.default_rng(seed)
    pick = rng.choice(x.shape[1], n, replace=False)
    return x[:, pick].T.astype(np.float64) * 3 + rng.standard_normal((n, x.shape[0]))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_varying_image_counts_equal_the_float64_reference(dtype):
    layers = {k: v.astype(dtype) for k, v in _sparse_activations().items()}
    x = _flat(layers)
    splits = core.brainscore_splits(n_images=N_IMAGES, n_splits=4, stratify=None)
    engine = MatchEngine(np.random.default_rng(0).standard_normal((3, N_IMAGES)), splits, device="cpu")
    counts = engine._varying_train_images(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(counts[0], varying_images(x, np.arange(N_IMAGES)))
    for s, (train, _) in enumerate(splits):
        np.testing.assert_array_equal(counts[1 + s], varying_images(x, train))
    assert set(np.unique(varying_images(x, np.arange(N_IMAGES))[200:])) == {1, 2, 3, 4}


@pytest.mark.parametrize("n_splits", [1, 5])
@pytest.mark.parametrize("min_varying_images", [1, 2, 4])
def test_sparse_unit_policy_agrees_with_float64_reference(n_splits, min_varying_images):
    layers = _sparse_activations()
    x = _flat(layers)
    y = _spiky_neurons(x)
    splits = core.brainscore_splits(n_images=N_IMAGES, n_splits=n_splits, stratify=None)
    result = run_matching(layers, y, splits, min_varying_images=min_varying_images, block_units=48)
    ref = match_reference(x.astype(np.float64), y, splits, min_varying_images=min_varying_images)
    m = result.matches
    chose_sparse = 0
    for s, (train, _) in enumerate(splits):
        got = m[m.split == s].sort_values("neuron")
        np.testing.assert_array_equal(got.unit.to_numpy(), ref[s]["unit"])
        np.testing.assert_allclose(got.train_r.to_numpy(), ref[s]["train_r"], atol=1e-10)
        np.testing.assert_allclose(got.test_r.to_numpy(), ref[s]["test_r"], atol=1e-10, equal_nan=True)
        varying = varying_images(x, train)[got.unit.to_numpy()]
        assert (varying >= min_varying_images).all()
        chose_sparse += (varying < 4).sum()
    if min_varying_images == 1:
        assert chose_sparse > 0  # the policy had something to exclude


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_sparse_screen_fused_and_torch_agree_on_a_share(dtype, monkeypatch):
    """The sparse-unit screen through the fused kernel and through torch's ops, on a share (columns
    of a wider block, rows strided) with four splits: the same units excluded, some of them."""
    import unitmatch.core.engine as engine_module

    layers = _sparse_activations(seed=33)
    x = np.concatenate([layers["sparse"], layers["dense"]], axis=1).astype(dtype)
    splits = core.brainscore_splits(n_images=N_IMAGES, n_splits=4, stratify=None)
    engine = MatchEngine(np.ones((2, N_IMAGES)) + np.arange(N_IMAGES), splits, min_varying_images=4, device="cpu")
    share = torch.from_numpy(x)[:, 5:70]
    assert engine_module._fused(share) is not None
    fused = engine._sparse_units(share)
    monkeypatch.setattr(engine_module, "_kernels", lambda: None)
    assert engine_module._fused(share) is None
    plain = engine._sparse_units(share)
    assert torch.equal(fused, plain)
    assert 0 < int(fused.sum()) < fused.numel()


def test_sparse_unit_policy_excludes_the_same_units_for_permuted_copies():
    """The null rows equal an explicit run on the stacked permuted neurons under the same policy."""
    layers = _sparse_activations(seed=32)
    y = _spiky_neurons(_flat(layers), seed=33, n=10)
    splits = core.brainscore_splits(n_images=N_IMAGES, n_splits=3, stratify=None)
    settings = core.MatchSettings(n_permutations=4, seed=5, min_varying_images=3)
    with_null = run_matching(layers, y, splits, settings)
    explicit = run_matching(layers, stack_permutations(y, 4, seed=5), splits, settings, n_permutations=0)
    units = explicit.matches.sort_values(["split", "neuron"]).unit.to_numpy().reshape(3, 5, 10)
    np.testing.assert_array_equal(with_null.null.unit, units[:, 1:].transpose(1, 0, 2))
    assert with_null.settings == settings


def test_fused_several_split_top_k_equals_torchs_passes_with_a_permutation_null(monkeypatch):
    """Several splits on CPU with a permutation null (more neuron rows than a tile, and the row share
    of each thread): the fused scores and top k (core._kernels.split_top_k) choose what torch's
    passes over written-out scores choose, with the same screening r; the engine pickles as before
    once its splits' rows are stacked (each plan's own rows, not the stack), and its copy agrees."""
    import unitmatch.core.engine as engine_module

    monkeypatch.setattr(engine_module, "_SPLIT_TILE_UNITS", 128)
    monkeypatch.setattr(engine_module, "_SPLIT_TILE_ROWS", 64)
    calls = []
    split_top_k = engine_module.MatchEngine._split_top_k
    monkeypatch.setattr(engine_module.MatchEngine, "_split_top_k", lambda self, *a: calls.append(1) or split_top_k(self, *a))
    monkeypatch.setattr(engine_module, "_SPLIT_OD_BYTES", 3 * 46 * 128 * 4 * 2)  # two tiles of columns at a time
    layers = _activations(seed=41)
    x = _flat(layers)
    y, _ = _responses(x, seed=42)
    cat = catalogue_of(layers)
    order = np.random.default_rng(44).permutation(N_IMAGES)  # test sets of 25, 35 and 45 images: a^T padded
    splits = [(np.sort(order[n:]), np.sort(order[:n])) for n in (25, 35, 45)]
    blocks = list(iter_blocks(layers, cat, 400))
    engine = MatchEngine(y, splits, top_k=4, n_permutations=20, seed=3)
    size = len(pickle.dumps(engine))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # two row shares
        fused = merge_all(engine.process(b) for b in blocks)
        assert engine._split_a is not None and engine.n_rows == 30 * 21 and len(calls) == len(blocks)  # by the rule
        assert engine._split_a.shape == (3, 30 * 21, 46) and [p.a_t.shape[1] for p in engine._plans] == [26, 36, 46]
        monkeypatch.setattr(engine_module, "_kernels", lambda: None)
        plain = merge_all(engine.process(b) for b in blocks)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(fused.top_unit, plain.top_unit)
    np.testing.assert_allclose(fused.top_r, plain.top_r, rtol=0, atol=1e-6)
    for name, lb in plain.layers.items():
        got = fused.layers[name]
        # a tie (head units 17 and 42 are one unit twice): the fused pass takes the lower id, torch's top-k either
        tie = got.unit != lb.unit
        assert set(got.unit[tie]) <= {280 + 17} and set(lb.unit[tie]) <= {280 + 42}
        np.testing.assert_allclose(got.train_r, lb.train_r, rtol=0, atol=1e-6)
        np.testing.assert_allclose(got.test_r, lb.test_r, rtol=0, atol=1e-12)  # column_r or torch's
    assert len(pickle.dumps(engine)) < 1.1 * size
    monkeypatch.undo()
    copy = pickle.loads(pickle.dumps(engine))
    assert copy._split_a is None
    again = merge_all(copy.process(b) for b in blocks)
    np.testing.assert_array_equal(again.top_unit, fused.top_unit)


@pytest.mark.parametrize("n_images, neurons, permutations, forced, device, want", [
    (300, 20, 0, None, "cpu", False),   # 31 correction columns, 20 rows: torch's passes
    (300, 20, 4, None, "cpu", True),    # 100 rows >= 3 x 31
    (3000, 20, 20, None, "cpu", False),  # 301 columns: torch's GEMMs are the faster
    (300, 20, 0, True, "cpu", True),
    (300, 20, 4, False, "cpu", False),
    (300, 20, 4, True, "meta", False),  # CPU only
])
def test_the_fused_several_split_path_is_taken_where_it_was_measured_faster(n_images, neurons, permutations,
                                                                            forced, device, want, monkeypatch):
    import unitmatch.core.engine as engine_module

    monkeypatch.setattr(engine_module, "_SPLIT_FUSED", forced)
    rng = np.random.default_rng(43)
    splits = core.brainscore_splits(n_images=n_images, n_splits=10, stratify=None)
    engine = MatchEngine(rng.standard_normal((neurons, n_images)), splits, n_permutations=permutations,
                         device="cpu")
    engine.device = torch.device(device)  # the rule reads the device alone
    assert engine._split_fused() is want


def test_the_fused_rule_at_its_bounds(monkeypatch):
    """A split's correction of exactly the widest allowed, and rows exactly the multiple asked: fused;
    one column more, or fewer rows: torch's passes."""
    import unitmatch.core.engine as engine_module

    rng = np.random.default_rng(45)
    splits = core.brainscore_splits(n_images=300, n_splits=10, stratify=None)
    engine = MatchEngine(rng.standard_normal((20, 300)), splits, n_permutations=4, device="cpu")  # 100 rows
    k = max(len(plan.outside) for plan in engine._plans) + 1
    for max_k, rows_per_k, want in ((k, 100 / k, True), (k - 1, 100 / k, False), (k, 101 / k, False)):
        monkeypatch.setattr(engine_module, "_SPLIT_FUSED_MAX_K", max_k)
        monkeypatch.setattr(engine_module, "_SPLIT_FUSED_ROWS_PER_K", rows_per_k)
        assert engine._split_fused() is want, (max_k, rows_per_k)


@pytest.mark.parametrize("field, value, message", [
    ("top_k", 1, r"MatchSettings.top_k must be an integer >= 2; got 1"),
    ("top_k", 2.5, r"MatchSettings.top_k must be an integer >= 2; got 2.5"),
    ("top_k", True, r"MatchSettings.top_k must be an integer >= 2; got True"),
    ("n_permutations", -1, r"MatchSettings.n_permutations must be an integer >= 0; got -1"),
    ("seed", -3, r"MatchSettings.seed must be an integer >= 0; got -3"),
    ("block_units", 0, r"MatchSettings.block_units must be an integer >= 1 or None; got 0"),
    ("min_varying_images", 0, r"MatchSettings.min_varying_images must be an integer >= 1; got 0"),
    ("tie_margin", -1e-3, r"MatchSettings.tie_margin must be a finite number >= 0; got -0.001"),
    ("tie_margin", float("nan"), r"MatchSettings.tie_margin must be a finite number >= 0; got nan"),
    ("device", "gpu0", r"MatchSettings.device must be None or a torch device .*; got 'gpu0'"),
    ("gemm", "float16", r"MatchSettings.gemm must be one of \['auto', 'float32'\]; got 'float16'"),
])
def test_match_settings_reject_bad_values_naming_field_value_and_range(field, value, message):
    with pytest.raises(ValueError, match=message):
        core.MatchSettings(**{field: value})


def test_match_settings_are_frozen_normalized_and_the_one_source_of_defaults():
    import dataclasses

    s = core.MatchSettings(top_k=np.int64(4), device="cpu")
    assert type(s.top_k) is int and s.device == "cpu"
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.top_k = 9
    assert core.MatchSettings.resolve(s, top_k=7) == dataclasses.replace(s, top_k=7)
    assert core.MatchSettings.resolve() == core.MatchSettings()
    with pytest.raises(TypeError, match=r"unknown matching settings \['topk'\]; the fields are \["):
        core.MatchSettings.resolve(topk=3)
    engine = MatchEngine(np.random.default_rng(0).standard_normal((2, 50)), [(np.arange(40), np.arange(40, 50))])
    assert engine.settings == core.MatchSettings()
    assert "MatchSettings" in core.__all__


def test_min_varying_images_above_the_train_set_is_named():
    y = np.random.default_rng(0).standard_normal((2, 50))
    with pytest.raises(ValueError, match=r"split 0 has 5 train images, fewer than min_varying_images=6"):
        MatchEngine(y, [(np.arange(5), np.arange(40, 50))], min_varying_images=6)


# ------------------------------------------------------------- block paths, screen and staging (issue 8)
def _engine_paths(y, splits, **settings):
    """The engine once per block path: tiled (one split on CPU), whole-block chunked (CPU), whole-block,
    whole-block with the unit sums apart from the GEMM (GPU's float32 path), and float16 blocks' products
    from float16 GEMMs of the split neuron rows (GPU's default; float32 blocks take the float32 path
    there), each on the CPU (also on a machine with a GPU)."""
    out = {}
    for name, tiled, chunked, apart, half in (("tiled", True, True, False, False),
                                              ("chunked", False, True, False, False),
                                              ("whole", False, False, False, False),
                                              ("whole, sums apart", False, False, True, False),
                                              ("float16 GEMMs", False, False, True, True)):
        engine = MatchEngine(y, splits, device="cpu", **settings)
        if tiled and engine.shared:
            continue  # tiling serves one split only
        engine._tiled, engine._chunked, engine._sums_apart, engine._half = tiled, chunked, apart, half
        out[name] = engine
    return out


_FUSED_TORCH, _TORCH_OPS, _FUSED_NUMPY = "fused, torch's GEMMs", "torch's ops and GEMMs", "fused, numpy's GEMMs"


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("n_splits, one_split_cpu", [(1, _FUSED_TORCH), (1, _TORCH_OPS), (1, _FUSED_NUMPY),
                                                     (4, _FUSED_TORCH), (4, _TORCH_OPS)])
@pytest.mark.parametrize("min_varying_images", [1, 3])
def test_every_block_path_agrees_with_float64_reference(dtype, n_splits, min_varying_images, one_split_cpu,
                                                        monkeypatch):
    """Tiles narrower than a block and row chunks that do not divide the train set, on awkward units;
    the one-split CPU path with the fused gather kernel or torch's ops, and with either BLAS; several
    splits on CPU with the fused scores and top k (tiles of units and rows that do not divide the
    block) or torch's ops."""
    import unitmatch.core.engine as engine_module

    monkeypatch.setattr(engine_module, "_TILE_UNITS", 40)
    monkeypatch.setattr(engine_module, "_NUMPY_TILE_UNITS", 40)
    monkeypatch.setattr(engine_module, "_TILE_ROWS", 47)
    monkeypatch.setattr(engine_module, "_KCHUNK_UNITS", 56)
    monkeypatch.setattr(engine_module, "_KCHUNK_ROWS", 33)
    monkeypatch.setattr(engine_module, "_SPLIT_TILE_UNITS", 96)  # a whole tile, then 54 units (a group short)
    monkeypatch.setattr(engine_module, "_SPLIT_TILE_ROWS", 7)
    monkeypatch.setattr(engine_module, "_SPLIT_FUSED", one_split_cpu == _FUSED_TORCH)  # few rows: forced either way
    monkeypatch.setattr(engine_module, "_SPLIT_OD_BYTES", 1)  # a tile of correction columns at a time
    fused_blocks = []
    split_top_k = engine_module.MatchEngine._split_top_k
    monkeypatch.setattr(engine_module.MatchEngine, "_split_top_k",
                        lambda self, *a: fused_blocks.append(1) or split_top_k(self, *a))
    monkeypatch.setattr(engine_module, "_numpy_gemm_faster", lambda threads=1: one_split_cpu == _FUSED_NUMPY)
    if one_split_cpu == _TORCH_OPS:
        monkeypatch.setattr(engine_module, "_kernels", lambda: None)
    monkeypatch.setattr(engine_module, "_HALF_STATS_BYTES", 4 * N_IMAGES * 37)  # the floor, 128 columns at a time
    layers, x, y = _awkward_units_and_neurons(dtype)
    monkeypatch.setattr(engine_module, "_HALF_LO_BYTES", 4 * len(y) * 23)  # the lo GEMM too (blocks of 150: 2)
    splits = core.brainscore_splits(n_images=N_IMAGES, n_splits=n_splits, stratify=None)
    ref = match_reference(x.astype(np.float64), y, splits, min_varying_images=min_varying_images)
    cat = catalogue_of(layers)
    paths = _engine_paths(y, splits, top_k=4, min_varying_images=min_varying_images)
    assert ("tiled" in paths) == (n_splits == 1)
    if one_split_cpu != _FUSED_TORCH and n_splits == 1:
        paths = {"tiled": paths["tiled"]}  # the variant changes that path alone
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # blocks of 150 units: shared out over two threads on the tiled path
        for name, engine in paths.items():
            partial = merge_all(engine.process(b) for b in iter_blocks(layers, cat, 150))
            m = engine.finalize(partial, cat, columns=lambda u: gather_columns(layers, cat, u)).matches
            _assert_matches_equal_reference(m, ref, f"{name} ({one_split_cpu})")
    finally:
        torch.set_num_threads(threads)
    # several splits on CPU: the fused top k served every block of the fused variant, and none of the other
    assert bool(fused_blocks) == (n_splits > 1 and one_split_cpu == _FUSED_TORCH)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("torch_gemm", [False, True])
def test_the_fused_tiles_give_torchs_products_unit_sums_and_squares(dtype, shifted, torch_gemm, monkeypatch):
    """One split on CPU, tiles and row chunks that do not divide the block: the fused kernel's tiles
    (the neuron rows' GEMMs, the unit sums and squares from the kernel) give the products, unit sums
    and sums of squares of torch's ops (the unit sums from a GEMM row of ones), shifted or not, with
    either BLAS; and both equal float64 numpy's."""
    import unitmatch.core.engine as engine_module

    monkeypatch.setattr(engine_module, "_TILE_UNITS", 40)
    monkeypatch.setattr(engine_module, "_NUMPY_TILE_UNITS", 40)
    monkeypatch.setattr(engine_module, "_TILE_ROWS", 47)
    monkeypatch.setattr(engine_module, "_KCHUNK_UNITS", 56)
    monkeypatch.setattr(engine_module, "_KCHUNK_ROWS", 33)
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((N_IMAGES, 130)) + (40.0 if shifted else 0.0)).astype(dtype)
    y = rng.standard_normal((9, N_IMAGES))
    splits = core.brainscore_splits(n_images=N_IMAGES, n_splits=1, stratify=None)
    engine = MatchEngine(y, splits, top_k=3)
    assert engine._tiled
    plan, xb = engine._plans[0], torch.from_numpy(x)
    shift = engine._shift(xb)
    assert (shift is not None) == shifted
    got = {}
    for kernels in (True, False):
        if not kernels:
            monkeypatch.setattr(engine_module, "_kernels", lambda: None)
        assert (engine_module._fused(xb) is not None) == kernels
        products, sxx, sxx_rest = engine._tiled_products(xb, shift, plan, torch_gemm=torch_gemm)
        got[kernels] = products.numpy().copy(), sxx.numpy().copy(), sxx_rest.numpy().copy()
    xs = x.astype(np.float64) - (0.0 if shift is None else shift.numpy().astype(np.float64))
    train, outside = xs[plan.train], xs[plan.outside.numpy()]
    want = (plan.d_train.numpy().astype(np.float64) @ train, (train ** 2).sum(axis=0), (outside ** 2).sum(axis=0))
    scale = np.abs(plan.d_train.numpy()).astype(np.float64) @ np.abs(train)  # the sums' own size
    for kernels, (products, sxx, sxx_rest) in got.items():
        assert (np.abs(products - want[0]) <= 1e-5 * scale + 1e-6).all(), kernels
        np.testing.assert_allclose(sxx[0], want[1], rtol=1e-5)
        np.testing.assert_allclose(sxx_rest, want[2], rtol=1e-5)


def _awkward_units_and_neurons(dtype):
    """Dense and sparse units (layers, and flat), and planted plus spiky neurons, for the block-path tests."""
    layers = {**{k: v.astype(dtype) for k, v in _activations(seed=11).items()},
              **{k: v.astype(dtype) for k, v in _sparse_activations(seed=12).items()}}
    x = _flat(layers)
    y = np.concatenate([_responses(x.astype(np.float32), seed=13)[0], _spiky_neurons(x.astype(np.float32), n=10)])
    return layers, x, y


def _assert_matches_equal_reference(m: pd.DataFrame, ref, name: str = "") -> None:
    """Each split's chosen units and float64 train and test r equal match_reference's."""
    for s, r in enumerate(ref):
        got = m[m.split == s].sort_values("neuron")
        np.testing.assert_array_equal(got.unit.to_numpy(), r["unit"], err_msg=name)
        np.testing.assert_allclose(got.train_r.to_numpy(), r["train_r"], atol=1e-10, err_msg=name)
        np.testing.assert_allclose(got.test_r.to_numpy(), r["test_r"], atol=1e-10, equal_nan=True, err_msg=name)
        # the float32 screen's best r is the chosen unit's float64 r, to float32 error
        np.testing.assert_allclose(np.stack(got.topk_r.to_numpy())[:, 0], r["train_r"], atol=1e-5, err_msg=name)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_float16_split_of_the_neuron_rows_multiplies_about_as_accurately_as_float32(device):
    """hi + lo / 2^11 recovers each value to 2^-22 of it (2^-36 absolute below float16's normal range),
    and hi @ x + (lo @ x) / 2^11 of float16 x with float32 sums is within 2^-20 of the float64 product
    on the scale that matters to r, |row| |column| (the screen needs 1e-5; a float32 GEMM: 6.4e-8 here,
    the pair 5.1e-8 on the CPU, where both round to nearest; tensor cores may truncate their float32
    sums, up to about ten times that)."""
    from unitmatch.core.engine import _LO_SCALE, _mm_float32, _split_half

    rng = np.random.default_rng(5)
    rows = rng.standard_normal((70, 640)) * np.logspace(-3, 1.5, 70)[:, None]
    rows[:, ::7] *= 1e-5  # values whose lo is below float16's normal range, or whose hi is
    rows32 = torch.from_numpy(rows.astype(np.float32)).to(device)
    hi, lo = _split_half(rows32)
    assert hi.dtype == lo.dtype == torch.float16
    r = rows32.double().cpu().numpy()
    back = hi.double().cpu().numpy() + lo.double().cpu().numpy() / _LO_SCALE
    assert np.all(np.abs(back - r) <= 2.0**-22 * np.abs(r) + 2.0**-36)
    x16 = torch.from_numpy((rng.standard_normal((640, 300)) * 30).astype(np.float16)).to(device)
    out, part = torch.empty((70, 300), device=device), torch.empty((70, 300), device=device)
    _mm_float32(hi, x16, out)
    _mm_float32(lo, x16, part)
    got = (out + part / _LO_SCALE).double().cpu().numpy()
    x = x16.double().cpu().numpy()
    want = r @ x
    scale = np.linalg.norm(r, axis=1)[:, None] * np.linalg.norm(x, axis=0)[None, :]  # r = product / scale
    assert np.max(np.abs(got - want) / scale) < 2.0**-20
    if device == "cuda":  # the engine takes this path by default there (torch >= 2.8)
        engine = MatchEngine(rng.standard_normal((3, 640)), core.brainscore_splits(n_images=640, n_splits=1,
                                                                                   stratify=None), device="cuda")
        assert engine._half, "torch.mm(..., out_dtype=torch.float32) is unavailable: float16 blocks run in float32"
        assert not MatchEngine(rng.standard_normal((3, 640)), [(np.arange(600), np.arange(600, 640))],
                               device="cuda", gemm="float32")._half


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available())")
@pytest.mark.parametrize("n_splits, n_permutations", [(1, 0), (4, 0), (4, 3)])
def test_float16_gemms_on_cuda_agree_with_float64_reference_in_column_chunks(n_splits, n_permutations, monkeypatch):
    """The CUDA default for float16 blocks, its statistics and lo GEMM in 128-column chunks of blocks
    that are themselves column slices (strided operands and outputs), against float64."""
    import unitmatch.core.engine as engine_module

    monkeypatch.setattr(engine_module, "_HALF_STATS_BYTES", 1)
    monkeypatch.setattr(engine_module, "_HALF_LO_BYTES", 1)
    layers, x, y = _awkward_units_and_neurons(np.float16)
    splits = core.brainscore_splits(n_images=N_IMAGES, n_splits=n_splits, stratify=None)
    cat = catalogue_of(layers)
    engine = MatchEngine(y, splits, top_k=4, n_permutations=n_permutations, device="cuda")
    assert engine._half
    float32 = MatchEngine(y, splits, top_k=4, n_permutations=n_permutations, device="cuda", gemm="float32")
    columns = lambda u: gather_columns(layers, cat, u)  # noqa: E731
    got, want = (e.finalize(merge_all(e.process(b) for b in _stream_blocks(layers, cat, 300)), cat, columns=columns)
                 for e in (engine, float32))
    _assert_matches_equal_reference(got.matches, match_reference(x.astype(np.float64), y, splits))
    pd.testing.assert_frame_equal(got.matches.drop(columns=["topk_r", "topk_unit"]),
                                  want.matches.drop(columns=["topk_r", "topk_unit"]))
    if n_permutations:
        np.testing.assert_array_equal(got.null.unit, want.null.unit)


def test_float16_gemms_give_way_to_float32_under_fp16_accumulation_and_are_not_pickled(monkeypatch):
    """torch refuses float16 GEMMs into float32 while ``allow_fp16_accumulation`` is set: the engine
    then takes its float32 path, block by block; the float16 parts, and the split plans' device
    copies of their test rows, are rebuilt after unpickling."""
    import unitmatch.core.engine as engine_module

    monkeypatch.setattr(engine_module, "_kernels", lambda: None)  # as on CUDA: torch's ops throughout
    layers = {k: v.astype(np.float16) for k, v in _activations(seed=21).items()}
    x = _flat(layers)
    y, _ = _responses(x.astype(np.float32), seed=22)
    cat = catalogue_of(layers)
    engine = MatchEngine(y, core.brainscore_splits(n_images=N_IMAGES, n_splits=2, stratify=None), device="cpu")
    engine._half = True  # the CUDA default, on the CPU stand-in
    blocks = list(iter_blocks(layers, cat, 100))
    want = merge_all(engine.process(b) for b in blocks)
    assert engine._half_rows is not None and len(engine._half_a) == 2
    assert all("yn_test_t" in plan.__dict__ for plan in engine._plans)  # built by the blocks' leaders
    copy = pickle.loads(pickle.dumps(engine))
    assert copy._half_rows is None and copy._half_a == {}
    assert not any("yn_test_t" in plan.__dict__ for plan in copy._plans)
    again = merge_all(copy.process(b) for b in blocks)
    np.testing.assert_array_equal(again.top_unit, want.top_unit)
    for name, lb in want.layers.items():
        np.testing.assert_array_equal(again.layers[name].test_r, lb.test_r)

    def refuse(*args):
        raise AssertionError("float16 GEMM under allow_fp16_accumulation")

    monkeypatch.setattr(engine, "_half_products", refuse)
    matmul = torch.backends.cuda.matmul  # a module whose flags are properties: set and restored by hand
    before = matmul.allow_fp16_accumulation
    matmul.allow_fp16_accumulation = True
    try:
        got = merge_all(engine.process(b) for b in blocks)
    finally:
        matmul.allow_fp16_accumulation = before
    np.testing.assert_array_equal(got.top_unit, want.top_unit)
    with pytest.raises(AssertionError, match="float16 GEMM under"):  # and without the flag, the float16 path
        merge_all(engine.process(b) for b in blocks)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("min_varying_images", [2, 5, 10, 140])
def test_sparse_screen_marks_exactly_the_units_the_float64_reference_counts_as_sparse(dtype, min_varying_images):
    """The pair screen only decides which units are counted; the answer is the exact count's."""
    rng = np.random.default_rng(21)
    n = N_IMAGES
    x = np.maximum(rng.standard_normal((n, 300)), 0)  # dense ReLU units: never counted
    x[:, :60] = 0.0
    for u in range(60):  # 1..30 active images, half of them placed among the screen's paired images
        k = 1 + u % 30
        rows = np.concatenate([rng.choice(40, k // 2, replace=False), 40 + rng.choice(n - 40, k - k // 2, replace=False)])
        x[rows, u] = rng.uniform(0.5, 4.0, k).round(2)
    x[:, 60:70] = 3.0  # constant
    x[: n // 2, 70:80] = -1.0  # two values, half and half
    x = x.astype(dtype)
    splits = core.brainscore_splits(n_images=n, n_splits=3, stratify=None)
    engine = MatchEngine(rng.standard_normal((2, n)), splits, min_varying_images=min_varying_images, device="cpu")
    got = engine._sparse_units(torch.from_numpy(x)).numpy()
    for s, (train, _) in enumerate(splits):
        np.testing.assert_array_equal(got[s], varying_images(x, train) < min_varying_images)
    assert got[:, :70].any()
    if min_varying_images <= 10:  # (140 exceeds the pairs: every unit is counted, dense ones too)
        assert not got[:, 80:].any()


def _stream_blocks(layers, cat, size):
    """Blocks with non-contiguous numpy views and torch tensors mixed, widths that change (buffers regrow)."""
    for i, b in enumerate(iter_blocks(layers, cat, size)):
        data = np.asarray(b.data)
        if i % 3 == 1:
            wide = np.zeros((data.shape[0], data.shape[1] + 3), data.dtype)
            wide[:, 1:-2] = data
            data = wide[:, 1:-2]  # a strided view
        elif i % 3 == 2:
            data = torch.from_numpy(np.ascontiguousarray(data))
        yield UnitBlock(data, b.layer, b.first_unit)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("n_splits", [1, 4])
def test_staged_stream_equals_the_plain_stream(dtype, n_splits):
    from unitmatch.core.engine import stream_match

    layers = {k: v.astype(dtype) for k, v in _activations(seed=14).items()}
    x = _flat(layers).astype(np.float32)
    y, _ = _responses(x, seed=15)
    splits = core.brainscore_splits(n_images=N_IMAGES, n_splits=n_splits, stratify=None)
    cat = catalogue_of(layers)
    engine = MatchEngine(y, splits, top_k=3, n_permutations=2)
    columns = lambda u: gather_columns(layers, cat, u)  # noqa: E731
    plain = stream_match(engine, _stream_blocks(layers, cat, 70), cat, columns=columns, staging=False)
    staged = stream_match(engine, _stream_blocks(layers, cat, 70), cat, columns=columns, staging=True)
    pd.testing.assert_frame_equal(staged.matches, plain.matches, check_exact=False, rtol=0, atol=1e-12)
    pd.testing.assert_frame_equal(staged.layer_matches, plain.layer_matches, check_exact=False, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(staged.null.unit, plain.null.unit)
    ref = match_reference(x.astype(np.float64), y, splits)
    for s, r in enumerate(ref):
        np.testing.assert_array_equal(staged.matches[staged.matches.split == s].unit.to_numpy(), r["unit"])


def test_staged_blocks_keep_order_and_values_and_reuse_a_small_ring():
    from unitmatch.core.engine import staged_blocks

    rng = np.random.default_rng(16)
    arrays = [rng.standard_normal((30, w)).astype(np.float16 if w % 2 else np.float32) for w in (5, 9, 4, 12, 7, 7)]
    blocks = [UnitBlock(a, f"layer{i}", 100 * i) for i, a in enumerate(arrays)]
    seen = []
    for got, want in zip(staged_blocks(iter(blocks), torch.device("cpu"), n_buffers=2), blocks, strict=True):
        assert (got.layer, got.first_unit) == (want.layer, want.first_unit)
        assert got.data.dtype == torch.from_numpy(want.data).dtype
        np.testing.assert_array_equal(got.data.numpy(), want.data)
        assert not np.shares_memory(got.data.numpy(), want.data)  # a staging buffer, not the source
        seen.append(got.data.untyped_storage().data_ptr())
    assert len(set(seen)) <= 2 + 2  # two slots (a slot's buffer is reallocated only to grow)


def test_staged_blocks_reraise_source_errors_and_stop_their_thread():
    import threading

    from unitmatch.core.engine import staged_blocks

    def source():
        yield UnitBlock(np.ones((10, 3), np.float32), "a", 0)
        raise OSError("store chunk missing")

    before = threading.active_count()
    with pytest.raises(OSError, match="store chunk missing"):
        for _ in staged_blocks(source(), torch.device("cpu")):
            pass
    many = (UnitBlock(np.ones((10, 3), np.float32), "a", 3 * i) for i in range(100))
    stream = staged_blocks(many, torch.device("cpu"))
    next(stream)
    stream.close()  # the consumer stops early: the producer thread ends too
    assert threading.active_count() == before
    with pytest.raises(ValueError, match=r"n_buffers must be an integer >= 2 .*; got 1"):
        next(staged_blocks([], torch.device("cpu"), n_buffers=1))
    with pytest.raises(ValueError, match=r"activations must be float16 or float32; got int64"):
        list(staged_blocks([UnitBlock(np.ones((10, 3), np.int64), "a", 0)], torch.device("cpu")))


@pytest.mark.parametrize("gpu_bytes, budget", [(None, 256 << 20), (80 << 30, 4 << 30), (8 << 30, 512 << 20),
                                                (2 << 30, 256 << 20)])
def test_default_block_units_follow_the_device_memory(gpu_bytes, budget, monkeypatch):
    from types import SimpleNamespace

    from unitmatch.core.engine import default_block_units

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=gpu_bytes))
    units = default_block_units(3200, device="cpu" if gpu_bytes is None else "cuda")
    per_unit = 4 * (3200 + 2 * 257)  # float32: the block's copy, products and scores
    assert units % 256 == 0 and units * per_unit <= budget < (units + 256) * per_unit


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available())")
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("n_splits", [1, 4])
def test_pinned_staging_on_cuda_equals_the_cpu_engine(dtype, n_splits):
    """Host blocks staged through pinned buffers (and pinned / device blocks passed through) on the GPU."""
    from unitmatch.core.engine import staged_blocks, stream_match

    layers = {**{k: v.astype(dtype) for k, v in _activations(seed=17).items()},
              **{k: v.astype(dtype) for k, v in _sparse_activations(seed=18).items()}}
    x = _flat(layers).astype(np.float32)
    y = np.concatenate([_responses(x, seed=19)[0], _spiky_neurons(x, n=10)])
    splits = core.brainscore_splits(n_images=N_IMAGES, n_splits=n_splits, stratify=None)
    cat = catalogue_of(layers)
    columns = lambda u: gather_columns(layers, cat, u)  # noqa: E731
    cpu = stream_match(MatchEngine(y, splits, top_k=3, device="cpu"), iter_blocks(layers, cat, 64), cat,
                       columns=columns)

    def mixed():
        for i, b in enumerate(_stream_blocks(layers, cat, 64)):
            if i % 4 == 3:  # an already-pinned host block and a block already on the GPU
                b = UnitBlock(torch.as_tensor(np.ascontiguousarray(b.data)).pin_memory(), b.layer, b.first_unit)
            elif i % 4 == 0:
                b = UnitBlock(torch.as_tensor(np.ascontiguousarray(b.data)).cuda(), b.layer, b.first_unit)
            yield b

    engine = MatchEngine(y, splits, top_k=3, device="cuda")
    staged = stream_match(engine, mixed(), cat, columns=columns)  # staging is the default on cuda
    plain = stream_match(engine, mixed(), cat, columns=columns, staging=False)
    for got in (staged, plain):
        np.testing.assert_array_equal(got.matches.unit.to_numpy(), cpu.matches.unit.to_numpy())
        np.testing.assert_allclose(got.matches.train_r.to_numpy(), cpu.matches.train_r.to_numpy(), atol=1e-10)
        np.testing.assert_allclose(got.matches.test_r.to_numpy(), cpu.matches.test_r.to_numpy(), atol=1e-10,
                                   equal_nan=True)
    for block in staged_blocks(iter_blocks(layers, cat, 64), torch.device("cuda")):
        assert block.data.is_cuda
    reserved = []
    for _ in range(3):  # every call stages on the same copy stream, so its cached buffers are reused
        stream_match(engine, mixed(), cat, columns=columns)
        reserved.append(torch.cuda.memory_reserved())
    assert reserved[2] == reserved[1], reserved


@pytest.mark.parametrize("where", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available())")])])
def test_activations_as_torch_tensors_anywhere_match_as_numpy_arrays_do(where):
    """run_matching reads blocks and the re-scoring's columns from torch tensors as from numpy arrays,
    tensors on a GPU included (their columns come back to the host for the float64 re-scoring)."""
    layers = _activations(seed=40)
    x = _flat(layers)
    y, _ = _responses(x, seed=41)
    splits = core.brainscore_splits(n_images=N_IMAGES, n_splits=2, stratify=None)
    want = run_matching(layers, y, splits, top_k=3, block_units=64, device="cpu").matches
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(where) for k, v in layers.items()}
    got = run_matching(tensors, y, splits, top_k=3, block_units=64, device="cpu").matches
    pd.testing.assert_frame_equal(got.drop(columns=["topk_r", "topk_unit"]), want.drop(columns=["topk_r", "topk_unit"]))
    assert bool(got.float64.all())


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("numpy_gemm", [True, False])
def test_tiles_over_threads_agree_with_the_serial_tiles_and_float64(dtype, numpy_gemm, monkeypatch):
    """One split on CPU with several torch threads: a block's units are shared out over Python
    threads, each share scored as a block of its own (single-threaded GEMMs: numpy's per tile, as
    on a CPU where OpenBLAS is the faster, or torch's per chunk of rows) and the shares merged. The
    screening r agree with the serial tiles' (torch's GEMM, one thread) to float32 rounding, and
    the matches equal the float64 reference's, including an exact duplicate in the other thread's
    half (the lower unit id wins)."""
    from unitmatch.core import engine as engine_module

    monkeypatch.setattr(engine_module, "_numpy_gemm_faster", lambda threads=1: numpy_gemm)
    rng = np.random.default_rng(21)
    x = np.maximum(rng.standard_normal((N_IMAGES, 5000)), 0).astype(dtype)  # 3 tiles of <= 2048 units
    x[:, 4321] = x[:, 7]
    planted = np.array([7, 100, 1999, 2048, 2600, 3000, 3500, 4100, 4999, 50, 60, 70])
    y = plant_neurons(x.astype(np.float32), n_planted=12, n_noise=4, snr=4.0, units=planted, seed=22).responses
    splits = core.brainscore_splits(n_images=N_IMAGES, n_splits=1, stratify=None)
    gemms = []
    tiled = engine_module.MatchEngine._tiled_products

    def recording(self, xb, *a, torch_gemm, **k):
        gemms.append((torch_gemm, xb.shape[1], threading.current_thread().name.startswith("unitmatch-shares")))
        return tiled(self, xb, *a, torch_gemm=torch_gemm, **k)

    monkeypatch.setattr(engine_module.MatchEngine, "_tiled_products", recording)
    threads = torch.get_num_threads()
    results = {}
    try:
        for n in (2, 1):
            torch.set_num_threads(n)
            gemms.clear()
            block = MatchEngine(y, splits, top_k=4, device="cpu").process(UnitBlock(x, "l", 0))
            results[n] = (block, run_matching({"l": x}, y, splits, top_k=4, block_units=5000, device="cpu").matches)
            assert torch.get_num_threads() == n  # restored after the threaded tiles
            # two halves of 2500 units on the share threads, or the whole block serially
            assert gemms == ([(not numpy_gemm, 2500, True)] * 4 if n == 2 else [(True, 5000, False)] * 2)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_allclose(results[2][0].top_r, results[1][0].top_r, rtol=0, atol=1e-5)
    ref = match_reference(x.astype(np.float64), y, splits)[0]
    for n, (_, m) in results.items():
        got = m.sort_values("neuron")
        np.testing.assert_array_equal(got.unit.to_numpy(), ref["unit"])
        np.testing.assert_allclose(got.train_r.to_numpy(), ref["train_r"], atol=1e-10)
    assert ref["unit"][0] == 7  # the duplicate's lower id, in both



def test_the_share_threads_multiply_with_numpy_where_its_gemm_is_the_faster(monkeypatch):
    """The one-split CPU path's GEMMs are chosen once per process and share count by timing a tile's
    GEMMs on the share threads in numpy and in torch (tests/test_threads.py): numpy's where they are
    at least ``_NUMPY_GEMM_RATIO`` times as fast, else torch's (a chunk of rows at a time); the
    block goes to the share threads either way, and the units are the same."""
    from unitmatch.core import engine as engine_module

    rng = np.random.default_rng(4)
    x = np.maximum(rng.standard_normal((N_IMAGES, 5000)), 0).astype(np.float16)
    y = plant_neurons(x.astype(np.float32), n_planted=6, n_noise=2, snr=4.0, seed=5).responses
    splits = core.brainscore_splits(n_images=N_IMAGES, n_splits=1, stratify=None)
    shared = []
    score = engine_module.MatchEngine._process
    monkeypatch.setattr(engine_module.MatchEngine, "_process",
                        lambda self, *a, torch_gemm: shared.append(torch_gemm) or score(self, *a, torch_gemm=torch_gemm))
    threads, got = torch.get_num_threads(), {}
    try:
        torch.set_num_threads(2)
        for ratio, numpy_gemm in ((0.0, True), (1e9, False)):  # numpy always / never fast enough
            monkeypatch.setattr(engine_module, "_NUMPY_GEMM_RATIO", ratio)
            engine_module._probe_gemms.cache_clear()
            assert engine_module._numpy_gemm_faster(2) is numpy_gemm
            assert engine_module._numpy_gemm_faster(2) is numpy_gemm
            assert engine_module._probe_gemms.cache_info().misses == 1  # decided once
            shared.clear()
            got[numpy_gemm] = MatchEngine(y, splits, top_k=3, device="cpu").process(UnitBlock(x, "l", 0))
            assert shared == [not numpy_gemm] * 2  # two shares, each with the GEMMs chosen
    finally:
        torch.set_num_threads(threads)
        engine_module._probe_gemms.cache_clear()  # later tests probe this machine again
    np.testing.assert_array_equal(got[True].top_unit, got[False].top_unit)
    np.testing.assert_allclose(got[True].top_r, got[False].top_r, rtol=0, atol=1e-5)


@pytest.mark.parametrize("offset, width", [(0, 4100), (3, 4103), (2, 2050)])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "torch-ops"])
def test_float16_rows_gathered_as_words_or_not_score_as_float32(offset, width, fused, monkeypatch):
    """The tiled CPU path with torch's ops gathers float16 rows as 64-bit words where a tile's rows
    are whole, aligned runs of them (offset 0, width a multiple of 4), else value by value (a block
    that starts at an odd column, an odd width, the last tile's remainder); the fused kernel reads
    them at any offset: in every case, with one thread or the share threads, the screening r equal
    those of the same values given as float32."""
    from unitmatch.core import engine as engine_module

    if not fused:
        monkeypatch.setattr(engine_module, "_kernels", lambda: None)
    in_words, views = engine_module._in_words, []
    monkeypatch.setattr(engine_module, "_in_words", lambda t: views.append(in_words(t)) or views[-1])
    rng = np.random.default_rng(5)
    x16 = np.maximum(rng.standard_normal((N_IMAGES, 4200)), 0).astype(np.float16)
    block16 = x16[:, offset:offset + width]
    block32 = block16.astype(np.float32)
    y = plant_neurons(block32, n_planted=6, n_noise=2, snr=4.0, seed=6).responses
    splits = core.brainscore_splits(n_images=N_IMAGES, n_splits=1, stratify=None)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            engine = MatchEngine(y, splits, top_k=3, device="cpu")
            got = engine.process(UnitBlock(block16, "l", 10))
            want = engine.process(UnitBlock(block32, "l", 10))
            np.testing.assert_array_equal(got.top_unit, want.top_unit)
            np.testing.assert_allclose(got.top_r, want.top_r, rtol=0, atol=1e-6)
            assert (got.top_unit[0, :, 0] >= 10).all()
    finally:
        torch.set_num_threads(threads)
    if fused:
        assert views == []  # the kernel gathered every row
    else:
        assert set(views) == ({True, False} if offset == 0 else {False})  # words where aligned, else values


@pytest.mark.parametrize("where", ["train", "test"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("numpy_gemm, fused", [(True, True), (False, True), (False, False)],
                         ids=["numpy-fused", "torch-fused", "torch-torch-ops"])
def test_a_non_finite_unit_in_one_share_names_its_global_id_and_restores_the_threads(where, bad, numpy_gemm, fused,
                                                                                     monkeypatch):
    """The share threads: a NaN or infinity on a train image or on a test image (those rows are
    only checked) in the second share of a block raises the engine's error with the unit's global
    id, after both shares ended, and torch's threads are restored; with either BLAS
    (:func:`core.engine._numpy_gemm_faster`), with the fused kernel and with torch's ops."""
    from unitmatch.core import engine as engine_module

    monkeypatch.setattr(engine_module, "_numpy_gemm_faster", lambda threads=1: numpy_gemm)
    if not fused:
        monkeypatch.setattr(engine_module, "_kernels", lambda: None)
    rng = np.random.default_rng(8)
    x = np.maximum(rng.standard_normal((N_IMAGES, 5000)), 0).astype(np.float16)
    splits = core.brainscore_splits(n_images=N_IMAGES, n_splits=1, stratify=None)
    x[splits[0][0 if where == "train" else 1][3], 4321] = bad
    y = plant_neurons(x[:, :100].astype(np.float32), n_planted=4, n_noise=0, snr=4.0, seed=9).responses
    engine = MatchEngine(y, splits, device="cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(ValueError, match=r"layer 'l' contain NaN or inf \(e.g. global units \[5321\]\)"):
            engine.process(UnitBlock(x, "l", 1000))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def _assert_same_partial(got, want):
    np.testing.assert_array_equal(got.top_unit, want.top_unit)
    np.testing.assert_array_equal(got.top_r, want.top_r)
    assert got.n_units == want.n_units and set(got.layers) == set(want.layers)
    for name, best in want.layers.items():
        for field in ("unit", "train_r", "test_r"):
            np.testing.assert_array_equal(getattr(got.layers[name], field), getattr(best, field))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("n_threads, numpy_gemm", [(2, False), (2, True), (1, False)])
def test_a_stream_of_blocks_through_the_share_threads_equals_block_by_block(dtype, n_threads, numpy_gemm, monkeypatch):
    """``process_blocks`` queues the next block's shares while the current block's run (one split on
    CPU, two torch threads): blocks of several layers, wider and narrower than a tile, one of no
    units, over more train images than one chunk of rows, give exactly the partial of ``process``
    block by block, merged (one thread, and with ``overlap=False``: block by block), with either
    BLAS for the wide blocks' shares (a narrow block is scored whole on torch's GEMMs, as ``process``
    scores it); torch's threads are as they were; and no block is asked for before every share of
    the block two before it has ended (two blocks held at most)."""
    from unitmatch.core import engine as engine_module

    monkeypatch.setattr(engine_module, "_numpy_gemm_faster", lambda threads=1: numpy_gemm)
    n_images = 1600  # 1440 train images: two chunks of rows
    rng = np.random.default_rng(31)
    x = np.maximum(rng.standard_normal((n_images, 9000)), 0).astype(dtype)
    x[:, 8500] = x[:, 11]  # a duplicate in a later block: the lower id wins
    y = plant_neurons(x.astype(np.float32), n_planted=10, n_noise=4, snr=2.0,
                      units=np.array([11, 600, 2100, 4200, 5000, 6100, 7000, 8000, 8600, 8999]), seed=32).responses
    splits = core.brainscore_splits(n_images=n_images, n_splits=1, stratify=None)
    # 4500 and 2500 units in shares, a block of none, then narrow blocks scored whole
    edges = [0, 4500, 4500, 5000, 7500, 7900, 8200, 8600, 9000]
    blocks = [UnitBlock(x[:, a:b], "early" if a < 5000 else "late", a) for a, b in zip(edges[:-1], edges[1:])]
    ended, lock = [], threading.Lock()
    process = MatchEngine._process

    def recording(self, xb, block, torch_gemm):
        result = process(self, xb, block, torch_gemm=torch_gemm)
        with lock:
            ended.append(block.first_unit)
        return result

    def source(engine):
        for i, block in enumerate(blocks):
            if i >= 2:  # every share of the block two before this one has ended
                before = blocks[i - 2]
                shares = engine._shares(torch.from_numpy(before.data), before, n_threads)
                with lock:
                    assert {share.first_unit for share in shares} <= set(ended), f"block {i - 2} still running"
            yield block

    monkeypatch.setattr(MatchEngine, "_process", recording)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(n_threads)
        engine = MatchEngine(y, splits, top_k=4, device="cpu")
        want = merge_all(engine.process(b) for b in blocks)
        for overlap in (True, False):
            ended.clear()
            _assert_same_partial(engine.process_blocks(source(engine), overlap=overlap), want)
            assert torch.get_num_threads() == n_threads
    finally:
        torch.set_num_threads(threads)
    # the float64 re-scoring settles the duplicate's tie (its two copies' float32 screening r come
    # from different GEMMs: a wide block's shares and a narrow block's whole) for the lower id
    catalogue = UnitCatalogue([LayerUnits("early", (5000,), ("unit",)), LayerUnits("late", (4000,), ("unit",))])
    result = engine.finalize(want, catalogue, columns=lambda units: x[:, units].astype(np.float64))
    ref = match_reference(x.astype(np.float64), y, splits)[0]
    got = result.matches.sort_values("neuron")
    global_ids = got.unit.to_numpy() + np.where(got.layer.to_numpy() == "late", 5000, 0)  # ids within a layer
    np.testing.assert_array_equal(global_ids, ref["unit"])
    assert ref["unit"][0] == 11


def test_the_next_block_is_read_while_the_current_blocks_shares_run(monkeypatch):
    """The overlap itself: a share of the first block waits until the source has been asked for the
    second block, which ``process_blocks`` does while that share runs (block by block it would wait
    forever: here 10 s, then fail)."""
    rng = np.random.default_rng(35)
    x = np.maximum(rng.standard_normal((N_IMAGES, 5000)), 0).astype(np.float32)
    y = plant_neurons(x, n_planted=4, n_noise=0, snr=4.0, seed=36).responses
    splits = core.brainscore_splits(n_images=N_IMAGES, n_splits=1, stratify=None)
    asked = threading.Event()
    process = MatchEngine._process

    def waiting(self, xb, block, torch_gemm):
        if block.first_unit == 0:
            assert asked.wait(timeout=10), "the second block was not asked for while the first one's shares ran"
        return process(self, xb, block, torch_gemm=torch_gemm)

    def source():
        yield UnitBlock(x, "l", 0)
        asked.set()
        yield UnitBlock(x, "l", 5000)

    monkeypatch.setattr(MatchEngine, "_process", waiting)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        got = MatchEngine(y, splits, top_k=3, device="cpu").process_blocks(source())
    finally:
        torch.set_num_threads(threads)
    assert got.n_units == 10_000


@pytest.mark.parametrize("failing", ["a share", "the source"])
def test_a_failure_in_a_stream_of_blocks_ends_every_share_and_restores_the_threads(failing, monkeypatch):
    """A non-finite unit in the third block (its error names the unit) or an error of the block
    source itself stops ``process_blocks``: the error reaches the caller after every queued share
    was cancelled or ended, torch's threads are restored, and the engine scores the next stream
    as before."""
    rng = np.random.default_rng(33)
    x = np.maximum(rng.standard_normal((N_IMAGES, 5000)), 0).astype(np.float32)
    y = plant_neurons(x, n_planted=4, n_noise=0, snr=4.0, seed=34).responses
    splits = core.brainscore_splits(n_images=N_IMAGES, n_splits=1, stratify=None)
    bad = x.copy()
    bad[splits[0][0][5], 4700] = np.nan
    started = []

    def source():
        for i in range(6):
            started.append(i)
            if i == 2:
                if failing == "the source":
                    raise OSError("chunk 2 unreadable")
                yield UnitBlock(bad, "l", 10_000 * i)
            else:
                yield UnitBlock(x, "l", 10_000 * i)

    running, lock = [0], threading.Lock()
    process = MatchEngine._process

    def counting(self, xb, block, torch_gemm):
        with lock:
            running[0] += 1
        try:
            time.sleep(0.05)  # the other share of the failing block is still running when it fails
            return process(self, xb, block, torch_gemm=torch_gemm)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(MatchEngine, "_process", counting)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        engine = MatchEngine(y, splits, top_k=3, device="cpu")
        error = (OSError, "chunk 2 unreadable") if failing == "the source" else (ValueError, r"global units \[24700\]")
        with pytest.raises(error[0], match=error[1]):
            engine.process_blocks(source())
        assert running[0] == 0  # every share had ended (or never started) when the error arrived
        assert torch.get_num_threads() == 2
        assert max(started) <= 3  # stopped at the failure, at most one block past it
        pool = engine._share_pool(2)
        assert pool.submit(lambda: "idle").result(timeout=5) == "idle"
        again = engine.process_blocks(UnitBlock(x, "l", 10_000 * i) for i in range(2))
        _assert_same_partial(again, merge(engine.process(UnitBlock(x, "l", 0)), engine.process(UnitBlock(x, "l", 10_000))))
    finally:
        torch.set_num_threads(threads)


def _small_store(root, rng, **key_options):
    """A complete store of 20 float16 images x two layers (conv 100 units, fc 30; batches of 8, unit
    chunks of 40) with its values ({layer: (images, units)})."""
    from unitmatch.core.store import ActivationStore, StoreKey

    layers = [LayerUnits("conv", (4, 5, 5), ("channel", "y", "x")), LayerUnits("fc", (30,), ("channel",))]
    values = {layer.name: rng.standard_normal((20, layer.size)).astype(np.float16) for layer in layers}
    key = StoreKey("test@random:0", {}, "stimuli", ("conv", "fc"), **key_options)
    store = ActivationStore.create(root, key, layers, [f"im{i}" for i in range(20)], batch_size=8, unit_chunk=40)
    writer = store.writer()
    for b in range(store.n_batches):
        writer.write(b, {name: v[store.batch_rows(b)] for name, v in values.items()}, info={"device": "cpu"})
    store.finalize()
    return ActivationStore.open(store.path), values


def test_default_blocks_over_a_stores_layers_are_whole_chunks(tmp_path, monkeypatch):
    """``run_matching``'s default block over a store's chunked layers is a multiple of the unit chunk
    (each chunk decoded once), at least one chunk; numpy layers and an explicit ``block_units`` are
    left as they are; the matches from the store equal those from the same values in numpy."""
    from unitmatch.core import engine as engine_module
    from unitmatch.core import units as units_module
    rng = np.random.default_rng(41)
    store, values = _small_store(tmp_path, rng, codec="zstd:1", sharded=False)
    sizes, iter_blocks = [], units_module.iter_blocks
    monkeypatch.setattr(units_module, "iter_blocks",
                        lambda l, c, size, **kw: sizes.append(size) or iter_blocks(l, c, size, **kw))
    y = rng.standard_normal((3, 20))
    split = [(np.arange(14), np.arange(14, 20))]
    got = {}
    for default, want in ((100, 80), (30, 40)):
        monkeypatch.setattr(engine_module, "default_block_units", lambda *a, default=default, **k: default)
        sizes.clear()
        got["store"] = run_matching(store.layers(), y, split, catalogue=store.catalogue()).matches
        got["numpy"] = run_matching(values, y, split, catalogue=store.catalogue()).matches
        got["explicit"] = run_matching(store.layers(), y, split, catalogue=store.catalogue(), block_units=50).matches
        assert sizes == [want, default, 50]
        pd.testing.assert_frame_equal(got["store"], got["numpy"])
        pd.testing.assert_frame_equal(got["explicit"], got["numpy"])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_a_stores_blocks_are_read_on_several_threads_where_the_cores_would_wait(tmp_path, monkeypatch, device):
    """``iter_blocks(..., read_threads=n)`` reads a store's blocks with ``CheckedArray.read_units`` on n
    threads: the same blocks, bit for bit. ``run_matching`` reads on ``read_threads()`` threads, with
    one split or several; the matches are those of the same values in numpy (on CUDA, numpy's values
    on CUDA)."""
    from unitmatch.core import integrity
    from unitmatch.core.integrity import CheckedArray
    rng = np.random.default_rng(43)
    store, values = _small_store(tmp_path, rng)  # the default codec and layout: sharded
    cat = store.catalogue()
    asked, read_units = [], CheckedArray.read_units
    monkeypatch.setattr(CheckedArray, "read_units",
                        lambda self, a, b, threads=1, out=None: asked.append((self.layer, a, b, threads, out is not None))
                        or read_units(self, a, b, threads, out))
    one = list(iter_blocks(store.layers(), cat, 40))
    assert asked == []
    three = list(iter_blocks(store.layers(), cat, 40, read_threads=3))
    assert asked == [("conv", 0, 40, 3, False), ("conv", 40, 80, 3, False), ("conv", 80, 100, 3, False),
                     ("fc", 0, 30, 3, False)]
    assert [(b.layer, b.first_unit) for b in three] == [(b.layer, b.first_unit) for b in one]
    for a, b in zip(one, three):
        assert a.data.dtype == b.data.dtype == np.float16
        np.testing.assert_array_equal(a.data, b.data)
    for bad in (0, -2, True, 1.5, "2"):
        with pytest.raises(ValueError, match=r"read_threads must be a positive integer; got " + re.escape(repr(bad))):
            next(iter_blocks(store.layers(), cat, 40, read_threads=bad))
    monkeypatch.setattr(integrity, "read_threads", lambda: 3)
    y = rng.standard_normal((3, 20))
    for n_splits in (1, 2):
        splits = [(np.arange(14), np.arange(14, 20)), (np.arange(6, 20), np.arange(6))][:n_splits]
        asked.clear()
        got = run_matching(store.layers(), y, splits, catalogue=cat, device=device, block_units=40).matches
        # every block of both layers; on CUDA read by the staging thread into its pinned buffers
        assert [(threads, into) for *_, threads, into in asked] == [(3, device == "cuda")] * 4
        pd.testing.assert_frame_equal(got, run_matching(values, y, splits, catalogue=cat, device=device).matches)
    # staged (CUDA's way, here on the CPU's ring too): the blocks read on 3 threads in the staging
    # thread, deferred ones straight into the slots' buffers; not staged, a deferred block is read
    # where its values are asked for
    from unitmatch.core.engine import stream_match
    from unitmatch.core.units import BlockRead

    engine = MatchEngine(y, splits, device=device)
    plain = stream_match(engine, iter_blocks(values, cat, 40), cat, staging=False)
    for deferred, staging in ((False, True), (True, True), (True, False)):
        asked.clear()
        blocks = iter_blocks(store.layers(), cat, 40, read_threads=3, deferred=deferred)
        got = stream_match(engine, blocks, cat, staging=staging)
        assert [(threads, into) for *_, threads, into in asked] == [(3, deferred and staging)] * 4
        pd.testing.assert_frame_equal(got.matches, plain.matches)
    asked.clear()
    block, *_ = iter_blocks(store.layers(), cat, 40, deferred=True)
    assert isinstance(block.data, BlockRead) and asked == []  # nothing read by iter_blocks
    assert block.data.shape == (20, 40) and block.data.dtype == np.float16 and block.n_units == 40
    np.testing.assert_array_equal(np.asarray(block.data), values["conv"][:, :40])
    np.testing.assert_array_equal(np.asarray(block.data, dtype=np.float32), values["conv"][:, :40].astype(np.float32))
    with pytest.raises(ValueError, match=r"out must be a writeable \(20, 40\) float16 array for units 0..40 of layer"):
        block.data.read_into(np.empty((20, 41), np.float16))
    with pytest.raises(ValueError, match=r"copy=False cannot be honoured"):
        np.asarray(block.data, copy=False)


def test_staging_on_cuda_with_its_streams_and_events_stood_in_for_gives_every_block(tmp_path, monkeypatch):
    """``staged_blocks``' CUDA branch, run on the CPU with CUDA's streams, events and device buffers
    stood in for (the GPU tests run it for real): arrays and a store's blocks read ahead (copied into
    the slot's host buffer) and deferred (read straight into it) reach the consumer whole, in order.
    (A deferred block once crashed there: its device buffer was sized from the array it replaced.)"""
    import contextlib

    from unitmatch.core import engine as engine_module

    class Event:  # an event and a stream: nothing to wait for on the CPU
        def record(self, *args):
            pass

        def synchronize(self):
            pass

        def wait_event(self, *args):
            pass

    class Slot(engine_module._Slot):  # its "device" buffer in host memory
        def __init__(self, device):
            self.device, self.cuda, self.keep = device, True, None
            self.host = torch.empty(0, dtype=torch.uint8)
            self.dev = torch.empty(0, dtype=torch.uint8)
            self.copied, self.computed = Event(), Event()

        def view(self, name, shape, dtype):
            nbytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
            if getattr(self, name).numel() < nbytes:
                setattr(self, name, torch.empty(nbytes, dtype=torch.uint8))
            return getattr(self, name)[:nbytes].view(dtype).view(shape)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Event())
    monkeypatch.setattr(engine_module, "_copy_stream", lambda device: Event())
    monkeypatch.setattr(engine_module, "_Slot", Slot)
    store, values = _small_store(tmp_path, np.random.default_rng(47))
    cat = store.catalogue()
    want = [("conv", 0, values["conv"][:, :40]), ("conv", 40, values["conv"][:, 40:80]),
            ("conv", 80, values["conv"][:, 80:]), ("fc", 100, values["fc"])]
    for source in (iter_blocks(values, cat, 40), iter_blocks(store.layers(), cat, 40, read_threads=2),
                   iter_blocks(store.layers(), cat, 40, read_threads=2, deferred=True)):
        got = [(b.layer, b.first_unit, b.data.numpy().copy())
               for b in engine_module.staged_blocks(source, torch.device("cuda:0"))]
        assert [(layer, first) for layer, first, _ in got] == [(layer, first) for layer, first, _ in want]
        for (_, _, a), (_, _, b) in zip(got, want):
            np.testing.assert_array_equal(a, b)


def test_an_environment_that_forces_tf32_is_warned_about_once(monkeypatch, caplog):
    """The engine's CUDA GEMMs under TORCH_ALLOW_TF32_CUBLAS_OVERRIDE run in TF32: one warning per
    process names the variable and the fix; none where it is off."""
    from unitmatch.core import engine as engine_module

    monkeypatch.setattr(engine_module, "_tf32_warned", False)
    monkeypatch.setenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "0")
    with caplog.at_level("WARNING", logger="unitmatch.core.engine"):
        engine_module._warn_forced_tf32()
    assert not caplog.records
    monkeypatch.setenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "1")
    with caplog.at_level("WARNING", logger="unitmatch.core.engine"):
        engine_module._warn_forced_tf32()
        engine_module._warn_forced_tf32()
    assert len(caplog.records) == 1
    assert "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 makes torch run the engine's CUDA float32 GEMMs in TF32" in caplog.text
    assert "unset it (or set it to 0)" in caplog.text


@pytest.mark.parametrize("shape", [(300, 4000), (17, 70_001), (2000, 640), (3, 700)])
def test_grouped_top_k_equals_torch_topk(shape):
    """core.engine's CPU top-k through group maxima: torch.topk's values and columns on distinct
    scores (whole groups and a remainder, rows of -inf, a non-contiguous view, a matrix below the
    threshold); on many ties the same values, at columns that hold them."""
    from unitmatch.core.engine import _top_k_columns

    rng = np.random.default_rng(50)
    scores = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    scores[:, 5:150] = -torch.inf
    scores[0] = -torch.inf
    wide = torch.cat([scores, scores[:, :3]], dim=1)[:, :-3]  # the same values, a non-contiguous view
    for s in (scores, wide):
        for k in (1, 5):
            want = torch.topk(s, k, dim=1)
            got = _top_k_columns(s, k)
            torch.testing.assert_close(got[0], want.values, rtol=0, atol=0)
            finite = torch.isfinite(want.values)
            np.testing.assert_array_equal(got[1][finite].numpy(), want.indices[finite].numpy())
    ties = torch.from_numpy(rng.integers(0, 4, shape).astype(np.float32))
    values, columns = _top_k_columns(ties, 5)
    torch.testing.assert_close(values, torch.topk(ties, 5, dim=1).values, rtol=0, atol=0)
    torch.testing.assert_close(torch.gather(ties, 1, columns), values, rtol=0, atol=0)
    assert all(len(set(row)) == 5 for row in columns.tolist())  # five distinct columns per row


def test_single_threaded_sections_overlap_and_restore_the_settings():
    """core._threads.single_threaded_ops from two threads whose sections overlap (A opens, B
    opens, A closes, B closes): one thread inside while any section is open, and afterwards
    torch's threads and the BLAS pools are what they were before the first (a naive save/restore
    per section would leave them at 1)."""
    import threading

    from threadpoolctl import threadpool_info

    from unitmatch.core._threads import single_threaded_ops

    def blas_threads():
        return sorted({lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"})

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    before = blas_threads()
    try:
        a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
        seen = {}

        def a():
            with single_threaded_ops() as n:
                seen["a"] = n
                a_in.set()
                b_in.wait(10)
            a_out.set()

        def b():
            a_in.wait(10)
            with single_threaded_ops() as n:
                seen["b"] = n
                b_in.set()
                a_out.wait(10)
                seen["inside after a closed"] = (torch.get_num_threads(), blas_threads())

        workers = [threading.Thread(target=a), threading.Thread(target=b)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(20)
        assert seen == {"a": 2, "b": 2, "inside after a closed": (1, [1] if before else [])}
        assert torch.get_num_threads() == 2 and blas_threads() == before
    finally:
        torch.set_num_threads(threads)


def test_pearson_pairs_equals_numpy_corrcoef_per_pair():
    """Pairs in any order, a unit used twice, and a constant unit (NaN), against np.corrcoef."""
    from unitmatch.core.engine import pearson_pairs

    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 7)) * rng.uniform(0.1, 100, 7) + rng.uniform(-50, 50, 7)
    x[:, 4] = 2.5  # constant
    y = rng.standard_normal((5, 40)) + 10
    cols = np.array([6, 0, 6, 3, 4, 1])
    rows = np.array([0, 4, 2, 2, 1, 3])
    got = pearson_pairs(x, y, cols, rows, chunk=4)  # several chunks
    want = [np.corrcoef(x[:, c], y[r])[0, 1] if c != 4 else np.nan for c, r in zip(cols, rows)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)
    assert np.isnan(got[4]) and np.isfinite(np.delete(got, 4)).all()
    # a Fortran-ordered view (units x images transposed) gives the same values
    np.testing.assert_array_equal(pearson_pairs(np.asfortranarray(x), y, cols, rows), got)
    np.testing.assert_array_equal(pearson_pairs(x, y, cols.astype(np.uint32), rows.astype(np.uint32)), got)


def test_rows_constant_on_a_train_set_are_found_exactly():
    """The sums' screen never hides a constant row nor reports a varying one, at any offset."""
    from unitmatch.core.engine import _columns, _constant_rows

    rng = np.random.default_rng(4)
    n = 50
    train = np.sort(rng.choice(n, 40, replace=False))
    outside = np.setdiff1d(np.arange(n), train)
    y = rng.standard_normal((8, n))
    y[1] = 7.0                                       # constant everywhere
    y[2, train] = -3.25                              # constant on the train images only
    y[3] = 1e8 + 1e-3 * rng.standard_normal(n)       # a huge offset, a tiny spread: varies
    y[4] = 1e8
    y[4, train[5]] += 2.0 ** -26                     # one train value one float64 step away: varies
    y[5] = np.round(rng.standard_normal(n))          # few distinct values
    y[6, train] = 0.0
    y[6, train[0]] = 1e-300                          # one tiny difference: varies
    y[7] = 1e200                                     # constant, and its squares overflow
    want = np.flatnonzero(np.ptp(y[:, train], axis=1) == 0)
    with np.errstate(over="ignore"):
        totals = (y.sum(axis=1), np.einsum("ij,ij->i", y, y))
    (y_out,) = _columns(y, [outside])
    np.testing.assert_array_equal(_constant_rows(y, train, totals, y_out), want)
    assert want.tolist() == [1, 2, 7]
    # _columns: several index lists in one pass, blocks smaller than the rows
    got = _columns(y, [outside, train, np.array([3, 3, 0])], block_bytes=3 * n * 8)
    for g, index in zip(got, [outside, train, np.array([3, 3, 0])]):
        np.testing.assert_array_equal(g, y[:, index])


def test_pair_r_over_a_subset_of_images_equals_numpy_corrcoef():
    """The re-scoring's pairs: r over the masked images (and over all), rows read in place where
    consecutive and gathered where not, a unit constant on the masked images only (NaN)."""
    from unitmatch.core.engine import _pair_r

    rng = np.random.default_rng(5)
    n = 60
    x = rng.standard_normal((6, n)) * rng.uniform(0.1, 100, (6, 1)) + rng.uniform(-50, 50, (6, 1))
    train = np.sort(rng.permutation(n)[:45])
    x[2, train] = 7.0  # constant on the train images, not on the others
    y = rng.standard_normal((9, n)) + 10  # neither centred nor scaled
    y[7, train] = 0.1  # constant on the train images
    mask = np.zeros(n)
    mask[train] = 1.0
    yt = y[:, train] - y[:, train].mean(axis=1, keepdims=True)
    y_norm = np.sqrt((yt * yt).sum(axis=1))
    cols = np.array([0, 1, 2, 3, 4, 5, 1, 0, 3, 4])
    rows = np.array([0, 1, 2, 3, 4, 5, 8, 6, 6, 7])  # 6 consecutive rows, then gathered ones (a row twice)
    t = torch.from_numpy
    got = _pair_r(t(x.copy()), t(y), t(y_norm), cols, rows, t(mask), chunk=6)
    want = [np.corrcoef(x[c, train], y[r, train])[0, 1] if c != 2 and r != 7 else np.nan for c, r in zip(cols, rows)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)
    assert np.isnan(got[[2, 9]]).all() and np.isfinite(np.delete(got, [2, 9])).all()
    # over all images, against rows already centred and of norm 1
    yc = y - y.mean(axis=1, keepdims=True)
    yn = yc / np.sqrt((yc * yc).sum(axis=1, keepdims=True))
    got = _pair_r(t(x.copy()), t(yn), None, cols[:9], rows[:9], chunk=4)
    np.testing.assert_allclose(got, [np.corrcoef(x[c], y[r])[0, 1] for c, r in zip(cols[:9], rows[:9])],
                               rtol=0, atol=1e-13)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "torch-ops"])
@pytest.mark.parametrize("n_splits, n_permutations", [(3, 3), (10, 5)])
def test_scratch_bytes_bound_what_a_thread_keeps_for_a_block(fused, n_splits, n_permutations, monkeypatch):
    """``MatchEngine.scratch_bytes`` (how many block tasks a GPU holds at once, sweep.reduce): at least
    what one thread's buffers hold after a block on the untiled path (several splits; on the CPU with
    the fused kernel or, as on a GPU, torch's ops), and not far above it; ``release_scratch`` drops them."""
    from unitmatch.core import engine as engine_module

    if not fused:
        monkeypatch.setattr(engine_module, "_kernels", lambda: None)
    rng = np.random.default_rng(8)
    x = np.maximum(rng.standard_normal((N_IMAGES, 3000)), 0).astype(np.float16)
    y = rng.standard_normal((40, N_IMAGES))
    splits = core.brainscore_splits(n_images=N_IMAGES, n_splits=n_splits, stratify=None, random_state=0)
    engine = MatchEngine(y, splits, n_permutations=n_permutations, device="cpu")
    assert engine.shared and not engine._tiled
    engine.process(UnitBlock(x, "l", 0))
    held = sum(b.numel() * b.element_size() for b in engine._local.pool.values())
    assert 0.5 * engine.scratch_bytes(3000) <= held <= engine.scratch_bytes(3000)
    engine.release_scratch()
    assert "pool" not in engine._local.__dict__


def _tensor_bytes(*objects) -> int:
    """Bytes of the distinct torch storages held in these objects' attributes."""
    seen = {}
    for obj in objects:
        for value in vars(obj).values():
            for t in (value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple))
                      else [value]):
                if isinstance(t, torch.Tensor):
                    seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("n_splits, n_permutations", [(1, 0), (10, 5)])
def test_resident_bytes_bound_what_the_engine_keeps_beside_its_scratch(n_splits, n_permutations):
    """``MatchEngine.resident_bytes`` (a Ray block task's engine, for the fraction of a GPU it asks):
    at least the tensors an engine holds after a block, its per-split plans' included, with the
    tensors a GPU's path builds on first use (the float16 halves of the neuron rows added by hand;
    those of the splits' corrections are not built on the CPU), and within 1.25x of them (test_gpu.py
    checks it against what a GPU allocates); the scratch is not counted."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((N_IMAGES, 500)).astype(np.float32)
    y = rng.standard_normal((30, N_IMAGES))
    splits = core.brainscore_splits(n_images=N_IMAGES, n_splits=n_splits, stratify=None, random_state=0)
    engine = MatchEngine(y, splits, n_permutations=n_permutations, device="cpu")
    engine.process(UnitBlock(x, "l", 0))
    for plan in engine._plans:  # built on first use on a GPU's path
        plan.yn_test_t  # noqa: B018
        if not engine.shared:
            plan.d_t  # noqa: B018
    held = _tensor_bytes(engine, *engine._plans)
    half_rows = 4 * (engine.n_rows + 1) * engine.n_images  # the float16 halves a GPU builds, counted too
    assert held + half_rows <= engine.resident_bytes() <= 1.25 * (held + half_rows), (held, engine.resident_bytes())


def test_numpys_tiles_stay_within_their_bytes_but_never_narrower_than_before():
    """The widest tile of numpy's one-split GEMMs: 4480 units for up to 2880 train rows (51.6 MB of
    float32), narrower with more rows, never below the 2048 units of before."""
    from unitmatch.core.engine import _NUMPY_TILE_BYTES, _numpy_tile_units

    assert _numpy_tile_units(1) == _numpy_tile_units(2880) == 4480
    assert _numpy_tile_units(5000) == _NUMPY_TILE_BYTES // (4 * 5000) == 2580
    assert 4 * 5000 * _numpy_tile_units(5000) <= _NUMPY_TILE_BYTES
    assert _numpy_tile_units(10_000) == _numpy_tile_units(10**6) == 2048
