"""Vision-feature cache: aligned SigLIP features of an image, keyed by the image's pixel content.

The key is a hash of the preprocessed pixels (what the encoder actually sees), so the same picture
sent twice, under any request id or encoding, skips the vision encoder. LRU, bounded in bytes.
This module knows tensors and hashes, not prompts or requests.
"""

from __future__ import annotations

import hashlib

import torch

from janus_core.lru import ByteLRU


def image_key(pixels: torch.Tensor) -> str:
    """Content hash of one preprocessed image (3, H, W)."""
    data = pixels.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class VisionFeatureCache:
    def __init__(self, max_bytes: int) -> None:
        self._lru: ByteLRU[torch.Tensor] = ByteLRU(max_bytes)

    def get(self, key: str) -> torch.Tensor | None:
        """Features (N, D) of the image with this key, or None."""
        return self._lru.get(key)

    def put(self, key: str, features: torch.Tensor) -> None:
        self._lru.put(key, features, features.numel() * features.element_size())

    @property
    def hits(self) -> int:
        return self._lru.hits

    @property
    def misses(self) -> int:
        return self._lru.misses

    def __len__(self) -> int:
        return len(self._lru)
