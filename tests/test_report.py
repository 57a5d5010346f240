"""sweep.report: across-model statistics, PNG plots, the Markdown report and W&B runs (offline only)."""

from __future__ import annotations

import json
import logging
import math
import re
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from unitmatch.sweep import figures, report, wandb_sink

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TRAINED = {  # model -> (arch, top-1 %, V4 median r): r rises with top-1 but not monotonically
    "resnet18.a1_in1k": ("resnet18", 71.5, 0.31),
    "resnet50.a1_in1k": ("resnet50", 80.4, 0.36),
    "convnext_tiny.fb_in1k": ("convnext_tiny", 82.1, 0.34),
    "vit_small_patch16_224.augreg_in1k": ("vit_small_patch16_224", 78.8, 0.38),
    "mobilenetv3_small_100.lamb_in1k": ("mobilenetv3_small_100", 67.7, 0.27),
}
# Controls chosen so that including them would change every statistic (one even has a top-1).
UNTRAINED = {"resnet50.random": ("resnet50", np.nan, 0.45), "convnext_tiny.random": ("convnext_tiny", 0.1, 0.50)}


@pytest.fixture(autouse=True)
def wandb_sandbox(tmp_path, monkeypatch):
    """W&B writes only under tmp_path, never finds a key, never goes online."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_env"))
    for name in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home" / name.lower()))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    netrc = tmp_path / "empty.netrc"
    netrc.write_text("")
    monkeypatch.setenv("NETRC", str(netrc))
    return netrc


def _summary(regions=("V4", "IT")) -> pd.DataFrame:
    rows = []
    for k, region in enumerate(regions):
        for trained, models in ((True, TRAINED), (False, UNTRAINED)):
            for model, (arch, top1, r) in models.items():
                rows.append({"model": model, "arch": arch, "trained": trained, "imagenet_top1": top1,
                             "weights": "trained" if trained else "random", "control": not trained,
                             "top1_illustrative": False,
                             "region": region, "n_neurons": 12, "median_test_r": r - 0.05 * k,
                             "median_test_r_sem": 0.01, "mean_test_r": r - 0.05 * k - 0.01,
                             "mean_test_r_sem": 0.012, "frac_significant": 0.75 if trained else np.nan,
                             "median_test_r_ceiled": np.nan, "transfer_accuracy": 0.4, "chance": 0.125})
    return pd.DataFrame(rows)


def _neurons(summary: pd.DataFrame, per_model: int = 12, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for row in summary.itertuples():
        for i in range(per_model):
            depth = rng.choice([0.0, 1 / 3, 2 / 3, 1.0])
            rows.append({"model": row.model, "region": row.region, "neuron": f"{row.region}_{i:02d}",
                         "test_r": rng.normal(row.median_test_r, 0.1), "null_test_r": rng.normal(0, 0.05),
                         "layer": f"stages.{int(round(depth * 3))}", "layer_depth": depth,
                         "significant": bool(rng.random() < 0.7)})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------------

def test_correspondence_stats_match_scipy_over_trained_models_only():
    summary = _summary()
    x = np.array([v[1] for v in TRAINED.values()])
    y = np.array([v[2] for v in TRAINED.values()])
    got = report.correspondence_stats(summary, "V4")
    spearman, pearson = stats.spearmanr(x, y), stats.pearsonr(x, y)
    slope, intercept = np.polyfit(x, y, 1)
    assert got["n_models"] == 5
    assert got["spearman_r"] == pytest.approx(spearman.statistic) and got["spearman_r"] == pytest.approx(0.6)
    assert got["spearman_p"] == pytest.approx(_exact_p(stats.rankdata(x), stats.rankdata(y)))
    assert got["pearson_r"] == pytest.approx(pearson.statistic)
    assert got["pearson_p"] == pytest.approx(_exact_p(x, y))
    assert got["p_method"] == "exact permutation (120 pairings)" and not got["illustrative"]
    assert got["slope"] == pytest.approx(slope) and got["intercept"] == pytest.approx(intercept)
    # The controls would change the answer if they were used.
    with_controls = summary[(summary.region == "V4") & summary.imagenet_top1.notna()]
    assert stats.pearsonr(with_controls.imagenet_top1, with_controls.median_test_r).statistic != pytest.approx(
        got["pearson_r"])
    # Another column and another region.
    mean = report.correspondence_stats(summary, "IT", value="mean_test_r")
    assert mean["pearson_r"] == pytest.approx(stats.pearsonr(x, y - 0.06).statistic)
    assert mean["slope"] == pytest.approx(slope)


def _exact_p(x, y) -> float:
    """P(|r| >= |observed r|) over every pairing of x with y, by enumeration (the reference)."""
    import itertools

    observed = abs(np.corrcoef(x, y)[0, 1])
    rs = [abs(np.corrcoef(np.asarray(perm), y)[0, 1]) for perm in itertools.permutations(x)]
    return float(np.mean(np.asarray(rs) >= observed - 1e-12))


def test_p_values_for_four_models_are_the_exact_permutation_values_not_asymptotic_ones():
    summary = _summary()
    four = summary[summary.model != "mobilenetv3_small_100.lamb_in1k"]
    x = np.array([v[1] for k, v in TRAINED.items() if k != "mobilenetv3_small_100.lamb_in1k"])
    y = np.array([v[2] for k, v in TRAINED.items() if k != "mobilenetv3_small_100.lamb_in1k"])
    got = report.correspondence_stats(four, "V4")
    assert got["n_models"] == 4 and got["p_method"] == "exact permutation (24 pairings)"
    assert got["spearman_p"] == pytest.approx(_exact_p(stats.rankdata(x), stats.rankdata(y)))
    assert got["pearson_p"] == pytest.approx(_exact_p(x, y))
    assert got["spearman_p"] >= 2 / 24  # never 0: the observed pairing and its mirror count
    assert got["spearman_p"] != pytest.approx(stats.spearmanr(x, y).pvalue)  # the asymptotic value differs
    # above 8 models: random pairings, seeded, close to the exact value
    many = pd.concat([summary.assign(model=summary.model + "_b", imagenet_top1=summary.imagenet_top1 + 0.5,
                                     median_test_r=summary.median_test_r + 0.004), summary], ignore_index=True)
    sampled = report.correspondence_stats(many, "V4")
    assert sampled["n_models"] == 10 and sampled["p_method"] == "permutation (100000 random pairings)"
    assert 0 < sampled["pearson_p"] < 1


def test_random_weight_models_are_labelled_random_and_their_x_axis_illustrative(tmp_path):
    summary = _summary(("V4",))
    demo = summary[summary.trained].assign(weights="random", trained=False, top1_illustrative=True)
    demo = pd.concat([demo, summary[~summary.trained]], ignore_index=True)
    s = report.correspondence_stats(demo, "V4")
    assert s["illustrative"] and s["n_models"] == 5  # the demo's models, never its controls
    rows, illustrative = report.fitted_rows(demo, "V4")
    assert illustrative and not rows.control.any()
    md = report.write_markdown(demo, _neurons(demo), tmp_path, {}, title="demo").read_text()
    assert "ILLUSTRATIVE: these models have random weights" in md and "| illustrative |" in md
    assert "weights: trained" not in md and "| trained" not in md
    assert md.count("(illustrative)") == 5 and md.count("random (control)") == 2
    # one trained model with a real top-1 makes the statistics real again, over it alone
    mixed = pd.concat([demo, summary[summary.model == "resnet50.a1_in1k"]], ignore_index=True)
    assert not report.correspondence_stats(mixed, "V4")["illustrative"]
    assert report.correspondence_stats(mixed, "V4")["n_models"] == 1
    run = wandb_sink.log_to_wandb(demo, _neurons(demo, 2), {}, project="unitmatch-test", mode="offline",
                                  wandb_dir=tmp_path / "wb")
    logged = _read_offline_run(run)
    assert logged["summary"]["V4/x_illustrative"] is True and logged["summary"]["V4/n_models"] == 5


def test_correspondence_stats_are_nan_below_three_models():
    summary = _summary()
    keep = summary.model.isin(["resnet18.a1_in1k", "resnet50.a1_in1k"]) | ~summary.trained
    got = report.correspondence_stats(summary[keep], "V4")
    assert got["n_models"] == 2
    assert all(np.isnan(got[k]) for k in report.STAT_KEYS if k != "n_models")
    # A trained model without a top-1 does not count either.
    summary.loc[summary.model == "resnet18.a1_in1k", "imagenet_top1"] = np.nan
    assert report.correspondence_stats(summary, "V4")["n_models"] == 4
    assert report.correspondence_stats(summary, "nowhere")["n_models"] == 0
    with pytest.raises(ValueError, match="no column 'ceiled'"):
        report.correspondence_stats(summary, "V4", value="ceiled")


# --------------------------------------------------------------------------------------------------
# plots and Markdown
# --------------------------------------------------------------------------------------------------

def test_make_plots_writes_valid_pngs(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed: the PNG checks need it")
    from PIL import Image

    summary = _summary()
    neurons = _neurons(summary)
    nulls = {"resnet50.a1_in1k": np.random.default_rng(1).normal(0, 0.05, 500), "not/in the table": np.zeros(3)}
    plots = figures.make_plots(summary, neurons, tmp_path / "plots", nulls=nulls)
    assert set(plots) == {"correspondence_V4", "correspondence_IT", "layer_profile_V4", "layer_profile_IT",
                          "null_resnet50.a1_in1k"}
    for name, path in plots.items():
        assert path == tmp_path / "plots" / f"{name}.png"
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 200


def test_make_plots_without_matplotlib_returns_no_plots(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import raise ImportError
    summary = _summary(("V4",))
    with caplog.at_level(logging.WARNING, logger="unitmatch.sweep.figures"):
        assert figures.make_plots(summary, _neurons(summary), tmp_path) == {}
    assert "matplotlib is not installed" in caplog.text
    assert not list(tmp_path.glob("*.png"))


def _markdown_tables(text: str) -> list[pd.DataFrame]:
    """Every pipe table of a markdown text, as strings (cells stripped, escaped pipes restored).

    The tests read what the tables say, not how they are laid out: column widths, alignment marks and
    number formatting differ between pandas/tabulate versions and the fallback formatter.
    """
    tables, rows = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            rows.append(cells)
            continue
        if rows:
            header, separator, body = rows[0], rows[1], rows[2:]
            assert all(re.fullmatch(r":?-+:?", c) for c in separator), f"not a header separator: {separator}"
            assert all(len(r) == len(header) for r in body), f"rows with other cell counts than {header}"
            tables.append(pd.DataFrame(body, columns=header))
            rows = []
    return tables


def _same_value(cell: str, expected) -> bool:
    """A cell says ``expected``: numbers compared by value (``0.31`` says ``0.310``), text exactly."""
    try:
        return math.isclose(float(cell), float(expected), rel_tol=1e-9, abs_tol=1e-12)
    except (TypeError, ValueError):
        return cell == str(expected)


def test_write_markdown_lists_models_regions_stats_and_plots(tmp_path):
    summary = _summary()
    neurons = _neurons(summary)
    plots = {"correspondence_V4": tmp_path / "correspondence_V4.png", "null_x": tmp_path / "figs" / "null_x.png"}
    path = report.write_markdown(summary, neurons, tmp_path, plots, title="Zoo vs V4")
    assert path == tmp_path / "report.md"
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# Zoo vs V4\n")
    tables = _markdown_tables(text)
    stats = next(t for t in tables if "Spearman ρ" in t.columns).set_index("region")
    assert list(stats.index) == ["V4", "IT"]
    for region in ("V4", "IT"):
        s = report.correspondence_stats(summary, region)
        row = stats.loc[region]
        assert _same_value(row["models"], 5)
        assert _same_value(row["Spearman ρ"], f"{s['spearman_r']:.3f}")
        assert _same_value(row["Pearson r"], f"{s['pearson_r']:.3f}")
    models = next(t for t in tables if "median r" in t.columns)
    assert set(models.model) == set(summary.model.unique())
    assert len(models) == len(summary)  # one row per model and region
    r18 = models[(models.model == "resnet18.a1_in1k") & (models.region == "V4")]["median r"]
    assert r18.tolist() == ["0.310 ± 0.010"]  # resnet18's V4 median r with its SEM
    assert "](correspondence_V4.png)" in text and "](figs/null_x.png)" in text


def test_both_searches_are_reported_side_by_side_each_with_its_own_statistics_and_flagged_neurons_listed(tmp_path):
    """A sweep with an all-units and a region-committed analysis of the same models: one row per
    (model, region) per search; each search's across-model statistics are those of its rows alone."""
    base = _summary(("V4",))
    committed = base.assign(search="region_committed", searched_layers="layer3.0,layer3.1",
                            median_test_r=base.median_test_r[::-1].to_numpy())  # another ranking of the models
    summary = pd.concat([base.assign(search="all_units", searched_layers="all"), committed], ignore_index=True)
    summary["n_neurons_flagged"] = 2
    neurons = _neurons(summary).assign(search=np.repeat(summary.search.to_numpy(), 12), flags="", flagged=False,
                                       analyzed=True)
    bad = (neurons.neuron == "V4_03") | (neurons.neuron == "V4_07")
    neurons.loc[bad, ["flags", "flagged"]] = ["missing_images", True]
    neurons.loc[bad, ["analyzed", "layer", "test_r", "layer_depth"]] = [False, None, np.nan, np.nan]
    assert report.searches(summary) == ["all_units", "region_committed"] and report.searches(base) == ["all_units"]
    for search, part in (("all_units", base), ("region_committed", committed)):
        got = report.correspondence_stats(summary, "V4", search=search)
        trained = part[part.trained]
        assert got["n_models"] == 5
        assert got["pearson_r"] == pytest.approx(stats.pearsonr(trained.imagenet_top1, trained.median_test_r).statistic)
    # without a search named, the all-units rows (the memo's search), as before the column existed
    assert report.correspondence_stats(summary, "V4") == report.correspondence_stats(base, "V4")

    plots = figures.make_plots(summary, neurons, tmp_path, nulls={
        "resnet18.a1_in1k": np.zeros(10) + 0.1, "resnet18.a1_in1k.region_committed": np.zeros(10) - 0.1})
    assert {"correspondence_V4", "correspondence_V4_region_committed", "layer_profile_V4_region_committed",
            "null_resnet18.a1_in1k", "null_resnet18.a1_in1k.region_committed"} <= set(plots)
    text = report.write_markdown(summary, neurons, tmp_path, plots, title="both").read_text()
    side = text.split("## All units vs region-committed")[1].split("##")[0]
    r18 = next(line for line in side.splitlines() if line.startswith("| resnet18.a1_in1k "))
    cells = [c.strip() for c in r18.strip("|").split("|")]
    expect = summary[summary.model == "resnet18.a1_in1k"].set_index("search").median_test_r
    assert cells[2] == f"{expect['all_units']:.3f} ± 0.010"
    assert cells[3] == f"{expect['region_committed']:.3f} ± 0.010"
    assert cells[4] == "layer3.0,layer3.1"
    stats_table = text.split("## Models")[0]
    assert stats_table.count("| V4 ") == 2 and "region_committed" in stats_table
    assert "flagged neurons: 2 (2 left out of the matching" in text and "V4_03 (V4: missing_images)" in text
    assert report.flagged_neurons(neurons).neuron.tolist() == ["V4_03", "V4_07"]
    assert report.flagged_neurons(neurons.drop(columns=["flags", "flagged", "analyzed"])).empty


def test_markdown_table_escapes_pipes_and_dashes_missing_values():
    table = report._markdown_table(pd.DataFrame({"model": ["a|b"], "r": [report._num(np.nan)]}))
    (parsed,) = _markdown_tables(table)
    assert list(parsed.columns) == ["model", "r"]
    assert parsed.values.tolist() == [["a|b", "–"]]


# --------------------------------------------------------------------------------------------------
# W&B
# --------------------------------------------------------------------------------------------------

def _read_offline_run(run, timeout: float = 10.0) -> dict:
    """Decode an offline run file (LevelDB-style log blocks of protobuf Records): summary, history, config,
    artifacts. Offline runs keep no summary JSON on disk, and the run object forgets it once finished.

    ``run.finish()`` can return before W&B's service process has flushed the file (seen here: 7 bytes
    right after finish, the whole run a moment later), so wait for the run's exit record.
    """
    path = Path(run.dir).parent / f"run-{run.id}.wandb"
    deadline = time.monotonic() + timeout
    while True:
        records = _records(path.read_bytes()) if path.exists() else []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        assert time.monotonic() < deadline, f"{path} has no exit record after {timeout} s"
        time.sleep(0.05)
    out = {"summary": {}, "history": {}, "config": {}, "artifacts": []}
    for record in records:
        which = record.WhichOneof("record_type")
        items = {"summary": lambda: record.summary.update, "history": lambda: record.history.item,
                 "config": lambda: record.config.update, "run": lambda: record.run.config.update}
        if which in items:  # the run record carries the initial config, config records its updates
            for item in items[which]():
                key = item.key or "/".join(item.nested_key)
                out["config" if which == "run" else which][key] = json.loads(item.value_json)
        elif which == "artifact":
            out["artifacts"].append((record.artifact.name, record.artifact.type))
    return out


def _records(data: bytes) -> list:
    """The complete records of a (possibly still growing) run file."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2 as pb

    assert data[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too small for a header
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):
            break  # a record still being written
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            try:
                record.ParseFromString(pending)
            except DecodeError:
                break
            records.append(record)
    return records


def test_log_to_wandb_offline_logs_tables_scatter_stats_and_images(tmp_path):
    summary = _summary()
    neurons = _neurons(summary, per_model=3)
    image = tmp_path / "correspondence_V4.png"
    from PIL import Image

    Image.new("RGB", (8, 8), "white").save(image)
    run = wandb_sink.log_to_wandb(summary, neurons, {"correspondence_V4": image}, project="unitmatch-test",
                              mode="offline", group="zoo-1", config={"seed": 3}, wandb_dir=tmp_path / "wb")
    assert run.name == "summary" and run.job_type == "summary" and run.group == "zoo-1"
    assert Path(run.dir).is_relative_to(tmp_path / "wb" / "wandb")
    logged = _read_offline_run(run)
    for region in ("V4", "IT"):
        s = report.correspondence_stats(summary, region)
        assert logged["summary"][f"{region}/spearman_r"] == pytest.approx(s["spearman_r"])
        assert logged["summary"][f"{region}/pearson_r"] == pytest.approx(s["pearson_r"])
        assert logged["summary"][f"{region}/n_models"] == 5
        # The scatter's table holds the five trained models.
        assert logged["summary"][f"correspondence_{region}_table/nrows"] == 5
    assert logged["summary"]["summary/nrows"] == len(summary)
    assert logged["summary"]["neurons/nrows"] == len(neurons)
    assert logged["summary"]["plots/correspondence_V4/_type"] == "image-file"
    assert "correspondence_V4_table/path" in logged["history"]
    assert logged["config"]["seed"] == 3 and logged["config"]["n_models"] == 7
    assert logged["config"]["regions"] == ["V4", "IT"]
    # The table itself is on disk next to the run, with every row.
    table = json.loads((Path(run.dir) / logged["summary"]["summary/path"]).read_text())
    assert len(table["data"]) == len(summary) and "imagenet_top1" in table["columns"]


def test_log_to_wandb_puts_a_large_neuron_table_into_an_artifact(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setattr(wandb.Table, "MAX_ROWS", 20)
    summary = _summary(("V4",))
    neurons = _neurons(summary, per_model=4)  # 28 rows
    run = wandb_sink.log_to_wandb(summary, neurons, {}, project="unitmatch-test", mode="offline",
                              wandb_dir=tmp_path / "wb")
    logged = _read_offline_run(run)
    assert ("neurons-" + run.id, "neurons") in logged["artifacts"]
    assert "neurons/nrows" not in logged["summary"]


def test_auto_mode_without_api_key_is_offline(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_sink.resolve_wandb_mode("auto") == "offline"
    summary = _summary(("V4",))
    with caplog.at_level(logging.INFO, logger="unitmatch.sweep.wandb_sink"):
        run = wandb_sink.log_to_wandb(summary, _neurons(summary, 1), {}, project="unitmatch-test",
                                  wandb_dir=tmp_path / "wb")
    assert run.settings.mode == "offline"
    run_dir = Path(run.dir).parent
    assert run_dir.name.startswith("offline-run-") and run_dir.parent == tmp_path / "wb" / "wandb"
    assert _read_offline_run(run)["summary"]["V4/n_models"] == 5
    assert f"wandb sync {run_dir}" in caplog.text


def test_resolve_wandb_mode(monkeypatch, wandb_sandbox):
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_sink.resolve_wandb_mode("offline") == "offline"
    assert wandb_sink.resolve_wandb_mode("disabled") == "disabled"
    with pytest.raises(ValueError, match="'cloud'.*auto, online, offline, disabled"):
        wandb_sink.resolve_wandb_mode("cloud")
    wandb_sandbox.write_text("machine example.org login user password other\n")
    assert wandb_sink.resolve_wandb_mode() == "offline"
    wandb_sandbox.write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    assert wandb_sink.resolve_wandb_mode() == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")  # a private server: its own host
    assert wandb_sink.resolve_wandb_mode() == "offline"
    wandb_sandbox.write_text("")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_sink.resolve_wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")  # an explicit environment choice wins
    assert wandb_sink.resolve_wandb_mode() == "disabled"


def test_disabled_mode_writes_nothing(tmp_path, wandb_sandbox):
    summary = _summary(("V4",))
    run = wandb_sink.log_to_wandb(summary, _neurons(summary, 2), {}, project="unitmatch-test", mode="disabled",
                              wandb_dir=tmp_path / "wb")
    assert run is not None and run.settings.mode == "disabled"
    model_run = wandb_sink.log_model_run("resnet18.a1_in1k", "extract", {"seconds": 1.0}, project="unitmatch-test",
                                     mode="disabled", wandb_dir=tmp_path / "wb")
    assert model_run is not None
    assert [p for p in tmp_path.rglob("*") if p.is_file() and p != wandb_sandbox] == []


def test_log_model_run_offline(tmp_path):
    run = wandb_sink.log_model_run("resnet18.a1_in1k", "match", {"median_test_r": np.float32(0.25), "n_units": np.int64(7)},
                               project="unitmatch-test", mode="offline", group="zoo-1", config={"top_k": 5},
                               wandb_dir=tmp_path / "wb")
    assert run.name == "resnet18.a1_in1k/match" and run.job_type == "match" and run.group == "zoo-1"
    logged = _read_offline_run(run)
    assert logged["summary"]["median_test_r"] == pytest.approx(0.25)
    assert logged["summary"]["n_units"] == 7
    assert {k: logged["config"][k] for k in ("run.model", "run.stage", "top_k")} == {
        "run.model": "resnet18.a1_in1k", "run.stage": "match", "top_k": 5}
