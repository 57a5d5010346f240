"""Strict one-to-one assignment of neurons to units, and what it costs.

The free choice lets each neuron take its best unit, so several neurons may share one unit. This
module owns the bijective alternative (docs/SCIENCE.md, "Strict one-to-one"): no two neurons share a
unit, and the total train correlation is maximal. It works on each neuron's top-k candidate units
(as reported by the matching engine): with k' = 1, 2, ..., k it builds the bipartite graph
neuron -> its first k' candidates and, at the smallest k' where every neuron can be matched to a
distinct unit, solves the maximum-weight assignment with ``scipy.optimize.linear_sum_assignment``.

It also owns :func:`assignment_drop`, the summary of how much the test score drops when the strict
assignment replaces the free choice.

Memory: the assignment matrix is dense, neurons x (distinct candidate units), so at most
M x (M * k) float64 values.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching

__all__ = ["Assignment", "InfeasibleAssignment", "assignment_drop", "strict_assignment"]


class InfeasibleAssignment(ValueError):
    """No assignment of every neuron to a distinct unit exists among the candidates given.

    Attributes:
        n_neurons: neurons to assign.
        max_matched: the most neurons that can be matched to distinct units with all candidates.
        top_k: candidates per neuron that were available.
    """

    def __init__(self, message: str, *, n_neurons: int, max_matched: int, top_k: int):
        super().__init__(message)
        self.n_neurons = n_neurons
        self.max_matched = max_matched
        self.top_k = top_k


@dataclass
class Assignment:
    """A one-to-one assignment of neurons to units.

    Attributes:
        units: (M,) int64 global unit id assigned to each neuron; all distinct.
        weights: (M,) float64 weight (train r) of the assigned candidate.
        k_used: how many top candidates per neuron were needed (the smallest feasible k'); 0 when
            there are no neurons.
        total: sum of ``weights``.
    """

    units: np.ndarray
    weights: np.ndarray
    k_used: int
    total: float


# ------------------------------------------------------------------------------------ validation
def _validate(candidates, weights) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checked int64 candidates, float64 weights and the mask of filled slots."""
    candidates = np.asarray(candidates)
    weights = np.asarray(weights)
    if candidates.ndim != 2:
        raise ValueError(
            f"candidates must be 2-D (neurons, k); got shape {candidates.shape} ({candidates.ndim}-D)"
        )
    if weights.shape != candidates.shape:
        raise ValueError(
            f"weights must have the same shape as candidates {candidates.shape}; got {weights.shape}"
        )
    if candidates.shape[1] < 1:
        raise ValueError(f"candidates need at least one column (k >= 1); got shape {candidates.shape}")
    if candidates.dtype == bool or not np.issubdtype(candidates.dtype, np.integer):
        raise TypeError(f"candidates must be an integer array of unit ids; got dtype {candidates.dtype}")
    if weights.dtype == bool or not (
        np.issubdtype(weights.dtype, np.floating) or np.issubdtype(weights.dtype, np.integer)
    ):
        raise TypeError(f"weights must be a real (float or integer) array; got dtype {weights.dtype}")
    candidates = candidates.astype(np.int64, copy=False)
    weights = weights.astype(np.float64, copy=False)

    bad = np.argwhere(candidates < -1)
    if bad.size:
        i, s = bad[0]
        raise ValueError(
            f"candidates[{i}, {s}] = {candidates[i, s]} is not a unit id; valid: a unit id >= 0, "
            f"or -1 for an empty slot"
        )
    filled = candidates >= 0
    empty_rows = np.flatnonzero(~filled.any(axis=1))
    if empty_rows.size:
        raise ValueError(
            f"neuron row {empty_rows[0]} has no candidate (all {candidates.shape[1]} slots are -1)"
            + (f"; {empty_rows.size} such rows in all" if empty_rows.size > 1 else "")
            + "; every neuron needs at least one candidate unit"
        )
    bad = np.argwhere(filled & ~np.isfinite(weights))
    if bad.size:
        i, s = bad[0]
        raise ValueError(
            f"weights[{i}, {s}] = {weights[i, s]} for candidate unit {candidates[i, s]}; the weight "
            f"of a filled slot must be finite (use candidate -1 to mark an empty slot)"
        )
    return candidates, weights, filled


def _edges(candidates, weights, filled, k: int):
    """Rows, column indices into the distinct units, the distinct units and edge weights of the
    graph neuron -> its first ``k`` candidates (a unit listed twice for one neuron keeps its
    larger weight)."""
    rows, slots = np.nonzero(filled[:, :k])
    units_of_edge = candidates[rows, slots]
    w = weights[rows, slots]
    units, cols = np.unique(units_of_edge, return_inverse=True)
    cols = cols.reshape(-1)
    # keep one edge per (neuron, unit): the largest weight, then the earliest slot
    order = np.lexsort((slots, -w, cols, rows))
    rows, cols, w = rows[order], cols[order], w[order]
    first = np.ones(rows.size, bool)
    first[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])
    return rows[first], cols[first], units, w[first]


def _max_matching(rows, cols, n_rows: int, n_cols: int) -> int:
    """Size of a maximum matching of the bipartite graph given by its edges."""
    graph = csr_matrix((np.ones(rows.size, np.int8), (rows, cols)), shape=(n_rows, n_cols))
    return int(np.count_nonzero(maximum_bipartite_matching(graph, perm_type="column") >= 0))


# ------------------------------------------------------------------------------------ assignment
def strict_assignment(candidates: np.ndarray, weights: np.ndarray) -> Assignment:
    """Maximum-weight one-to-one assignment of neurons to their top candidate units.

    For k' = 1, 2, ..., k the bipartite graph neuron -> its first k' candidates is built; at the
    first k' where a matching covering every neuron exists, the matching of maximum total weight
    is found with ``scipy.optimize.linear_sum_assignment`` (maximize) on a neurons x (distinct
    units) matrix in which non-edges are forbidden (-inf). Columns are the distinct units in
    ascending id order, so the result is deterministic, ties included.

    Args:
        candidates: (M, k) integer unit ids per neuron, best first; -1 marks an empty slot. A unit
            listed twice for one neuron counts once, with its larger weight.
        weights: (M, k) real train r of each candidate; ignored (may be -inf or NaN) where the
            candidate is -1, must be finite elsewhere. May be negative.

    Returns:
        The assignment: unit and weight per neuron, the k' used and the total weight.

    Raises:
        TypeError: if candidates is not an integer array or weights not a real array.
        ValueError: on a shape mismatch, input that is not 2-D, k < 1, a candidate below -1, a
            neuron without any candidate, or a non-finite weight of a filled slot.
        InfeasibleAssignment: if even with all k candidates no two neurons can be kept apart, i.e.
            no matching covers every neuron; the message says how many neurons could be matched at
            most and that a larger top_k is needed.
    """
    candidates, weights, filled = _validate(candidates, weights)
    n_neurons, top_k = candidates.shape
    if n_neurons == 0:
        return Assignment(np.zeros(0, np.int64), np.zeros(0, np.float64), 0, 0.0)

    for k in range(1, top_k + 1):
        rows, cols, units, w = _edges(candidates, weights, filled, k)
        if units.size < n_neurons or _max_matching(rows, cols, n_neurons, units.size) < n_neurons:
            continue
        matrix = np.full((n_neurons, units.size), -np.inf)
        matrix[rows, cols] = w
        row_ind, col_ind = linear_sum_assignment(matrix, maximize=True)
        chosen = matrix[row_ind, col_ind]
        if row_ind.size != n_neurons or not np.all(np.isfinite(chosen)):  # pragma: no cover
            raise RuntimeError(
                f"linear_sum_assignment used a forbidden edge or left neurons out at k'={k} although "
                f"a full matching exists; this is a bug"
            )
        assigned = np.empty(n_neurons, np.int64)
        assigned[row_ind] = units[col_ind]
        assigned_w = np.empty(n_neurons, np.float64)
        assigned_w[row_ind] = chosen
        return Assignment(assigned, assigned_w, k, float(assigned_w.sum()))

    rows, cols, units, _ = _edges(candidates, weights, filled, top_k)
    best = _max_matching(rows, cols, n_neurons, units.size)
    detail = (
        f" (only {units.size} distinct units among all candidates)" if units.size < n_neurons else ""
    )
    raise InfeasibleAssignment(
        f"no one-to-one assignment exists with top_k={top_k} candidates per neuron: at most {best} "
        f"of {n_neurons} neurons can be matched to distinct units{detail}; a larger top_k is needed "
        f"(re-run the matching with top_k > {top_k})",
        n_neurons=n_neurons,
        max_matched=best,
        top_k=top_k,
    )


# ----------------------------------------------------------------------------------------- drop
def _nan_stat(fn, values: np.ndarray) -> float:
    """``fn`` (a NaN-aware reducer) of ``values``; NaN, without a warning, if all are NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(fn(values)) if values.size else float("nan")


def assignment_drop(
    free_units: np.ndarray, free_test_r: np.ndarray, strict_units: np.ndarray, strict_test_r: np.ndarray
) -> dict:
    """How much the test score drops from the free choice to the strict one-to-one assignment.

    Args:
        free_units: (M,) unit per neuron under the free choice.
        free_test_r: (M,) test r per neuron under the free choice; NaN where undefined.
        strict_units: (M,) unit per neuron under the strict assignment.
        strict_test_r: (M,) test r per neuron under the strict assignment; NaN where undefined.

    Returns:
        ``{"free_median", "strict_median", "drop", "free_mean", "strict_mean", "n_reassigned"}``:
        NaN-ignoring medians and means (NaN if every value is NaN), ``drop = free_median -
        strict_median`` and the number of neurons whose unit changed (int).

    Raises:
        ValueError: if the four arrays are not 1-D of one length.
    """
    arrays = {
        "free_units": np.asarray(free_units),
        "free_test_r": np.asarray(free_test_r, dtype=np.float64),
        "strict_units": np.asarray(strict_units),
        "strict_test_r": np.asarray(strict_test_r, dtype=np.float64),
    }
    for name, a in arrays.items():
        if a.ndim != 1:
            raise ValueError(f"{name} must be 1-D (one value per neuron); got shape {a.shape}")
    lengths = {name: a.shape[0] for name, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"all four arrays need one value per neuron (same length); got lengths {lengths}")
    free_median = _nan_stat(np.nanmedian, arrays["free_test_r"])
    strict_median = _nan_stat(np.nanmedian, arrays["strict_test_r"])
    return {
        "free_median": free_median,
        "strict_median": strict_median,
        "drop": free_median - strict_median,
        "free_mean": _nan_stat(np.nanmean, arrays["free_test_r"]),
        "strict_mean": _nan_stat(np.nanmean, arrays["strict_test_r"]),
        "n_reassigned": int(np.count_nonzero(arrays["free_units"] != arrays["strict_units"])),
    }
