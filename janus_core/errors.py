"""Exception types raised by janus_core; the server maps them to HTTP and gRPC status codes."""

from __future__ import annotations


class JanusError(Exception):
    """Base class of every error janus_core raises on purpose."""


class ModelLoadError(JanusError):
    """The model directory, its config or its weights cannot be loaded; the message says which part."""


class InvalidRequestError(JanusError):
    """A request is malformed or exceeds a limit; the message names the offending field."""
