"""Per-neuron noise ceilings from repeated presentations.

Follows Brain-Score's ``InternalConsistency``: repeats are split into two halves by sklearn
``ShuffleSplit(train_size=0.5, random_state=1)`` over repetition indices, 10 times; each half is
averaged per image, the halves are Pearson-correlated across images per neuron, the correlation is
Spearman-Brown corrected (n = 2), and the corrected values are averaged over the 10 splits.
Missing repeats (NaN) are skipped in the half means; an image whose half has no recorded repeat is
left out of that neuron's correlation. Brain-Score splits the unique repetition *values*: the repeat
axis must be indexed by value (position k = the k-th smallest repetition value, NaN where a
stimulus lacks it), as :func:`core.load_brainio` builds it, for the halves to be Brain-Score's.
``per_split=True`` gives the per-split values that Brain-Score's ceiling aggregates (per split the
median over neurons, then the mean over splits: :func:`core.stats.brainscore_scores`).
"""

from __future__ import annotations

import warnings

import numpy as np


def spearman_brown(r, n: float = 2.0):
    """Reliability of an n-times longer measurement from the reliability r of one part."""
    r = np.asarray(r, dtype=np.float64)
    return n * r / (1 + (n - 1) * r)


def _nan_pearson_rows(a: np.ndarray, b: np.ndarray, min_images: int) -> np.ndarray:
    """Pearson r per row of a and b over columns where both are finite."""
    ok = np.isfinite(a) & np.isfinite(b)
    n = ok.sum(axis=1)
    a0, b0 = np.where(ok, a, 0.0), np.where(ok, b, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ma, mb = a0.sum(1) / n, b0.sum(1) / n
        da, db = np.where(ok, a0 - ma[:, None], 0.0), np.where(ok, b0 - mb[:, None], 0.0)
        r = (da * db).sum(1) / np.sqrt((da * da).sum(1) * (db * db).sum(1))
    r[n < min_images] = np.nan
    return r


def split_half_reliability(
    responses: np.ndarray, *, n_splits: int = 10, random_state: int = 1, per_split: bool = False,
    min_images: int = 3,
) -> np.ndarray:
    """Spearman-Brown corrected split-half reliability per neuron.

    Args:
        responses: (neurons, images, repeats), NaN where a repeat was not recorded.
        n_splits, random_state: the repeat halves (Brain-Score defaults).
        per_split: return (n_splits, neurons) instead of the mean over splits.
        min_images: fewer images with data in both halves gives NaN for that neuron.

    Returns:
        (neurons,) ceilings (NaN where undefined: constant halves, too few images, or a single
        repeat, which cannot be halved: every value NaN). Values can be negative for unreliable
        neurons; they are reported as they are.

    Raises:
        ValueError: responses without a repeat axis.
    """
    from sklearn.model_selection import ShuffleSplit

    responses = np.asarray(responses, dtype=np.float64)
    if responses.ndim != 3:
        raise ValueError(f"reliability needs neurons x images x repeats; got shape {responses.shape}")
    n_rep = responses.shape[2]
    if n_rep < 2:  # a ceiling is undefined, not an error: the neurons are still analysed (flagged no_ceiling)
        nan = np.full((n_splits, responses.shape[0]), np.nan)
        return nan if per_split else nan[0]
    splitter = ShuffleSplit(n_splits=n_splits, train_size=0.5, random_state=random_state)
    values = []
    # all-NaN slices (an image with no recorded repeat in a half) are expected: they become NaN
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for half1, half2 in splitter.split(np.zeros(n_rep)):
            m1 = np.nanmean(responses[:, :, half1], axis=2)
            m2 = np.nanmean(responses[:, :, half2], axis=2)
            values.append(spearman_brown(_nan_pearson_rows(m1, m2, min_images)))
        values = np.stack(values)
        return values if per_split else np.nanmean(values, axis=0)
