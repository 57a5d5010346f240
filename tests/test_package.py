"""Packaging: a wheel built with `pip wheel .` installs into a fresh venv and its command runs the demo
from another directory (the configs ship inside the package)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, **kwargs):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        pytest.fail(f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def test_wheel_installs_in_a_fresh_venv_and_runs_the_demo_from_another_directory(tmp_path):
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path / "dist"), str(ROOT)],
         timeout=600)
    (wheel,) = (tmp_path / "dist").glob("unitmatch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for path in ("unitmatch/__init__.py", "unitmatch/core/engine.py", "unitmatch/sweep/__main__.py",
                 "unitmatch/conf/config.yaml", "unitmatch/conf/models/resnet50.yaml", "unitmatch/conf/zoo/demo.yaml",
                 "unitmatch/examples/cornet_z.py", "unitmatch/conf/models/cornet_z.yaml"):  # a config refers to it
        assert path in names, path
    assert not [n for n in names if n.startswith(("unitmatch/tests/", "unitmatch/benchmarks/", "tests/"))]

    venv = tmp_path / "fresh"
    _run([sys.executable, "-m", "venv", str(venv)], timeout=300)
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)], timeout=600)
    # the dependencies come from this environment's site-packages (no editable unitmatch there: .pth
    # files are not read from PYTHONPATH), unitmatch itself only from the fresh venv
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"], "UNITMATCH_OUTPUTS": str(tmp_path / "out"),
           "WANDB_MODE": "offline"}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([str(venv / "bin" / "python"), "-c", "import unitmatch.core; print(unitmatch.core.__file__)"],
                 cwd=elsewhere, env=env, timeout=120).stdout
    assert where.startswith(str(venv)), where
    job = _run([str(venv / "bin" / "unitmatch"), "--cfg", "job"], cwd=elsewhere, env=env, timeout=120).stdout
    assert "demo_test_convnext:" in job and "n_permutations: 100" in job
    demo = _run([str(venv / "bin" / "unitmatch"), "logger=none", "stimuli.variations=4", "analysis.splits=2", "analysis.stratify=auto",
                 "analysis.n_permutations=9", "analysis.n_random_populations=5", "neural.n_planted=12",
                 "neural.n_noise=8", "models=[demo_test_convnext]", "untrained_controls=[]"],
                cwd=elsewhere, env=env, timeout=900)
    assert "sweep demo: extracted 1, analyzed 1" in demo.stdout
    summary = pd.read_csv(tmp_path / "out" / "sweeps" / "demo" / "summary.csv")
    assert summary.loc[summary.region == "V4", "median_test_r"].iloc[0] > 0.3
