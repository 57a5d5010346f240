"""The Hydra sweep app: configs compose, overrides and multiruns work, the demo recovers its planted
model, reruns do no work, bad input fails before any work, one failing model does not stop the rest,
and a real multi-process Ray cluster runs a sweep through its address."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from unitmatch.sweep.app import CONF_DIR, load_model_entry, run

ROOT = Path(__file__).resolve().parents[1]
#: a small, fast sweep: 2 demo models, 240 images, few permutations
TINY = ["logger=none", "stimuli.variations=6", "analysis.n_permutations=19", "analysis.n_random_populations=20",
        "analysis.splits=3", "neural.n_planted=24", "neural.n_noise=8", "zoo.models=[demo_test_convnext,demo_test_resnet]"]


def _compose(overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture()
def outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("UNITMATCH_OUTPUTS", str(tmp_path))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    (tmp_path / "wandb_dir").mkdir()
    return tmp_path


def test_every_config_group_composes_and_every_model_config_loads():
    groups = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in CONF_DIR.iterdir()
              if g.is_dir() and g.name != "model"}
    assert {"zoo", "stimuli", "neural", "analysis", "cluster", "logger", "experiment"} <= set(groups)
    for group, options in groups.items():
        for option in options:
            override = f"+experiment={option}" if group == "experiment" else f"{group}={option}"
            cfg = _compose([override] if group != "experiment" else [f"experiment={option}"])
            OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    models = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
    assert len(models) > 50
    for key in models:  # checks the timm architecture exists; creates no model
        entry = load_model_entry(key)
        assert entry.trained == (entry.imagenet_top1 is not None) or key.startswith("demo_")
    zoo_models = {m for z in (CONF_DIR / "zoo").glob("*.yaml") for m in OmegaConf.load(z).models}
    assert zoo_models <= set(models)


def test_command_line_overrides_reach_the_config():
    cfg = _compose(["zoo=classic", "analysis.n_permutations=1000", "cluster=ray", "cluster.address=ray://h:10001"])
    assert "resnet50" in cfg.zoo.models and cfg.analysis.n_permutations == 1000
    assert cfg.cluster.address == "ray://h:10001" and cfg.cluster.num_gpus_per_actor == 1


def test_bad_overrides_fail_before_any_work(outputs):
    with pytest.raises(ValueError, match=r"unknown model 'resnet5O'.*close names: \['resnet50'"):
        run(_compose(TINY + ["models=[resnet5O]"]))
    with pytest.raises(FileNotFoundError, match="neural.responses='/nonexistent/r.npy' does not exist"):
        run(_compose([t for t in TINY if not t.startswith("neural.")]
                     + ["neural=plain", "neural.responses=/nonexistent/r.npy"]))
    with pytest.raises(ValueError, match="stage must be one of"):
        run(_compose(TINY + ["stage=everything"]))
    assert not (outputs / "stores").exists()  # nothing was extracted


def test_tiny_sweep_recovers_planted_model_and_reruns_do_no_work(outputs):
    cfg = _compose(TINY + ["+model_overrides.demo_test_resnet.layers=[layer9]"])
    done = run(cfg)
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

    fixed = _compose(TINY)  # the resnet is fine now: only it is done, the convnext is skipped
    done = run(fixed)
    assert done["analyzed"] == ["demo_test_resnet"] and done["skipped"] == ["demo_test_convnext"]
    assert json.loads((results / "failures.json").read_text()) == {}
    again = run(fixed)  # a finished sweep: no extraction, no matching
    assert again["extracted"] == [] and again["analyzed"] == [] and sorted(again["skipped"]) == [
        "demo_test_convnext", "demo_test_resnet"]
    summary = pd.read_csv(results / "summary.csv")
    v4 = summary[summary.region == "V4"].set_index("model").median_test_r
    assert v4["demo_test_convnext"] > v4["demo_test_resnet"] + 0.1  # the planted model wins


def test_wandb_offline_run_holds_the_summary(outputs):
    done = run(_compose([t for t in TINY if t != "logger=none"] + ["logger=wandb", "logger.mode=offline"]))
    assert done["report"] is not None
    runs = list((outputs / "wandb_dir").rglob("offline-run-*"))
    # one run per model and stage (extract, analyze) plus the summary run
    assert len(runs) >= 5
    assert any(list(r.glob("*.wandb")) for r in runs)


def test_multirun_jobs_share_one_sweep_and_the_report_aggregates(outputs):
    cmd = [sys.executable, "-m", "unitmatch.sweep", "-m", *TINY, "sweep_name=multi",
           "models=[demo_test_convnext],[demo_test_resnet]", f"hydra.sweep.dir={outputs}/hydra"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = pd.read_csv(outputs / "sweeps" / "multi" / "summary.csv")
    assert set(summary.model) == {"demo_test_convnext", "demo_test_resnet"}
    assert proc.stdout.count("sweep multi: extracted") == 2  # one summary per job


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
               "cluster.n_actors=2", "analysis.scheduler=ray"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=os.environ.copy())
    finally:
        cluster.shutdown()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sweep raycluster: extracted 2, analyzed 2" in proc.stdout
    summary = pd.read_csv(outputs / "sweeps" / "raycluster" / "summary.csv")
    assert set(summary.model) == {"demo_test_convnext", "demo_test_resnet"}
