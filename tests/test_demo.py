"""The README's main command: the built-in demo runs end to end and recovers the planted units."""

from __future__ import annotations

import pandas as pd

from sweep.__main__ import main


def test_demo_recovers_planted_units_and_writes_tables(tmp_path, capsys):
    main(["--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "planted neurons: unit recovered in" in printed
    matches = pd.read_parquet(tmp_path / "matches.parquet")
    for column in ("neuron", "split", "unit", "layer", "channel", "y", "x", "train_r", "test_r", "topk_unit",
                   "planted", "recovered", "ceiling", "region"):
        assert column in matches.columns
    assert matches.split.nunique() == 10 and matches.neuron.nunique() == 64
    planted = matches[matches.planted]
    noise = matches[~matches.planted]
    assert planted.recovered.mean() >= 0.95
    assert planted.test_r.median() > 0.6 and abs(noise.test_r.median()) < 0.15
    assert (noise.train_r > noise.test_r).mean() > 0.9  # selection inflates train r of noise neurons
    neurons = pd.read_csv(tmp_path / "neurons.csv")
    assert len(neurons) == 64 and (tmp_path / "layer_matches.parquet").exists()
