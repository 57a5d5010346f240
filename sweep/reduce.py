"""The matching reduction over an activation store, as a Dask graph.

One task per block of units reads its slice ``arr[:, start:stop]`` of one layer's Zarr array (images
x units; a :class:`core.integrity.CheckedArray`, so each chunk it reads is checked against the
digest recorded when it was written, and damage raises an error naming store, layer and chunk) and
returns ``engine.process(block)`` (on a GPU, of the block's pieces staged through pinned buffers:
:func:`process_staged`), a :class:`core.engine.MatchPartial`; a tree of merge tasks
(fan-in 2..8) folds the partials with :func:`core.engine.merge`; the driver then runs
:meth:`core.engine.MatchEngine.finalize` with the float64 re-scoring, reading only the candidate
columns from the store again. Partials merge associatively and commutatively (ties go to the lower
unit id), so the answer does not depend on the scheduler, the block size or the shape of the tree,
and equals :func:`core.engine.run_matching` on the same activations with the same blocks.

Schedulers: ``"threads"`` (Dask's threaded scheduler), ``"sync"`` (one thread, for debugging) and
``"ray"`` (Dask-on-Ray, :func:`ray.util.dask.ray_dask_get`, on the cluster that ``ray.init`` joined).

The graph is made of ``dask.delayed`` calls (no ``dask.array``): every block task opens nothing and
copies nothing but its own slice, so there is no ``inline_array`` question with Zarr 3 under
Dask-on-Ray, and each task's unit range is exactly one run of whole Zarr chunks.

GPUs on a Ray cluster: block tasks ask for a fraction of a GPU (``gpus_per_task``, so several
blocks share one; by default as many as its memory holds, :func:`block_remote_args`) and run their
products on cuda only when Ray granted them one, on that GPU (Ray reuses a worker process for tasks
granted different GPUs: the tasks see every GPU of their node and pick theirs,
:func:`task_device`); a task that asked for none runs on cpu. Requests are checked against the
cluster's nodes before anything is submitted (:mod:`sweep.cluster`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import sys
import threading
import uuid
from collections import OrderedDict
from typing import Sequence

import numpy as np

from unitmatch.core.engine import (STAGING_BUFFERS, MatchEngine, MatchPartial, MatchResult, MatchSettings,
                                   default_block_units, default_device, merge_all, staged_blocks)
from unitmatch.core._checks import check_count
from unitmatch.core.integrity import MAX_READ_THREADS, CheckedArray, usable_cores
from unitmatch.core.units import UnitBlock, check_layer_subset, gather_columns, range_blocks, whole_chunks

from .cluster import NOSET_CUDA_ENV  # block tasks ask for it (block_remote_args) and use the grant (task_device)

log = logging.getLogger(__name__)

SCHEDULERS = ("threads", "sync", "ray")
#: default fan-in of the merge tree
DEFAULT_FAN_IN = 4
#: fraction of a GPU a block task asks for when the cluster has GPUs: four blocks share one
DEFAULT_GPUS_PER_TASK = 0.25
#: pieces a block task on a GPU reads, copies and scores its block in (:func:`process_staged`)
GPU_PIECES = 4
#: a Ray worker's own memory on a GPU before it holds anything (CUDA context, library workspaces): an
#: allowance, not measured in this project
CUDA_PROCESS_BYTES = 1 << 30
#: of a GPU's memory, what the block tasks Ray runs on it at once may fill (:func:`gpus_per_block_task`)
GPU_MEMORY_SHARE = 0.9
#: {"visible": CUDA_VISIBLE_DEVICES} when this process first ran a block task on CUDA without NOSET_CUDA_ENV
_FIRST_CUDA_USE: dict = {}


# ------------------------------------------------------------------------------------- planning
def aligned_block_units(store, block_units: int) -> int:
    """``block_units`` rounded down to a multiple of the store's unit chunk (at least one chunk).

    Raises:
        ValueError: ``block_units`` is not a positive integer.
    """
    check_count(block_units, "block_units", 1)
    chunk = store.unit_chunk
    aligned = whole_chunks(int(block_units), chunk)
    if aligned != block_units:
        log.warning("block_units=%d is not a multiple of the store's unit chunk (%d): using %d", block_units, chunk,
                    aligned)
    return aligned


def block_plan(store, block_units: int, layers: Sequence[str] | None = None) -> list[tuple[str, int, int]]:
    """The blocks one reduction reads: ``(layer, start, stop)`` in that layer's (flat) units.

    Layers in catalogue order (only ``layers`` when given), each cut from unit 0 into runs of
    ``block_units`` (rounded as in :func:`aligned_block_units`); a block never spans two layers.
    Its length is the number of block tasks.

    Raises:
        ValueError: a name in ``layers`` that is not a layer of the store (the layers are listed).
    """
    size = aligned_block_units(store, block_units)
    if layers is not None:
        layers = check_layer_subset(layers, [layer.name for layer in store.catalogue().layers],
                                    f"the store {store.path} has")
    plan = []
    for layer in store.catalogue().layers:
        if layers is not None and layer.name not in layers:
            continue
        for start in range(0, layer.size, size):
            plan.append((layer.name, start, min(start + size, layer.size)))
    return plan


# ------------------------------------------------------------------------------------ the engine
#: engines by (content key, device), in the driver and in each worker process: the sweep matches
#: the same neurons (one engine per region) against model after model, and building an engine with
#: the default permutation null (256 neurons x 100 permutations x 10 splits) takes about 6 s on
#: the 2-core VM, in the driver and again in every worker (benchmarks/RESULTS.md)
_ENGINES: "OrderedDict[tuple[str, str], MatchEngine]" = OrderedDict()
_ENGINES_LOCK = threading.Lock()
_ENGINES_KEEP = 2


def engine_key(responses: np.ndarray, splits, settings: MatchSettings) -> str:
    """What an engine is built from, as a digest: the responses' values and shape, each split's
    train and test images, and every setting but the device (the cache keys on the device apart)."""
    h = hashlib.blake2b(digest_size=20)
    y = np.ascontiguousarray(responses, dtype=np.float64)
    h.update(repr(y.shape).encode())
    h.update(y.tobytes())
    for train, test in splits:
        for images in (train, test):
            images = np.ascontiguousarray(images, dtype=np.int64)
            h.update(repr(images.shape).encode())
            h.update(images.tobytes())
    h.update(repr(dataclasses.replace(settings, device=None)).encode())
    return h.hexdigest()


def cached_engine(key: str, device: str, build) -> MatchEngine:
    """The engine cached under (key, device), built by ``build()`` when absent (the least recently
    used beyond ``_ENGINES_KEEP`` is dropped)."""
    with _ENGINES_LOCK:
        engine = _ENGINES.get((key, device))
        if engine is None:
            engine = build()
            _ENGINES[(key, device)] = engine
            while len(_ENGINES) > _ENGINES_KEEP:
                _ENGINES.popitem(last=False)
        else:
            _ENGINES.move_to_end((key, device))
    return engine


def task_device() -> str:
    """The torch device of a block task running as a Ray task: the GPU Ray granted it, nothing else.

    ``"cuda:<i>"`` only when Ray granted this task a GPU (``ray.get_gpu_ids()``) and torch sees
    CUDA; ``"cpu"`` otherwise. Since Ray 2.4x leaves CUDA_VISIBLE_DEVICES alone for tasks that ask
    for no GPU, ``torch.cuda.is_available()`` alone would put every such task on cuda:0 of its
    node, unseen by Ray's scheduler.

    Ray reuses a worker process for block tasks granted different GPUs of a node, and the CUDA
    runtime reads CUDA_VISIBLE_DEVICES once, when a process first touches CUDA: had Ray set it per
    task, a worker would go on computing on the GPU of its first task whatever the next grant (seen
    with Ray 2.60: one worker ran tasks granted GPUs 0 and 1). So the block tasks ask Ray to leave
    it alone (:data:`NOSET_CUDA_ENV` in their ``runtime_env``, :func:`block_remote_args`): each
    sees every GPU of its node and computes on the one it was granted, its position in the node's
    CUDA_VISIBLE_DEVICES (:func:`granted_cuda_index`).

    Raises:
        RuntimeError: Ray set CUDA_VISIBLE_DEVICES for this task (its ``runtime_env`` lacks
            :data:`NOSET_CUDA_ENV`) and this process's CUDA was first used with another value: it
            cannot reach the granted GPU.
    """
    import os

    import ray
    import torch

    granted = ray.get_gpu_ids()
    if not granted:
        return "cpu"
    if len(granted) > 1:  # a block task asks for at most one GPU; Ray lists all where its ids fit no GPU seen
        raise RuntimeError(f"Ray lists GPUs {granted} for this block task, which asked for one at most: the node's "
                           f"GPU resource does not match its CUDA_VISIBLE_DEVICES "
                           f"({os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    if not torch.cuda.is_available():
        log.debug("Ray granted GPU %s but torch sees no CUDA (a logical GPU): the block runs on cpu", granted)
        return "cpu"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if os.environ.get(NOSET_CUDA_ENV, "").lower() in ("1", "true"):
        return f"cuda:{granted_cuda_index(granted[0], visible, torch.cuda.device_count())}"
    first = _FIRST_CUDA_USE.setdefault("visible", visible)
    if first != visible:
        raise RuntimeError(
            f"Ray granted this block task GPU {granted[0]} (CUDA_VISIBLE_DEVICES={visible!r}), but this worker "
            f"process first used CUDA with CUDA_VISIBLE_DEVICES={first!r}, which CUDA does not "
            f"read again: its products would run on another task's GPU. Give the block tasks "
            f"runtime_env={{'env_vars': {{'{NOSET_CUDA_ENV}': '1'}}}} (sweep.reduce.block_remote_args does)")
    return "cuda:0"


def granted_cuda_index(granted, visible: str | None, n_devices: int) -> int:
    """The torch index of the GPU Ray granted (an id of ``ray.get_gpu_ids()``) in a process that sees
    its node's GPUs as CUDA_VISIBLE_DEVICES ``visible`` lists them (``None``: all, in order): Ray's
    ids are the node's visible ids (``"4"`` of ``"4,5,6,7"`` is cuda:0), or slot numbers when the
    node sets none.

    Raises:
        RuntimeError: the id is not among the visible devices, or past the ``n_devices`` torch sees.
    """
    ids = None if visible is None else [v.strip() for v in visible.split(",") if v.strip()]
    if ids is None:
        index = int(granted) if str(granted).isdigit() else -1
    else:
        index = ids.index(str(granted)) if str(granted) in ids else -1
    if not 0 <= index < n_devices:
        raise RuntimeError(f"Ray granted GPU {granted!r}, which is not one of the {n_devices} CUDA devices this "
                           f"process sees (CUDA_VISIBLE_DEVICES={visible!r})")
    return index


class _EngineHandle:
    """The engine as the tasks see it: shipped once per graph, built at most once per process.

    In the driver's process (threads, sync) it is the driver's engine itself. Pickled (Ray) it
    carries the engine's constructor arguments, not its tensors, and a worker builds the engine
    once per process and device, on the device Ray granted the task (:func:`task_device`),
    whatever the driver had (a cuda engine could not be unpickled on a CPU-only worker). The
    construction is deterministic (seeded permutations), so every process holds the same
    neurons, splits and permutations.
    """

    def __init__(self, engine: MatchEngine, responses: np.ndarray, splits, options: dict, key: str = "",
                 read_threads: int | None = None):
        self.token = uuid.uuid4().hex  # this graph's task keys
        self.key = key  # the engine's content (:func:`engine_key`): workers reuse an engine across graphs
        self.responses, self.splits, self.options = responses, splits, options
        #: read threads of a block task on a GPU under a local scheduler (:func:`local_gpu_threads`);
        #: None: a Ray task's (:func:`block_read_threads`: the CPUs Ray gave it)
        self.read_threads = read_threads
        self._engine = engine

    def __getstate__(self):
        return {"token": self.token, "key": self.key, "responses": self.responses, "splits": self.splits,
                "options": self.options, "read_threads": None}  # a Ray task reads on the CPUs Ray gave it

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._engine = None

    def get(self) -> MatchEngine:
        if self._engine is not None:
            return self._engine
        device = task_device()
        if device.startswith("cuda"):  # a worker keeps an engine on one GPU at most (it may be granted another)
            with _ENGINES_LOCK:
                for cached in [k for k in _ENGINES if k[1].startswith("cuda") and k[1] != device]:
                    del _ENGINES[cached]
        return cached_engine(self.key or self.token, device, lambda: MatchEngine(
            self.responses, self.splits, dataclasses.replace(self.options, device=device)))


# ------------------------------------------------------------------------------------- the tasks
def _process_block(handle: _EngineHandle, array, layer: str, start: int, stop: int, first_unit: int) -> MatchPartial:
    """Read one block's whole chunks from Zarr and score it.

    On a GPU the read is the host's whole share of a block task: the block goes through pinned
    staging buffers in pieces (a checked store's read straight into them, its chunks on several
    threads: :func:`block_read_threads`), each piece's host-to-device copy and products
    overlapping the next piece's read (:func:`process_staged`). A Ray task then gives its scratch
    back to the GPU (an idle worker process would hold a block's working set, 4 GB with a null:
    :meth:`core.engine.MatchEngine.scratch_bytes`); a local scheduler's threads keep theirs until
    the reduction ends. On the CPU the tasks' products keep the cores busy and each task reads its
    block on its own thread.
    """
    engine = handle.get()
    if engine.device.type == "cuda":
        import torch

        ray_task = handle.read_threads is None  # (a local scheduler's thread keeps its scratch until the end)
        # a Ray task's engine is on the GPU granted (cuda:<i>): the streams and kernels made here go there
        on = torch.cuda.device(engine.device) if engine.device.index is not None else contextlib.nullcontext()
        try:
            with on:
                return process_staged(engine, array, layer, first_unit, start, stop,
                                      block_read_threads() if ray_task else handle.read_threads)
        finally:
            if ray_task:  # the worker idles between tasks: its block's scratch goes back to the GPU
                engine.release_scratch()
                torch.cuda.empty_cache()
    if isinstance(array, CheckedArray):
        data = array.read_units(start, stop, 1)
    else:
        data = np.asarray(array[:, start:stop])
    return engine.process(UnitBlock(data, layer, first_unit))


def process_staged(engine: MatchEngine, array, layer: str, first_unit: int, start: int, stop: int,
                   read_threads: int = 1, pieces: int | None = None) -> MatchPartial:
    """The units ``start..stop`` of one layer's (images, units) array, scored as
    :func:`core.engine.run_matching` streams a store on a GPU: in at most ``pieces`` pieces (default
    :data:`GPU_PIECES`), each a whole number of the array's unit chunks (whole chunks where ``start``
    is on a chunk boundary, as a block plan's are), and through :func:`core.engine.staged_blocks`:
    a checked store's piece is read straight into a staging slot's host buffer (pinned on CUDA) on
    ``read_threads`` threads, other arrays' are read and copied there, and the piece goes to the
    engine's device on a copy stream while the piece before is scored. The partial equals
    ``engine.process`` of the whole run of units (merged: :func:`core.engine.merge`). The ring
    holds at most ``min(3, pieces)`` pieces of host (and device) memory, kept by torch's caches for
    the next task.
    """
    from contextlib import closing

    pieces = check_count(GPU_PIECES if pieces is None else pieces, "pieces", 1)
    chunks = getattr(array, "chunks", None)
    chunk = int(chunks[1]) if (isinstance(chunks, tuple) and len(chunks) == 2
                               and isinstance(chunks[1], (int, np.integer))) else 1
    width, slots = _piece_plan(stop - start, chunk, pieces)
    blocks = range_blocks(array, layer, first_unit, start, stop, width, read_threads, deferred=True)
    # closed on the way out, also when a piece fails: the staging thread and its buffers end with the call
    with closing(staged_blocks(blocks, engine.device, n_buffers=max(2, slots))) as staged:
        return engine.process_blocks(staged, overlap=False)


def _piece_plan(n_units: int, chunk: int, pieces: int = GPU_PIECES) -> tuple[int, int]:
    """``(units a piece, staging slots it fills)`` when ``n_units`` are cut into at most ``pieces``
    pieces, each of whole chunks of ``chunk`` units: :func:`process_staged`'s pieces, and the ring
    :func:`local_gpu_threads` counts."""
    width = -(-max(1, -(-n_units // pieces)) // chunk) * chunk
    return width, min(STAGING_BUFFERS, max(1, -(-n_units // width)))


def block_working_set(engine: MatchEngine, block_units: int, chunk: int, itemsize: int) -> int:
    """Bytes a block task of ``block_units`` (a multiple of ``chunk``) holds on a GPU while it runs:
    a piece's scratch on the engine's path (:meth:`core.engine.MatchEngine.scratch_bytes`) and its
    staging ring of pieces as stored (``itemsize`` bytes a value)."""
    piece, slots = _piece_plan(block_units, chunk)
    return engine.scratch_bytes(piece) + slots * piece * engine.n_images * itemsize


def gpus_per_block_task(task_bytes: int, gpu_bytes: int, gpus_on_node: int = 1) -> float:
    """The fraction of a GPU of ``gpu_bytes`` that each Ray block task of ``task_bytes`` asks for, on a
    node of ``gpus_on_node`` such GPUs: ``1/k`` (rounded down to Ray's 0.0001) for the most ``k``
    tasks that fit in :data:`GPU_MEMORY_SHARE` of it, and at least :data:`DEFAULT_GPUS_PER_TASK`
    (more tasks at once on one GPU only queue behind each other's kernels).

    Each of the ``k`` tasks also brings a worker that keeps a CUDA context
    (:data:`CUDA_PROCESS_BYTES`) on every GPU of the node it was ever granted: Ray gives a worker
    tasks on any of them, and a context stays until its process ends. So a GPU may hold ``k`` x
    ``gpus_on_node`` contexts. A task larger than the share asks for a whole GPU, with a warning.
    """
    k = int(GPU_MEMORY_SHARE * gpu_bytes // max(1, task_bytes + gpus_on_node * CUDA_PROCESS_BYTES))
    if k < 1:
        log.warning("a reduction block task holds about %.1f GiB on a GPU, and its worker a CUDA context on each of "
                    "the node's %d GPU(s): more than %.0f%% of the smallest GPU (%.1f GiB). It asks for a whole GPU "
                    "and may still run out of memory; lower compute.block_units", task_bytes / 2**30, gpus_on_node,
                    100 * GPU_MEMORY_SHARE, gpu_bytes / 2**30)
        return 1.0
    return max(DEFAULT_GPUS_PER_TASK, math.floor(10_000 / k) / 10_000)


def local_gpu_threads(engine: MatchEngine, block_units: int, chunk: int, itemsize: int,
                      num_workers: int | None = None, max_tasks: int | None = None) -> tuple[int, int]:
    """``(block tasks at once, read threads a task)`` for a local scheduler whose engine is on a GPU.

    A Dask thread that has run a block task keeps a piece's working set on the device until the
    reduction ends (the engine's per-thread scratch, :meth:`core.engine.MatchEngine.scratch_bytes`:
    256 neurons with the default 100 permutations and 10 splits make it 3.9 GB for a 16,384-unit
    piece of 3200 images), beside the task's staging ring (up to 3 pieces as stored). As many tasks
    run at once as fit in half the device's memory, or in what is free if that is less (the
    caching allocator's unused blocks counted free), at most one a core and ``max_tasks``; the cores
    left over read each task's chunks (:func:`process_staged`; at most
    :data:`core.integrity.MAX_READ_THREADS` a task). A given ``num_workers`` is kept, with a
    warning where it does not fit.
    """
    import torch

    free, total = torch.cuda.mem_get_info(engine.device)
    budget = min(total // 2, free + torch.cuda.memory_reserved(engine.device)
                 - torch.cuda.memory_allocated(engine.device))
    piece = _piece_plan(block_units, chunk)[0]
    per_task = block_working_set(engine, block_units, chunk, itemsize)
    fit = max(1, budget // per_task)
    cores = usable_cores()
    if num_workers is None:
        workers = max(1, min(cores, fit, max_tasks or cores))
    else:
        workers = check_count(num_workers, "num_workers", 1)
        if workers > fit:
            log.warning("num_workers=%d block tasks on %s hold %.1f GiB of working sets (%.2f GiB each: pieces of %d "
                        "units x %d neuron rows), more than the %.1f GiB this reduction may use (half the device, "
                        "or what is free): fewer workers, or smaller blocks (compute.block_units), if it runs out of "
                        "memory", workers, engine.device, workers * per_task / 2**30, per_task / 2**30, piece,
                        engine.n_rows, budget / 2**30)
    return workers, max(1, min(MAX_READ_THREADS, cores // workers))


def block_read_threads() -> int:
    """Read threads of a block task whose products run on a GPU: in a Ray task, the CPUs Ray assigned
    it (``cluster.cpus_per_reduce_task``; Ray's default is 1), within the process's CPU affinity and
    :data:`core.integrity.MAX_READ_THREADS`; elsewhere 1 (a local scheduler runs a block task a
    core already, each reading its own block)."""
    ray = sys.modules.get("ray")  # not imported: not a Ray task
    try:
        if ray is None or not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
            return 1
        cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
    except Exception:  # noqa: BLE001 - an older Ray without these calls: one thread
        return 1
    return max(1, min(cpus, usable_cores(), MAX_READ_THREADS))


def _identity(x):
    return x


def _merge_group(*partials: MatchPartial) -> MatchPartial:
    return merge_all(partials)


def build_graph(handle: _EngineHandle, store, plan: Sequence[tuple[str, int, int]], fan_in: int = DEFAULT_FAN_IN,
                block_remote_args: dict | None = None):
    """The reduction as a :class:`dask.delayed.Delayed` graph: its HighLevelGraph and root key.

    Built with Dask's public API only: ``dask.delayed`` for every task, ``dask.annotate`` for the
    Ray options of the block tasks. The engine handle and each layer's Zarr array are one task
    each (an identity), so Dask-on-Ray puts each in the object store once and every block task
    receives a reference; then one task per block of ``plan`` (annotated with
    ``ray_remote_args=block_remote_args`` when given, e.g. ``{"num_gpus": 0.25}``: the other tasks
    keep Ray's defaults); then the merge tree, ``fan_in`` partials per merge task.
    """
    import dask

    if isinstance(fan_in, bool) or not isinstance(fan_in, (int, np.integer)) or not 2 <= fan_in <= 8:
        raise ValueError(f"fan_in must be an integer in 2..8; got {fan_in!r}")
    if not plan:
        raise ValueError("the block plan is empty: the store has no units")
    tok = handle.token[:12]
    catalogue = store.catalogue()
    task = dask.delayed(pure=False)  # keys are named here, never derived from hashing the arguments
    engine = task(_identity)(handle, dask_key_name=f"unitmatch-engine-{tok}")
    arrays = {name: task(_identity)(array, dask_key_name=(f"unitmatch-array-{tok}", i))
              for i, (name, array) in enumerate(store.layers().items())}
    annotate = (dask.annotate(ray_remote_args=dict(block_remote_args)) if block_remote_args
                else contextlib.nullcontext())
    with annotate:
        level = [task(_process_block)(engine, arrays[layer], layer, start, stop, catalogue.offset(layer) + start,
                                      dask_key_name=(f"unitmatch-block-{tok}", i))
                 for i, (layer, start, stop) in enumerate(plan)]
    depth = 0
    while len(level) > 1:
        level = [task(_merge_group)(*level[g:g + fan_in], dask_key_name=(f"unitmatch-merge{depth}-{tok}", g // fan_in))
                 for g in range(0, len(level), fan_in)]
        depth += 1
    return level[0].__dask_graph__(), level[0].key


# ----------------------------------------------------------------------------------- public API
def match_assembly(store, assembly, splits, settings: MatchSettings | None = None, *,
                   region_layers: dict | None = None, flags=None, **kwargs) -> MatchResult:
    """:func:`match_store` of the neurons :func:`core.analysis.analyze` analyses, in its search.

    The flagged neurons that cannot be matched are left out (:func:`core.analysis.analysable`);
    with ``region_layers`` each region's neurons are reduced over the blocks of their layers only
    (:func:`core.analysis.match_by_region`: one reduction per region). Pass the result to
    ``core.analyze(..., result=result, region_layers=region_layers)``.

    Args:
        region_layers: ``{region: [layer names, globs, "re:" regexes]}`` (``analysis.region_layers``);
            None: every unit.
        flags: :func:`core.analysis.screen_neurons` of the assembly, screened (and reported) by the
            caller once for several models (pass them on to ``core.analyze``); None: screened here.
        kwargs: as for :func:`match_store`.
    """
    from unitmatch.core.analysis import analysable, match_by_region, resolve_region_layers

    analysed = analysable(assembly, flags, splits=splits, report=flags is None)
    committed = resolve_region_layers(region_layers, store.catalogue(), analysed.regions,
                                      key="analysis.region_layers")

    def one(responses, ids, layers):
        return match_store(store, responses, splits, settings, neuron_ids=ids, layers=layers, **kwargs)

    return match_by_region(one, analysed.mean_responses(), analysed.neuron_ids, analysed.regions, committed)


def match_store(store, responses, splits, settings: MatchSettings | None = None, *,
                neuron_ids: Sequence[str] | None = None, layers: Sequence[str] | None = None,
                scheduler: str = "threads", progress: bool = False,
                fan_in: int = DEFAULT_FAN_IN, num_workers: int | None = None, gpus_per_task: float | None = None,
                ray_remote_args: dict | None = None, wait_log_s: float = 30.0, **overrides) -> MatchResult:
    """Match every neuron to its best unit over a complete activation store, as a Dask graph.

    One task per block of units (see :func:`block_plan`): it reads its slice of one layer's Zarr
    array and returns ``engine.process(UnitBlock(...))`` (on a GPU, of its pieces:
    :func:`process_staged`); a tree of :func:`core.engine.merge` tasks (``fan_in`` partials per
    task) reduces the partials; then, in the driver,
    ``engine.finalize(..., columns=...)`` re-scores each neuron's near-best candidates in float64
    from the store. The result equals :func:`core.engine.run_matching` on the same activations with
    the same ``block_units``, for every scheduler and fan-in.

    Args:
        store: a complete :class:`core.store.ActivationStore` (``ActivationStore.open(path)``).
        responses: (neurons, images) mean responses, images in the store's order.
        splits: (train_idx, test_idx) pairs of image positions.
        settings: :class:`core.engine.MatchSettings` (keyword overrides of its fields are applied on
            top); ``result.null`` holds the permutation null when ``n_permutations`` > 0. Its
            ``device`` and ``block_units`` act here as follows.
        neuron_ids: names for the neuron column.
        layers: reduce only the blocks of these layers of the store (unit ids stay the store's);
            None: every layer.
        scheduler: ``"threads"`` (Dask's threaded scheduler), ``"sync"`` (single-threaded, for
            debugging) or ``"ray"`` (Dask-on-Ray on the cluster ``ray.init`` joined; the tasks run
            as Ray tasks, the finalize in the driver).
        settings.device: torch device of the driver's engine: the blocks of the local schedulers
            and the finalize (``None``: cuda when this process sees a GPU, else cpu). Ray block
            tasks ignore it: each runs where Ray put it, on cuda only if Ray granted it a GPU
            (:func:`task_device`).
        settings.block_units: units per block task: a multiple of the store's unit chunk (other values are
            rounded down to one, at least one chunk, with a warning). Default: the largest multiple
            not above :func:`core.engine.default_block_units` for these images and neuron rows.
        progress: a ``dask.diagnostics.ProgressBar`` for the local schedulers (with ``"ray"`` only
            the task count is logged).
        fan_in: partials merged per merge task (2..8).
        num_workers: threads of the local threaded scheduler, or submitting threads for ``"ray"``
            (Dask's default when ``None``; with the engine on this process's GPU, as many block
            tasks as half its memory holds, at most one a core: :func:`local_gpu_threads`, which
            then sets Dask's ``num_workers`` whatever ``dask.config`` says).
        gpus_per_task: with ``"ray"``, the fraction of a GPU each block task requests (0..1;
            e.g. 0.25: four blocks share a GPU). ``None``: as many tasks a GPU as the cluster's
            smallest GPU holds, at most four (:func:`block_remote_args`), when the cluster has
            GPUs, else 0. 0: block tasks run on CPU even on GPU nodes.
        ray_remote_args: further Ray options of the block tasks only (e.g. ``{"num_cpus": 2}`` or
            custom ``resources``); GPUs are asked with ``gpus_per_task``.
        wait_log_s: with ``"ray"``, how often to log that block tasks wait for resources while
            the cluster has none free for them.

    Resources (``"ray"``): before submitting, the block tasks' request (1 CPU unless
    ``ray_remote_args`` says otherwise, plus ``gpus_per_task``) and the merge tasks' (1 CPU) are
    checked against the cluster's nodes: a request no node can satisfy raises
    :class:`sweep.cluster.ClusterResourceError` at once instead of waiting forever. A request
    that fits but finds the cluster busy (e.g. extraction actors still hold the GPUs or CPUs)
    waits, and says so every ``wait_log_s``; the sweep releases its extractors before the
    reduction, so the two never wait on each other.

    Raises:
        ValueError: unknown scheduler, responses whose image count differs from the store's, bad
            ``block_units``, ``fan_in`` or ``gpus_per_task``.
        RuntimeError: ``scheduler="ray"`` while Ray is not initialized.
        sweep.cluster.ClusterResourceError: block or merge tasks that no node can run.
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; use one of {SCHEDULERS}")
    block_args = None
    if scheduler == "ray":
        import ray

        if not ray.is_initialized():
            raise RuntimeError(
                "scheduler='ray' needs a running Ray: call ray.init(...) (address='auto' to join a cluster, "
                "address='local' for a private one) before match_store, or use scheduler='threads'"
            )
        block_remote_args(gpus_per_task if gpus_per_task is not None else 0, ray_remote_args)  # checked first
    options = MatchSettings.resolve(settings, **overrides)
    block_units = options.block_units
    splits = list(splits)  # read twice below (a generator, e.g. scikit-learn's ShuffleSplit.split, once)
    key = engine_key(responses, splits, options)
    engine = cached_engine(key, str(default_device(options.device)), lambda: MatchEngine(responses, splits, options))
    if engine.n_images != store.n_images:
        raise ValueError(f"responses have {engine.n_images} images but the store {store.path} has {store.n_images}")
    if block_units is None:
        block_units = whole_chunks(default_block_units(engine.n_images, engine.n_rows), store.unit_chunk)
    plan = block_plan(store, block_units, layers)
    block_units = whole_chunks(block_units, store.unit_chunk)  # as the plan cuts them (it warns where it rounds)
    if scheduler == "ray":  # a task's working set, and its worker's engines (the cache keeps two, on one GPU)
        task_bytes = (_ENGINES_KEEP * engine.resident_bytes()
                      + block_working_set(engine, block_units, store.unit_chunk, store.itemsize))
        block_args = block_remote_args(gpus_per_task, ray_remote_args, task_bytes)
    read_threads, local_gpu = None, scheduler != "ray" and engine.device.type == "cuda"
    if local_gpu:  # this process's GPU: as many tasks at once as its memory holds
        num_workers, read_threads = local_gpu_threads(
            engine, block_units, store.unit_chunk, store.itemsize,
            num_workers if scheduler == "threads" else None, max_tasks=len(plan) if scheduler == "threads" else 1)
        log.info("%d block tasks at once on %s, each reading its chunks on %d thread(s)", num_workers, engine.device,
                 read_threads)
    handle = _EngineHandle(engine, np.asarray(responses), engine.splits, options, key, read_threads)
    graph, root = build_graph(handle, store, plan, fan_in, block_args)
    log.info("matching %d neurons (+%d permuted copies) over %d units of %s: %d block tasks%s, fan-in %d, %s",
             engine.n_neurons, engine.n_rows - engine.n_neurons, store.catalogue().n_units, store.path, len(plan),
             f" ({block_args})" if block_args else "", fan_in, scheduler)
    try:
        if scheduler == "ray":
            partial = _compute_ray(graph, root, block_args, num_workers, wait_log_s)
        else:
            partial = _compute_local(graph, root, scheduler, progress, num_workers)
        layers, catalogue = store.layers(), store.catalogue()
        return engine.finalize(partial, catalogue, neuron_ids,
                               columns=lambda units: gather_columns(layers, catalogue, units, dtype=None))
    finally:
        if local_gpu:  # each Dask thread's scratch on the GPU: not held until the next model
            engine.release_scratch()


def block_remote_args(gpus_per_task: float | None = None, ray_remote_args: dict | None = None,
                      task_bytes: int | None = None) -> dict:
    """The Ray options of the reduction's block tasks on the cluster ``ray.init`` joined.

    Args:
        gpus_per_task: fraction of a GPU per block task, 0..1; ``None``: 0 when the cluster has no
            GPU; else, with ``task_bytes``, as many tasks a GPU as each node's smallest GPU holds
            (:func:`gpus_per_block_task`, the memory read by
            :func:`sweep.cluster.gpu_memory_by_node`), the node that holds the fewest of those the
            tasks can run on (``ray_remote_args`` may rule some out) deciding, at
            most 1/:data:`DEFAULT_GPUS_PER_TASK`; without ``task_bytes``, or where no GPU's memory
            could be read, :data:`DEFAULT_GPUS_PER_TASK`.
            With a GPU, the tasks' ``runtime_env`` also sets
            :data:`NOSET_CUDA_ENV`, so that each computes on the GPU Ray granted it
            (:func:`task_device`).
        ray_remote_args: other options (``num_cpus``, ``memory``, ``resources``, ``runtime_env``, ...).
        task_bytes: what one block task holds on a GPU, its worker's engines included, its CUDA
            contexts not (:func:`gpus_per_block_task` adds those; :func:`match_store` works it out).

    Raises:
        ValueError: ``gpus_per_task`` outside 0..1, or ``num_gpus`` given in ``ray_remote_args`` too.
    """
    args = dict(ray_remote_args or {})
    if "num_gpus" in args:
        raise ValueError(f"ray_remote_args={ray_remote_args!r} sets num_gpus: ask for GPUs with gpus_per_task "
                         f"(a fraction of one GPU per block task, 0..1)")
    if gpus_per_task is None:
        import ray

        gpus_per_task = DEFAULT_GPUS_PER_TASK if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        if gpus_per_task and task_bytes is not None:
            from .cluster import ResourceRequest, cluster_nodes, gpu_memory_by_node, unsatisfiable

            nodes = cluster_nodes()
            memory = gpu_memory_by_node(nodes)
            # the nodes a block task can run on (its other options, e.g. custom resources, may rule some out)
            request = ResourceRequest.from_remote_args("reduction block task", {**args, "num_gpus": gpus_per_task})
            sized = [(gpus_per_block_task(task_bytes, memory[n.node_id], max(1, int(n.total["GPU"]))), n.address)
                     for n in nodes if memory.get(n.node_id) and not unsatisfiable(request, [n])]
            if sized:  # the node that holds the fewest tasks a GPU decides
                gpus_per_task, where = max(sized)
                log.info("block tasks ask for %g of a GPU each (%.1f GiB a task and a CUDA context on each GPU of "
                         "its node; decided by node %s)", gpus_per_task, task_bytes / 2**30, where)
            else:
                log.info("no GPU's memory could be read (logical GPUs?): block tasks ask for %g of a GPU each",
                         gpus_per_task)
    if isinstance(gpus_per_task, bool) or not isinstance(gpus_per_task, (int, float)) or not 0 <= gpus_per_task <= 1:
        raise ValueError(f"gpus_per_task must be a number in 0..1 (a fraction of one GPU per block task, e.g. 0.25); "
                         f"got {gpus_per_task!r}")
    if gpus_per_task > 0:
        args["num_gpus"] = float(gpus_per_task)
        args["runtime_env"] = _leave_cuda_visible(args.get("runtime_env"))
    return args


def _leave_cuda_visible(runtime_env) -> dict:
    """``runtime_env`` (a dict, a ``ray.runtime_env.RuntimeEnv`` or None) with :data:`NOSET_CUDA_ENV`
    set to 1 among its ``env_vars``: a copy; Ray merges it with the job's."""
    env = dict(runtime_env or {})
    env["env_vars"] = {**dict(env.get("env_vars") or {}), NOSET_CUDA_ENV: "1"}
    return env


def _compute_ray(graph, root, block_args: dict, num_workers: int | None, wait_log_s: float):
    import dask
    from dask.delayed import Delayed
    from ray.util.dask import ray_dask_get

    from .cluster import ResourceRequest, check_requests, describe_wait, watch_waiting

    block = ResourceRequest.from_remote_args("reduction block task", block_args)
    check_requests(block, ResourceRequest("reduction merge task", num_cpus=1))
    waiting = describe_wait(block)
    if waiting:
        log.warning("%s", waiting)
    kwargs = {} if num_workers is None else {"num_workers": int(num_workers)}
    with watch_waiting(block, wait_log_s, what="reduction"):
        (result,) = dask.compute(Delayed(root, graph), scheduler=ray_dask_get, **kwargs)
    return result


def _compute_local(graph, root, scheduler: str, progress: bool, num_workers: int | None):
    import dask
    from dask.delayed import Delayed

    kwargs = {} if num_workers is None or scheduler == "sync" else {"num_workers": int(num_workers)}
    bar = contextlib.nullcontext()
    if progress:
        from dask.diagnostics import ProgressBar

        bar = ProgressBar(dt=1.0)  # one redraw a second: readable in logs too
    with bar:
        (result,) = dask.compute(Delayed(root, graph), scheduler=scheduler, **kwargs)
    return result
