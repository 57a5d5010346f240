"""Brain-Score parity: unitmatch's brainscore_* numbers against Brain-Score's published definitions.

The reference below is written from brain-score/vision's definitions, not from unitmatch:
``SingleRegression`` (per split, float64 Pearson r of every unit with each neuron over the train
images, ``np.nanargmax``), ``pearsonr_correlation`` (``scipy.stats.pearsonr`` on the test images),
``CrossRegressedCorrelation.aggregate`` (median over neuroids), ``Split.aggregate`` (mean over
splits, error ``standard_error_of_the_mean`` = std over splits / sqrt(splits)), with xarray's
reductions as Brain-Score calls them (they skip NaN, std has ddof=0); ``InternalConsistency`` (10
``ShuffleSplit(train_size=0.5, random_state=1)`` halves of the unique repetition values, each half
averaged per stimulus, Pearson r per neuroid, Spearman-Brown with n=2, the same aggregate); and
``explained_variance`` (score^2 / ceiling). The data has NaN matches (sparse units chosen whose
held-out responses are constant) and a neuron that is NaN in every split.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import xarray as xr
from sklearn.model_selection import ShuffleSplit, StratifiedShuffleSplit

from unitmatch import core
from unitmatch.core.reference import varying_images

N_OBJECTS, PER_OBJECT, REPEATS = 12, 20, 6
N = N_OBJECTS * PER_OBJECT


# ------------------------------------------------------------------------------ the data
def _splits_reference(object_name):
    sss = StratifiedShuffleSplit(n_splits=10, train_size=0.9, random_state=1)
    return list(sss.split(np.zeros(len(object_name)), object_name))


def _world(seed=0):
    """Dense ReLU units, single-image and two-image units, and neurons some of which pick the latter.

    Neurons: 16 planted on dense units, one "two-spike" neuron (images a and b, never both in a test
    set: whichever is in train picks its single-image unit, constant on the test images, so its held-out
    r is NaN in every split), one "one-spike" neuron (NaN in the splits where its image is in train),
    4 pure-noise neurons. Repeats carry independent noise, so ceilings are finite and differ.
    """
    rng = np.random.default_rng(seed)
    object_name = np.repeat([f"o{i}" for i in range(N_OBJECTS)], PER_OBJECT)
    splits = _splits_reference(object_name)
    in_test = np.zeros((len(splits), N), bool)
    for s, (_, test) in enumerate(splits):
        in_test[s, test] = True
    # two images never in the same test set, and a third image in some test sets but not all
    pairs = [(a, b) for a in range(N) for b in range(a + 1, N) if not (in_test[:, a] & in_test[:, b]).any()]
    a, b = pairs[len(pairs) // 2]
    c = next(i for i in range(N) if i not in (a, b) and 0 < in_test[:, i].sum() < len(splits))
    dense = np.maximum(rng.standard_normal((N, 400)), 0)
    single = np.zeros((N, 6))
    single[a, 0], single[b, 1], single[c, 2] = 3.0, 2.5, 4.0
    single[rng.choice(N, 3, replace=False), [3, 4, 5]] = 1.0
    double = np.zeros((N, 4))
    for k in range(4):
        double[rng.choice(N, 2, replace=False), k] = [1.0, 2.0]
    x = np.concatenate([dense, single, double], axis=1).astype(np.float32)
    layers = {"conv": x[:, :400].reshape(N, 25, 4, 4), "sparse": x[:, 400:]}

    signal = np.concatenate([
        dense[:, rng.choice(400, 16, replace=False)].T,
        (10.0 * (np.arange(N) == a) + 8.0 * (np.arange(N) == b))[None],
        (10.0 * (np.arange(N) == c))[None],
        np.zeros((4, N)),
    ])
    noise_sd = np.concatenate([np.full(16, 0.8), [0.3, 0.3], np.full(4, 1.0)])
    responses = signal[:, :, None] + noise_sd[:, None, None] * rng.standard_normal((len(signal), N, REPEATS))
    meta = pd.DataFrame({"object_name": object_name}, index=pd.Index([f"im{i:03d}" for i in range(N)],
                                                                       name="image_id"))
    ids = [f"n{i:02d}" for i in range(len(signal))]
    assembly = core.NeuralAssembly(responses, ids, ["V4"] * len(ids), meta.index, meta)
    return layers, x, assembly, splits


# ------------------------------------------------------------------------------ the reference
def _brainscore_neuron_to_neuron(x, y, splits, min_varying_images=1):
    """(splits, neurons) held-out r as brain-score/vision computes it (plus the same unit filter)."""
    x = x.astype(np.float64)
    scores = []
    for train, test in splits:
        xm = x[train] - x[train].mean(axis=0, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            xn = xm / np.linalg.norm(xm, axis=0, keepdims=True)
        row = []
        too_sparse = varying_images(x, train) < min_varying_images
        for j in range(y.shape[0]):
            ym = y[j, train] - y[j, train].mean()
            r = (xn * (ym / np.linalg.norm(ym))[:, None]).sum(axis=0)
            r[too_sparse] = np.nan
            unit = np.nanargmax(r)
            with warnings.catch_warnings():  # constant input: NaN, as in Brain-Score
                warnings.simplefilter("ignore")
                row.append(scipy.stats.pearsonr(y[j, test], x[test, unit])[0])
        scores.append(row)
    return np.array(scores)


def _brainscore_aggregate(values):
    """CrossRegressedCorrelation.aggregate, Split.aggregate and standard_error_of_the_mean on xarray."""
    scores = xr.DataArray(values, dims=("split", "neuroid"))
    per_split = scores.median(dim="neuroid")
    return float(per_split.mean("split")), float(per_split.std("split") / math.sqrt(len(per_split["split"])))


def _brainscore_internal_consistency(responses):
    """(10, neuroids) Spearman-Brown corrected split-half r over halves of the repetition values."""
    n_neurons, n_images, n_rep = responses.shape
    repetition = np.arange(n_rep)
    levels = np.unique(repetition)
    out = []
    for h1, h2 in ShuffleSplit(n_splits=10, train_size=0.5, random_state=1).split(np.zeros(len(levels))):
        halves = [responses[:, :, np.isin(repetition, levels[h])].mean(axis=2) for h in (h1, h2)]
        r = np.array([scipy.stats.pearsonr(halves[0][j], halves[1][j])[0] for j in range(n_neurons)])
        out.append(2 * r / (1 + r))
    return np.array(out)


# ------------------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def world():
    return _world()


@pytest.mark.parametrize("min_varying_images", [1, 2, 3])
def test_brainscore_numbers_equal_brainscores_definitions_with_nan_neurons_and_sparse_units(world,
                                                                                              min_varying_images):
    layers, x, assembly, splits_ref = world
    splits = core.brainscore_splits(assembly.image_metadata)  # Brain-Score's default, object_name
    for (tr, te), (etr, ete) in zip(splits, splits_ref):
        np.testing.assert_array_equal(np.sort(tr), np.sort(etr))
        np.testing.assert_array_equal(np.sort(te), np.sort(ete))
    analysis = core.analyze(layers, assembly, splits, min_varying_images=min_varying_images, decode=False)
    got = analysis.summary.set_index("region").loc["V4"]

    test_r = _brainscore_neuron_to_neuron(x, assembly.mean_responses(), splits_ref, min_varying_images)
    score, error = _brainscore_aggregate(test_r)
    ceiling, _ = _brainscore_aggregate(_brainscore_internal_consistency(assembly.responses))
    assert got.brainscore_score == pytest.approx(score, abs=1e-12)
    assert got.brainscore_error == pytest.approx(error, abs=1e-12)
    assert got.brainscore_ceiling == pytest.approx(ceiling, abs=1e-12)
    assert got.brainscore_ceiled == pytest.approx(score ** 2 / ceiling, abs=1e-12)
    # the per-(neuron, split) values themselves, NaN where Brain-Score has NaN
    m = analysis.matches.sort_values(["split", "neuron"])
    np.testing.assert_allclose(m.test_r.to_numpy().reshape(test_r.shape), test_r, atol=1e-12, equal_nan=True)
    assert got.n_nan_test_r == np.isnan(test_r).sum()
    assert got.n_neurons_nan_test_r == np.isnan(test_r).all(axis=0).sum()
    assert got.min_varying_images == min_varying_images
    # ddof=0 (Brain-Score) vs ddof=1 (unitmatch's median_test_r_sem): the factor sqrt(S / (S - 1))
    assert got.median_test_r_sem == pytest.approx(error * math.sqrt(10 / 9), rel=1e-9)
    assert got.median_test_r == pytest.approx(score, abs=1e-12)


def test_the_data_has_what_the_parity_test_needs(world):
    """NaN matches, a neuron NaN in every split, and sparse units chosen only without the policy."""
    layers, x, assembly, splits_ref = world
    y = assembly.mean_responses()
    free = _brainscore_neuron_to_neuron(x, y, splits_ref, 1)
    assert np.isnan(free[:, 16]).all()  # the two-spike neuron: NaN in every split
    assert 0 < np.isnan(free[:, 17]).sum() < len(splits_ref)  # the one-spike neuron: in some
    filtered = _brainscore_neuron_to_neuron(x, y, splits_ref, 2)
    assert not np.isnan(filtered).any()  # with the policy every held-out r is defined here


def test_an_all_nan_neuron_no_longer_makes_the_region_nan(world):
    layers, _, assembly, _ = world
    splits = core.brainscore_splits(assembly.image_metadata)
    analysis = core.analyze(layers, assembly, splits, min_varying_images=1, decode=False)
    row = analysis.summary.iloc[0]
    neuron = analysis.neurons.set_index("neuron").loc["n16"]
    assert np.isnan(neuron.test_r) and neuron.n_nan_test_r == 10  # counted, not hidden
    for column in ("brainscore_score", "brainscore_ceiling", "brainscore_ceiled", "median_test_r",
                   "median_test_r_ceiled"):
        assert np.isfinite(row[column]), column
    assert row.n_neurons_nan_test_r == 1


@pytest.mark.parametrize("min_varying_images", [1, 3])
def test_null_false_positive_rate_stays_nominal_with_and_without_the_sparse_unit_policy(min_varying_images):
    """Pure-noise neurons with heavy-tailed responses (which pick single-image units), 99 permutations:
    P(p <= 0.05) stays at its nominal 5/100 (within 3 binomial SDs) whatever the policy, and NaN
    statistics are handled alike on both sides (untested neurons are counted, not scored)."""
    rng = np.random.default_rng(3)
    n_images, n_noise = 200, 200
    x = np.maximum(rng.standard_normal((n_images, 300)), 0)
    spikes = np.zeros((n_images, 60))
    spikes[rng.integers(0, n_images, 60), np.arange(60)] = 1.0
    x = np.concatenate([x, spikes], axis=1).astype(np.float32)
    y = rng.standard_normal((n_noise, n_images)) ** 3  # heavy tails: outlier images
    splits = core.brainscore_splits(n_images=n_images, n_splits=3, stratify=None)
    result = core.run_matching(x, y, splits, n_permutations=99, seed=1, min_varying_images=min_varying_images)
    table = core.stats.neuron_table(result)
    varying = np.stack([varying_images(x, train) for train, _ in splits])  # (splits, units)
    chosen = np.concatenate([result.matches.sort_values(["split", "neuron"]).unit.to_numpy().reshape(3, -1),
                             result.null.unit.transpose(1, 0, 2).reshape(3, -1)], axis=1)
    sparse_chosen = (np.take_along_axis(varying, chosen, axis=1) < 3).mean()
    if min_varying_images == 1:
        assert sparse_chosen > 0.05  # the situation the policy is about: single-image units win on noise
    else:
        assert sparse_chosen == 0  # never chosen, for observed and permuted neurons alike
    tested = table.p_value.notna()
    assert tested.sum() + table.test_r.isna().sum() == n_noise
    fpr = (table.p_value[tested] <= 0.05).mean()
    assert fpr <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / tested.sum())
    assert (table.n_null <= 99).all() and (table.n_null >= 1).all()
