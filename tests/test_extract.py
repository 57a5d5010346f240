"""In-memory extraction with forward hooks on timm's tiny test models (random weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unitmatch.core.extract import create_model, extract_activations, preprocess
from unitmatch.core.layers import layer_names
from unitmatch.core.synthetic import generate_stimuli


@pytest.fixture(scope="module")
def stimuli():
    return generate_stimuli(n_categories=2, objects_per_category=2, variations=5, size=48)


def test_hooked_output_equals_forward_features(stimuli):
    model = create_model("test_resnet", seed=1)
    acts = extract_activations(model, stimuli, ["layer4"], batch_size=7, dtype=np.float32)
    images = np.stack([np.asarray(stimuli.load_image(i)) for i in range(len(stimuli))])
    with torch.inference_mode():
        direct = model.forward_features(preprocess(model, images)).numpy()
    assert acts["layer4"].shape == direct.shape
    np.testing.assert_allclose(acts["layer4"], direct, rtol=1e-5, atol=1e-5)
    assert not model.layer4._forward_hooks  # hooks removed


def test_every_unit_of_every_stage_in_float16(stimuli):
    model = create_model("test_convnext")
    layers = layer_names(model, "stages")
    acts = extract_activations(model, stimuli, layers, batch_size=8)
    assert list(acts) == layers == ["stages.0", "stages.1", "stages.2", "stages.3"]
    for a in acts.values():
        assert a.dtype == np.float16 and a.shape[0] == len(stimuli) and a.ndim == 4
        assert np.isfinite(a).all() and a.astype(np.float32).std() > 0


def test_same_seed_same_weights_and_clear_errors(stimuli):
    a = create_model("test_resnet", seed=3).state_dict()["fc.weight"]
    b = create_model("test_resnet", seed=3).state_dict()["fc.weight"]
    c = create_model("test_resnet", seed=4).state_dict()["fc.weight"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="unknown timm model 'resnet_nonexistent'"):
        create_model("resnet_nonexistent")
    with pytest.raises(ValueError, match=r"unknown layers \['layer9'\].*valid names include"):
        extract_activations(create_model("test_resnet"), stimuli, ["layer1", "layer9"])
