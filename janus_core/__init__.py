"""janus_core: the model runtime behind janus-server.

Loads Janus-Pro checkpoints (transformers' layout and DeepSeek's original `multi_modality` layout),
builds prompts exactly as the reference does, and runs understanding (image + prompt -> text) and
generation (prompt -> images). It knows nothing about HTTP, gRPC, Redis or metrics libraries.
"""

from __future__ import annotations

from janus_core.errors import InvalidRequestError, JanusError, ModelLoadError

__all__ = ["InvalidRequestError", "JanusError", "ModelLoadError", "__version__"]
__version__ = "0.1.0"
