"""Checking JanusFlow images against the oracle (tests.support.flow_reference): the engine's starting noise for a
request, drawn the same way, and the PNG pixels' tolerance."""

from __future__ import annotations

import numpy as np
import torch

from janus_core.sampling.params import image_seeds
from janus_core.sampling.sampler import make_generator


def noise(lm, seed: int, n: int) -> torch.Tensor:
    p = lm.flow
    return torch.stack([torch.randn((p.latent_channels, p.latent_size, p.latent_size), generator=make_generator(s,
                        lm.device)) for s in image_seeds(seed, n)])


def assert_same_pixels(a: np.ndarray, b: np.ndarray) -> None:
    """Within one level on at most 0.1% of values (see the mixed-batch test for why not bit-exact)."""
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    off = np.abs(a.astype(int) - b.astype(int))
    assert off.max() <= 1 and (off > 0).mean() <= 1e-3, (off.max(), (off > 0).mean())
