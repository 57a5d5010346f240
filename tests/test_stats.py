"""Selection-aware permutation null, FDR, ceiling-normalized scores and per-region summaries."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from unitmatch import core
from unitmatch.core.synthetic import plant_neurons
from unitmatch.core.engine import MatchEngine, stack_permutations
from unitmatch.core.stats import fdr_bh, neuron_table, permutation_p_values, summarize


@pytest.fixture(scope="module")
def null_run():
    """100 planted neurons at moderate SNR and 400 pure-noise neurons, 100 permutations, one pass."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 2000)).astype(np.float32)
    brain = plant_neurons(x, n_planted=100, n_noise=400, snr=0.5, seed=1)
    splits = core.brainscore_splits(n_images=300, n_splits=2, stratify=None)
    result = core.run_matching(x, brain.responses, splits, n_permutations=100, seed=3)
    regions = np.where(brain.truth.planted, "planted", "noise")
    return x, brain, splits, result, neuron_table(result, regions=regions)


def test_noise_neurons_are_called_significant_at_chance_rate(null_run):
    table = null_run[-1]
    noise = table[table.region == "noise"]
    assert len(noise) == 400
    # H0: P(p <= 0.05) = 5/101 with 100 permutations; 0.08 is 2.7 binomial SDs above it
    assert (noise.p_value <= 0.05).mean() <= 0.08
    assert noise.significant.mean() <= 0.02  # after Benjamini-Hochberg at q = 0.05


def test_planted_neurons_at_moderate_snr_are_significant(null_run):
    table = null_run[-1]
    planted = table[table.region == "planted"]
    assert planted.significant.mean() >= 0.95
    assert (planted.p_value == 1 / 101).mean() >= 0.9  # most beat every one of the 100 permutations


def test_null_includes_the_selection(null_run):
    x, brain, splits, result, table = null_run
    assert result.null.test_r.shape == (100, 2, 500)
    # the max over 2000 units is high even for noise; held out it collapses to zero
    assert table.null_train_r.median() > 0.15
    assert abs(table.null_test_r.median()) < 0.02
    assert (table.null_train_r > table.null_test_r + 0.15).all()


def test_null_rows_equal_an_explicit_run_on_permuted_neurons(null_run):
    x, brain, splits, _, _ = null_run
    y = brain.responses[:20]
    with_null = core.run_matching(x, y, splits, n_permutations=3, seed=7)
    stacked = stack_permutations(y, 3, seed=7)
    explicit = core.run_matching(x, stacked, splits)
    ex = explicit.matches.sort_values(["split", "neuron"])
    units = ex.unit.to_numpy().reshape(2, 4, 20)  # (split, copy, neuron); copy 0 is the observed
    test_r = ex.test_r.to_numpy().reshape(2, 4, 20)
    np.testing.assert_array_equal(with_null.null.unit, units[:, 1:].transpose(1, 0, 2))
    np.testing.assert_allclose(with_null.null.test_r, test_r[:, 1:].transpose(1, 0, 2), atol=1e-12)
    np.testing.assert_array_equal(with_null.matches.sort_values(["split", "neuron"]).unit.to_numpy(),
                                  units[:, 0].ravel())
    # each permuted copy is a permutation of its neuron's responses
    for p in range(1, 4):
        np.testing.assert_array_equal(np.sort(stacked[p * 20:(p + 1) * 20], axis=1), np.sort(y, axis=1))


def test_p_values_and_bh_by_hand():
    observed = np.array([0.5, 0.1, np.nan])
    null = np.array([[0.6, 0.0, 0.1], [0.2, 0.1, 0.1], [0.1, 0.3, 0.1], [0.4, -0.1, 0.1]])
    np.testing.assert_allclose(permutation_p_values(observed, null), [2 / 5, 3 / 5, np.nan])
    # an undefined permuted copy leaves the null (P counts the defined ones), as an undefined
    # observed neuron leaves the FDR family; a neuron with no defined copy gets no p-value
    null_nan = np.array([[0.6, np.nan, np.nan], [np.nan, 0.1, np.nan], [0.1, np.nan, np.nan],
                         [0.4, -0.1, np.nan]])
    np.testing.assert_allclose(permutation_p_values(observed, null_nan), [2 / 4, 2 / 3, np.nan])
    np.testing.assert_allclose(permutation_p_values(np.array([0.5, 0.1, 0.2]), null_nan), [2 / 4, 2 / 3, np.nan])
    p = np.array([0.01, 0.04, 0.03, 0.20, np.nan])
    # BH by hand: sorted p (0.01, 0.03, 0.04, 0.20) * 4 / rank, then running minimum from the top
    np.testing.assert_allclose(fdr_bh(p), [0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.20, np.nan])
    with pytest.raises(ValueError, match=r"null must be \(permutations, 3\)"):
        permutation_p_values(observed, null[:, :2])


def test_ceiling_normalized_scores_and_bad_ceilings_are_reported():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((200, 300)).astype(np.float32)
    brain = plant_neurons(x, n_planted=6, snr=1.0, seed=6)
    result = core.run_matching(x, brain.responses, core.brainscore_splits(n_images=200, n_splits=3, stratify=None))
    ceiling = np.array([0.81, 0.64, 0.25, 0.0, -0.1, np.nan])
    table = neuron_table(result, regions=["V4"] * 3 + ["IT"] * 3, ceiling=ceiling)
    np.testing.assert_allclose(table.test_r_ceiled[:3], table.test_r[:3] / np.sqrt(ceiling[:3]))
    assert table.ceiling_ok.tolist() == [True] * 3 + [False] * 3
    assert table.test_r_ceiled[3:].isna().all()
    ceiling_splits = ceiling[None, :] + np.array([[-0.05], [0.0], [0.05]])  # three repeat splits
    summary = summarize(result, table, ceiling_splits).set_index("region")
    assert summary.loc["IT", "n_ceiling_bad"] == 3 and np.isnan(summary.loc["IT", "median_test_r_ceiled"])
    v4 = table[table.region == "V4"]
    assert summary.loc["V4", "median_test_r_ceiled"] == pytest.approx(v4.test_r_ceiled.median())
    # Brain-Score's ceiling: per repeat split the median over neurons, then the mean over splits
    assert summary.loc["V4", "brainscore_ceiling"] == pytest.approx(np.median(ceiling_splits[:, :3], axis=1).mean())
    assert summary.loc["V4", "brainscore_ceiled"] == pytest.approx(
        summary.loc["V4", "brainscore_score"] ** 2 / summary.loc["V4", "brainscore_ceiling"])
    # IT: every neuron enters Brain-Score's median, the negative ceiling and the NaN one (skipped) too
    assert summary.loc["IT", "brainscore_ceiling"] == pytest.approx(
        np.mean([np.median([c + d for c in (0.0, -0.1)]) for d in (-0.05, 0.0, 0.05)]))
    with pytest.raises(ValueError, match=r"ceiling_splits must be \(splits, 6 neurons\)"):
        summarize(result, table, ceiling_splits[:, :2])
    # model-level score: median over neurons per split, then the mean over splits
    m = result.matches[result.matches.neuron.isin(v4.neuron)]
    assert summary.loc["V4", "median_test_r"] == pytest.approx(m.groupby("split").test_r.median().mean())
    assert summary.loc["V4", "n_neurons"] == 3 and "frac_significant" not in summary
    with pytest.raises(ValueError, match="ceiling must have one value per neuron"):
        neuron_table(result, ceiling=ceiling[:2])


def test_bad_permutation_count():
    with pytest.raises(ValueError, match=r"MatchSettings.n_permutations must be an integer >= 0; got -1"):
        MatchEngine(np.random.default_rng(0).standard_normal((2, 30)), [(np.arange(20), np.arange(20, 30))],
                    n_permutations=-1)


def test_tables_are_tidy_frames(null_run):
    table = null_run[-1]
    assert isinstance(table, pd.DataFrame) and table.neuron.is_unique
    for column in ("neuron", "region", "test_r", "test_r_sd", "n_nan_test_r", "train_r", "layer", "unit",
                   "null_train_r", "null_test_r", "n_null", "p_value", "q_value", "significant"):
        assert column in table
