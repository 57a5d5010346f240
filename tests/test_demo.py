"""The README's main command: the built-in demo runs end to end and recovers the planted units."""

from __future__ import annotations

import pandas as pd

from sweep.__main__ import main


def test_demo_recovers_planted_units_and_writes_tables(tmp_path, capsys):
    main(["--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "planted units recovered in" in printed and "significant (BH q<=0.05)" in printed
    matches = pd.read_parquet(tmp_path / "matches.parquet")
    for column in ("neuron", "split", "unit", "layer", "channel", "y", "x", "train_r", "test_r", "topk_unit",
                   "region", "recovered"):
        assert column in matches.columns
    assert matches.split.nunique() == 10 and matches.neuron.nunique() == 64
    planted, noise = matches[matches.region == "V4"], matches[matches.region == "noise"]
    assert planted.recovered.mean() >= 0.95
    assert planted.test_r.median() > 0.6 and abs(noise.test_r.median()) < 0.15
    assert (noise.train_r > noise.test_r).mean() > 0.9  # selection inflates train r of noise neurons
    neurons = pd.read_csv(tmp_path / "neurons.csv")
    assert len(neurons) == 64
    assert neurons[neurons.planted].significant.mean() >= 0.95
    assert neurons[~neurons.planted].significant.mean() <= 0.1
    summary = pd.read_csv(tmp_path / "summary.csv").set_index("region")
    assert summary.loc["V4", "transfer_accuracy"] > summary.loc["noise", "transfer_accuracy"]
    for name in ("layer_matches.parquet", "decoding.csv"):
        assert (tmp_path / name).exists()
