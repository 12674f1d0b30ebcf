"""Protobuf <-> janus-server's job parameters and events: the gRPC servicer's only conversions."""

from __future__ import annotations

import base64
import math
import struct
from typing import Any

from server.jobs import GenerateParams, UnderstandParams, result_images
from server.rpc.gen.janus.v1 import janus_pb2
from server.service import BadRequest, Ticket

# --- protobuf -> job params (defaults come from the dataclasses, as for REST) -------------------


def _decimal(value: float) -> float:
    """The shortest decimal that the proto's float32 `value` stands for (0.699999988 -> 0.7), so a
    gRPC request samples with exactly the same parameters as the same REST request."""
    if not math.isfinite(value):
        return value
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.unpack("f", struct.pack("f", candidate))[0] == value:
            return candidate
    return value


def understand_params(request: janus_pb2.UnderstandRequest) -> UnderstandParams:
    fields: dict[str, Any] = {"prompt": request.prompt, "images": list(request.images),
                              "temperature": _decimal(request.temperature)}
    if request.messages:
        if request.prompt or request.images:
            raise BadRequest("send either messages or prompt + images, not both")
        fields["messages"] = [{"role": m.role, "text": m.text, "images": len(m.images)} for m in request.messages]
        fields["images"] = [image for m in request.messages for image in m.images]
    if request.max_new_tokens:
        fields["max_new_tokens"] = request.max_new_tokens
    if request.top_p:
        fields["top_p"] = _decimal(request.top_p)
    if request.HasField("seed"):
        fields["seed"] = request.seed
    return UnderstandParams(**fields)


def generate_params(request: janus_pb2.GenerateRequest) -> GenerateParams:
    fields: dict[str, Any] = {"prompt": request.prompt}
    if request.n:
        fields["n"] = request.n
    if request.cfg_weight:
        fields["cfg_weight"] = _decimal(request.cfg_weight)
    if request.HasField("temperature"):  # explicit 0 means greedy, unset means the default
        fields["temperature"] = _decimal(request.temperature)
    if request.top_p:
        fields["top_p"] = _decimal(request.top_p)
    if request.HasField("seed"):
        fields["seed"] = request.seed
    if request.steps:
        fields["steps"] = request.steps
    if request.previews:
        fields["previews"] = request.previews
    return GenerateParams(**fields)


def understand_response(ticket: Ticket, event: dict[str, Any]) -> janus_pb2.UnderstandResponse:
    return janus_pb2.UnderstandResponse(
        id=ticket.job_id, text=event["text"], finish_reason=event["finish_reason"],
        prompt_tokens=event["prompt_tokens"], completion_tokens=event["completion_tokens"])


def preview(event: dict[str, Any]) -> janus_pb2.Preview:
    return janus_pb2.Preview(index=event["image"], step=event["step"], png=base64.b64decode(event["preview"]))


def generate_response(ticket: Ticket, event: dict[str, Any]) -> janus_pb2.GenerateResponse:
    return janus_pb2.GenerateResponse(id=ticket.job_id, seed=event["seed"], png=result_images(event))
