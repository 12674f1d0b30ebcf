"""Running requests through an engine and the oracles they are checked against: janus_core's one-request
image path and transformers' own `generate`, for text and image tokens."""

from __future__ import annotations

import threading

import torch

from janus_core import Engine, FailedOutput, FinishedOutput, GenerateRequest, UnderstandRequest
from janus_core.models.loader import LoadedModel
from janus_core.simple.generate import stream_image_tokens
from janus_core.text.processor import build_generation_ids, build_understanding_inputs


class Collector:
    def __init__(self) -> None:
        self.outputs: dict[str, list] = {}
        self.done = threading.Event()
        self.expected = 0

    def __call__(self, output) -> None:
        self.outputs.setdefault(output.request_id, []).append(output)
        if isinstance(output, FinishedOutput | FailedOutput) and len(self.final()) == self.expected:
            self.done.set()

    def final(self) -> dict:
        return {rid: outs[-1] for rid, outs in self.outputs.items()
                if isinstance(outs[-1], FinishedOutput | FailedOutput)}

    def result(self, rid: str):
        out = self.outputs[rid][-1]
        assert isinstance(out, FinishedOutput), out
        return out.result


def run(engine: Engine, requests: list, sink: Collector | None = None) -> Collector:
    sink = sink or Collector()
    for req in requests:
        engine.add_request(req, sink)
    engine.run_until_idle()
    return sink


def reference_image_tokens(lm: LoadedModel, req: GenerateRequest) -> torch.Tensor:
    weight = 5.0 if req.cfg_weight is None else req.cfg_weight  # None: the VQ default
    stream = stream_image_tokens(lm, req.prompt, n=req.n, cfg_weight=weight, params=req.params)
    while True:
        try:
            next(stream)
        except StopIteration as done:
            return done.value[1]


def transformers_image_tokens(lm: LoadedModel, prompt: str, cfg_weight: float) -> list[int]:
    ids = torch.tensor([build_generation_ids(lm, prompt)])
    out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_mode="image",
                            do_sample=False, guidance_scale=cfg_weight)
    return out[0].tolist()


def transformers_text_tokens(lm: LoadedModel, req: UnderstandRequest) -> list[int]:
    inputs = build_understanding_inputs(lm, req.images, req.prompt)
    ids = torch.tensor([inputs.input_ids])
    extra = {} if inputs.pixel_values is None else {"pixel_values": inputs.pixel_values}
    out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=req.max_new_tokens,
                            do_sample=False, **extra)
    tokens = out[0, ids.shape[1]:].tolist()
    eos = lm.special["eos"]
    return tokens[:tokens.index(eos)] if eos in tokens else tokens
