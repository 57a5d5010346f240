"""Extraction across a Ray cluster: a pool of extractor actors fills activation stores.

The driver first prepares every store (:func:`core.extract.prepare_store`: model and layers
validated, store created or found, nothing extracted). Work items are (model, shard of image
batches). Each actor holds the models it has loaded (one load per model per actor, placed on its
device once; a factory model is imported and built on the worker from its spec, so its code must
import there: a shared filesystem, or Ray's ``runtime_env``), runs :func:`core.extract.extract_to_store` on its shard (decode, forward, float16 on
the device, background writes of whole chunks), and reports the batches it wrote. The driver keeps
at most ``in_flight`` items per actor (backpressure), replaces an actor that dies and re-submits
its item (batches it had finished are skipped: their completion records exist), and marks each
store COMPLETE once every batch is written.

Actors run torch with the threads Ray gives them (``OMP_NUM_THREADS`` = their ``num_cpus``):
float32 convolutions sum in a thread-count-dependent order, so a store written with 1 thread can
differ from an extraction with 2 threads by float32 rounding (about 1e-7); :meth:`Extractor.threads`
says how many an actor uses.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import ray
from tqdm.auto import tqdm

from unitmatch.core._checks import check_count
from unitmatch.core.extract import DEFAULT_WRITER_THREADS, ModelSpec, extract_to_store, prepare_store
from unitmatch.core.stimuli import StimulusSet
from unitmatch.core.store import DEFAULT_CODEC, ActivationStore, parse_codec

from .cluster import ResourceRequest, check_requests, describe_wait

log = logging.getLogger(__name__)


def _log_to_stderr() -> None:
    """INFO lines of the library reach the actor's stderr, which Ray streams to the driver's log."""
    logger = logging.getLogger("unitmatch")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


@ray.remote
class Extractor:
    """Loads each model once and extracts shards of image batches into stores."""

    def __init__(self, root: str, batch_size: int, dtype: str, num_workers: int, writer_threads: int, codec: str):
        import torch

        _log_to_stderr()
        self.root, self.batch_size, self.dtype, self.num_workers = root, batch_size, dtype, num_workers
        self.writer_threads, self.codec = writer_threads, codec
        # an actor that asked for no GPU stays on cpu: Ray (>= 2.4x) no longer hides the node's GPUs from it
        self.device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.models: dict[ModelSpec, object] = {}

    def run(self, spec: ModelSpec, stimuli: StimulusSet, selection, batches: list[int]) -> list[int]:
        if spec not in self.models:
            self.models[spec] = spec.create().to(self.device)  # moved once, not per work item
        report = extract_to_store(spec, stimuli, selection, self.root, batch_size=self.batch_size, dtype=self.dtype,
                                  device=self.device, batches=batches, num_workers=self.num_workers,
                                  writer_threads=self.writer_threads, codec=self.codec, model=self.models[spec])
        return report.written

    def threads(self) -> int:
        """torch's intra-op threads in this actor."""
        import torch

        return torch.get_num_threads()

    def where(self) -> str:
        import os
        import socket

        return f"{socket.gethostname()}:{os.getpid()}:{self.device}"


#: an extraction actor on a GPU, where its share of the cores allows: image decoding workers and store
#: writer threads (an H200 node's 16 cores: 4 workers decoded 650-710 images/s, 8 threads wrote resnet50's
#: blocks faster than 16; benchmarks/RESULTS.md)
GPU_DECODE_WORKERS, GPU_WRITER_THREADS = 4, 8


class ActorPlan(NamedTuple):
    """A zoo extraction's actors: how many, and each one's GPUs, decode workers and writer threads."""

    n_actors: int
    num_gpus: float
    num_workers: int
    writer_threads: int


def actor_plan(cluster: dict, n_actors: int | None = None, num_gpus: float | None = None,
               num_workers: int | None = None, writer_threads: int | None = None) -> ActorPlan:
    """The :class:`ActorPlan` of a zoo extraction, each argument left None sized for ``cluster``
    (``ray.cluster_resources()``):

    - num_gpus: 1 where the cluster has a GPU, else 0;
    - n_actors: one per GPU where the actors ask for GPUs, else 2;
    - on GPU actors, with ``share`` = the cluster's CPUs per actor: num_workers ``min(4, share // 3)``
      and writer_threads ``min(8, max(2, share // 2))`` (a 16-core node with one GPU: 4 and 8, as
      conf/cluster/ray.yaml sets them; a 2-core machine: 0 and 2); on CPU actors, which share the
      cores with each other: 0 (decoding in the actor) and :data:`core.extract.DEFAULT_WRITER_THREADS`.
    """
    gpus = int(cluster.get("GPU", 0))
    if num_gpus is None:
        num_gpus = 1.0 if gpus >= 1 else 0.0
    if n_actors is None:
        n_actors = gpus if num_gpus and gpus else 2
    share = max(1, int(cluster.get("CPU", 1)) // n_actors)
    if num_workers is None:
        num_workers = min(GPU_DECODE_WORKERS, share // 3) if num_gpus else 0
    if writer_threads is None:
        writer_threads = (min(GPU_WRITER_THREADS, max(DEFAULT_WRITER_THREADS, share // 2)) if num_gpus
                          else DEFAULT_WRITER_THREADS)
    return ActorPlan(int(n_actors), float(num_gpus), int(num_workers), int(writer_threads))


@dataclass
class ZooExtraction:
    """Extract a zoo of models on a running Ray cluster (``ray.init`` first).

    Args:
        root: folder of stores (shared storage when the cluster has several nodes).
        n_actors: extractor actors (default: one per GPU, else 2).
        num_gpus, num_cpus, memory, resources: Ray resources per actor (num_gpus=1 pins each
            actor to a GPU; default: 1 where the cluster has GPUs, else 0; memory in bytes; custom
            resources by name). Checked against the
            cluster's nodes before any actor starts: a request no node can satisfy raises
            :class:`sweep.cluster.ClusterResourceError` at once; actors that fit but wait for a busy
            cluster are reported every ``wait_log_s``.
        batch_size, dtype, codec: the stores' (:func:`core.extract.prepare_store`).
        num_workers, writer_threads: each actor's image decoding workers and store writer threads
            (:func:`core.extract.extract_to_store`); default: sized by :func:`actor_plan` once the
            cluster is known (on GPUs up to 4 and 8, within the actor's share of the cores).
        shard_batches: image batches per work item.
        in_flight: work items queued per actor.
        max_retries: re-submissions of one work item after actor deaths.
        wait_log_s: how often to log what actors still waiting for resources wait for.
    """

    root: Path
    n_actors: int | None = None
    num_gpus: float | None = None
    num_cpus: float = 1
    batch_size: int = 32
    dtype: str = "float16"
    codec: str = DEFAULT_CODEC
    num_workers: int | None = None
    writer_threads: int | None = None
    shard_batches: int = 4
    in_flight: int = 2
    max_retries: int = 3
    memory: float = 0
    resources: dict = field(default_factory=dict)
    wait_log_s: float = 30.0
    actors: list = field(default_factory=list)
    #: (model identity, shard, batches written) for every finished work item
    log: list = field(default_factory=list)
    #: per actor, the reference that resolves once it is running
    _ready: list = field(default_factory=list, repr=False)
    #: what :meth:`start` sized for the cluster (:func:`actor_plan`); the arguments above stay as given
    plan: "ActorPlan | None" = field(default=None, init=False)

    def __post_init__(self):
        # checked here, not first in an actor: a bad value is named before any actor starts
        if self.n_actors is not None:
            check_count(self.n_actors, "n_actors", 1)
        if self.num_gpus is not None and (isinstance(self.num_gpus, bool) or not isinstance(self.num_gpus, (int, float))
                                          or self.num_gpus < 0):
            raise ValueError(f"num_gpus must be a number >= 0 (GPUs per actor) or None (1 where the cluster has "
                             f"GPUs); got {self.num_gpus!r}")
        if self.num_workers is not None:
            check_count(self.num_workers, "num_workers", 0)
        if self.writer_threads is not None:
            check_count(self.writer_threads, "writer_threads", 1)
        self.codec = parse_codec(self.codec)

    def _remote_args(self) -> dict:
        args = {"num_gpus": self.plan.num_gpus, "num_cpus": self.num_cpus}
        if self.memory:
            args["memory"] = self.memory
        if self.resources:
            args["resources"] = dict(self.resources)
        return args

    def request(self) -> ResourceRequest:
        """What one extractor actor asks the cluster for."""
        return ResourceRequest.from_remote_args("extraction actor", self._remote_args())

    def _start_actor(self):
        """A new actor and the reference that resolves once it is placed and built."""
        actor = Extractor.options(**self._remote_args()).remote(str(self.root), self.batch_size, self.dtype,
                                                                 self.plan.num_workers, self.plan.writer_threads,
                                                                 self.codec)
        return actor, actor.__ray_ready__.remote()

    def start(self) -> None:
        """Start the actors, after checking that a node can host one.

        Raises:
            ClusterResourceError: no node of the cluster has what one actor asks for.
        """
        self.plan = actor_plan(ray.cluster_resources(), self.n_actors, self.num_gpus, self.num_workers,
                               self.writer_threads)
        log.info("extraction: %d actor(s), each %g GPU, %d image decoding worker(s), %d store writer thread(s)",
                 *self.plan)
        check_requests(self.request())
        started = [self._start_actor() for _ in range(self.plan.n_actors)]
        self.actors, self._ready = [a for a, _ in started], [r for _, r in started]

    def run(self, specs: Sequence[ModelSpec], stimuli: StimulusSet, selection,
            stores: dict[ModelSpec, ActivationStore] | None = None) -> dict[ModelSpec, ActivationStore]:
        """Fill (or finish) the store of every model; returns the complete stores.

        ``stores`` are stores the caller already created for some of the specs (with these
        stimuli, layers, batch size and dtype); the others are created here, on the driver.

        Raises:
            ValueError: unknown model or layer, empty stimuli (before any actor works).
            RuntimeError: a work item failed more than ``max_retries`` times.
        """
        Path(self.root).mkdir(parents=True, exist_ok=True)
        prepared, stores, items = dict(stores or {}), {}, []
        for spec in specs:
            # creates (or finds) the store and validates model and layers on the driver, before any work
            store = prepared.get(spec) or prepare_store(spec, stimuli, selection, self.root,
                                                        batch_size=self.batch_size, dtype=self.dtype, codec=self.codec)
            stores[spec] = store
            pending = store.pending_batches()
            items += [(spec, pending[i:i + self.shard_batches]) for i in range(0, len(pending), self.shard_batches)]
        if items:
            self._dispatch(items, ray.put(stimuli), selection)
        out = {}
        for spec, store in stores.items():
            if not store.complete:
                store.finalize()
            out[spec] = ActivationStore.open(store.path)
        return out

    def _dispatch(self, items, stimuli_ref, selection) -> None:
        if not self.actors:
            self.start()
        queue = list(items)
        retries: dict[int, int] = {}
        running: dict = {}  # ObjectRef -> (actor index, item)
        load = [0] * len(self.actors)
        t0 = time.perf_counter()
        bar = tqdm(total=sum(len(item[1]) for item in items), desc="extracting", unit="batch")
        while queue or running:
            # work goes only to actors that are placed: an item queued on an actor that waits for
            # resources would wait with it while the others idle
            placed = self._placed()
            for a in placed:
                while queue and load[a] < self.in_flight:
                    item = queue.pop(0)
                    ref = self.actors[a].run.remote(item[0], stimuli_ref, selection, item[1])
                    running[ref] = (a, item)
                    load[a] += 1
            starting = [r for a, r in enumerate(self._ready) if a not in placed]
            done, _ = ray.wait(list(running) + starting, num_returns=1, timeout=self.wait_log_s)
            if not done:
                self._report_waiting()
                continue
            ref = done[0]
            if ref not in running:  # an actor is up: give it work
                continue
            a, item = running.pop(ref)
            load[a] -= 1
            try:
                written = ray.get(ref)
                self.log.append((item[0].identity(), item[1], written))
                bar.update(len(item[1]))
            except ray.exceptions.RayActorError:
                key = id(item)
                retries[key] = retries.get(key, 0) + 1
                if retries[key] > self.max_retries:
                    raise RuntimeError(f"work item {item[0].name} batches {item[1]} failed {retries[key]} times")
                log.warning("extractor %d died; restarting it and re-submitting batches %s", a, item[1])
                self._replace(a, running, queue, load)
                queue.insert(0, item)
        bar.close()
        log.info("extracted %d work items in %.1f s", len(items), time.perf_counter() - t0)

    def _placed(self) -> set[int]:
        """Indices of the actors that are running (or died starting: their work fails and is redone)."""
        ready, _ = ray.wait(self._ready, num_returns=len(self._ready), timeout=0)
        ready = set(ready)
        return {a for a, r in enumerate(self._ready) if r in ready}

    def _report_waiting(self) -> None:
        """Log what the actors that are not placed yet wait for (nothing when all are running)."""
        _, pending = ray.wait(self._ready, num_returns=len(self._ready), timeout=0)
        if not pending:
            return
        message = describe_wait(self.request(), len(pending), len(self.actors))
        log.info("%s", message or f"{len(pending)} of {len(self.actors)} extraction actors are still starting")

    def _replace(self, a: int, running: dict, queue: list, load: list) -> None:
        """Start a new actor in slot a; items still queued on the dead one go back to the queue."""
        for ref, (slot, item) in list(running.items()):
            if slot == a:
                running.pop(ref)
                queue.insert(0, item)
        load[a] = 0
        self.actors[a], self._ready[a] = self._start_actor()

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors, self._ready = [], []
