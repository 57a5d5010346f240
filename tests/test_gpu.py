"""On a CUDA machine: the engine, extraction, Ray actors and the Dask-on-Ray reduction on the GPU.

Every test is marked ``gpu`` and skipped (with the reason) where torch sees no CUDA. Run them with
``pytest -m gpu`` (the default run includes them too on a CUDA machine), which also selects the
cuda case of tests/test_engine.py's agreement with the float64 reference. Their CPU analogues run
everywhere: tests/test_engine.py (engine vs the float64 reference), tests/test_store.py (stores vs
direct extraction), tests/test_cluster.py (Ray tasks granted a logical GPU).

Tolerances:

- The engine decides and scores in float64 at the end (re-scoring from the activations), so on
  cuda it must give the reference's argmax and r to 1e-10, exactly as on cpu; only the float32
  screening r (topk_r) carries float32 error (1e-5).
- Extraction runs with TF32 off (the project's policy), so a cuda forward differs from the cpu
  forward by float32 rounding only, accumulated in a different order: the bound used is
  1e-4 x each layer's largest magnitude (float32 eps is 1.2e-7; a few hundred accumulation
  steps per output and a handful of layers stay far below it; TF32, with its 10-bit mantissa,
  would give about 1e-3 and fail).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available())")]

#: extraction: max |cuda - cpu| over a layer, relative to the layer's largest |activation|
EXTRACT_RTOL = 1e-4


def _layers(seed=0, n_images=300):
    rng = np.random.default_rng(seed)
    conv = np.maximum(rng.standard_normal((n_images, 8, 5, 5)), 0).astype(np.float16)
    tokens = rng.standard_normal((n_images, 10, 16)).astype(np.float16)
    tokens[:, 3, :] += np.float16(300.0)  # a mean far above the spread
    head = rng.standard_normal((n_images, 400)).astype(np.float16)
    return {"conv": conv, "tokens": tokens, "head": head}


def test_extraction_on_cuda_equals_the_cpu_store_to_float32_rounding(tmp_path):
    from unitmatch.core.extract import ModelSpec, extract_to_store
    from unitmatch.core.store import ActivationStore
    from unitmatch.core.synthetic import generate_stimuli

    stimuli = generate_stimuli(n_categories=2, objects_per_category=2, variations=4, size=48)  # 16 images
    spec = ModelSpec("test_resnet", seed=0)
    stores = {}
    for device in ("cpu", "cuda"):
        report = extract_to_store(spec, stimuli, "stages", tmp_path / device, batch_size=8, dtype="float32",
                                  device=device)
        stores[device] = ActivationStore.open(report.store.path)
    # the policy is recorded: in the store's attributes and in each batch's record, with the device
    assert stores["cuda"].attrs.get("tf32") is False
    records = stores["cuda"].done_records()
    assert records and all(r.get("tf32") is False and str(r.get("device", "")).startswith("cuda")
                           for r in records.values()), records
    cpu, cuda = stores["cpu"].layers(), stores["cuda"].layers()
    assert list(cpu) == list(cuda) and len(cpu) >= 3
    for name in cpu:
        a, b = np.asarray(cpu[name][:]), np.asarray(cuda[name][:])
        scale = float(np.abs(a).max())
        assert np.abs(a - b).max() <= EXTRACT_RTOL * scale, (name, np.abs(a - b).max() / scale)


def test_ray_actors_given_a_gpu_run_on_cuda_and_actors_given_none_stay_on_cpu(ray_local, tmp_path):
    from unitmatch.sweep.extract import ZooExtraction

    if ray_local.cluster_resources().get("GPU", 0) < 1:
        pytest.fail("torch sees CUDA but the local Ray detected no GPU")
    placed = {}
    for gpus in (1, 0, None):  # None: sized for the machine (cluster=local): one actor a GPU, given it
        zoo = ZooExtraction(tmp_path, n_actors=1 if gpus is not None else None, num_gpus=gpus, num_cpus=1)
        try:
            zoo.start()
            placed[gpus] = ray_local.get(zoo.actors[0].where.remote())
            if gpus is None:
                assert zoo.plan.num_gpus == 1.0 and zoo.plan.n_actors == int(ray_local.cluster_resources()["GPU"])
        finally:
            zoo.shutdown()
    assert placed[1].endswith(":cuda") and placed[None].endswith(":cuda"), placed
    # Ray 2.60 leaves CUDA_VISIBLE_DEVICES set for actors that ask for no GPU: they must not use it
    assert placed[0].endswith(":cpu"), placed


def test_reduction_on_cluster_gpus_equals_the_threaded_cpu_reduction(ray_local, tmp_path):
    from ray.util.dask import RayDaskCallback

    from unitmatch.core.splits import brainscore_splits
    from unitmatch.core.store import ActivationStore, StoreKey
    from unitmatch.core.synthetic import plant_neurons
    from unitmatch.core.units import LayerUnits
    from unitmatch.sweep.reduce import match_store

    layers = _layers(seed=3, n_images=96)
    units = [LayerUnits("conv", (8, 5, 5), ("channel", "y", "x")), LayerUnits("tokens", (10, 16), ("token", "channel")),
             LayerUnits("head", (400,), ("channel",))]
    key = StoreKey(model="test@random:3", preprocessing={"size": 8}, stimuli="gpu", layers=tuple(layers))
    store = ActivationStore.create(tmp_path, key, units, [f"im{i:03d}" for i in range(96)], batch_size=32,
                                   unit_chunk=64)
    writer = store.writer()
    flat = {name: a.reshape(96, -1) for name, a in layers.items()}
    for b in range(store.n_batches):
        writer.write(b, {name: a[store.batch_rows(b)] for name, a in flat.items()})
    store.finalize()
    store = ActivationStore.open(store.path)
    x = np.concatenate(list(flat.values()), axis=1).astype(np.float32)
    y = plant_neurons(x, n_planted=8, n_noise=4, snr=4.0, seed=2).responses
    splits = brainscore_splits(n_images=96, n_splits=3, random_state=0, stratify=None)

    records = tmp_path / "blocks"
    records.mkdir()

    class RecordBlocks(RayDaskCallback):
        """Runs inside each Ray task: the GPU it was granted and the device of its engine."""

        def _ray_pretask(self, key, object_refs):
            import ray

            return [str(i) for i in ray.get_gpu_ids()]

        def _ray_posttask(self, key, result, pre_state):
            import json
            import sys

            if "block" in str(key):
                import os

                engines = sys.modules["unitmatch.sweep.reduce"]._ENGINES
                record = {"gpu_ids": pre_state, "devices": sorted({str(e.device) for e in engines.values()}),
                          "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}
                (records / f"{abs(hash(str(key)))}.json").write_text(json.dumps(record))

    expected = match_store(store, y, splits, scheduler="threads", block_units=128, device="cpu", n_permutations=3)
    with RecordBlocks():
        result = match_store(store, y, splits, scheduler="ray", block_units=128, gpus_per_task=0.25,
                             n_permutations=3)
    _same_reduction(result, expected)
    # the threaded scheduler with a cuda engine: each block task staged through pinned buffers in
    # pieces of whole chunks (sweep.reduce.process_staged: blocks of 128 units, 2 pieces of a 64-unit chunk)
    _same_reduction(match_store(store, y, splits, scheduler="threads", block_units=128, device="cuda",
                                n_permutations=3), expected)
    # every block ran in a Ray task granted a GPU, on a cuda engine
    import json

    seen = [json.loads(p.read_text()) for p in records.glob("*.json")]
    assert len(seen) == 2 + 2 + 4  # 200, 160 and 400 units in blocks of 128
    # on the granted GPU of the node's GPUs as the node lists them (Ray left CUDA_VISIBLE_DEVICES alone)
    import os

    from unitmatch.sweep.reduce import granted_cuda_index

    n = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    assert all(r["visible"] == visible for r in seen), (visible, seen)
    assert all(r["gpu_ids"] and r["devices"] == [f"cuda:{granted_cuda_index(r['gpu_ids'][0], visible, n)}"]
               for r in seen), seen


def _same_reduction(result, expected):
    """A reduction on the GPU against the CPU's: the float64 re-scored columns identical, the float32
    screening's to 1e-5, the null's units identical."""
    screening = ["topk_r", "second_r", "gap"]  # from the float32 screening: cuBLAS and the CPU round differently
    exact = [c for c in expected.matches.columns if c not in screening]
    key = ["neuron", "split"]
    got, want = (r.matches.sort_values(key).reset_index(drop=True) for r in (result, expected))
    pd.testing.assert_frame_equal(got[exact], want[exact])  # float64 re-scored: identical
    np.testing.assert_allclose(np.stack(got.topk_r), np.stack(want.topk_r), atol=1e-5)
    for column in ("second_r", "gap"):
        np.testing.assert_allclose(got[column], want[column], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(result.null.unit, expected.null.unit)
    np.testing.assert_allclose(result.null.test_r, expected.null.test_r, atol=1e-10)


@pytest.mark.parametrize("n_splits, n_permutations", [(1, 0), (10, 5)])
def test_resident_bytes_bound_what_an_engine_keeps_on_cuda(n_splits, n_permutations):
    """``MatchEngine.resident_bytes`` (the fraction of a GPU a Ray block task asks for) against what an
    engine on cuda keeps allocated after a float16 block, its scratch released."""
    import gc

    from unitmatch.core.engine import MatchEngine
    from unitmatch.core.splits import brainscore_splits
    from unitmatch.core.units import UnitBlock

    rng = np.random.default_rng(3)
    n_images = 600
    x = np.maximum(rng.standard_normal((n_images, 4000)), 0).astype(np.float16)
    y = rng.standard_normal((64, n_images))
    splits = brainscore_splits(n_images=n_images, n_splits=n_splits, stratify=None, random_state=0)
    for dtype in (torch.float32, torch.float16):  # cuBLAS's workspaces, allocated on a first GEMM, kept
        a = torch.ones((64, 64), dtype=dtype, device="cuda")
        (a @ a).sum().item()
    del a
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    engine = MatchEngine(y, splits, n_permutations=n_permutations, device="cuda")
    partial = engine.process(UnitBlock(x, "l", 0))
    del partial
    engine.release_scratch()
    gc.collect()
    kept = torch.cuda.memory_allocated() - before
    assert 0.5 * engine.resident_bytes() <= kept <= 1.1 * engine.resident_bytes(), (kept, engine.resident_bytes())


def test_the_gpu_memory_of_each_gpu_node_is_read_in_a_task_of_its_own(ray_local):
    """The local Ray's one node: its smallest GPU, read in a task of its own; the block tasks' fraction
    sized by it."""
    from unitmatch.sweep.cluster import gpu_memory_by_node

    from unitmatch.sweep.reduce import block_remote_args, gpus_per_block_task

    smallest = min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
    assert list(gpu_memory_by_node().values()) == [smallest]
    task = 6 * 2**30  # the block tasks' default fraction on this GPU
    assert block_remote_args(None, None, task)["num_gpus"] == gpus_per_block_task(task, smallest,
                                                                                  torch.cuda.device_count())
