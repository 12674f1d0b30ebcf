"""Pixels from what the model made: VQ codes through Janus' decoder, latents through JanusFlow's VAE.

VQ images decode one at a time (`decode_images`: an image's pixels depend on its codes only). Flow
latents decode in chunks, on the engine thread (CPU) or on a thread and CUDA stream of their own
(`PixelDecoder`), so the next ODE step of the other requests does not wait for the VAE. On CPU a
second thread running torch ops keeps a second OpenMP pool, which slows every engine step (see
`server.runtime.run_on_fresh_thread`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from janus_core.models.janusflow import FlowParts
from janus_core.models.loader import LoadedModel

if TYPE_CHECKING:
    from janus_core.sched.sequence import Sequence

VAE_CHUNK = 8  # images per VAE call: the SDXL decoder's activations at 384 px are ~100 MB per image


@torch.inference_mode()
def decode_images(lm: LoadedModel, tokens: torch.Tensor) -> np.ndarray:
    """VQ-decode image tokens (n, N) into uint8 pixels (n, H, W, 3), post-processed as the reference does.

    One image per decoder call: a convolution's rounding can depend on the batch it runs in, and an
    image's pixels must depend on its codes only (a seed gives the same PNG bytes alone, as image i of
    a request, and beside other requests). The decoder is well under 1% of a request's time.
    """
    return np.concatenate([_decode(lm, tokens[i:i + 1]) for i in range(tokens.shape[0])])


def _decode(lm: LoadedModel, tokens: torch.Tensor) -> np.ndarray:
    decoded = lm.model.decode_image_tokens(tokens.to(lm.device))  # (1, H, W, 3) in [-1, 1]
    return _to_pixels(lm, decoded.permute(0, 3, 1, 2))


def _to_pixels(lm: LoadedModel, decoded: torch.Tensor) -> np.ndarray:
    """The decoder's (b, 3, h, w) output in [-1, 1] -> uint8 (b, h, w, 3), post-processed as the reference does."""
    # Channels first: the PIL backend of the image processor normalises channel-first arrays only.
    planes = list(decoded.float().cpu().numpy())
    pil = lm.processor.postprocess(planes, return_tensors="PIL.Image.Image",
                                   input_data_format="channels_first")["pixel_values"]
    return np.stack([np.asarray(im) for im in pil])


NEUTRAL = 128  # the grey of a preview's rows not generated yet


@torch.inference_mode()
def decode_rows(lm: LoadedModel, tokens: torch.Tensor) -> np.ndarray:
    """A preview of VQ images still being generated, from their first k codes (n, k): the complete rows of
    codes decoded, the rest of the image a neutral grey. (n, H, W, 3) uint8.

    The codes of complete rows decode as a band of their own: an estimate, not a crop of the final image (the
    decoder's attention and normalisation see the whole band, and the final image's lower rows change the
    band's lower edge). transformers' `decode` takes whole grids only, hence the codebook lookup written here:
    the same embedding, L2 normalisation and layout.
    """
    vq = lm.model.model.vqmodel
    grid_rows, width = vq.quantize.quant_state_dims
    n, rows = tokens.shape[0], tokens.shape[1] // width
    if rows >= grid_rows:
        return decode_images(lm, tokens[:, :grid_rows * width])
    out = np.full((n, lm.image_size, lm.image_size, 3), NEUTRAL, dtype=np.uint8)
    for i in range(n if rows else 0):
        codes = tokens[i:i + 1, :rows * width].to(lm.device)
        z = F.normalize(vq.quantize.embedding(codes), p=2, dim=-1)  # (1, rows * width, D)
        z = z.view(1, rows, width, -1).permute(0, 3, 1, 2).contiguous()  # (1, D, rows, width)
        band = _to_pixels(lm, vq.decoder(vq.post_quant_conv(z)))[0]  # (rows * f, W, 3)
        out[i, :band.shape[0]] = band
    return out


class PixelDecoder:
    """VAE decodes on one thread (and, on CUDA, one stream) of their own; results are collected in order by
    the engine thread, which answers the requests. `wake` is called (from the decoder's thread) as each
    batch is done."""

    def __init__(self, parts: FlowParts, wake: Callable[[], None]) -> None:
        self.parts, self.wake = parts, wake
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="janus-vae")
        self._jobs: deque[tuple[list[Sequence], Future]] = deque()
        device = parts.vae.device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @property
    def pending(self) -> bool:
        return bool(self._jobs)

    @property
    def ready(self) -> bool:
        """The oldest batch is decoded (the engine answers in submission order)."""
        return bool(self._jobs) and self._jobs[0][1].done()

    def submit(self, seqs: list[Sequence], z: torch.Tensor) -> None:
        ready = None
        if self._stream is not None:  # the VAE's stream starts once the model's stream has written z
            ready = torch.cuda.Event()
            ready.record()
            z.record_stream(self._stream)
        future = self._pool.submit(self._decode, z, ready)
        future.add_done_callback(lambda _: self.wake())
        self._jobs.append((seqs, future))

    @torch.inference_mode()
    def _decode(self, z: torch.Tensor, ready) -> np.ndarray:
        if self._stream is None:
            return decode_latents(self.parts, z)
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(ready)
            return decode_latents(self.parts, z)  # .cpu() inside synchronises this stream only

    def done(self, wait: bool = False) -> list[tuple[list[Sequence], np.ndarray | BaseException]]:
        """The finished batches in submission order: their (I, H, W, 3) pixels, or the decode's error.
        `wait`: block for the oldest one if none is finished yet."""
        out = []
        if wait and self._jobs:
            self._jobs[0][1].exception()  # waits
        while self._jobs and self._jobs[0][1].done():
            seqs, future = self._jobs.popleft()
            error = future.exception()
            out.append((seqs, error if error is not None else future.result()))
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True)


@torch.inference_mode()
def decode_latents(parts: FlowParts, z: torch.Tensor) -> np.ndarray:
    """Latents (B, C, L, L) -> uint8 pixels (B, H, W, 3), mapped from [-1, 1] as DeepSeek's demo does."""
    out = []
    for chunk in z.split(VAE_CHUNK):
        x = chunk / parts.scaling_factor + (parts.shift_factor or 0.0)
        decoded = parts.vae.decode(x.to(parts.vae_dtype)).sample  # (b, 3, H, W)
        out.append(decoded.float().clamp(-1.0, 1.0).permute(0, 2, 3, 1).cpu().numpy())
    images = np.concatenate(out)
    return ((images + 1.0) / 2.0 * 255.0).astype(np.uint8)
