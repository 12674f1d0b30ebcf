"""Differences between the library versions the project's range allows, in one place.

transformers renamed the cache argument of its models' `forward` from `past_key_values` to `cache`
(the old name warns from 5.2x and goes away in 5.40); `cache_arg` names whichever the installed
version takes, so no call warns and none breaks on either side of the rename.

The PIL/numpy Janus image processor is `JanusImageProcessor` in 5.0 (the torchvision one being
`JanusImageProcessorFast`); later 5.x releases call it `JanusImageProcessorPil` and give the plain
name to the torchvision one; `pil_image_processor_class` finds it under either, so janus_core still
imports on a borrowed GPU box's older transformers.

From 5.2x transformers depends on `kernels` (the Hugging Face hub-kernel loader), whose class decorator
wraps the forward of layers such as `LlamaAttention` to route a few functions (rotary embeddings) to
kernels downloaded from the hub. The wrapper sets a context variable on every call; under
`torch.compile` that becomes a guard on a module global that the first call flips, so a compiled step
recompiles once more inside the serving loop. We never load hub kernels, so `unwrap_hub_kernels`
gives each such layer back the forward it wrapped: the same computation, nothing for dynamo to guard.
"""

from __future__ import annotations

import inspect
import types
from functools import cache
from typing import Any

import transformers


@cache
def _takes_cache(forward: Any) -> bool:
    return "cache" in inspect.signature(forward).parameters


def cache_arg(module: Any, value: Any) -> dict[str, Any]:
    """`{"cache": value}` or `{"past_key_values": value}` for `module(...)`, as its version expects."""
    return {"cache" if _takes_cache(type(module).forward) else "past_key_values": value}


def pil_image_processor_class() -> type:
    """The Janus image processor that needs only PIL and numpy, under this release's name."""
    pil = getattr(transformers, "JanusImageProcessorPil", None)
    return pil if pil is not None else transformers.JanusImageProcessor


def unwrap_hub_kernels(model: Any) -> int:
    """Undo the `kernels` package's forward wrappers on `model`'s layers, in place; returns how many.

    A wrapped layer is one the decorator gave its per-instance `_kernel_funcs`; its class forward keeps
    the original under `__wrapped__` (functools.wraps). The original is bound on the instance, so other
    models of the same class in this process are untouched.
    """
    unwrapped = 0
    for module in model.modules():
        forward = getattr(type(module), "forward", None)
        original = getattr(forward, "__wrapped__", None)
        if "_kernel_funcs" in vars(module) and original is not None and "forward" not in vars(module):
            module.forward = types.MethodType(original, module)
            unwrapped += 1
    return unwrapped
