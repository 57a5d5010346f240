"""Ray for the sweep: joining or starting a cluster, and checking requests against it before dispatch.

What this module owns:

- :func:`ray_session`: the one place the sweep starts (``address="local"``) or joins (``"auto"``,
  ``"host:port"``, ``"ray://host:port"``) Ray, and stops what it started. Actor and task output
  is streamed to the driver (``log_to_driver=True``), so under Slurm or ``ray job submit`` the
  extractors' tracebacks land in the job's log. An address nobody answers fails within
  ``connect_timeout_s`` with an error naming it (Ray itself retries for minutes).
- Fail fast: :func:`check_requests` compares what each actor or task asks for (CPU, GPU, memory,
  custom resources; :class:`ResourceRequest`) with every alive node's totals. A request that no
  single node can satisfy would wait forever (Ray only prints an autoscaler warning); it raises
  :class:`ClusterResourceError` naming the request and listing the nodes and their resources.
- Waiting shown: a request that fits some node but finds no free resources right now (a busy
  cluster) waits; :func:`describe_wait` says what for, and :func:`watch_waiting` logs it every
  ``interval_s`` while it lasts.

- GPU memory: Ray's resources count GPUs, not their memory; :func:`gpu_memory_by_node` asks each
  GPU node's devices (in a short-lived task of its own that needs no free CPU or GPU).

Nothing here imports torch (but that task) or the science: it is about Ray's resources only.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

log = logging.getLogger(__name__)

#: set in a Ray worker's environment, Ray leaves its CUDA_VISIBLE_DEVICES as the node has it (the
#: reduction's block tasks and the GPU memory probe ask for it)
NOSET_CUDA_ENV = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"

#: addresses that are not host:port (``ray.init`` resolves them itself)
_SPECIAL_ADDRESSES = ("local", "auto")


class ClusterResourceError(RuntimeError):
    """A resource request that no node of the Ray cluster can ever satisfy."""


# ------------------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class ResourceRequest:
    """What one Ray actor or task asks for.

    Attributes:
        what: who asks, in words ("extraction actor", "reduction block task").
        num_cpus, num_gpus: as in ``ray.remote(...)``.
        memory: bytes of Ray's ``memory`` resource.
        resources: custom resources, e.g. ``{"accelerator_type:A100": 0.1}``.
    """

    what: str
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory: float = 0.0
    resources: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self):
        for name, value in [("num_cpus", self.num_cpus), ("num_gpus", self.num_gpus), ("memory", self.memory),
                            *((f"resources[{k!r}]", v) for k, v in self.resources.items())]:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{self.what}: {name} must be a non-negative number; got {value!r}")

    @classmethod
    def from_remote_args(cls, what: str, args: Mapping | None, default_cpus: float = 1.0) -> "ResourceRequest":
        """The request of ``ray.remote``/``.options`` keyword arguments (others are ignored).

        ``default_cpus`` is Ray's default where ``num_cpus`` is absent: 1 for tasks, and for
        actors the 1 CPU needed to be scheduled.
        """
        args = dict(args or {})
        return cls(what, num_cpus=args.get("num_cpus", default_cpus), num_gpus=args.get("num_gpus") or 0.0,
                   memory=args.get("memory") or 0.0, resources=dict(args.get("resources") or {}))

    def amounts(self) -> dict[str, float]:
        """Ray resource name -> amount, for the non-zero amounts."""
        out = {"CPU": float(self.num_cpus), "GPU": float(self.num_gpus), "memory": float(self.memory)}
        out.update({k: float(v) for k, v in self.resources.items()})
        return {k: v for k, v in out.items() if v > 0}

    def __str__(self) -> str:
        return f"{self.what} {_format_resources(self.amounts())}"


@dataclass(frozen=True)
class NodeResources:
    """One alive node of the cluster and its total resources."""

    node_id: str
    address: str
    total: Mapping[str, float]

    def __str__(self) -> str:
        return f"node {self.address} ({self.node_id[:8]}): {_format_resources(self.total)}"


def _format_resources(amounts: Mapping[str, float]) -> str:
    # Ray's bookkeeping resources (node:<ip>, accelerator_type:..., object store) only add noise here
    shown = {k: v for k, v in amounts.items()
             if not k.startswith("node:") and k != "object_store_memory"}
    if not shown:
        return "{nothing}"
    parts = []
    for k in sorted(shown, key=lambda k: ({"CPU": 0, "GPU": 1, "memory": 2}.get(k, 3), k)):
        v = shown[k]
        parts.append(f"{k}: {v / 2**30:.1f} GiB" if k == "memory" else f"{k}: {v:g}")
    return "{" + ", ".join(parts) + "}"


def cluster_nodes() -> list[NodeResources]:
    """The alive nodes of the cluster ``ray.init`` joined, with their total resources."""
    import ray

    return [NodeResources(n["NodeID"], n.get("NodeManagerAddress", "?"), dict(n.get("Resources", {})))
            for n in ray.nodes() if n.get("Alive")]


def _smallest_gpu_bytes() -> int | None:
    """In a task on a node: the memory of its smallest CUDA device, None where torch sees none."""
    import torch

    if not torch.cuda.is_available():
        return None
    return min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))


def gpu_memory_by_node(nodes: Sequence[NodeResources] | None = None, timeout_s: float = 60.0) -> dict[str, int | None]:
    """Node id -> bytes of its smallest GPU, for every alive node with GPUs in its Ray resources;
    None where its devices could not be read (torch sees no CUDA there: a logical GPU; or no answer
    within ``timeout_s``).

    One task a node, pinned to it, asking for no CPU and no GPU (so busy GPUs do not delay it; its
    runtime_env tells Ray to leave it the node's GPUs as the node lists them, which Ray 2.60 does
    anyway), in a worker that exits after it (``max_calls=1``: its CUDA context goes with it). Each
    node is asked once in a process; one that did not answer counts as unknown from then on.

    Args:
        nodes: the cluster's nodes (default: :func:`cluster_nodes`).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n.node_id for n in (cluster_nodes() if nodes is None else nodes) if n.total.get("GPU", 0) > 0]
    # (older Ray releases hid a node's GPUs from tasks that ask for none, unless told to leave them)
    probe = ray.remote(num_cpus=0, num_gpus=0, max_calls=1, runtime_env={"env_vars": {NOSET_CUDA_ENV: "1"}})(
        _smallest_gpu_bytes)
    refs = {node: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
            for node in nodes if node not in _GPU_MEMORY}
    ready = set(ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)[0]) if refs else set()
    for node, ref in refs.items():
        if ref in ready:
            try:
                _GPU_MEMORY[node] = ray.get(ref)  # a node's devices do not change while it lives
                if _GPU_MEMORY[node] is None:
                    log.warning("the memory of node %s's GPUs is unknown: torch saw no CUDA there (logical GPUs?)",
                                node)
            except Exception as err:  # noqa: BLE001 - a node whose devices cannot be read is not sized
                log.warning("reading the GPU memory of node %s failed: %s", node, err)
                _GPU_MEMORY[node] = None
        else:
            ray.cancel(ref, force=True)
            log.warning("node %s did not say its GPU memory within %.0f s", node, timeout_s)
            _GPU_MEMORY[node] = None  # not asked again in this session
    return {node: _GPU_MEMORY.get(node) for node in nodes}


#: node id -> bytes of its smallest GPU (or None), as read once by gpu_memory_by_node
_GPU_MEMORY: dict[str, int | None] = {}


def unsatisfiable(request: ResourceRequest, nodes: Sequence[NodeResources]) -> bool:
    """Whether no node has, in total, every resource the request asks for."""
    need = request.amounts()
    return not any(all(node.total.get(k, 0.0) >= v for k, v in need.items()) for node in nodes)


def check_requests(*requests: ResourceRequest, nodes: Sequence[NodeResources] | None = None) -> None:
    """Raise, before anything is dispatched, when a request fits no node of the cluster.

    Args:
        requests: what each kind of actor or task asks for.
        nodes: the cluster's nodes (default: :func:`cluster_nodes`).

    Raises:
        ClusterResourceError: naming every request that no single node can satisfy, and listing the
            nodes with their resources.
    """
    nodes = cluster_nodes() if nodes is None else list(nodes)
    bad = [r for r in requests if unsatisfiable(r, nodes)]
    if not bad:
        return
    listing = "\n".join(f"  {node}" for node in nodes) or "  (no alive node)"
    asks = "; ".join(f"one {r}" for r in bad)
    raise ClusterResourceError(
        f"{asks}: no node of the Ray cluster has that much, so it would wait forever. The cluster's nodes:\n"
        f"{listing}\nAsk for less (e.g. cluster.num_cpus_per_actor, cluster.num_gpus_per_actor, "
        f"cluster.gpus_per_reduce_task, cluster.cpus_per_reduce_task) or add nodes that have it."
    )


def describe_wait(request: ResourceRequest, waiting: int | None = None, total: int | None = None) -> str | None:
    """What ``waiting`` actors or tasks of ``request`` wait for, or None when one could start now.

    ``waiting=None`` speaks of "the next" one (work whose queue the caller does not see).

    Uses the cluster-wide free resources: when no resource the request needs is short anywhere,
    nothing is said.
    """
    import ray

    free, totals = ray.available_resources(), ray.cluster_resources()
    short = {k: v for k, v in request.amounts().items() if free.get(k, 0.0) < v}
    if not short:
        return None
    count = "the next" if waiting is None else f"{waiting} of {total}" if total is not None else f"{waiting}"
    have = ", ".join(f"{k} {free.get(k, 0.0):g} of {totals.get(k, 0.0):g} free" for k in short)
    return (f"{count} {request.what}(s) wait for {_format_resources(request.amounts())}: the cluster has {have} "
            f"(held by other actors or tasks; they start when those are released)")


@contextlib.contextmanager
def watch_waiting(request: ResourceRequest, interval_s: float = 30.0, what: str | None = None) -> Iterator[None]:
    """Log every ``interval_s``, while the body runs, whether ``request`` must wait for resources.

    For work whose submission the caller does not see (a Dask-on-Ray graph): a background thread
    checks the cluster's free resources and logs :func:`describe_wait` when the request could not
    start now. Silent while resources are free.
    """
    stop = threading.Event()

    def watch():
        while not stop.wait(interval_s):
            try:
                message = describe_wait(request)
            except Exception as err:  # noqa: BLE001 - a failed probe must not break the work it watches
                log.debug("resource probe failed: %s", err)
                continue
            if message:
                log.info("%s%s", f"{what}: " if what else "", message)

    thread = threading.Thread(target=watch, name="unitmatch-wait-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


# -------------------------------------------------------------------------------------- session
def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a ``host:port`` or ``ray://host:port`` address; None for local/auto."""
    if address in _SPECIAL_ADDRESSES:
        return None
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"Ray address {address!r} is not 'local', 'auto', 'host:port' or 'ray://host:port'")
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Open (and close) a TCP connection to the address's host and port.

    Raises:
        ConnectionError: nothing answers within ``timeout_s``; the message names the address.
    """
    hp = _host_port(address)
    if hp is None:
        return
    try:
        with socket.create_connection(hp, timeout=timeout_s):
            pass
    except OSError as err:
        raise ConnectionError(
            f"cannot reach the Ray cluster at {address!r} ({hp[0]}:{hp[1]}: {err or type(err).__name__}) within "
            f"{timeout_s:g} s: is its head running (`ray start --head`), and is the address (cluster.address) "
            f"right? Use cluster.address=local for a private local Ray."
        ) from err


@contextlib.contextmanager
def ray_session(address: str = "local", *, num_cpus: int | None = None, num_gpus: int | None = None,
                connect_timeout_s: float = 10.0, log_to_driver: bool = True,
                runtime_env: dict | None = None) -> Iterator[list[NodeResources]]:
    """Ray for the body of a ``with``: joined or started, and stopped afterwards if started here.

    If this process is already connected to Ray (``ray.is_initialized()``), that connection is
    used as it is and left running.

    Args:
        address: ``"local"`` (a private Ray on this machine, stopped at exit), ``"auto"`` (the
            cluster running on this machine), ``"host:port"`` (a head's GCS) or
            ``"ray://host:port"`` (Ray Client).
        num_cpus, num_gpus: resources of a local Ray (None: detected). Only for ``"local"``.
        connect_timeout_s: how long a remote address may take to answer a TCP connection.
        log_to_driver: stream actors' and tasks' stdout/stderr to this process.
        runtime_env: Ray's runtime_env for the job's workers, e.g. ``{"py_modules": ["my_models"]}``
            or ``{"working_dir": "."}`` so that a model factory imports on every worker.

    Yields:
        The cluster's alive nodes with their total resources.

    Raises:
        ConnectionError: the address does not answer (named in the message).
        ValueError: a malformed address, num_cpus/num_gpus with a non-local address, or a
            runtime_env while this process is already connected to Ray.
    """
    import ray

    if address not in ("local",) and (num_cpus is not None or num_gpus is not None):
        raise ValueError(f"num_cpus/num_gpus set the resources of a local Ray; the cluster at {address!r} has its "
                         f"own (got num_cpus={num_cpus!r}, num_gpus={num_gpus!r})")
    started = False
    if ray.is_initialized():
        if runtime_env:  # Ray applies a job's runtime_env (local folders included) only in ray.init
            raise ValueError(f"runtime_env={runtime_env!r} cannot be applied: this process is already connected "
                             f"to Ray; pass it to ray.init(runtime_env=...) yourself, or run in a new process")
        log.debug("Ray is already initialized in this process: using that connection")
    else:
        kwargs = {"include_dashboard": False, "configure_logging": False, "log_to_driver": log_to_driver}
        if runtime_env:
            kwargs["runtime_env"] = dict(runtime_env)
        if address == "local":
            ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, **kwargs)
        else:
            check_reachable(address, connect_timeout_s)
            try:
                ray.init(address=address, **kwargs)
            except (ConnectionError, RuntimeError, TimeoutError) as err:
                raise ConnectionError(f"could not join the Ray cluster at {address!r}: {err}") from err
        started = True
    try:
        nodes = cluster_nodes()
        log.info("Ray %s %s: %d node(s)\n%s", "started" if address == "local" and started else "joined", address,
                 len(nodes), "\n".join(f"  {node}" for node in nodes))
        yield nodes
    finally:
        if started:
            ray.shutdown()
