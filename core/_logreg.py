"""Batched multinomial logistic regression: many small problems of one shape fitted at once.

This private module owns the solver behind :mod:`core.decoding`. It minimises, for each of B
independent problems (same n samples, F features and K classes; different features, and the
same labels or each its own),
exactly scikit-learn's objective for ``LogisticRegression(C=C, fit_intercept=True)`` with the
lbfgs solver (scikit-learn 1.9, ``_logistic_regression_path``)::

    f(W, b) = mean_i [logsumexp_k(x_i W_k + b_k) - (x_i W_{y_i} + b_{y_i})] + ||W||^2 / (2 C n)

i.e. ``C * sum(loss) + ||W||^2 / 2`` divided by ``C n``; the intercept is not penalised. For two
classes scikit-learn fits a single binomial vector ``v`` with penalty ``||v||^2 / 2``; the
multinomial form with ``C / 2`` has the same minimiser with ``W_1 - W_0 = v`` (the penalty splits
``v`` evenly between the two rows), so both cases are one code path here.

Algorithm: L-BFGS (history 10, like SciPy's default) on all B problems at once, each with its own
history, step and stopping state (directions by the two-loop recursion on the CPU, by the compact
representation on CUDA, where a batch waits on kernel launches: :class:`_History`); the loss and
gradient of a batch are two batched GEMMs (``torch.baddbmm`` / ``torch.bmm``) over (B, n, F)
features. The objective is strongly convex (the
penalty), so ``s.y > 0`` always holds and an Armijo backtracking line search is enough. A problem
stops, like SciPy's L-BFGS-B as scikit-learn calls it, when the largest absolute gradient entry is
at most ``tol`` or the relative decrease of f is at most ``64 eps``; problems that stop leave the
batch (the batch is compacted when enough of it has stopped), so a few slow problems do not make
the others pay.

Precision (``precision="mixed"``, the default): the GEMMs stream the features from memory, so their
cost is the features' bytes. A first phase runs them in float32 (measured 1.5x less CPU per fit
than float64 at the MajajHong size), the softmax between them too, with the parameters, the
loss's and gradient's means over samples and the L-BFGS state in float64, down to a largest gradient entry of ``max(tol, 1e-5)`` (float32 products
are accurate to about 1e-7 there); a second phase evaluates every problem's float64 gradient at
that point and continues in float64 where scikit-learn's criteria are not met in float64 (at the
default tol most problems stop there with no further iteration). The minimiser and the stopping
rule are the all-float64 fit's; a fit can start from given parameters (``init``: a warm start).
With TF32 matmuls enabled on a GPU the first phase is coarser, and the float64 phase still
decides convergence.

On the CPU the float32 phase runs, where numba is importable, as one compiled loop per problem
(:mod:`core._logreg_kernel`, the same algorithm: torch's version spends most of its time between
its GEMMs, in some 220 small ops an iteration under one GIL); the float64 phase stays here
(``fit_multinomial(compiled=...)`` chooses).
"""

from __future__ import annotations

import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ._threads import one_thread_here, single_threaded_ops

log = logging.getLogger(__name__)

#: L-BFGS memory (SciPy's default, which scikit-learn uses)
HISTORY = 10
#: Armijo sufficient-decrease constant
_C1 = 1e-4
#: backtracking steps before a problem's line search is declared failed (scikit-learn: maxls=50)
_MAX_LINE_SEARCH = 50
#: relative decrease of f below which a problem stops (SciPy's ftol as scikit-learn sets it)
_FTOL = 64 * torch.finfo(torch.float64).eps
#: compact the batch (copy the running problems' features) once this fraction has stopped
_COMPACT_FRACTION = 0.25
#: on CPU, problems are fitted in chunks of about this many bytes of features, spread over the
#: threads: 1020 demo-sized problems (360 x 48 float32, 70 MB) took 3.4-3.7 CPU s in 4-24 MiB chunks
#: against 3.9-4.6 in two 35 MB chunks (the chunk's features stay in the cache between the two
#: products of an evaluation)
CPU_CHUNK_BYTES = 16 * 2**20
#: ... but of at least this many problems: the loop's ~150 torch calls per iteration are paid per
#: chunk, and 48 MajajHong-sized problems (2304 x 256, 2.4 MB each) cost 0.097-0.099 CPU s per fit in
#: two chunks against 0.129-0.166 in 8 MiB chunks of 3 problems (same run, 2 threads)
CPU_CHUNK_MIN_PROBLEMS = 64
#: ... and of at least this many bytes per extra thread: with small problems the loop's Python and
#: dispatch work (one GIL) dominates, and two threads were measured slower than one (100 problems
#: of 360 x 48 float32, 8 classes: 0.32-0.35 s wall on 2 threads, 0.28 s on 1)
CPU_THREAD_MIN_BYTES = 4 * 2**20


@dataclass
class BatchedFit:
    """Fitted problems of one batch.

    Attributes:
        coef: (B, K, F) weights (for two classes the multinomial pair, ``coef[:, 1] - coef[:, 0]``
            being scikit-learn's binomial ``coef_[0]``).
        intercept: (B, K) intercepts (defined up to a constant per problem: it is not penalised).
        n_iter: (B,) L-BFGS iterations used.
        converged: (B,) whether the gradient or decrease criterion was met within ``max_iter``.
    """

    coef: torch.Tensor
    intercept: torch.Tensor
    n_iter: torch.Tensor
    converged: torch.Tensor

    @property
    def theta(self) -> torch.Tensor:
        """(B, K, F + 1) parameters: per class its weights then its intercept (``init`` of a
        warm-started :func:`fit_multinomial`)."""
        return torch.cat([self.coef, self.intercept[:, :, None]], dim=2)

    def decision_function(self, x: torch.Tensor) -> torch.Tensor:
        """(B, m, K) class scores of features x, (B, m, F) or (m, F) shared by all problems."""
        x = x.to(self.coef)
        if x.dim() == 2:
            return torch.matmul(x, self.coef.transpose(1, 2)) + self.intercept[:, None, :]
        return torch.baddbmm(self.intercept[:, None, :], x, self.coef.transpose(1, 2))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(B, m) predicted class indices (ties to the lower index, like numpy's argmax)."""
        return self.decision_function(x).argmax(dim=-1)


def preconditioner(x: torch.Tensor, k: int, l2: float) -> torch.Tensor:
    """G^-1 per problem of features x (b, n, F): G = [X 1]^T [X 1] / n + K l2 diag(1, .., 1, 0).

    G / K is the exact Hessian at theta = 0 on the gradient's subspace (uniform probabilities), so
    ``K G^-1 g`` is the Newton step from the start and ``G^-1`` a preconditioner that undoes
    correlated features for the rest of the run. X^T X is computed in the features' dtype (it only
    preconditions), the factorisation and inverse in float64.
    """
    b, n, f = x.shape
    g = torch.empty(b, f + 1, f + 1, dtype=torch.float64, device=x.device)
    g[:, :f, :f] = torch.bmm(x.transpose(1, 2), x).div_(n)
    mean = x.mean(dim=1, dtype=torch.float64)
    g[:, :f, f] = mean
    g[:, f, :f] = mean
    g[:, f, f] = 1.0
    g.diagonal(dim1=1, dim2=2)[:, :f] += k * l2
    chol, info = torch.linalg.cholesky_ex(g)
    if bool((info != 0).any()):
        # only a degenerate float Gram can fail (G is positive definite for l2 > 0): a tiny ridge
        # keeps the preconditioner defined; it changes the path, never the minimiser
        g.diagonal(dim1=1, dim2=2).add_(1e-10 * g.diagonal(dim1=1, dim2=2).amax(dim=1, keepdim=True))
        chol = torch.linalg.cholesky(g)
    return torch.cholesky_inverse(chol)


class _Objective:
    """Loss, gradient and preconditioner of the running problems.

    ``theta`` is (b, K * (F + 1)): per class, its F weights then its intercept, flattened, always
    float64. The features ``x`` may be float32: the two products per evaluation (class scores and
    the gradient's ``r X``) and the softmax between them then run in float32, and the loss's and
    the intercept's mean over samples, the penalty and the parameters in float64. The softmax of
    float32 class scores is no less accurate in float32 (the scores carry float32 rounding
    already), and it halves the bytes of the (b, K, n) passes between the products: 1.3x less CPU
    per demo-sized fit than a float64 softmax. Class scores are computed class-major,
    (b, K, n) = W^T X^T: with K small, GEMMs in this orientation (the (K, n) operand contiguous)
    were measured 1.3-2.5x faster on CPU than (n, K) ones.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float):
        self.x = x
        self.n, self.f = x.shape[1], x.shape[2]
        self.k = n_classes
        # (K, n) labels shared by all problems, or (b, K, n) per problem, in the features' dtype;
        # and the label indices as (1, 1, n) or (b, 1, n)
        self.onehot = torch.nn.functional.one_hot(y, n_classes).to(x.dtype).transpose(-1, -2).contiguous()
        self.label = y.view(-1, 1, self.n)
        self.l2 = l2
        self.g_inv = None

    def prepare(self) -> None:
        """Compute the preconditioner of the running problems (once, after the first compaction)."""
        if self.g_inv is None:
            self.g_inv = preconditioner(self.x, self.k, self.l2)

    def precondition(self, v: torch.Tensor) -> torch.Tensor:
        """G^-1 applied to each class's (F + 1) block of flattened parameter vectors v (b, P).

        An explicit inverse (G is symmetric): one small GEMM, several times cheaper on CPU than
        two triangular solves per call.
        """
        return torch.bmm(v.view(-1, self.k, self.f + 1), self.g_inv).view(v.shape[0], -1)

    def compact(self, keep: torch.Tensor) -> None:
        self.x = self.x[keep]
        if self.onehot.dim() == 3:
            self.onehot, self.label = self.onehot[keep], self.label[keep]
        if self.g_inv is not None:
            self.g_inv = self.g_inv[keep]

    def split(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, K, F) weights and (b, K) intercepts of flattened parameters (views)."""
        t = theta.view(-1, self.k, self.f + 1)
        return t[:, :, : self.f], t[:, :, self.f]

    def __call__(self, theta: torch.Tensor, rows: torch.Tensor | None = None, curvature: bool = False):
        """(loss (b,), gradient (b, P)) at theta, for all running problems or only ``rows``.

        With ``curvature`` (all problems only) also sets ``self.curvature`` (b,): the softmax
        curvature mean_i (1 - sum_k p_ik^2), which scales L-BFGS's first inverse Hessian.
        """
        x = self.x if rows is None else self.x[rows]
        onehot, label = self.onehot, self.label
        if rows is not None and onehot.dim() == 3:
            onehot, label = onehot[rows], label[rows]
        w, b = self.split(theta)
        xd = x.dtype
        z = torch.baddbmm(b[:, :, None].to(xd), w.to(xd), x.transpose(1, 2))  # (b, K, n)
        # softmax and its log-normaliser from one exp pass (torch.logsumexp and exp(z - lse) take two)
        top = z.amax(dim=1, keepdim=True)
        prob = torch.sub(z, top).exp_()
        total = prob.sum(dim=1, keepdim=True)
        lse = total.log().add_(top)
        prob.div_(total)
        picked = z.gather(1, label.expand(z.shape[0], 1, self.n))
        loss = lse.sub_(picked).mean(dim=(1, 2), dtype=torch.float64) + 0.5 * self.l2 * w.square().sum(dim=(1, 2))
        if curvature:
            self.curvature = 1.0 - prob.square().sum(dim=1, dtype=torch.float64).mean(dim=1)
        r = prob.sub_(onehot)  # n d mean-loss / dz
        grad = torch.empty(x.shape[0], self.k, self.f + 1, dtype=torch.float64, device=x.device)
        grad[:, :, : self.f] = torch.bmm(r, x)
        torch.sum(r, dim=2, dtype=torch.float64, out=grad[:, :, self.f])
        grad.div_(self.n)
        grad[:, :, : self.f].add_(w, alpha=self.l2)
        return loss, grad.view(x.shape[0], -1)


#: how :func:`_history`'s memory computes an L-BFGS direction, by device type (others: "two-loop")
_DIRECTIONS = {"cuda": "compact"}


def _history(m: int, n_batch: int, n_par: int, dtype: torch.dtype, device: torch.device,
             how: str | None = None) -> "_History":
    """An empty L-BFGS memory of ``m`` pairs for ``n_batch`` problems of ``n_par`` parameters,
    giving directions ``how`` (``"two-loop"`` or ``"compact"``; None: by device, ``_DIRECTIONS``)."""
    how = _DIRECTIONS.get(torch.device(device).type, "two-loop") if how is None else how
    kinds = {"two-loop": _TwoLoopHistory, "compact": _CompactHistory}
    if how not in kinds:
        raise ValueError(f"how must be 'two-loop' or 'compact'; got {how!r}")
    return kinds[how](m, n_batch, n_par, dtype, device)


class _History:
    """The L-BFGS memory of the running problems and the direction ``-H g`` it gives.

    The last ``m`` pairs ``s = theta_new - theta``, ``y = grad_new - grad`` sit in a ring of slots
    (a pair the step did not accept, or with ``s.y <= 0``, is stored as zeros and contributes
    nothing, as an empty slot does). The initial inverse Hessian is ``H0 = gamma P`` (``P``: the
    objective's preconditioner). Two ways to the same direction, a subclass each
    (:func:`_history` picks one):

    - ``"two-loop"`` (:class:`_TwoLoopHistory`): the two-loop recursion (Nocedal 1980) over the
      pairs, newest first: 2 m dependent steps of a few small ops each, over ``s`` and ``y``
      (m, b, P), a slot's vectors contiguous. The faster way on the CPU (the demo's problems:
      0.11 s per fit against 0.14 s for the compact form, whose batched GEMMs of a few columns
      cost more there than the recursion's element-wise passes; benchmarks/RESULTS.md).
    - ``"compact"`` (:class:`_CompactHistory`; the default on CUDA): the compact representation
      (Byrd, Nocedal & Schnabel 1994, Theorem 2.2) with the pairs oldest first::

          H g = gamma P g + S p - gamma P Y u,   u = R^-1 S^T g,
          p = R^-T ((D + gamma Y^T P Y) u - gamma Y^T P g)

      with ``R`` the upper triangle of ``S^T Y`` and ``D`` its diagonal, kept up to date as pairs
      arrive (``s_i.y_j`` and ``y_i.P y_j``, one batched GEMM per pair), ``sy`` (b, 2m, P) holding
      each problem's s vectors (rows ``:m``) then its y vectors, so that one GEMM reads both:
      about 20 ops per iteration where the recursion takes about 100, i.e. fewer kernel launches
      on a GPU, where a batch of small problems waits on launches rather than on arithmetic.
    """

    def __init__(self, m: int):
        self.m = m
        self.count, self.newest = 0, -1

    def compact(self, keep: torch.Tensor) -> None:
        """Keep the problems ``keep`` (indices) only."""
        raise NotImplementedError

    def push(self, s: torch.Tensor, y: torch.Tensor, sy: torch.Tensor, py: torch.Tensor,
             good: torch.Tensor) -> None:
        """Store the newest pair (``sy``: s.y, ``py = P y``) in the oldest slot; zeros where not ``good``."""
        self.newest = (self.newest + 1) % self.m
        self.count = min(self.count + 1, self.m)
        self._store(self.newest, s, y, sy, py, good)

    def direction(self, g: torch.Tensor, gamma: torch.Tensor, precondition) -> torch.Tensor:
        """-H g for each problem of ``g`` (b, P); ``gamma`` (b,): the initial inverse Hessian's scale."""
        if self.count == 0:
            return precondition(g).mul_(-gamma[:, None])
        return self._direction(g, gamma, precondition)

    def _store(self, slot, s, y, sy, py, good) -> None:
        raise NotImplementedError

    def _direction(self, g, gamma, precondition) -> torch.Tensor:
        raise NotImplementedError


class _TwoLoopHistory(_History):
    def __init__(self, m: int, n_batch: int, n_par: int, dtype: torch.dtype, device: torch.device):
        super().__init__(m)
        self.s = torch.zeros(m, n_batch, n_par, dtype=dtype, device=device)
        self.y = torch.zeros_like(self.s)
        self.rho = torch.zeros(m, n_batch, dtype=dtype, device=device)  # 1 / s.y, 0 for an empty slot

    def compact(self, keep):
        self.s, self.y, self.rho = self.s[:, keep], self.y[:, keep], self.rho[:, keep]

    def _store(self, slot, s, y, sy, py, good):
        keep = good[:, None]
        self.s[slot] = torch.where(keep, s, 0.0)
        self.y[slot] = torch.where(keep, y, 0.0)
        self.rho[slot] = torch.where(good, 1.0 / torch.where(good, sy, 1.0), 0.0)

    def _direction(self, g, gamma, precondition):
        m = self.m
        order = [(self.newest - j) % m for j in range(self.count)]  # newest first
        q = g.clone()
        alpha = []
        for j in order:
            a = self.rho[j] * (self.s[j] * q).sum(dim=1)
            q.sub_(self.y[j] * a[:, None])
            alpha.append(a)
        q = precondition(q).mul_(gamma[:, None])
        for j, a in zip(reversed(order), reversed(alpha)):
            beta = self.rho[j] * (self.y[j] * q).sum(dim=1)
            q.add_(self.s[j] * (a - beta)[:, None])
        return q.neg_()


class _CompactHistory(_History):
    def __init__(self, m: int, n_batch: int, n_par: int, dtype: torch.dtype, device: torch.device):
        super().__init__(m)
        self.sy = torch.zeros(n_batch, 2 * m, n_par, dtype=dtype, device=device)
        self.s_dot_y = torch.zeros(n_batch, m, m, dtype=dtype, device=device)  # [i, j] = s_i . y_j
        self.y_p_y = torch.zeros(n_batch, m, m, dtype=dtype, device=device)  # [i, j] = y_i . P y_j
        self._orders: dict = {}  # (count, newest) -> slots oldest first, on the device

    def compact(self, keep):
        self.sy, self.s_dot_y, self.y_p_y = self.sy[keep], self.s_dot_y[keep], self.y_p_y[keep]

    def _store(self, slot, s, y, sy, py, good):
        m, keep = self.m, good[:, None]
        self.sy[:, slot] = torch.where(keep, s, 0.0)
        self.sy[:, m + slot] = torch.where(keep, y, 0.0)
        py = torch.where(keep, py, 0.0)
        dots = torch.bmm(self.sy, torch.stack([self.sy[:, slot], self.sy[:, m + slot], py], dim=2))
        self.s_dot_y[:, slot, :] = dots[:, m:, 0]  # s_new . y_j
        self.s_dot_y[:, :, slot] = dots[:, :m, 1]  # s_i . y_new
        # the pair's own s.y as ``good`` was decided on (the GEMM's may round otherwise): > 0 exactly
        # for a stored pair, 0 for an empty one
        self.s_dot_y[:, slot, slot] = torch.where(good, sy, 0.0)
        self.y_p_y[:, slot, :] = dots[:, m:, 2]  # y_j . P y_new (P is symmetric)
        self.y_p_y[:, :, slot] = dots[:, m:, 2]

    def _direction(self, g, gamma, precondition):
        m, b = self.m, g.shape[0]
        key = (self.count, self.newest)
        if key not in self._orders:  # built on the device: no copy from the host, no wait
            first = self.newest - self.count + 1
            self._orders[key] = torch.arange(self.count, device=g.device).add_(first).remainder_(m)
        order = self._orders[key]  # oldest first
        pg = precondition(g)
        w = torch.bmm(self.sy, torch.stack([g, pg], dim=2))  # (b, 2m, 2)
        w1 = w[:, :m, 0].index_select(1, order)  # S^T g
        w2 = w[:, m:, 1].index_select(1, order).mul_(gamma[:, None])  # Y^T H0 g
        sy = self.s_dot_y.index_select(1, order).index_select(2, order)
        d = sy.diagonal(dim1=1, dim2=2)
        r = sy.triu()
        r.diagonal(dim1=1, dim2=2).copy_(torch.where(d > 0, d, 1.0))  # an empty pair: its own identity row
        u = torch.linalg.solve_triangular(r, w1[:, :, None], upper=True)
        ypy = self.y_p_y.index_select(1, order).index_select(2, order)
        t = torch.baddbmm(d[:, :, None] * u - w2[:, :, None], ypy, u * gamma[:, None, None])
        p = torch.linalg.solve_triangular(r.transpose(1, 2), t, upper=False)
        coef = torch.zeros(b, 2, 2 * m, dtype=g.dtype, device=g.device)
        coef[:, 0].index_copy_(1, order, p[:, :, 0])
        coef[:, 1].index_copy_(1, order + m, u[:, :, 0])
        v = torch.bmm(coef, self.sy)  # (b, 2, P): S p, Y u
        return precondition(v[:, 1]).sub_(pg).mul_(gamma[:, None]).sub_(v[:, 0])


def _lbfgs(obj: _Objective, theta: torch.Tensor, budget: torch.Tensor, *, tol: float,
           history: int, max_line_search: int, direction: str | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run L-BFGS on every problem of ``obj`` from ``theta`` (b, P) float64.

    A problem stops when its largest absolute gradient entry is at most ``tol``, when its relative
    decrease of f is at most ``64 eps`` (both: converged), when its line search finds no
    sufficient decrease in ``max_line_search`` trials, or after ``budget[i]`` iterations.
    ``direction``: how the L-BFGS direction is computed (:func:`_history`; None: by device).

    On a GPU the host waits for the device only where it decides: once per iteration for how many
    problems have stopped (end the loop, compact the batch) and once per backtracking step of the
    line search (whether a problem still needs one); the rest is queued without a synchronisation.

    Returns:
        (theta (b, P) at the stop, iterations used (b,), converged (b,) bool).
    """
    n_batch, n_par = theta.shape
    dev, dt = theta.device, theta.dtype
    theta_out = theta.clone()
    n_iter = torch.zeros(n_batch, dtype=torch.long, device=dev)
    converged = torch.zeros(n_batch, dtype=torch.bool, device=dev)
    ids = torch.arange(n_batch, device=dev)  # original index of each running problem
    theta = theta.clone()
    loss, grad = obj(theta, curvature=True)
    stopped = (grad.abs().amax(dim=1) <= tol)
    converged |= stopped
    stopped |= budget <= 0
    memory = None
    # K G^-1 is the inverse Hessian at theta = 0 (see preconditioner); elsewhere the
    # softmax curvature mean_i (1 - sum_k p_ik^2) / (K - 1) (1 / K at theta = 0) scales it; a start
    # where every sample's softmax is one-hot in floating point (curvature 0, e.g. a warm start from
    # large weights) takes G^-1 unscaled (an infinite scale made every step fail)
    gamma = torch.where(obj.curvature > 0, (obj.k - 1) / obj.curvature, 1.0)
    while True:
        n_stopped = int(stopped.sum())  # the host's one wait per iteration outside the line search
        if n_stopped == len(ids):
            break
        if n_stopped and (memory is None or n_stopped >= _COMPACT_FRACTION * len(ids)):
            # finished problems leave the batch: store their result, copy the rest (integer indices:
            # two waits for the device rather than one per boolean-masked tensor)
            done_rows, keep = stopped.nonzero().squeeze(1), (~stopped).nonzero().squeeze(1)
            theta_out[ids[done_rows]] = theta[done_rows]
            ids, theta, loss, grad, gamma = ids[keep], theta[keep], loss[keep], grad[keep], gamma[keep]
            budget = budget[keep]
            obj.compact(keep)
            stopped = stopped[keep]
            if memory is not None:
                memory.compact(keep)
        if memory is None:  # first iteration: the preconditioner of the problems that run only
            obj.prepare()
            memory = _history(history, len(ids), n_par, dt, dev, direction)
        run = ~stopped
        d = memory.direction(grad, gamma, obj.precondition)
        gd = (grad * d).sum(dim=1)
        # a direction that is not a descent one (round-off) falls back to steepest descent
        bad = gd >= 0
        d = torch.where(bad[:, None], -grad, d)
        gd = torch.where(bad, -(grad * grad).sum(dim=1), gd)
        step = torch.ones_like(loss)
        new_theta = theta + d
        new_loss, new_grad = obj(new_theta)
        ok = new_loss <= loss + _C1 * step * gd
        pending = run & ~ok
        for _ in range(max_line_search):
            rows = pending.nonzero().squeeze(1)  # the step's one wait for the device
            if rows.numel() == 0:
                break
            # safeguarded quadratic interpolation of the step, within [0.1, 0.5] of the last one
            t = step[rows]
            curv = new_loss[rows] - loss[rows] - gd[rows] * t
            t_new = torch.where(curv > 0, -gd[rows] * t * t / (2 * curv), 0.5 * t)
            t_new = torch.minimum(torch.maximum(t_new, 0.1 * t), 0.5 * t)
            step[rows] = t_new
            new_theta[rows] = theta[rows] + t_new[:, None] * d[rows]
            l_r, g_r = obj(new_theta[rows], rows)
            new_loss[rows], new_grad[rows] = l_r, g_r
            ok_r = l_r <= loss[rows] + _C1 * t_new * gd[rows]
            pending[rows] = pending[rows] & ~ok_r
        failed = pending  # no sufficient decrease after max_line_search trials: keep the last point
        accept = run & ~failed
        s_new = new_theta - theta
        y_new = new_grad - grad
        sy = (s_new * y_new).sum(dim=1)
        good = accept & (sy > 0)
        py = obj.precondition(y_new)
        memory.push(s_new, y_new, sy, py, good)
        yy = (y_new * py).sum(dim=1)
        gamma = torch.where(good, sy / torch.where(good, yy, 1.0), gamma)
        decrease = loss - new_loss
        theta = torch.where(accept[:, None], new_theta, theta)
        prev_loss = loss
        loss = torch.where(accept, new_loss, loss)
        grad = torch.where(accept[:, None], new_grad, grad)
        n_iter.index_add_(0, ids, run.long())
        budget = budget - run.long()
        scale = torch.maximum(torch.maximum(prev_loss.abs(), new_loss.abs()), torch.ones_like(loss))
        gmax = grad.abs().amax(dim=1)
        done = run & ((gmax <= tol) | (accept & (decrease <= _FTOL * scale)))
        converged[ids] = converged[ids] | done
        stopped |= done | failed | (budget <= 0)
    theta_out[ids] = theta
    return theta_out, n_iter, converged


#: float64 features are fitted first with float32 products down to this largest gradient entry
#: (or ``tol`` if larger), then finished and checked in float64 (see :func:`fit_multinomial`)
_F32_TOL = 1e-5
#: backtracking steps of the float32 phase: a failed search hands the problem to float64
_F32_MAX_LINE_SEARCH = 10
#: precisions of :func:`fit_multinomial`
PRECISIONS = ("mixed", "float64")


def fit_multinomial(x: torch.Tensor, y: torch.Tensor, n_classes: int, C: float, *,
                    tol: float = 1e-4, max_iter: int = 1000, history: int = HISTORY,
                    init: torch.Tensor | None = None, precision: str = "mixed",
                    direction: str | None = None, compiled: bool | None = None) -> BatchedFit:
    """Fit B L2-penalised multinomial logistic regressions at once (scikit-learn's objective).

    With ``precision="mixed"`` (the default) the fit runs in two phases: L-BFGS with the
    features' products and the softmax in float32 (half the bytes per pass over the features;
    parameters, the loss's and gradient's means over samples and the L-BFGS state stay float64) until the largest gradient entry is at
    most ``max(tol, 1e-5)`` (float32 products are accurate to about 1e-7 there), then, from that
    point, L-BFGS in float64 on the float64 features: every problem's float64 gradient is
    evaluated, and a problem is converged only when it meets scikit-learn's criteria in float64
    (most stop there, with no further iteration). The minimiser and the stopping rule are
    therefore those of the all-float64 fit; only the path differs.

    Args:
        x: (B, n, F) float64 or float32 features of the B problems, on the device to compute
            on (float32 features are the data: the float64 phase upcasts them exactly).
        y: (n,) class index (0 .. n_classes - 1) of each sample, shared by all problems, or
            (B, n): each problem's own labels (e.g. problems from different splits).
        n_classes: K, at least 2.
        C: inverse regularisation strength, as scikit-learn's ``C``.
        tol: a problem stops when its largest absolute gradient entry is at most this
            (scikit-learn's ``tol``: the same criterion on the same objective).
        max_iter: L-BFGS iterations at most per problem (both phases together).
        history: L-BFGS memory.
        init: optional (B, K, F + 1) starting parameters (per class its weights then its
            intercept, as :attr:`BatchedFit.theta`), e.g. the fit of a neighbouring split: a warm
            start; default zeros (scikit-learn's start).
        precision: ``"mixed"`` or ``"float64"`` (every product in float64).
        direction: how L-BFGS computes its directions, ``"two-loop"`` or ``"compact"`` (the same
            directions up to rounding; :class:`_History`); default by device: ``"compact"`` on
            CUDA, else ``"two-loop"``.
        compiled: the float32 phase on the CPU as one compiled loop per problem
            (:mod:`core._logreg_kernel`: the same algorithm with the two-loop recursion, 3-4x less
            time than torch's ops on the demo's problems, and no GIL held). None (default): where
            it can (CPU features, ``"mixed"`` precision, two-loop directions, numba importable),
            else torch's ops; False: torch's ops; True: the compiled loop or an error saying why not.

    Returns:
        A :class:`BatchedFit` (tensors on x's device, float64).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}; got {precision!r}")
    if direction not in (None, "two-loop", "compact"):
        raise ValueError(f"direction must be 'two-loop', 'compact' or None (the device's own); got {direction!r}")
    n_batch, n, n_feat = x.shape
    k = int(n_classes)
    dev = x.device
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"x must be float32 or float64; got {x.dtype}")
    # two classes: the multinomial pair with C / 2 has scikit-learn's binomial minimiser (docstring)
    l2 = 1.0 / ((C / 2 if k == 2 else C) * n)
    if tuple(y.shape) not in ((n,), (n_batch, n)):
        raise ValueError(f"y must have shape (n,) = ({n},) or (B, n) = {(n_batch, n)}; got {tuple(y.shape)}")
    y = y.to(device=dev, dtype=torch.long)
    n_par = (n_feat + 1) * k
    if init is None:
        theta = torch.zeros(n_batch, n_par, dtype=torch.float64, device=dev)
    else:
        if tuple(init.shape) != (n_batch, k, n_feat + 1):
            raise ValueError(f"init must have shape (B, K, F + 1) = {(n_batch, k, n_feat + 1)}; "
                             f"got {tuple(init.shape)}")
        theta = init.to(device=dev, dtype=torch.float64).reshape(n_batch, n_par).clone()
    budget = torch.full((n_batch,), int(max_iter), dtype=torch.long, device=dev)
    n_iter = torch.zeros(n_batch, dtype=torch.long, device=dev)
    kernel = _compiled_phase(dev, precision, compiled, direction)
    if kernel is not None:
        x32 = x.to(torch.float32).contiguous()
        theta = theta.contiguous()
        n_iter_np, _ = kernel.fit_float32(
            x32.numpy(), y.view(-1, n).contiguous().numpy(), k, theta.numpy(), preconditioner(x32, k, l2).numpy(),
            budget.numpy(), l2=l2, tol=max(tol, _F32_TOL), ftol=_FTOL, c1=_C1, history=history,
            max_line_search=_F32_MAX_LINE_SEARCH)
        n_iter = torch.from_numpy(n_iter_np)
    elif precision == "mixed":
        theta, n_iter, _ = _lbfgs(_Objective(x.to(torch.float32), y, k, l2), theta, budget,
                                  tol=max(tol, _F32_TOL), history=history,
                                  max_line_search=_F32_MAX_LINE_SEARCH, direction=direction)
    theta, more, converged = _lbfgs(_Objective(x.to(torch.float64), y, k, l2), theta, budget - n_iter,
                                    tol=tol, history=history, max_line_search=_MAX_LINE_SEARCH,
                                    direction=direction)
    n_iter = n_iter + more
    n_not = int((~converged).sum())
    if n_not:
        log.warning("%d of %d logistic regressions did not converge in %d iterations (largest "
                    "gradient entry above tol=%g, or no decrease found along the search direction); "
                    "increase max_iter", n_not, n_batch, max_iter, tol)
    t = theta.view(n_batch, k, n_feat + 1)
    return BatchedFit(coef=t[:, :, :n_feat].contiguous(), intercept=t[:, :, n_feat].contiguous(),
                      n_iter=n_iter, converged=converged)


def _compiled_phase(device: torch.device, precision: str, compiled: bool | None, direction: str | None = None):
    """:mod:`core._logreg_kernel` where :func:`fit_multinomial`'s float32 phase runs compiled, else None
    (``compiled``: as its argument)."""
    if compiled is False:
        return None
    why = ("the features are on " + str(device) if device.type != "cpu"
           else f"precision is {precision!r} (no float32 phase)" if precision != "mixed"
           else "directions by the compact form (the compiled loop takes the two-loop recursion)"
           if (direction or _DIRECTIONS.get(device.type, "two-loop")) == "compact" else None)
    kernel = _logreg_kernel() if why is None else None
    if why is None and kernel is None:
        why = "numba is not importable"
    if compiled and kernel is None:
        raise ValueError(f"compiled=True: the float32 phase cannot run compiled here: {why}")
    return kernel


@functools.lru_cache(maxsize=None)
def _logreg_kernel():
    """:mod:`core._logreg_kernel` (numba, compiled on first use, cached on disk), or None where numba
    cannot be imported (then torch's ops: 3-4x the time of the float32 phase on the CPU)."""
    try:
        from . import _logreg_kernel as kernel
    except ImportError as e:  # a declared dependency; missing only in hand-made environments
        log.warning("numba is not importable (%s): the decoders' float32 phase runs as torch's ops", e)
        return None
    return kernel


def warm_up(device=None) -> bool:
    """Compile the CPU's float32 phase now (or load it from numba's disk cache), where fits on
    ``device`` (default cpu) would run it: a tiny fit. Compiling takes several seconds once per
    machine (6 s on 2 cores), which a caller can spend in a background thread while other work runs.

    Returns:
        Whether the compiled phase is ready (False where it does not apply: another device, no numba).
    """
    dev = torch.device(device if device is not None else "cpu")
    if _compiled_phase(dev, "mixed", None) is None:
        return False
    x = torch.linspace(-1.0, 1.0, 12, dtype=torch.float32).reshape(1, 6, 2)
    fit_multinomial(x, torch.tensor([0, 1, 0, 1, 0, 1]), 2, 1.0, max_iter=2)
    return True


def fit_many(x: np.ndarray, y: np.ndarray, n_classes: int, C: float, *, device=None,
             tol: float = 1e-4, max_iter: int = 1000, init: torch.Tensor | None = None,
             precision: str = "mixed", compiled: bool | None = None) -> BatchedFit:
    """:func:`fit_multinomial` on B problems, organised for the device.

    On a GPU all B problems are one batch. On CPU they are cut into at least one chunk per thread
    (more where chunks of ``CPU_CHUNK_MIN_PROBLEMS`` problems would exceed ``CPU_CHUNK_BYTES`` of
    features, in their own dtype; where the float32 phase runs compiled, which holds no GIL, every
    thread takes a share however small the batch), fitted on a pool of ``torch.get_num_threads()`` threads with
    every op single-threaded meanwhile (:func:`core._threads.single_threaded_ops`): the narrow
    GEMMs here scale poorly inside one op, and OpenMP teams spin-waiting for busy cores were
    measured to make 2-thread fits several times slower than 1-thread ones on a loaded 2-core
    machine; independent chunks on separate threads have no barrier to wait at.

    Args:
        x: (B, n, F) features, a numpy array or a torch tensor (one on a GPU is used where it
            is): float32 kept as is (the data, as :func:`fit_multinomial`), anything else
            converted to float64.
        y: (n,) class indices shared by all problems, or (B, n): each problem's own.
        n_classes, C, tol, max_iter, precision, compiled: as :func:`fit_multinomial`.
        device: torch device (default cpu).
        init: optional (B, K, F + 1) starting parameters (a warm start), as
            :func:`fit_multinomial`.

    Returns:
        One :class:`BatchedFit` for the B problems, in order.
    """
    dev = torch.device(device if device is not None else "cpu")
    if isinstance(x, torch.Tensor):  # e.g. features already on the device: moved only if elsewhere
        xt = (x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float64)).to(dev).contiguous()
    else:
        x = np.asarray(x)
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32 if x.dtype == np.float32 else np.float64))
    yt = torch.from_numpy(np.asarray(y))
    kw = dict(tol=tol, max_iter=max_iter, precision=precision, compiled=compiled)
    if dev.type != "cpu":
        return fit_multinomial(xt.to(dev), yt, n_classes, C, init=init, **kw)
    n_batch = xt.shape[0]
    per_problem = xt[0].numel() * xt.element_size()
    per_chunk = max(CPU_CHUNK_MIN_PROBLEMS, CPU_CHUNK_BYTES // per_problem)

    def fit(c: torch.Tensor) -> BatchedFit:
        part = slice(int(c[0]), int(c[-1]) + 1)
        return fit_multinomial(xt[part], yt if yt.dim() == 1 else yt[part], n_classes, C,
                               init=None if init is None else init[part], **kw)

    with single_threaded_ops() as workers:
        if _compiled_phase(dev, precision, compiled) is not None:
            n_threads = max(1, min(workers, n_batch))
        else:  # torch's loop holds the GIL between its ops: small batches are faster on one thread
            n_threads = max(1, min(workers, n_batch * per_problem // CPU_THREAD_MIN_BYTES))
        # a multiple of the threads, so that no thread finishes a chunk alone while the others idle
        n_chunks = min(n_batch, -(-n_batch // per_chunk // n_threads) * n_threads)
        chunks = [c for c in torch.tensor_split(torch.arange(n_batch), n_chunks) if c.numel()]
        if n_threads == 1:
            fits = [fit(c) for c in chunks]
        else:
            with ThreadPoolExecutor(max_workers=n_threads, initializer=one_thread_here) as pool:
                fits = list(pool.map(fit, chunks))
    return BatchedFit(coef=torch.cat([f.coef for f in fits]),
                      intercept=torch.cat([f.intercept for f in fits]),
                      n_iter=torch.cat([f.n_iter for f in fits]),
                      converged=torch.cat([f.converged for f in fits]))
