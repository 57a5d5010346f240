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

log = logging.getLogger(__name__)

#: ImageNet top-1 (%) of guessing among 1000 classes: where a random-weight control sits on the x axis.
CHANCE_TOP1 = 0.1
STAT_KEYS = ("n_models", "spearman_r", "spearman_p", "pearson_r", "pearson_p", "slope", "intercept")


# --------------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------------

def correspondence_stats(summary: pd.DataFrame, region: str, value: str = "median_test_r") -> dict:
    """Rank and linear correlation of a model score with ImageNet top-1 across models of one region.

    Uses trained models with a finite ``imagenet_top1`` and a finite ``value`` in ``region``.

    Returns:
        ``n_models``, ``spearman_r``, ``spearman_p``, ``pearson_r``, ``pearson_p`` and the least-squares
        line ``value = slope * top1 + intercept``; every statistic is NaN with fewer than 3 models (or
        when either variable is constant).
    """
    if value not in summary:
        raise ValueError(f"summary has no column {value!r}; columns: {list(summary.columns)}")
    x, y = _trained_points(summary, region, value)
    out = dict.fromkeys(STAT_KEYS, math.nan)
    out["n_models"] = len(x)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out
    spearman = stats.spearmanr(x, y)
    pearson = stats.pearsonr(x, y)
    slope, intercept = np.polyfit(x, y, 1)
    out.update(spearman_r=float(spearman.statistic), spearman_p=float(spearman.pvalue),
               pearson_r=float(pearson.statistic), pearson_p=float(pearson.pvalue),
               slope=float(slope), intercept=float(intercept))
    return out


def _trained_points(summary: pd.DataFrame, region: str, value: str) -> tuple[np.ndarray, np.ndarray]:
    rows = _fitted_rows(summary, region, value)
    return rows.imagenet_top1.to_numpy(float), rows[value].to_numpy(float)


def _fitted_rows(summary: pd.DataFrame, region: str, value: str = "median_test_r") -> pd.DataFrame:
    """The rows the statistics use: trained models in ``region`` with finite top-1 and value."""
    rows = summary[(summary.region == region) & summary.trained.astype(bool)]
    top1 = pd.to_numeric(rows.imagenet_top1, errors="coerce")
    score = pd.to_numeric(rows[value], errors="coerce")
    rows = rows[np.isfinite(top1) & np.isfinite(score)]
    duplicated = rows.model[rows.model.duplicated()].unique()
    if len(duplicated):
        raise ValueError(f"summary has several rows for model(s) {list(duplicated)} in region {region!r}; "
                         "expected one row per (model, region)")
    return rows


def _regions(summary: pd.DataFrame) -> list[str]:
    return [str(r) for r in pd.unique(summary.region)]


def _trained_by_model(summary: pd.DataFrame) -> dict[str, bool]:
    return {str(m): bool(t) for m, t in summary.groupby("model", sort=False).trained.first().items()}


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
              "Across trained models with a known top-1 (random-weight controls excluded); score: median "
              "held-out r of each neuron's best-matching unit.", ""]
    stat_rows = []
    for region in _regions(summary):
        s = correspondence_stats(summary, region)
        stat_rows.append({"region": region, "models": s["n_models"],
                          "Spearman ρ": _num(s["spearman_r"]), "p (Spearman)": _num(s["spearman_p"], ".2g"),
                          "Pearson r": _num(s["pearson_r"]), "p (Pearson)": _num(s["pearson_p"], ".2g"),
                          "slope (r per % top-1)": _num(s["slope"], ".4f")})
    lines += [_markdown_table(pd.DataFrame(stat_rows)), ""]

    lines += ["## Models", ""]
    order = summary.assign(_region=summary.region.map({r: i for i, r in enumerate(pd.unique(summary.region))}),
                           _untrained=~summary.trained.astype(bool)).sort_values(
        ["_region", "_untrained", "imagenet_top1"], ascending=[True, True, False], na_position="last")
    model_rows = []
    for _, row in order.iterrows():
        model_rows.append({
            "model": row.model, "arch": row.get("arch", ""), "weights": "trained" if row.trained else "random",
            "top-1 %": _num(row.get("imagenet_top1"), ".1f"), "region": row.region,
            "neurons": _num(row.get("n_neurons"), "d"),
            "median r": _pm(row.get("median_test_r"), row.get("median_test_r_sem")),
            "mean r": _pm(row.get("mean_test_r"), row.get("mean_test_r_sem")),
            "significant": _num(row.get("frac_significant"), ".0%"),
            "median r (ceiled)": _num(row.get("median_test_r_ceiled")),
            "transfer acc (chance)": f"{_num(row.get('transfer_accuracy'))} ({_num(row.get('chance'))})",
        })
    lines += [_markdown_table(pd.DataFrame(model_rows)), ""]

    if len(neurons) and {"layer", "layer_depth"} <= set(neurons.columns):
        lines += ["## Best layers", "", "Where each neuron's best-matching unit sits (depth 0 = first selected "
                  "layer, 1 = last).", ""]
        layer_rows = []
        for (model, region), part in neurons.groupby(["model", "region"], sort=False):
            counts = part.layer.value_counts()
            layer_rows.append({"model": model, "region": region, "neurons": len(part),
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


def _num(x, spec: str = ".3f") -> str:
    """Format a number; missing or non-finite values become an en dash."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "–"
    if not math.isfinite(x):
        return "–"
    return format(int(round(x)), spec) if spec == "d" else format(x, spec)


def _pm(value, sem) -> str:
    text = _num(value)
    return text if _num(sem) == "–" or text == "–" else f"{text} ± {_num(sem)}"


def _markdown_table(df: pd.DataFrame) -> str:
    """A pipe table: ``DataFrame.to_markdown`` when tabulate is installed, else a small formatter."""
    df = df.astype(str)
    try:
        import tabulate  # noqa: F401
    except ImportError:
        pass
    else:
        return df.to_markdown(index=False)
    cell = lambda v: str(v).replace("|", r"\|").replace("\n", " ")  # noqa: E731
    rows = [[cell(c) for c in df.columns]] + [[cell(v) for v in r] for r in df.itertuples(index=False)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(df.columns))]
    fmt = lambda r: "| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [fmt(r) for r in rows[1:]])
