"""The sweep: extract -> analyze (match on Dask, statistics, decoding) -> report, for a zoo of models.

Each stage skips finished work: extraction finds complete stores by their identity; analysis finds a
model's result tables by a fingerprint of (store, neural data, splits, analysis settings); the report
is rebuilt from whatever results the sweep directory holds, so the jobs of a multirun add up.
One model failing is recorded in ``<results_dir>/failures.json`` and the others go on.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from unitmatch import core
from unitmatch.core._compat import import_timm
from unitmatch.core.extract import ModelSpec
from unitmatch.core.synthetic import generate_stimuli, plant_neurons
from unitmatch.core.units import gather_columns

log = logging.getLogger("unitmatch")

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
STAGES = ("all", "extract", "analyze", "report")


# ------------------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class ModelEntry:
    """One model of the zoo, from conf/model/<key>.yaml."""

    key: str
    spec: ModelSpec
    layers: object
    imagenet_top1: float | None
    imagenet_top1_source: str
    control: str | None

    @property
    def trained(self) -> bool:
        return self.control is None


def load_model_entry(key: str, overrides: DictConfig | None = None) -> ModelEntry:
    """Read conf/model/<key>.yaml (plus command-line overrides under ``model_overrides.<key>``).

    Raises:
        ValueError: no such model config (with close names), or an unknown timm architecture.
    """
    path = CONF_DIR / "model" / f"{key}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
        close = difflib.get_close_matches(key, known, n=5)
        raise ValueError(f"unknown model {key!r}: no conf/model/{key}.yaml; close names: {close}")
    cfg = OmegaConf.load(path)
    if overrides is not None and key in overrides:
        cfg = OmegaConf.merge(cfg, overrides[key])
    timm = import_timm()
    if not timm.is_model(cfg.arch):
        raise ValueError(f"model {key!r}: timm has no architecture {cfg.arch!r}")
    input_size = tuple(cfg.input_size) if cfg.get("input_size") else None
    spec = ModelSpec(cfg.name, pretrained=bool(cfg.pretrained), checkpoint=cfg.get("checkpoint"),
                     seed=int(cfg.get("seed", 0)), input_size=input_size)
    layers = OmegaConf.to_container(cfg.layers) if OmegaConf.is_list(cfg.layers) else cfg.layers
    top1 = cfg.get("imagenet_top1")
    return ModelEntry(key, spec, layers, None if top1 is None else float(top1),
                      str(cfg.get("imagenet_top1_source", "")), cfg.get("control"))


def plan_models(cfg: DictConfig) -> list[ModelEntry]:
    keys = list(cfg.zoo.models)
    if cfg.models is not None:
        wanted = list(cfg.models) if OmegaConf.is_list(cfg.models) else [cfg.models]
        keys = wanted
    if not keys:
        raise ValueError("the zoo is empty: nothing to run")
    return [load_model_entry(k, cfg.get("model_overrides")) for k in keys]


def _check_path(value, what: str) -> Path:
    if value is None or str(value) == "???":
        raise ValueError(f"{what} is not set; give it on the command line (e.g. {what}=/path/to/file)")
    path = Path(str(value))
    if not path.exists():
        raise FileNotFoundError(f"{what}={str(path)!r} does not exist")
    return path


def load_stimuli(cfg: DictConfig) -> core.StimulusSet:
    s = cfg.stimuli
    if s.kind == "generated":
        return generate_stimuli(s.n_categories, s.objects_per_category, s.variations, s.size, s.seed)
    if s.kind == "files":
        metadata = None if s.get("metadata") in (None, "") else _check_path(s.metadata, "stimuli.metadata")
        return core.StimulusSet.from_files(_check_path(s.path, "stimuli.path"), metadata)
    raise ValueError(f"stimuli.kind must be 'generated' or 'files'; got {s.kind!r}")


def check_neural(cfg: DictConfig) -> None:
    n = cfg.neural
    if n.kind == "plain":
        _check_path(n.responses, "neural.responses")
    elif n.kind == "brainio":
        _check_path(n.path, "neural.path")
    elif n.kind != "synthetic":
        raise ValueError(f"neural.kind must be synthetic, plain or brainio; got {n.kind!r}")


# ----------------------------------------------------------------------------------------- stages
def run(cfg: DictConfig) -> dict:
    """Run the configured stages; returns what was done (for tests and the final summary)."""
    t0 = time.perf_counter()
    if cfg.stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}; got {cfg.stage!r}")
    # everything that can be checked is checked before any work
    entries = plan_models(cfg)
    check_neural(cfg)
    results_dir = Path(cfg.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    done = {"extracted": [], "analyzed": [], "skipped": [], "failed": {}, "report": None}
    stimuli = load_stimuli(cfg) if cfg.stage in ("all", "extract", "analyze") else None
    if cfg.stage in ("all", "extract", "analyze"):
        extra = []
        if cfg.neural.kind == "synthetic" and cfg.neural.planted_model not in {e.key for e in entries}:
            # every job of a multirun needs the planted model's store to build the same brain
            extra = [load_model_entry(cfg.neural.planted_model, cfg.get("model_overrides"))]
        stores = stage_extract(cfg, entries + extra, stimuli, done)
    if cfg.stage in ("all", "analyze"):
        assembly = load_assembly(cfg, stimuli, stores, entries + extra)
        stage_analyze(cfg, entries, stores, assembly, done)
    if cfg.stage in ("all", "report"):
        done["report"] = stage_report(cfg)
    failures_path = results_dir / "failures.json"
    failures = json.loads(failures_path.read_text()) if failures_path.exists() else {}
    failures.update(done["failed"])
    for key in done["analyzed"]:
        failures.pop(key, None)
    failures_path.write_text(json.dumps(failures, indent=2))
    log.info("sweep %s: %d extracted, %d analyzed, %d skipped, %d failed in %.1f s", cfg.sweep_name,
             len(done["extracted"]), len(done["analyzed"]), len(done["skipped"]), len(done["failed"]),
             time.perf_counter() - t0)
    return done


class _Cluster:
    """Ray for the extraction actors and the Dask-on-Ray reduction; a local instance is stopped after."""

    def __init__(self, cfg: DictConfig):
        import ray

        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "configure_logging": False, "log_to_driver": False}
            if cfg.address == "local":
                ray.init(address="local", num_cpus=cfg.num_cpus, **kwargs)
            else:
                ray.init(address=cfg.address, **kwargs)
            self.started = True

    def close(self):
        if self.started:
            self.ray.shutdown()


def stage_extract(cfg: DictConfig, entries: list[ModelEntry], stimuli, done: dict) -> dict:
    """Complete stores for every model (extracting what is missing on the Ray actor pool)."""
    from unitmatch.core.extract import extract_to_store
    from unitmatch.core.store import ActivationStore

    from .extract import ZooExtraction

    a, c = cfg.analysis, cfg.cluster
    stores, todo = {}, []
    for entry in entries:
        try:
            store = extract_to_store(entry.spec, stimuli, entry.layers, cfg.store_root, batch_size=a.batch_size,
                                     dtype=a.dtype, batches=[], device="cpu").store
        except Exception as err:  # noqa: BLE001 - one model failing must not stop the sweep
            _failed(done, entry.key, "extract", err)
            continue
        if store.complete:
            stores[entry.key] = ActivationStore.open(store.path)
        else:
            todo.append((entry, store))
    if todo:
        cluster = _Cluster(c)
        zoo = ZooExtraction(cfg.store_root, n_actors=c.n_actors, num_gpus=c.num_gpus_per_actor,
                            num_cpus=c.num_cpus_per_actor, batch_size=a.batch_size, dtype=a.dtype,
                            shard_batches=c.shard_batches, in_flight=c.in_flight)
        try:
            for entry, store in todo:  # one model at a time so a failure is attributed to its model
                try:
                    stores[entry.key] = zoo.run([entry.spec], stimuli, entry.layers,
                                                stores={entry.spec: store})[entry.spec]
                    done["extracted"].append(entry.key)
                    _log_stage(cfg, entry, "extract", {"store": str(stores[entry.key].path)})
                except Exception as err:  # noqa: BLE001
                    _failed(done, entry.key, "extract", err)
        finally:
            zoo.shutdown()  # release the actors' CPUs before the reduction runs on the cluster
            cluster.close()
    return stores


def load_assembly(cfg: DictConfig, stimuli, stores: dict, entries: list[ModelEntry]) -> core.NeuralAssembly:
    n = cfg.neural
    if n.kind == "plain":
        data = np.load(_check_path(n.responses, "neural.responses"))
        return core.NeuralAssembly(data, [f"n{i:03d}" for i in range(len(data))], np.full(len(data), n.region),
                                   stimuli.image_ids, stimuli.metadata)
    if n.kind == "brainio":
        assembly = core.load_brainio(_check_path(n.path, "neural.path"), region=n.region, time_bin=n.time_bin)
        return assembly.align(stimuli)
    # synthetic: planted from random units of the planted model's store, deterministic in the seed
    if n.planted_model not in stores:
        raise ValueError(f"neural.planted_model={n.planted_model!r} must be a model of this run with a complete "
                         f"store; models: {[e.key for e in entries]}")
    store = stores[n.planted_model]
    rng = np.random.default_rng(n.seed)
    cat = store.catalogue()
    layers = store.layers()
    candidates = rng.choice(cat.n_units, size=4 * n.n_planted, replace=False)
    x = gather_columns(layers, cat, np.sort(candidates))
    varying = np.sort(candidates)[x.std(axis=0) > 0]
    units = rng.choice(varying, size=n.n_planted, replace=False)
    x = gather_columns(layers, cat, units)
    brain = plant_neurons(x, n_planted=n.n_planted, n_noise=n.n_noise, snr=n.snr,
                               units=np.arange(n.n_planted), repeats=n.repeats, seed=n.seed)
    truth = brain.truth.assign(unit=np.concatenate([units, np.full(n.n_noise, -1)]), model=n.planted_model)
    truth.to_csv(Path(cfg.results_dir) / "planted_truth.csv", index=False)
    regions = np.where(truth.planted, "V4", "noise")
    return core.NeuralAssembly(brain.responses, truth.neuron, regions, stimuli.image_ids, stimuli.metadata)


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_analyze(cfg: DictConfig, entries: list[ModelEntry], stores: dict, assembly, done: dict) -> None:
    from .reduce import match_store

    a = cfg.analysis
    meta = assembly.image_metadata
    stratify = a.stratify if a.stratify not in (None, "none") else None
    splits = core.brainscore_splits(meta if meta is not None and len(meta.columns) else None,
                                    n_images=assembly.n_images, n_splits=a.splits, train_size=a.train_size,
                                    random_state=a.random_state, stratify=stratify)
    neural_fp = hashlib.sha256(np.ascontiguousarray(assembly.responses).tobytes()).hexdigest()[:16]
    settings = OmegaConf.to_container(a, resolve=True)
    for entry in entries:
        if entry.key not in stores:
            continue
        store = stores[entry.key]
        out = Path(cfg.results_dir) / "models" / entry.key
        fp = _fingerprint(store.path.name, neural_fp, [s[0].tolist() for s in splits], settings)
        marker = out / "DONE.json"
        if marker.exists() and json.loads(marker.read_text()).get("fingerprint") == fp:
            done["skipped"].append(entry.key)
            continue
        try:
            t0 = time.perf_counter()
            scheduler = a.scheduler
            cluster = None
            if scheduler == "auto":
                scheduler = "threads" if cfg.cluster.address == "local" else "ray"
            if scheduler == "ray":
                cluster = _Cluster(cfg.cluster)
            try:
                result = match_store(store, assembly.mean_responses(), splits, top_k=a.top_k,
                                     n_permutations=a.n_permutations, seed=a.random_state,
                                     neuron_ids=assembly.neuron_ids, scheduler=scheduler,
                                     block_units=a.block_units, progress=True)
            finally:
                if cluster is not None:
                    cluster.close()
            analysis = core.analyze(store.layers(), assembly, splits, catalogue=store.catalogue(), result=result,
                                    decode=a.decode, n_random_populations=a.n_random_populations, alpha=a.alpha,
                                    seed=a.random_state, top_k=a.top_k)
            _write_results(out, entry, store, analysis, result)
            marker.write_text(json.dumps({"fingerprint": fp, "seconds": time.perf_counter() - t0}))
            done["analyzed"].append(entry.key)
            _log_stage(cfg, entry, "analyze", _metrics(analysis.summary))
        except Exception as err:  # noqa: BLE001
            _failed(done, entry.key, "analyze", err)


def _write_results(out: Path, entry: ModelEntry, store, analysis, result) -> None:
    out.mkdir(parents=True, exist_ok=True)
    depth = {layer.name: i / max(len(store.layer_units) - 1, 1) for i, layer in enumerate(store.layer_units)}
    tag = dict(model=entry.key, arch=entry.spec.name.split(".")[0], trained=entry.trained,
               imagenet_top1=np.nan if entry.imagenet_top1 is None else entry.imagenet_top1)
    neurons = analysis.neurons.assign(**tag)
    neurons["layer_depth"] = neurons.layer.map(depth)
    analysis.matches.assign(model=entry.key).to_parquet(out / "matches.parquet", index=False)
    neurons.to_parquet(out / "neurons.parquet", index=False)
    analysis.summary.assign(**tag, imagenet_top1_source=entry.imagenet_top1_source).to_parquet(
        out / "summary.parquet", index=False)
    analysis.layer_matches.assign(model=entry.key).to_parquet(out / "layer_matches.parquet", index=False)
    analysis.assignment.assign(model=entry.key).to_parquet(out / "assignment.parquet", index=False)
    if len(analysis.decoding):
        analysis.decoding.assign(model=entry.key).to_parquet(out / "decoding.parquet", index=False)
    if result.null is not None:
        np.savez_compressed(out / "null.npz", test_r=result.null.test_r, train_r=result.null.train_r)


def collect(results_dir: Path, with_matches: bool = False):
    """Every model's summary and neuron tables in a sweep directory, and each model's pooled null.

    With ``with_matches`` also the per-(model, neuron, split) table joined with the neuron statistics.
    """
    summaries, neurons, nulls, matches = [], [], {}, []
    for folder in sorted((results_dir / "models").glob("*")):
        if not (folder / "DONE.json").exists():
            continue
        summaries.append(pd.read_parquet(folder / "summary.parquet"))
        neurons.append(pd.read_parquet(folder / "neurons.parquet"))
        if with_matches:
            stats = [c for c in ("p_value", "q_value", "significant", "ceiling", "ceiling_ok", "null_test_r")
                     if c in neurons[-1]]
            m = pd.read_parquet(folder / "matches.parquet").drop(columns=["topk_unit", "topk_r"])
            matches.append(m.merge(neurons[-1][["neuron", *stats]], on="neuron", how="left"))
        if (folder / "null.npz").exists():
            with warnings.catch_warnings():  # all-NaN (flat on the test images) copies stay NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                nulls[folder.name] = np.nanmean(np.load(folder / "null.npz")["test_r"], axis=1).ravel()
    if not summaries:
        empty = (pd.DataFrame(), pd.DataFrame(), {})
        return (*empty, pd.DataFrame()) if with_matches else empty
    out = (pd.concat(summaries, ignore_index=True), pd.concat(neurons, ignore_index=True), nulls)
    return (*out, pd.concat(matches, ignore_index=True)) if with_matches else out


def stage_report(cfg: DictConfig) -> Path | None:
    """Aggregate all models of the sweep: tables, plots, report.md, and the W&B summary run."""
    from .report import log_to_wandb, make_plots, write_markdown

    results_dir = Path(cfg.results_dir)
    summary, neurons, nulls, matches = collect(results_dir, with_matches=True)
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
    if cfg.logger.enabled:
        log_to_wandb(summary, neurons, plots, project=cfg.logger.project, entity=cfg.logger.entity,
                     mode=cfg.logger.mode, group=cfg.sweep_name, name=f"{cfg.sweep_name}/summary",
                     config=OmegaConf.to_container(cfg, resolve=True), wandb_dir=cfg.logger.dir)
    return report


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


def _log_stage(cfg: DictConfig, entry: ModelEntry, stage: str, metrics: dict) -> None:
    if not cfg.logger.enabled:
        return
    from .report import log_model_run

    log_model_run(entry.key, stage, metrics, project=cfg.logger.project, entity=cfg.logger.entity,
                  mode=cfg.logger.mode, group=cfg.sweep_name, wandb_dir=cfg.logger.dir,
                  config={"model": entry.key, "spec": entry.spec.__dict__, "imagenet_top1": entry.imagenet_top1,
                          "sweep": OmegaConf.to_container(cfg, resolve=True)})


def print_summary(cfg: DictConfig, done: dict) -> None:
    """The end-of-run summary on stdout (the command's output)."""
    results_dir = Path(cfg.results_dir)
    summary, _, _ = collect(results_dir)
    print(f"sweep {cfg.sweep_name}: extracted {len(done['extracted'])}, analyzed {len(done['analyzed'])}, "
          f"already done {len(done['skipped'])}, failed {len(done['failed'])}")
    for key, failure in done["failed"].items():
        print(f"  FAILED {key} ({failure['stage']}): {failure['error']}")
    if not summary.empty:
        cols = ["model", "region", "imagenet_top1", "median_test_r", "median_test_r_sem", "frac_significant",
                "transfer_accuracy"]
        table = summary[[c for c in cols if c in summary]].sort_values(["region", "median_test_r"],
                                                                       ascending=[True, False])
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if done["report"]:
        print(f"report: {done['report']}  (plots and tables beside it; all results in {results_dir})")
