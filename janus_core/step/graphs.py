"""CUDA graphs of the static decode step: each (head, batch bucket) captured once, then replayed every step.

An eager decode step launches some fifteen kernels per layer, plus the mask, the embedding and the head; at
small batches the GPU waits on the host between them. The static step (`janus_core.step.static`) is one
function of fixed-shape tensors per power-of-two bucket and the paged KV pool never moves, so a bucket's
step can be captured once as a CUDA graph: its inputs live in static buffers that each step copies its rows
into before `replay()`, and the graph's kernels write and read the pool in place. Buckets are captured at
warm-up (largest first, all in one memory pool); a bucket warm-up did not reach is captured the first
time a step needs it, and one that cannot be captured then runs without a graph. Never per request.

Without CUDA (tests on CPU) a bucket's "graph" runs the step on its static buffers instead, so everything
but the capture itself is the same code on every device.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

Step = Callable[..., torch.Tensor]  # the static step: keyword tensors of one bucket's shapes -> logits (P, V)
Shapes = tuple[tuple[int, ...], ...]  # a bucket: the shapes of the step's arguments, in order
WARM_RUNS = 2  # runs on a side stream before a capture: lazy initialisation, compiled kernels, autotuning


@dataclass
class _Bucket:
    inputs: dict[str, torch.Tensor]  # the static buffers the graph reads
    replay: Callable[[], torch.Tensor]  # runs the step on them; returns its (static) output


class Capturing:
    """What every capture of one device shares: one memory pool, and the streams the captures and their warm
    runs go on. The same capture stream for all of them is what lets a graph reuse memory an earlier one
    (in the same pool) freed; streams made once also keep cuBLAS to one workspace per stream, and clear of
    the pooled stream the preview decoder drew."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.side = torch.cuda.Stream(device=device)
        self.stream = torch.cuda.Stream(device=device)


class StepGraphs:
    """One head's captured steps, one per bucket (the shapes of its arguments: rows, block-table width).
    `capturing`: shared with the other head's (CUDA); None without CUDA."""

    def __init__(self, step: Step, device: torch.device, capturing: Capturing | None = None) -> None:
        self.step, self.device = step, device
        self._buckets: dict[Shapes, _Bucket] = {}
        if device.type == "cuda" and capturing is None:
            capturing = Capturing(device)
        self._capturing = capturing

    def rows(self) -> list[int]:
        """The row counts of the captured buckets, in the order they were captured."""
        return [shapes[0][0] for shapes in self._buckets]

    def capture(self, args: dict[str, torch.Tensor]) -> None:
        """Capture the step for the bucket of `args` (its keyword tensors, `ids` first). The warm-up runs write
        the keys and values of `args`' rows where `args` puts them, as the step itself would."""
        inputs = {name: tensor.clone() for name, tensor in args.items()}
        if self._capturing is not None:
            replay = _capture(self.step, inputs, self._capturing)
        else:
            replay = _rerun(self.step, inputs)
        self._buckets[_shapes(args)] = _Bucket(inputs, replay)

    def run(self, args: dict[str, torch.Tensor]) -> torch.Tensor:
        """The step's logits for `args`: copied into their bucket's buffers and replayed (captured first if this
        bucket never was). The result is the caller's own: the next replay does not overwrite it."""
        key = _shapes(args)
        if key not in self._buckets:
            log.info("capturing the decode step for %d rows outside warm-up", key[0][0])
            try:
                self.capture(args)
            except Exception:
                log.exception("capturing the decode step for %d rows failed; that bucket runs without a graph",
                              key[0][0])
                inputs = {name: tensor.clone() for name, tensor in args.items()}
                self._buckets[key] = _Bucket(inputs, _rerun(self.step, inputs))
        bucket = self._buckets[key]
        for name, tensor in args.items():
            bucket.inputs[name].copy_(tensor, non_blocking=True)
        return bucket.replay().clone()


def _shapes(args: dict[str, torch.Tensor]) -> Shapes:
    return tuple(tuple(tensor.shape) for tensor in args.values())


def _capture(step: Step, inputs: dict[str, torch.Tensor], capturing: Capturing) -> Callable[[], torch.Tensor]:
    device = capturing.device
    # On the step's own device: torch.cuda.graph synchronises and allocates on the current device.
    with torch.cuda.device(device):
        main = torch.cuda.current_stream(device)
        capturing.side.wait_stream(main)
        with torch.cuda.stream(capturing.side):
            for _ in range(WARM_RUNS):
                step(**inputs)
        main.wait_stream(capturing.side)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the preview decoder's thread may use the device while the engine thread captures.
            with torch.cuda.graph(graph, pool=capturing.pool, stream=capturing.stream,
                                  capture_error_mode="thread_local"):
                output = step(**inputs)
        except BaseException:
            # Some torch releases (2.11 among them) leave the allocator routing to the pool when the capture's
            # end fails; every later capture or empty_cache would then fail too.
            with contextlib.suppress(Exception):
                torch._C._cuda_endAllocateToPool(torch.cuda.current_device(), capturing.pool)
            raise
        finally:
            torch.cuda.set_stream(main)  # a capture whose end fails leaves its own stream current

    def replay() -> torch.Tensor:
        graph.replay()
        return output

    return replay


def _rerun(step: Step, inputs: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    return lambda: step(**inputs)
