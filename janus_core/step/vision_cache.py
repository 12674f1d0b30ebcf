"""Vision-feature cache keys: aligned SigLIP features of an image are cached by its pixel content.

The key is a hash of the preprocessed pixels (what the encoder actually sees), so the same picture
sent twice, under any request id or encoding, skips the vision encoder (the cache itself is a
`ByteLRU`).
This module knows tensors and hashes, not prompts or requests.
"""

from __future__ import annotations

import hashlib

import torch


def image_key(pixels: torch.Tensor) -> str:
    """Content hash of one preprocessed image (3, H, W)."""
    data = pixels.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()

