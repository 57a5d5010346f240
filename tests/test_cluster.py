"""Ray for the sweep (sweep.cluster): requests checked against the nodes before dispatch, sessions that
start, join and stop, unreachable addresses that fail at once, and the reduction on (logical) GPUs.

Tests that need a Ray of their own shape (2 CPUs; 1 logical GPU) run a scenario of this file in a
fresh Python process (``python tests/test_cluster.py <scenario> <dir>``): one process holds one Ray
connection, and the session-wide ``ray_local`` of conftest.py must stay as it is.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from unitmatch.sweep.cluster import (ClusterResourceError, NodeResources, ResourceRequest, check_reachable,
                                     check_requests, unsatisfiable)
from unitmatch.sweep.reduce import NOSET_CUDA_ENV

GIB = 2**30
TWO_NODES = [NodeResources("a" * 40, "10.0.0.1", {"CPU": 8.0, "memory": 30 * GIB, "node:10.0.0.1": 1.0}),
             NodeResources("b" * 40, "10.0.0.2", {"CPU": 4.0, "GPU": 2.0, "memory": 60 * GIB, "ssd": 1.0})]


# ---------------------------------------------------------------------------------- requests
def test_a_request_fits_only_if_one_node_has_all_of_it():
    assert not unsatisfiable(ResourceRequest("actor", num_cpus=8), TWO_NODES)
    assert not unsatisfiable(ResourceRequest("actor", num_cpus=4, num_gpus=2, resources={"ssd": 1}), TWO_NODES)
    # 8 CPUs on one node and 2 GPUs on the other: no single node has both
    assert unsatisfiable(ResourceRequest("actor", num_cpus=8, num_gpus=1), TWO_NODES)
    assert unsatisfiable(ResourceRequest("actor", num_cpus=1, memory=61 * GIB), TWO_NODES)
    assert unsatisfiable(ResourceRequest("actor", num_cpus=1, resources={"tpu": 1}), TWO_NODES)
    assert unsatisfiable(ResourceRequest("actor"), [])


def test_an_unsatisfiable_request_names_itself_and_lists_every_node():
    with pytest.raises(ClusterResourceError) as err:
        check_requests(ResourceRequest("reduction block task", num_cpus=1, num_gpus=0.25),
                       ResourceRequest("extraction actor", num_cpus=16, num_gpus=1), nodes=TWO_NODES)
    text = str(err.value)
    assert "one extraction actor {CPU: 16, GPU: 1}" in text
    assert "reduction block task" not in text  # it fits node b
    assert "node 10.0.0.1 (aaaaaaaa): {CPU: 8, memory: 30.0 GiB}" in text
    assert "node 10.0.0.2 (bbbbbbbb): {CPU: 4, GPU: 2, memory: 60.0 GiB, ssd: 1}" in text
    check_requests(ResourceRequest("reduction block task", num_gpus=0.25), nodes=TWO_NODES)  # fits: no error


def test_requests_come_from_ray_remote_arguments_and_reject_bad_amounts():
    r = ResourceRequest.from_remote_args("task", {"num_gpus": 0.5, "memory": 2 * GIB, "resources": {"ssd": 1},
                                                  "max_retries": 3})
    assert r.amounts() == {"CPU": 1.0, "GPU": 0.5, "memory": 2.0 * GIB, "ssd": 1.0}
    assert ResourceRequest.from_remote_args("actor", {"num_cpus": 0}).amounts() == {}
    assert str(ResourceRequest("extraction actor", num_cpus=4)) == "extraction actor {CPU: 4}"
    for bad in (-1, "2", True):
        with pytest.raises(ValueError, match="num_cpus must be a non-negative number"):
            ResourceRequest("actor", num_cpus=bad)


def test_the_live_cluster_is_read_from_ray(ray_local):
    from unitmatch.sweep.cluster import cluster_nodes

    nodes = cluster_nodes()
    assert len(nodes) == 1 and nodes[0].total["CPU"] == 3.0
    with pytest.raises(ClusterResourceError, match=r"one extraction actor \{CPU: 4\}"):
        check_requests(ResourceRequest("extraction actor", num_cpus=4))
    check_requests(ResourceRequest("extraction actor", num_cpus=3))


def test_extraction_actors_that_fit_but_wait_say_what_they_wait_for(ray_local, tmp_path, caplog):
    """Three 1-CPU actors on a 3-CPU cluster where one CPU is held: one actor waits, and the pool says so
    (periodically) while the other two work; the extraction still finishes."""
    from unitmatch.core.extract import ModelSpec
    from unitmatch.core.synthetic import generate_stimuli
    from unitmatch.sweep.extract import ZooExtraction

    @ray_local.remote(num_cpus=1)
    class Holder:
        def ready(self):
            return True

    holder = Holder.remote()
    ray_local.get(holder.ready.remote())
    stimuli = generate_stimuli(n_categories=2, objects_per_category=2, variations=2, size=32)  # 8 images
    zoo = ZooExtraction(tmp_path, n_actors=3, num_cpus=1, batch_size=2, dtype="float32", shard_batches=1,
                        in_flight=1, wait_log_s=0.5)
    try:
        with caplog.at_level("INFO", logger="unitmatch.sweep"):
            stores = zoo.run([ModelSpec("test_resnet", seed=0)], stimuli, ["layer4.0"])
    finally:
        zoo.shutdown()
        ray_local.kill(holder)
    assert all(store.complete for store in stores.values())
    assert "1 of 3 extraction actor(s) wait for {CPU: 1}: the cluster has CPU 0 of 3 free" in caplog.text


# ------------------------------------------------------------------------------------ sessions
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_an_unreachable_address_fails_within_seconds_naming_it():
    address = f"127.0.0.1:{_closed_port()}"
    for given in (address, f"ray://{address}"):
        t0 = time.perf_counter()
        with pytest.raises(ConnectionError, match=rf"cannot reach the Ray cluster at '{given}'"):
            check_reachable(given, timeout_s=5)
        assert time.perf_counter() - t0 < 6
    with pytest.raises(ValueError, match="is not 'local', 'auto', 'host:port'"):
        check_reachable("headnode")
    check_reachable("auto")  # resolved by ray.init itself


def _run_scenario(name: str, workdir: Path, timeout: int = 300) -> tuple[dict, str]:
    """Run a scenario of this file in a fresh process; its JSON summary and its whole output."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run([sys.executable, __file__, name, str(workdir)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return json.loads((workdir / "summary.json").read_text()), output


def test_a_two_cpu_session_fails_fast_on_requests_it_cannot_grant_and_streams_actor_output(tmp_path):
    """cluster.num_cpus_per_actor=4 on a 2-CPU local Ray, and num_gpus_per_actor=1 with no GPU: each
    raises within 30 s naming the request and the node; actor output reaches the driver; an
    unreachable address is named within seconds; the session stops the Ray it started."""
    summary, output = _run_scenario("two_cpu_session", tmp_path)
    assert summary["cpus"] == 2.0 and summary["stopped"] and summary["kept_outer_session"]
    assert "cannot be applied: this process is already connected to Ray" in summary["runtime_env_joined"]
    for case in ("num_cpus=4", "num_gpus=1"):
        seconds, message = summary[case]
        assert seconds < 30, (case, seconds)
        assert "no node of the Ray cluster has that much" in message and "{CPU: 2" in message
    assert "one extraction actor {CPU: 4}" in summary["num_cpus=4"][1]
    assert "one extraction actor {CPU: 1, GPU: 1}" in summary["num_gpus=1"][1]
    seconds, message = summary["unreachable"]
    assert seconds < 15 and "cannot reach the Ray cluster at 'ray://127.0.0.1:" in message
    assert "hello from an actor on stderr" in output  # log_to_driver=True


# ------------------------------------------------------------------ the reduction on logical GPUs
def _tiny_store(root: Path):
    from unitmatch.core.store import ActivationStore, StoreKey
    from unitmatch.core.units import LayerUnits

    rng = np.random.default_rng(5)
    layers = [LayerUnits("conv", (8, 4, 4), ("channel", "y", "x")), LayerUnits("fc", (200,), ("channel",))]
    key = StoreKey(model="test@random:5", preprocessing={"size": 8}, stimuli="gpu", layers=("conv", "fc"))
    store = ActivationStore.create(root, key, layers, [f"im{i:02d}" for i in range(60)], batch_size=20,
                                   unit_chunk=32)
    writer = store.writer()
    acts = {layer.name: rng.standard_normal((60, layer.size)).astype(np.float16) for layer in layers}
    for b in range(store.n_batches):
        writer.write(b, {name: a[store.batch_rows(b)] for name, a in acts.items()})
    store.finalize()
    flat = np.concatenate(list(acts.values()), axis=1).astype(np.float64)
    responses = flat[:, [3, 150, 300]].T + 0.5 * rng.standard_normal((3, 60))
    return ActivationStore.open(store.path), np.vstack([responses, rng.standard_normal((2, 60))])


def _write_inputs(tmp_path: Path):
    """The tiny store, its responses and 3 splits, written for a scenario (:func:`_scenario_inputs`)."""
    from unitmatch.core.splits import brainscore_splits

    store, responses = _tiny_store(tmp_path / "stores")
    splits = brainscore_splits(n_images=60, n_splits=3, random_state=0, stratify=None)
    (tmp_path / "inputs.pkl").write_bytes(pickle.dumps((str(store.path), responses, splits)))
    return store, responses, splits


def _scenario_inputs(workdir: Path):
    """In a scenario: the store, responses and splits of :func:`_write_inputs`, and a folder for records."""
    from unitmatch.core.store import ActivationStore

    path, responses, splits = pickle.loads((workdir / "inputs.pkl").read_bytes())
    records = workdir / "blocks"
    records.mkdir()
    return ActivationStore.open(path), responses, splits, records


def test_block_tasks_request_and_receive_a_logical_gpu_and_equal_the_threaded_answer(tmp_path):
    """ray.init(num_gpus=1) on this CPU machine: every block task asks for a quarter GPU and is granted
    GPU 0 (asserted inside the task); with torch seeing no CUDA the engine runs on cpu there, and the
    result is identical to the threaded scheduler's. A zoo extraction left to size itself starts one
    actor, given the GPU (on cpu here: torch sees no CUDA)."""
    import pandas as pd

    from unitmatch.sweep.reduce import match_store

    store, responses, splits = _write_inputs(tmp_path)
    summary, _ = _run_scenario("logical_gpu_reduction", tmp_path)
    seen = summary["blocks"]
    assert len(seen) == summary["n_blocks"] > 1
    for record in seen:
        assert record["gpu_ids"] == [0], record  # granted, seen by the task itself
        # the task's engine follows torch: cpu here, cuda where the machine has a GPU (test_gpu.py covers that)
        assert record["devices"] == (["cuda:0"] if torch.cuda.is_available() else ["cpu"]), record
        assert record["result"] == "MatchPartial"
    assert summary["block_args"] == {"num_gpus": 0.25, "runtime_env": {"env_vars": {NOSET_CUDA_ENV: "1"}}}
    # the node's GPU memory, read there: unknown with a logical GPU (the tasks then ask for a quarter)
    assert summary["gpu_memory"] == ([torch.cuda.get_device_properties(0).total_memory]
                                     if torch.cuda.is_available() else [None])
    assert summary["extraction_plan"] == [1, 1.0, 0, 2]  # one actor per GPU; 2 cores: no decode workers
    assert summary["extractors_on"] == (["cuda"] if torch.cuda.is_available() else ["cpu"])
    result = pickle.loads((tmp_path / "result.pkl").read_bytes())
    threaded = match_store(store, responses, splits, scheduler="threads", block_units=32 * 2)
    for name in ("matches", "layer_matches"):
        key = ["neuron", "split"] + (["layer"] if name == "layer_matches" else [])
        pd.testing.assert_frame_equal(getattr(result, name).sort_values(key).reset_index(drop=True),
                                      getattr(threaded, name).sort_values(key).reset_index(drop=True))


# ------------------------------------------------------------------------- the Ray cluster YAML
def test_the_ray_cluster_yaml_passes_rays_own_validation_and_would_launch_gpu_workers(capsys):
    """The checks `ray up` runs: prepare_config (defaults filled in) and validate_config (the schema),
    and its warning about a head start command without --autoscaling-config (shown for a broken
    copy, absent for ours). At least one GPU worker starts with the cluster."""
    import yaml
    from ray.autoscaler._private.commands import warn_about_bad_start_command
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "launch" / "ray-cluster.yaml").read_text())
    config = prepare_config(raw)
    validate_config(config)
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] >= 1 and gpu["max_workers"] >= gpu["min_workers"] and gpu["resources"]["GPU"] >= 1
    assert config["available_node_types"][config["head_node_type"]]["resources"].get("GPU", 0) == 0
    capsys.readouterr()
    warn_about_bad_start_command(config["head_start_ray_commands"])
    assert "will not launch any workers" not in "".join(capsys.readouterr())
    broken = dict(raw, head_start_ray_commands=["ray stop", "ray start --head --port=6379"])
    warn_about_bad_start_command(prepare_config(broken)["head_start_ray_commands"])
    assert "will not launch any workers" in "".join(capsys.readouterr())


# ---------------------------------------------------------------------- scenarios (own process)
def _scenario_two_cpu_session(workdir: Path) -> dict:
    import ray

    from unitmatch.core.extract import ModelSpec
    from unitmatch.core.synthetic import generate_stimuli
    from unitmatch.sweep.cluster import ray_session
    from unitmatch.sweep.extract import ZooExtraction

    out = {}
    stimuli = generate_stimuli(n_categories=2, objects_per_category=1, variations=2, size=32)
    with ray_session("local", num_cpus=2, num_gpus=0) as nodes:
        out["cpus"] = nodes[0].total["CPU"]
        for case, kwargs in {"num_cpus=4": {"num_cpus": 4}, "num_gpus=1": {"num_gpus": 1}}.items():
            zoo = ZooExtraction(workdir / "stores", **kwargs)
            t0 = time.perf_counter()
            try:
                zoo.run([ModelSpec("test_resnet", seed=0)], stimuli, ["layer4.0"])
                out[case] = [time.perf_counter() - t0, "no error"]
            except ClusterResourceError as err:
                out[case] = [time.perf_counter() - t0, str(err)]
            finally:
                zoo.shutdown()

        @ray.remote(num_cpus=1)
        class Speaker:
            def speak(self):
                print("hello from an actor on stderr", file=sys.stderr, flush=True)
                return True

        ray.get(Speaker.remote().speak.remote())
        time.sleep(2)  # the log monitor forwards worker output about once a second
        with ray_session("local") as inner:  # joins the running session and leaves it running
            assert inner == nodes
        out["kept_outer_session"] = ray.is_initialized()
        try:  # a runtime_env cannot be applied to a running session: said, not ignored
            with ray_session("local", runtime_env={"py_modules": [str(workdir)]}):
                out["runtime_env_joined"] = "no error"
        except ValueError as err:
            out["runtime_env_joined"] = str(err)
    out["stopped"] = not ray.is_initialized()
    t0 = time.perf_counter()
    try:
        with ray_session(f"ray://127.0.0.1:{_closed_port()}", connect_timeout_s=5):
            pass
        out["unreachable"] = [time.perf_counter() - t0, "no error"]
    except ConnectionError as err:
        out["unreachable"] = [time.perf_counter() - t0, str(err)]
    return out


def _scenario_logical_gpu_reduction(workdir: Path) -> dict:
    import ray
    from ray.util.dask import RayDaskCallback

    from unitmatch.sweep.extract import ZooExtraction

    from unitmatch.sweep.cluster import ray_session
    from unitmatch.sweep.reduce import block_remote_args, match_store

    store, responses, splits, records = _scenario_inputs(workdir)

    class RecordBlocks(RayDaskCallback):
        """Runs inside each Ray task: what the block task was granted and which device its engine used."""

        def _ray_pretask(self, key, object_refs):
            import ray

            return [int(i) for i in ray.get_gpu_ids()]

        def _ray_posttask(self, key, result, pre_state):
            if "block" not in str(key):
                return
            engines = sys.modules["unitmatch.sweep.reduce"]._ENGINES
            record = {"key": str(key), "gpu_ids": pre_state, "result": type(result).__name__,
                      "devices": sorted({str(e.device) for e in engines.values()})}
            (records / f"{abs(hash(str(key)))}.json").write_text(json.dumps(record))

    with ray_session("local", num_cpus=2, num_gpus=1):
        # extraction sized for this machine (cluster=local's nulls): one actor, given the GPU, which
        # torch does not see here, so the actor extracts on cpu (on cuda where it does: test_gpu.py)
        zoo = ZooExtraction(workdir / "stores", batch_size=4)
        try:
            zoo.start()
            plan = list(zoo.plan)
            assert zoo.n_actors is None and zoo.num_gpus is None  # as given
            where = ray.get([actor.where.remote() for actor in zoo.actors])
        finally:
            zoo.shutdown()
        block_args = block_remote_args()  # the cluster has a GPU: the default fraction
        from unitmatch.sweep.cluster import gpu_memory_by_node

        gpu_memory = list(gpu_memory_by_node().values())  # read on the node: none, torch sees no CUDA here
        with RecordBlocks():
            result = match_store(store, responses, splits, scheduler="ray", block_units=32 * 2)
    (workdir / "result.pkl").write_bytes(pickle.dumps(result))
    blocks = [json.loads(p.read_text()) for p in sorted(records.glob("*.json"))]
    from unitmatch.sweep.reduce import block_plan

    return {"blocks": blocks, "n_blocks": len(block_plan(store, 32 * 2)), "block_args": block_args,
            "gpu_memory": gpu_memory,
            "extraction_plan": plan, "extractors_on": [w.rsplit(":", 1)[1] for w in where]}


def test_block_tasks_see_their_nodes_gpus_as_it_has_them_and_compute_on_the_one_granted(tmp_path):
    """Two logical GPUs listed as CUDA_VISIBLE_DEVICES=6,7, a whole one per block task: Ray reuses a
    worker process for tasks granted either GPU, and CUDA reads CUDA_VISIBLE_DEVICES once a process.
    So Ray must leave it alone in block tasks: each saw "6,7", and the CUDA index task_device picks
    from it is the grant's place there (6 -> cuda:0, 7 -> cuda:1; sweep.reduce.granted_cuda_index;
    torch sees no CUDA here, so the blocks run on cpu). Both GPUs were granted; the result equals
    the threaded scheduler's."""
    import pandas as pd

    from unitmatch.sweep.reduce import match_store

    store, responses, splits = _write_inputs(tmp_path)
    summary, _ = _run_scenario("granted_gpus", tmp_path)
    seen = summary["blocks"]
    assert len(seen) == 11  # 128 + 200 units in blocks of 32
    for record in seen:
        assert record["visible"] == "6,7" and record["noset"] == "1", record  # as the node has it
        assert record["gpu_ids"] in (["6"], ["7"]), record
        assert record["index"] == {"6": 0, "7": 1}[record["gpu_ids"][0]], record
    assert {r["gpu_ids"][0] for r in seen} == {"6", "7"}
    result = pickle.loads((tmp_path / "result.pkl").read_bytes())
    threaded = match_store(store, responses, splits, scheduler="threads", block_units=32)
    key = ["neuron", "split"]
    pd.testing.assert_frame_equal(result.matches.sort_values(key).reset_index(drop=True),
                                  threaded.matches.sort_values(key).reset_index(drop=True))


def _scenario_granted_gpus(workdir: Path) -> dict:
    import ray
    from ray.util.dask import RayDaskCallback

    from unitmatch.sweep.cluster import ray_session
    from unitmatch.sweep.reduce import granted_cuda_index, match_store

    store, responses, splits, records = _scenario_inputs(workdir)

    class RecordBlocks(RayDaskCallback):
        def _ray_pretask(self, key, object_refs):
            ids = [str(i) for i in ray.get_gpu_ids()]
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            return {"gpu_ids": ids, "visible": visible, "noset": os.environ.get(NOSET_CUDA_ENV), "pid": os.getpid(),
                    "index": granted_cuda_index(ids[0], visible, 2) if ids else None}

        def _ray_posttask(self, key, result, pre_state):
            if "block" in str(key):
                (records / f"{abs(hash(str(key)))}.json").write_text(json.dumps(pre_state))

    os.environ["CUDA_VISIBLE_DEVICES"] = "6,7"  # the node's GPUs, as a scheduler (SLURM) may list them
    with ray_session("local", num_cpus=2, num_gpus=2), RecordBlocks():
        result = match_store(store, responses, splits, scheduler="ray", block_units=32, gpus_per_task=1.0)
    (workdir / "result.pkl").write_bytes(pickle.dumps(result))
    return {"blocks": [json.loads(p.read_text()) for p in sorted(records.glob("*.json"))]}


if __name__ == "__main__":
    scenario, directory = sys.argv[1], Path(sys.argv[2])
    summary = globals()[f"_scenario_{scenario}"](directory)
    (directory / "summary.json").write_text(json.dumps(summary))
