"""The float32 phase of the batched logistic regressions as one compiled loop per problem (numba; CPU).

:func:`core._logreg.fit_multinomial` runs L-BFGS first with float32 products, then finishes and
checks every problem in float64. On the CPU, torch spends most of the first phase between its two
GEMMs: an iteration is about 220 small ops over the batch (the softmax's passes, the two-loop
recursion's 2 m dot products and updates, the line search's and the stopping rule's bookkeeping),
each a pass over (b, P) float64 or (b, K, n) float32 arrays and a few microseconds of dispatch, and
all of it on one thread (the GIL) per chunk. :func:`fit_float32` runs the same algorithm (the
same objective, preconditioner, memory, initial scaling, line search and stopping rule as
:func:`core._logreg._lbfgs`) one problem at a time in compiled code: a problem's scores and L-BFGS
memory (and a demo-sized problem's features) stay in the core's cache for the whole fit, and the GIL
is released, so threads fit chunks side by side.

Its products are float32 like torch's: the class scores ``z = W x + b`` and the gradient's ``r X``
are float32 GEMMs (SciPy's BLAS, which numba calls for ``np.dot`` on float32 matrices: the demo's
problems' GEMMs run at about 100-140 GFLOPS a core there, against 35-50 for the loops LLVM
vectorised; the features are kept in both layouts, transposed once per problem, and each GEMM is
oriented as OpenBLAS runs it fastest for the problem's size), the softmax's exponentials are float32 (:func:`_exp32`: a
polynomial that vectorises, within 2 float32 ulp of the exponential); the loss's and the
intercept's sums over samples, the penalty, the parameters and the L-BFGS state are float64. The first phase only has to bring a problem near its minimiser: the float64 phase that
follows decides convergence (:func:`core._logreg.fit_multinomial`), so the answers keep their
float64 guarantees whichever way the first phase ran.
"""

from __future__ import annotations

import math

import numpy as np

from ._kernels import _compiled, _dot64 as _dot, _float_from_bits

#: LLVM may reorder sums (and contract a multiply and an add into one rounding) where it vectorises a
#: loop: the products' float32 sums and the float64 sums over samples or parameters. The
#: exponential's range reduction is compiled without it (reordered, it would lose its precision).
_SUMS = {"reassoc", "contract"}
#: features (samples x features) above which the scores' GEMM is computed as X W^T and transposed
#: (OpenBLAS, one thread, 8 classes: 2304 x 256 features 174 us against 369 for W X^T; 1000 x 64
#: 12.7 against 6.9; the two cross near 100,000)
_TALL = 100_000
#: samples whose softmax normalisers are multiplied together before one logarithm (each is at most
#: K, so the product stays finite for K below 10^19)
_LOG_GROUP = 16

# exp(v) = 2^k exp(r), k = round(v / ln 2), r = v - k ln 2 in [-ln2 / 2, ln2 / 2] (ln 2 in two parts,
# the first exact in float32), exp(r) by the degree-7 polynomial of Cephes' expf (Moshier)
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_P0 = np.float32(1.9875691500e-4)
_P1 = np.float32(1.3981999507e-3)
_P2 = np.float32(8.3334519073e-3)
_P3 = np.float32(4.1665795894e-2)
_P4 = np.float32(1.6666665459e-1)
_P5 = np.float32(5.0000001201e-1)
_HALF = np.float32(0.5)
_ONE = np.float32(1.0)
#: below this the exponential is under float32's smallest normal: clamped there (against a softmax
#: normaliser of at least 1 it is nothing)
_EXP_FLOOR = np.float32(-87.0)


def fit_float32(x: np.ndarray, labels: np.ndarray, n_classes: int, theta: np.ndarray, g_inv: np.ndarray,
                budget: np.ndarray, *, l2: float, tol: float, ftol: float, c1: float, history: int,
                max_line_search: int) -> tuple[np.ndarray, np.ndarray]:
    """L-BFGS on each problem from ``theta`` (updated in place), as :func:`core._logreg._lbfgs`.

    Args:
        x: (B, n, F) float32 features, C-contiguous.
        labels: (1, n) class indices shared by all problems, or (B, n) each problem's own; int64,
            each in ``0 .. n_classes - 1``.
        n_classes: K.
        theta: (B, K (F + 1)) float64, C-contiguous: per class its F weights then its intercept; the
            start, overwritten with where each problem stopped.
        g_inv: (B, F + 1, F + 1) float64: each problem's preconditioner (the inverse of its
            regularised Gram matrix, :func:`core._logreg.preconditioner`).
        budget: (B,) int64: iterations each problem may use.
        l2, tol, ftol, c1, history, max_line_search: the penalty ``||W||^2 l2 / 2``, the largest
            gradient entry to stop at, the relative decrease to stop at, the Armijo constant, the
            L-BFGS memory and the backtracking steps before a search fails.

    Returns:
        (iterations used (B,) int64, converged (B,) bool).
    """
    b, n, f = x.shape if x.ndim == 3 else (None, None, None)
    k = int(n_classes)
    p = k * (f + 1) if f is not None else None
    labels, budget = np.ascontiguousarray(labels), np.ascontiguousarray(budget)
    if not (x.dtype == np.float32 and x.ndim == 3 and x.flags.c_contiguous and n >= 1 and k >= 2
            and labels.dtype == np.int64 and labels.ndim == 2 and labels.shape[0] in (1, b)
            and labels.shape[1] == n and theta.dtype == np.float64 and theta.shape == (b, p)
            and theta.flags.c_contiguous and theta.flags.writeable and g_inv.dtype == np.float64
            and g_inv.shape == (b, f + 1, f + 1) and budget.dtype == np.int64 and budget.shape == (b,)
            and int(history) == history >= 1 and int(max_line_search) == max_line_search >= 0):
        raise ValueError(
            f"fit_float32: x {x.dtype}{x.shape}, labels {labels.dtype}{labels.shape}, n_classes {n_classes}, "
            f"theta {theta.dtype}{theta.shape}, g_inv {g_inv.dtype}{g_inv.shape}, budget "
            f"{budget.dtype}{budget.shape}, history {history}, max_line_search {max_line_search}; expected "
            f"float32 (B, n >= 1, F) C-contiguous, int64 (1 or B, n), at least 2 classes, float64 (B, K (F + 1)) "
            f"C-contiguous and writeable, float64 (B, F + 1, F + 1), int64 (B,), integers history >= 1 and "
            f"max_line_search >= 0")
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"fit_float32: labels span {int(labels.min())}..{int(labels.max())}; expected "
                         f"0..{k - 1} for {k} classes")
    n_iter = np.zeros(b, np.int64)
    converged = np.zeros(b, np.bool_)
    _fit_all(x, labels, k, theta, np.ascontiguousarray(g_inv), budget, float(l2), float(tol), float(ftol),
             float(c1), int(history), int(max_line_search), n_iter, converged)
    return n_iter, converged


@_compiled
def _fit_all(x, labels, k, theta, g_inv, budget, l2, tol, ftol, c1, m, max_ls, n_iter, converged):  # pragma: no cover
    """:func:`fit_float32`'s loop over problems, with the work arrays made once."""
    n_batch, n, f = x.shape
    p = theta.shape[1]
    xt = np.empty((f, n), np.float32)  # a problem's features, feature-major (the scores' GEMM reads them so)
    z = np.empty((k, n), np.float32)  # class scores, then probabilities, then their residuals
    top = np.empty(n, np.float32)
    total = np.empty(n, np.float32)
    zt = np.empty((n, k), np.float32) if n * f > _TALL else np.empty((0, k), np.float32)
    w32, gt = np.empty((k, f), np.float32), np.empty((f, k), np.float32)
    grad, new_grad, new_theta = np.empty(p), np.empty(p), np.empty(p)
    d, py = np.empty(p), np.empty(p)
    s, y = np.zeros((m, p)), np.zeros((m, p))
    rho, alpha = np.zeros(m), np.zeros(m)
    for i in range(n_batch):
        xi = x[i]
        for r in range(n):
            for c in range(f):
                xt[c, r] = xi[r, c]
        work = (xi, xt, z, zt, top, total, w32, gt)
        lab = labels[i if labels.shape[0] > 1 else 0]
        n_iter[i], converged[i] = _fit_one(work, lab, k, theta[i], g_inv[i], budget[i], l2, tol, ftol, c1,
                                           m, max_ls, grad, new_grad, new_theta, d, py, s, y, rho, alpha)


@_compiled(fastmath=_SUMS)
def _fit_one(work, lab, k, theta, g_inv, budget, l2, tol, ftol, c1, m, max_ls,
             grad, new_grad, new_theta, d, py, s, y, rho, alpha):  # pragma: no cover
    """One problem's L-BFGS (:func:`core._logreg._lbfgs` for a batch of one): (iterations, converged)."""
    p = theta.shape[0]
    loss, curvature = _objective(work, lab, k, theta, l2, grad, True)
    if _abs_max(grad) <= tol:
        return 0, True
    if budget <= 0:
        return 0, False
    gamma = (k - 1) / curvature if curvature > 0.0 else 1.0  # one-hot everywhere: G^-1 unscaled, as _lbfgs
    count, newest, used = 0, -1, 0
    while True:
        # the direction -H g: the two-loop recursion over the stored pairs, newest first
        for j in range(p):
            d[j] = grad[j]
        for jj in range(count):
            slot = (newest - jj) % m
            a = rho[slot] * _dot(s[slot], d)
            alpha[slot] = a
            for j in range(p):
                d[j] -= a * y[slot, j]
        _precondition(d, g_inv, k, py)
        for j in range(p):
            d[j] = gamma * py[j]
        for jj in range(count - 1, -1, -1):
            slot = (newest - jj) % m
            beta = rho[slot] * _dot(y[slot], d)
            coef = alpha[slot] - beta
            for j in range(p):
                d[j] += coef * s[slot, j]
        for j in range(p):
            d[j] = -d[j]
        gd = _dot(grad, d)
        if gd >= 0.0:  # not a descent direction (round-off): steepest descent
            for j in range(p):
                d[j] = -grad[j]
            gd = -_dot(grad, grad)
        # Armijo backtracking from a unit step, safeguarded quadratic interpolation, at most max_ls
        # steps back
        step, new_loss, ok = 1.0, loss, False
        for trial in range(max_ls + 1):
            if trial:
                curv = new_loss - loss - gd * step
                t = -gd * step * step / (2.0 * curv) if curv > 0.0 else 0.5 * step
                step = min(max(t, 0.1 * step), 0.5 * step)
            for j in range(p):
                new_theta[j] = theta[j] + step * d[j]
            new_loss, _ = _objective(work, lab, k, new_theta, l2, new_grad, False)
            ok = new_loss <= loss + c1 * step * gd
            if ok:
                break
        # the new pair, stored as zeros where the step failed or s.y <= 0
        newest = (newest + 1) % m
        count = min(count + 1, m)
        sy = 0.0
        for j in range(p):
            s[newest, j] = new_theta[j] - theta[j]
            y[newest, j] = new_grad[j] - grad[j]
            sy += s[newest, j] * y[newest, j]
        good = ok and sy > 0.0
        if good:
            _precondition(y[newest], g_inv, k, py)
            gamma = sy / _dot(y[newest], py)
            rho[newest] = 1.0 / sy
        else:
            rho[newest] = 0.0
            s[newest, :] = 0.0
            y[newest, :] = 0.0
        decrease = loss - new_loss
        scale = max(abs(loss), abs(new_loss), 1.0)
        if ok:
            for j in range(p):
                theta[j] = new_theta[j]
                grad[j] = new_grad[j]
            loss = new_loss
        used += 1
        if _abs_max(grad) <= tol or (ok and decrease <= ftol * scale):
            return used, True
        if not ok or used >= budget:
            return used, False


@_compiled(fastmath=_SUMS)
def _objective(work, lab, k, theta, l2, grad, want_curvature):  # pragma: no cover
    """(loss, curvature) at ``theta``, its gradient written into ``grad``; the curvature
    ``1 - mean_i sum_k p_ik^2`` only where asked (else 0)."""
    x, xt, z, zt, top, total, w32, gt = work
    f, n = xt.shape
    stride = f + 1
    penalty = 0.0
    for c in range(k):
        for j in range(f):
            penalty += theta[c * stride + j] * theta[c * stride + j]
    # class scores z = W x + b (BLAS: numba calls SciPy's sgemm), in the orientation faster for the size
    for c in range(k):
        for j in range(f):
            w32[c, j] = np.float32(theta[c * stride + j])
    if n * f > _TALL:
        np.dot(x, w32.T, zt)
        for c in range(k):
            for r in range(n):
                z[c, r] = zt[r, c]
    else:
        np.dot(w32, xt, z)
    for c in range(k):
        bias = np.float32(theta[c * stride + f])
        for r in range(n):
            z[c, r] += bias
    # softmax over classes, per sample, and the loss: mean_i (log sum_k e^(z_ik - top_i) + top_i - z_i,y_i)
    for r in range(n):
        top[r] = z[0, r]
    for c in range(1, k):
        for r in range(n):
            top[r] = max(top[r], z[c, r])
    margin = 0.0
    for r in range(n):
        margin += np.float64(top[r]) - np.float64(z[lab[r], r])
        total[r] = 0.0
    for c in range(k):
        for r in range(n):
            e = _exp32(z[c, r] - top[r])
            z[c, r] = e
            total[r] += e
    logs, product = 0.0, 1.0
    for r in range(n):
        product *= np.float64(total[r])
        if r % _LOG_GROUP == _LOG_GROUP - 1:
            logs += math.log(product)
            product = 1.0
    logs += math.log(product)
    loss = (logs + margin) / n + 0.5 * l2 * penalty
    for r in range(n):
        total[r] = _ONE / total[r]
    curvature = 0.0
    for c in range(k):
        for r in range(n):
            z[c, r] *= total[r]
        if want_curvature:
            for r in range(n):
                curvature += np.float64(z[c, r]) * np.float64(z[c, r])
    if want_curvature:
        curvature = 1.0 - curvature / n
    for r in range(n):
        z[lab[r], r] -= _ONE
    # gradient: (r X) / n + l2 W for the weights, mean_i r_ik for the intercepts
    np.dot(xt, z.T, gt)  # (F, K): faster than z x, (K, F), for large problems, as fast for small ones
    for c in range(k):
        for j in range(f):
            grad[c * stride + j] = np.float64(gt[j, c]) / n + l2 * theta[c * stride + j]
        acc64 = 0.0
        for r in range(n):
            acc64 += np.float64(z[c, r])
        grad[c * stride + f] = acc64 / n
    return loss, curvature


@_compiled(fastmath={"contract"})
def _exp32(v):  # pragma: no cover
    """e^v for float32 v <= 0 (clamped at -87): 2^k times a polynomial of the remainder, no branch,
    so that loops over it vectorise."""
    v = max(v, _EXP_FLOOR)
    k = np.floor(v * _LOG2E + _HALF)
    r = v - k * _LN2_HI - k * _LN2_LO
    poly = ((((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5) * r * r + r) + _ONE
    bits = np.uint32(np.int32(k) + np.int32(127))
    return poly * _float_from_bits(np.uint32(bits << np.uint32(23)))


@_compiled
def _precondition(v, g_inv, k, out):  # pragma: no cover
    """``out = G^-1`` applied to each class's (F + 1) block of ``v``: one (K, F + 1) x (F + 1, F + 1)
    GEMM (BLAS; G^-1 is symmetric)."""
    stride = g_inv.shape[0]
    np.dot(v.reshape((k, stride)), g_inv, out.reshape((k, stride)))


@_compiled(fastmath=_SUMS)
def _abs_max(a):  # pragma: no cover
    """The largest |a_j|, NaN where any is NaN (as torch's amax: a NaN gradient never meets a tolerance)."""
    top = 0.0
    for j in range(a.shape[0]):
        v = abs(a[j])
        if v != v:
            return v
        top = max(top, v)
    return top
