"""Statistics on matching results: selection-aware p-values, FDR, ceiling-normalized scores, summaries.

The per-neuron statistic is the held-out r of the selected unit averaged over splits. Its null
comes from :class:`core.engine.NullDistribution`: the same selection over all units redone on
permuted copies of the neuron, so the maximum over a million units is inside the null.

Undefined values (NaN) are handled the same way everywhere, and counted where they occur: a held-out
r is undefined when the selected unit is constant on the split's test images. A neuron's (or a
permuted copy's) statistic averages its defined splits and is undefined only when every split is.
An undefined observed statistic gets no p-value and leaves the FDR family; an undefined permuted
copy leaves that neuron's null (it is not counted as exceeded, nor as not exceeded).

Two families of model-level numbers sit side by side in :func:`summarize`:

- Brain-Score's definitions, exactly (brain-score/vision ``CrossRegressedCorrelation``,
  ``InternalConsistency``, ``explained_variance``; see :func:`brainscore_aggregate`):
  ``brainscore_score``, ``brainscore_error``, ``brainscore_ceiling``, ``brainscore_ceiled``.
- unitmatch's per-neuron summaries, named for what they are (``median_test_r_ceiled``: the median
  over neurons of r / sqrt(ceiling); ``mean_test_r``; standard errors with ddof=1).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from .engine import MatchResult


def permutation_p_values(observed: np.ndarray, null: np.ndarray) -> np.ndarray:
    """One-sided permutation p-values, (1 + #null >= observed) / (1 + P), over the defined null values.

    A NaN in the null (a permuted copy whose statistic is undefined) leaves that neuron's null, so
    P counts its defined copies; a NaN observed statistic, or a neuron without any defined copy,
    gets p = NaN (and so leaves the FDR family): the same rule on both sides.

    Args:
        observed: (M,) statistic per neuron.
        null: (P, M) the statistic under P permutations.
    """
    observed = np.asarray(observed, dtype=np.float64)
    null = np.asarray(null, dtype=np.float64)
    if null.ndim != 2 or null.shape[1] != observed.shape[0]:
        raise ValueError(f"null must be (permutations, {observed.shape[0]}); got {null.shape}")
    defined = np.isfinite(null)
    with np.errstate(invalid="ignore"):
        exceed = (defined & (null >= observed[None, :])).sum(axis=0)
    n = defined.sum(axis=0)
    p = (1.0 + exceed) / (1.0 + n)
    return np.where(np.isfinite(observed) & (n > 0), p, np.nan)


def brainscore_aggregate(values: np.ndarray) -> tuple[float, float]:
    """Brain-Score's cross-validated aggregate of a (splits, neurons) array, and its error.

    As brain-score/vision computes it (``CrossRegressedCorrelation.aggregate``, then
    ``Split.aggregate`` and ``standard_error_of_the_mean``, on xarray, whose reductions skip NaN):
    per split the median over neurons, then the mean over splits; the error is the standard
    deviation over splits of those medians with ddof=0, over sqrt(number of splits).

    Returns:
        (score, error); NaN where no value is defined.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"values must be (splits, neurons); got shape {values.shape}")
    with warnings.catch_warnings():  # all-NaN splits are NaN, as in xarray
        warnings.simplefilter("ignore", RuntimeWarning)
        per_split = np.nanmedian(values, axis=1)
        return float(np.nanmean(per_split)), float(np.nanstd(per_split, ddof=0) / np.sqrt(len(per_split)))


def brainscore_scores(test_r: np.ndarray, ceiling_splits: np.ndarray | None = None) -> dict:
    """Brain-Score's numbers for one region, from per-(split, neuron) held-out r and per-split ceilings.

    Args:
        test_r: (splits, neurons) held-out r of the selected units.
        ceiling_splits: (ceiling splits, neurons) Spearman-Brown corrected split-half
            reliabilities (:func:`core.split_half_reliability` with ``per_split=True``), optional.

    Returns:
        ``brainscore_score`` and ``brainscore_error`` (:func:`brainscore_aggregate` of test_r);
        with a ceiling, ``brainscore_ceiling`` and ``brainscore_ceiling_error`` (the same aggregate
        of the ceilings: ``InternalConsistency``, every neuron included, negative values too) and
        ``brainscore_ceiled`` = score^2 / ceiling (``explained_variance``; Brain-Score attaches
        the raw score's error to it unchanged, so ``brainscore_error`` is its error too).
    """
    score, error = brainscore_aggregate(test_r)
    out = {"brainscore_score": score, "brainscore_error": error}
    if ceiling_splits is not None:
        ceiling, ceiling_error = brainscore_aggregate(ceiling_splits)
        out.update({"brainscore_ceiling": ceiling, "brainscore_ceiling_error": ceiling_error,
                    "brainscore_ceiled": score ** 2 / ceiling if ceiling != 0 else np.nan})
    return out


def fdr_bh(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values); NaN stays NaN."""
    from scipy.stats import false_discovery_control

    p = np.asarray(p, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        q[ok] = false_discovery_control(p[ok], method="bh")
    return q


def neuron_table(result: MatchResult, *, regions=None, ceiling=None, alpha: float = 0.05) -> pd.DataFrame:
    """One row per neuron: split-averaged scores, ceiling-normalized score, null, p and q values.

    Args:
        result: from :func:`core.run_matching` (with ``n_permutations`` for p-values).
        regions: per neuron, in the order of ``result.matches`` neurons (default "all").
        ceiling: per-neuron split-half reliability in the same order (see
            :func:`core.split_half_reliability`), optional.
        alpha: FDR level for ``significant``.

    Columns: neuron, region, test_r (mean over the splits where it is defined), test_r_sd (over
    splits, ddof=1), n_nan_test_r (splits whose held-out r is undefined: the selected unit is
    constant on the test images), train_r, gap, layer (the most frequent best layer), unit (the
    most frequent best unit), n_splits; with a ceiling: ceiling, ceiling_ok (ceiling > 0),
    test_r_ceiled (test_r / sqrt(ceiling), NaN where not ceiling_ok); with a null: null_train_r
    (mean maximal train r under permutation), null_test_r, null_test_r_95 (its 95th percentile),
    n_null (permuted copies with a defined statistic: the P of the p-value), p_value, q_value
    (Benjamini-Hochberg within region, over the neurons with a p-value), significant
    (q_value <= alpha).
    """
    with warnings.catch_warnings():  # a neuron whose selected units are flat on every test set: NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return _neuron_table(result, regions, ceiling, alpha)


def _neuron_table(result: MatchResult, regions, ceiling, alpha: float) -> pd.DataFrame:
    m = result.matches
    neurons = pd.unique(m.neuron)
    S = m.split.nunique()
    test = m.pivot(index="split", columns="neuron", values="test_r")[neurons].to_numpy()
    table = pd.DataFrame({
        "neuron": neurons,
        "region": _per_neuron(regions, len(neurons), "regions", default="all"),
        "test_r": np.nanmean(test, axis=0),
        "test_r_sd": np.nanstd(test, axis=0, ddof=1) if S > 1 else np.nan,
        "n_nan_test_r": np.isnan(test).sum(axis=0),
        "train_r": m.groupby("neuron", sort=False).train_r.mean()[neurons].to_numpy(),
        "gap": m.groupby("neuron", sort=False).gap.mean()[neurons].to_numpy(),
        "layer": m.groupby("neuron", sort=False).layer.agg(_mode)[neurons].to_numpy(),
        "unit": m.groupby("neuron", sort=False).unit.agg(_mode)[neurons].to_numpy(),
        "n_splits": S,
    })
    if ceiling is not None:
        c = np.asarray(_per_neuron(ceiling, len(neurons), "ceiling"), dtype=np.float64)
        table["ceiling"] = c
        table["ceiling_ok"] = np.isfinite(c) & (c > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            table["test_r_ceiled"] = np.where(table.ceiling_ok, table.test_r / np.sqrt(c), np.nan)
    if result.null is not None:
        null_test = np.nanmean(result.null.test_r, axis=1)  # (P, M): split-averaged, like the observed
        table["null_train_r"] = np.nanmean(result.null.train_r, axis=(0, 1))
        table["null_test_r"] = np.nanmean(null_test, axis=0)
        table["null_test_r_95"] = np.nanpercentile(null_test, 95, axis=0)
        table["n_null"] = np.isfinite(null_test).sum(axis=0)
        table["p_value"] = permutation_p_values(table.test_r.to_numpy(), null_test)
        table["q_value"] = np.nan
        for _, idx in table.groupby("region").groups.items():
            table.loc[idx, "q_value"] = fdr_bh(table.loc[idx, "p_value"].to_numpy())
        table["significant"] = table.q_value <= alpha
    return table


def summarize(result: MatchResult, neurons: pd.DataFrame, ceiling_splits: np.ndarray | None = None) -> pd.DataFrame:
    """One row per region: the model-level scores.

    Args:
        result: the matching.
        neurons: from :func:`neuron_table`.
        ceiling_splits: (ceiling splits, neurons) per-split reliabilities in the order of
            ``neurons`` (:func:`core.split_half_reliability` with ``per_split=True``), for
            Brain-Score's ceiling.

    Columns: region, n_neurons; n_nan_test_r ((neuron, split) matches whose held-out r is
    undefined, out of n_neurons x splits) and n_neurons_nan_test_r (neurons undefined in every
    split); Brain-Score's numbers (:func:`brainscore_scores`): brainscore_score, brainscore_error,
    and with ``ceiling_splits`` brainscore_ceiling, brainscore_ceiling_error, brainscore_ceiled;
    unitmatch's: median_test_r and mean_test_r (per split the median / mean over neurons with a
    defined r, then the mean over splits; median_test_r equals brainscore_score),
    median_test_r_sem and mean_test_r_sem (standard error over splits, ddof=1), median_train_r;
    with a ceiling: n_ceiling_ok, n_ceiling_bad (neurons whose ceiling is not positive, excluded
    from the next one), median_test_r_ceiled (median of per-neuron r / sqrt(ceiling)); with a
    null: n_tested (neurons with a p-value), frac_significant (of all neurons), median_null_train_r,
    median_null_test_r; min_varying_images (the sparse-unit policy the matching used).
    """
    m = result.matches.merge(neurons[["neuron", "region"]], on="neuron")
    order = {n: i for i, n in enumerate(neurons.neuron)}
    if ceiling_splits is not None:
        ceiling_splits = np.asarray(ceiling_splits, dtype=np.float64)
        if ceiling_splits.ndim != 2 or ceiling_splits.shape[1] != len(neurons):
            raise ValueError(f"ceiling_splits must be (splits, {len(neurons)} neurons); got {ceiling_splits.shape}")
    rows = []
    for region, part in neurons.groupby("region", sort=True):
        mr = m[m.region == region]
        test = mr.pivot(index="split", columns="neuron", values="test_r")[part.neuron].to_numpy()
        per_split = mr.groupby("split").test_r
        med, mean = per_split.median(), per_split.mean()
        n_splits = len(med)
        sem = (lambda s: s.std(ddof=1) / np.sqrt(n_splits) if n_splits > 1 else np.nan)  # noqa: E731
        cols = [order[n] for n in part.neuron]
        row = {
            "region": region, "n_neurons": len(part),
            "n_nan_test_r": int(np.isnan(test).sum()), "n_neurons_nan_test_r": int(np.isnan(test).all(axis=0).sum()),
            **brainscore_scores(test, None if ceiling_splits is None else ceiling_splits[:, cols]),
            "median_test_r": med.mean(), "median_test_r_sem": sem(med),
            "mean_test_r": mean.mean(), "mean_test_r_sem": sem(mean),
            "median_train_r": part.train_r.median(),
        }
        if "ceiling" in part:
            ok = part[part.ceiling_ok]
            row.update({
                "n_ceiling_ok": len(ok), "n_ceiling_bad": len(part) - len(ok),
                "median_test_r_ceiled": ok.test_r_ceiled.median() if len(ok) else np.nan,
            })
        if "p_value" in part:
            row.update({
                "n_tested": int(part.p_value.notna().sum()),
                "frac_significant": part.significant.mean(),
                "median_null_train_r": part.null_train_r.median(),
                "median_null_test_r": part.null_test_r.median(),
            })
        if result.settings is not None:
            row["min_varying_images"] = result.settings.min_varying_images
        rows.append(row)
    return pd.DataFrame(rows)


def _per_neuron(values, n: int, name: str, default=None) -> np.ndarray:
    if values is None:
        return np.full(n, default)
    values = np.asarray(values)
    if values.shape != (n,):
        raise ValueError(f"{name} must have one value per neuron ({n}); got shape {values.shape}")
    return values


def _mode(series: pd.Series):
    return series.mode().iloc[0] if series.notna().any() else np.nan
