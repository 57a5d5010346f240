"""The sweep's typed configuration: one dataclass per config group, registered in Hydra's ConfigStore.

``conf/config.yaml`` starts from the schema (``- unitmatch_schema`` in its defaults list), so Hydra
checks every group file and every command-line override against these dataclasses when it composes
the config: a wrong type (``analysis.top_k=abc``) or an unknown enum value (``stage=foo``) fails
there. Two things Hydra lets through are checked by :func:`validate`, which the app calls before
any work: keys added with ``+`` that the schema does not know (``+analysis.n_permutation=10``),
and values outside the ranges declared in the field metadata (``analysis.alpha=2``). Every error
names the key, the value and what would be valid.

Science settings (``analysis``: splits, statistics) and compute settings (``compute``: store dtype,
batch and block sizes, scheduler, device) are separate groups: only the science settings (and the
store identity, which includes the store dtype) enter a result's fingerprint, so changing only how
a result is computed reuses it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from unitmatch.core.store import DEFAULT_CODEC


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and what is valid."""


def _range(lo=None, hi=None, *, lo_open: bool = False, hi_open: bool = False) -> dict:
    return {"range": (lo, hi, lo_open, hi_open)}


class Stage(str, Enum):
    all = "all"
    extract = "extract"
    analyze = "analyze"
    report = "report"
    verify = "verify"


class StimuliKind(str, Enum):
    generated = "generated"
    files = "files"


class NeuralKind(str, Enum):
    synthetic = "synthetic"
    plain = "plain"
    brainio = "brainio"


class Stratify(str, Enum):
    object_name = "object_name"      # Brain-Score's default: an error when the images have no object_name
    auto = "auto"                    # the first usable of object_name, object, category_name, category
    none = "none"                    # unstratified (ShuffleSplit)
    object = "object"
    category_name = "category_name"
    category = "category"


class StoreDtype(str, Enum):
    float16 = "float16"
    float32 = "float32"


class Scheduler(str, Enum):
    auto = "auto"
    threads = "threads"
    sync = "sync"
    ray = "ray"


class MatchGemm(str, Enum):
    auto = "auto"        # CUDA: float16 blocks through float16 tensor-core GEMMs (float32 sums)
    float32 = "float32"  # float32 GEMMs everywhere


class WandbMode(str, Enum):
    auto = "auto"
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class ModelConfig:
    """One zoo member: ``conf/models/<key>.yaml`` (the file's name is the model's key)."""

    name: Optional[str] = None                # timm name, with a pretrained tag when pretrained (or factory)
    factory: Optional[str] = None             # instead of name: "package.module:callable" or "file.py:callable"
    kwargs: Dict[str, Any] = field(default_factory=dict)  # the factory's keyword arguments
    pretrained: bool = False                  # load the tag's published weights
    checkpoint: Optional[str] = None          # a local weights file instead (its sha256 is its identity)
    seed: int = 0                             # random initialisation (random-weight models)
    layers: Any = "blocks"                    # a preset (blocks, stages, leaves, children), names/globs/re:, @output
    input_size: Optional[List[int]] = None    # (C, H, W); null: the model's pretrained config (factory: required)
    crop_pct: Optional[float] = None          # resize to input/crop_pct, center-crop (factory default 1)
    interpolation: Optional[str] = None       # bilinear, bicubic, ... (factory default bilinear)
    mean: Optional[List[float]] = None        # per channel, 0-1 pixel scale (factory: required)
    std: Optional[List[float]] = None         # per channel, 0-1 pixel scale (factory: required)
    channel_order: Optional[str] = None       # RGB (null) or BGR; mean and std in that order
    imagenet_top1: Optional[float] = field(default=None, metadata=_range(0, 100))
    imagenet_top1_source: str = ""


@dataclass
class StimuliConfig:
    kind: StimuliKind = StimuliKind.generated
    # generated: category = shape family, object = colour/scale, variation = position
    n_categories: int = field(default=8, metadata=_range(2))
    objects_per_category: int = field(default=5, metadata=_range(1))
    variations: int = field(default=10, metadata=_range(1))
    size: int = field(default=96, metadata=_range(16))
    seed: int = 0
    # files: a folder or zip of images, and an optional metadata CSV
    path: Optional[str] = None
    metadata: Optional[str] = None


@dataclass
class NeuralConfig:
    kind: NeuralKind = NeuralKind.synthetic
    region: Optional[str] = None              # plain: the region of every neuron; brainio: keep only this one
    # synthetic: planted neurons are noisy copies of random units of one zoo model
    planted_model: str = "demo_test_convnext"
    n_planted: int = field(default=48, metadata=_range(1))
    n_noise: int = field(default=16, metadata=_range(0))
    snr: float = field(default=1.0, metadata=_range(0, lo_open=True))
    repeats: int = field(default=8, metadata=_range(1))
    seed: int = 0
    # plain: responses .npy (neurons x images [x repeats]); brainio: a netCDF assembly
    responses: Optional[str] = None
    path: Optional[str] = None
    time_bin: Optional[int] = None


@dataclass
class AnalysisConfig:
    """Science settings: they decide the numbers, and they enter every result's fingerprint."""

    splits: int = field(default=10, metadata=_range(1))
    train_size: float = field(default=0.9, metadata=_range(0, 1, lo_open=True, hi_open=True))
    random_state: int = 1
    stratify: Stratify = Stratify.object_name
    top_k: int = field(default=5, metadata=_range(2, 4096))
    n_permutations: int = field(default=100, metadata=_range(0, 100_000))
    min_varying_images: int = field(default=10, metadata=_range(1))
    alpha: float = field(default=0.05, metadata=_range(0, 1, lo_open=True, hi_open=True))
    decode: bool = True
    n_random_populations: int = field(default=100, metadata=_range(0, 100_000))
    # region-committed search: {region: [layer names, globs, re: regexes]}; null: every unit of every layer.
    # (Any: OmegaConf cannot override an Optional[Dict] that is null; its shape is checked by validate.)
    region_layers: Any = field(default=None, metadata={"check": lambda key, v: _check_region_layers(key, v)})


@dataclass
class ComputeConfig:
    """How the numbers are computed; changing these reuses finished results."""

    dtype: StoreDtype = StoreDtype.float16    # activation store dtype (part of the store's identity)
    codec: str = field(default=DEFAULT_CODEC, metadata={"check": lambda key, v: _check_codec(key, v)})
    batch_size: int = field(default=32, metadata=_range(1, 65_536))
    block_units: Optional[int] = field(default=None, metadata=_range(1))
    scheduler: Scheduler = Scheduler.auto
    device: Optional[str] = None              # matching device; null: cuda where a GPU is seen, else cpu
    gemm: MatchGemm = MatchGemm.auto          # matching GEMMs of float16 blocks on CUDA (core.MatchSettings.gemm)
    # ActivationStore.chunk_cache budget per model; null: a quarter of the memory available then
    chunk_cache_mb: Optional[int] = field(default=None, metadata=_range(0))


@dataclass
class ClusterConfig:
    address: str = "local"                    # local: a private Ray on this machine; auto or ray://host:port
    num_cpus: Optional[int] = field(default=None, metadata=_range(1))
    # null: sized for the cluster once Ray runs (sweep.extract.actor_plan)
    n_actors: Optional[int] = field(default=None, metadata=_range(1))
    num_gpus_per_actor: Optional[float] = field(default=None, metadata=_range(0))
    num_cpus_per_actor: float = field(default=1.0, metadata=_range(0))
    shard_batches: int = field(default=4, metadata=_range(1))
    decode_workers: Optional[int] = field(default=None, metadata=_range(0))   # DataLoader image decoders per actor
    writer_threads: Optional[int] = field(default=None, metadata=_range(1))   # store writer threads per actor
    in_flight: int = field(default=2, metadata=_range(1))
    memory_per_actor: int = field(default=0, metadata=_range(0))          # bytes Ray reserves per actor
    resources_per_actor: Dict[str, float] = field(default_factory=dict)   # custom Ray resources per actor
    gpus_per_reduce_task: Optional[float] = field(default=None, metadata=_range(0, 1))  # null: by GPU memory
    cpus_per_reduce_task: Optional[float] = field(default=None, metadata=_range(0, lo_open=True))  # null: Ray's 1
    wait_log_s: float = field(default=30.0, metadata=_range(0, lo_open=True))   # how often waits are logged
    connect_timeout_s: float = field(default=10.0, metadata=_range(0, lo_open=True))  # a remote address answers
    runtime_env: Dict[str, Any] = field(default_factory=dict)  # Ray runtime_env of the job (py_modules, working_dir)


@dataclass
class LoggerConfig:
    enabled: bool = True
    project: str = "unitmatch"
    entity: Optional[str] = None
    mode: WandbMode = WandbMode.auto
    dir: str = "."


@dataclass
class SweepConfig:
    models: Dict[str, ModelConfig] = field(default_factory=dict)
    untrained_controls: List[str] = field(default_factory=list)
    control_seed: int = 1
    stimuli: StimuliConfig = field(default_factory=StimuliConfig)
    neural: NeuralConfig = field(default_factory=NeuralConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    stage: Stage = Stage.all
    sweep_name: str = "demo"
    results_dir: str = MISSING
    store_root: str = MISSING
    shared_data: str = MISSING


def register() -> None:
    """Put the schema in Hydra's ConfigStore (``conf/config.yaml`` lists it first)."""
    ConfigStore.instance().store(name="unitmatch_schema", node=SweepConfig)


register()


# ----------------------------------------------------------------------------------------- checks
def validate(cfg: DictConfig) -> None:
    """Unknown keys and out-of-range values, before any work.

    Raises:
        ConfigError: the first problem found, naming the key, the value and what is valid.
    """
    _check_node(cfg, SweepConfig, "")


def _check_node(node: DictConfig, schema: type, path: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node.keys():
        if key not in fields:
            where = path.rstrip(".") or "the top level"
            close = difflib.get_close_matches(str(key), list(fields), n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise ConfigError(f"unknown config key {path}{key} (in {where}){hint} valid keys: {sorted(fields)}")
    for name, f in fields.items():
        key = f"{path}{name}"
        if OmegaConf.is_missing(node, name):
            raise ConfigError(f"config key {key} is not set; give it on the command line ({key}=...)")
        value = node[name]
        if isinstance(value, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(value)):
            _check_node(value, OmegaConf.get_type(value), f"{key}.")
        elif isinstance(value, DictConfig) and name == "models":
            for model_key, model in value.items():
                _check_node(model, ModelConfig, f"{key}.{model_key}.")
        elif "range" in f.metadata and value is not None:
            _check_range(key, value, *f.metadata["range"])
        elif "check" in f.metadata and value is not None:
            f.metadata["check"](key, value)


def _check_codec(key: str, value) -> None:
    from unitmatch.core.store import parse_codec

    try:
        parse_codec(value, name=key)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _check_region_layers(key: str, value) -> None:
    value = OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value
    ok = isinstance(value, dict) and value and all(
        isinstance(v, list) and v and all(isinstance(e, str) for e in v) for v in value.values())
    if not ok:
        raise ConfigError(f"{key}={value!r} is not valid: give null (all units) or a mapping of each region to a "
                          f"non-empty list of layer names, globs or 're:' regexes, e.g. {key}='{{V4:[layer3.*],"
                          f"IT:[layer4.*]}}'")


def _check_range(key: str, value, lo, hi, lo_open: bool, hi_open: bool) -> None:
    bad = isinstance(value, float) and not math.isfinite(value)
    if lo is not None:
        bad = bad or (value <= lo if lo_open else value < lo)
    if hi is not None:
        bad = bad or (value >= hi if hi_open else value > hi)
    if bad:
        lo_s = "" if lo is None else f"{lo} {'<' if lo_open else '<='} "
        hi_s = "" if hi is None else f" {'<' if hi_open else '<='} {hi}"
        raise ConfigError(f"{key}={value!r} is out of range: valid is {lo_s}{key.rsplit('.', 1)[-1]}{hi_s}")


def plain(cfg: DictConfig) -> DictConfig:
    """The validated config resolved, with enums as their strings (what the stages read)."""
    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
