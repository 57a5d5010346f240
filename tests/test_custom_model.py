"""Models of your own: a factory in a temporary file (through a user config folder on the command line,
and through the Python API), a ready module, weights files, the store identity, every bad input, and
a Ray actor that imports the factory through ``runtime_env`` ``py_modules`` on a local multi-process
cluster.

The reference is independent of the extraction code: Pillow resizes the images, numpy normalizes them
in float64, and forward hooks on a model built by calling the factory directly record the layers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from unitmatch.core.extract import ModelSpec, extract_activations, extract_to_store, prepare_store
from unitmatch.core.layers import OUTPUT, layer_names
from unitmatch.core.store import ActivationStore
from unitmatch.core.synthetic import generate_stimuli
from unitmatch.sweep.config import ConfigError, ModelConfig
from unitmatch.sweep.zoo import entry_from_config, untrained_control

NET_SOURCE = textwrap.dedent('''
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self, width=4, classes=5):
            super().__init__()
            self.conv1 = nn.Conv2d(3, width, 3, padding=1)
            self.relu = nn.ReLU()
            self.pool = nn.MaxPool2d(2)
            self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes))

        def forward(self, x):
            return self.head(self.conv2(self.pool(self.relu(self.conv1(x)))))


    def make_net(width=4, classes=5):
        return Net(width, classes)


    NOT_CALLABLE = 3


    def not_a_module():
        return "a string"
''')

SIZE = 32
MEAN, STD = (0.45, 0.5, 0.55), (0.2, 0.25, 0.3)
PRE = dict(input_size=(3, SIZE, SIZE), mean=MEAN, std=STD)
LAYERS = ["conv1", "conv2", OUTPUT]
#: the same stimuli as the command-line sweep below (stimuli.n_categories=2 ... size=40)
STIM = dict(n_categories=2, objects_per_category=2, variations=3, size=40)


@pytest.fixture(scope="module")
def stimuli():
    return generate_stimuli(**STIM)  # 12 images of 40 px


@pytest.fixture()
def net_file(tmp_path):
    path = tmp_path / "models" / "my_net.py"
    path.parent.mkdir()
    path.write_text(NET_SOURCE)
    return path


def _load(path: Path, name: str):
    """The temporary file's module, imported here independently of core.custom."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"ref_{uuid.uuid4().hex}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def _weights(path: Path, net_file: Path, seed: int, **kwargs) -> Path:
    torch.manual_seed(seed)
    torch.save(_load(net_file, "make_net")(**kwargs).state_dict(), path)
    return path


def _reference(model, stimuli, layers=LAYERS, mean=MEAN, std=STD, bgr=False) -> dict[str, np.ndarray]:
    """Forward-hook outputs (images, units) in float32 on the CPU, from Pillow + float64 numpy preprocessing
    (``bgr``: channels reversed, mean and std in that order)."""
    images = []
    for i in range(len(stimuli)):
        im = stimuli.load_image(i).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)  # crop_pct 1: resize only
        x = np.asarray(im, dtype=np.float64)[..., ::-1] if bgr else np.asarray(im, dtype=np.float64)
        x = (x / 255.0 - np.array(mean)) / np.array(std)
        images.append(x.transpose(2, 0, 1))
    batch = torch.from_numpy(np.stack(images).astype(np.float32))
    modules = {**dict(model.named_modules()), OUTPUT: model}
    out = {}
    hooks = [modules[n].register_forward_hook(lambda _m, _i, o, n=n: out.__setitem__(n, o.detach().clone()))
             for n in layers]
    try:
        with torch.no_grad():
            model.eval()(batch)
    finally:
        for h in hooks:
            h.remove()
    return {n: out[n].reshape(len(stimuli), -1).numpy() for n in layers}


def _assert_store_matches(store: ActivationStore, reference: dict[str, np.ndarray]):
    arrays = store.layers()
    assert list(arrays) == list(reference)
    for name, ref in reference.items():
        got = np.asarray(arrays[name][:], dtype=np.float64)
        assert got.shape == ref.shape, name
        scale = np.abs(ref).max()
        assert scale > 0 and np.abs(got - ref).max() <= 1e-5 * scale, (name, np.abs(got - ref).max(), scale)


# ------------------------------------------------------------------------------------------------ Python API
def test_factory_file_with_weights_fills_a_store_equal_to_a_forward_hook_reference(tmp_path, net_file, stimuli):
    weights = _weights(tmp_path / "w.pt", net_file, seed=7, width=3)
    spec = ModelSpec.from_factory(f"{net_file}:make_net", {"width": 3}, checkpoint=str(weights), **PRE)
    report = extract_to_store(spec, stimuli, LAYERS, tmp_path / "stores", batch_size=5, dtype="float32", device="cpu")
    assert report.store.complete and report.written == [0, 1, 2]

    model = _load(net_file, "make_net")(width=3)
    model.load_state_dict(torch.load(weights))
    _assert_store_matches(ActivationStore.open(report.store.path), _reference(model, stimuli))
    assert report.store.key["preprocessing"] == {"crop_mode": "center", "crop_pct": 1.0, "input_size": [3, 32, 32],
                                                 "interpolation": "bilinear", "mean": list(MEAN), "std": list(STD)}
    assert [u.shape for u in report.store.layer_units] == [(3, 32, 32), (6, 7, 7), (5,)]
    # in memory with the spec's preprocessing: the same numbers
    acts = extract_activations(spec.create(), stimuli, LAYERS, batch_size=5, dtype=np.float32, device="cpu", spec=spec)
    for name in LAYERS:
        np.testing.assert_array_equal(acts[name].reshape(len(stimuli), -1), report.store.layers()[name][:])


def test_random_init_is_seeded_and_a_module_path_factory_imports_from_sys_path(tmp_path, net_file, stimuli,
                                                                                 monkeypatch):
    monkeypatch.syspath_prepend(str(net_file.parent))
    spec = ModelSpec.from_factory("my_net:make_net", seed=3, **PRE)
    torch.manual_seed(3)
    model = _load(net_file, "make_net")()
    for (k, a), (_, b) in zip(model.state_dict().items(), spec.create().state_dict().items()):
        assert torch.equal(a, b), k
    report = extract_to_store(spec, stimuli, LAYERS, tmp_path / "stores", batch_size=6, dtype="float32", device="cpu")
    _assert_store_matches(report.store, _reference(model, stimuli))
    assert spec.identity().startswith("factory:my_net:make_net()@source:") and spec.identity().endswith("@random:3")


def test_a_ready_module_fills_its_store_and_must_not_change(tmp_path, net_file, stimuli):
    torch.manual_seed(0)
    model = _load(net_file, "make_net")(width=2)
    spec = ModelSpec.from_module(model, **PRE)
    assert spec.identity().startswith("module:Net@sha256:") and spec.create() is model
    report = extract_to_store(spec, stimuli, LAYERS, tmp_path / "stores", batch_size=5, dtype="float32", device="cpu",
                              model=model)
    _assert_store_matches(report.store, _reference(model, stimuli))
    # another module with the same class and state has the same identity; other weights do not
    twin = type(model)(width=2)
    twin.load_state_dict(model.state_dict())
    assert ModelSpec.from_module(twin, **PRE).identity() == spec.identity()
    with torch.no_grad():
        model.conv1.bias += 1
    assert ModelSpec.from_module(model, **PRE).identity() != spec.identity()
    with pytest.raises(ValueError, match="not the module it was made from"):
        prepare_store(spec, stimuli, LAYERS, tmp_path / "stores", model=model)


def test_a_ready_module_with_batchnorm_has_an_identity_that_follows_its_buffers():
    """BatchNorm's ``num_batches_tracked`` is a 0-dim buffer: the module's digest hashes it too (it
    raised before), and a change to any buffer (running mean, the batch count) changes the identity."""
    from torch import nn

    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    identity = ModelSpec.from_module(model, **PRE).identity()
    assert identity.startswith("module:Sequential@sha256:")
    twin = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    twin.load_state_dict(model.state_dict())
    assert ModelSpec.from_module(twin, **PRE).identity() == identity
    model[1].num_batches_tracked += 1
    assert ModelSpec.from_module(model, **PRE).identity() != identity
    twin[1].running_mean += 0.5
    assert ModelSpec.from_module(twin, **PRE).identity() != identity


def test_bgr_input_with_caffe_style_means_on_the_0_255_scale(tmp_path, net_file, stimuli):
    """channel_order BGR; "0-255 minus per-channel means, no scaling" is mean = means / 255, std = 1 / 255."""
    spec = ModelSpec.from_factory(f"{net_file}:make_net", seed=2, input_size=(3, SIZE, SIZE), channel_order="BGR",
                                  mean=tuple(m / 255 for m in (103.9, 116.8, 123.7)), std=(1 / 255,) * 3)
    report = extract_to_store(spec, stimuli, LAYERS, tmp_path / "stores", batch_size=6, dtype="float32", device="cpu")
    assert report.store.key["preprocessing"]["channel_order"] == "BGR"
    torch.manual_seed(2)
    model = _load(net_file, "make_net")()
    _assert_store_matches(report.store, _reference(model, stimuli, mean=spec.mean, std=spec.std, bgr=True))
    rgb = ModelSpec.from_factory(f"{net_file}:make_net", seed=2, input_size=(3, SIZE, SIZE), mean=spec.mean, std=spec.std)
    assert "channel_order" not in rgb.data_config(model)  # RGB keys (and stores) stay as they were
    with pytest.raises(ValueError, match=r"channel_order='GBR': expected one of \['RGB', 'BGR'\]"):
        ModelSpec.from_factory(f"{net_file}:make_net", channel_order="GBR", **PRE)


def test_weights_as_safetensors_and_inside_a_training_checkpoint(tmp_path, net_file):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    state = _load(net_file, "make_net")().state_dict()
    save_file(state, tmp_path / "w.safetensors")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "ckpt.pth")
    for path in (tmp_path / "w.safetensors", tmp_path / "ckpt.pth"):
        got = ModelSpec.from_factory(f"{net_file}:make_net", checkpoint=str(path), **PRE).create().state_dict()
        assert all(torch.equal(got[k], v) for k, v in state.items()), path


def test_identity_changes_with_kwargs_weights_seed_and_source_file(tmp_path, net_file):
    def ident(**kw):
        args = dict(kwargs={"width": 4}, checkpoint=None, seed=0) | kw
        return ModelSpec.from_factory(f"{net_file}:make_net", args.pop("kwargs"), **args, **PRE).identity()

    base = ident()
    assert ident() == base
    # the same file through a relative path, another label, other preprocessing: same model identity
    rel = os.path.relpath(net_file)
    assert ModelSpec.from_factory(f"{rel}:make_net", {"width": 4}, name="other", **PRE).identity() == base
    assert ident(kwargs={"width": 5}) != base and ident(kwargs={"width": 4, "classes": 5}) != base
    assert ident(seed=1) != base
    w1 = _weights(tmp_path / "a.pt", net_file, seed=1, width=4)
    w2 = _weights(tmp_path / "b.pt", net_file, seed=2, width=4)
    assert ident(checkpoint=str(w1)) != ident(checkpoint=str(w2)) != base
    # copying the weights to another name keeps the identity: it is their content that counts
    (tmp_path / "copy.pt").write_bytes(w1.read_bytes())
    assert ident(checkpoint=str(tmp_path / "copy.pt")) == ident(checkpoint=str(w1))
    # editing the model's source file makes a new identity, and the edited code is what runs
    net_file.write_text(NET_SOURCE.replace("self.relu = nn.ReLU()", "self.relu = nn.Tanh()"))
    assert ident() != base
    spec = ModelSpec.from_factory(f"{net_file}:make_net", **PRE)
    assert isinstance(spec.create().relu, torch.nn.Tanh)


def test_untrained_control_of_a_factory_model_is_the_factory_without_weights(tmp_path, net_file):
    weights = _weights(tmp_path / "w.pt", net_file, seed=5)
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), {"factory": f"{net_file}:make_net", "kwargs": {"width": 4},
                                                              "checkpoint": str(weights), **_lists(PRE)})
    entry = entry_from_config("mine", cfg)
    assert entry.weights == "checkpoint" and entry.arch == "make_net"
    control = untrained_control(entry, seed=1)
    assert control.key == "mine_untrained" and control.weights == "random"
    assert control.spec == ModelSpec.from_factory(f"{net_file}:make_net", {"width": 4}, name="mine", seed=1, **PRE)
    torch.manual_seed(1)
    expected = _load(net_file, "make_net")(width=4).state_dict()
    assert all(torch.equal(control.spec.create().state_dict()[k], v) for k, v in expected.items())


def _lists(pre: dict) -> dict:
    return {k: list(v) for k, v in pre.items()}


# ------------------------------------------------------------------------------------------------ bad input
def test_every_bad_input_is_a_clear_error_before_any_store_exists(tmp_path, net_file, stimuli):
    root = tmp_path / "stores"

    def fails(match, factory=f"{net_file}:make_net", kwargs=None, layers=LAYERS, **kw):
        pre = {**PRE, **kw}
        with pytest.raises(ValueError, match=match):
            spec = ModelSpec.from_factory(factory, kwargs, **pre)
            prepare_store(spec, stimuli, layers, root)
        assert not root.exists() or not any(root.iterdir())

    fails(r"cannot import module 'no_such_pkg_xyz\.models'.*ModuleNotFoundError.*tried the sys.path folders",
          factory="no_such_pkg_xyz.models:make")
    fails(r"no Python file .*missing\.py", factory=str(tmp_path / "missing.py") + ":make")
    fails(r"has no attribute 'make_nett'; its names: .*'make_net'", factory=f"{net_file}:make_nett")
    fails(r"expected 'package.module:callable' or 'path/to/file.py:callable'", factory="my_net.make_net")
    fails(r"NOT_CALLABLE' is a int, not callable", factory=f"{net_file}:NOT_CALLABLE")
    fails(r"returned a builtins.str, not a torch.nn.Module", factory=f"{net_file}:not_a_module")
    fails(r"called with kwargs \{'depth': 3\} raised TypeError: .*unexpected keyword argument 'depth'",
          kwargs={"depth": 3})
    fails(r"kwargs.width=.*must be JSON values", kwargs={"width": object()})
    fails(r"checkpoint=.*nope\.pt': no such weights file", checkpoint=str(tmp_path / "nope.pt"))
    state = _load(net_file, "make_net")().state_dict()
    state["conv9.weight"] = state.pop("conv1.weight")
    torch.save(state, tmp_path / "renamed.pt")
    fails(r"does not match Net: missing keys \['conv1.weight'\]; unexpected keys \['conv9.weight'\]",
          checkpoint=str(tmp_path / "renamed.pt"))
    _weights(tmp_path / "wide.pt", net_file, seed=0, width=8)
    fails(r"shapes differ: \['conv1.weight: file \(8, 3, 3, 3\), model \(4, 3, 3, 3\)'", checkpoint=str(tmp_path / "wide.pt"))
    (tmp_path / "w.bin").write_bytes(b"0")
    fails(r"must be one of \['.pt', '.pth', '.safetensors'\]; got '.bin'", checkpoint=str(tmp_path / "w.bin"))
    fails(r"unknown layer 'conv3'.*close module names: \['conv2', 'conv1'\]", layers=["conv3"])
    fails(r"\['input_size'\] not set: a factory model has no pretrained config", input_size=None)
    fails(r"\['mean', 'std'\] not set", mean=None, std=None)
    fails(r"mean=\[0.5, 0.5\]: expected 3 finite numbers, one per channel", mean=(0.5, 0.5))
    fails(r"input_size=\[3, -32, 32\]: expected \[3, height, width\] with positive", input_size=(3, -32, 32))
    fails(r"input_size=\[1, 32, 32\]: .*images are RGB", input_size=(1, 32, 32))
    fails(r"std=\[0.2, 0.0, 0.3\]: every std must be > 0", std=(0.2, 0.0, 0.3))
    fails(r"crop_pct=1.5: expected 0 < crop_pct <= 1", crop_pct=1.5)
    fails(r"interpolation='cubic': expected one of \['nearest', 'bilinear', 'bicubic'", interpolation="cubic")


def test_a_module_without_pretrained_config_needs_its_preprocessing_declared(net_file, stimuli):
    model = _load(net_file, "make_net")()
    with pytest.raises(ValueError, match=r"Net has no pretrained config.*\['input_size', 'mean', 'std'\] missing"):
        extract_activations(model, stimuli, ["conv1"], device="cpu")
    acts = extract_activations(model, stimuli, ["conv1"], dtype=np.float32, device="cpu",
                               spec=ModelSpec.from_module(model, **PRE))
    ref = _reference(model, stimuli, ["conv1"])["conv1"]
    assert np.abs(acts["conv1"].reshape(len(stimuli), -1) - ref).max() <= 1e-5 * np.abs(ref).max()


def test_bad_model_configs_name_their_key(net_file):
    def fails(match, **node):
        cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), node)
        with pytest.raises(ConfigError, match=match):
            entry_from_config("mine", cfg)

    fails(r"models.mine: set exactly one of name .* and factory", name="test_resnet", factory=f"{net_file}:make_net")
    fails(r"models.mine: set exactly one of name .* and factory")
    fails(r"models.mine.name='my_net': timm has no architecture .*set models.mine.factory instead", name="my_net")
    fails(r"models.mine.kwargs=\{'width': 3\}: kwargs are a factory's arguments", name="test_resnet",
          kwargs={"width": 3})
    fails(r"models.mine: factory='no_such_pkg_xyz:make': cannot import module", factory="no_such_pkg_xyz:make",
          **_lists(PRE))
    fails(r"models.mine: \['input_size'\] not set", factory=f"{net_file}:make_net", mean=list(MEAN), std=list(STD))
    fails(r"models.mine: std=\[1.0, 1.0\]: expected 3 finite numbers", factory=f"{net_file}:make_net",
          **_lists({**PRE, "std": (1.0, 1.0)}))
    fails(r"models.mine: pretrained=true is for timm tags", factory=f"{net_file}:make_net", pretrained=True,
          **_lists(PRE))
    fails(r"models.mine: checkpoint=.*: no such weights file", factory=f"{net_file}:make_net",
          checkpoint="/nonexistent/w.pt", **_lists(PRE))


# ------------------------------------------------------------------------------------------------ CLI
def _user_conf(tmp_path: Path, net_file: Path, weights: Path) -> Path:
    conf = tmp_path / "myconf" / "models"
    conf.mkdir(parents=True)
    (conf / "my_net.yaml").write_text(textwrap.dedent(f'''\
        # @package models.my_net
        factory: {net_file}:make_net
        kwargs: {{width: 3, classes: 5}}
        checkpoint: {weights}
        input_size: [3, {SIZE}, {SIZE}]
        mean: {list(MEAN)}
        std: {list(STD)}
        layers: [conv1, conv2, "{OUTPUT}"]
        '''))
    return conf.parent


def test_cli_runs_a_factory_model_from_a_user_config_folder(tmp_path, net_file, stimuli):
    weights = _weights(tmp_path / "w.pt", net_file, seed=11, width=3)
    conf = _user_conf(tmp_path, net_file, weights)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "unitmatch.sweep", "--config-dir", str(conf), "models=[my_net]",
           "untrained_controls=[my_net]", "neural.planted_model=my_net", "stage=extract", "logger=none",
           "analysis.stratify=none",  # 12 images: too few for stratified splits (made before extraction)
           "compute.dtype=float32", "compute.batch_size=5", "cluster.num_cpus=2", "cluster.n_actors=1",
           *[f"stimuli.{k}={v}" for k, v in STIM.items()]]
    env = {**os.environ, "UNITMATCH_OUTPUTS": str(out)}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "extracted 2" in proc.stdout, proc.stdout[-2000:]
    stores = {json.loads(p.read_text())["model"]: p.parent for p in (out / "stores").glob("*/key.json")}
    assert len(stores) == 2
    (trained,) = [s for m, s in stores.items() if m.endswith("@sha256:" + _sha(weights))]
    (control,) = [s for m, s in stores.items() if m.endswith("@random:1")]
    model = _load(net_file, "make_net")(width=3)
    model.load_state_dict(torch.load(weights))
    _assert_store_matches(ActivationStore.open(trained), _reference(model, stimuli))
    torch.manual_seed(1)  # control_seed: the factory without its weights file
    _assert_store_matches(ActivationStore.open(control), _reference(_load(net_file, "make_net")(width=3), stimuli))


def test_cli_configuration_errors_of_a_factory_model_exit_2_before_any_work(tmp_path, net_file):
    weights = _weights(tmp_path / "w.pt", net_file, seed=0, width=3)
    conf = _user_conf(tmp_path, net_file, weights)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "unitmatch.sweep", "--config-dir", str(conf), "models=[my_net]",
           "untrained_controls=[]", "neural.planted_model=my_net", "logger=none", "models.my_net.mean=[0.5,0.5]"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "UNITMATCH_OUTPUTS": str(out)})
    assert proc.returncode == 2 and "models.my_net: mean=[0.5, 0.5]: expected 3 finite numbers" in proc.stderr
    assert not (out / "stores").exists()


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------ Ray
def test_a_ray_actor_imports_the_factory_through_runtime_env_py_modules(tmp_path, net_file, stimuli, monkeypatch):
    """A fresh process (Ray's job-level runtime_env applies only to a Ray started with it, and this
    test process may hold the suite's Ray) starts a local 2-CPU Ray with ``py_modules`` = the package
    folder, which is on the driver's ``sys.path`` only (not on ``PYTHONPATH``): a task shows the
    workers import Ray's copy, and an extractor actor fills the store, which equals the forward-hook
    reference."""
    import pickle

    name = f"um_custom_{uuid.uuid4().hex[:8]}"
    package = tmp_path / "code" / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(NET_SOURCE)
    spec = ModelSpec.from_factory(f"{name}:make_net", {"width": 3}, seed=4, **PRE)
    with monkeypatch.context() as m:
        m.syspath_prepend(str(package.parent))
        store = prepare_store(spec, stimuli, LAYERS, tmp_path / "stores", batch_size=4, dtype="float32")
        model = spec.create()
    (tmp_path / "job.pkl").write_bytes(pickle.dumps((spec, stimuli, LAYERS, store)))
    script = textwrap.dedent(f'''
        import importlib.util, json, pickle, sys
        import ray
        from unitmatch.sweep.cluster import ray_session
        from unitmatch.sweep.extract import ZooExtraction

        spec, stimuli, layers, store = pickle.loads(open({str(tmp_path / "job.pkl")!r}, "rb").read())
        assert importlib.util.find_spec({name!r}) is None
        sys.path.insert(0, {str(package.parent)!r})  # the driver imports it (the spec's identity hashes its
        # source); workers do not inherit this process's sys.path, so they get it only from py_modules

        @ray.remote
        def origin(module_name):
            found = importlib.util.find_spec(module_name)
            return None if found is None else found.origin

        with ray_session("local", num_cpus=2, runtime_env={{"py_modules": [{str(package)!r}]}}):
            where = ray.get(origin.remote({name!r}))
            zoo = ZooExtraction({str(tmp_path / "stores")!r}, n_actors=1, batch_size=4, dtype="float32",
                                shard_batches=1)
            try:
                zoo.start()
                (threads,) = {{ray.get(a.threads.remote()) for a in zoo.actors}}
                zoo.run([spec], stimuli, layers, stores={{spec: store}})
            finally:
                zoo.shutdown()
        print(json.dumps({{"where": where, "threads": threads, "log": [i for i, _, _ in zoo.log]}}))
    ''')
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["where"] is not None and not out["where"].startswith(str(tmp_path)), out  # Ray's copy
    assert set(out["log"]) == {spec.identity()} and len(out["log"]) == 3
    before = torch.get_num_threads()
    torch.set_num_threads(out["threads"])  # the actor's thread count: float32 sums in the same order
    try:
        _assert_store_matches(ActivationStore.open(store.path), _reference(model, stimuli))
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------ example
def test_the_cornet_z_example_and_its_model_files(stimuli):
    from hydra import compose, initialize_config_module

    from unitmatch.examples.cornet_z import CORnetZ

    with initialize_config_module(version_base="1.3", config_module="unitmatch.conf"):
        cfg = compose(config_name="config", overrides=["zoo=demo_custom"])
    entry = entry_from_config("demo_cornet_z", cfg.models.demo_cornet_z)
    assert entry.spec.factory == "unitmatch.examples.cornet_z:cornet_z" and entry.arch == "cornet_z"
    assert set(cfg.models) == {"demo_test_convnext", "demo_cornet_z"}
    model = entry.spec.create()
    assert isinstance(model, CORnetZ)
    assert layer_names(model, "children", input_size=(3, 96, 96)) == ["V1", "V2", "V4", "IT", "decoder"]
    size = (3, 96, 96)
    acts = extract_activations(model, stimuli, entry.layers, batch_size=6, dtype=np.float32, device="cpu",
                               spec=entry.spec)
    # 96 px: V1 (7x7, stride 2) and each pool halve the map: 24, 12, 6, 3 px; 16, 32, 64, 128 channels
    assert [acts[n].shape[1:] for n in entry.layers] == [(16, 24, 24), (32, 12, 12), (64, 6, 6), (128, 3, 3)]
    assert entry.spec.data_config(model)["input_size"] == list(size)
    full = entry_from_config("cornet_z", compose_models(["cornet_z"]).models.cornet_z)
    assert full.spec.create().IT.conv.out_channels == 512


def compose_models(models):
    from hydra import compose, initialize_config_module

    with initialize_config_module(version_base="1.3", config_module="unitmatch.conf"):
        return compose(config_name="config", overrides=[f"models=[{','.join(models)}]", "untrained_controls=[]"])
