"""The report's PNG figures: correspondence against ImageNet top-1, layer profiles, nulls.

Plots need matplotlib; without it :func:`make_plots` logs a warning and returns no plots, and the
Markdown report and the W&B runs are written without them.
"""

from __future__ import annotations

import logging
import math
import textwrap
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from .report import (CHANCE_TOP1, ILLUSTRATIVE, _regions, _safe, correspondence_stats, fitted_rows, one_search,
                     results_key, searches, weights_by_model)

log = logging.getLogger(__name__)



def make_plots(summary: pd.DataFrame, neurons: pd.DataFrame, out_dir: str | Path,
               nulls: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write the report's PNG figures to ``out_dir``.

    Figures (keys of the returned dict are the file stems; names are made file-safe):

    - ``correspondence_<region>``: median test r (error bars: SEM over splits) against ImageNet top-1,
      one labelled point per trained model, the least-squares line, Spearman and Pearson in the title;
      random-weight controls in a separate left panel (hollow markers, at chance top-1).
    - ``layer_profile_<region>``: per model, the distribution of its neurons' best-layer depth.
    - ``null_<model>``: the model's neuron test r against its null distribution (models in ``nulls``).

    A sweep with both searches gets these per search: the region-committed ones end in
    ``_region_committed`` (the null's results key: ``null_<model>.region_committed``).

    Returns:
        name -> path of each written PNG; empty (with a warning) when matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib is not installed: no plots written (the report and W&B runs go without them)")
        return {}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots: dict[str, Path] = {}

    def save(fig, stem: str) -> None:
        path = out_dir / f"{stem}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plots[stem] = path

    weights = weights_by_model(summary)
    observed_of = {}
    for search in searches(summary):
        tail = "" if search == "all_units" else f"_{search}"
        rows, cells = one_search(summary, search), one_search(neurons, search)
        for region in _regions(rows):
            save(_correspondence_figure(Figure, rows, region, search), f"correspondence_{_safe(region)}{tail}")
            part = cells[(cells.region == region) & cells.layer.notna()]
            if len(part):
                save(_layer_profile_figure(Figure, part, region, weights), f"layer_profile_{_safe(region)}{tail}")
        for model, part in cells.groupby("model"):
            observed_of[results_key(str(model), search)] = part.test_r.dropna().to_numpy(float)
    for model, null in (nulls or {}).items():
        observed = observed_of.get(model, np.array([]))
        null = np.asarray(null, float).ravel()
        if not len(observed) or not np.isfinite(null).any():
            log.warning("null plot for %r skipped: %d neuron rows, %d finite null values", model,
                        len(observed), int(np.isfinite(null).sum()))
            continue
        save(_null_figure(Figure, str(model), observed, null), f"null_{_safe(model)}")
    return plots


def _correspondence_figure(Figure, summary: pd.DataFrame, region: str, search: str = "all_units"):
    rows = summary[summary.region == region]
    fitted, illustrative = fitted_rows(summary, region)
    controls = rows[rows.control.astype(bool)] if "control" in rows else rows[~rows.trained.astype(bool)]
    s = correspondence_stats(summary, region)

    fig = Figure(figsize=(9 if len(controls) else 7, 5))
    if len(controls):
        left, ax = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [1.6, 5], "wspace": 0.05})
        x0 = np.where(np.isfinite(controls.imagenet_top1.astype(float)), controls.imagenet_top1.astype(float),
                      CHANCE_TOP1)
        jitter = np.linspace(-0.3, 0.3, len(controls)) if len(controls) > 1 else np.zeros(1)
        left.errorbar(jitter, controls.median_test_r, yerr=controls.median_test_r_sem.fillna(0), fmt="o",
                      mfc="none", color="0.35", capsize=2)
        for xi, (_, row) in zip(jitter, controls.iterrows()):
            left.annotate(str(row.model), (xi, row.median_test_r), fontsize=6, xytext=(3, 3),
                          textcoords="offset points")
        left.set_xlim(-0.6, 1.4)
        top1 = ", ".join(sorted({f"{v:g}%" for v in x0}))
        left.set_xticks([0], ["untrained\ncontrols"])
        left.set_xlabel(f"random weights\n(top-1 {top1})", fontsize=7)
        left.set_ylabel("median test r (held-out images)")
    else:
        ax = fig.subplots()
        ax.set_ylabel("median test r (held-out images)")
    ax.errorbar(fitted.imagenet_top1.astype(float), fitted.median_test_r.astype(float),
                yerr=fitted.median_test_r_sem.astype(float).fillna(0), fmt="o", color="C3" if illustrative else "C0",
                capsize=2, label="random-weight models (illustrative x)" if illustrative else "models with these weights")
    for _, row in fitted.iterrows():
        ax.annotate(str(row.model), (row.imagenet_top1, row.median_test_r), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    if np.isfinite(s["slope"]):
        xs = np.linspace(fitted.imagenet_top1.min(), fitted.imagenet_top1.max(), 2)
        ax.plot(xs, s["slope"] * xs + s["intercept"], color="C1", lw=1.2,
                label=f"least squares: {s['slope']:.4f} r per % top-1")
        ax.legend(fontsize=7, loc="best")
    ax.set_xlabel("ImageNet top-1 (%) of the trained weights: illustrative only" if illustrative
                  else "ImageNet top-1 (%) of these weights")
    where = "" if search == "all_units" else f" ({search.replace('_', '-')} search)"
    title = (f"{region}{where}: unit-neuron correspondence vs ImageNet accuracy (n = {s['n_models']} models)\n"
             f"Spearman ρ = {s['spearman_r']:.3f} (p = {s['spearman_p']:.2g}), "
             f"Pearson r = {s['pearson_r']:.3f} (p = {s['pearson_p']:.2g}; {s['p_method'] or 'no test'})")
    if illustrative:
        title = "\n".join(textwrap.wrap(ILLUSTRATIVE, 110)) + "\n" + title
    fig.suptitle(title, fontsize=8 if illustrative else 9, color="C3" if illustrative else "black")
    fig.subplots_adjust(top=0.80 if illustrative else 0.86)  # room for the title's lines
    return fig


def _layer_profile_figure(Figure, part: pd.DataFrame, region: str, weights: dict[str, str]):
    # A cumulative distribution per model: exact for the few discrete depths a stage selection gives
    # (no bins to choose, a layer that wins no neuron shows as a flat step) and easy to compare across
    # many models (a curve further right = deeper best layers).
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    for i, (model, rows) in enumerate(part.groupby("model", sort=False)):
        depth = np.sort(np.clip(pd.to_numeric(rows.layer_depth, errors="coerce").dropna().to_numpy(float), 0, 1))
        if not len(depth):
            continue
        kind = weights.get(str(model), "trained")
        is_trained = kind != "random"
        x = np.concatenate([[0.0], depth, [1.0]])
        y = np.concatenate([[0.0], np.arange(1, len(depth) + 1) / len(depth), [1.0]])
        ax.step(x, y, where="post", color=f"C{i % 10}", ls="-" if is_trained else "--",
                label=f"{model} (n={len(depth)}, median {np.median(depth):.2f})" + f" [weights: {kind}]")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("best-layer depth (0 = first selected layer, 1 = last)")
    ax.set_ylabel("fraction of neurons with best layer at or below this depth")
    ax.set_title(f"{region}: where each model's best-matching units sit", fontsize=9)
    if ax.lines:
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig


def _null_figure(Figure, model: str, observed: np.ndarray, null: np.ndarray):
    observed, null = observed[np.isfinite(observed)], null[np.isfinite(null)]
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    lo, hi = min(observed.min(initial=0), null.min()), max(observed.max(initial=0), null.max())
    bins = np.linspace(lo, hi, 41) if hi > lo else 10
    ax.hist(null, bins=bins, density=True, alpha=0.5, color="0.5", label=f"null (n={len(null)})")
    ax.hist(observed, bins=bins, density=True, alpha=0.6, color="C0", label=f"neurons (n={len(observed)})")
    q95 = float(np.quantile(null, 0.95))
    above = float(np.mean(observed > q95)) if len(observed) else math.nan
    ax.axvline(q95, color="C3", ls="--", lw=1, label=f"null 95th percentile ({above:.0%} of neurons above)")
    ax.set_xlabel("test r of the best-matching unit (held-out images)")
    ax.set_ylabel("density")
    ax.set_title(f"{model}: matched test r vs permutation null", fontsize=9)
    ax.legend(fontsize=7)
    return fig
