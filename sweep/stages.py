"""The sweep's stages: extract -> analyze (match on Dask, statistics, decoding) -> report.

:func:`run` checks everything that needs no extraction first (the config against its schema, the
models' architectures, the data paths), then runs the stages ``cfg.stage`` asks for. Each stage skips
finished work: extraction finds complete stores by their identity; analysis finds a model's results
by a fingerprint of (store, neural data, splits, science settings); the report is rebuilt from
whatever complete results the sweep folder holds, so the jobs of a multirun add up. One model
failing is recorded in ``<results_dir>/failures.json`` and the others go on.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import traceback
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from unitmatch import core

from hydra.experimental.callback import Callback

from . import provenance, results
from .config import plain, validate
from .data import check_data, load_assembly, load_stimuli, make_splits
from .zoo import ModelEntry, load_model, plan_models

log = logging.getLogger("unitmatch")


def run(cfg: DictConfig) -> dict:
    """Run the configured stages; returns what was done (for tests and the final summary)."""
    t0 = time.perf_counter()
    validate(cfg)
    cfg = plain(cfg)
    entries = plan_models(cfg)
    check_data(cfg)
    extra = []
    if cfg.neural.kind == "synthetic" and cfg.stage != "report" and cfg.neural.planted_model not in {e.key for e in entries}:
        # every job of a multirun builds the same brain from the planted model's store
        extra = [load_model(cfg.neural.planted_model, "neural.planted_model")]
    if cfg.stage in ("all", "extract", "analyze"):
        stimuli = load_stimuli(cfg)
        splits = make_splits(cfg, stimuli)
    results_dir = Path(cfg.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    done = {"extracted": [], "analyzed": [], "skipped": [], "failed": {}, "report": None}
    if cfg.stage in ("all", "extract", "analyze"):
        stores = stage_extract(cfg, entries + extra, stimuli, done)
    if cfg.stage in ("all", "analyze"):
        assembly = load_assembly(cfg, stimuli, stores)
        stage_analyze(cfg, entries, stores, assembly, splits, done)
    if cfg.stage in ("all", "report"):
        # in a multirun the jobs' reports are partial: the W&B summary is logged once, after the last
        # job, by the MultirunReport callback
        done["report"] = stage_report(cfg, wandb_summary=not _in_multirun())
    results.update_failures(results_dir, done["failed"], done["analyzed"])
    log.info("sweep %s: %d extracted, %d analyzed, %d skipped, %d failed in %.1f s", cfg.sweep_name,
             len(done["extracted"]), len(done["analyzed"]), len(done["skipped"]), len(done["failed"]),
             time.perf_counter() - t0)
    return done


def _ray(cfg: DictConfig):
    """Ray for this job: a private local instance (stopped after) or the cluster at ``cluster.address``."""
    from .cluster import ray_session

    c = cfg.cluster
    local = c.address == "local"
    return ray_session(c.address, num_cpus=c.num_cpus if local else None, connect_timeout_s=c.connect_timeout_s,
                       runtime_env=OmegaConf.to_container(c.runtime_env) if c.runtime_env else None)


def stage_extract(cfg: DictConfig, entries: list[ModelEntry], stimuli, done: dict) -> dict:
    """Complete stores for every model (extracting what is missing on the Ray actor pool)."""
    from unitmatch.core.extract import prepare_store
    from unitmatch.core.store import ActivationStore

    from .extract import ZooExtraction

    c, compute = cfg.cluster, cfg.compute
    stores, todo = {}, []
    for entry in entries:
        try:
            store = prepare_store(entry.spec, stimuli, entry.layers, cfg.store_root, batch_size=compute.batch_size,
                                  dtype=compute.dtype)
        except Exception as err:  # noqa: BLE001 - one model failing must not stop the sweep
            _failed(done, entry.key, "extract", err)
            continue
        if store.complete:
            stores[entry.key] = ActivationStore.open(store.path)
        else:
            todo.append((entry, store))
    if todo:
        with _ray(cfg):
            zoo = ZooExtraction(cfg.store_root, n_actors=c.n_actors, num_gpus=c.num_gpus_per_actor,
                                num_cpus=c.num_cpus_per_actor, batch_size=compute.batch_size, dtype=compute.dtype,
                                shard_batches=c.shard_batches, in_flight=c.in_flight, memory=c.memory_per_actor,
                                resources=dict(c.resources_per_actor), wait_log_s=c.wait_log_s)
            try:
                for entry, store in todo:  # one model at a time so a failure is attributed to its model
                    try:
                        stores[entry.key] = zoo.run([entry.spec], stimuli, entry.layers,
                                                    stores={entry.spec: store})[entry.spec]
                        done["extracted"].append(entry.key)
                        _log_stage(cfg, entry, "extract", {"store": str(stores[entry.key].path)},
                                   produces=[("store", stores[entry.key])])
                    except Exception as err:  # noqa: BLE001
                        _failed(done, entry.key, "extract", err)
            finally:
                zoo.shutdown()  # release the actors' CPUs before the reduction runs on the cluster
    return stores


def stage_analyze(cfg: DictConfig, entries: list[ModelEntry], stores: dict, assembly, splits, done: dict) -> None:
    from .reduce import match_store

    a, compute = cfg.analysis, cfg.compute
    neural_fp = hashlib.sha256(np.ascontiguousarray(assembly.responses).tobytes()).hexdigest()[:16]
    science = OmegaConf.to_container(a, resolve=True)
    # the science settings of matching, and how to compute it, as the engine takes them
    settings = core.MatchSettings(top_k=a.top_k, n_permutations=a.n_permutations, seed=a.random_state,
                                  min_varying_images=a.min_varying_images, block_units=compute.block_units,
                                  device=compute.device)
    provenance.write_sweep(cfg, neural_fp, assembly, {e.key: stores[e.key] for e in entries if e.key in stores})
    for entry in entries:
        if entry.key not in stores:
            continue
        store = stores[entry.key]
        fp = results.fingerprint(store.path.name, neural_fp, [s[0].tolist() for s in splits], science)
        if results.is_done(cfg.results_dir, entry.key, fp):
            done["skipped"].append(entry.key)
            continue
        try:
            t0 = time.perf_counter()
            scheduler = compute.scheduler
            if scheduler == "auto":
                scheduler = "threads" if cfg.cluster.address == "local" else "ray"
            with _ray(cfg) if scheduler == "ray" else contextlib.nullcontext():
                result = match_store(store, assembly.mean_responses(), splits, settings,
                                     neuron_ids=assembly.neuron_ids, scheduler=scheduler, progress=True,
                                     gpus_per_task=cfg.cluster.gpus_per_reduce_task, wait_log_s=cfg.cluster.wait_log_s)
            analysis = core.analyze(store.layers(), assembly, splits, catalogue=store.catalogue(), result=result,
                                    decode=a.decode, n_random_populations=a.n_random_populations, alpha=a.alpha)
            folder = _write_results(cfg, entry, store, analysis, result,
                                    {"fingerprint": fp, "seconds": time.perf_counter() - t0, "store": store.path.name,
                                     "neural_data": neural_fp})
            done["analyzed"].append(entry.key)
            _log_stage(cfg, entry, "analyze", _metrics(analysis.summary),
                       uses=[("store", store), ("data", neural_fp)], produces=[("results", folder)])
        except Exception as err:  # noqa: BLE001
            _failed(done, entry.key, "analyze", err)


def _write_results(cfg: DictConfig, entry: ModelEntry, store, analysis, result, done: dict) -> Path:
    depth = {layer.name: i / max(len(store.layer_units) - 1, 1) for i, layer in enumerate(store.layer_units)}
    tag = dict(model=entry.key, arch=entry.arch, weights=entry.weights, trained=entry.trained,
               control=entry.control is not None, top1_illustrative=entry.top1_illustrative,
               imagenet_top1=np.nan if entry.imagenet_top1 is None else entry.imagenet_top1)
    neurons = analysis.neurons.assign(**tag)
    neurons["layer_depth"] = neurons.layer.map(depth)
    tables = {
        "matches": analysis.matches.assign(model=entry.key),
        "neurons": neurons,
        "summary": analysis.summary.assign(**tag, imagenet_top1_source=entry.imagenet_top1_source),
        "layer_matches": analysis.layer_matches.assign(model=entry.key),
        "assignment": analysis.assignment.assign(model=entry.key),
        "decoding": analysis.decoding.assign(model=entry.key),
    }
    null = None if result.null is None else {"test_r": result.null.test_r, "train_r": result.null.train_r}
    return results.write_model_results(Path(cfg.results_dir), entry.key, tables, null, done,
                                       {"provenance.json": provenance.model_record(entry, store)})


def stage_report(cfg: DictConfig, wandb_summary: bool = True) -> Path | None:
    """Aggregate all models of the sweep: tables, plots, report.md, and (``wandb_summary``) the W&B summary run."""
    from .figures import make_plots
    from .report import write_markdown
    from .wandb_sink import log_to_wandb

    results_dir = Path(cfg.results_dir)
    summary, neurons, nulls, matches = results.collect(results_dir, with_matches=True)
    if summary.empty:
        log.warning("no finished model results in %s: nothing to report", results_dir)
        return None
    # per (model, neuron, split): layer, unit coordinates, train_r, test_r, p-value, ceiling ...
    matches.to_parquet(results_dir / "matches.parquet", index=False)
    matches.to_csv(results_dir / "matches.csv", index=False)
    summary.to_csv(results_dir / "summary.csv", index=False)
    summary.to_parquet(results_dir / "summary.parquet", index=False)
    neurons.to_parquet(results_dir / "neurons.parquet", index=False)
    neurons.drop(columns=[c for c in neurons.columns if neurons[c].dtype == object and c not in
                          ("model", "neuron", "region", "layer", "arch")]).to_csv(results_dir / "neurons.csv",
                                                                                 index=False)
    plots = make_plots(summary, neurons, results_dir, nulls=nulls)
    report = write_markdown(summary, neurons, results_dir, plots, title=f"unitmatch sweep {cfg.sweep_name}")
    if cfg.logger.enabled and wandb_summary:
        folders = {m: results.model_dir(results_dir, m) for m in pd.unique(summary.model)}
        log_to_wandb(summary, neurons, plots, project=cfg.logger.project, entity=cfg.logger.entity,
                     mode=cfg.logger.mode, group=cfg.sweep_name, name=f"{cfg.sweep_name}/summary",
                     config=OmegaConf.to_container(cfg, resolve=True), wandb_dir=cfg.logger.dir,
                     matches=matches, results=folders)
    return report


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


class MultirunReport(Callback):
    """After the last job of a multirun: the sweep's report and its one W&B summary run."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        config = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])  # the sweep's own keys
        validate(config)
        report = stage_report(plain(config))  # reads every job's results once (None, with a warning, if none)
        if report is not None:
            log.info("multirun report (all jobs): %s", report)


# ---------------------------------------------------------------------------------------- helpers
def _failed(done: dict, key: str, stage: str, err: BaseException) -> None:
    log.error("model %s failed in %s: %s", key, stage, err)
    done["failed"][key] = {"stage": stage, "error": f"{type(err).__name__}: {err}",
                           "traceback": traceback.format_exc()}


def _metrics(summary: pd.DataFrame) -> dict:
    out = {}
    for row in summary.itertuples():
        for col in ("median_test_r", "mean_test_r", "frac_significant", "median_test_r_ceiled", "transfer_accuracy"):
            value = getattr(row, col, None)
            if value is not None and np.isfinite(value):
                out[f"{row.region}/{col}"] = float(value)
    return out


def _log_stage(cfg: DictConfig, entry: ModelEntry, stage: str, metrics: dict, uses=(), produces=()) -> None:
    """One W&B run for (model, stage), with its inputs and outputs as artifacts (W&B's lineage graph)."""
    if not cfg.logger.enabled:
        return
    import wandb

    from .wandb_sink import data_artifact, log_model_run, results_artifact, store_artifact

    def artifact(kind, value):
        if kind == "store":
            return store_artifact(wandb, value.path, value.key)
        if kind == "results":
            return results_artifact(wandb, entry.key, value)
        n = cfg.neural
        return data_artifact(wandb, cfg.sweep_name, value, {"responses": n.responses or n.path,
                                                            "stimuli": cfg.stimuli.path})

    model = {"key": entry.key, "weights": entry.weights, "control": entry.control or "none",
             "imagenet_top1": entry.imagenet_top1, "imagenet_top1_illustrative": entry.top1_illustrative,
             "spec": {k: v for k, v in entry.spec.__dict__.items()}}
    try:
        log_model_run(entry.key, stage, {**metrics, "weights": entry.weights}, project=cfg.logger.project,
                      entity=cfg.logger.entity, mode=cfg.logger.mode, group=cfg.sweep_name, wandb_dir=cfg.logger.dir,
                      config={"model": model, **OmegaConf.to_container(cfg, resolve=True)},
                      uses=[artifact(*u) for u in uses], produces=[artifact(*p) for p in produces])
    except Exception as err:  # noqa: BLE001 - the results are on disk; logging them must not fail the model
        log.error("W&B run for %s/%s not logged: %s: %s", entry.key, stage, type(err).__name__, err)


def print_summary(cfg: DictConfig, done: dict) -> None:
    """The end-of-run summary on stdout (the command's output)."""
    summary, _, _ = results.collect(Path(cfg.results_dir))
    print(f"sweep {cfg.sweep_name}: extracted {len(done['extracted'])}, analyzed {len(done['analyzed'])}, "
          f"already done {len(done['skipped'])}, failed {len(done['failed'])}")
    for key, failure in done["failed"].items():
        print(f"  FAILED {key} ({failure['stage']}): {failure['error']}")
    if not summary.empty:
        cols = ["model", "weights", "region", "imagenet_top1", "median_test_r", "median_test_r_sem",
                "frac_significant", "transfer_accuracy"]
        table = summary[[c for c in cols if c in summary]].sort_values(["region", "median_test_r"],
                                                                       ascending=[True, False])
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if done["report"]:
        print(f"report: {done['report']}  (plots and tables beside it; all results in {cfg.results_dir})")
