"""Names that moved between the transformers releases janus_core supports (5.0 and later).

The PIL/numpy Janus image processor is `JanusImageProcessor` in 5.0 (the torchvision one being
`JanusImageProcessorFast`); later 5.x releases call it `JanusImageProcessorPil` and give the plain
name to the torchvision one. Machines without our pinned transformers (a borrowed GPU box) must
still import janus_core, so every use goes through here. Recent 5.x releases also rename the cache
keyword of the model forwards (`past_key_values` -> `cache`, the old one deprecated). This module
knows names, nothing else.
"""

from __future__ import annotations

import inspect

import transformers


def pil_image_processor_class() -> type:
    """The Janus image processor that needs only PIL and numpy, under this release's name."""
    pil = getattr(transformers, "JanusImageProcessorPil", None)
    return pil if pil is not None else transformers.JanusImageProcessor


def cache_keyword(forward) -> str:
    """The keyword a transformers `forward` takes its KV cache by: `cache` in recent 5.x, `past_key_values` before."""
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):  # a wrapped or compiled callable without a signature
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"
