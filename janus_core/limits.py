"""Defaults, bounds and refusal messages of generation requests, in one torch-free place.

The engine's batches refuse with these (`InvalidRequestError`), and the API layer checks the same
rules before a request is queued (it imports no torch), so a client reads one message either way.
"""

from __future__ import annotations

from collections.abc import Iterable

from janus_core.errors import InvalidRequestError

VQ_CFG_WEIGHT = 5.0  # Janus-Pro's (and transformers') guidance default
FLOW_CFG_WEIGHT = 2.0  # DeepSeek's JanusFlow demo; its README and one demo path say 5
FLOW_STEPS = 30
MAX_FLOW_STEPS = 100
MAX_CFG_WEIGHT = 100.0


def check_generation(n: int, cfg_weight: float) -> None:
    if n < 1:
        raise InvalidRequestError(f"n must be at least 1, got {n}")
    if not (0.0 <= cfg_weight <= MAX_CFG_WEIGHT):
        raise InvalidRequestError(f"cfg_weight must be between 0 and {MAX_CFG_WEIGHT:g}, got {cfg_weight}")


def check_flow_steps(steps: int) -> None:
    if not (1 <= steps <= MAX_FLOW_STEPS):
        raise InvalidRequestError(f"steps must be between 1 and {MAX_FLOW_STEPS}, got {steps}")


def generator_refusal(generator: str, given: Iterable[str]) -> str | None:
    """What a model with this image `generator` ("vq" or "flow") refuses among the fields a client `given`."""
    given = set(given)
    if generator == "vq" and "steps" in given:
        return ("steps applies to rectified-flow models (JanusFlow); this model generates VQ tokens, "
                "one step per image token: leave it out")
    meaningless = sorted(given & {"temperature", "top_p"}) if generator == "flow" else []
    if meaningless:
        verb = "means" if len(meaningless) == 1 else "mean"
        return (f"{' and '.join(meaningless)} {verb} nothing for a rectified-flow model (JanusFlow samples "
                "no tokens; seed picks the starting noise): leave it out")
    return None
