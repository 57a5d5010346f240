"""core.reliability: Spearman-Brown and Brain-Score-style split-half reliability over repeats."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.model_selection import ShuffleSplit

from unitmatch.core.reliability import spearman_brown, split_half_reliability


# ------------------------------------------------------------------ spearman_brown
def test_spearman_brown_values():
    assert spearman_brown(0.5) == pytest.approx(2 / 3)
    assert spearman_brown(0.0) == 0.0
    assert spearman_brown(1.0) == pytest.approx(1.0)
    assert spearman_brown(-0.2) == pytest.approx(-0.5)  # 2 * -0.2 / 0.8
    assert spearman_brown(0.5, n=3) == pytest.approx(0.75)  # 3 * 0.5 / (1 + 2 * 0.5)
    assert spearman_brown(0.3, n=1) == pytest.approx(0.3)
    out = spearman_brown([0.0, 0.25, 0.5, np.nan])
    assert out.dtype == np.float64 and out.shape == (4,)
    np.testing.assert_allclose(out, [0.0, 0.4, 2 / 3, np.nan], equal_nan=True)


# ------------------------------------------------------------------ synthetic signal + noise
N_IMAGES, N_REP = 600, 8
VAR_S = 1.0
VAR_N = (0.5, 2.0, 8.0)  # expected reliabilities of the 8-repeat mean: 0.94, 0.80, 0.50
PER_GROUP = 8


def _signal_plus_noise(seed: int):
    rng = np.random.default_rng(seed)
    var_n = np.repeat(VAR_N, PER_GROUP)
    signal = rng.normal(scale=np.sqrt(VAR_S), size=(len(var_n), N_IMAGES, 1))
    noise = rng.normal(size=(len(var_n), N_IMAGES, N_REP)) * np.sqrt(var_n)[:, None, None]
    return signal + noise, var_n


def test_reliability_matches_theory():
    x, var_n = _signal_plus_noise(0)
    expected = VAR_S / (VAR_S + var_n / N_REP)
    est = split_half_reliability(x)
    assert est.shape == (len(var_n),)
    assert np.isfinite(est).all()
    # per SNR group: the average over neurons is within 0.05 of var_s / (var_s + var_n / R)
    group_est = est.reshape(len(VAR_N), PER_GROUP).mean(axis=1)
    group_exp = expected.reshape(len(VAR_N), PER_GROUP).mean(axis=1)
    np.testing.assert_allclose(group_est, group_exp, atol=0.05)
    # single neurons scatter more at low SNR, but not wildly
    assert np.abs(est - expected)[:PER_GROUP].max() < 0.05  # the high-SNR group
    assert np.abs(est - expected).max() < 0.15
    assert group_est[0] > group_est[1] > group_est[2]


def test_reliability_with_missing_repeats():
    x, var_n = _signal_plus_noise(1)
    rng = np.random.default_rng(2)
    blank = rng.random(x.shape) < 0.2
    blank[:, :, 0] = False  # every image keeps at least one recorded repeat
    y = np.where(blank, np.nan, x)
    counts = (~blank).sum(axis=2)
    # reliability of each neuron's mean over its recorded repeats
    expected = VAR_S / (VAR_S + var_n * (1.0 / counts).mean(axis=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # images with an empty half must not warn
        est = split_half_reliability(y)
    assert np.isfinite(est).all()
    group_est = est.reshape(len(VAR_N), PER_GROUP).mean(axis=1)
    group_exp = expected.reshape(len(VAR_N), PER_GROUP).mean(axis=1)
    np.testing.assert_allclose(group_est, group_exp, atol=0.05)
    # and close to the estimate on the complete data
    full = split_half_reliability(x).reshape(len(VAR_N), PER_GROUP).mean(axis=1)
    assert np.abs(group_est - full).max() < 0.1


def test_pure_noise_is_near_zero_and_signal_only_is_one():
    rng = np.random.default_rng(3)
    noise = rng.normal(size=(4, 600, 6))
    assert np.abs(split_half_reliability(noise)).max() < 0.2
    signal = np.repeat(rng.normal(size=(2, 50, 1)), 4, axis=2)
    np.testing.assert_allclose(split_half_reliability(signal), 1.0)


# ------------------------------------------------------------------ Brain-Score's split of repetitions
def _by_hand(responses, half1, half2):
    """Pearson between the two half means over images with data in both, Spearman-Brown corrected."""
    out = []
    for neuron in responses:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            m1 = np.nanmean(neuron[:, half1], axis=1)
            m2 = np.nanmean(neuron[:, half2], axis=1)
        ok = np.isfinite(m1) & np.isfinite(m2)
        r = np.corrcoef(m1[ok], m2[ok])[0, 1]
        out.append(2 * r / (1 + r))
    return np.array(out)


def test_per_split_shape():
    x, _ = _signal_plus_noise(4)
    per = split_half_reliability(x, per_split=True)
    assert per.shape == (10, x.shape[0])
    np.testing.assert_allclose(split_half_reliability(x), per.mean(axis=0))
    assert split_half_reliability(x[:, :50], per_split=True, n_splits=3).shape == (3, x.shape[0])


def test_first_split_by_hand():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 12, 4)) + rng.normal(size=(3, 12, 1))
    # sklearn ShuffleSplit(train_size=0.5, random_state=1), first split, written out:
    # one permutation of the repetition indices; the first n_test are test, the next n_train train
    perm = np.random.RandomState(1).permutation(4)
    test_half, train_half = perm[:2], perm[2:4]
    sk_train, sk_test = next(ShuffleSplit(n_splits=10, train_size=0.5, random_state=1).split(np.zeros(4)))
    np.testing.assert_array_equal(sk_train, train_half)
    np.testing.assert_array_equal(sk_test, test_half)

    per = split_half_reliability(x, per_split=True)
    np.testing.assert_allclose(per[0], _by_hand(x, train_half, test_half), rtol=1e-12)
    # a different partition of the repeats gives different values: the split really is this one
    others = [p for p in ([0, 1], [0, 2], [0, 3]) if sorted(p) != sorted(train_half) and
              sorted(p) != sorted(test_half)]
    for p in others:
        q = np.setdiff1d(np.arange(4), p)
        assert not np.allclose(per[0], _by_hand(x, np.array(p), q))


@pytest.mark.parametrize("n_rep", [5, 10])
def test_all_splits_follow_sklearn(n_rep):
    rng = np.random.default_rng(n_rep)
    x = rng.normal(size=(2, 20, n_rep)) + 2 * rng.normal(size=(2, 20, 1))
    x[0, 3, 1] = np.nan
    x[1, 7, :3] = np.nan
    splits = list(ShuffleSplit(n_splits=10, train_size=0.5, random_state=1).split(np.zeros(n_rep)))
    assert len(splits[0][0]) == n_rep // 2  # train half: floor(R / 2)
    per = split_half_reliability(x, per_split=True)
    for k, (half1, half2) in enumerate(splits):
        np.testing.assert_allclose(per[k], _by_hand(x, half1, half2), rtol=1e-10)
    np.testing.assert_allclose(split_half_reliability(x), per.mean(axis=0), rtol=1e-12)
    other = split_half_reliability(x, random_state=2, per_split=True)
    assert not np.allclose(other, per)


def test_image_with_empty_half_is_left_out():
    x = np.array([[[1.0, 2.0], [3.0, 3.5], [5.0, 4.0], [7.0, 9.0], [2.0, np.nan]]])
    # 2 repeats: each half is one repeat; image 4 has only one recorded repeat -> dropped
    per = split_half_reliability(x, per_split=True, n_splits=1)
    r = np.corrcoef([1.0, 3.0, 5.0, 7.0], [2.0, 3.5, 4.0, 9.0])[0, 1]
    np.testing.assert_allclose(per[0, 0], 2 * r / (1 + r))


def test_undefined_neurons_are_nan_without_warnings():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(3, 10, 4))
    x[0] = 5.0  # constant: correlation undefined
    x[1, 2:, :2] = np.nan  # only 2 images keep a repeat in the first two repetitions
    x[1, 2:, 2:] = rng.normal(size=(8, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rel = split_half_reliability(x, per_split=True)
        mean = split_half_reliability(x)
    assert np.isnan(rel[:, 0]).all() and np.isnan(mean[0])
    assert np.isfinite(mean[2])
    # neuron 1: splits whose halves are {0, 1} vs {2, 3} leave 2 images -> NaN (< min_images=3)
    splits = list(ShuffleSplit(n_splits=10, train_size=0.5, random_state=1).split(np.zeros(4)))
    for k, (h1, h2) in enumerate(splits):
        if sorted(h1) in ([0, 1], [2, 3]):
            assert np.isnan(rel[k, 1])
        else:
            assert np.isfinite(rel[k, 1])
    assert np.isnan(split_half_reliability(x[:, :2])).all()  # 2 images < min_images
    assert np.isfinite(split_half_reliability(x[2:, :3])).all()  # 3 images suffice
    assert np.isnan(split_half_reliability(x[2:], min_images=11)).all()


# ------------------------------------------------------------------ errors
def test_errors():
    with pytest.raises(ValueError, match=r"needs neurons x images x repeats; got shape \(3, 10\)"):
        split_half_reliability(np.zeros((3, 10)))


def test_a_single_repeat_gives_an_undefined_ceiling_not_an_error():
    x = np.random.default_rng(0).normal(size=(3, 10, 1))
    assert np.isnan(split_half_reliability(x)).all() and split_half_reliability(x).shape == (3,)
    assert split_half_reliability(x, per_split=True, n_splits=4).shape == (4, 3)
