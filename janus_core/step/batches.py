"""Which batch serves which request kind, for a loaded model: the one place that reads its generator.

Understanding always runs in a `TextBatch`; generation in a `VQBatch` (Janus, Janus-Pro) or a
`FlowBatch` (JanusFlow), by the checkpoint's image generator (`LoadedModel.generator`).
"""

from __future__ import annotations

from janus_core.step.flow_batch import FlowBatch
from janus_core.step.vq_batch import VQBatch

IMAGE_BATCHES: dict[str, type[VQBatch] | type[FlowBatch]] = {"vq": VQBatch, "flow": FlowBatch}


def image_batch(generator: str) -> type[VQBatch] | type[FlowBatch]:
    if generator not in IMAGE_BATCHES:
        raise ValueError(f"no batch generates images with {generator!r}; known: {', '.join(IMAGE_BATCHES)}")
    return IMAGE_BATCHES[generator]
