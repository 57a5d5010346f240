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
import json
import logging
import os
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from unitmatch import core
from unitmatch.core.store import atomic_write

from hydra.experimental.callback import Callback

from . import provenance, results
from .config import ConfigError, plain, validate
from .data import check_data, load_recorded, load_stimuli, make_splits, n_neurons, neuron_regions, plant_assembly
from .report import flagged_lines, results_key, searches
from .zoo import ModelEntry, load_model, plan_models

log = logging.getLogger("unitmatch")

#: the inputs of the sweep folder's last report (a report of unchanged results rewrites nothing)
REPORT = "REPORT.json"


def run(cfg: DictConfig) -> dict:
    """Run the configured stages; returns what was done (for tests and the final summary).

    Raises:
        ConfigError: anything that can be checked without extraction, before any work: the config
            (schema, ranges), the models, the data files and their agreement with the stimuli, the
            splits, the sweep folder's record, the cluster address, the matching's top-k memory; and,
            once the stores are probed (before any batch is extracted), top_k against each model's units.
    """
    t0 = time.perf_counter()
    validate(cfg)
    cfg = plain(cfg)
    entries = plan_models(cfg)
    results_dir = Path(cfg.results_dir)
    extra, assembly, trusted = [], None, None
    planted = cfg.neural.planted_model
    if cfg.neural.kind == "synthetic" and cfg.stage != "report" and planted not in {e.key for e in entries}:
        # every job of a multirun builds the same brain from the planted model's store
        extra = [load_model(planted, "neural.planted_model")]
    if cfg.stage == "report":  # reads only the results folder, not the data
        trusted = _check_has_results(cfg)  # the report uses them as found here
    else:
        check_data(cfg, entries + extra)
    if cfg.stage in ("all", "extract", "analyze"):
        stimuli = load_stimuli(cfg)
        splits = make_splits(cfg, stimuli)
        if cfg.neural.kind != "synthetic":
            assembly = load_recorded(cfg, stimuli)  # its images checked against the stimuli
        _check_cluster(cfg)
    if cfg.stage in ("all", "analyze"):
        _check_topk_memory(cfg, n_neurons(cfg, assembly))
        _check_region_layers(cfg, neuron_regions(cfg, assembly))
        # a run whose inputs differ from the sweep folder's is refused before any work
        results.check_record(results_dir, _record(cfg, stimuli, splits, assembly), cfg.sweep_name)
    done = {"extracted": [], "analyzed": [], "skipped": [], "failed": {}, "report": None}
    if cfg.stage == "verify":
        from .verify import stage_verify

        done["verified"] = stage_verify(cfg.store_root, entries + extra, done)
    warm_up = None
    if cfg.stage in ("all", "analyze") and cfg.analysis.decode:
        warm_up = _warm_up_decoder(cfg.compute.device)
    if cfg.stage in ("all", "extract", "analyze"):
        # top_k and region_layers are checked once the stores are probed, for the analysed models only
        stores = stage_extract(cfg, entries + extra, stimuli, done, analysed={e.key for e in entries})
    results_dir.mkdir(parents=True, exist_ok=True)
    if cfg.stage in ("all", "analyze"):
        truth = None
        if assembly is None:
            assembly, truth = plant_assembly(cfg, stimuli, stores)
        # the synthetic brain's data is known only now: the record is checked again with it, and
        # written (on the sweep folder's first analysis) before anything of this analysis
        results.check_record(results_dir, _record(cfg, stimuli, splits, assembly), cfg.sweep_name, write=True)
        if truth is not None:
            atomic_write(results_dir / "planted_truth.csv", truth.to_csv(index=False).encode())
        stage_analyze(cfg, entries, stores, assembly, splits, done)
    if cfg.stage in ("all", "report"):
        # in a multirun the jobs' reports are partial: the W&B summary is logged once, after the last
        # job, by the MultirunReport callback
        done["report"] = stage_report(cfg, wandb_summary=not _in_multirun(), trusted=trusted)
    if cfg.stage != "report":  # the report reads the results folder, it never writes its records
        results.update_failures(results_dir, done["failed"], done["analyzed"], done.get("verified_ok", []),
                                done.get("verified_stores", []))
    if warm_up is not None:  # not left compiling when the process exits (a run with nothing to analyse)
        warm_up.join()
    log.info("sweep %s: %d extracted, %d analyzed, %d skipped, %d failed in %.1f s", cfg.sweep_name,
             len(done["extracted"]), len(done["analyzed"]), len(done["skipped"]), len(done["failed"]),
             time.perf_counter() - t0)
    return done


def _reduce_task_cpus(cluster) -> dict | None:
    """The matching block tasks' Ray options beyond their GPU fraction: ``num_cpus`` where
    ``cluster.cpus_per_reduce_task`` sets it (on a GPU, their read threads)."""
    cpus = cluster.get("cpus_per_reduce_task")
    return None if cpus is None else {"num_cpus": float(cpus)}


def _warm_up_decoder(device) -> threading.Thread:
    """The decoder's compiled CPU phase made ready in a background thread (numba compiles it once per
    machine, about 6 s on 2 cores), where the decoding will run on the CPU (``device``: the analysis's,
    ``compute.device``): while the stores are extracted, rather than inside the first model's analyze
    stage. A failure is logged; the decoding then compiles (or fails) where it runs."""

    def warm():
        try:
            core.decoding.warm_up(device)
        except Exception as err:  # noqa: BLE001 - a warm-up only: the decoding itself reports
            log.warning("could not prepare the decoder's compiled CPU phase ahead of the analysis: %s", err)

    # not a daemon: a run that ends early (an error, nothing to analyse) waits for it rather than
    # leaving the interpreter to stop a thread inside the compiler
    thread = threading.Thread(target=warm, name="unitmatch-decoder-warm-up", daemon=False)
    thread.start()
    return thread


def _record(cfg: DictConfig, stimuli, splits, assembly) -> dict:
    """The sweep record of this run (:func:`results.sweep_record`); neural data only once known."""
    n = cfg.neural
    planted = None if n.kind != "synthetic" else {k: n[k] for k in ("kind", "planted_model", "n_planted", "n_noise",
                                                                    "snr", "repeats", "seed")}
    analysis = OmegaConf.to_container(cfg.analysis, resolve=True)
    # the two searches' results live side by side under their own keys (models/<key>.region_committed),
    # so a sweep folder holds both: the search is in each result's fingerprint, not in the folder's record
    analysis.pop("region_layers", None)
    return results.sweep_record(stimuli.content_hash, splits, analysis,
                                None if assembly is None else _neural_fingerprint(assembly), planted)


def _neural_fingerprint(assembly) -> str:
    return hashlib.sha256(np.ascontiguousarray(assembly.responses).tobytes()).hexdigest()[:16]


def _check_has_results(cfg: DictConfig) -> dict:
    """``stage=report`` needs finished results; a sweep that does not exist is an error, not an empty report.

    Returns the trusted results (:func:`results.trusted`), for the report.
    """
    results_dir = Path(cfg.results_dir)
    trusted = results.trusted(results_dir)
    if trusted:
        return trusted
    parent = results_dir.parent
    names = sorted(p.name for p in parent.iterdir() if (p / "models").is_dir()) if parent.is_dir() else []
    raise ConfigError(f"stage=report: sweep_name={cfg.sweep_name!r} has no finished model results in "
                      f"results_dir={str(results_dir)!r}; sweeps with results in {str(parent)!r}: "
                      f"{names or 'none'}. Run its analysis first (stage=all), or name one of those.")


def _check_cluster(cfg: DictConfig) -> None:
    """A remote ``cluster.address`` answers (within ``cluster.connect_timeout_s``) before any work."""
    from .cluster import check_reachable

    c = cfg.cluster
    try:
        check_reachable(c.address, c.connect_timeout_s)
    except ValueError as err:
        raise ConfigError(f"cluster.address={c.address!r}: {err}") from None
    except ConnectionError as err:
        raise ConfigError(f"cluster.address={c.address!r}: {err} (cluster.connect_timeout_s="
                          f"{c.connect_timeout_s:g})") from None


def available_memory() -> int:
    """Bytes of memory available to new allocations on this machine (Linux MemAvailable, else total)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def topk_memory_bytes(n_neurons: int, n_permutations: int, n_splits: int, top_k: int) -> int:
    """Peak memory of the matching's top-k arrays, as :class:`core.engine.MatchEngine` holds them.

    One partial result is a float32 r and an int64 unit per (split, neuron row, k), with a row per
    neuron and per permuted copy (``MatchEngine.empty``). A merge (``core.engine.merge``) holds its
    task's fan-in partials, their concatenation (2k slots), its sort keys (int64 units, float32 -r) and
    order (int64), each over 2k slots, and its output; the estimate is that, once.
    """
    from .reduce import DEFAULT_FAN_IN

    partial = n_splits * n_neurons * (1 + n_permutations) * top_k * (4 + 8)
    # fan-in inputs + concatenation (2 partials) + sort keys and order (16 + 8 + 16 bytes per k) + output
    return int(partial * (DEFAULT_FAN_IN + 2 + (16 + 8 + 16) / 12 + 1))


def _check_topk_memory(cfg: DictConfig, n: int) -> None:
    a = cfg.analysis
    need = topk_memory_bytes(n, a.n_permutations, a.splits, a.top_k)
    have = available_memory()
    if need > have:
        raise ConfigError(
            f"analysis.top_k={a.top_k} needs about {need / 2**30:.1f} GiB for the matching's top-k arrays ({n} "
            f"neurons x (1 + analysis.n_permutations={a.n_permutations}) rows x analysis.splits={a.splits} x top_k, "
            f"float32 + int64, several partials at once) but this machine has {have / 2**30:.1f} GiB available: "
            f"lower analysis.top_k (default 5), analysis.n_permutations or analysis.splits")


def _check_topk_units(cfg: DictConfig, key: str, store) -> None:
    """top_k against a model's unit count, known once its store is probed (before any batch)."""
    n_units = store.catalogue().n_units
    if cfg.analysis.top_k > n_units:
        raise ConfigError(f"analysis.top_k={cfg.analysis.top_k} is more than the {n_units} units of model {key!r} "
                          f"(layers {[layer.name for layer in store.layer_units]}): "
                          f"valid is 2 <= top_k <= {n_units} for this zoo, or select more layers")


def _check_region_layers(cfg: DictConfig, regions: list[str] | None, key: str | None = None, store=None) -> None:
    """``analysis.region_layers`` against the neurons' regions (before any work) and, once a model's
    store is probed (before any batch), against its layers."""
    mapping = cfg.analysis.region_layers
    if mapping is None:
        return
    mapping = OmegaConf.to_container(mapping) if OmegaConf.is_config(mapping) else mapping
    what = "analysis.region_layers" if key is None else f"analysis.region_layers (model {key!r})"
    try:
        if store is None:
            have = sorted(set(map(str, mapping)))
            if have != regions:
                raise ValueError(f"maps regions {have}, but the neurons' regions are {regions}: a region-committed "
                                 f"search needs exactly one entry per region")
        else:
            core.analysis.resolve_region_layers(mapping, [layer.name for layer in store.layer_units],
                                                sorted(mapping), key=what)
    except ValueError as err:
        message = str(err) if str(err).startswith(what) else f"{what}={mapping!r}: {err}"
        raise ConfigError(message) from None


def _ray(cfg: DictConfig):
    """Ray for this job: a private local instance (stopped after) or the cluster at ``cluster.address``."""
    from .cluster import ray_session

    c = cfg.cluster
    local = c.address == "local"
    return ray_session(c.address, num_cpus=c.num_cpus if local else None, connect_timeout_s=c.connect_timeout_s,
                       runtime_env=OmegaConf.to_container(c.runtime_env) if c.runtime_env else None)


def stage_extract(cfg: DictConfig, entries: list[ModelEntry], stimuli, done: dict, analysed=None) -> dict:
    """Complete stores for every model (extracting what is missing on the Ray actor pool).

    ``analysed``: keys of the models whose stores the analysis will match (default: all); only
    those are checked against ``analysis.top_k`` and ``analysis.region_layers`` (the synthetic
    brain's planted model, extracted only to plant the neurons, is not).
    """
    from unitmatch.core.extract import prepare_store
    from unitmatch.core.store import ActivationStore

    from .extract import ZooExtraction

    c, compute = cfg.cluster, cfg.compute
    stores, todo, opened = {}, [], {}  # opened: one store object per folder (models of one identity share it)
    for entry in entries:
        try:
            store = prepare_store(entry.spec, stimuli, entry.layers, cfg.store_root, batch_size=compute.batch_size,
                                  dtype=compute.dtype, codec=compute.codec)
        except Exception as err:  # noqa: BLE001 - one model failing must not stop the sweep
            _failed(done, entry.key, "extract", err)
            continue
        if cfg.stage != "extract" and (analysed is None or entry.key in analysed):
            _check_topk_units(cfg, entry.key, store)
            _check_region_layers(cfg, None, entry.key, store)
        if store.complete:
            if store.path not in opened:  # its done records are then read once, however many models use it
                opened[store.path] = ActivationStore.open(store.path)
            stores[entry.key] = opened[store.path]
        else:
            todo.append((entry, store))
    if todo:
        with _ray(cfg):
            zoo = ZooExtraction(cfg.store_root, n_actors=c.n_actors, num_gpus=c.num_gpus_per_actor,
                                num_cpus=c.num_cpus_per_actor, batch_size=compute.batch_size, dtype=compute.dtype,
                                codec=compute.codec, num_workers=c.decode_workers, writer_threads=c.writer_threads,
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
    from .reduce import match_assembly

    a, compute = cfg.analysis, cfg.compute
    neural_fp = _neural_fingerprint(assembly)
    science = OmegaConf.to_container(a, resolve=True)
    region_layers = science.pop("region_layers", None)
    if region_layers is not None:  # all-units fingerprints stay as they were; the search's results have their own key
        science["region_layers"] = region_layers
    # the science settings of matching, and how to compute it, as the engine takes them
    settings = core.MatchSettings(top_k=a.top_k, n_permutations=a.n_permutations, seed=a.random_state,
                                  min_varying_images=a.min_varying_images, block_units=compute.block_units,
                                  device=compute.device, gemm=compute.gemm)
    provenance.write_sweep(cfg, neural_fp, assembly, {e.key: stores[e.key] for e in entries if e.key in stores})
    record = results.record_fingerprint(cfg.results_dir)  # written by run() before this stage: read once for all models
    flags = None  # the neurons are the same for every model: screened once, with the first model analysed
    for entry in entries:
        if entry.key not in stores:
            continue
        store = stores[entry.key]
        key = results_key(entry.key, "all_units" if region_layers is None else "region_committed")  # side by side
        fp = results.fingerprint(store.path.name, neural_fp, [s[0].tolist() for s in splits], science)
        if results.is_done(cfg.results_dir, key, fp, record):
            done["skipped"].append(entry.key)
            continue
        try:
            t0 = time.perf_counter()
            if flags is None:
                flags = core.analysis.screen_neurons(assembly, splits)
                core.analysis.analysable(assembly, flags)  # names the flagged neurons, once for the run
            scheduler = compute.scheduler
            if scheduler == "auto":
                scheduler = "threads" if cfg.cluster.address == "local" else "ray"
            t_match = time.perf_counter()
            # the matching, re-scoring, assignment and decoding read the store's chunks again and again:
            # a store that fits the cache is decoded and checked once (core.store.ActivationStore.chunk_cache)
            budget = available_memory() // 4 if compute.chunk_cache_mb is None else compute.chunk_cache_mb << 20
            with store.chunk_cache(budget) as cache:
                if cache is None:  # the store is larger than the budget
                    log.info("%s: its store (%.0f MiB) is larger than the chunk cache (%.0f MiB, "
                             "compute.chunk_cache_mb): each scattered-column read after the matching decodes most "
                             "of it again", entry.key, store.nbytes / 2**20, budget / 2**20)
                with _ray(cfg) if scheduler == "ray" else contextlib.nullcontext():
                    result = match_assembly(store, assembly, splits, settings, region_layers=region_layers,
                                            flags=flags, scheduler=scheduler, progress=True,
                                            gpus_per_task=cfg.cluster.gpus_per_reduce_task,
                                            ray_remote_args=_reduce_task_cpus(cfg.cluster),
                                            wait_log_s=cfg.cluster.wait_log_s)
                t_match_end = time.perf_counter()
                analysis = core.analyze(store.layers(), assembly, splits, catalogue=store.catalogue(), result=result,
                                        decode=a.decode, n_random_populations=a.n_random_populations, alpha=a.alpha,
                                        region_layers=region_layers, flags=flags)
            seconds = time.perf_counter() - t0
            log.info("%s: analyze stage %.1f s: matching %.1f s, strict assignment %.1f s, decoding %.1f s "
                     "(%.0f%% of the stage)", entry.key, seconds, t_match_end - t_match,
                     analysis.seconds["strict_assignment"], analysis.seconds["decoding"],
                     100 * analysis.seconds["decoding"] / seconds)
            folder = _write_results(cfg, entry, store, analysis, result, key,
                                    {"fingerprint": fp, "seconds": seconds, "store": store.path.name,
                                     "neural_data": neural_fp}, record)
            done["analyzed"].append(entry.key)
            _log_stage(cfg, entry, "analyze", _metrics(analysis.summary),
                       uses=[("store", store), ("data", neural_fp)], produces=[("results", folder)])
        except Exception as err:  # noqa: BLE001
            _failed(done, entry.key, "analyze", err)


def _write_results(cfg: DictConfig, entry: ModelEntry, store, analysis, result, key: str, done: dict,
                   record: str | None) -> Path:
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
    return results.write_model_results(Path(cfg.results_dir), key, tables, null, done,
                                       {"provenance.json": provenance.model_record(entry, store)}, record)


def stage_report(cfg: DictConfig, wandb_summary: bool = True, trusted: dict | None = None) -> Path | None:
    """Aggregate all models of the sweep: tables, plots, report.md, and (``wandb_summary``) the W&B summary run.

    ``trusted``: the results found by :func:`results.trusted` (found here when not given).

    Reads the per-model results, never writes them. The aggregated files at the sweep folder's top
    level are rewritten only when their inputs changed (``REPORT.json``, written last, records the
    trusted results, title and version they were made from), so reporting an unchanged sweep writes
    nothing and works on a read-only results folder.
    """
    import unitmatch

    from .figures import make_plots
    from .report import write_markdown
    from .wandb_sink import log_to_wandb

    results_dir = Path(cfg.results_dir)
    if trusted is None:
        trusted = results.trusted(results_dir)
    if not trusted:
        log.warning("no finished model results in %s: nothing to report", results_dir)
        return None
    inputs = results.fingerprint(trusted, cfg.sweep_name, unitmatch.__version__)
    marker = results_dir / REPORT
    last = json.loads(marker.read_text()) if marker.exists() else {}
    report = results_dir / "report.md"
    up_to_date = last.get("inputs") == inputs and report.exists()
    to_wandb = cfg.logger.enabled and wandb_summary
    if up_to_date:
        log.info("the report in %s is up to date (its results are unchanged): nothing rewritten", results_dir)
        if not to_wandb:  # nothing to read either
            return report
    summary, neurons, nulls, matches = results.collect(results_dir, with_matches=True, keys=trusted)
    if up_to_date:
        plots = {name: results_dir / file for name, file in last.get("plots", {}).items()}
    else:
        marker.unlink(missing_ok=True)  # a report that fails half-way is redone next time
        # per (model, neuron, split): layer, unit coordinates, train_r, test_r, p-value, ceiling ...
        matches.to_parquet(results_dir / "matches.parquet", index=False)
        matches.to_csv(results_dir / "matches.csv", index=False)
        summary.to_csv(results_dir / "summary.csv", index=False)
        summary.to_parquet(results_dir / "summary.parquet", index=False)
        neurons.to_parquet(results_dir / "neurons.parquet", index=False)
        keep = ("model", "neuron", "region", "layer", "arch", "flags", "search")
        neurons.drop(columns=[c for c in neurons.columns if neurons[c].dtype == object and c not in keep]).to_csv(
            results_dir / "neurons.csv", index=False)
        plots = make_plots(summary, neurons, results_dir, nulls=nulls)
        report = write_markdown(summary, neurons, results_dir, plots, title=f"unitmatch sweep {cfg.sweep_name}")
        atomic_write(marker, json.dumps({"inputs": inputs, "plots": {k: Path(v).name for k, v in plots.items()}},
                                         indent=2).encode())
    if to_wandb:
        folders = {k: results.model_dir(results_dir, k) for k in trusted}  # every (model, search) reported
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
            return results_artifact(wandb, value.name, value)  # the folder's name: the model's key in its search
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
    summary, neurons, _ = results.collect(Path(cfg.results_dir))
    print(f"sweep {cfg.sweep_name}: extracted {len(done['extracted'])}, analyzed {len(done['analyzed'])}, "
          f"already done {len(done['skipped'])}, failed {len(done['failed'])}")
    for key, failure in done["failed"].items():
        print(f"  FAILED {key} ({failure['stage']}): {failure['error']}")
    if not summary.empty:
        cols = ["model", *(["search"] if len(searches(summary)) > 1 else []), "weights", "region", "imagenet_top1",
                "n_neurons", "n_neurons_flagged", "median_test_r", "median_test_r_sem", "frac_significant",
                "transfer_accuracy"]
        table = summary[[c for c in cols if c in summary]].sort_values(["region", "median_test_r"],
                                                                       ascending=[True, False])
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        for line in flagged_lines(neurons):
            print(line)
    if done["report"]:
        print(f"report: {done['report']}  (plots and tables beside it; all results in {cfg.results_dir})")
