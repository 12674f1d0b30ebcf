"""janus_core: the model runtime behind janus-server.

Loads Janus, Janus-Pro and JanusFlow checkpoints (transformers' layout and DeepSeek's original
`multi_modality` one), builds prompts exactly as the reference does, and serves understanding
(image + prompt -> text) and generation (prompt -> images) from one batched engine. It knows nothing
about HTTP, gRPC, Redis or metrics libraries. docs/architecture.md maps its packages.

The names below are the whole surface the server uses. Plain-Python ones (requests, results,
limits, sizes, images, conversations) import eagerly and pull in no torch; the model runtime
(`Engine`, `load_model`, the tiny checkpoint writers, ...) imports on first use, so a process that
only queues requests (`janus-server api`) never loads torch, transformers or diffusers.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from janus_core import limits
from janus_core.engine.config import EngineConfig, EngineStats
from janus_core.engine.memory import format_size, parse_size
from janus_core.errors import InvalidRequestError, JanusError, ModelLoadError
from janus_core.images import IMAGE_FORMATS, decode_image, encode_image, load_image, open_image
from janus_core.requests import (
    EngineOutput,
    FailedOutput,
    FinishedOutput,
    GenerateRequest,
    GenerateResult,
    PreviewOutput,
    ProgressOutput,
    Request,
    Sink,
    TokenOutput,
    UnderstandRequest,
    UnderstandResult,
)
from janus_core.sampling.params import SamplingParams
from janus_core.text.conversation import Message, check_conversation

# torchao (which transformers and diffusers import whenever it is installed) warns as it loads: kernels a CPU
# build of torch cannot load, enum registrations torch.compile no longer needs, diffusers' older tensor names.
# None of it concerns this runtime; real errors still show.
for _noisy in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

if TYPE_CHECKING:
    from janus_core.engine import memory
    from janus_core.engine.engine import Engine
    from janus_core.models.device import gpu_memory_allocated
    from janus_core.models.loader import LoadedModel, load_model
    from janus_core.tiny.flow import write_tiny_flow_model
    from janus_core.tiny.janus import write_tiny_model

# name -> module: the model runtime, imported when first asked for
_LAZY = {
    "Engine": "janus_core.engine.engine",
    "LoadedModel": "janus_core.models.loader",
    "load_model": "janus_core.models.loader",
    "gpu_memory_allocated": "janus_core.models.device",
    "write_tiny_model": "janus_core.tiny.janus",
    "write_tiny_flow_model": "janus_core.tiny.flow",
}

__version__ = "0.1.0"
__all__ = [
    "IMAGE_FORMATS", "Engine", "EngineConfig", "EngineOutput", "EngineStats", "FailedOutput", "FinishedOutput",
    "GenerateRequest", "GenerateResult", "InvalidRequestError", "JanusError", "LoadedModel", "Message",
    "ModelLoadError", "PreviewOutput", "ProgressOutput", "Request", "SamplingParams", "Sink", "TokenOutput",
    "UnderstandRequest", "UnderstandResult", "__version__", "check_conversation", "decode_image", "encode_image",
    "format_size", "gpu_memory_allocated", "limits", "load_image", "load_model", "memory", "open_image", "parse_size",
    "write_tiny_flow_model", "write_tiny_model",
]


def __getattr__(name: str) -> Any:
    if name == "memory":
        return importlib.import_module("janus_core.engine.memory")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'janus_core' has no attribute {name!r}")
