"""Statistics on matching results: selection-aware p-values, FDR, ceiling-normalized scores, summaries.

The per-neuron statistic is the held-out r of the selected unit averaged over splits. Its null
comes from :class:`core.engine.NullDistribution`: the same selection over all units redone on
permuted copies of the neuron, so the maximum over a million units is inside the null.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from .engine import MatchResult


def permutation_p_values(observed: np.ndarray, null: np.ndarray) -> np.ndarray:
    """One-sided permutation p-values, (1 + #null >= observed) / (1 + P).

    Args:
        observed: (M,) statistic per neuron.
        null: (P, M) the statistic under P permutations.
    """
    observed = np.asarray(observed, dtype=np.float64)
    null = np.asarray(null, dtype=np.float64)
    if null.ndim != 2 or null.shape[1] != observed.shape[0]:
        raise ValueError(f"null must be (permutations, {observed.shape[0]}); got {null.shape}")
    exceed = (np.nan_to_num(null, nan=-np.inf) >= observed[None, :]).sum(axis=0)
    p = (1.0 + exceed) / (1.0 + null.shape[0])
    return np.where(np.isfinite(observed), p, np.nan)


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

    Columns: neuron, region, test_r (mean over splits), test_r_sd (over splits), train_r, gap, layer
    (the most frequent best layer), unit (the most frequent best unit), n_splits; with a ceiling:
    ceiling, ceiling_ok (ceiling > 0), test_r_ceiled (test_r / sqrt(ceiling), NaN where not
    ceiling_ok); with a null: null_train_r (mean maximal train r under permutation), null_test_r,
    null_test_r_95 (its 95th percentile), p_value, q_value (Benjamini-Hochberg within region),
    significant (q_value <= alpha).
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
        table["p_value"] = permutation_p_values(table.test_r.to_numpy(), null_test)
        table["q_value"] = np.nan
        for _, idx in table.groupby("region").groups.items():
            table.loc[idx, "q_value"] = fdr_bh(table.loc[idx, "p_value"].to_numpy())
        table["significant"] = table.q_value <= alpha
    return table


def summarize(result: MatchResult, neurons: pd.DataFrame) -> pd.DataFrame:
    """One row per region: the model-level scores.

    Columns: region, n_neurons, median_test_r and mean_test_r (per split over neurons, then mean
    over splits), median_test_r_sem and mean_test_r_sem (standard error over splits),
    median_train_r; with a ceiling: n_ceiling_ok, n_ceiling_bad (neurons whose ceiling is not
    positive, excluded from the next two), median_test_r_ceiled (median of per-neuron
    r / sqrt(ceiling)), brainscore_ceiled (median of max(r, 0)^2 over median ceiling); with a null:
    frac_significant, median_null_train_r, median_null_test_r.
    """
    m = result.matches.merge(neurons[["neuron", "region"]], on="neuron")
    rows = []
    for region, part in neurons.groupby("region", sort=True):
        per_split = m[m.region == region].groupby("split").test_r
        med, mean = per_split.median(), per_split.mean()
        n_splits = len(med)
        sem = (lambda s: s.std(ddof=1) / np.sqrt(n_splits) if n_splits > 1 else np.nan)  # noqa: E731
        row = {
            "region": region, "n_neurons": len(part),
            "median_test_r": med.mean(), "median_test_r_sem": sem(med),
            "mean_test_r": mean.mean(), "mean_test_r_sem": sem(mean),
            "median_train_r": part.train_r.median(),
        }
        if "ceiling" in part:
            ok = part[part.ceiling_ok]
            row.update({
                "n_ceiling_ok": len(ok), "n_ceiling_bad": len(part) - len(ok),
                "median_test_r_ceiled": ok.test_r_ceiled.median() if len(ok) else np.nan,
                "brainscore_ceiled": (np.median(np.clip(ok.test_r, 0, None) ** 2) / ok.ceiling.median()
                                      if len(ok) else np.nan),
            })
        if "p_value" in part:
            row.update({
                "frac_significant": part.significant.mean(),
                "median_null_train_r": part.null_train_r.median(),
                "median_null_test_r": part.null_test_r.median(),
            })
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
