"""Extraction on Ray: actor pool over a zoo, exact stores, recovery from a killed actor.

The reference is computed in this process with the actors' torch thread count: float32
convolutions sum in an order that depends on the number of intra-op threads (test_resnet's layer4.0
differs by up to 1.8e-7 between 1 and 2 threads), so with equal thread counts the stores must equal
the reference bit for bit.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from unitmatch.core.extract import ModelSpec, extract_activations
from unitmatch.core.synthetic import generate_stimuli

LAYERS = ["layer2", "layer4.0"]


@pytest.fixture(scope="module")
def stimuli():
    return generate_stimuli(n_categories=2, objects_per_category=4, variations=5, size=40)  # 40 images


@contextmanager
def _torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _reference(spec, stimuli, batch_size, threads):
    with _torch_threads(threads):  # on the CPU, as the actors (which ask for no GPU) run
        acts = extract_activations(spec.create(), stimuli, LAYERS, batch_size=batch_size, dtype=np.float32,
                                   device="cpu")
    return {k: v.reshape(len(stimuli), -1) for k, v in acts.items()}


def _actor_threads(ray, zoo) -> int:
    (threads,) = {ray.get(a.threads.remote()) for a in zoo.actors}
    return threads


def test_thread_count_changes_float32_sums_by_rounding_at_most(stimuli):
    """Why the references below run with the actors' thread count (a check of the premise): other
    threads may sum in another order, which moves float32 results by rounding, never by more."""
    spec = ModelSpec("test_resnet", seed=0)
    one, two = _reference(spec, stimuli, 8, threads=1), _reference(spec, stimuli, 8, threads=2)
    for name in LAYERS:
        assert np.abs(one[name] - two[name]).max() <= 1e-6 * np.abs(two[name]).max(), name


def test_zoo_on_two_actors_equals_direct_reference(ray_local, tmp_path, stimuli):
    from unitmatch.sweep.extract import ZooExtraction

    specs = [ModelSpec("test_resnet", seed=0), ModelSpec("test_resnet", seed=1)]
    # a decode worker in each actor, three writer threads, a codec of the caller's
    zoo = ZooExtraction(tmp_path, n_actors=2, num_cpus=1, batch_size=8, dtype="float32", shard_batches=1,
                        num_workers=1, writer_threads=3, codec="zstd:3")
    try:
        stores = zoo.run(specs, stimuli, LAYERS)
        hosts = {ray_local.get(a.where.remote()) for a in zoo.actors}
        threads = _actor_threads(ray_local, zoo)
    finally:
        zoo.shutdown()
    assert len(hosts) == 2  # two actor processes did the work
    written = [b for _, _, batches in zoo.log for b in batches]
    assert sorted(written) == sorted(list(range(5)) * 2)  # every batch of both models exactly once
    for spec in specs:
        store = stores[spec]
        assert store.complete and store.key["model"] == spec.identity() and store.key["codec"] == "zstd:3"
        assert store.verify().ok
        ref = _reference(spec, stimuli, 8, threads)
        for name, arr in store.layers().items():
            np.testing.assert_array_equal(np.asarray(arr[:]), ref[name])
    # a second run finds both stores complete and does no work
    again = ZooExtraction(tmp_path, n_actors=1, num_cpus=1, batch_size=8, dtype="float32", codec="zstd:3")
    try:
        again.run(specs, stimuli, LAYERS)
    finally:
        again.shutdown()
    assert again.log == [] and again.actors == []


def test_killed_actor_is_replaced_and_its_shard_redone(ray_local, tmp_path, stimuli):
    from unitmatch.sweep.extract import ZooExtraction

    spec = ModelSpec("test_resnet", seed=2)
    zoo = ZooExtraction(tmp_path, n_actors=2, num_cpus=1, batch_size=2, dtype="float32", shard_batches=2,
                        in_flight=1)
    result, errors = {}, []

    def run():
        try:
            result.update(zoo.run([spec], stimuli, LAYERS))
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 120
    done_dir = None
    while time.time() < deadline:
        stores = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
        if stores and len(list((stores[0] / "done").glob("b*"))) >= 2:
            done_dir = stores[0] / "done"
            break
        time.sleep(0.05)
    assert done_dir is not None, "extraction did not start"
    # killed at once: a call queued on the victim first (it runs after the victim's current work)
    # let the other actor finish every remaining item on a loaded machine, so the death went unseen
    victim = zoo.actors[0]
    ray_local.kill(victim)
    thread.join(timeout=300)
    assert not errors, errors
    store = result[spec]
    assert store.complete and victim not in zoo.actors
    threads = _actor_threads(ray_local, zoo)  # the replacement and the survivor agree
    ref = _reference(spec, stimuli, 2, threads)
    for name, arr in store.layers().items():
        np.testing.assert_array_equal(np.asarray(arr[:]), ref[name])
    reported = [b for _, _, batches in zoo.log for b in batches]
    assert len(reported) == len(set(reported))  # no finished batch was written twice by the survivors
    assert set(reported) <= set(range(20)) and store.done_batches() == set(range(20))


def test_bad_actor_options_are_named_before_any_actor_starts(tmp_path):
    from unitmatch.sweep.extract import ZooExtraction

    for kwargs, message in [({"writer_threads": 0}, "writer_threads must be a positive integer; got 0"),
                            ({"num_workers": -2}, "num_workers must be an integer >= 0; got -2"),
                            ({"n_actors": 0}, "n_actors must be a positive integer; got 0"),
                            ({"num_gpus": -1}, r"num_gpus must be a number >= 0 \(GPUs per actor\) or None"),
                            ({"codec": "gzip"}, r"codec='gzip' is not a store codec; valid: none, zstd")]:
        with pytest.raises(ValueError, match=message):
            ZooExtraction(tmp_path, **kwargs)


def test_actor_plan_sizes_the_actors_for_the_cluster_and_keeps_what_is_given():
    """``cluster=local`` leaves the actors to ``actor_plan``: a CPU machine keeps the laptop's plan
    (2 actors, decoding in the actor, 2 writer threads); a GPU machine gets one actor per GPU on it,
    with decode workers and writer threads from its share of the cores (a 16-core 1-GPU node:
    conf/cluster/ray.yaml's 4 and 8); values given are kept."""
    from unitmatch.sweep.extract import actor_plan

    cases = {
        # cluster resources, given (n_actors, num_gpus, num_workers, writer_threads) -> plan
        ((2, 0), (None, None, None, None)): (2, 0.0, 0, 2),
        ((16, 1), (None, None, None, None)): (1, 1.0, 4, 8),
        ((64, 4), (None, None, None, None)): (4, 1.0, 4, 8),
        ((8, 2), (None, None, None, None)): (2, 1.0, 1, 2),
        ((2, 1), (None, None, None, None)): (1, 1.0, 0, 2),
        ((16, 1), (None, 0, None, None)): (2, 0.0, 0, 2),  # GPUs there, not asked for: CPU actors
        ((16, 2), (3, 0.5, 2, 5)): (3, 0.5, 2, 5),
        ((16, 1), (1, None, 0, None)): (1, 1.0, 0, 8),
    }
    for ((cpus, gpus), given), plan in cases.items():
        assert actor_plan({"CPU": float(cpus), "GPU": float(gpus)}, *given) == plan, (cpus, gpus, given)
    assert actor_plan({"CPU": 2.0}) == (2, 0.0, 0, 2)  # no GPU key at all
