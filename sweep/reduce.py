"""The matching reduction over an activation store, as a Dask graph.

One task per block of units reads its slice ``arr[:, start:stop]`` of one layer's Zarr array
(images x units) and returns ``engine.process(block)``, a :class:`core.engine.MatchPartial`; a tree
of merge tasks (fan-in 2..8) folds the partials with :func:`core.engine.merge`; the driver then runs
:meth:`core.engine.MatchEngine.finalize` with the float64 re-scoring, reading only the candidate
columns from the store again. Partials merge associatively and commutatively (ties go to the lower
unit id), so the answer does not depend on the scheduler, the block size or the shape of the tree,
and equals :func:`core.engine.run_matching` on the same activations with the same blocks.

Schedulers: ``"threads"`` (Dask's threaded scheduler), ``"sync"`` (one thread, for debugging) and
``"ray"`` (Dask-on-Ray, :func:`ray.util.dask.ray_dask_get`, on the cluster that ``ray.init`` joined).

The graph is built by hand (no ``dask.array``): every block task opens nothing and copies nothing
but its own slice, so there is no ``inline_array`` question with Zarr 3 under Dask-on-Ray, and each
task's unit range is exactly one run of whole Zarr chunks.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from typing import Sequence

import numpy as np

from unitmatch.core.engine import MatchEngine, MatchPartial, MatchResult, MatchSettings, default_block_units, merge_all
from unitmatch.core.units import UnitBlock, gather_columns

log = logging.getLogger(__name__)

SCHEDULERS = ("threads", "sync", "ray")
#: default fan-in of the merge tree
DEFAULT_FAN_IN = 4


# ------------------------------------------------------------------------------------- planning
def aligned_block_units(store, block_units: int) -> int:
    """``block_units`` rounded down to a multiple of the store's unit chunk (at least one chunk).

    Raises:
        ValueError: ``block_units`` is not a positive integer.
    """
    if isinstance(block_units, bool) or not isinstance(block_units, (int, np.integer)) or block_units <= 0:
        raise ValueError(f"block_units must be a positive integer; got {block_units!r}")
    chunk = store.unit_chunk
    aligned = max(chunk, int(block_units) // chunk * chunk)
    if aligned != block_units:
        log.warning("block_units=%d is not a multiple of the store's unit chunk (%d): using %d", block_units, chunk,
                    aligned)
    return aligned


def block_plan(store, block_units: int) -> list[tuple[str, int, int]]:
    """The blocks one reduction reads: ``(layer, start, stop)`` in that layer's (flat) units.

    Layers in catalogue order, each cut from unit 0 into runs of ``block_units`` (rounded as in
    :func:`aligned_block_units`); a block never spans two layers. Its length is the number of
    block tasks.
    """
    size = aligned_block_units(store, block_units)
    plan = []
    for layer in store.catalogue().layers:
        for start in range(0, layer.size, size):
            plan.append((layer.name, start, min(start + size, layer.size)))
    return plan


# ------------------------------------------------------------------------------------ the engine
_ENGINES: "OrderedDict[str, MatchEngine]" = OrderedDict()
_ENGINES_LOCK = threading.Lock()
_ENGINES_KEEP = 2


class _EngineHandle:
    """The engine as the tasks see it: shipped once per graph, built at most once per process.

    In the driver's process (threads, sync) it is the driver's engine itself. Pickled (Ray) it
    carries the engine's constructor arguments, not its tensors, and the worker builds the engine
    once per process with its own device: ``device=None`` gives cuda on a worker that sees a GPU
    and cpu elsewhere, whatever the driver had (a cuda engine could not be unpickled on a CPU-only
    worker). The construction is deterministic (seeded permutations), so every process holds the
    same neurons, splits and permutations.
    """

    def __init__(self, engine: MatchEngine, responses: np.ndarray, splits, options: dict, device):
        self.token = uuid.uuid4().hex
        self.responses, self.splits, self.options, self.device = responses, splits, options, device
        self._engine = engine

    def __getstate__(self):
        return {"token": self.token, "responses": self.responses, "splits": self.splits, "options": self.options,
                "device": self.device}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._engine = None

    def get(self) -> MatchEngine:
        if self._engine is not None:
            return self._engine
        with _ENGINES_LOCK:
            engine = _ENGINES.get(self.token)
            if engine is None:
                engine = MatchEngine(self.responses, self.splits, self.options)
                _ENGINES[self.token] = engine
                while len(_ENGINES) > _ENGINES_KEEP:
                    _ENGINES.popitem(last=False)
            else:
                _ENGINES.move_to_end(self.token)
        self._engine = engine
        return engine


# ------------------------------------------------------------------------------------- the tasks
def _process_block(handle: _EngineHandle, array, layer: str, start: int, stop: int, first_unit: int) -> MatchPartial:
    """Read one block's whole chunks from Zarr and score it."""
    data = np.asarray(array[:, start:stop])
    return handle.get().process(UnitBlock(data, layer, first_unit))


def _identity(x):
    return x


def _merge_group(*partials: MatchPartial) -> MatchPartial:
    return merge_all(partials)


def build_graph(handle: _EngineHandle, store, plan: Sequence[tuple[str, int, int]], fan_in: int = DEFAULT_FAN_IN,
                block_remote_args: dict | None = None):
    """The reduction as a Dask HighLevelGraph and the key of its result.

    Layers: the engine handle and the Zarr arrays (one identity task each, so each is shipped
    once), the block tasks (annotated with ``ray_remote_args`` when given, e.g.
    ``{"num_gpus": 0.5}``), then the merge tree, fan-in ``fan_in`` per level.
    """
    from dask._task_spec import DataNode, Task, TaskRef  # the task spec Dask (and ray.util.dask) use
    from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

    if isinstance(fan_in, bool) or not isinstance(fan_in, (int, np.integer)) or not 2 <= fan_in <= 8:
        raise ValueError(f"fan_in must be an integer in 2..8; got {fan_in!r}")
    if not plan:
        raise ValueError("the block plan is empty: the store has no units")
    tok = handle.token[:12]
    eng_key = f"unitmatch-engine-{tok}"
    arrays = store.layers()
    catalogue = store.catalogue()
    arr_keys = {name: (f"unitmatch-array-{tok}", i) for i, name in enumerate(arrays)}
    # tasks (not data nodes) so that Dask-on-Ray puts each in the object store once and the block
    # tasks receive references; locally they are plain calls returning their argument
    inputs = {eng_key: Task(eng_key, _identity, DataNode(None, handle))}
    inputs.update({key: Task(key, _identity, DataNode(None, arrays[name])) for name, key in arr_keys.items()})
    blocks = {}
    for i, (layer, start, stop) in enumerate(plan):
        key = (f"unitmatch-block-{tok}", i)
        blocks[key] = Task(key, _process_block, TaskRef(eng_key), TaskRef(arr_keys[layer]), layer, start, stop,
                           catalogue.offset(layer) + start)
    layers = {"inputs": MaterializedLayer(inputs)}
    annotations = {"ray_remote_args": dict(block_remote_args)} if block_remote_args else None
    layers["blocks"] = MaterializedLayer(blocks, annotations=annotations)
    deps = {"inputs": set(), "blocks": {"inputs"}}
    level_keys, previous, level = list(blocks), "blocks", 0
    while len(level_keys) > 1:
        name = f"merge-{level}"
        merged = {}
        for g in range(0, len(level_keys), fan_in):
            key = (f"unitmatch-merge{level}-{tok}", g // fan_in)
            merged[key] = Task(key, _merge_group, *(TaskRef(k) for k in level_keys[g:g + fan_in]))
        layers[name] = MaterializedLayer(merged)
        deps[name] = {previous}
        level_keys, previous, level = list(merged), name, level + 1
    return HighLevelGraph(layers, deps), level_keys[0]


# ----------------------------------------------------------------------------------- public API
def match_store(store, responses, splits, settings: MatchSettings | None = None, *,
                neuron_ids: Sequence[str] | None = None, scheduler: str = "threads", progress: bool = False,
                fan_in: int = DEFAULT_FAN_IN, num_workers: int | None = None, ray_remote_args: dict | None = None,
                **overrides) -> MatchResult:
    """Match every neuron to its best unit over a complete activation store, as a Dask graph.

    One task per block of units (see :func:`block_plan`): it reads its slice of one layer's Zarr
    array and returns ``engine.process(UnitBlock(...))``; a tree of :func:`core.engine.merge` tasks
    (``fan_in`` partials per task) reduces the partials; then, in the driver,
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
        scheduler: ``"threads"`` (Dask's threaded scheduler), ``"sync"`` (single-threaded, for
            debugging) or ``"ray"`` (Dask-on-Ray on the cluster ``ray.init`` joined; the tasks run
            as Ray tasks, the finalize in the driver).
        settings.device: torch device of the products. ``None``: cuda where the process that runs a block
            sees a GPU, else cpu (with ``"ray"`` decided on each worker: the engine is rebuilt once
            per worker process from its arguments, so a CPU-only driver can feed GPU workers).
        settings.block_units: units per block task: a multiple of the store's unit chunk (other values are
            rounded down to one, at least one chunk, with a warning). Default: the largest multiple
            not above :func:`core.engine.default_block_units` for these images and neuron rows.
        progress: a ``dask.diagnostics.ProgressBar`` for the local schedulers (with ``"ray"`` only
            the task count is logged).
        fan_in: partials merged per merge task (2..8).
        num_workers: threads of the local threaded scheduler, or submitting threads for ``"ray"``
            (Dask's default when ``None``).
        ray_remote_args: Ray options of the block tasks only (e.g. ``{"num_gpus": 0.5}`` so block
            tasks land on, and see, a GPU; Ray hides GPUs from tasks that do not ask for one).

    Dask-on-Ray and extraction actors: every block task needs a free CPU (and whatever
    ``ray_remote_args`` asks for). Extraction actors that still hold every CPU leave the reduction
    waiting forever (seen once: a deadlock). Release the extractors first (e.g.
    ``ZooExtraction.shutdown()``) or reserve CPUs for the reduction; a warning is logged when the
    cluster shows no free CPU at submission.

    Raises:
        ValueError: unknown scheduler, responses whose image count differs from the store's, bad
            ``block_units`` or ``fan_in``.
        RuntimeError: ``scheduler="ray"`` while Ray is not initialized.
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; use one of {SCHEDULERS}")
    if scheduler == "ray":
        import ray

        if not ray.is_initialized():
            raise RuntimeError(
                "scheduler='ray' needs a running Ray: call ray.init(...) (address='auto' to join a cluster, "
                "address='local' for a private one) before match_store, or use scheduler='threads'"
            )
    options = MatchSettings.resolve(settings, **overrides)
    device, block_units = options.device, options.block_units
    engine = MatchEngine(responses, splits, options)
    if engine.n_images != store.n_images:
        raise ValueError(f"responses have {engine.n_images} images but the store {store.path} has {store.n_images}")
    if block_units is None:
        chunk = store.unit_chunk
        block_units = max(chunk, default_block_units(engine.n_images, engine.n_rows) // chunk * chunk)
    plan = block_plan(store, block_units)
    handle = _EngineHandle(engine, np.asarray(responses), engine.splits, options, device)
    graph, root = build_graph(handle, store, plan, fan_in, ray_remote_args if scheduler == "ray" else None)
    log.info("matching %d neurons (+%d permuted copies) over %d units of %s: %d block tasks, fan-in %d, %s",
             engine.n_neurons, engine.n_rows - engine.n_neurons, store.catalogue().n_units, store.path, len(plan),
             fan_in, scheduler)
    partial = _compute(graph, root, scheduler, progress, num_workers, ray_remote_args)
    layers, catalogue = store.layers(), store.catalogue()
    return engine.finalize(partial, catalogue, neuron_ids,
                           columns=lambda units: gather_columns(layers, catalogue, units))


def _compute(graph, root, scheduler: str, progress: bool, num_workers: int | None, ray_remote_args):
    import contextlib

    kwargs = {} if num_workers is None or scheduler == "sync" else {"num_workers": int(num_workers)}
    if scheduler == "ray":
        import ray
        from ray.util.dask import ray_dask_get

        needed = float((ray_remote_args or {}).get("num_cpus", 1))
        free = ray.available_resources().get("CPU", 0.0)
        if needed > 0 and free < needed:
            log.warning(
                "the Ray cluster shows %.1f free CPUs and every block task needs %.1f: if actors (e.g. extractors) "
                "hold them, the reduction waits until they are released (shut them down first)", free, needed)
        (result,) = ray_dask_get(graph, [root], **kwargs)
        return result
    if scheduler == "sync":
        from dask.local import get_sync as get
    else:
        from dask.threaded import get
    bar = contextlib.nullcontext()
    if progress:
        from dask.diagnostics import ProgressBar

        bar = ProgressBar(dt=1.0)  # one redraw a second: readable in logs too
    with bar:
        (result,) = get(graph, [root], **kwargs)
    return result
