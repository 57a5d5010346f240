"""The report: across-model statistics (correspondence against ImageNet top-1) and report.md.

Inputs are the sweep's tables:

- ``summary``: one row per (model, region) with ``model``, ``arch``, ``trained`` (False = random-weight
  control), ``imagenet_top1`` (%), ``region``, ``n_neurons``, ``median_test_r`` (+ ``_sem``),
  ``mean_test_r`` (+ ``_sem``), ``frac_significant``, ``median_test_r_ceiled``, ``transfer_accuracy``,
  ``chance``.
- ``neurons``: one row per (model, neuron) with ``model``, ``region``, ``neuron``, ``test_r``,
  ``null_test_r``, ``layer``, ``layer_depth`` (0 = first selected layer, 1 = last), ``significant``.

The across-model statistics use trained models with a known top-1 only: a random-weight control
has no ImageNet accuracy to correlate with, so it is drawn beside the trained models, not fitted.
The figures are in :mod:`unitmatch.sweep.figures`, the W&B runs in :mod:`unitmatch.sweep.wandb_sink`.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
from scipy import stats

from unitmatch.core.analysis import SEARCHES  # the memo's all_units first; tables without the column are all_units

log = logging.getLogger(__name__)

#: a model's region-committed results sit beside its all-units ones: results/models/<key>.region_committed/
REGION_COMMITTED_SUFFIX = ".region_committed"
#: ImageNet top-1 (%) of guessing among 1000 classes: where a random-weight control sits on the x axis.
CHANCE_TOP1 = 0.1
STAT_KEYS = ("n_models", "spearman_r", "spearman_p", "pearson_r", "pearson_p", "slope", "intercept")
#: how the report names an x axis that is only illustrative
ILLUSTRATIVE = ("ILLUSTRATIVE: these models have random weights; x is the published top-1 of their "
                "architecture's trained weights, which they do not have")


# --------------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------------

def searches(table: pd.DataFrame) -> list[str]:
    """The searches a table holds, all-units first (a table without a ``search`` column: all_units)."""
    have = set(_search_column(table))
    return [s for s in SEARCHES if s in have] + sorted(have - set(SEARCHES))


def one_search(table: pd.DataFrame, search: str | None = None) -> pd.DataFrame:
    """The rows of one search (default: the first of :func:`searches`), so that a model has one row per region."""
    if search is None:
        found = searches(table)
        search = found[0] if found else "all_units"
    return table[(_search_column(table) == search).to_numpy()]


def _search_column(table: pd.DataFrame) -> pd.Series:
    if "search" not in table:
        return pd.Series("all_units", index=table.index)
    return table.search.fillna("all_units").astype(str)


def results_key(model: str, search: str) -> str:
    """The results folder name (``results/models/<it>``) of a model's results under a search."""
    return model if search == "all_units" else f"{model}{REGION_COMMITTED_SUFFIX}"


def flagged_neurons(neurons: pd.DataFrame) -> pd.DataFrame:
    """The flagged neurons (core.analysis: missing_images, constant_train, no_ceiling), once each:
    neuron, region, flags, analyzed (False: left out of the matching). Empty for tables without flags."""
    if "flagged" not in neurons:
        return pd.DataFrame(columns=["neuron", "region", "flags", "analyzed"])
    bad = neurons[neurons.flagged.astype(bool)]
    return bad[["neuron", "region", "flags", "analyzed"]].drop_duplicates("neuron").reset_index(drop=True)


def flagged_lines(neurons: pd.DataFrame, limit: int = 50) -> list[str]:
    """The flagged neurons as text lines (the printed summary and report.md)."""
    bad = flagged_neurons(neurons)
    if bad.empty:
        return []
    left_out = int((~bad.analyzed.astype(bool)).sum())
    items = [f"{r.neuron} ({r.region}: {r.flags})" for r in bad.itertuples()]
    return [f"flagged neurons: {len(bad)} ({left_out} left out of the matching; the others lack only a ceiling): "
            + ", ".join(items[:limit]) + (f" ... and {len(items) - limit} more (neurons.parquet: flags)"
                                           if len(items) > limit else "")]


def correspondence_stats(summary: pd.DataFrame, region: str, value: str = "median_test_r",
                         search: str | None = None) -> dict:
    """Rank and linear correlation of a model score with ImageNet top-1 across models of one region.

    Uses the rows of :func:`fitted_rows`: models whose weights have that top-1 (trained or checkpoint),
    or, when there are none, random-weight models carrying an illustrative top-1 (the demo), flagged
    ``illustrative``. p-values come from the permutation distribution of the statistic (|r|, two-sided)
    over all pairings of top-1 and score: exact (every pairing) up to 8 models, else
    :data:`N_PERMUTATIONS` random pairings; ``p_method`` says which. Asymptotic p-values are meaningless
    for the handful of models a sweep has.

    Returns:
        ``n_models``, ``spearman_r``, ``spearman_p``, ``pearson_r``, ``pearson_p``, the least-squares
        line ``value = slope * top1 + intercept``, ``illustrative`` and ``p_method``; every statistic
        is NaN with fewer than 3 models (or when either variable is constant).
    """
    if value not in summary:
        raise ValueError(f"summary has no column {value!r}; columns: {list(summary.columns)}")
    rows, illustrative = fitted_rows(summary, region, value, search)
    x, y = rows.imagenet_top1.to_numpy(float), rows[value].to_numpy(float)
    out = dict.fromkeys(STAT_KEYS, math.nan)
    out.update(n_models=len(x), illustrative=illustrative, p_method="")
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out
    rank_x, rank_y = stats.rankdata(x), stats.rankdata(y)
    spearman_p, method = permutation_p(rank_x, rank_y)
    pearson_p, _ = permutation_p(x, y)
    slope, intercept = np.polyfit(x, y, 1)
    out.update(spearman_r=float(stats.spearmanr(x, y).statistic), spearman_p=spearman_p,
               pearson_r=float(stats.pearsonr(x, y).statistic), pearson_p=pearson_p,
               slope=float(slope), intercept=float(intercept), p_method=method)
    return out


#: random pairings for the p-value above :data:`EXACT_UP_TO` models
N_PERMUTATIONS = 100_000
#: models up to which every pairing is enumerated (8! = 40,320)
EXACT_UP_TO = 8


def permutation_p(x: np.ndarray, y: np.ndarray) -> tuple[float, str]:
    """Two-sided permutation p-value of the Pearson correlation of ``x`` and ``y`` (ranks give Spearman's).

    p = share of pairings (permutations of ``x`` against ``y``) whose |r| is at least the observed
    |r|, the observed pairing included: exact over all n! pairings for n <= :data:`EXACT_UP_TO`,
    else over :data:`N_PERMUTATIONS` random pairings (seeded).
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    exact = len(x) <= EXACT_UP_TO
    yz = (y - y.mean()) / np.linalg.norm(y - y.mean())

    def abs_r(a, axis):
        a = a - a.mean(axis=axis, keepdims=True)
        return np.abs((a * yz).sum(axis=axis) / np.linalg.norm(a, axis=axis))

    res = stats.permutation_test((x,), abs_r, permutation_type="pairings", vectorized=True,
                                 n_resamples=np.inf if exact else N_PERMUTATIONS, alternative="greater",
                                 rng=np.random.default_rng(0))
    method = (f"exact permutation ({math.factorial(len(x))} pairings)" if exact
              else f"permutation ({N_PERMUTATIONS} random pairings)")
    return float(res.pvalue), method


def fitted_rows(summary: pd.DataFrame, region: str, value: str = "median_test_r",
                search: str | None = None) -> tuple[pd.DataFrame, bool]:
    """The rows the statistics use in ``region``, and whether their top-1 is only illustrative.

    Models whose weights have the top-1 they carry (``trained``: a published tag or a checkpoint)
    with finite top-1 and ``value``; untrained controls never. When no such model exists, the
    random-weight models that carry an illustrative top-1 (``top1_illustrative``: the demo's test
    models at their trained weights' published value) stand in, and the result says so. Rows of one
    search only (``search``; default: all_units when present, see :func:`one_search`).
    """
    summary = one_search(summary, search)
    rows = summary[summary.region == region]
    top1 = pd.to_numeric(rows.imagenet_top1, errors="coerce")
    score = pd.to_numeric(rows[value], errors="coerce")
    rows = rows[np.isfinite(top1) & np.isfinite(score)]
    real = rows[rows.trained.astype(bool)]
    illustrative = real.empty and "top1_illustrative" in rows and bool(rows.top1_illustrative.astype(bool).any())
    chosen = rows[rows.top1_illustrative.astype(bool)] if illustrative else real
    duplicated = chosen.model[chosen.model.duplicated()].unique()
    if len(duplicated):
        raise ValueError(f"summary has several rows for model(s) {list(duplicated)} in region {region!r}; "
                         "expected one row per (model, region)")
    return chosen, illustrative


def _regions(summary: pd.DataFrame) -> list[str]:
    return [str(r) for r in pd.unique(summary.region)]


def weights_by_model(summary: pd.DataFrame) -> dict[str, str]:
    """model -> what its weights are (trained, checkpoint, random), for labels."""
    return {str(m): str(w) for m, w in summary.groupby("model", sort=False).weights.first().items()}


def _safe(name: str) -> str:
    """A file-name-safe version of a model or region name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("_") or "unnamed"


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------

def write_markdown(summary: pd.DataFrame, neurons: pd.DataFrame, out_dir: str | Path,
                   plots: Mapping[str, str | Path], *, title: str) -> Path:
    """Write ``out_dir/report.md``: statistics per region, the per-model table, best layers, plots."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", ""]

    lines += ["## Correspondence vs ImageNet top-1", "",
              "Across models whose weights have the top-1 they carry (trained tags, checkpoints; untrained "
              "controls excluded); score: median held-out r of each neuron's best-matching unit. p-values: "
              "permutation tests over the pairings of top-1 and score (exact up to 8 models).", ""]
    found = searches(summary)
    several = len(found) > 1
    if several:
        lines += ["Two searches side by side: `all_units` (each neuron's best unit among every unit of every "
                  "layer, the memo's) and `region_committed` (among the units of the layers mapped to its region "
                  "only, Brain-Score's convention).", ""]
    stat_rows, illustrative = [], False
    for search, region in [(f, r) for r in _regions(summary) for f in found]:
        s = correspondence_stats(summary, region, search=search)
        illustrative |= bool(s["illustrative"])
        stat_rows.append({"region": region, **({"search": search} if several else {}), "models": s["n_models"],
                          "x axis": "illustrative" if s["illustrative"] else "top-1 of these weights",
                          "Spearman ρ": _num(s["spearman_r"]), "p (Spearman)": _p(s["spearman_p"]),
                          "Pearson r": _num(s["pearson_r"]), "p (Pearson)": _p(s["pearson_p"]),
                          "slope (r per % top-1)": _num(s["slope"], ".4f"), "p method": s["p_method"] or "–"})
    if illustrative:
        lines += [f"**{ILLUSTRATIVE}.** The correlations below describe nothing about ImageNet accuracy.", ""]
    lines += [_markdown_table(pd.DataFrame(stat_rows)), ""]

    lines += ["## Models", ""]
    order = summary.assign(_region=summary.region.map({r: i for i, r in enumerate(pd.unique(summary.region))}),
                           _untrained=~summary.trained.astype(bool), _search=_search_column(summary)).sort_values(
        ["_region", "_untrained", "imagenet_top1", "model", "_search"], ascending=[True, True, False, True, True],
        na_position="last")
    model_rows = []
    for _, row in order.iterrows():
        model_rows.append({
            "model": row.model, **({"search": row._search} if several else {}), "arch": row.get("arch", ""),
            "weights": str(row.weights) + (" (control)" if bool(row.get("control", False)) else ""),
            "top-1 %": _num(row.get("imagenet_top1"), ".1f") + (" (illustrative)" if bool(
                row.get("top1_illustrative", False)) else ""), "region": row.region,
            "neurons": _num(row.get("n_neurons"), "d"),
            "flagged": _num(row.get("n_neurons_flagged"), "d"),
            "median r": _pm(row.get("median_test_r"), row.get("median_test_r_sem")),
            "mean r": _pm(row.get("mean_test_r"), row.get("mean_test_r_sem")),
            "significant": _num(row.get("frac_significant"), ".0%"),
            "median r (ceiled)": _num(row.get("median_test_r_ceiled")),
            "transfer acc (chance)": f"{_num(row.get('transfer_accuracy'))} ({_num(row.get('chance'))})",
        })
    lines += [_markdown_table(pd.DataFrame(model_rows)), ""]
    if several:
        lines += _side_by_side(summary)
    bad = flagged_lines(neurons)
    if bad:
        lines += ["## Flagged neurons", "", "Left out where undefined, counted in `n_neurons_flagged` "
                  "(missing_images: no response to some images; constant_train: the same response to every train "
                  "image of a split; both left out of the matching. no_ceiling: no split-half ceiling, so no "
                  "ceiled score; matched and tested as usual).", "", *bad, ""]

    if len(neurons) and {"layer", "layer_depth"} <= set(neurons.columns):
        lines += ["## Best layers", "", "Where each neuron's best-matching unit sits (depth 0 = first selected "
                  "layer, 1 = last).", ""]
        layer_rows = []
        matched = neurons[neurons.layer.notna()].assign(_search=_search_column(neurons))
        for (model, search, region), part in matched.groupby(["model", "_search", "region"], sort=False):
            counts = part.layer.value_counts()
            layer_rows.append({"model": model, **({"search": search} if several else {}), "region": region,
                               "neurons": len(part),
                               "median depth": _num(part.layer_depth.median(), ".2f"),
                               "most frequent layer": (f"{counts.index[0]} ({counts.iloc[0] / len(part):.0%})"
                                                       if len(counts) else "–")})
        lines += [_markdown_table(pd.DataFrame(layer_rows)), ""]

    if plots:
        lines += ["## Plots", ""]
        for name, path in plots.items():
            rel = Path(os.path.relpath(Path(path).resolve(), out_dir.resolve())).as_posix()
            lines += [f"![{name}]({rel})", ""]

    path = out_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _side_by_side(summary: pd.DataFrame) -> list[str]:
    """Per (model, region) the median held-out r of both searches, and the layers the committed one searched."""
    table = summary.assign(_search=_search_column(summary))
    rows = []
    for (model, region), part in table.groupby(["model", "region"], sort=False):
        by = part.set_index("_search")
        get = lambda search, col: by.loc[search, col] if search in by.index and col in by else np.nan  # noqa: E731
        rows.append({"model": model, "region": region,
                     "median r, all units": _pm(get("all_units", "median_test_r"),
                                                get("all_units", "median_test_r_sem")),
                     "median r, region-committed": _pm(get("region_committed", "median_test_r"),
                                                       get("region_committed", "median_test_r_sem")),
                     "committed layers": _text(get("region_committed", "searched_layers"))})
    return ["## All units vs region-committed", "", "Per model and region, the median held-out r of each search "
            "(– where that search was not run).", "", _markdown_table(pd.DataFrame(rows)), ""]


def _text(x) -> str:
    return x if isinstance(x, str) and x else "–"


def _num(x, spec: str = ".3f") -> str:
    """Format a number; missing or non-finite values become an en dash."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "–"
    if not math.isfinite(x):
        return "–"
    return format(int(round(x)), spec) if spec == "d" else format(x, spec)


def _p(p) -> str:
    """A p-value as a number, never a bare 0 (permutation p-values are at least 1 / pairings)."""
    text = _num(p, ".2g")
    return text if text == "–" or float(p) >= 1e-4 else format(float(p), ".1e")


def _pm(value, sem) -> str:
    text = _num(value)
    return text if _num(sem) == "–" or text == "–" else f"{text} ± {_num(sem)}"


def _markdown_table(df: pd.DataFrame) -> str:
    """A pipe table, cells as given (already formatted), pipes escaped: the same with or without tabulate."""
    df = df.astype(str)
    cell = lambda v: str(v).replace("|", r"\|").replace("\n", " ")  # noqa: E731
    rows = [[cell(c) for c in df.columns]] + [[cell(v) for v in r] for r in df.itertuples(index=False)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(df.columns))]
    fmt = lambda r: "| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [fmt(r) for r in rows[1:]])
