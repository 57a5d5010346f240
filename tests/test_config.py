"""The typed config: every group composes, models are a real Hydra group with derived controls, bad
configs fail before any work naming key and value, documented overrides compose, users add their own
model files, and `unitmatch.core` stays free of the orchestration stack."""

from __future__ import annotations

import csv
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from unitmatch.sweep.config import ConfigError, validate
from unitmatch.sweep.stages import run
from unitmatch.sweep.zoo import entry_from_config, plan_models

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TIMM_RESULTS = ROOT.parent / "shared" / "data" / "timm-results-imagenet.csv"


def _compose(overrides=()):
    with initialize_config_module(version_base="1.3", config_module="unitmatch.conf"):
        return compose(config_name="config", overrides=list(overrides))


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["zoo", "stimuli", "neural", "analysis", "compute", "cluster", "logger",
                                   "experiment"])
def test_every_option_of_every_group_composes_and_validates_or_names_its_missing_path(group):
    for option in _options(group):
        cfg = _compose([f"{group}={option}"])
        try:
            validate(cfg)
        except ConfigError as err:  # a data path the user must give (MajajHong2015, plain, brainio)
            assert re.search(r"(stimuli|neural)\.(path|metadata|responses) is not set", str(err)), (option, err)


def test_every_model_file_is_its_own_package_and_names_a_timm_architecture():
    models = _options("models")
    assert len(models) >= 30
    for key in models:
        first = (CONF / "models" / f"{key}.yaml").read_text().splitlines()[0]
        assert first == f"# @package models.{key}", key
    cfg = _compose([f"models=[{','.join(models)}]", "untrained_controls=[]"])
    validate(cfg)
    for key in models:  # checks the timm architecture exists; creates no model
        entry = entry_from_config(key, cfg.models[key])
        assert entry.key == key and entry.control is None
        random = key.startswith("demo_") or cfg.models[key].factory is not None  # factory examples: random init
        assert entry.spec.pretrained == entry.trained == (not random)
        assert entry.weights == ("random" if random else "trained")
        assert entry.top1_illustrative == (random and entry.imagenet_top1 is not None)
    for zoo in _options("zoo"):
        assert set(_compose([f"zoo={zoo}"]).models) <= set(models)


def test_model_files_carry_timm_published_top1_of_their_exact_tag():
    if not TIMM_RESULTS.exists():
        pytest.skip(f"timm's results table is not at {TIMM_RESULTS} (../shared/data is absent in this checkout)")
    top1: dict[str, list[float]] = {}
    with open(TIMM_RESULTS) as f:
        for row in csv.DictReader(f):  # a tag may have rows at several image sizes
            top1.setdefault(row["model"], []).append(float(row["top1"]))
    cfg = _compose([f"models=[{','.join(_options('models'))}]", "untrained_controls=[]"])
    for key, model in cfg.models.items():
        if model.factory is not None:  # not a timm model: no published row, and no top-1 claimed
            assert model.imagenet_top1 is None, key
            continue
        tag = model.name if model.pretrained else f"{model.name}.r160_in1k"  # demo: the trained tag's value
        assert min(abs(model.imagenet_top1 - t) for t in top1[tag]) < 5e-4, key


def test_the_classic2018_zoo_uses_torchvision_era_weights_that_timm_publishes():
    from unitmatch.core._compat import import_timm

    timm = import_timm()
    published = set(timm.list_pretrained())
    entries = plan_models(_compose(["zoo=classic2018"]))
    trained = [e for e in entries if e.trained]
    assert len(trained) == 17 and {e.key for e in entries if not e.trained} == {"resnet18_tv_untrained",
                                                                                "resnet50_tv_untrained"}
    for e in trained:
        assert e.spec.pretrained and e.spec.name in published, e.spec.name
        assert e.imagenet_top1 is not None and 60 < e.imagenet_top1 < 85, e.key
    tags = {e.arch: e.spec.name.split(".")[1] for e in trained}
    for arch in ("vgg16", "vgg19_bn", "resnet18", "resnet50", "resnet152", "densenet121", "densenet201",
                 "inception_v3"):
        assert tags[arch] == "tv_in1k", (arch, tags[arch])
    assert {tags[a] for a in ("nasnetalarge", "pnasnet5large", "legacy_xception")} == {"tf_in1k"}


def test_models_are_a_hydra_group_with_per_model_overrides_and_derived_controls():
    cfg = _compose(["zoo=classic", "models.resnet50.imagenet_top1=79.9",
                    "models.resnet50.imagenet_top1_source=own eval"])
    assert "resnet50" in cfg.models and "vgg16" in cfg.models and cfg.models.resnet50.imagenet_top1 == 79.9
    entries = {e.key: e for e in plan_models(cfg)}
    control = entries["resnet50_untrained"]
    assert control.control == "untrained" and not control.trained and control.imagenet_top1 is None
    assert not control.spec.pretrained and control.spec.seed == cfg.control_seed == 1
    assert control.spec.name == "resnet50" and control.layers == entries["resnet50"].layers
    assert entries["resnet50"].imagenet_top1_source == "own eval"
    assert sorted(k for k in entries if k.endswith("_untrained")) == ["resnet18_untrained", "resnet50_untrained"]

    picked = _compose(["models=[resnet18,vit_small_patch16_224]", "untrained_controls=[vit_small_patch16_224]"])
    assert [e.key for e in plan_models(picked)] == ["resnet18", "vit_small_patch16_224",
                                                    "vit_small_patch16_224_untrained"]
    demo = {e.key: e for e in plan_models(_compose())}
    assert demo["demo_test_convnext_untrained"].spec.identity() == "test_convnext@random:1"
    with pytest.raises(ConfigError, match="already has random weights with seed 0"):
        plan_models(_compose(["control_seed=0"]))


@pytest.mark.parametrize("override, message", [
    ("+analysis.n_permutation=10", r"unknown config key analysis\.n_permutation .*did you mean \['n_permutations'"),
    ("+typo=1", r"unknown config key typo"),
    ("+models.demo_test_vit.layer=[blocks.0]", r"unknown config key models\.demo_test_vit\.layer "),
    ("analysis.alpha=2", r"analysis\.alpha=2\.0 is out of range: valid is 0 < alpha < 1"),
    ("analysis.splits=0", r"analysis\.splits=0 is out of range: valid is 1 <= splits"),
    ("analysis.top_k=0", r"analysis\.top_k=0 is out of range"),
    ("compute.batch_size=0", r"compute\.batch_size=0 is out of range"),
    ("cluster.n_actors=0", r"cluster\.n_actors=0 is out of range"),
    ("analysis.train_size=1.0", r"analysis\.train_size=1\.0 is out of range: valid is 0 < train_size < 1"),
    ("neural=plain", r"neural\.responses is not set"),
    ("stimuli.variations=2", r"analysis\.stratify='object_name'.* cannot split the 80 images: .*analysis\.stratify=none does not"),
    ("analysis.min_varying_images=0", r"analysis\.min_varying_images=0 is out of range"),
    ("untrained_controls=[demo_test_convnext] control_seed=0", r"already has random weights"),
])
def test_bad_values_fail_before_any_work_naming_key_and_value(override, message, tmp_path, monkeypatch):
    monkeypatch.setenv("UNITMATCH_OUTPUTS", str(tmp_path))
    cfg = _compose(override.split() + ["logger=none"])
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert not (tmp_path / "stores").exists() and not (tmp_path / "sweeps").exists()


@pytest.mark.parametrize("override, message", [
    ("analysis.top_k=abc", r"Value 'abc' of type 'str' could not be converted to Integer\s+full_key: analysis\.top_k"),
    ("stage=everything", r"Invalid value 'everything', expected one of \[all, extract, analyze, report, verify\]"),
    ("compute.dtype=float64", r"Invalid value 'float64', expected one of \[float16, float32\]"),
    ("compute.gemm=float16", r"Invalid value 'float16', expected one of \[auto, float32\]"),
    ("model=resnet50", r"Key 'model' not in 'SweepConfig'"),
    ("models=[resnet5O]", r"Could not load 'models/resnet5O'"),
    ("analysis.decode=maybe", r"full_key: analysis\.decode"),
])
def test_wrong_types_and_unknown_choices_fail_at_composition(override, message):
    with pytest.raises((HydraException, OmegaConfBaseException)) as info:
        _compose([override])
    assert re.search(message, f"{info.value}\n{info.value.__cause__}"), (info.value, info.value.__cause__)


def _readme_overrides() -> list[list[str]]:
    """The override lists of every `unitmatch ...` command in the README's shell blocks."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split("#", 1)[0].strip()
            if not line.startswith("unitmatch ") or "--config-dir" in line:  # (own folders: tested below)
                continue
            tokens, args = shlex.split(line)[1:], []
            multirun = "-m" in tokens or "--multirun" in tokens
            for i, token in enumerate(tokens):
                if token.startswith("-") or (i and tokens[i - 1] == "--cfg"):
                    continue
                if multirun and "],[" in token:  # a sweep over lists: its first job
                    token = token.split("],[")[0] + "]"
                args.append(token)
            commands.append(args)
    return commands


def test_every_documented_override_example_composes_and_validates():
    commands = _readme_overrides()
    assert len(commands) >= 5, commands
    for args in commands:
        cfg = _compose(args)
        validate(cfg)
        plan_models(cfg)


def test_a_users_own_config_folder_adds_model_files(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "my_resnet.yaml").write_text(
        "# @package models.my_resnet\nname: test_resnet\npretrained: false\nseed: 7\nlayers: [layer1, layer4]\n")
    proc = subprocess.run([sys.executable, "-m", "unitmatch.sweep", "--config-dir", str(tmp_path),
                           "models=[my_resnet,demo_test_vit]", "untrained_controls=[my_resnet]", "--cfg", "job"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    job = OmegaConf.create(proc.stdout)
    assert list(job.models) == ["my_resnet", "demo_test_vit"] and job.models.my_resnet.seed == 7
    assert [e.key for e in plan_models(job)] == ["my_resnet", "demo_test_vit", "my_resnet_untrained"]


def test_importing_the_core_library_pulls_in_no_orchestration_stack():
    code = ("import sys, unitmatch.core, unitmatch.core.extract, unitmatch.core.store, unitmatch.core.analysis\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'hydra', 'wandb', 'dask', 'omegaconf'}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
