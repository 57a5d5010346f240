"""Slow, independent implementations used to check the engine and as benchmark baselines.

Not for production use: they hold every unit in memory.
"""

from __future__ import annotations

import numpy as np


def pearson_columns(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """float64 Pearson r between every column of y (n, M) and every column of x (n, U): (M, U).

    Columns with zero variance give NaN.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    xc = x - x.mean(axis=0)
    yc = y - y.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        xn = xc / np.sqrt((xc * xc).sum(axis=0))
        yn = yc / np.sqrt((yc * yc).sum(axis=0))
    return yn.T @ xn


def match_reference(activations: np.ndarray, responses: np.ndarray, splits, min_varying_images: int = 1) -> list[dict]:
    """float64 one-to-one matching: per split, the full neurons x units r matrix, then argmax.

    Units that vary on fewer than ``min_varying_images`` train images (:func:`varying_images`) are
    never chosen, nor are constant ones (their r is NaN).

    Returns:
        One dict per split with ``unit`` (M,), ``train_r`` (M,), ``test_r`` (M,) and ``r`` (M, U).
    """
    out = []
    for train, test in splits:
        r = pearson_columns(activations[train], responses[:, train].T)
        allowed = np.isfinite(r) & (varying_images(activations, train) >= min_varying_images)[None, :]
        r_masked = np.where(allowed, r, -np.inf)
        unit = np.argmax(r_masked, axis=1)
        test_r = np.array([
            pearson_columns(activations[test][:, [u]], responses[[j]][:, test].T)[0, 0]
            for j, u in enumerate(unit)
        ])
        out.append({"unit": unit, "train_r": r_masked[np.arange(len(unit)), unit], "test_r": test_r, "r": r})
    return out


def per_neuron_loop(activations: np.ndarray, responses: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Brain-Score's ``SingleRegression`` algorithm: for each neuron, correlate it with all units, argmax.

    Returns:
        (M,) best unit per neuron.
    """
    x = np.asarray(activations[train], dtype=np.float64)
    best = np.empty(responses.shape[0], dtype=np.int64)
    for j in range(responses.shape[0]):
        y = responses[j, train].astype(np.float64)
        xc = x - x.mean(axis=0)
        yc = y - y.mean()
        with np.errstate(invalid="ignore", divide="ignore"):
            r = (xc * yc[:, None]).sum(axis=0) / np.sqrt((xc * xc).sum(axis=0) * (yc * yc).sum())
        best[j] = np.nanargmax(r)
    return best


def varying_images(activations: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Per unit, the train images on which it varies: those off its most populated extreme.

    The extremes are each unit's minimum and maximum over all images (a ReLU unit's zero, a
    saturated unit's ceiling); the count is |train| minus the larger of the numbers of train
    images at either extreme. A constant unit varies on 0 images, a unit non-zero on one
    train image (and zero elsewhere) on 1.

    Returns:
        (U,) int64 counts.
    """
    x = np.asarray(activations)
    low, high = x.min(axis=0), x.max(axis=0)
    xt = x[np.asarray(train)]
    return len(train) - np.maximum((xt == low).sum(axis=0), (xt == high).sum(axis=0))
