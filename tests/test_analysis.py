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
