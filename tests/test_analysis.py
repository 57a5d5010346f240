"""core.analyze end to end on synthetic data with categories: every table, every statistic."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from unitmatch import core
from unitmatch.core.synthetic import plant_neurons
from unitmatch.core.analysis import analyze

N_CAT, PER_CAT = 6, 40


def _world(seed=0):
    """Units carry category information; V4/IT neurons copy units; 'noise' neurons carry none."""
    rng = np.random.default_rng(seed)
    n = N_CAT * PER_CAT
    cats = np.repeat([f"c{i}" for i in range(N_CAT)], PER_CAT)
    code = rng.standard_normal((N_CAT, 400))
    cat_idx = np.repeat(np.arange(N_CAT), PER_CAT)
    flat = (0.8 * code[cat_idx] + rng.standard_normal((n, 400))).astype(np.float32)
    layers = {"conv": flat[:, :256].reshape(n, 16, 4, 4), "fc": flat[:, 256:]}
    brain = plant_neurons(flat, n_planted=24, n_noise=12, snr=2.0, repeats=6, seed=seed + 1)
    regions = np.array(["V4"] * 12 + ["IT"] * 12 + ["noise"] * 12)
    meta = pd.DataFrame({"category_name": cats, "object_name": [f"{c}_{i % 4}" for i, c in enumerate(cats)]},
                        index=pd.Index([f"im{i}" for i in range(n)], name="image_id"))
    assembly = core.NeuralAssembly(brain.responses, brain.truth.neuron, regions, meta.index, meta)
    return layers, assembly, brain


@pytest.fixture(scope="module")
def analysis():
    layers, assembly, brain = _world()
    splits = core.brainscore_splits(assembly.image_metadata, n_splits=3)
    return analyze(layers, assembly, splits, n_permutations=50, n_random_populations=100, top_k=4), brain


def test_tables_have_the_documented_columns(analysis):
    a, _ = analysis
    assert len(a.matches) == 36 * 3 and "region" in a.matches
    for column in ("neuron", "region", "test_r", "ceiling", "test_r_ceiled", "p_value", "q_value", "significant",
                   "null_train_r", "null_test_r", "strict_unit", "strict_test_r", "layer", "unit"):
        assert column in a.neurons, column
    for column in ("free_test_r", "strict_unit", "strict_test_r", "k_used"):
        assert column in a.assignment
    for column in ("transfer_accuracy", "neuron_accuracy", "chance", "null_mean", "percentile"):
        assert column in a.decoding and column in a.summary
    for column in ("median_test_r", "median_test_r_sem", "mean_test_r", "frac_significant", "n_tested",
                   "median_test_r_ceiled", "brainscore_score", "brainscore_error", "brainscore_ceiling",
                   "brainscore_ceiled", "n_nan_test_r", "n_neurons_nan_test_r", "strict_drop", "n_ceiling_bad",
                   "min_varying_images"):
        assert column in a.summary, column
    assert set(a.summary.region) == {"V4", "IT", "noise"}
    assert set(a.decoding.region) == {"V4", "IT", "noise"} and a.decoding.split.nunique() == 3


def test_planted_regions_are_significant_and_noise_is_not(analysis):
    a, brain = analysis
    s = a.summary.set_index("region")
    assert s.loc["V4", "frac_significant"] == 1.0 and s.loc["IT", "frac_significant"] == 1.0
    assert s.loc["noise", "frac_significant"] <= 1 / 12
    truth = brain.truth.set_index("neuron").unit
    planted = a.matches[a.matches.region != "noise"]
    assert (planted.unit.to_numpy() == truth.loc[planted.neuron].to_numpy()).mean() >= 0.95
    # planted at SNR 2 for the 6-repeat mean: ceiling about 2/3, ceiled score near 1
    assert 0.5 < s.loc["V4", "median_test_r_ceiled"] < 1.3


def test_strict_assignment_is_one_to_one_and_drops_little_here(analysis):
    a, _ = analysis
    for _, part in a.assignment.groupby("split"):
        assert part.strict_unit.is_unique
    # planted units are distinct, so only noise neurons can lose their free choice
    planted = a.assignment[a.assignment.region != "noise"]
    assert (planted.strict_unit == planted.unit).mean() >= 0.95
    assert (a.summary.strict_drop >= -1e-12).all()


def test_decoding_transfers_from_matched_units_to_neurons(analysis):
    a, _ = analysis
    d = a.decoding.groupby("region").mean(numeric_only=True)
    chance = 1 / N_CAT
    for region in ("V4", "IT"):
        assert d.loc[region, "transfer_accuracy"] > 0.6
        assert d.loc[region, "transfer_accuracy"] > d.loc[region, "neuron_accuracy"] - 0.15
        assert d.loc[region, "percentile"] > 95
    assert abs(d.loc["noise", "transfer_accuracy"] - chance) < 0.15
    assert d.null_mean.max() < 0.5  # random populations: near chance, not near the matched ones


def test_decoding_batches_a_regions_splits_and_agrees_with_scikit_learn(monkeypatch):
    """core.analyze decodes each region's splits in one call (their fits batched together, same
    random populations); its decoding table agrees with scikit-learn's fits of the same data within
    one test image per split (24 test images here: 0.042), and on average within 0.01."""
    import functools

    from unitmatch.core import analysis as analysis_module
    from unitmatch.core.decoding import matched_population_decoding_splits

    layers, assembly, _ = _world(seed=5)
    splits = core.brainscore_splits(assembly.image_metadata, n_splits=3)
    seen = []

    def recording(units, *a, **k):
        seen.append(len(units))
        return matched_population_decoding_splits(units, *a, **k)

    monkeypatch.setattr(analysis_module, "matched_population_decoding_splits", recording)
    batched = analyze(layers, assembly, splits, n_permutations=0, n_random_populations=100, top_k=4).decoding
    assert seen == [3, 3, 3]  # 3 regions, each with its 3 splits in one call
    monkeypatch.setattr(analysis_module, "matched_population_decoding_splits",
                        functools.partial(matched_population_decoding_splits, solver="sklearn"))
    reference = analyze(layers, assembly, splits, n_permutations=0, n_random_populations=100, top_k=4).decoding
    n_test = len(splits[0][1])
    cols = ["transfer_accuracy", "unit_accuracy", "neuron_accuracy"]
    diff = np.abs(batched[cols].to_numpy() - reference[cols].to_numpy())
    assert diff.max() <= 1 / n_test + 1e-12 and diff.mean() <= 0.01
    assert np.abs(batched.null_mean - reference.null_mean).max() <= 0.01


def test_decoding_input_errors():
    layers, assembly, _ = _world(seed=3)
    splits = core.brainscore_splits(assembly.image_metadata, n_splits=1)
    few = assembly.select(neurons=list(assembly.neuron_ids[:3]))  # 3 neurons, 6 categories
    with pytest.raises(ValueError, match="at least as many neurons as categories"):
        analyze(layers, few, splits, n_permutations=0, n_random_populations=5)
    bare = core.NeuralAssembly(assembly.responses, assembly.neuron_ids, assembly.regions, assembly.image_ids)
    with pytest.raises(ValueError, match="decoding needs a category per image"):
        analyze(layers, bare, splits, n_permutations=0)
    out = analyze(layers, bare, splits, n_permutations=0, decode=False)
    assert out.decoding.empty and "p_value" not in out.neurons and len(out.summary) == 3


def test_strict_assignment_widens_top_k_until_feasible():
    """Six copies of one neuron share their top candidates: starting from top_k=2 the matching is
    re-run with more candidates until every copy gets its own unit."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((120, 300)).astype(np.float32)
    y = np.repeat((x[:, 7] + 0.5 * rng.standard_normal(120))[None, :], 6, axis=0)
    assembly = core.NeuralAssembly(y, [f"n{i}" for i in range(6)], ["V4"] * 6, [f"im{i}" for i in range(120)])
    splits = [(np.arange(100), np.arange(100, 120))]
    a = analyze({"fc": x}, assembly, splits, top_k=2, n_permutations=0, decode=False)
    assert a.assignment.strict_unit.is_unique and set(a.assignment.unit) == {7}
    assert 7 in set(a.assignment.strict_unit) and (a.assignment.k_used >= 6).all()


def test_a_result_from_elsewhere_keeps_its_settings_and_disagreeing_ones_are_an_error():
    """analyze(result=...) used to replace the top_k it was given by the result's, silently."""
    layers, assembly, _ = _world(seed=5)
    splits = core.brainscore_splits(assembly.image_metadata, n_splits=2)
    settings = core.MatchSettings(top_k=3, n_permutations=5, seed=2)
    result = core.run_matching(layers, assembly.mean_responses(), splits, settings,
                               neuron_ids=assembly.neuron_ids)
    for given in ({"top_k": 5}, {"n_permutations": 0}, {"settings": core.MatchSettings(top_k=3, seed=2)}):
        with pytest.raises(ValueError, match=r"disagree with those that produced result: (top_k=5 \(the result "
                                             r"has 3\)|n_permutations=0 \(the result has 5\))"):
            analyze(layers, assembly, splits, result=result, decode=False, **given)
    same = analyze(layers, assembly, splits, result=result, decode=False, top_k=3, seed=2)
    fresh = analyze(layers, assembly, splits, settings, decode=False)
    pd.testing.assert_frame_equal(same.neurons, fresh.neurons)
    assert (same.assignment.k_used >= 1).all() and same.result.settings == settings


# ------------------------------------------------------------------ bad neurons: flagged, not fatal
def _with_bad_neurons(assembly):
    """The assembly plus a constant neuron (V4), one with every repeat missing for 3 images (IT), and
    one with a single recorded repeat (V4), which only loses its ceiling."""
    r = assembly.responses
    rng = np.random.default_rng(11)
    constant = np.full((1, *r.shape[1:]), 2.5)
    missing = r[12:13] + 0.3 * rng.standard_normal(r[12:13].shape)
    missing[0, [5, 50, 100]] = np.nan
    single = r[0:1].copy()
    single[0, :, 1:] = np.nan
    responses = np.concatenate([r, constant, missing, single])
    ids = list(assembly.neuron_ids) + ["bad_constant", "bad_missing", "one_repeat"]
    regions = list(assembly.regions) + ["V4", "IT", "V4"]
    return core.NeuralAssembly(responses, ids, regions, assembly.image_ids, assembly.image_metadata)


def test_bad_neurons_are_flagged_listed_and_the_rest_analysed_as_without_them():
    layers, assembly, _ = _world(seed=7)
    bad = _with_bad_neurons(assembly)
    splits = core.brainscore_splits(assembly.image_metadata, n_splits=3)
    # each of them used to fail the whole model (the engine refused NaN and constant responses)
    with pytest.raises(ValueError, match="contain NaN/inf|same response to every train image"):
        core.run_matching(layers, bad.mean_responses(), splits, n_permutations=0)
    kw = dict(n_permutations=20, n_random_populations=20, top_k=4)
    a = analyze(layers, bad, splits, **kw)
    without = analyze(layers, bad.select(neurons=[n for n in bad.neuron_ids if not n.startswith("bad_")]), splits, **kw)

    n = a.neurons.set_index("neuron")
    assert list(a.neurons.neuron) == list(bad.neuron_ids)  # every neuron listed, in order
    assert n.loc["bad_constant", "flags"] == "constant_train,no_ceiling" and n.loc["bad_constant", "constant_train"]
    assert n.loc["bad_constant", "n_constant_train_splits"] == 3
    assert n.loc["bad_missing", "flags"] == "missing_images" and n.loc["bad_missing", "n_missing_images"] == 3
    assert n.loc["one_repeat", "flags"] == "no_ceiling" and n.loc["one_repeat", "analyzed"]
    assert n.flagged.sum() == 3 and (n.drop(index=["bad_constant", "bad_missing", "one_repeat"])["flags"] == "").all()
    for neuron in ("bad_constant", "bad_missing"):  # left out: undefined everywhere, never significant
        assert not n.loc[neuron, "analyzed"] and not n.loc[neuron, "significant"]
        assert n.loc[neuron, ["test_r", "p_value", "q_value", "strict_test_r", "unit"]].isna().all()
        assert neuron not in set(a.matches.neuron) | set(a.assignment.neuron)
    assert np.isfinite(n.loc["bad_missing", "ceiling"])  # a ceiling needs no matching: still reported
    # the single-repeat neuron: ceiling undefined, ceiled score excluded, p-value defined
    assert np.isnan(n.loc["one_repeat", ["ceiling", "test_r_ceiled"]].astype(float)).all()
    assert not n.loc["one_repeat", "ceiling_ok"] and np.isfinite(n.loc["one_repeat", "p_value"])

    # the others: identical to an analysis without the excluded neurons
    cols = ["neuron", "region", "test_r", "train_r", "unit", "layer", "ceiling", "test_r_ceiled", "p_value",
            "q_value", "null_test_r", "strict_unit", "strict_test_r"]
    pd.testing.assert_frame_equal(a.neurons[a.neurons.analyzed][cols].reset_index(drop=True),
                                  without.neurons[cols].reset_index(drop=True))
    pd.testing.assert_frame_equal(a.matches.drop(columns="search"), without.matches.drop(columns="search"))
    pd.testing.assert_frame_equal(a.decoding, without.decoding)
    s, w = a.summary.set_index("region"), without.summary.set_index("region")
    same = [c for c in w.columns if c not in ("n_neurons", "n_neurons_flagged", "n_constant_train",
                                              "n_missing_images", "n_no_ceiling")]
    pd.testing.assert_frame_equal(s[same], w.loc[s.index, same])
    assert s.loc["V4", ["n_neurons", "n_analyzed", "n_neurons_flagged", "n_constant_train", "n_no_ceiling"]].tolist() \
        == [14, 13, 2, 1, 2]
    assert s.loc["IT", ["n_neurons", "n_analyzed", "n_neurons_flagged", "n_missing_images"]].tolist() == [13, 12, 1, 1]
    # medians over the defined values, with their counts: the ceiled median uses the positive ceilings only
    v4 = a.neurons[(a.neurons.region == "V4") & a.neurons.analyzed]
    assert s.loc["V4", "n_ceiling_ok"] == v4.ceiling_ok.sum() == 12
    assert s.loc["V4", "median_test_r_ceiled"] == pytest.approx(np.median(v4.test_r_ceiled[v4.ceiling_ok]))
    assert s.loc["V4", "n_tested"] == 13


def test_a_single_repeat_assembly_has_no_ceilings_but_everything_else():
    layers, assembly, _ = _world(seed=8)
    splits = core.brainscore_splits(assembly.image_metadata, n_splits=2)
    one = core.NeuralAssembly(assembly.responses[:, :, :1], assembly.neuron_ids, assembly.regions,
                              assembly.image_ids, assembly.image_metadata)
    flat = core.NeuralAssembly(assembly.responses[:, :, 0], assembly.neuron_ids, assembly.regions,
                               assembly.image_ids, assembly.image_metadata)
    a = analyze(layers, one, splits, n_permutations=10, decode=False)
    b = analyze(layers, flat, splits, n_permutations=10, decode=False)
    assert a.neurons.no_ceiling.all() and a.neurons.ceiling.isna().all() and a.neurons.test_r_ceiled.isna().all()
    assert (a.summary.n_no_ceiling == a.summary.n_neurons).all() and a.summary.brainscore_ceiled.isna().all()
    pd.testing.assert_series_equal(a.neurons.p_value, b.neurons.p_value)
    assert a.neurons.p_value.notna().all()


def test_every_neuron_flagged_is_an_error_naming_them():
    layers, assembly, _ = _world(seed=9)
    r = np.ones((2, assembly.n_images))
    dead = core.NeuralAssembly(r, ["d0", "d1"], ["V4", "V4"], assembly.image_ids, assembly.image_metadata)
    with pytest.raises(ValueError,
                       match=r"no neuron can be matched: all 2 are flagged, e.g. \['d0 \(constant_train\)'"):
        analyze(layers, dead, core.brainscore_splits(assembly.image_metadata, n_splits=2), decode=False)


# ------------------------------------------------------------------ region-committed search
def _reference_matches(x: np.ndarray, y: np.ndarray, splits) -> tuple[np.ndarray, np.ndarray]:
    """float64 numpy: per (split, neuron) the argmax train-r unit of x (images, units) and its test r."""
    def corr(a, b):  # (images, units) x (neurons, images) -> (neurons, units)
        a = a - a.mean(0)
        b = b - b.mean(1, keepdims=True)
        return (b @ a) / np.sqrt((b * b).sum(1))[:, None] / np.sqrt((a * a).sum(0))[None, :]
    units, test_r = [], []
    for train, test in splits:
        best = corr(x[train], y[:, train]).argmax(axis=1)
        units.append(best)
        test_r.append(np.diag(corr(x[test][:, best], y[:, test])))
    return np.array(units), np.array(test_r)


def test_region_committed_search_equals_all_units_restricted_by_hand():
    layers, assembly, _ = _world(seed=10)
    splits = core.brainscore_splits(assembly.image_metadata, n_splits=3)
    mapping = {"V4": ["conv"], "IT": ["f*"], "noise": ["re:.*"]}
    a = analyze(layers, assembly, splits, n_permutations=10, n_random_populations=20, top_k=4, region_layers=mapping)
    assert (a.summary.search == "region_committed").all() and (a.neurons.search == "region_committed").all()
    assert a.summary.set_index("region").searched_layers.to_dict() == {"V4": "conv", "IT": "fc", "noise": "conv,fc"}
    m = a.matches
    assert set(m[m.region == "V4"].layer) == {"conv"} and set(m[m.region == "IT"].layer) == {"fc"}
    assert set(a.layer_matches[a.layer_matches.neuron.isin(m[m.region == "V4"].neuron)].layer) == {"conv"}
    n_conv = 16 * 4 * 4
    y = assembly.mean_responses()
    flat = {"conv": layers["conv"].reshape(len(y[0]), -1), "fc": layers["fc"]}
    for region, names, offset in (("V4", ["conv"], 0), ("IT", ["fc"], n_conv)):
        idx = np.flatnonzero(assembly.regions == region)
        ids = assembly.neuron_ids[idx]
        # the all-units search on the region's neurons with the activations restricted by hand
        by_hand = core.run_matching({k: layers[k] for k in names}, y[idx], splits, a.result.settings, neuron_ids=ids)
        got = m[m.region == region].reset_index(drop=True)
        assert (got.unit.to_numpy() == by_hand.matches.unit.to_numpy() + offset).all()
        np.testing.assert_allclose(got.test_r, by_hand.matches.test_r, rtol=0, atol=1e-12)
        # and the float64 numpy reference
        x = np.concatenate([flat[k] for k in names], axis=1).astype(np.float64)
        ref_unit, ref_test = _reference_matches(x, y[idx], splits)
        assert (got.unit.to_numpy().reshape(3, -1) == ref_unit + offset).all()
        np.testing.assert_allclose(got.test_r.to_numpy().reshape(3, -1), ref_test, rtol=0, atol=1e-10)
        # the null too: the region's neurons permuted as a group of their own
        sel = np.isin(np.asarray(pd.unique(m.neuron)), ids)
        np.testing.assert_array_equal(a.result.null.unit[:, :, sel] - offset, by_hand.null.unit)
    # the strict assignment stays within the mapped layers
    strict_layer = a.assignment.strict_unit.map(lambda u: "conv" if u < n_conv else "fc")
    assert (strict_layer[a.assignment.region == "V4"] == "conv").all()
    assert (strict_layer[a.assignment.region == "IT"] == "fc").all()
    everything = analyze(layers, assembly, splits, n_permutations=0, decode=False)
    assert (everything.summary.search == "all_units").all() and (everything.summary.searched_layers == "all").all()


@pytest.mark.parametrize("mapping, message", [
    ({"V4": ["conv"], "IT": ["fc"], "noise": ["fc"], "V1": ["conv"]},
     r"region_layers: unknown region\(s\) \['V1'\]; the neurons' regions are \['IT', 'V4', 'noise'\]"),
    ({"V4": ["conv"], "IT": ["fc"]}, r"region_layers has no layers for region\(s\) \['noise'\].*the layers are "
                                     r"\['conv', 'fc'\]"),
    ({"V4": ["conv2"], "IT": ["fc"], "noise": ["fc"]},
     r"region_layers\['V4'\]: unknown layer 'conv2': no layer of the activations has that name; "
     r"close layer names: \['conv'\].*the layers are \['conv', 'fc'\]"),
    ({"V4": ["layer*"], "IT": ["fc"], "noise": ["fc"]}, r"region_layers\['V4'\]: layer glob 'layer\*' matches no"),
    ({"V4": [], "IT": ["fc"], "noise": ["fc"]}, r"region_layers\['V4'\] must be a non-empty list"),
    ({"V4": ["blocks"], "IT": ["fc"], "noise": ["fc"]}, r"'blocks' is not a layer name, glob or 're:' regex"),
])
def test_region_layers_errors_name_the_region_or_layer_and_the_valid_ones(mapping, message):
    layers, assembly, _ = _world(seed=12)
    splits = core.brainscore_splits(assembly.image_metadata, n_splits=1)
    with pytest.raises(ValueError, match=message):
        analyze(layers, assembly, splits, n_permutations=0, decode=False, region_layers=mapping)


def test_analysis_times_its_steps(caplog):
    """Analysis.seconds holds each step's wall time (matching only when core.analyze matched), and
    one log line says them."""
    import logging

    layers, assembly, _ = _world(seed=7)
    splits = core.brainscore_splits(assembly.image_metadata, n_splits=2)
    with caplog.at_level(logging.INFO, logger="unitmatch.core.analysis"):
        out = analyze(layers, assembly, splits, n_permutations=0, n_random_populations=10, top_k=4)
    s = out.seconds
    assert set(s) == {"matching", "strict_assignment", "decoding", "total"}
    assert all(v > 0 for v in s.values()) and s["matching"] + s["strict_assignment"] + s["decoding"] <= s["total"]
    assert f"analysis in {s['total']:.1f} s: matching {s['matching']:.1f} s" in caplog.text
    again = analyze(layers, assembly, splits, n_permutations=0, n_random_populations=10, top_k=4, result=out.result)
    assert set(again.seconds) == {"strict_assignment", "decoding", "total"}


def test_decoding_reads_every_regions_units_in_one_gather(monkeypatch):
    """The decoding's random populations and matched units of all regions and splits come from one
    gather (a store decompresses a chunk whole for any of its columns), and its cached reads equal
    direct ones: the accuracies equal those read without the cache."""
    from unitmatch.core import analysis as analysis_module

    layers, assembly, _ = _world(seed=3)
    splits = core.brainscore_splits(assembly.image_metadata, n_splits=2)
    calls = []
    gather = analysis_module.gather_columns

    def counting(layers_, catalogue, units):
        calls.append(len(units))
        return gather(layers_, catalogue, units)

    monkeypatch.setattr(analysis_module, "gather_columns", counting)
    kw = dict(n_permutations=0, n_random_populations=10, top_k=4)
    without = analyze(layers, assembly, splits, decode=False, **kw)
    before = len(calls)
    cached = analyze(layers, assembly, splits, result=without.result, **kw)
    decoding_calls = calls[before:]
    n_regions = len(set(assembly.regions))
    assert n_regions == 3
    # the strict assignment's gather (as without decoding), then one for the decoding of 3 regions
    assert len(decoding_calls) == before + 1, calls
    monkeypatch.setattr(analysis_module, "GATHER_BYTES", 1)  # nothing fits: per-region gathers as before
    calls.clear()
    direct = analyze(layers, assembly, splits, result=without.result, **kw)
    assert len(calls) > before + 1
    pd.testing.assert_frame_equal(cached.decoding, direct.decoding)


def test_cached_columns_reads_misses_directly():
    from unitmatch.core.analysis import _cached_columns

    x = np.arange(40.0).reshape(4, 10)
    reads = []

    def columns(units):
        reads.append(np.asarray(units).tolist())
        return x[:, units]

    cached = _cached_columns(columns, np.array([1, 4, 7]))
    np.testing.assert_array_equal(cached([7, 1, 7]), x[:, [7, 1, 7]])
    np.testing.assert_array_equal(cached([9, 4, 0]), x[:, [9, 4, 0]])
    assert reads == [[1, 4, 7], [9, 0]]  # the cache once, then only the two it lacks


def test_random_populations_replace_constant_units_in_few_gathers():
    """Most units constant on the train images (dead units): every unit of every population varies
    on every split's train images, the activations are the drawn units', and the replacements take
    a few gathers, not one per round of single redraws."""
    from unitmatch.core.analysis import _random_populations

    rng = np.random.default_rng(9)
    n_images, n_units = 60, 500
    x = rng.standard_normal((n_images, n_units))
    dead = rng.random(n_units) < 0.7
    x[:, dead] = 0.0
    splits = core.brainscore_splits(n_images=n_images, n_splits=3, stratify=None)
    reads = []

    def columns(units):
        reads.append(len(units))
        return x[:, units]

    draws = np.stack([rng.choice(n_units, size=12, replace=False) for _ in range(20)])
    out = _random_populations(columns, n_units, draws, n_images, splits, rng)
    assert out.shape == (20, n_images, 12)
    assert not dead[draws].any()
    np.testing.assert_array_equal(out, x[:, draws].transpose(1, 0, 2).astype(np.float32))
    for train, _ in splits:
        assert (np.ptp(out[:, train, :], axis=1) > 0).all()
    assert len(reads) <= 4, reads  # the draws, then 8 candidates per dead unit: 0.7 ** 8 left per round
