"""The Hydra sweep app end to end: the demo recovers its planted model, reruns (also with other compute
settings) do no work, one failing model does not stop the rest and makes the command fail, multiruns
share one sweep, and a real multi-process Ray cluster runs a sweep through its address. The config
itself (groups, schema, bad values) is tested in test_config.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_module

from unitmatch.sweep.config import ConfigError
from unitmatch.sweep.stages import run

ROOT = Path(__file__).resolve().parents[1]
#: a small, fast sweep: 2 demo models, 240 images, few permutations
TINY = ["logger=none", "stimuli.variations=6", "analysis.n_permutations=19", "analysis.n_random_populations=20",
        "analysis.splits=3", "analysis.stratify=auto", "neural.n_planted=24", "neural.n_noise=8", "models=[demo_test_convnext,demo_test_resnet]",
        "untrained_controls=[]"]


def _compose(overrides):
    with initialize_config_module(version_base="1.3", config_module="unitmatch.conf"):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture()
def outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("UNITMATCH_OUTPUTS", str(tmp_path))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    (tmp_path / "wandb_dir").mkdir()
    return tmp_path


def test_tiny_sweep_recovers_planted_model_and_reruns_do_no_work(outputs, monkeypatch):
    from unitmatch.sweep import stages

    warm_ups = []  # the decoder's compiled phase is prepared in the background, before the extraction
    monkeypatch.setattr(stages, "_warm_up_decoder",
                        lambda device, warm=stages._warm_up_decoder: warm_ups.append(warm(device)) or warm_ups[-1])
    cfg = _compose(TINY + ["models.demo_test_resnet.layers=[layer9]"])
    done = run(cfg)
    assert len(warm_ups) == 1 and warm_ups[0].name == "unitmatch-decoder-warm-up"
    warm_ups[0].join(60)
    assert not warm_ups[0].is_alive()
    # the resnet config asks for a layer it does not have: recorded, and the other model goes on
    assert list(done["failed"]) == ["demo_test_resnet"] and "layer9" in done["failed"]["demo_test_resnet"]["error"]
    assert done["analyzed"] == ["demo_test_convnext"]
    results = Path(cfg.results_dir)
    assert "demo_test_resnet" in json.loads((results / "failures.json").read_text())
    matches = pd.read_parquet(results / "models" / "demo_test_convnext" / "matches.parquet")
    truth = pd.read_csv(results / "planted_truth.csv")
    planted = matches.merge(truth[["neuron", "unit", "planted"]], on="neuron", suffixes=("", "_planted"))
    planted = planted[planted.planted]
    assert (planted.unit == planted.unit_planted).mean() >= 0.95
    for column in ("neuron", "split", "unit", "layer", "channel", "y", "x", "train_r", "test_r", "region", "model"):
        assert column in matches
    table = pd.read_parquet(results / "matches.parquet")  # the sweep's per-(model, neuron, split) table
    for column in ("model", "region", "neuron", "split", "layer", "channel", "y", "x", "train_r", "test_r",
                   "p_value", "q_value", "significant", "ceiling"):
        assert column in table, column
    assert (results / "matches.csv").exists()
    summary = pd.read_csv(results / "summary.csv")
    for column in ("model", "region", "imagenet_top1", "median_test_r", "median_test_r_sem", "frac_significant",
                   "transfer_accuracy", "strict_drop"):
        assert column in summary
    assert (results / "report.md").exists() and (results / "correspondence_V4.png").exists()
    assert set(summary.weights) == {"random"} and not summary.trained.any() and summary.top1_illustrative.all()
    assert "ILLUSTRATIVE" in (results / "report.md").read_text()
    # provenance: what produced these numbers
    record = json.loads((results / "provenance.json").read_text())
    assert record["config"]["analysis"]["n_permutations"] == 19 and record["packages"]["torch"]
    assert record["git"] is None or len(record["git"]["commit"]) == 40
    assert len(record["neural_data"]["sha256_16"]) == 16 and record["neural_data"]["n_neurons"] == 32
    store = record["stores"]["demo_test_convnext"]
    assert store["key"]["model"] == "test_convnext@random:0" and store["extraction"]["unitmatch_version"]
    assert store["extraction"]["tf32"] is False
    ((how, n_batches),) = store["batches"].items()  # every batch on this machine's CPU, TF32 off
    assert how.startswith("cpu on ") and how.endswith("tf32 False") and n_batches == 8
    model = json.loads((results / "models" / "demo_test_convnext" / "provenance.json").read_text())
    assert model["weights"] == "random" and model["store"]["digest"] == store["digest"]

    fixed = _compose(TINY)  # the resnet is fine now: only it is done, the convnext is skipped
    done = run(fixed)
    assert done["analyzed"] == ["demo_test_resnet"] and done["skipped"] == ["demo_test_convnext"]
    assert json.loads((results / "failures.json").read_text()) == {}
    again = run(fixed)  # a finished sweep: no extraction, no matching
    assert again["extracted"] == [] and again["analyzed"] == [] and sorted(again["skipped"]) == [
        "demo_test_convnext", "demo_test_resnet"]
    # compute settings are not science: another scheduler, block size and GEMM setting reuse the results
    other = run(_compose(TINY + ["compute.scheduler=sync", "compute.block_units=4096", "compute.gemm=float32"]))
    assert other["analyzed"] == [] and sorted(other["skipped"]) == ["demo_test_convnext", "demo_test_resnet"]
    summary = pd.read_csv(results / "summary.csv")
    v4 = summary[summary.region == "V4"].set_index("model").median_test_r
    assert v4["demo_test_convnext"] > v4["demo_test_resnet"] + 0.1  # the planted model wins
    # a science setting is not: in the same sweep folder it is refused before any work, naming it ...
    with pytest.raises(ConfigError, match=r"analysis\.alpha \(0\.05 there, 0\.01 now\).*new sweep_name"):
        run(_compose(TINY + ["analysis.alpha=0.01"]))
    assert json.loads((results / "sweep.json").read_text())["analysis"]["alpha"] == 0.05
    # ... and in a new sweep it recomputes both models from the same stores (here without the chunk cache)
    other_alpha = run(_compose(TINY + ["analysis.alpha=0.01", "sweep_name=alpha01", "compute.chunk_cache_mb=0"]))
    assert sorted(other_alpha["analyzed"]) == ["demo_test_convnext", "demo_test_resnet"]
    assert other_alpha["extracted"] == []
    # every number read from the stores is the same with the chunk cache (above: on) and without
    for model in ("demo_test_convnext", "demo_test_resnet"):
        for table in ("matches", "assignment", "decoding"):
            pd.testing.assert_frame_equal(pd.read_parquet(results / "models" / model / f"{table}.parquet"),
                                          pd.read_parquet(results.parent / "alpha01" / "models" / model /
                                                          f"{table}.parquet"))

    # the report reads, never rewrites: on a read-only sweep folder an unchanged report writes nothing
    before = {p: p.stat().st_mtime_ns for p in results.rglob("*") if p.is_file()}
    for path in [results, *results.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    try:
        reported = run(_compose(TINY + ["stage=report"]))
    finally:
        for path in [results, *results.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)
    assert reported["report"] == results / "report.md"
    assert {p: p.stat().st_mtime_ns for p in results.rglob("*") if p.is_file()} == before
    # changed results (a model's results removed) are re-reported: the aggregated tables follow
    shutil.rmtree(results / "models" / "demo_test_resnet")
    run(_compose(TINY + ["stage=report"]))
    assert set(pd.read_csv(results / "summary.csv").model) == {"demo_test_convnext"}
    assert (results / "models" / "demo_test_convnext" / "DONE.json").stat().st_mtime_ns == before[
        results / "models" / "demo_test_convnext" / "DONE.json"]


def _offline_runs(folder: Path) -> dict[str, dict]:
    """Every offline W&B run under ``folder``: name -> flat config keys, config, artifacts (name, type)."""
    from test_report import _records

    runs = {}
    for path in folder.rglob("offline-run-*/run-*.wandb"):
        out = {"config": {}, "artifacts": []}
        for record in _records(path.read_bytes()):
            which = record.WhichOneof("record_type")
            if which == "run":
                out["name"] = record.run.display_name
            if which in ("run", "config"):
                for item in (record.run.config.update if which == "run" else record.config.update):
                    out["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            elif which == "artifact":
                out["artifacts"].append((record.artifact.name, record.artifact.type))
        runs[out["name"]] = out
    return runs


def test_wandb_offline_runs_hold_lineage_artifacts_matches_and_one_flat_config(outputs):
    done = run(_compose([t for t in TINY if t != "logger=none"] + ["logger=wandb", "logger.mode=offline"]))
    assert done["report"] is not None
    runs = _offline_runs(outputs / "wandb_dir")
    assert set(runs) == {f"{m}/{s}" for m in ("demo_test_convnext", "demo_test_resnet")
                         for s in ("extract", "analyze")} | {"demo/summary"}
    for name, logged in runs.items():
        config = logged["config"]
        assert config["analysis.top_k"] == 5 and config["compute.dtype"] == "float16", name
        assert not any(isinstance(v, dict) for k, v in config.items() if not k.startswith("_wandb")), name  # flat
        assert "sweep" not in config
    for model in ("demo_test_convnext", "demo_test_resnet"):
        (store,) = [a for a in runs[f"{model}/extract"]["artifacts"] if a[1] == "activation-store"]
        analyze = runs[f"{model}/analyze"]
        assert analyze["config"]["model.weights"] == "random" and analyze["config"]["run.stage"] == "analyze"
        assert analyze["config"]["run.model"] == model and analyze["config"]["stage"] == "all"  # the sweep's
        assert ("results-" + model, "results") in analyze["artifacts"]
        inputs = analyze["config"]["inputs"]  # offline, W&B keeps the inputs' names (use_artifact is online only)
        assert store[0] in inputs and any(i.startswith("data-demo-") for i in inputs)
    summary = runs["demo/summary"]
    assert ("matches-demo", "results") in summary["artifacts"]
    assert sorted(summary["config"]["inputs"]) == ["results-demo_test_convnext", "results-demo_test_resnet"]


def test_multirun_jobs_share_one_sweep_and_the_report_aggregates(outputs):
    tiny = [t for t in TINY if t != "logger=none"] + ["logger.mode=offline"]
    cmd = [sys.executable, "-m", "unitmatch.sweep", "-m", *tiny, "sweep_name=multi",
           "models=[demo_test_convnext],[demo_test_resnet]", f"hydra.sweep.dir={outputs}/hydra"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = pd.read_csv(outputs / "sweeps" / "multi" / "summary.csv")
    assert set(summary.model) == {"demo_test_convnext", "demo_test_resnet"}
    assert proc.stdout.count("sweep multi: extracted") == 2  # one summary per job
    # one W&B summary run for the whole sweep, after the last job, over both models
    runs = _offline_runs(outputs / "wandb_dir")
    assert [n for n in runs if n.endswith("/summary")] == ["multi/summary"]
    assert runs["multi/summary"]["config"]["n_models"] == 2


def test_a_failed_model_makes_the_command_fail_after_the_others_finish(outputs):
    cmd = [sys.executable, "-m", "unitmatch.sweep", *TINY, "sweep_name=failing", "models.demo_test_resnet.layers=[layer9]"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=os.environ.copy())
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "analyzed 1, already done 0, failed 1" in proc.stdout
    assert "FAILED demo_test_resnet (extract)" in proc.stdout and "layer9" in proc.stdout
    assert "1 model(s) failed: ['demo_test_resnet']" in proc.stderr
    assert (outputs / "sweeps" / "failing" / "models" / "demo_test_convnext" / "DONE.json").exists()


def test_a_configuration_error_exits_2_before_any_work(outputs):
    cmd = [sys.executable, "-m", "unitmatch.sweep", *TINY, "analysis.alpha=2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert proc.returncode == 2 and "analysis.alpha=2.0 is out of range" in proc.stderr
    assert not (outputs / "stores").exists()


@pytest.mark.slow
def test_demo_default_recovers_planted_model(outputs):
    """The README's main command, exactly (minus W&B: its offline run is tested above)."""
    proc = subprocess.run([sys.executable, "-m", "unitmatch.sweep", "logger=none"], cwd=ROOT, capture_output=True, text=True,
                          timeout=1200, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = pd.read_csv(outputs / "sweeps" / "demo" / "summary.csv")
    v4 = summary[summary.region == "V4"].set_index("model")
    assert v4.median_test_r.idxmax() == "demo_test_convnext"
    assert v4.loc["demo_test_convnext", "frac_significant"] >= 0.95


def test_sweep_through_the_address_of_a_multi_process_ray_cluster(outputs):
    """A head and a second (worker) node, each its own raylet process; the sweep joins by address and
    runs extraction actors and the Dask-on-Ray reduction on it."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        cmd = [sys.executable, "-m", "unitmatch.sweep", *TINY, "sweep_name=raycluster", "cluster=ray",
               f"cluster.address={cluster.address}", "cluster.num_gpus_per_actor=0", "cluster.num_cpus_per_actor=1",
               "cluster.n_actors=2", "compute.scheduler=ray",
               # cluster=ray's decode workers and writer threads are sized for a 16-core GPU node
               "cluster.decode_workers=1", "cluster.writer_threads=2"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=os.environ.copy())
    finally:
        cluster.shutdown()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sweep raycluster: extracted 2, analyzed 2" in proc.stdout
    summary = pd.read_csv(outputs / "sweeps" / "raycluster" / "summary.csv")
    assert set(summary.model) == {"demo_test_convnext", "demo_test_resnet"}


def test_bad_neurons_are_listed_the_rest_analysed_and_a_region_committed_search_sits_beside(outputs, tmp_path,
                                                                                             capsys):
    """neural=plain with a constant neuron, one with every repeat missing for two images and one with a
    single repeat: each used to fail the model. Now they are flagged and listed, the others analysed
    exactly as without them; a second run with analysis.region_layers adds its results beside."""
    import numpy as np

    from unitmatch.sweep.stages import print_summary

    rng = np.random.default_rng(0)
    r = rng.standard_normal((12, 240, 3))
    r[0] = 1.0
    r[1, [3, 70], :] = np.nan
    r[2, :, 1:] = np.nan
    np.save(tmp_path / "bad.npy", r)
    np.save(tmp_path / "clean.npy", r[[i for i in range(12) if i not in (0, 1)]])
    base = ["logger=none", "stimuli.variations=6", "analysis.n_permutations=9", "analysis.n_random_populations=10",
            "analysis.splits=3", "analysis.stratify=auto", "models=[demo_test_convnext]", "untrained_controls=[]",
            "neural=plain", "neural.region=V4"]
    cfg = _compose(base + [f"neural.responses={tmp_path / 'bad.npy'}", "sweep_name=bad"])
    done = run(cfg)
    assert done["analyzed"] == ["demo_test_convnext"] and not done["failed"]
    print_summary(cfg, done)
    printed = capsys.readouterr().out
    assert ("flagged neurons: 3 (2 left out of the matching; the others lack only a ceiling): n000 (V4: "
            "constant_train,no_ceiling), n001 (V4: missing_images), n002 (V4: no_ceiling)") in printed
    results = Path(cfg.results_dir)
    neurons = pd.read_parquet(results / "models" / "demo_test_convnext" / "neurons.parquet")
    assert neurons.set_index("neuron").loc[["n000", "n001", "n002"], "flags"].tolist() == [
        "constant_train,no_ceiling", "missing_images", "no_ceiling"]
    summary = pd.read_csv(results / "summary.csv")
    assert summary[["n_neurons", "n_analyzed", "n_neurons_flagged", "n_no_ceiling"]].iloc[0].tolist() == [12, 10, 3, 2]
    assert "## Flagged neurons" in (results / "report.md").read_text()
    # the analysed neurons: the same numbers as a sweep of the assembly without the two left out
    clean = run(_compose(base + [f"neural.responses={tmp_path / 'clean.npy'}", "sweep_name=clean"]))
    assert clean["analyzed"] == ["demo_test_convnext"]
    without = pd.read_parquet(Path(_compose(base + ["sweep_name=clean", f"neural.responses={tmp_path / 'clean.npy'}"])
                                   .results_dir) / "models" / "demo_test_convnext" / "neurons.parquet")
    kept = neurons[neurons.analyzed]
    for column in ("test_r", "p_value", "ceiling", "strict_test_r"):
        np.testing.assert_array_equal(kept[column].to_numpy(float), without[column].to_numpy(float))

    committed = _compose(base + [f"neural.responses={tmp_path / 'bad.npy'}", "sweep_name=bad",
                                 "analysis.region_layers={V4:[stages.3]}"])
    done = run(committed)
    assert done["analyzed"] == ["demo_test_convnext"] and done["extracted"] == []
    matches = pd.read_parquet(results / "models" / "demo_test_convnext.region_committed" / "matches.parquet")
    assert set(matches.layer) == {"stages.3"} and set(matches.search) == {"region_committed"}
    summary = pd.read_csv(results / "summary.csv")
    assert sorted(summary.search) == ["all_units", "region_committed"]
    assert "## All units vs region-committed" in (results / "report.md").read_text()
    assert run(committed)["skipped"] == ["demo_test_convnext"] and run(cfg)["skipped"] == ["demo_test_convnext"]


def test_the_decoder_warm_up_runs_in_the_background_and_a_failure_is_only_logged(monkeypatch, caplog):
    """The warm-up thread calls core.decoding.warm_up (the compiled phase ready before the first
    analysis); where that fails the sweep goes on, with a warning naming the error (the decoding
    itself then reports)."""
    import logging

    from unitmatch import core
    from unitmatch.sweep import stages

    seen = []
    monkeypatch.setattr(core.decoding, "warm_up", lambda device: seen.append(device))
    stages._warm_up_decoder("cpu").join(10)
    assert seen == ["cpu"]  # the analysis's device (compute.device), not the machine's default

    def broken(device):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(core.decoding, "warm_up", broken)
    with caplog.at_level(logging.WARNING, logger="unitmatch"):
        stages._warm_up_decoder(None).join(10)
    assert "could not prepare the decoder's compiled CPU phase ahead of the analysis: no compiler here" in caplog.text
