"""The matching reduction as a Dask graph over a store (sweep.reduce): same answer as run_matching."""

from __future__ import annotations

import contextlib

import numpy as np
import pandas as pd
import pytest

from unitmatch.core.engine import run_matching
from unitmatch.core.splits import brainscore_splits
from unitmatch.core.store import ActivationStore, StoreKey
from unitmatch.core.synthetic import plant_neurons
from unitmatch.core.units import LayerUnits
from unitmatch.sweep.reduce import block_plan, build_graph, match_assembly, match_store

N_IMAGES = 96
CHUNK = 64
LAYERS = [
    LayerUnits("conv", (16, 7, 7), ("channel", "y", "x")),  # 784 units: 13 chunks, the last one partial
    LayerUnits("blocks.1", (10, 40), ("token", "channel")),  # 400 units
    LayerUnits("fc", (300,), ("channel",)),  # 300 units
]
N_UNITS = sum(layer.size for layer in LAYERS)
BLOCK = 128  # 14 block tasks: 7 + 4 + 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A complete store written batch by batch (no model), its in-memory float16 twin, neurons, splits."""
    rng = np.random.default_rng(7)
    acts = {layer.name: rng.standard_normal((N_IMAGES, layer.size)).astype(np.float16) for layer in LAYERS}
    acts["fc"][:, :50] += np.float16(3.0)  # some units with a non-zero mean
    key = StoreKey(model="test@random:0", preprocessing={"size": 8}, stimuli="abc",
                   layers=tuple(a.name for a in LAYERS))
    store = ActivationStore.create(tmp_path_factory.mktemp("stores"), key, LAYERS,
                                   [f"im{i:03d}" for i in range(N_IMAGES)], batch_size=32, unit_chunk=CHUNK)
    writer = store.writer()
    for b in range(store.n_batches):
        rows = store.batch_rows(b)
        writer.write(b, {name: a[rows] for name, a in acts.items()})
    store.finalize()
    store = ActivationStore.open(store.path)
    flat = np.concatenate([acts[layer.name] for layer in LAYERS], axis=1).astype(np.float32)
    brain = plant_neurons(flat, n_planted=6, n_noise=2, snr=8.0, seed=3)
    splits = brainscore_splits(n_images=N_IMAGES, n_splits=3, random_state=0, stratify=None)
    return store, acts, brain, splits


def _reference(setup, **kwargs):
    store, acts, brain, splits = setup
    return run_matching(acts, brain.responses, splits, catalogue=store.catalogue(), **kwargs)


def _assert_same(result, expected):
    key = ["neuron", "split"]
    pd.testing.assert_frame_equal(result.matches.sort_values(key).reset_index(drop=True),
                                  expected.matches.sort_values(key).reset_index(drop=True))
    key = ["neuron", "split", "layer"]
    pd.testing.assert_frame_equal(result.layer_matches.sort_values(key).reset_index(drop=True),
                                  expected.layer_matches.sort_values(key).reset_index(drop=True))


@pytest.fixture(scope="module")
def threaded(setup):
    store, _, brain, splits = setup
    return match_store(store, brain.responses, splits, scheduler="threads", block_units=BLOCK)


def test_store_holds_the_activations(setup):
    store, acts, _, _ = setup
    assert store.complete and store.unit_chunk == CHUNK
    for name, arr in store.layers().items():
        np.testing.assert_array_equal(np.asarray(arr[:]), acts[name])


def test_block_plan_covers_every_unit_once_in_whole_chunks(setup):
    store, _, _, _ = setup
    plan = block_plan(store, BLOCK)
    assert len(plan) == 7 + 4 + 3
    assert [p[0] for p in plan] == ["conv"] * 7 + ["blocks.1"] * 4 + ["fc"] * 3
    for layer in LAYERS:
        runs = [(a, b) for name, a, b in plan if name == layer.name]
        assert runs[0][0] == 0 and runs[-1][1] == layer.size
        assert all(b == c for (_, b), (c, _) in zip(runs, runs[1:]))  # contiguous, no overlap
        assert all(a % CHUNK == 0 for a, _ in runs)
    assert sum(b - a for _, a, b in plan) == N_UNITS


def test_threads_equals_run_matching(setup, threaded):
    expected = _reference(setup, block_units=BLOCK)
    _assert_same(threaded, expected)
    truth = setup[2].truth
    planted = truth[truth.planted]
    found = threaded.matches[threaded.matches.neuron.isin([f"n{i:03d}" for i in planted.index])]
    # the planted units are recovered (sanity: the store really holds the data the neurons copy)
    by_neuron = found.groupby("neuron")["unit"].agg(lambda u: u.mode()[0])
    assert (by_neuron.to_numpy() == planted.unit.to_numpy()).mean() >= 5 / 6
    assert set(threaded.layer_matches.layer) == {layer.name for layer in LAYERS}


def test_sync_with_progress_equals_run_matching_and_threads(setup, threaded, capsys):
    store, _, brain, splits = setup
    result = match_store(store, brain.responses, splits, scheduler="sync", block_units=BLOCK, progress=True)
    _assert_same(result, threaded)
    assert "100%" in capsys.readouterr().out  # dask's ProgressBar ran


def test_default_block_units_equals_run_matching_default(setup):
    store, _, brain, splits = setup
    result = match_store(store, brain.responses, splits, neuron_ids=[f"v{i}" for i in range(8)])
    expected = _reference(setup, neuron_ids=[f"v{i}" for i in range(8)])
    _assert_same(result, expected)
    assert result.matches["float64"].all()


def test_permutation_null_equals_run_matching(setup):
    store, _, brain, splits = setup
    result = match_store(store, brain.responses, splits, n_permutations=5, seed=11, block_units=BLOCK, top_k=3)
    expected = _reference(setup, n_permutations=5, seed=11, block_units=BLOCK, top_k=3)
    _assert_same(result, expected)
    assert result.null.unit.shape == (5, 3, 8)
    for name in ("unit", "train_r", "test_r"):
        np.testing.assert_array_equal(getattr(result.null, name), getattr(expected.null, name))
    other = match_store(store, brain.responses, splits, n_permutations=5, seed=12, block_units=BLOCK, top_k=3)
    assert not np.array_equal(other.null.train_r, result.null.train_r)  # the seed is used


def test_block_units_not_a_chunk_multiple_is_rounded_down(setup, caplog):
    store, _, brain, splits = setup
    assert block_plan(store, 100) == block_plan(store, 64)
    assert block_plan(store, 10) == block_plan(store, 64)  # at least one chunk
    assert block_plan(store, 200) == block_plan(store, 192)
    with caplog.at_level("WARNING", logger="unitmatch.sweep.reduce"):
        result = match_store(store, brain.responses, splits, block_units=100)
    assert "not a multiple" in caplog.text
    _assert_same(result, _reference(setup, block_units=64))
    for bad in (0, -64, 64.0, True):
        with pytest.raises(ValueError, match="block_units"):
            block_plan(store, bad)


def test_fan_in_changes_the_tree_not_the_answer(setup, threaded):
    store, _, brain, splits = setup
    results = {f: match_store(store, brain.responses, splits, block_units=BLOCK, fan_in=f) for f in (2, 8)}
    for result in results.values():
        _assert_same(result, threaded)
    plan = block_plan(store, BLOCK)

    def n_merges(fan_in):
        from unitmatch.sweep.reduce import _EngineHandle

        graph, root = build_graph(_EngineHandle(None, None, None, {}), store, plan, fan_in)
        return sum(1 for k in dict(graph) if "merge" in str(k)), root

    assert n_merges(2)[0] == 7 + 4 + 2 + 1  # 14 -> 7 -> 4 -> 2 -> 1
    assert n_merges(8)[0] == 2 + 1  # 14 -> 2 -> 1
    with pytest.raises(ValueError, match="fan_in"):
        match_store(store, brain.responses, splits, fan_in=1)


def test_bad_arguments(setup):
    store, _, brain, splits = setup
    with pytest.raises(ValueError, match="scheduler"):
        match_store(store, brain.responses, splits, scheduler="processes")
    with pytest.raises(ValueError, match="95 images but the store"):
        match_store(store, brain.responses[:, :95],
                    brainscore_splits(n_images=95, n_splits=2, random_state=0, stratify=None))


def test_ray_scheduler_without_ray_is_a_clear_error(setup, monkeypatch):
    ray = pytest.importorskip("ray")
    store, _, brain, splits = setup
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match=r"ray\.init"):
        match_store(store, brain.responses, splits, scheduler="ray")


def test_ray_scheduler_equals_threads(setup, threaded, ray_local):
    import os
    import sys

    store, _, brain, splits = setup
    result = match_store(store, brain.responses, splits, scheduler="ray", block_units=BLOCK, fan_in=3)
    _assert_same(result, threaded)
    # the blocks ran in Ray worker processes: they rebuilt (and cached) the engine there
    probe = ray_local.remote(lambda: (os.getpid(), len(getattr(sys.modules.get("unitmatch.sweep.reduce"), "_ENGINES", {}))))
    seen = ray_local.get([probe.remote() for _ in range(30)])
    assert any(pid != os.getpid() and n > 0 for pid, n in seen)


def test_ray_scheduler_with_null_and_busy_cluster_warning(setup, ray_local, monkeypatch, caplog):
    store, _, brain, splits = setup
    # a cluster that shows no free CPU (e.g. extraction actors hold them all) is reported before submitting
    monkeypatch.setattr(ray_local, "available_resources", lambda: {"CPU": 0.0})
    with caplog.at_level("WARNING", logger="unitmatch.sweep.reduce"):
        result = match_store(store, brain.responses, splits, scheduler="ray", block_units=256, n_permutations=2,
                             seed=1)
    assert "reduction block task(s) wait for {CPU: 1}: the cluster has CPU 0 of 3 free" in caplog.text
    expected = _reference(setup, block_units=256, n_permutations=2, seed=1)
    _assert_same(result, expected)
    for name in ("unit", "train_r", "test_r"):
        np.testing.assert_array_equal(getattr(result.null, name), getattr(expected.null, name))


def test_reduction_waits_for_busy_cpus_says_so_and_finishes_once_they_are_released(setup, threaded, ray_local,
                                                                                  caplog):
    """Actors holding every CPU (extractors not yet released): the reduction waits, logs what it waits
    for, and completes with the threaded answer once the actors go; no deadlock."""
    import threading
    import time

    store, _, brain, splits = setup

    @ray_local.remote(num_cpus=1)
    class Holder:
        def ready(self):
            return True

    holders = [Holder.remote() for _ in range(3)]  # the fixture's cluster has 3 CPUs
    ray_local.get([h.ready.remote() for h in holders])
    out = {}
    with caplog.at_level("INFO", logger="unitmatch.sweep"):
        worker = threading.Thread(target=lambda: out.update(result=match_store(
            store, brain.responses, splits, scheduler="ray", block_units=BLOCK, wait_log_s=0.5)))
        worker.start()
        time.sleep(3)
        assert worker.is_alive()  # nothing could run
        for h in holders:
            ray_local.kill(h)
        worker.join(timeout=120)  # fresh Ray workers import torch first: tens of seconds on a busy machine
    assert not worker.is_alive()
    assert caplog.text.count("reduction: the next reduction block task(s) wait for {CPU: 1}") >= 2  # periodic
    _assert_same(out["result"], threaded)


def test_gpu_request_that_no_node_can_grant_fails_fast(setup, ray_local):
    from unitmatch.sweep.cluster import ClusterResourceError

    store, _, brain, splits = setup
    import time

    t0 = time.perf_counter()
    with pytest.raises(ClusterResourceError, match=r"one reduction block task \{CPU: 1, GPU: 0.25\}: no node") as err:
        match_store(store, brain.responses, splits, scheduler="ray", block_units=BLOCK, gpus_per_task=0.25)
    assert time.perf_counter() - t0 < 30
    assert "CPU: 3" in str(err.value)  # the nodes are listed with their resources


def test_block_tasks_ask_for_no_gpu_on_a_cluster_without_gpus_and_validate_the_fraction(ray_local):
    from unitmatch.sweep.reduce import DEFAULT_GPUS_PER_TASK, NOSET_CUDA_ENV, block_remote_args

    assert block_remote_args() == {}  # the fixture's cluster has no GPU
    noset = {NOSET_CUDA_ENV: "1"}  # with a GPU, Ray leaves CUDA_VISIBLE_DEVICES as the node has it
    assert block_remote_args(0.5, {"num_cpus": 2}) == {"num_cpus": 2, "num_gpus": 0.5,
                                                       "runtime_env": {"env_vars": noset}}
    given = {"runtime_env": {"pip": ["x"], "env_vars": {"A": "1"}}}
    assert block_remote_args(0.25, given) == {"num_gpus": 0.25,
                                              "runtime_env": {"pip": ["x"], "env_vars": {**noset, "A": "1"}}}
    assert given == {"runtime_env": {"pip": ["x"], "env_vars": {"A": "1"}}}  # not changed
    unset = {"runtime_env": {"env_vars": {NOSET_CUDA_ENV: "0"}}}
    assert block_remote_args(1, unset)["runtime_env"] == {"env_vars": noset}  # the tasks need it
    assert block_remote_args(0) == {}
    assert block_remote_args(0, given) == given
    assert 0 < DEFAULT_GPUS_PER_TASK <= 1
    for bad in (-0.1, 1.5, "0.5", True):
        with pytest.raises(ValueError, match="gpus_per_task"):
            block_remote_args(bad)
    with pytest.raises(ValueError, match="num_gpus"):
        block_remote_args(0.5, {"num_gpus": 1})


def test_block_tasks_ask_for_the_share_of_the_smallest_gpu_their_memory_needs(ray_local, monkeypatch, caplog):
    """gpus_per_reduce_task=null on a cluster with GPUs: as many block tasks a GPU as 90% of it holds
    (a task's working set and its worker's engines, and for each task a CUDA context on every GPU of
    the node: Ray gives a worker tasks on any of them), at most four; of the nodes the tasks can run
    on, the one that holds the fewest decides; where no GPU's memory is known, a quarter; a given
    fraction is kept."""
    import ray

    from unitmatch.sweep import cluster
    from unitmatch.sweep.cluster import NodeResources
    from unitmatch.sweep.reduce import DEFAULT_GPUS_PER_TASK, block_remote_args, gpus_per_block_task

    gib = 2**30
    task = int(6.5 * gib)  # + 1 GiB of context per GPU of the node, in 90% of the GPU
    for gpu_gib, gpus, fraction in ((80, 1, 0.25), (32, 1, 0.3333), (24, 1, 0.5), (16, 1, 1.0),
                                    (80, 8, 0.25), (40, 8, 0.5), (24, 8, 1.0)):
        assert gpus_per_block_task(task, gpu_gib * gib, gpus) == fraction, (gpu_gib, gpus)  # 0.3333: three fit
    with caplog.at_level("WARNING", logger="unitmatch.sweep.reduce"):
        assert gpus_per_block_task(10 * gib, 8 * gib) == 1.0
    assert "about 10.0 GiB on a GPU, and its worker a CUDA context on each of the node's 1 GPU(s): more than " \
           "90% of the smallest GPU (8.0 GiB)" in caplog.text
    assert "compute.block_units" in caplog.text

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 6.0, "GPU": 9.0})
    nodes = [NodeResources("a", "10.0.0.1", {"CPU": 2.0, "GPU": 1.0}), NodeResources("b", "10.0.0.2", {"CPU": 1.0, "GPU": 8.0}),
             NodeResources("c", "10.0.0.3", {"CPU": 4.0})]
    monkeypatch.setattr(cluster, "cluster_nodes", lambda: nodes)
    memory = {"a": 80 * gib, "b": 40 * gib}
    monkeypatch.setattr(cluster, "gpu_memory_by_node", lambda nodes=None: dict(memory))
    assert block_remote_args(None, None, task)["num_gpus"] == 0.5  # node b: 40 GB GPUs, eight of them
    # tasks that need 2 CPUs cannot run on b (it has one): a decides
    assert block_remote_args(None, {"num_cpus": 2}, task)["num_gpus"] == 0.25
    memory = {"a": 80 * gib, "b": None}
    assert block_remote_args(None, None, task)["num_gpus"] == 0.25  # b unknown: a decides
    assert block_remote_args(None)["num_gpus"] == DEFAULT_GPUS_PER_TASK  # no size given
    assert block_remote_args(0.125, None, task)["num_gpus"] == 0.125  # as given
    memory = {"a": None, "b": None}  # logical GPUs: torch saw no CUDA there
    assert block_remote_args(None, None, task)["num_gpus"] == DEFAULT_GPUS_PER_TASK


def test_block_tasks_use_cuda_only_when_ray_granted_them_a_gpu(monkeypatch):
    """Ray >= 2.4x leaves CUDA_VISIBLE_DEVICES set for tasks that ask for no GPU: the device comes from
    the grant, never from torch.cuda.is_available() alone. Block tasks see the node's GPUs (Ray
    leaves CUDA_VISIBLE_DEVICES alone for them) and compute on the granted one's place in it."""
    import ray
    import torch

    from unitmatch.sweep import reduce
    from unitmatch.sweep.reduce import NOSET_CUDA_ENV, task_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(reduce, "_FIRST_CUDA_USE", {})
    monkeypatch.setenv(NOSET_CUDA_ENV, "1")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cases = {((), True): "cpu", ((0,), True): "cuda:0", ((2,), True): "cuda:2", ((0,), False): "cpu",
             ((), False): "cpu"}
    for (granted, cuda), device in cases.items():
        monkeypatch.setattr(ray, "get_gpu_ids", lambda granted=granted: list(granted))
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        assert task_device() == device, (granted, cuda)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")  # ids as the node lists them
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: ["6"])
    assert task_device() == "cuda:2"
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: ["3"])
    with pytest.raises(RuntimeError, match=r"Ray granted GPU '3', which is not one of the 4 CUDA devices .*'4,5,6,7'"):
        task_device()
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: ["4", "5", "6", "7"])  # Ray's ids fit no GPU seen: all listed
    with pytest.raises(RuntimeError, match=r"Ray lists GPUs \['4', '5', '6', '7'\] for this block task, which asked "
                                           r"for one at most"):
        task_device()

    # Ray set CUDA_VISIBLE_DEVICES per task (no NOSET_CUDA_ENV): the first grant binds this process
    monkeypatch.delenv(NOSET_CUDA_ENV)
    for visible, device in (("5", "cuda:0"), ("5", "cuda:0")):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        monkeypatch.setattr(ray, "get_gpu_ids", lambda visible=visible: [visible])
        assert task_device() == device
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6")
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: ["6"])
    with pytest.raises(RuntimeError, match=r"granted this block task GPU 6 .* first used CUDA with "
                                           r"CUDA_VISIBLE_DEVICES='5'"):
        task_device()


def test_granted_cuda_index_is_the_grants_place_among_the_visible_gpus():
    from unitmatch.sweep.reduce import granted_cuda_index

    assert granted_cuda_index(0, None, 2) == 0 and granted_cuda_index("1", None, 2) == 1
    assert granted_cuda_index("6", "4,5,6,7", 4) == 2 and granted_cuda_index("6", " 6 , 7", 2) == 0
    uuid = "GPU-9a8b7c6d-0000-1111-2222-333344445555"
    assert granted_cuda_index(uuid, f"GPU-0000,{uuid}", 2) == 1
    for granted, visible, n in ((2, None, 2), ("8", "6,7", 2), ("7", "6,7", 1), ("x", None, 4)):
        with pytest.raises(RuntimeError, match="which is not one of the"):
            granted_cuda_index(granted, visible, n)


def test_graph_ships_engine_and_arrays_once_and_each_block_reads_its_own_slice(setup):
    from unitmatch.sweep.reduce import _EngineHandle, _process_block

    store, _, _, _ = setup
    plan = block_plan(store, BLOCK)
    graph, root = build_graph(_EngineHandle(None, None, None, {}), store, plan, 4)
    deps = graph.get_all_dependencies()
    engine = [k for k in deps if "engine" in str(k)]
    arrays = sorted((k for k in deps if "array" in str(k)), key=str)
    assert len(engine) == 1 and len(arrays) == len(LAYERS)
    blocks = sorted((k for k in deps if "block" in str(k)), key=lambda k: k[1])
    assert len(blocks) == len(plan)
    offsets = {layer.name: sum(x.size for x in LAYERS[:i]) for i, layer in enumerate(LAYERS)}
    for key, (layer, start, stop) in zip(blocks, plan):
        # a block depends on the engine and its own layer's array only, by reference
        assert deps[key] == {engine[0], arrays[[x.name for x in LAYERS].index(layer)]}
        task = graph[key]
        assert task.func is _process_block
        literal = [getattr(a, "value", a) for a in task.args[2:]]
        assert literal == [layer, start, stop, offsets[layer] + start]


def test_ray_remote_args_reach_block_tasks_only(setup):
    pytest.importorskip("ray")
    from ray.util.dask.scheduler import _build_key_scoped_ray_remote_args

    from unitmatch.sweep.reduce import _EngineHandle

    store, _, _, _ = setup
    graph, root = build_graph(_EngineHandle(None, None, None, {}), store, block_plan(store, BLOCK), 4,
                              {"num_gpus": 0.5})
    scoped = _build_key_scoped_ray_remote_args(graph, {}, {})
    blocks = {k: v for k, v in scoped.items() if "block" in str(k)}
    assert len(blocks) == 14 and all(v == {"num_gpus": 0.5} for v in blocks.values())
    assert all(v == {} for k, v in scoped.items() if k not in blocks)  # engine, arrays, merges: no GPU asked
    assert "merge" in str(root)


def test_match_assembly_leaves_out_flagged_neurons_and_commits_regions_like_core(setup):
    """The store's region-committed reduction of the analysable neurons equals core's in-memory one,
    and analyze accepts it as its result."""
    from unitmatch import core
    from unitmatch.core.analysis import analysable, match_by_region, resolve_region_layers

    store, acts, brain, splits = setup
    responses = np.concatenate([brain.responses, np.ones((1, N_IMAGES))])  # a constant neuron: flagged
    ids = [*brain.truth.neuron, "flat"]
    regions = ["V4"] * 4 + ["IT"] * 5
    assembly = core.NeuralAssembly(responses, ids, regions, store.image_ids)
    mapping = {"V4": ["conv", "blocks.*"], "IT": ["re:^fc$"]}
    result = match_assembly(store, assembly, splits, n_permutations=4, block_units=BLOCK, region_layers=mapping)
    assert "flat" not in set(result.matches.neuron)
    region = result.matches.neuron.map(dict(zip(ids, regions)))
    assert set(result.matches.layer[region == "V4"]) <= {"conv", "blocks.1"}
    assert set(result.matches.layer[region == "IT"]) == {"fc"}
    kept = analysable(assembly, splits=splits)
    committed = resolve_region_layers(mapping, store.catalogue(), kept.regions)
    expected = match_by_region(
        lambda y, n, layers: run_matching(acts, y, splits, catalogue=store.catalogue(), neuron_ids=n, layers=layers,
                                          n_permutations=4, block_units=BLOCK),
        kept.mean_responses(), kept.neuron_ids, kept.regions, committed)
    _assert_same(result, expected)
    np.testing.assert_array_equal(result.null.unit, expected.null.unit)
    a = core.analyze(store.layers(), assembly, splits, catalogue=store.catalogue(), result=result, decode=False,
                     region_layers=mapping)
    assert a.neurons.set_index("neuron").loc["flat", "flags"] == "constant_train"
    with pytest.raises(ValueError, match=r"result is not this region-committed search: neuron .* is matched in layer"):
        core.analyze(store.layers(), assembly, splits, catalogue=store.catalogue(), result=result, decode=False,
                     region_layers={"V4": ["fc"], "IT": ["fc"]})
    with pytest.raises(ValueError, match=r"analysis.region_layers\['IT'\]: unknown layer 'fc2'.*the layers are "
                                         r"\['conv', 'blocks.1', 'fc'\]"):
        match_assembly(store, assembly, splits, region_layers={"V4": ["conv"], "IT": ["fc2"]})
    with pytest.raises(ValueError, match=r"layers=\['nope'\]: unknown layers \['nope'\]; the store .* has "
                                         r"\['conv', 'blocks.1', 'fc'\]"):
        match_store(store, brain.responses, splits, layers=["nope"])
    with pytest.raises(ValueError, match=r"layers=\['nope'\]: unknown layers \['nope'\]; the activations have "
                                         r"\['conv', 'blocks.1', 'fc'\]"):
        run_matching(acts, brain.responses, splits, catalogue=store.catalogue(), layers=["nope"])
    with pytest.raises(ValueError, match=r"layers=\[\]: empty; the activations have"):
        run_matching(acts, brain.responses, splits, catalogue=store.catalogue(), layers=[])


def test_one_engine_per_neurons_splits_and_settings_across_reductions(setup, threaded, monkeypatch):
    """The sweep matches the same neurons against model after model: the engine is built once per
    (responses, splits, settings, device) and reused (same answer); any difference builds another."""
    from unitmatch.sweep import reduce

    store, _, brain, splits = setup
    monkeypatch.setattr(reduce, "_ENGINES", type(reduce._ENGINES)())
    built = []
    engine_class = reduce.MatchEngine

    def counting(*args, **kwargs):
        built.append(args[0].shape)
        return engine_class(*args, **kwargs)

    monkeypatch.setattr(reduce, "MatchEngine", counting)
    for given in (iter(splits), splits):  # the splits as a generator (read once), then as a list
        _assert_same(match_store(store, brain.responses, given, scheduler="threads", block_units=BLOCK), threaded)
    assert len(built) == 1
    key = reduce.engine_key(brain.responses, splits, reduce.MatchSettings())
    assert reduce.engine_key(brain.responses.copy(), [(tr.copy(), te.copy()) for tr, te in splits],
                             reduce.MatchSettings(device="cuda")) == key  # same content; the device is keyed apart
    others = [reduce.engine_key(brain.responses[:-1], splits, reduce.MatchSettings()),
              reduce.engine_key(brain.responses + 1e-12, splits, reduce.MatchSettings()),
              reduce.engine_key(brain.responses, splits[:2], reduce.MatchSettings()),
              reduce.engine_key(brain.responses, [(te, tr) for tr, te in splits], reduce.MatchSettings()),
              reduce.engine_key(brain.responses, splits, reduce.MatchSettings(n_permutations=2))]
    assert len({key, *others}) == 6
    other = match_store(store, brain.responses[:-1], splits, scheduler="threads", block_units=BLOCK)
    assert len(built) == 2 and len(other.matches) == len(threaded.matches) - len(splits)


def test_a_worker_keeps_its_engine_on_one_gpu_at_most(monkeypatch):
    """A Ray worker granted another GPU than its last task's drops its engines on that one (each holds
    the neuron side, 2.0 GB for 256 neurons with the default null: MatchEngine.resident_bytes); engines
    on cpu stay."""
    import pickle

    from unitmatch.sweep import reduce

    monkeypatch.setattr(reduce, "_ENGINES", type(reduce._ENGINES)())
    monkeypatch.setattr(reduce, "_ENGINES_KEEP", 4)
    monkeypatch.setattr(reduce, "MatchEngine", lambda responses, splits, options: f"engine on {options.device}")
    handle = reduce._EngineHandle(None, np.zeros((2, 4)), [], reduce.MatchSettings(), key="k")
    shipped = pickle.loads(pickle.dumps(handle))  # as a Ray task receives it: no engine
    for device, cached in (("cpu", ["cpu"]), ("cuda:1", ["cpu", "cuda:1"]), ("cuda:1", ["cpu", "cuda:1"]),
                           ("cuda:0", ["cpu", "cuda:0"]), ("cpu", ["cuda:0", "cpu"])):
        monkeypatch.setattr(reduce, "task_device", lambda device=device: device)
        assert shipped.get() == f"engine on {device}"
        assert [d for _, d in reduce._ENGINES] == cached


def test_block_tasks_on_a_gpu_read_their_chunks_on_the_cpus_they_were_given(setup, monkeypatch, ray_local):
    """A block whose products run on a GPU is staged in pieces (``process_staged``), read on as many
    threads as the CPUs Ray assigned its task (``cluster.cpus_per_reduce_task``); on the CPU, and
    outside Ray (a local scheduler already runs a block a core), it is read whole on one thread.
    The values are the plain read's."""
    import torch

    from unitmatch.core.integrity import CheckedArray
    from unitmatch.sweep import reduce as reduce_module
    from unitmatch.sweep.stages import _reduce_task_cpus

    store, _, _, _ = setup
    array = store.layers()[LAYERS[0].name]
    asked, seen = [], []
    read = CheckedArray.read_units
    monkeypatch.setattr(CheckedArray, "read_units", lambda self, a, b, threads=1, out=None: asked.append(threads) or read(self, a, b, threads, out))

    released = []

    class Engine:
        def __init__(self, device):
            self.device = torch.device(device)

        def process(self, block):
            seen.append(np.array(block.data))
            return "partial"

        def release_scratch(self):
            released.append("scratch")

    class Handle:
        def __init__(self, device, read_threads=None):
            self.engine, self.read_threads = Engine(device), read_threads

        def get(self):
            return self.engine

    staged = []
    monkeypatch.setattr(reduce_module, "process_staged", lambda *args: staged.append(args) or "staged partial")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: released.append("cache"))
    monkeypatch.setattr(reduce_module, "block_read_threads", lambda: 3)  # as in a Ray task given 3 CPUs
    assert reduce_module._process_block(Handle("cpu"), array, LAYERS[0].name, BLOCK, 2 * BLOCK, 5) == "partial"
    assert asked == [1] and staged == []
    np.testing.assert_array_equal(seen[-1], np.asarray(array[:, BLOCK:2 * BLOCK]))
    cuda = Handle("cuda")
    assert reduce_module._process_block(cuda, array, LAYERS[0].name, BLOCK, 2 * BLOCK, 5) == "staged partial"
    assert staged == [(cuda.engine, array, LAYERS[0].name, 5, BLOCK, 2 * BLOCK, 3)] and asked == [1]
    assert released == ["scratch", "cache"]  # a Ray task gives its scratch back to the GPU
    entered = []

    @contextlib.contextmanager
    def current_device(device):
        entered.append(f"enter {device}")
        yield
        entered.append("exit")

    monkeypatch.setattr(torch.cuda, "device", current_device)
    monkeypatch.setattr(reduce_module, "process_staged", lambda *args: entered.append("staged") or "staged partial")
    granted = Handle("cuda:1")  # a Ray task's engine, on the GPU granted: the current device while it runs
    assert reduce_module._process_block(granted, array, LAYERS[0].name, BLOCK, 2 * BLOCK, 5) == "staged partial"
    assert entered == ["enter cuda:1", "staged", "exit"] and released == ["scratch", "cache"] * 2
    monkeypatch.setattr(reduce_module, "process_staged", lambda *args: staged.append(args) or "staged partial")
    local = Handle("cuda", read_threads=6)  # a local scheduler's (local_gpu_threads), not Ray's CPUs
    reduce_module._process_block(local, array, LAYERS[0].name, 0, BLOCK, 0)
    assert staged[-1][-1] == 6 and released == ["scratch", "cache"] * 2  # kept until the reduction ends
    monkeypatch.setattr(reduce_module, "process_staged", lambda *args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        reduce_module._process_block(cuda, array, LAYERS[0].name, 0, BLOCK, 0)
    assert released == ["scratch", "cache"] * 3  # also when the block fails
    monkeypatch.undo()
    assert reduce_module.block_read_threads() == 1  # not in a Ray task
    in_task = ray_local.remote(num_cpus=2)(lambda: __import__("unitmatch.sweep.reduce").sweep.reduce.block_read_threads())
    assert ray_local.get(in_task.remote()) == min(2, len(__import__("os").sched_getaffinity(0)))
    assert _reduce_task_cpus({"cpus_per_reduce_task": 4}) == {"num_cpus": 4.0}
    assert _reduce_task_cpus({"cpus_per_reduce_task": None}) is None


@pytest.mark.parametrize("checked", [True, False])
def test_a_block_staged_in_pieces_scores_as_the_whole_block(setup, checked, monkeypatch):
    """``process_staged`` (a block task on a GPU; here its CPU ring): the block read in pieces of
    whole chunks, a checked store's straight into the staging buffers on the given read threads,
    gives the partial of the whole block scored at once (the same units, r to float32 rounding)."""
    from unitmatch.core.engine import MatchEngine
    from unitmatch.core.integrity import CheckedArray
    from unitmatch.core.units import UnitBlock
    from unitmatch.sweep.reduce import process_staged

    store, acts, brain, splits = setup
    layer = LAYERS[0]
    array = store.layers()[layer.name] if checked else store.layers()[layer.name].array
    assert isinstance(array, CheckedArray) == checked
    reads = []
    read_units = CheckedArray.read_units
    monkeypatch.setattr(CheckedArray, "read_units", lambda self, a, b, threads=1, out=None: reads.append(
        (a, b, threads, out is not None)) or read_units(self, a, b, threads, out))
    engine = MatchEngine(brain.responses, splits, top_k=3)
    start, stop, first = CHUNK, 11 * CHUNK + 17, 1000  # ten whole chunks and the partial last one
    whole = engine.process(UnitBlock(acts[layer.name].reshape(N_IMAGES, -1)[:, start:stop], layer.name, first))
    cases = ((4, [3 * CHUNK] * 3 + [stop - start - 9 * CHUNK]), (1, [stop - start]), (100, [CHUNK] * 10 + [17]))
    for pieces, widths in cases:
        reads.clear()
        got = process_staged(engine, array, layer.name, first, start, stop, read_threads=2, pieces=pieces)
        if checked:  # each piece read once, into a staging buffer, on the threads given
            assert [(b - a, threads, into) for a, b, threads, into in reads] == [(w, 2, True) for w in widths]
        assert got.n_units == whole.n_units == stop - start
        np.testing.assert_array_equal(got.top_unit, whole.top_unit)
        np.testing.assert_allclose(got.top_r, whole.top_r, rtol=0, atol=1e-6)
        mine, theirs = got.layers[layer.name], whole.layers[layer.name]
        np.testing.assert_array_equal(mine.unit, theirs.unit)
        np.testing.assert_allclose(mine.train_r, theirs.train_r, rtol=0, atol=1e-6)
        np.testing.assert_allclose(mine.test_r, theirs.test_r, rtol=0, atol=1e-6)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="pieces must be a positive integer"):
            process_staged(engine, array, layer.name, first, start, stop, pieces=bad)
    with pytest.raises(ValueError, match=r"units 0..9999 of layer 'conv': the array has 784 units"):
        process_staged(engine, array, layer.name, 0, 0, 9999)


def test_a_staged_block_that_fails_ends_its_staging_thread_with_the_call(setup):
    """A piece that fails to score (here: a device out of memory, stood in for) is raised from
    ``process_staged``, and the staging thread that read ahead has ended by then: a block task's
    error does not keep its thread and buffers alive while Dask holds the traceback."""
    import threading

    from unitmatch.core.engine import MatchEngine
    from unitmatch.sweep.reduce import process_staged

    store, _, brain, splits = setup
    engine = MatchEngine(brain.responses, splits, top_k=3)
    calls = []

    def process(block):
        calls.append(block.first_unit)
        raise MemoryError("out of memory (stood in for)")

    engine.process = process
    with pytest.raises(MemoryError, match="stood in for") as caught:
        process_staged(engine, store.layers()["conv"], "conv", 0, 0, 12 * CHUNK, pieces=4)
    assert calls == [0]
    # the traceback (held here, as Dask holds a failed task's) keeps the frames, not the thread
    assert caught.tb is not None and not [t for t in threading.enumerate() if t.name == "unitmatch-staging"]


def test_block_tasks_on_this_processs_gpu_run_as_many_at_once_as_half_its_memory_holds(monkeypatch, caplog):
    """With the engine on this process's GPU, a local scheduler runs as many block tasks at once as
    their working sets (the engine's per-thread scratch for a piece and the staging ring) fit in half
    the device's memory, or in what is free if less (the allocator's unused blocks counted free), at
    most one a core and one a task; the cores left read each task's chunks; a given num_workers is
    kept, with a warning where it does not fit."""
    from types import SimpleNamespace

    import torch

    from unitmatch.sweep import reduce as reduce_module

    gib = 2**30
    device = {"free": 70 * gib, "total": 80 * gib, "reserved": 0, "allocated": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (device["free"], device["total"]))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: device["reserved"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: device["allocated"])
    monkeypatch.setattr(reduce_module, "usable_cores", lambda: 16)
    chunk, images = 16384, 3200

    def engine(per_unit):  # scratch bytes per unit of a piece (MatchEngine.scratch_bytes)
        return SimpleNamespace(device=torch.device("cuda"), n_images=images, n_rows=25856,
                               scratch_bytes=lambda n: per_unit * n)

    null = 236936  # 256 neurons x 101 rows, 10 splits of 3200 images: 3.9 GB a 16,384-unit piece
    task = null * chunk + chunk * images * 2  # and its float16 staging slot (one piece: one slot)
    threads = reduce_module.local_gpu_threads
    assert threads(engine(null), chunk, chunk, 2) == (40 * gib // task, 1)  # 10 of 16 cores, 1 read thread each
    assert threads(engine(null), chunk, chunk, 2, max_tasks=3) == (3, 5)  # three blocks: the cores read them
    assert threads(engine(1000), chunk, chunk, 2) == (16, 1)  # small working sets: a core each
    device.update(free=10 * gib, reserved=6 * gib, allocated=2 * gib)  # 14 GiB free or reusable, below half
    assert threads(engine(null), chunk, chunk, 2) == (14 * gib // task, 16 // (14 * gib // task))  # 3, 5
    with caplog.at_level("WARNING", logger="unitmatch.sweep.reduce"):
        assert threads(engine(null), chunk, chunk, 2, num_workers=8) == (8, 2)
    assert (f"num_workers=8 block tasks on cuda hold {8 * task / gib:.1f} GiB of working sets ({task / gib:.2f} GiB "
            f"each: pieces of 16384 units x 25856 neuron rows), more than the 14.0 GiB") in caplog.text
    # a block of four chunks is scored a piece (one chunk) at a time; three pieces wait in the ring
    device.update(free=70 * gib, reserved=0, allocated=0)
    four = 1000 * chunk + 3 * chunk * images * 2
    assert threads(engine(1000), 4 * chunk, chunk, 2) == (min(16, 40 * gib // four), 1)
    with pytest.raises(ValueError, match="num_workers must be a positive integer; got 0"):
        threads(engine(1000), chunk, chunk, 2, num_workers=0)


def test_the_engine_handle_sends_no_read_threads_to_ray_tasks():
    """A local scheduler's read threads stay in the driver: a pickled handle (a Ray task's) reads on
    the CPUs Ray gives the task."""
    import pickle

    from unitmatch.sweep.reduce import _EngineHandle

    handle = _EngineHandle(None, np.zeros((2, 3)), [], {}, "key", read_threads=6)
    assert handle.read_threads == 6 and pickle.loads(pickle.dumps(handle)).read_threads is None
