"""The report sink: correspondence-vs-accuracy statistics, plots, a Markdown report and W&B runs.

Inputs are the sweep's tables:

- ``summary``: one row per (model, region) with ``model``, ``arch``, ``trained`` (False = random-weight
  control), ``imagenet_top1`` (%), ``region``, ``n_neurons``, ``median_test_r`` (+ ``_sem``),
  ``mean_test_r`` (+ ``_sem``), ``frac_significant``, ``median_test_r_ceiled``, ``transfer_accuracy``,
  ``chance``.
- ``neurons``: one row per (model, neuron) with ``model``, ``region``, ``neuron``, ``test_r``,
  ``null_test_r``, ``layer``, ``layer_depth`` (0 = first selected layer, 1 = last), ``significant``.
- ``nulls`` (optional): model -> 1-D array of null test r (split-averaged, pooled over neurons).

The across-model statistics use trained models with a known top-1 only: a random-weight control
has no ImageNet accuracy to correlate with, so it is drawn beside the trained models, not fitted.

Plots need matplotlib; without it :func:`make_plots` logs a warning and returns no plots, and the
Markdown report and the W&B runs are written without them. W&B runs go online when an API key is
configured and offline otherwise (``wandb sync <run dir>`` uploads them later).
"""

from __future__ import annotations

import logging
import math
import netrc
import os
import re
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

import numpy as np
import pandas as pd
from scipy import stats

log = logging.getLogger(__name__)

#: ImageNet top-1 (%) of guessing among 1000 classes: where a random-weight control sits on the x axis.
CHANCE_TOP1 = 0.1
STAT_KEYS = ("n_models", "spearman_r", "spearman_p", "pearson_r", "pearson_p", "slope", "intercept")
WANDB_MODES = ("auto", "online", "offline", "disabled")


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
# plots
# --------------------------------------------------------------------------------------------------

def make_plots(summary: pd.DataFrame, neurons: pd.DataFrame, out_dir: str | Path,
               nulls: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write the report's PNG figures to ``out_dir``.

    Figures (keys of the returned dict are the file stems; names are made file-safe):

    - ``correspondence_<region>``: median test r (error bars: SEM over splits) against ImageNet top-1,
      one labelled point per trained model, the least-squares line, Spearman and Pearson in the title;
      random-weight controls in a separate left panel (hollow markers, at chance top-1).
    - ``layer_profile_<region>``: per model, the distribution of its neurons' best-layer depth.
    - ``null_<model>``: the model's neuron test r against its null distribution (models in ``nulls``).

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

    trained = _trained_by_model(summary)
    for region in _regions(summary):
        save(_correspondence_figure(Figure, summary, region), f"correspondence_{_safe(region)}")
        part = neurons[neurons.region == region]
        if len(part):
            save(_layer_profile_figure(Figure, part, region, trained), f"layer_profile_{_safe(region)}")
    for model, null in (nulls or {}).items():
        observed = neurons.loc[neurons.model == model, "test_r"].to_numpy(float)
        null = np.asarray(null, float).ravel()
        if not len(observed) or not np.isfinite(null).any():
            log.warning("null plot for %r skipped: %d neuron rows, %d finite null values", model,
                        len(observed), int(np.isfinite(null).sum()))
            continue
        save(_null_figure(Figure, str(model), observed, null), f"null_{_safe(model)}")
    return plots


def _correspondence_figure(Figure, summary: pd.DataFrame, region: str):
    rows = summary[summary.region == region]
    fitted = _fitted_rows(summary, region)
    controls = rows[~rows.trained.astype(bool)]
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
        left.set_xticks([0], [f"random weights\n(top-1 {top1})"])
        left.set_ylabel("median test r (held-out images)")
    else:
        ax = fig.subplots()
        ax.set_ylabel("median test r (held-out images)")
    ax.errorbar(fitted.imagenet_top1.astype(float), fitted.median_test_r.astype(float),
                yerr=fitted.median_test_r_sem.astype(float).fillna(0), fmt="o", color="C0", capsize=2,
                label="trained models")
    for _, row in fitted.iterrows():
        ax.annotate(str(row.model), (row.imagenet_top1, row.median_test_r), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    if np.isfinite(s["slope"]):
        xs = np.linspace(fitted.imagenet_top1.min(), fitted.imagenet_top1.max(), 2)
        ax.plot(xs, s["slope"] * xs + s["intercept"], color="C1", lw=1.2,
                label=f"least squares: {s['slope']:.4f} r per % top-1")
        ax.legend(fontsize=7, loc="best")
    ax.set_xlabel("ImageNet top-1 (%)")
    fig.suptitle(f"{region}: unit-neuron correspondence vs ImageNet accuracy (n = {s['n_models']} models)\n"
                 f"Spearman ρ = {s['spearman_r']:.3f} (p = {s['spearman_p']:.2g}), "
                 f"Pearson r = {s['pearson_r']:.3f} (p = {s['pearson_p']:.2g})", fontsize=9)
    return fig


def _layer_profile_figure(Figure, part: pd.DataFrame, region: str, trained: dict[str, bool]):
    # A cumulative distribution per model: exact for the few discrete depths a stage selection gives
    # (no bins to choose, a layer that wins no neuron shows as a flat step) and easy to compare across
    # many models (a curve further right = deeper best layers).
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    for i, (model, rows) in enumerate(part.groupby("model", sort=False)):
        depth = np.sort(np.clip(pd.to_numeric(rows.layer_depth, errors="coerce").dropna().to_numpy(float), 0, 1))
        if not len(depth):
            continue
        is_trained = trained.get(str(model), True)
        x = np.concatenate([[0.0], depth, [1.0]])
        y = np.concatenate([[0.0], np.arange(1, len(depth) + 1) / len(depth), [1.0]])
        ax.step(x, y, where="post", color=f"C{i % 10}", ls="-" if is_trained else "--",
                label=f"{model} (n={len(depth)}, median {np.median(depth):.2f})" + ("" if is_trained else " [random]"))
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


# --------------------------------------------------------------------------------------------------
# Weights & Biases
# --------------------------------------------------------------------------------------------------

def resolve_wandb_mode(mode: str = "auto") -> str:
    """The W&B mode to use: ``mode`` itself unless it is ``"auto"``.

    ``"auto"`` follows a ``WANDB_MODE`` set in the environment; otherwise it is ``"online"`` when an
    API key is configured (``WANDB_API_KEY``, or a netrc entry for the W&B host: ``NETRC`` or
    ``~/.netrc``; the host is ``WANDB_BASE_URL``'s, default api.wandb.ai) and ``"offline"`` when not.
    """
    if mode not in WANDB_MODES:
        raise ValueError(f"unknown W&B mode {mode!r}; valid: {', '.join(WANDB_MODES)}")
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE", "").strip()
    if env:
        return env
    return "online" if _wandb_api_key_configured() else "offline"


def _wandb_api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY", "").strip():
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def _init_run(*, project: str, entity: str | None, mode: str, group: str | None, name: str, job_type: str,
              config: Mapping | None, wandb_dir: str | Path | None):
    import wandb

    mode = resolve_wandb_mode(mode)
    kwargs: dict[str, Any] = {}
    if wandb_dir is not None and mode != "disabled":
        Path(wandb_dir).mkdir(parents=True, exist_ok=True)
        kwargs["dir"] = str(wandb_dir)
    # create_new: never return or finish a run the caller has open (the sweep's own run, say).
    return wandb.init(project=project, entity=entity, mode=mode, group=group, name=name, job_type=job_type,
                      config=dict(config or {}), reinit="create_new", **kwargs)


def _finish(run) -> None:
    offline = getattr(run.settings, "mode", None) in ("offline", "dryrun")
    run_dir = Path(run.dir).parent if offline else None
    run.finish()
    if offline:
        log.info("W&B run %r written offline to %s; upload it later with `wandb sync %s`", run.name, run_dir,
                 run_dir)


def _disabled(run) -> bool:
    return bool(getattr(run, "disabled", False)) or getattr(run.settings, "mode", None) == "disabled"


def log_to_wandb(summary: pd.DataFrame, neurons: pd.DataFrame, plots: Mapping[str, str | Path], *, project: str,
                 entity: str | None = None, mode: str = "auto", group: str | None = None, name: str = "summary",
                 config: Mapping | None = None, wandb_dir: str | Path | None = None):
    """Log the sweep's summary as one W&B run (``job_type="summary"``) and finish it.

    Logged: the summary table (``summary``); per region a scatter of ``median_test_r`` against
    ``imagenet_top1`` over the models the statistics use (``correspondence_<region>``); the statistics
    in ``run.summary`` as ``<region>/spearman_r``, ``<region>/pearson_r``, ... ; each PNG as an image
    (``plots/<name>``); the neurons table (``neurons``; above ``wandb.Table.MAX_ROWS`` rows it goes into
    a ``neurons`` artifact instead, which holds up to ``wandb.Table.MAX_ARTIFACT_ROWS``).

    Args:
        mode: ``"auto"`` (see :func:`resolve_wandb_mode`), ``"online"``, ``"offline"`` or ``"disabled"``
            (logs nothing, writes nothing).
        config: run config (e.g. the resolved Hydra config), merged over the regions and model count.
        wandb_dir: where W&B writes its ``wandb/`` folder (default: ``WANDB_DIR`` or the working directory).

    Returns:
        The finished run.
    """
    import wandb

    regions = _regions(summary)
    run_config = {"regions": regions, "n_models": int(summary.model.nunique()), **dict(config or {})}
    run = _init_run(project=project, entity=entity, mode=mode, group=group, name=name, job_type="summary",
                    config=run_config, wandb_dir=wandb_dir)
    if _disabled(run):
        _finish(run)
        return run

    payload: dict[str, Any] = {"summary": wandb.Table(dataframe=_wandb_frame(summary))}
    for region in regions:
        s = correspondence_stats(summary, region)
        points = wandb.Table(dataframe=_wandb_frame(_fitted_rows(summary, region)))
        payload[f"correspondence_{region}"] = wandb.plot.scatter(
            points, "imagenet_top1", "median_test_r",
            title=f"{region}: median test r vs ImageNet top-1 (Spearman {s['spearman_r']:.3f}, "
                  f"Pearson {s['pearson_r']:.3f})")
        for key in STAT_KEYS:
            run.summary[f"{region}/{key}"] = s[key]
    for stem, path in plots.items():
        payload[f"plots/{stem}"] = wandb.Image(str(path), caption=stem)
    neuron_table = wandb.Table(dataframe=_wandb_frame(neurons))
    if len(neurons) <= wandb.Table.MAX_ROWS:
        payload["neurons"] = neuron_table
    else:
        artifact = wandb.Artifact(f"neurons-{run.id}", type="neurons",
                                  description=f"per-neuron matches ({len(neurons)} rows)")
        artifact.add(neuron_table, "neurons")
        run.log_artifact(artifact)
    run.log(payload)
    _finish(run)
    return run


def log_model_run(model: str, stage: str, metrics: Mapping[str, Any], *, project: str, entity: str | None = None,
                  mode: str = "auto", group: str | None = None, config: Mapping | None = None,
                  wandb_dir: str | Path | None = None):
    """One small W&B run per (model, stage): ``job_type=stage``, name ``"<model>/<stage>"``.

    The config holds ``model``, ``stage`` and ``config``; ``metrics`` go into ``run.summary``. The run
    is finished and returned. ``mode`` as in :func:`log_to_wandb`.
    """
    run = _init_run(project=project, entity=entity, mode=mode, group=group, name=f"{model}/{stage}",
                    job_type=stage, config={"model": model, "stage": stage, **dict(config or {})},
                    wandb_dir=wandb_dir)
    if not _disabled(run):
        run.summary.update({k: _plain(v) for k, v in metrics.items()})
    _finish(run)
    return run


def _plain(value):
    """numpy scalars and arrays as plain Python values for the run summary."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _wandb_frame(df: pd.DataFrame) -> pd.DataFrame:
    """The table as W&B takes it: plain object/str columns for categoricals, a fresh index."""
    df = df.reset_index(drop=True).copy()
    for column in df.columns:
        if isinstance(df[column].dtype, pd.CategoricalDtype):
            df[column] = df[column].astype(str)
    return df
