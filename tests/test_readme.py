"""The README's self-contained Python example runs as written (its shell commands are composed in
test_config.py, `make demo` / `make test` run in CI)."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def test_the_numpy_example_of_the_core_api_runs_and_gives_its_tables(capsys):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    (example,) = [b for b in blocks if "rng = np.random.default_rng(0)" in b]
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    matches, result = namespace["matches"], namespace["result"]
    assert isinstance(matches, pd.DataFrame) and len(matches) == 50 * 10
    assert set(matches.layer) <= {"conv", "fc"} and matches.train_r.between(-1, 1).all()
    assert len(result.layer_matches) == 50 * 10 * 2
    assert "train_r" in capsys.readouterr().out
