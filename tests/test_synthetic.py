"""The synthetic brain: ground truth recorded, SNR as asked, repeats, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from unitmatch import core
from unitmatch.core.synthetic import plant_neurons


def test_planted_neurons_follow_the_requested_snr():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5000, 40)).astype(np.float32)
    brain = plant_neurons(x, n_planted=30, n_noise=10, snr=4.0, seed=1)
    t = brain.truth
    assert brain.responses.shape == (40, 5000)
    assert t.planted.sum() == 30 and (t.unit[~t.planted] == -1).all()
    assert t.unit[t.planted].nunique() == 30 and (t.gain[t.planted] > 0).all()
    for row in t[t.planted].itertuples():
        signal = row.gain * x[:, row.unit] + row.offset
        noise = brain.responses[row.Index] - signal
        assert signal.var() / noise.var() == pytest.approx(4.0, rel=0.1)
        # r between neuron and unit is sqrt(snr / (1 + snr))
        assert np.corrcoef(x[:, row.unit], brain.responses[row.Index])[0, 1] == pytest.approx(np.sqrt(0.8), abs=0.02)
    noise_r = [abs(np.corrcoef(x[:, u], brain.responses[j])[0, 1]) for j in range(30, 40) for u in range(40)]
    assert max(noise_r) < 0.1


def test_repeats_average_to_the_requested_snr_and_are_reliable():
    x = np.random.default_rng(2).standard_normal((2000, 10))
    brain = plant_neurons(x, n_planted=5, snr=3.0, repeats=6, seed=3)
    assert brain.responses.shape == (5, 2000, 6)
    mean = brain.responses.mean(axis=2)
    for row in brain.truth.itertuples():
        signal = row.gain * x[:, row.unit] + row.offset
        assert signal.var() / (mean[row.Index] - signal).var() == pytest.approx(3.0, rel=0.12)
    ceiling = core.split_half_reliability(brain.responses)
    assert np.allclose(ceiling, 0.75, atol=0.05)  # snr / (1 + snr)


def test_chosen_units_and_errors():
    x = np.random.default_rng(4).standard_normal((100, 8))
    x[:, 3] = 1.0
    brain = plant_neurons(x, n_planted=2, units=np.array([5, 6]))
    assert brain.truth.unit.tolist() == [5, 6]
    with pytest.raises(ValueError, match="snr must be positive"):
        plant_neurons(x, n_planted=1, snr=0)
    with pytest.raises(ValueError, match="only 7 non-constant units"):
        plant_neurons(x, n_planted=8)
    with pytest.raises(ValueError, match="units must have 2 entries"):
        plant_neurons(x, n_planted=2, units=np.array([1]))
