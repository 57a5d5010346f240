"""Single-threaded operations for work that is parallel across Python threads instead.

Some CPU work here is many independent pieces: the matching engine's tiles of a block, the decoder's
chunks of small problems. On a few cores they run fastest as one piece per Python thread, each op
single-threaded, with no barrier between them: torch's OpenMP teams and the BLAS pools then have
nothing to wait for. With them left multi-threaded, the pieces' ops each start a parallel region
whose threads spin-wait for busy cores (measured: 2-thread decoder fits several times slower than
1-thread ones on a loaded 2-core machine; torch's own 2-thread GEMM no faster than its 1-thread one
on the 2-core AMD EPYC VM of benchmarks/RESULTS.md).

:func:`single_threaded_ops` sets torch's intra-op threads and the BLAS libraries' pools (numpy's
and scipy's OpenBLAS, through threadpoolctl) to one thread while inside. These are process-wide settings, so
the context is reference counted: concurrent users (e.g. Dask's threaded scheduler running two
block tasks) share one section, which the first entrant opens and the last one closes, restoring
what the first found.

Torch's GEMMs (MKL) size their teams by the calling thread's own OpenMP setting, which a new thread
takes from the environment, not from :func:`torch.set_num_threads` in another thread (torch's own
parallel loops set a thread to torch's process-wide count on their first use there, 1 inside the
section; MKL's GEMMs did not): the pools that run such pieces start their threads with
:func:`one_thread_here`. Without it, each of two share threads on the 2-core AMD EPYC Zen 4 VM ran
torch's GEMMs with a team of two (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import threading

import torch

_LOCK = threading.Lock()
_state = {"depth": 0, "threads": 1, "limiter": None}


def _release_blas_control() -> None:
    """Let the current thread set OpenBLAS's pool size.

    threadpoolctl (3.8) lets only the first thread that set OpenBLAS's process-wide pool size set
    it again (others silently do nothing) until that thread clears its control. Here the thread
    that opens a section may not be the one that closes it, and every change is made under
    ``_LOCK``, so control is released before and after each change.
    """
    import threadpoolctl

    controller = getattr(threadpoolctl, "OpenBLASController", None)
    if controller is not None and hasattr(controller, "clear_controlling_thread"):
        controller.clear_controlling_thread(force=True)


@contextlib.contextmanager
def single_threaded_ops():
    """Torch's intra-op threads and the BLAS pools at one thread while inside.

    Yields:
        The number of torch threads before the section opened (how many Python threads the
        caller's pieces should run on).
    """
    with _LOCK:
        if _state["depth"] == 0:
            _state["threads"] = torch.get_num_threads()
            # threadpoolctl's view of the BLAS libraries loaded now (scipy's may load after numpy's);
            # taking it costs about 1 ms
            from threadpoolctl import ThreadpoolController

            _release_blas_control()
            _state["limiter"] = ThreadpoolController().limit(limits=1, user_api="blas")
            _release_blas_control()
            torch.set_num_threads(1)
        _state["depth"] += 1
        threads = _state["threads"]
    try:
        yield threads
    finally:
        with _LOCK:
            _state["depth"] -= 1
            if _state["depth"] == 0:
                torch.set_num_threads(_state["threads"])
                _release_blas_control()
                _state["limiter"].restore_original_limits()
                _release_blas_control()
                _state["limiter"] = None


def one_thread_here() -> None:
    """The calling thread's OpenMP teams at one thread, for good: the initializer of the thread pools
    whose pieces run inside :func:`single_threaded_ops` (their threads start and work there, while
    torch's process-wide count is 1 too).

    The section sets torch's and the BLAS libraries' process-wide counts, but torch's CPU GEMMs
    (MKL) and OpenMP regions take their team size from the calling thread's own OpenMP setting
    (``omp_set_num_threads`` and MKL's thread-local count are per thread), which a thread started
    later takes from the environment: with two share threads on two cores each GEMM then ran on two
    threads, four on two cores. Set through threadpoolctl in the thread itself (it changes no other
    thread's setting, and no process-wide one as :func:`torch.set_num_threads` would).
    """
    from threadpoolctl import ThreadpoolController

    ThreadpoolController().limit(limits=1, user_api="openmp")
