"""Every check that needs no extraction runs before any, naming the config key, the value and what is
valid (exit status 2, nothing created); a sweep folder refuses a run of other inputs; an interrupted
result write leaves the previous complete results or nothing; collect trusts only the sweep's record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from unitmatch.sweep import results, stages
from unitmatch.sweep.config import ConfigError
from unitmatch.sweep.stages import run

ROOT = Path(__file__).resolve().parents[1]
#: generated stimuli: 8 categories x 5 objects x 3 variations = 120 images
SMALL = ["logger=none", "stimuli.variations=3", "analysis.splits=2", "analysis.stratify=none",
         "analysis.n_permutations=9", "models=[demo_test_resnet]", "untrained_controls=[]",
         "neural.planted_model=demo_test_resnet"]
N_IMAGES = 120


def _compose(overrides):
    with initialize_config_module(version_base="1.3", config_module="unitmatch.conf"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture()
def outputs(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("UNITMATCH_OUTPUTS", str(out))
    return out


def _text_npy(folder: Path) -> Path:
    path = folder / "responses.npy"
    path.write_text("neuron,image,rate\nn0,img0,1.5\n")
    return path


def _npy(folder: Path, shape) -> Path:
    path = folder / "wrong_count.npy"
    np.save(path, np.random.default_rng(0).normal(size=shape))
    return path


def _brainio_other_ids(folder: Path) -> Path:
    import xarray as xr

    path = folder / "other_ids.nc"
    ids = [f"other{i}" for i in range(N_IMAGES) for _ in range(2)]
    values = np.random.default_rng(0).normal(size=(len(ids), 3, 1))
    da = xr.DataArray(values, dims=("presentation", "neuroid", "time_bin"),
                      coords={"stimulus_id": ("presentation", ids), "repetition": ("presentation", [0, 1] * N_IMAGES),
                              "neuroid_id": ("neuroid", ["a", "b", "c"]), "region": ("neuroid", ["IT"] * 3),
                              "time_bin_start": ("time_bin", [70]), "time_bin_end": ("time_bin", [170])})
    da.to_netcdf(path)
    return path


def _missing(folder: Path) -> Path:
    return folder / "nowhere" / "weights.pth"


# (overrides, files made in tmp_path and given as {name}, message pattern: key, value, what is valid)
BAD = {
    "alpha=0": (["analysis.alpha=0"], {}, r"analysis\.alpha=0\.0 is out of range: valid is 0 < alpha < 1"),
    "alpha=1": (["analysis.alpha=1"], {}, r"analysis\.alpha=1\.0 is out of range: valid is 0 < alpha < 1"),
    "alpha=2": (["analysis.alpha=2"], {}, r"analysis\.alpha=2\.0 is out of range: valid is 0 < alpha < 1"),
    "splits=0": (["analysis.splits=0"], {}, r"analysis\.splits=0 is out of range: valid is 1 <= splits"),
    "top_k=0": (["analysis.top_k=0"], {}, r"analysis\.top_k=0 is out of range: valid is 2 <= top_k <= 4096"),
    "top_k=1": (["analysis.top_k=1"], {}, r"analysis\.top_k=1 is out of range: valid is 2 <= top_k <= 4096"),
    "top_k=huge": (["analysis.top_k=1000000"], {}, r"analysis\.top_k=1000000 is out of range: valid is 2 <= top_k"),
    "batch_size=0": (["compute.batch_size=0"], {}, r"compute\.batch_size=0 is out of range: valid is 1 <= batch_size"),
    "n_actors=0": (["cluster.n_actors=0"], {}, r"cluster\.n_actors=0 is out of range: valid is 1 <= n_actors"),
    "checkpoint missing": (["models.demo_test_resnet.checkpoint={ckpt}"], {"ckpt": _missing},
                           r"models\.demo_test_resnet\.checkpoint='.*nowhere/weights\.pth' does not exist"),
    "text file named .npy": (["neural=plain", "neural.responses={npy}"], {"npy": _text_npy},
                             r"neural\.responses='.*responses\.npy' is not a numpy \.npy array .*pickled"),
    "wrong image count": (["neural=plain", "neural.responses={npy}"], {"npy": lambda d: _npy(d, (4, N_IMAGES - 1))},
                          rf"neural\.responses='.*wrong_count\.npy' has {N_IMAGES - 1} images on axis 1 but the "
                          rf"stimuli .* hold {N_IMAGES}"),
    "wrong image ids": (["neural=brainio", "neural.path={nc}"], {"nc": _brainio_other_ids},
                        r"neural\.path='.*other_ids\.nc' .*disagree on image ids: 120 only in the assembly"),
    "stimuli missing": (["stimuli=files", "stimuli.path={npy}"], {"npy": _missing},
                        r"stimuli\.path='.*nowhere/weights\.pth' does not exist"),
    "cluster unreachable": (["cluster.address=ray://127.0.0.1:1", "cluster.connect_timeout_s=2"], {},
                            r"cluster\.address='ray://127\.0\.0\.1:1': cannot reach the Ray cluster at "
                            r"'ray://127\.0\.0\.1:1'.*cluster\.connect_timeout_s=2"),
    "region_layers regions": (["analysis.region_layers={{V4:[layer4],IT:[layer4]}}"], {},
                              r"analysis\.region_layers=.*: maps regions \['IT', 'V4'\], but the neurons' regions "
                              r"are \['V4', 'noise'\]"),
    "report of a missing sweep": (["stage=report", "sweep_name=nosuch"], {},
                                  r"stage=report: sweep_name='nosuch' has no finished model results in "
                                  r"results_dir='.*sweeps/nosuch'; sweeps with results in '.*sweeps': \['other'\]"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_each_bad_input_fails_before_any_work_naming_key_value_and_what_is_valid(case, outputs, tmp_path):
    overrides, files, message = BAD[case]
    made = {name: make(tmp_path) for name, make in files.items()}
    overrides = [o.format(**made) for o in overrides]
    other = outputs / "sweeps" / "other" / "models" / "m"  # another sweep, with results, is listed
    other.mkdir(parents=True)
    (other / results.DONE).write_text("{}")
    with pytest.raises(ConfigError, match=message):
        run(_compose(SMALL + overrides))
    assert sorted(p.name for p in (outputs / "sweeps").iterdir()) == ["other"]  # no results folder
    assert not (outputs / "stores").exists()  # no store


def test_the_command_exits_2_in_a_read_only_working_directory_without_writing_there(outputs, tmp_path):
    """Hydra's own run folder follows UNITMATCH_OUTPUTS, so a read-only working directory is fine."""
    cwd = tmp_path / "readonly"
    cwd.mkdir()
    cwd.chmod(0o555)
    import unitmatch  # the child imports the same package, wherever this process found it

    found = str(Path(unitmatch.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([found, *filter(None, [os.environ.get("PYTHONPATH")])])}
    try:
        for overrides, message in ((["analysis.alpha=2"], "analysis.alpha=2.0 is out of range"),
                                   (["stage=report", "sweep_name=nosuch"], "sweep_name='nosuch' has no finished")):
            proc = subprocess.run([sys.executable, "-m", "unitmatch.sweep", *SMALL, *overrides], cwd=cwd,
                                  capture_output=True, text=True, timeout=300, env=env)
            assert proc.returncode == 2, proc.stderr[-3000:]
            assert "unitmatch: configuration error: " in proc.stderr and message in proc.stderr
    finally:
        cwd.chmod(0o755)
    assert list(cwd.iterdir()) == []
    assert list((outputs / "hydra").glob("*/*/.hydra/config.yaml"))  # Hydra's logs went to the outputs root
    assert not (outputs / "sweeps").exists() and not (outputs / "stores").exists()


def test_top_k_memory_is_estimated_before_any_work_and_stated_in_the_error(outputs, monkeypatch):
    monkeypatch.setattr(stages, "available_memory", lambda: 2**30)
    # 48 + 16 neurons (the synthetic brain's config) x (1 + 999) rows x 10 splits x 4096 x 12 bytes
    cfg = _compose(SMALL + ["analysis.top_k=4096", "analysis.n_permutations=999", "analysis.splits=10"])
    need = stages.topk_memory_bytes(64, 999, 10, 4096)
    assert need >= 64 * 1000 * 10 * 4096 * 12  # at least one partial of float32 r + int64 unit
    with pytest.raises(ConfigError, match=rf"analysis\.top_k=4096 needs about {need / 2**30:.1f} GiB .*64 neurons "
                                          r"x \(1 \+ analysis\.n_permutations=999\) rows x analysis\.splits=10 .* "
                                          r"1\.0 GiB available"):
        run(cfg)
    assert not (outputs / "stores").exists() and not (outputs / "sweeps").exists()


def test_top_k_above_a_models_units_fails_once_probed_before_any_batch(outputs):
    # test_resnet's global pool alone has 256 units (probed when its store is prepared, nothing extracted)
    cfg = _compose(SMALL + ["models.demo_test_resnet.layers=[global_pool]", "analysis.top_k=300"])
    with pytest.raises(ConfigError, match=r"analysis\.top_k=300 is more than the (\d+) units of model "
                                          r"'demo_test_resnet' \(layers \['global_pool'\]\): valid is 2 <= top_k <= \1"):
        run(cfg)
    stores = outputs / "stores"
    assert not list(stores.rglob("COMPLETE")) and not [p for p in stores.rglob("b0*") if p.parent.name == "done"]
    assert not (outputs / "sweeps").exists()


def test_region_layers_naming_no_layer_of_a_model_fails_once_probed_before_any_batch(outputs):
    cfg = _compose(SMALL + ["analysis.region_layers={V4:[layer4],noise:[layer9*]}"])
    with pytest.raises(ConfigError, match=r"analysis\.region_layers \(model 'demo_test_resnet'\)\['noise'\]: layer "
                                          r"glob 'layer9\*' matches no layer of the activations; "
                                          r"close layer names: .*; "
                                          r"the layers are \["):
        run(cfg)
    stores = outputs / "stores"
    assert not list(stores.rglob("COMPLETE")) and not [p for p in stores.rglob("b0*") if p.parent.name == "done"]
    assert not (outputs / "sweeps").exists()


# ------------------------------------------------------------------------------- the sweep record
def _record(**change):
    splits = [(np.arange(8), np.arange(8, 10)), (np.arange(2, 10), np.arange(2))]
    base = dict(stimuli="s" * 16, splits=splits, analysis={"top_k": 5, "alpha": 0.05}, neural_data="n" * 16)
    return results.sweep_record(**{**base, **change})


def test_a_sweep_folder_refuses_a_run_of_other_inputs_naming_what_differs(tmp_path):
    results.check_record(tmp_path, _record(), "demo", write=True)
    assert json.loads((tmp_path / results.RECORD).read_text()) == json.loads(json.dumps(_record()))
    results.check_record(tmp_path, _record(), "demo")  # the same inputs
    results.check_record(tmp_path, _record(neural_data=None), "demo")  # not known yet: not compared
    cases = {
        "analysis": (_record(analysis={"top_k": 10, "alpha": 0.05}), r"analysis\.top_k \(5 there, 10 now\)"),
        "new key": (_record(analysis={"top_k": 5, "alpha": 0.05, "region_layers": {}}),
                    r"analysis\.region_layers \('<unset>' there, \{\} now\)"),
        "stimuli": (_record(stimuli="t" * 16), r"the stimuli \(fingerprint s+ there, t+ now\)"),
        "neural": (_record(neural_data="m" * 16), r"the neural data \(fingerprint n+ there, m+ now\)"),
        "splits": (_record(splits=[(np.arange(1, 9), np.array([0, 9]))]), r"the splits \(fingerprint"),
        "synthetic brain": (_record(neural={"n_planted": 10}), r"neural\.n_planted \('<unset>' there, 10 now\)"),
    }
    for name, (record, message) in cases.items():
        with pytest.raises(ConfigError, match=rf"sweep_name='demo': the sweep folder .* this run differs in "
                                              rf"{message}.*sweep_name=demo_2"):
            results.check_record(tmp_path, record, "demo", write=True)
    assert json.loads((tmp_path / results.RECORD).read_text())["analysis"] == {"top_k": 5, "alpha": 0.05}


def test_a_run_with_other_science_settings_in_a_sweep_folder_is_refused_before_any_extraction(outputs,
                                                                                             monkeypatch):
    cfg = _compose(SMALL)
    folder = Path(cfg.results_dir)
    folder.mkdir(parents=True)
    # the folder's record: this run's stimuli and splits, another top_k
    from unitmatch.sweep.config import plain
    from unitmatch.sweep.data import load_stimuli, make_splits

    resolved = plain(cfg)
    stimuli = load_stimuli(resolved)
    record = stages._record(resolved, stimuli, make_splits(resolved, stimuli), None)
    # the search (region_layers) is left out: its results have their own key, so both share a folder
    science = {k: v for k, v in OmegaConf.to_container(resolved.analysis).items() if k != "region_layers"}
    assert record["analysis"] == science and record["neural"]["n_planted"] == 48
    results.check_record(folder, {**record, "analysis": {**record["analysis"], "top_k": 7}}, "demo", write=True)
    with pytest.raises(ConfigError, match=r"this run differs in analysis\.top_k \(7 there, 5 now\)\. "):
        run(cfg)
    with pytest.raises(ConfigError, match=r"differs in analysis\.top_k \(7 there, 5 now\); neural\.n_planted "
                                          r"\(48 there, 12 now\)\. "):
        run(_compose(SMALL + ["neural.n_planted=12"]))
    assert not (outputs / "stores").exists() and list(folder.iterdir()) == [folder / results.RECORD]
    # compute settings are not part of the record: with the folder's top_k, other ones reach the extraction
    def extraction(*args, **kwargs):
        raise RuntimeError("every check passed: extraction starts")

    monkeypatch.setattr(stages, "stage_extract", extraction)
    with pytest.raises(RuntimeError, match="every check passed"):
        run(_compose(SMALL + ["analysis.top_k=7", "compute.scheduler=sync", "compute.block_units=512",
                              "compute.batch_size=8", "cluster.n_actors=1"]))


def _tables(value: float) -> dict[str, pd.DataFrame]:
    summary = pd.DataFrame({"model": ["m"], "region": ["V4"], "median_test_r": [value]})
    neurons = pd.DataFrame({"neuron": ["n0", "n1"], "region": ["V4", "V4"], "test_r": [value, value / 2],
                            "p_value": [0.01, 0.5]})
    matches = pd.DataFrame({"neuron": ["n0", "n1"], "split": [0, 0], "test_r": [value, value / 2],
                            "topk_unit": [[1, 2], [3, 4]], "topk_r": [[0.5, 0.4], [0.3, 0.2]]})
    return {"summary": summary, "neurons": neurons, "matches": matches}


def _write(folder: Path, value: float) -> Path:
    null = {"test_r": np.full((3, 2, 2), value)}
    return results.write_model_results(folder, "m", _tables(value), null, {"fingerprint": f"fp{value}"},
                                       {"provenance.json": {"value": value}})


def test_collect_uses_only_results_made_from_the_sweep_record_and_names_the_others(tmp_path, caplog):
    results.check_record(tmp_path, _record(), "demo", write=True)
    _write(tmp_path, 0.5)
    other = results.model_dir(tmp_path, "stale")
    other.mkdir()
    for name in ("summary", "neurons"):
        _tables(0.9)[name].assign(model="stale").to_parquet(other / f"{name}.parquet")
    (other / results.DONE).write_text(json.dumps({"fingerprint": "x", "sweep_record": "another"}))
    summary, neurons, nulls = results.collect(tmp_path)
    assert list(summary.model) == ["m"] and set(nulls) == {"m"}
    assert "['stale'] were made from other inputs than the sweep record" in caplog.text
    assert results.is_done(tmp_path, "m", "fp0.5") and not results.is_done(tmp_path, "stale", "x")


def test_results_are_written_only_into_a_folder_that_records_its_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"sweep\.json is missing"):
        _write(tmp_path, 0.5)
    assert not results.model_dir(tmp_path, "m").exists()


# ------------------------------------------------------------------------------ kill points
def _fail_at(monkeypatch, step: str):
    """Make one step of write_model_results raise, as a kill there would stop it."""
    def boom(*args, **kwargs):
        raise KeyboardInterrupt(f"killed at {step}")

    if step == "parquet":
        monkeypatch.setattr(pd.DataFrame, "to_parquet", boom)
    elif step == "npz":
        monkeypatch.setattr(np, "savez_compressed", boom)
    elif step in ("json", "DONE"):
        real = Path.write_text
        name = "provenance.json" if step == "json" else results.DONE

        def write_text(self, *args, **kwargs):
            if self.name == name:
                raise KeyboardInterrupt(f"killed at {step}")
            return real(self, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", write_text)
    else:  # rename: moving the old results aside, or the new ones into place
        real = Path.rename
        which = ".old-" if step == "rename old" else "staging"

        def rename(self, target):
            if which in (self.name if which == "staging" else Path(target).name):
                raise KeyboardInterrupt(f"killed at {step}")
            return real(self, target)

        monkeypatch.setattr(Path, "rename", rename)


STEPS = ["parquet", "npz", "json", "DONE", "rename old", "rename new"]


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("previous", [None, 0.25])
def test_a_write_killed_at_any_step_leaves_the_previous_complete_results_or_nothing(tmp_path, monkeypatch, step,
                                                                                   previous):
    results.check_record(tmp_path, _record(), "demo", write=True)
    if previous is not None:
        _write(tmp_path, previous)
    with monkeypatch.context() as m:
        _fail_at(m, step)
        if step == "rename old" and previous is None:  # nothing to move aside: the write completes
            _write(tmp_path, 0.75)
            expected = 0.75
        else:
            with pytest.raises(KeyboardInterrupt, match=f"killed at {step}"):
                _write(tmp_path, 0.75)
            expected = previous
    summary, neurons, nulls = results.collect(tmp_path)
    folder = results.model_dir(tmp_path, "m")
    if expected is None:
        assert not folder.exists() and summary.empty and nulls == {}
    else:
        assert summary.median_test_r.tolist() == [expected]
        assert neurons.test_r.tolist() == [expected, expected / 2]
        np.testing.assert_array_equal(nulls["m"], np.full(6, expected))  # mean over axis 1 of (3, 2, 2)
        assert json.loads((folder / "provenance.json").read_text()) == {"value": expected}
        assert json.loads((folder / results.DONE).read_text())["fingerprint"] == f"fp{expected}"
    # nothing half-written is left where a later run would look
    assert [p.name for p in (tmp_path / "models").iterdir()] == ([] if expected is None else ["m"])


def _dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_results_a_killed_writer_moved_aside_are_put_back_and_its_staging_removed(tmp_path):
    """A SIGKILL between the two renames leaves ``.m.old-<pid>`` (complete) and no ``m``: the next look puts it back."""
    results.check_record(tmp_path, _record(), "demo", write=True)
    _write(tmp_path, 0.25)
    folder = results.model_dir(tmp_path, "m")
    pid = _dead_pid()
    folder.rename(folder.parent / f".m.old-{pid}")
    (folder.parent / f".m.staging-{pid}").mkdir()
    (folder.parent / f".m.staging-{os.getppid()}").mkdir()  # a live writer's: left alone
    assert results.collect(tmp_path)[0].empty  # the report reads only: nothing trusted meanwhile
    assert results.is_done(tmp_path, "m", "fp0.25")
    assert sorted(p.name for p in folder.parent.iterdir()) == [f".m.staging-{os.getppid()}", "m"]
    assert results.collect(tmp_path)[0].median_test_r.tolist() == [0.25]
    # with the model folder in place, a dead writer's leftovers are only deleted, on the next write
    (folder.parent / f".m.old-{pid}").mkdir()
    _write(tmp_path, 0.75)
    assert sorted(p.name for p in folder.parent.iterdir()) == [f".m.staging-{os.getppid()}", "m"]
    assert results.collect(tmp_path)[0].median_test_r.tolist() == [0.75]


def test_region_layers_are_checked_on_the_analysed_models_not_on_the_planted_model(outputs, monkeypatch):
    """The planted model (not in the zoo) is extracted only to plant the neurons: globs of the zoo's layers
    that name none of its layers are no error. The run gets past every check to the extraction."""
    import unitmatch.sweep.stages as stages

    class Reached(Exception):
        pass

    def reached(cfg):
        raise Reached

    monkeypatch.setattr(stages, "_ray", reached)
    overrides = [o for o in SMALL if not o.startswith("models=")] + [
        "models=[demo_test_vit]", "analysis.region_layers={V4:[blocks.1],noise:[blocks.0]}"]
    # inside a Hydra context, as in the app: the unselected planted model is loaded from its file
    with initialize_config_module(version_base="1.3", config_module="unitmatch.conf"):
        with pytest.raises(Reached):
            run(compose(config_name="config", overrides=overrides))
    # the same globs on the analysed model itself are still checked
    cfg = _compose(SMALL + ["analysis.region_layers={V4:[blocks.1],noise:[blocks.0]}"])
    with pytest.raises(ConfigError, match=r"analysis\.region_layers \(model 'demo_test_resnet'\)"):
        run(cfg)
