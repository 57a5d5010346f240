"""In-memory extraction with forward hooks on timm's tiny test models (random weights)."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest
import torch

from unitmatch.core.extract import create_model, extract_activations, full_float32, preprocess
from unitmatch.core.layers import layer_names, probe_layers
from unitmatch.core.synthetic import generate_stimuli
from unitmatch.core.units import Activations, LayerUnits, as_layers, catalogue_of


@pytest.fixture(scope="module")
def stimuli():
    return generate_stimuli(n_categories=2, objects_per_category=2, variations=5, size=48)


def _images(stimuli, n=None):
    return np.stack([np.asarray(stimuli.load_image(i)) for i in range(n or len(stimuli))])


def test_hooked_output_equals_forward_features(stimuli):
    model = create_model("test_resnet", seed=1)
    acts = extract_activations(model, stimuli, ["layer4"], batch_size=7, dtype=np.float32, device="cpu")
    with torch.inference_mode():
        direct = model.forward_features(preprocess(model, _images(stimuli))).numpy()
    assert acts["layer4"].shape == direct.shape
    np.testing.assert_allclose(acts["layer4"], direct, rtol=1e-5, atol=1e-5)
    assert not model.layer4._forward_hooks  # hooks removed


def test_every_unit_of_every_stage_in_float16(stimuli):
    model = create_model("test_convnext")
    layers = layer_names(model, "stages")
    acts = extract_activations(model, stimuli, "stages", batch_size=8, device="cpu")  # a preset: the same layers
    assert list(acts) == layers == ["stages.0", "stages.1", "stages.2", "stages.3"]
    for a in acts.values():
        assert a.dtype == np.float16 and a.shape[0] == len(stimuli) and a.ndim == 4
        assert np.isfinite(a).all() and a.astype(np.float32).std() > 0
    float32 = extract_activations(model, stimuli, layers, batch_size=5, dtype="float32", device="cpu")
    for name in layers:  # float16 output is the rounding of the float32 output, whatever the batch size
        np.testing.assert_array_equal(acts[name], float32[name].astype(np.float16))


def test_in_memory_activations_carry_the_probed_layer_descriptions(stimuli):
    model = create_model("test_vit")
    acts = extract_activations(model, stimuli, ["patch_embed", "blocks.0", "head"], batch_size=8)
    assert isinstance(acts, Activations) and acts.n_images == len(stimuli)
    assert list(acts.layer_units) == probe_layers(model, ["patch_embed", "blocks.0", "head"])
    units = {u.name: u for u in acts.layer_units}
    assert units["blocks.0"].dims == ("token", "channel") and units["blocks.0"].prefix_tokens == 1
    assert units["patch_embed"].prefix_tokens == 0 and units["head"].prefix_tokens == 0
    # the engine's catalogue of these activations is the probed description, class token included
    cat = catalogue_of(as_layers(acts))
    assert cat.layers == list(acts.layer_units)
    row = cat.describe(np.array([cat.offset("blocks.0") + 5])).iloc[0]
    assert (row.token, row.channel, row.prefix_token) == (0, 5, True)
    # a plain dict has no descriptions: rank defaults, nothing flagged (documented)
    plain = catalogue_of(as_layers(dict(acts)))
    assert plain.layer("blocks.0").prefix_tokens == 0 and plain.layer("blocks.0").dims == ("token", "channel")


def test_activations_refuse_arrays_that_do_not_fit_their_descriptions():
    a = np.zeros((4, 3, 5), np.float32)
    layer = LayerUnits("blk", (3, 5), ("token", "channel"), prefix_tokens=1)
    assert Activations({"blk": a}, [layer])["blk"] is a
    with pytest.raises(ValueError, match=r"'blk': array of shape \(4, 5, 3\) does not hold \(images, \*\(3, 5\)\)"):
        Activations({"blk": np.zeros((4, 5, 3))}, [layer])
    with pytest.raises(ValueError, match=r"descriptions \['blk'\] do not match the arrays' layers \['other'\]"):
        Activations({"other": a}, [layer])
    with pytest.raises(ValueError, match="has 2 images, earlier layers have 4"):
        Activations({"blk": a, "fc": np.zeros((2, 7))}, [layer, LayerUnits("fc", (7,), ("channel",))])


def test_the_callers_model_is_left_as_it_was(stimuli):
    """Same parameter objects and storage on the same device, same per-module modes, BatchNorm
    statistics untouched (extraction ran in eval mode although the model was training), no hook and
    no moved copy left behind."""
    model = create_model("test_resnet", seed=2)
    model.train()
    model.bn1.eval()  # a caller's frozen BatchNorm: per-module modes must survive, not just the root's
    modes = {n: m.training for n, m in model.named_modules()}
    params = {n: (p, p.data_ptr(), p.device) for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gc.collect()
    n_models = sum(type(o) is type(model) for o in gc.get_objects())

    acts = extract_activations(model, stimuli, ["layer4"], batch_size=8, dtype=np.float32, device="cpu")

    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: (p, p.data_ptr(), p.device) for n, p in model.named_parameters()} == params
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # running means / vars / counts not updated
    assert all(not m._forward_hooks for m in model.modules())
    gc.collect()
    assert sum(type(o) is type(model) for o in gc.get_objects()) == n_models
    model.eval()
    with torch.inference_mode():
        direct = model.forward_features(preprocess(model, _images(stimuli)))
    np.testing.assert_allclose(acts["layer4"], direct.numpy(), rtol=1e-5, atol=1e-5)


#: the per-operator float32 precisions (torch >= 2.9), where this torch has them
_PER_OPERATOR = [knob for knob in ("cuda.matmul", "mkldnn.matmul", "cudnn.conv", "cudnn.rnn")
                 if hasattr(getattr(getattr(torch.backends, knob.split(".")[0]), knob.split(".")[1], None),
                            "fp32_precision")]


def _knob(name):
    backend, op = name.split(".")
    return getattr(getattr(torch.backends, backend), op)


def _precisions() -> dict:
    """torch's float32 settings, legacy and per operator (torch raises on reading a legacy one that
    disagrees with the per-operator ones, so reading them also checks that they agree). Older torch
    has the legacy ones only."""
    b = torch.backends
    return {"matmul": torch.get_float32_matmul_precision(), "legacy matmul tf32": b.cuda.matmul.allow_tf32,
            "legacy cudnn tf32": b.cudnn.allow_tf32, **{k: _knob(k).fp32_precision for k in _PER_OPERATOR}}


@pytest.fixture
def tf32_allowed():
    """A caller who allows TF32 (matmul precision "high"; cuDNN convolutions allow it by default)."""
    before = _precisions()
    torch.set_float32_matmul_precision("high")
    if "cudnn.conv" in _PER_OPERATOR:
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        torch.backends.cudnn.allow_tf32 = True
    yield _precisions()
    torch.set_float32_matmul_precision(before["matmul"])
    torch.backends.cudnn.allow_tf32 = before["legacy cudnn tf32"]
    for knob in _PER_OPERATOR:
        _knob(knob).fp32_precision = before[knob]


def test_extraction_runs_without_tf32_and_restores_the_callers_settings(stimuli, tf32_allowed):
    assert tf32_allowed["legacy matmul tf32"] and tf32_allowed["legacy cudnn tf32"]
    assert all(tf32_allowed[k] == "tf32" for k in ("cuda.matmul", "cudnn.conv") if k in _PER_OPERATOR)
    model = create_model("test_resnet")
    seen = []
    probe = model.layer1.register_forward_hook(lambda *_: seen.append(_precisions()))
    try:
        extract_activations(model, stimuli, ["layer2"], batch_size=10)
        full = {"matmul": "highest", "legacy matmul tf32": False, "legacy cudnn tf32": False,
                **{k: "ieee" for k in _PER_OPERATOR}}
        assert len(seen) >= 3 and seen[-2:] == [full, full]  # the probe pass, then both batches
        assert _precisions() == tf32_allowed

        def fail(*_):
            raise RuntimeError("simulated failure inside the forward pass")

        failing = model.layer2.register_forward_hook(fail)
        try:
            with pytest.raises(RuntimeError, match="simulated failure"):
                with full_float32():
                    assert _precisions() == full
                    extract_activations(model, stimuli, ["layer2"], batch_size=10)
        finally:
            failing.remove()
        assert _precisions() == tf32_allowed  # restored on errors too, also when nested
    finally:
        probe.remove()


@pytest.mark.parametrize("value", ["1", "true", "ON"])
def test_cuda_extraction_refuses_an_environment_that_forces_tf32(stimuli, tmp_path, monkeypatch, value):
    """TORCH_ALLOW_TF32_CUBLAS_OVERRIDE (set by NGC's PyTorch containers) makes cuBLAS matmuls TF32
    whatever full_float32() sets: a CUDA extraction refuses it, naming the variable and the fix,
    before any store exists; set to 0 it is off, and CPU extraction ignores it."""
    from unitmatch.core.extract import ModelSpec, _device, extract_to_store

    model = create_model("test_resnet")
    monkeypatch.setenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", value)
    message = rf"TORCH_ALLOW_TF32_CUBLAS_OVERRIDE={value} makes torch run CUDA float32 matmuls in TF32.*unset it"
    with pytest.raises(ValueError, match=message):
        extract_activations(model, stimuli, ["layer1"], batch_size=10, device="cuda")
    with pytest.raises(ValueError, match=message):
        extract_to_store(ModelSpec("test_resnet", seed=0), stimuli, ["layer1"], tmp_path / "stores", device="cuda")
    assert not (tmp_path / "stores").exists()
    assert _device("cpu").type == "cpu"
    assert len(extract_activations(model, stimuli, ["layer1"], batch_size=10, device="cpu")["layer1"]) == len(stimuli)
    monkeypatch.setenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "0")
    assert _device("cuda").type == "cuda"


def test_clear_errors(stimuli):
    a = create_model("test_resnet", seed=3).state_dict()["fc.weight"]
    b = create_model("test_resnet", seed=3).state_dict()["fc.weight"]
    c = create_model("test_resnet", seed=4).state_dict()["fc.weight"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="unknown timm model 'resnet_nonexistent'"):
        create_model("resnet_nonexistent")
    model = create_model("test_resnet")
    with pytest.raises(ValueError, match=r"unknown layers \['layer9'\] in ResNet; close module names: .*'layer4'"):
        extract_activations(model, stimuli, ["layer1", "layer9"])
    with pytest.raises(ValueError, match="dtype must be float16 or float32; got 'int8'"):
        extract_activations(model, stimuli, ["layer1"], dtype="int8")
    with pytest.raises(ValueError, match="batch_size must be a positive integer; got 0"):
        extract_activations(model, stimuli, ["layer1"], batch_size=0)


# ---------------------------------------------------------------------------------------------------
# Staging: host buffers, device copies handed on one batch late (overlapping the next forward)
# ---------------------------------------------------------------------------------------------------
STAGED_LAYERS = ["layer1", "layer4"]


class _HoldingSink:
    """A slow sink: holds each batch as views of the loop's buffers and releases it ``delay`` seconds later
    from another thread (as the store's writer pool does), checking then that its views were not
    overwritten meanwhile; logs each hand-over."""

    slots = 2

    def __init__(self, log, delay=0.4):
        self.log, self.delay, self.arrays, self.overwritten, self.timers = log, delay, {}, [], []
        self.lock = threading.Lock()

    def put(self, batch, outputs, release):
        self.log.append(("put", batch))
        self.arrays[batch] = {name: values.copy() for name, values in outputs.items()}
        timer = threading.Timer(self.delay, self._release, (batch, outputs, release))
        self.timers.append(timer)
        timer.start()

    def _release(self, batch, views, release):
        with self.lock:
            self.overwritten += [(batch, n) for n, v in views.items() if not np.array_equal(v, self.arrays[batch][n])]
        release()

    def close(self):
        for timer in self.timers:
            timer.join()


def _staged(model, stimuli, device, device_copies, pinned, batch_size=2):
    """_extract into a holding sink: (arrays by layer, hand-over log, overwritten views)."""
    from unitmatch.core.extract import DTYPES, _extract, data_config

    cfg = data_config(model)
    units = probe_layers(model, STAGED_LAYERS, tuple(cfg["input_size"]))
    log = []
    model.register_forward_pre_hook(lambda _m, _i: log.append(("forward", sum(e[0] == "forward" for e in log))))
    sink = _HoldingSink(log)
    n_batches = -(-len(stimuli) // batch_size)
    try:
        _extract(model, stimuli, cfg, units, sink, batches=range(n_batches), batch_size=batch_size,
                 dtype=DTYPES["float16"], device=torch.device(device), device_copies=device_copies, pinned=pinned)
    finally:
        model._forward_pre_hooks.clear()
    sink.close()
    arrays = {name: np.concatenate([sink.arrays[b][name] for b in range(n_batches)]) for name in STAGED_LAYERS}
    return arrays, log, sink.overwritten


def test_staged_copies_equal_direct_ones_and_are_handed_on_after_the_next_forward(stimuli):
    model = create_model("test_resnet", seed=0)
    direct, direct_log, direct_over = _staged(model, stimuli, "cpu", device_copies=False, pinned=False)
    staged, staged_log, staged_over = _staged(model, stimuli, "cpu", device_copies=True, pinned=False)
    n = -(-len(stimuli) // 2)
    # direct: each batch goes to the sink right after its forward; staged: one forward later (the copy of
    # batch b overlaps the forward of b + 1), the last one after the loop
    assert direct_log == [e for b in range(n) for e in (("forward", b), ("put", b))]
    assert staged_log == [("forward", 0)] + [e for b in range(1, n) for e in (("forward", b), ("put", b - 1))] + \
        [("put", n - 1)]
    assert direct_over == [] and staged_over == []  # no buffer was reused while the sink held it
    reference = extract_activations(model, stimuli, STAGED_LAYERS, batch_size=2, dtype=np.float32, device="cpu")
    for name in STAGED_LAYERS:
        expected = reference[name].astype(np.float16)  # numpy's rounding, not the loop's cast
        np.testing.assert_array_equal(direct[name].view(np.uint16), expected.view(np.uint16))
        np.testing.assert_array_equal(staged[name].view(np.uint16), expected.view(np.uint16))


def test_a_failing_sink_leaves_no_copy_running_and_no_hook(stimuli):
    from unitmatch.core.extract import DTYPES, _extract, data_config

    model = create_model("test_resnet", seed=0)
    cfg = data_config(model)
    units = probe_layers(model, STAGED_LAYERS, tuple(cfg["input_size"]))

    class Failing:
        slots = 1

        def put(self, batch, outputs, release):
            release()
            raise OSError("disk full (simulated)")

    with pytest.raises(OSError, match="disk full"):
        _extract(model, stimuli, cfg, units, Failing(), batches=range(3), batch_size=8, dtype=DTYPES["float16"],
                 device=torch.device("cpu"), device_copies=True, pinned=False)
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available())")
def test_pinned_asynchronous_copies_on_cuda_equal_synchronous_ones(stimuli, tmp_path):
    """The pinned, asynchronous path (copies on a second stream, handed on after the next forward) gives the
    arrays that synchronous copies into pageable memory give, and the store holds them."""
    from unitmatch.core.extract import ModelSpec, extract_to_store

    model = create_model("test_resnet", seed=0)
    deterministic = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True  # the same convolution algorithms in both runs
    try:
        plain, _, plain_over = _staged(model, stimuli, "cuda", device_copies=False, pinned=False)
        pinned, log, pinned_over = _staged(model, stimuli, "cuda", device_copies=True, pinned=True)
        spec = ModelSpec("test_resnet", seed=0)
        store = extract_to_store(spec, stimuli, STAGED_LAYERS, tmp_path, batch_size=2, device="cuda",
                                 model=model).store
    finally:
        torch.backends.cudnn.deterministic = deterministic
    assert plain_over == [] and pinned_over == [] and log[:3] == [("forward", 0), ("forward", 1), ("put", 0)]
    assert store.verify().ok and store.key["sharded"] is True
    for name in STAGED_LAYERS:
        np.testing.assert_array_equal(pinned[name].view(np.uint16), plain[name].view(np.uint16))
        np.testing.assert_array_equal(np.asarray(store.layers()[name][:]).view(np.uint16),
                                      plain[name].reshape(len(stimuli), -1).view(np.uint16))
