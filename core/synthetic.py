"""A synthetic brain with known answers, for tests and demos.

Planted neurons are noisy affine copies of chosen units: ``a * unit + b + noise`` with the noise
scaled to a chosen signal-to-noise ratio (SNR = variance of the signal / variance of the noise, over
images). Noise neurons carry no signal. The ground truth travels with the responses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass
class SyntheticBrain:
    """Responses with ground truth.

    Attributes:
        responses: (neurons, images), or (neurons, images, repeats) when repeats were asked for.
        truth: one row per neuron: neuron, planted (bool), unit (global id, -1 for noise neurons),
            snr, gain, offset.
    """

    responses: np.ndarray
    truth: pd.DataFrame


def plant_neurons(
    activations: np.ndarray,
    *,
    n_planted: int,
    n_noise: int = 0,
    snr: float = 10.0,
    units: np.ndarray | None = None,
    repeats: int | None = None,
    seed: int = 0,
) -> SyntheticBrain:
    """Make neurons from an (images, units) activation matrix.

    Args:
        activations: (images, units); may be float16/32.
        n_planted: neurons that copy a unit each.
        n_noise: neurons of pure Gaussian noise.
        snr: signal-to-noise variance ratio of planted neurons (of the repeat mean when repeats
            are generated: each repeat then carries repeats x that noise variance).
        units: which units to plant (default: random distinct non-constant units).
        repeats: if given, also generate this many noisy repeats per image (third axis).
        seed: random seed.

    Raises:
        ValueError: too few non-constant units, bad snr.
    """
    if snr <= 0:
        raise ValueError(f"snr must be positive; got {snr}")
    rng = np.random.default_rng(seed)
    x = np.asarray(activations)
    n_images = x.shape[0]
    if units is None:
        std = x.astype(np.float64).std(axis=0)
        candidates = np.flatnonzero(std > 1e-6 * max(std.max(), 1e-30))
        if candidates.size < n_planted:
            raise ValueError(f"only {candidates.size} non-constant units to plant {n_planted} neurons in")
        units = rng.choice(candidates, size=n_planted, replace=False)
    units = np.asarray(units, dtype=np.int64)
    if units.shape != (n_planted,):
        raise ValueError(f"units must have {n_planted} entries; got {units.shape}")
    signal = x[:, units].astype(np.float64).T  # (planted, images)
    # positive gains: the match is the unit with the highest (signed) r
    gain = rng.uniform(0.5, 2.0, n_planted)
    offset = rng.uniform(0.0, 5.0, n_planted)
    signal = gain[:, None] * signal + offset[:, None]
    noise_sd = np.concatenate([signal.std(axis=1) / np.sqrt(snr), np.ones(n_noise)])
    mean = np.concatenate([signal, np.full((n_noise, n_images), 2.0)])
    if repeats is None:
        responses = mean + noise_sd[:, None] * rng.standard_normal(mean.shape)
    else:
        per_repeat = noise_sd * np.sqrt(repeats)
        responses = mean[:, :, None] + per_repeat[:, None, None] * rng.standard_normal(mean.shape + (repeats,))
    m = n_planted + n_noise
    truth = pd.DataFrame({
        "neuron": [f"n{i:03d}" for i in range(m)],
        "planted": np.arange(m) < n_planted,
        "unit": np.concatenate([units, np.full(n_noise, -1)]),
        "snr": np.concatenate([np.full(n_planted, snr), np.zeros(n_noise)]),
        "gain": np.concatenate([gain, np.zeros(n_noise)]),
        "offset": np.concatenate([offset, np.zeros(n_noise)]),
    })
    return SyntheticBrain(responses, truth)


SHAPES = ("disk", "square", "ring", "cross", "hbars", "vbars", "checker", "triangle")


def generate_stimuli(n_categories: int = 8, objects_per_category: int = 5, variations: int = 10, size: int = 96,
                     seed: int = 0):
    """Procedural images with category / object / variation metadata, no downloads.

    A category is a shape family, an object is one colour and scale of it, a variation moves and
    rescales it over a noisy background. Returns a :class:`core.StimulusSet` (in memory).
    """
    from .stimuli import StimulusSet

    if not 1 <= n_categories <= len(SHAPES):
        raise ValueError(f"n_categories must be in [1, {len(SHAPES)}]; got {n_categories}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images, rows = [], []
    for c in range(n_categories):
        for o in range(objects_per_category):
            color = rng.uniform(0.2, 1.0, 3)
            scale = rng.uniform(0.15, 0.3)
            for v in range(variations):
                cx, cy = rng.uniform(0.3, 0.7, 2)
                s = scale * rng.uniform(0.8, 1.25)
                dx, dy = (xx - cx) / s, (yy - cy) / s
                mask = _shape_mask(SHAPES[c], dx, dy)
                background = rng.uniform(0.0, 0.3) + 0.05 * rng.standard_normal((size, size, 1))
                image = np.clip(background + mask[..., None] * color, 0, 1)
                images.append((image * 255).astype(np.uint8))
                rows.append({"category_name": SHAPES[c], "object_name": f"{SHAPES[c]}_{o}", "variation": v})
    return StimulusSet.from_array(np.stack(images), metadata=pd.DataFrame(rows))


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    r = np.hypot(dx, dy)
    inside = (np.abs(dx) < 1) & (np.abs(dy) < 1)
    masks = {
        "disk": r < 1,
        "square": inside,
        "ring": (r < 1) & (r > 0.6),
        "cross": inside & ((np.abs(dx) < 0.3) | (np.abs(dy) < 0.3)),
        "hbars": inside & (np.sin(dy * 3 * np.pi) > 0),
        "vbars": inside & (np.sin(dx * 3 * np.pi) > 0),
        "checker": inside & ((np.floor(dx * 2) + np.floor(dy * 2)) % 2 == 0),
        "triangle": (dy < 1) & (dy > 2 * np.abs(dx) - 1),
    }
    return masks[shape].astype(np.float64)
