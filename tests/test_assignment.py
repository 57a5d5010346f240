"""core.assignment: strict one-to-one assignment against brute force, edge cases and errors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from unitmatch.core.assignment import Assignment, InfeasibleAssignment, assignment_drop, strict_assignment


def _brute_force(candidates: np.ndarray, weights: np.ndarray, k: int) -> float | None:
    """Best total over all injective choices of one of each neuron's first k candidates; None if none."""
    options = [
        [(int(u), float(w)) for u, w in zip(c[:k], ws[:k]) if u >= 0]
        for c, ws in zip(candidates, weights)
    ]
    best = None
    for choice in itertools.product(*options):
        units = [u for u, _ in choice]
        if len(set(units)) == len(units):
            total = sum(w for _, w in choice)
            best = total if best is None else max(best, total)
    return best


def _random_case(rng: np.random.Generator):
    m = int(rng.integers(1, 6))
    k = int(rng.integers(1, 5))
    pool = int(rng.integers(1, m + 3))  # small pool: collisions and infeasibility are frequent
    candidates = rng.integers(0, pool, size=(m, k)) * 7 + 3  # non-contiguous global ids
    weights = rng.uniform(-1, 1, size=(m, k))
    empty = rng.random((m, k)) < 0.2
    empty[np.arange(m), rng.integers(0, k, m)] = False  # every neuron keeps a candidate
    candidates[empty] = -1
    weights[empty] = rng.choice([np.nan, -np.inf], size=int(empty.sum()))
    return candidates, weights


def _check_valid(result: Assignment, candidates: np.ndarray, weights: np.ndarray):
    m = candidates.shape[0]
    assert result.units.shape == (m,) and result.units.dtype == np.int64
    assert result.weights.shape == (m,) and result.weights.dtype == np.float64
    assert len(set(result.units.tolist())) == m, "assigned units must be distinct"
    for i in range(m):
        first = candidates[i, : result.k_used]
        assert result.units[i] in first[first >= 0]
        allowed = weights[i, : result.k_used][first == result.units[i]]
        assert result.weights[i] == allowed.max()
    assert result.total == pytest.approx(result.weights.sum(), abs=1e-12)


def test_matches_brute_force_on_random_cases():
    rng = np.random.default_rng(0)
    n_feasible = n_infeasible = n_grown = 0
    for _ in range(200):
        candidates, weights = _random_case(rng)
        k = candidates.shape[1]
        optima = [_brute_force(candidates, weights, kk) for kk in range(1, k + 1)]
        if optima[-1] is None:
            with pytest.raises(InfeasibleAssignment, match="top_k"):
                strict_assignment(candidates, weights)
            n_infeasible += 1
            continue
        result = strict_assignment(candidates, weights)
        n_feasible += 1
        n_grown += result.k_used > 1
        assert optima[result.k_used - 1] is not None, "infeasible at the k_used reported"
        assert all(o is None for o in optima[: result.k_used - 1]), "a smaller k' was already feasible"
        assert abs(result.total - optima[result.k_used - 1]) <= 1e-12
        _check_valid(result, candidates, weights)
    # the random cases exercise every branch
    assert n_feasible > 50 and n_infeasible > 10 and n_grown > 10


def test_duplicate_unit_within_a_row_keeps_the_larger_weight():
    candidates = np.array([[5, 5], [5, 6]])
    weights = np.array([[0.2, 0.9], [0.1, 0.0]])
    result = strict_assignment(candidates, weights)
    assert result.units.tolist() == [5, 6]
    assert result.weights.tolist() == [0.9, 0.0]
    assert result.k_used == 2


def test_no_collisions_keeps_the_free_choice():
    rng = np.random.default_rng(1)
    candidates = np.stack([rng.permutation(1000)[:4] for _ in range(30)])
    candidates[:, 0] = rng.permutation(1000)[:30]  # distinct best units
    weights = -np.sort(-rng.uniform(-1, 1, (30, 4)), axis=1)
    result = strict_assignment(candidates, weights)
    assert result.k_used == 1
    np.testing.assert_array_equal(result.units, candidates[:, 0])
    np.testing.assert_array_equal(result.weights, weights[:, 0])
    assert result.total == pytest.approx(weights[:, 0].sum())


@pytest.mark.parametrize(
    "weights, expected_units, expected_total",
    [
        # neuron 0 loses less by moving (0.9 -> 0.8) than neuron 1 (0.7 -> 0.1): neuron 1 keeps unit 10
        ([[0.9, 0.8], [0.7, 0.1]], [11, 10], 0.8 + 0.7),
        # now neuron 1 loses less by moving: neuron 0 keeps unit 10
        ([[0.9, 0.2], [0.7, 0.6]], [10, 12], 0.9 + 0.6),
    ],
)
def test_two_neurons_sharing_a_best_unit(weights, expected_units, expected_total):
    candidates = np.array([[10, 11], [10, 12]])
    result = strict_assignment(candidates, np.array(weights))
    assert result.units.tolist() == expected_units
    assert result.k_used == 2
    assert result.total == pytest.approx(expected_total, abs=1e-15)


def test_negative_weights_and_empty_slots():
    candidates = np.array([[4, -1, -1], [4, 2, -1], [4, -1, 9]])
    weights = np.array([[-0.5, np.nan, np.nan], [-0.1, -0.3, -np.inf], [-0.2, np.nan, -0.9]])
    result = strict_assignment(candidates, weights)
    # neuron 0 can only have unit 4, so neurons 1 and 2 take their second candidates
    assert result.units.tolist() == [4, 2, 9]
    assert result.weights.tolist() == [-0.5, -0.3, -0.9]
    assert result.k_used == 3
    assert result.total == pytest.approx(-1.7, abs=1e-15)


def test_negative_weights_prefer_the_larger_total():
    # both assignments are feasible at k' = 2; the one with the larger (less negative) total wins
    candidates = np.array([[1, 2], [1, 2]])
    weights = np.array([[-0.1, -0.9], [-0.2, -0.3]])
    result = strict_assignment(candidates, weights)
    assert result.units.tolist() == [1, 2]
    assert result.total == pytest.approx(-0.4, abs=1e-15)


def test_ties_are_deterministic():
    candidates = np.array([[1, 2], [1, 2], [3, 1]])
    weights = np.array([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])
    results = [strict_assignment(candidates, weights) for _ in range(5)]
    assert all(r.units.tolist() == results[0].units.tolist() for r in results)
    assert results[0].total == pytest.approx(1.5)


def test_accepts_lists_and_integer_weights():
    result = strict_assignment([[0, 1], [0, 2]], [[3, 2], [3, 1]])
    assert result.units.tolist() == [1, 0] and result.total == 5.0


def test_no_neurons():
    result = strict_assignment(np.zeros((0, 3), np.int64), np.zeros((0, 3)))
    assert result.units.shape == (0,) and result.k_used == 0 and result.total == 0.0


@pytest.mark.parametrize(
    "candidates, weights, error, match",
    [
        (np.zeros((2, 3), np.int64), np.zeros((2, 2)), ValueError, r"same shape.*\(2, 3\).*\(2, 2\)"),
        (np.zeros(3, np.int64), np.zeros(3), ValueError, "2-D"),
        (np.zeros((2, 0), np.int64), np.zeros((2, 0)), ValueError, "k >= 1"),
        (np.zeros((2, 2)), np.zeros((2, 2)), TypeError, "integer.*float64"),
        (np.zeros((2, 2), np.int64), np.zeros((2, 2), bool), TypeError, "real"),
        (np.array([[1, 2], [-1, -1]]), np.zeros((2, 2)), ValueError, "neuron row 1 has no candidate"),
        (np.array([[1, -2]]), np.zeros((1, 2)), ValueError, r"candidates\[0, 1\] = -2"),
        (np.array([[1, 2]]), np.array([[0.1, np.nan]]), ValueError, r"weights\[0, 1\] = nan"),
    ],
)
def test_invalid_input(candidates, weights, error, match):
    with pytest.raises(error, match=match):
        strict_assignment(candidates, weights)


def test_infeasible_when_candidates_are_shared():
    candidates = np.array([[7, 8], [8, 7], [7, 8]])
    with pytest.raises(InfeasibleAssignment, match=r"at most 2 of 3 neurons.*larger top_k") as info:
        strict_assignment(candidates, np.full((3, 2), 0.5))
    assert info.value.max_matched == 2 and info.value.n_neurons == 3 and info.value.top_k == 2
    assert isinstance(info.value, ValueError)


def test_infeasible_when_units_are_fewer_than_neurons():
    candidates = np.array([[1, -1], [1, -1], [1, -1], [2, 1]])
    with pytest.raises(InfeasibleAssignment, match=r"at most 2 of 4.*only 2 distinct units.*top_k"):
        strict_assignment(candidates, np.ones((4, 2)))


def test_assignment_drop_hand_example():
    free_units = np.array([3, 3, 5, 8])
    free_r = np.array([0.8, 0.6, 0.4, np.nan])
    strict_units = np.array([3, 4, 5, 9])
    strict_r = np.array([0.8, 0.2, 0.4, 0.1])
    out = assignment_drop(free_units, free_r, strict_units, strict_r)
    assert out["free_median"] == pytest.approx(0.6)
    assert out["strict_median"] == pytest.approx(0.3)
    assert out["drop"] == pytest.approx(0.3)
    assert out["free_mean"] == pytest.approx(0.6)
    assert out["strict_mean"] == pytest.approx(0.375)
    assert out["n_reassigned"] == 2 and isinstance(out["n_reassigned"], int)


def test_assignment_drop_all_nan_and_errors():
    out = assignment_drop([1], [np.nan], [1], [np.nan])
    assert math.isnan(out["free_median"]) and math.isnan(out["drop"]) and out["n_reassigned"] == 0
    with pytest.raises(ValueError, match="same length"):
        assignment_drop([1, 2], [0.1, 0.2], [1], [0.1])
    with pytest.raises(ValueError, match="free_test_r must be 1-D"):
        assignment_drop([1], [[0.1]], [1], [0.1])
