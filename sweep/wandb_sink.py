"""The W&B sink: one run per (model, stage) and one summary run per sweep, online or offline.

W&B runs go online when an API key is configured and offline otherwise (``wandb sync <run dir>``
uploads them later); ``mode="disabled"`` logs and writes nothing.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

import numpy as np
import pandas as pd

from .report import STAT_KEYS, _regions, correspondence_stats, fitted_rows

log = logging.getLogger(__name__)

WANDB_MODES = ("auto", "online", "offline", "disabled")


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


def flat_config(config: Mapping | None, prefix: str = "") -> dict[str, Any]:
    """A nested config as one flat mapping with dotted keys (``analysis.top_k``), as W&B filters it."""
    out: dict[str, Any] = {}
    for key, value in dict(config or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_config(value, f"{name}."))
        else:
            out[name] = _plain(value)
    return out


def use_artifacts(run, artifacts: list) -> None:
    """Declare a run's input artifacts (W&B's lineage edges).

    W&B refuses ``use_artifact`` offline; there the inputs' names go into the run's config as
    ``inputs`` (each was logged by the run that produced it), so an offline run still says what it
    read, and a run synced later keeps that record.
    """
    if not artifacts:
        return
    if getattr(run.settings, "mode", None) in ("offline", "dryrun"):
        run.config.update({"inputs": [a.name for a in artifacts]}, allow_val_change=True)
        return
    for artifact in artifacts:
        run.use_artifact(artifact)


def store_artifact(wandb, path: str | Path, key: Mapping):
    """An activation store as a reference artifact: W&B records where it is and its identity, copies nothing."""
    path = Path(path)
    artifact = wandb.Artifact(f"store-{path.name}", type="activation-store",
                              description=f"activations of {key.get('model')} ({len(key.get('layers', []))} layers)",
                              metadata={k: _plain(v) for k, v in key.items()})
    artifact.add_reference(path.resolve().as_uri(), checksum=False)
    return artifact


def log_to_wandb(summary: pd.DataFrame, neurons: pd.DataFrame, plots: Mapping[str, str | Path], *, project: str,
                 entity: str | None = None, mode: str = "auto", group: str | None = None, name: str = "summary",
                 config: Mapping | None = None, wandb_dir: str | Path | None = None,
                 matches: pd.DataFrame | None = None, results: Mapping[str, str | Path] | None = None):
    """Log the sweep's summary as one W&B run (``job_type="summary"``) and finish it.

    Logged: the summary table (``summary``); per region a scatter of ``median_test_r`` against
    ``imagenet_top1`` over the models the statistics use (``correspondence_<region>``, its title
    marked ILLUSTRATIVE where the x values belong to other weights); the statistics in
    ``run.summary`` as ``<region>/spearman_r``, ``<region>/spearman_p``, ..., ``<region>/n_models``,
    ``<region>/x_illustrative``; each PNG as an image (``plots/<name>``); the neurons table
    (``neurons``; above ``wandb.Table.MAX_ROWS`` rows into a ``neurons`` artifact instead); the
    per-(model, neuron, split) ``matches`` table as a ``results`` artifact; and the lineage: each
    model's results folder in ``results`` as an input artifact ``results-<model>``.

    Args:
        mode: ``"auto"`` (see :func:`resolve_wandb_mode`), ``"online"``, ``"offline"`` or ``"disabled"``
            (logs nothing, writes nothing).
        config: the resolved sweep config; logged flat (``analysis.top_k``), beside regions and model count.
        wandb_dir: where W&B writes its ``wandb/`` folder (default: ``WANDB_DIR`` or the working directory).
        matches: the per-(model, neuron, split) table.
        results: model -> its results folder (the artifacts the analyze runs produced).

    Returns:
        The finished run.
    """
    import wandb

    regions = _regions(summary)
    run_config = {"regions": regions, "n_models": int(summary.model.nunique()), **flat_config(config)}
    run = _init_run(project=project, entity=entity, mode=mode, group=group, name=name, job_type="summary",
                    config=run_config, wandb_dir=wandb_dir)
    if _disabled(run):
        _finish(run)
        return run

    use_artifacts(run, [results_artifact(wandb, model, folder) for model, folder in (results or {}).items()])
    payload: dict[str, Any] = {"summary": wandb.Table(dataframe=_wandb_frame(summary))}
    for region in regions:
        s = correspondence_stats(summary, region)
        rows, illustrative = fitted_rows(summary, region)
        title = (f"{region}: median test r vs ImageNet top-1 (n = {s['n_models']} models; Spearman "
                 f"{s['spearman_r']:.3f}, p = {s['spearman_p']:.2g}; Pearson {s['pearson_r']:.3f}, "
                 f"p = {s['pearson_p']:.2g})")
        payload[f"correspondence_{region}"] = wandb.plot.scatter(
            wandb.Table(dataframe=_wandb_frame(rows)), "imagenet_top1", "median_test_r",
            title=f"ILLUSTRATIVE (random weights) - {title}" if illustrative else title)
        for key in STAT_KEYS:
            run.summary[f"{region}/{key}"] = s[key]
        run.summary[f"{region}/x_illustrative"] = bool(illustrative)
        run.summary[f"{region}/p_method"] = s["p_method"]
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
    if matches is not None:
        artifact = wandb.Artifact(f"matches-{group or name}".replace("/", "-"), type="results",
                                  description=f"per-(model, neuron, split) matches ({len(matches)} rows)")
        artifact.add(wandb.Table(dataframe=_wandb_frame(matches)), "matches")
        run.log_artifact(artifact)
    run.log(payload)
    _finish(run)
    return run


def results_artifact(wandb, model: str, folder: str | Path):
    """A model's results folder (Parquet tables, null, DONE.json) as a ``results`` artifact."""
    artifact = wandb.Artifact(f"results-{model}", type="results", description=f"unitmatch results of {model}")
    artifact.add_dir(str(folder))
    return artifact


def log_model_run(model: str, stage: str, metrics: Mapping[str, Any], *, project: str, entity: str | None = None,
                  mode: str = "auto", group: str | None = None, config: Mapping | None = None,
                  wandb_dir: str | Path | None = None, uses: list | None = None, produces: list | None = None):
    """One small W&B run per (model, stage): ``job_type=stage``, name ``"<model>/<stage>"``.

    The config (flat: ``config``'s dotted keys, then ``run.model`` and ``run.stage``) and ``metrics`` (in
    ``run.summary``) describe the run; ``uses`` and ``produces`` are artifacts (see
    :func:`store_artifact`, :func:`results_artifact`, :func:`data_artifact`) it consumed and made, so
    W&B's lineage graph links stores, neural data and results. ``mode`` as in :func:`log_to_wandb`.
    The run is finished and returned.
    """
    run = _init_run(project=project, entity=entity, mode=mode, group=group, name=f"{model}/{stage}",
                    job_type=stage, config={**flat_config(config), "run.model": model, "run.stage": stage},
                    wandb_dir=wandb_dir)
    if not _disabled(run):
        use_artifacts(run, uses or [])
        for artifact in produces or []:
            run.log_artifact(artifact)
        run.summary.update({k: _plain(v) for k, v in metrics.items()})
    _finish(run)
    return run


def data_artifact(wandb, name: str, digest: str, paths: Mapping[str, str | None]):
    """The neural data and stimuli as an artifact: their content hashes, and references to their files."""
    artifact = wandb.Artifact(f"data-{name}-{digest}", type="neural-data",
                              metadata={"digest": digest, **{k: str(v) for k, v in paths.items() if v}})
    for key, path in paths.items():
        if path and Path(path).exists():
            artifact.add_reference(Path(path).resolve().as_uri(), name=key, checksum=False)
    return artifact


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
