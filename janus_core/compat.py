"""Names that moved between the transformers releases janus_core supports (5.0 and later).

The PIL/numpy Janus image processor is `JanusImageProcessor` in 5.0 (the torchvision one being
`JanusImageProcessorFast`); later 5.x releases call it `JanusImageProcessorPil` and give the plain
name to the torchvision one. Machines without our pinned transformers (a borrowed GPU box) must
still import janus_core, so every use goes through here. This module knows class names, nothing else.
"""

from __future__ import annotations

import transformers


def pil_image_processor_class() -> type:
    """The Janus image processor that needs only PIL and numpy, under this release's name."""
    pil = getattr(transformers, "JanusImageProcessorPil", None)
    return pil if pil is not None else transformers.JanusImageProcessor
