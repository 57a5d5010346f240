"""The zoo: which models a sweep runs, as :class:`ModelEntry` objects built from the config.

Models are the Hydra group ``models`` (``conf/models/<key>.yaml``, or a user's own config folder
through ``--config-dir``): a zoo file or ``models=[a,b]`` selects them, and each lands at
``cfg.models.<key>``, so ``models.resnet50.imagenet_top1=79.9`` overrides one value with Hydra's own
syntax. A model file names a timm model (``name``) or a model of your own (``factory``, see
:mod:`core.custom`). Untrained controls are derived, not written: every key in
``untrained_controls`` adds ``<key>_untrained``, the same architecture and layers with random weights
(seed ``control_seed``; for a factory model: the factory without its weights file) and no ImageNet
accuracy.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from unitmatch.core._compat import import_timm
from unitmatch.core.extract import ModelSpec

from .config import ConfigError

log = logging.getLogger(__name__)

CONTROL_SUFFIX = "_untrained"


@dataclass(frozen=True)
class ModelEntry:
    """One model of the sweep.

    Attributes:
        key: its name in the sweep (the model file's name; ``<key>_untrained`` for a control).
        spec: the model and its weights, as an identity.
        layers: the layer selection (preset or list of names / globs / ``re:`` regexes).
        imagenet_top1: ImageNet-1k top-1 (%) of exactly these weights; None when unknown or random.
        imagenet_top1_source: where that number comes from.
        control: ``"untrained"`` for a derived random-weight control, else None.
    """

    key: str
    spec: ModelSpec
    layers: object
    imagenet_top1: float | None
    imagenet_top1_source: str
    control: str | None = None

    @property
    def weights(self) -> str:
        """What the weights are: ``"trained"`` (a published tag), ``"checkpoint"`` (a local file) or ``"random"``."""
        if self.spec.checkpoint:
            return "checkpoint"
        return "trained" if self.spec.pretrained else "random"

    @property
    def trained(self) -> bool:
        return self.weights != "random"

    @property
    def top1_illustrative(self) -> bool:
        """A top-1 that belongs to other (trained) weights than these random ones: an illustrative x value."""
        return self.weights == "random" and self.imagenet_top1 is not None

    @property
    def arch(self) -> str:
        return self.spec.arch


def entry_from_config(key: str, model: DictConfig) -> ModelEntry:
    """A :class:`ModelEntry` from one ``models.<key>`` node: a timm ``name`` or a ``factory``.

    A factory is imported here (and its weights file looked for), so that a model that cannot be
    built fails before any work.

    Raises:
        ConfigError: neither or both of name and factory; the architecture is not a timm model (close
            names listed); a factory that does not import or is not callable, a missing weights file,
            missing or inconsistent preprocessing (each naming its ``models.<key>.`` key).
    """
    where = f"models.{key}"
    if (model.name is None) == (model.factory is None):
        raise ConfigError(f"{where}: set exactly one of name (a timm model) and factory ('package.module:callable' "
                          f"or 'path/to/file.py:callable'); got name={model.name!r}, factory={model.factory!r}")
    if model.factory is None:
        arch = str(model.name).split(".")[0]
        timm = import_timm()
        if not timm.is_model(arch):
            close = difflib.get_close_matches(arch, timm.list_models(), n=5)
            raise ConfigError(f"{where}.name={model.name!r}: timm has no architecture {arch!r}; close names: {close}; "
                              f"for a model of your own, set {where}.factory instead")
        if model.kwargs:
            raise ConfigError(f"{where}.kwargs={dict(model.kwargs)!r}: kwargs are a factory's arguments; "
                              f"{where} is the timm model {model.name!r}")
    pre = {k: (tuple(model[k]) if k in ("input_size", "mean", "std") else model[k]) for k in
           ("input_size", "crop_pct", "interpolation", "mean", "std", "channel_order") if model[k] is not None}
    try:
        if model.factory is not None:
            kwargs = OmegaConf.to_container(model.kwargs, resolve=True)
            spec = ModelSpec.from_factory(str(model.factory), kwargs, name=key, checkpoint=model.checkpoint,
                                          seed=int(model.seed), **pre)
            if model.pretrained:
                raise ValueError("pretrained=true is for timm tags: give a factory model's weights as checkpoint")
            spec.check()
        else:
            spec = ModelSpec(str(model.name), pretrained=bool(model.pretrained), checkpoint=model.checkpoint,
                             seed=int(model.seed), **pre)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
    layers = OmegaConf.to_container(model.layers) if OmegaConf.is_config(model.layers) else model.layers
    return ModelEntry(key, spec, layers, None if model.imagenet_top1 is None else float(model.imagenet_top1),
                      str(model.imagenet_top1_source))


def untrained_control(entry: ModelEntry, seed: int) -> ModelEntry:
    """The random-weight control of ``entry``: same architecture, preprocessing and layers, seed ``seed``
    (a factory model: the factory with the same arguments, without its weights file).

    Raises:
        ConfigError: ``entry`` itself has random weights with that seed (the control would be it).
    """
    spec = dataclasses.replace(entry.spec, name=entry.arch if entry.spec.factory is None else entry.spec.name,
                               pretrained=False, checkpoint=None, seed=seed)
    if spec.identity() == entry.spec.identity():
        raise ConfigError(f"untrained_controls: {entry.key!r} already has random weights with seed {seed}; "
                          f"set control_seed to another value")
    return ModelEntry(entry.key + CONTROL_SUFFIX, spec, entry.layers, None,
                      "untrained (random weights): no ImageNet accuracy", control="untrained")


def plan_models(cfg: DictConfig) -> list[ModelEntry]:
    """The sweep's models: the selected model files, then the derived untrained controls.

    A control is derived for each key of ``untrained_controls`` that is selected; the others are
    named in a warning (a job of a multirun over ``models=`` runs only some of a zoo's models).

    Raises:
        ConfigError: no model selected, or an unknown architecture.
    """
    if not cfg.models:
        raise ConfigError("no model selected: pick a zoo (zoo=demo|classic|modern|all) or models=[name,...] "
                          "(the names of conf/models/*.yaml or of your own config folder's models/)")
    entries = {key: entry_from_config(str(key), model) for key, model in cfg.models.items()}
    unselected = [key for key in cfg.untrained_controls if key not in entries]
    if unselected:
        log.warning("untrained_controls %s: not selected models, so no control for them (selected: %s)",
                    unselected, sorted(entries))
    controls = [untrained_control(entries[key], int(cfg.control_seed))
                for key in cfg.untrained_controls if key in entries]
    return [*entries.values(), *controls]


def load_model(key: str, what: str) -> ModelEntry:
    """One model file by name, through the running app's config search path (user folders too).

    Used for a model the job needs but did not select (the synthetic brain's planted model in a
    multirun over ``models=``).

    Raises:
        ConfigError: no Hydra context, or no such model file (the available ones listed).
    """
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    if not GlobalHydra.instance().is_initialized():
        raise ConfigError(f"{what}={key!r} is not a selected model; select it (models=[...]) or run inside the app")
    try:
        cfg = compose(config_name="config", overrides=[f"models=[{key}]", "untrained_controls=[]"])
    except HydraException as err:
        raise ConfigError(f"{what}={key!r}: {err}") from None
    return entry_from_config(key, cfg.models[key])
