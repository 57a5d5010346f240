"""launch/slurm.sbatch for real: a two-node Slurm cluster on this machine runs a tiny sweep through sbatch.

launch/ci-slurm.sh installs Slurm from the Debian packages when it is missing (root and the package
registry needed) and starts munged, slurmctld and two slurmd (nodes unitmatch-n1 and -n2, one
logical GPU each). The job's log must show the Ray head on the first node and a Ray worker on the
second, the job must end COMPLETED with exit code 0, and the sweep's results must be on disk.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "launch" / "ci-slurm.sh"
SBATCH = ROOT / "launch" / "slurm.sbatch"
#: the tiny sweep of tests/test_sweep.py (2 demo models, 240 images) on the job's Ray cluster
TINY = ["logger=none", "stimuli.variations=6", "analysis.n_permutations=19", "analysis.n_random_populations=20",
        "analysis.splits=3", "analysis.stratify=auto", "neural.n_planted=24", "neural.n_noise=8",
        "models=[demo_test_convnext,demo_test_resnet]", "untrained_controls=[]", "cluster.num_cpus_per_actor=1",
        "sweep_name=slurm"]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sh(*args, env=None, timeout=600, cwd=None) -> str:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)
    assert proc.returncode == 0, f"{args}: {proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture()
def slurm():
    """A running two-node Slurm cluster (SLURM_CONF in the returned environment); stopped afterwards."""
    if os.geteuid() != 0 and shutil.which("slurmctld") is None:
        pytest.skip("Slurm is not installed and installing it needs root (CI runs as root)")
    _sh("bash", SETUP, "install", timeout=900)
    # a short path: slurmstepd's Unix sockets live in the spool directory (at most 108 bytes)
    state = Path(tempfile.mkdtemp(prefix="umslurm-", dir="/tmp"))
    env = {**os.environ, "SLURM_CONF": str(state / "slurm.conf")}
    try:
        _sh("bash", SETUP, "start", state, timeout=120)
        yield env
    finally:
        subprocess.run(["scancel", "--user", str(os.geteuid())], env=env, capture_output=True)
        _sh("bash", SETUP, "stop", state)
        shutil.rmtree(state, ignore_errors=True)


def _job_fields(job_id: str, env) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, env=env).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


@pytest.mark.timeout(1800)  # installing Slurm, two Ray nodes and a sweep on 2 cores; the job gets 1500 s
def test_sbatch_runs_a_sweep_on_a_ray_cluster_spanning_two_slurm_nodes(slurm, tmp_path):
    outputs = tmp_path / "outputs"
    env = {**slurm,
           "UNITMATCH_VENV": sys.prefix,  # the environment running these tests has unitmatch
           "UNITMATCH_OUTPUTS": str(outputs),
           "UNITMATCH_RAY_PORT": str(_free_port()),
           # a shared test machine: no dashboard, and a Ray Client port nobody else holds
           "UNITMATCH_RAY_HEAD_ARGS": f"--include-dashboard=false --ray-client-server-port={_free_port()}",
           "UNITMATCH_RAY_TMPDIR": f"/tmp/ray-um-{os.getpid()}",
           "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "WANDB_MODE": "offline"}
    cpus = int(_job_node_cpus(env))
    job_id = _sh("sbatch", "--parsable", "--nodes=2", f"--cpus-per-task={cpus}", "--gpus-per-node=1", "--mem=0",
                 "--time=30", f"--output={tmp_path}/unitmatch-%j.log", SBATCH, *TINY,
                 env=env, cwd=tmp_path).strip().split(";")[0]
    deadline = time.monotonic() + 1500
    fields = {}
    while time.monotonic() < deadline:
        fields = _job_fields(job_id, env)
        if fields.get("JobState") in FINAL_STATES or "launch_failed" in fields.get("Reason", ""):
            break  # (a batch step that cannot start is requeued and held: it would wait forever)
        time.sleep(5)
    log = (tmp_path / f"unitmatch-{job_id}.log")
    text = log.read_text() if log.exists() else "(no job log)"
    assert fields.get("JobState") == "COMPLETED" and fields.get("ExitCode") == "0:0", f"{fields}\n{text[-6000:]}"
    # the Ray head on the first node, a worker on the second, both joined before the sweep
    assert "Ray head on unitmatch-n1" in text and "Ray worker on unitmatch-n2" in text
    assert "Ray cluster up: 2 nodes" in text
    assert "'GPU': 2.0" in text  # each node's Slurm GPU became a Ray GPU
    assert "sweep slurm: extracted 2, analyzed 2" in text
    assert "sweep exited with status 0" in text
    summary = pd.read_csv(outputs / "sweeps" / "slurm" / "summary.csv")
    assert set(summary.model) == {"demo_test_convnext", "demo_test_resnet"}
    assert len(list((outputs / "stores").iterdir())) >= 2


def _job_node_cpus(env) -> str:
    """CPUs of one Slurm node of the test cluster."""
    out = _sh("sinfo", "-h", "-N", "-o", "%c", env=env)
    return out.split()[0]
