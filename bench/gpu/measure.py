"""The measurements of the GPU check: the engine at several loads, transformers' references, a greedy check.

Each function returns table rows (`Row`) and raises on failure; the caller isolates sections.
Timing: an engine is stepped on this thread (`StepTimer`), each step's wall time recorded, and the
runner's `decode` (the forward pass: Llama layers and final norm; with --compile the compiled step,
embedding and head included) timed on its own between device syncs, so `host_ms` = median step -
median forward is everything a step spends outside the forward (embedding, heads, guidance,
sampling, scheduling, bookkeeping). Roofline per step = (the weight bytes the step reads + the KV
bytes its rows attend over) / measured copy bandwidth.

This module knows the engine's request types and the references; not the command line or the table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from bench.gpu.model import kv_bytes_per_token, step_weight_bytes
from bench.references import PROMPTS, hf_generate_image, hf_understand
from janus_core import (
    Engine,
    EngineConfig,
    FailedOutput,
    FinishedOutput,
    GenerateRequest,
    TokenOutput,
    UnderstandRequest,
)
from janus_core.models.loader import LoadedModel
from janus_core.sampling.params import SamplingParams
from janus_core.text.processor import build_generation_ids, build_understanding_inputs

QUESTIONS = ["Describe this image in detail.", "What is shown in the picture?", "What color is the car?"]
GEN_PROMPT_TOKENS = 64  # room per generation row for the prompt (the bench's prompts are ~30 tokens)
UND_CONTEXT = 1024  # understanding row length: ~680 prompt tokens with a 384 px image + new tokens
WARM_STEPS = 4  # decode steps run (then cancelled) before timing: CUDA graphs are recorded by the third call


@dataclass
class Row:
    """One line of the table; None prints as '-'."""

    shape: str
    section: str
    mode: str
    c: int | None = None
    ms_step: float | None = None
    host_ms: float | None = None
    rate: float | None = None
    unit: str = ""
    ttft_s: float | None = None
    peak_gib: float | None = None
    roof_ms: float | None = None
    of_roof: float | None = None
    x_ref: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)  # JSON only (e.g. the greedy check's agreeing steps)

    @property
    def key(self) -> tuple[str, str, str, int | None]:
        return self.shape, self.section, self.mode, self.c


# --- the device -----------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_device_memory() -> None:
    """Give back what finished sections held, compiled CUDA graphs included."""
    gc.collect()
    if torch.cuda.is_available():
        with contextlib.suppress(Exception):  # an old or odd torch: the memory stays held, the run goes on
            torch._dynamo.reset()  # compiled functions keep their graphs' memory pools alive
        gc.collect()
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def free_bytes(device: torch.device) -> int | None:
    """Device memory still free (CUDA), or None where nobody counts it (CPU)."""
    return int(torch.cuda.mem_get_info(device)[0]) if device.type == "cuda" else None


# --- the engine -----------------------------------------------------------------------------------


def kv_bytes_needed(lm: LoadedModel, kind: str, slots: int) -> int:
    """KV bytes an engine of `make_engine(lm, kind, slots)` holds for its `slots` sequences."""
    per_token = kv_bytes_per_token(lm)
    if kind == "generate":
        return 2 * slots * (GEN_PROMPT_TOKENS + lm.num_image_tokens) * per_token
    return slots * min(UND_CONTEXT, lm.max_context) * per_token


MODES = ("eager", "graphs", "compile", "compile-graphs")  # how generation's decode step runs (EngineConfig)


def mode_config(mode: str) -> dict[str, bool]:
    """EngineConfig's flags of a mode: `graphs` captures the static step as CUDA graphs, `compile` compiles it."""
    flags = {"compile": mode.startswith("compile")}
    if mode.endswith("graphs"):
        flags["cuda_graphs"] = True
    return flags


def make_engine(lm: LoadedModel, kind: str, slots: int, *, compile: bool = False, cuda_graphs: bool = False) -> Engine:
    """The bench's only engine constructor: KV room for `slots` sequences of `kind` ("generate": images).

    With the paged KV pool (`EngineConfig.kv_cache_memory`) the room is one byte count; with the
    fixed per-kind rows of the engine before it, the other kind gets the minimum.
    """
    context = min(UND_CONTEXT, lm.max_context)
    if "kv_cache_memory" in {f.name for f in dataclasses.fields(EngineConfig)}:
        # Slack for block rounding: up to one partly filled block per row, at any block size up to 64.
        rows = 2 * slots if kind == "generate" else slots
        memory = kv_bytes_needed(lm, kind, slots) + rows * 64 * kv_bytes_per_token(lm)
        graphs = {"cuda_graphs": True} if cuda_graphs else {}  # an engine from before graphs has no such field
        config = EngineConfig(max_batch_size=slots, max_context=context, max_generation_prompt=GEN_PROMPT_TOKENS,
                              kv_cache_memory=memory, compile=compile, **graphs)
    elif kind == "generate":
        config = EngineConfig(max_batch_size=slots, max_generation_images=slots, max_context=2,
                              max_generation_prompt=GEN_PROMPT_TOKENS, compile=compile,
                              vision_cache_bytes=0, prefix_cache_bytes=0)
    else:
        config = EngineConfig(max_batch_size=slots, max_generation_images=1, max_context=context,
                              max_generation_prompt=1, compile=compile)
    return Engine(lm, config)


def forget_images(engine: Engine) -> None:
    """Drop the engine's cached image features and prompt prefixes, so a new level gets no hits."""
    if hasattr(engine, "clear_caches"):
        engine.clear_caches()
        return
    for name in ("vision", "prefixes"):
        cache = getattr(engine.understanding, name, None)
        if cache is not None:
            cache.clear()


class Clock:
    """An engine sink: first-token and finish times, tokens per request, results; failures kept."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first: dict[str, float] = {}
        self.done: dict[str, float] = {}
        self.tokens: dict[str, int] = {}
        self.results: dict[str, object] = {}
        self.failed: list[str] = []

    def __call__(self, out) -> None:
        now = time.perf_counter() - self.started
        if isinstance(out, TokenOutput):
            self.first.setdefault(out.request_id, now)
            self.tokens[out.request_id] = self.tokens.get(out.request_id, 0) + 1
        elif isinstance(out, FinishedOutput):
            self.done[out.request_id] = now
            self.results[out.request_id] = out.result
        elif isinstance(out, FailedOutput) and out.reason != "cancelled":
            self.failed.append(f"{out.request_id}: {out.message}")


class StepTimer:
    """Steps an engine on this thread, timing every step and every forward pass inside it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.device = engine.lm.device
        self.steps: list[float] = []
        self.forwards: list[float] = []
        # The static step (compiled or graphed) is one function from token ids to logits: timed whole, embedding
        # and head included.
        runner = engine.runner
        static = getattr(runner, "compile", False) or getattr(runner, "cuda_graphs", False)
        name = "decode_logits" if static else "decode"
        forward = getattr(engine.runner, name, None)
        if forward is None:  # a runner without one decode entry point: steps are timed, forwards are not
            return

        def timed_forward(*args, **kwargs):
            sync(self.device)
            started = time.perf_counter()
            out = forward(*args, **kwargs)
            sync(self.device)
            self.forwards.append(time.perf_counter() - started)
            return out

        setattr(engine.runner, name, timed_forward)  # this engine's runner only; the batches call it through there

    def run(self, requests: list, clock: Clock) -> float:
        """Submit `requests` together, step until idle; returns the makespan in seconds."""
        self.steps.clear()
        self.forwards.clear()
        clock.started = started = time.perf_counter()
        for req in requests:
            self.engine.add_request(req, clock)
        while True:
            t0 = time.perf_counter()
            if not self.engine.step():
                break
            self.steps.append(time.perf_counter() - t0)
        sync(self.device)
        if clock.failed:
            raise RunFailed(f"{len(clock.failed)} request(s) failed, first: {clock.failed[0]}")
        return time.perf_counter() - started

    def warm(self, requests: list, steps: int = WARM_STEPS) -> float:
        """Run `steps` steps of `requests`, then cancel them: compiles/captures what this load uses."""
        started = time.perf_counter()
        clock = Clock()
        for req in requests:
            self.engine.add_request(req, clock)
        for _ in range(steps):
            self.engine.step()
        for req in requests:
            self.engine.cancel(req.request_id)
        self.engine.run_until_idle()
        sync(self.device)
        if clock.failed:
            raise RuntimeError(f"warm-up failed: {clock.failed[0]}")
        return time.perf_counter() - started

    def medians_ms(self) -> tuple[float, float | None]:
        """(median step, median forward or None) in ms over the last `run`."""
        forward = 1000 * statistics.median(self.forwards) if self.forwards else None
        return 1000 * statistics.median(self.steps), forward


def host_ms(step_ms: float, forward_ms: float | None) -> float | None:
    return None if forward_ms is None else step_ms - forward_ms


class RunFailed(RuntimeError):
    """Requests of a timed run failed; the steps timed until then are still on the timer."""


def random_images(count: int, size: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def roofline_ms(weight_bytes: int, kv_bytes: float, bandwidth: float) -> float:
    return 1000 * (weight_bytes + kv_bytes) / bandwidth


# --- generation -----------------------------------------------------------------------------------


def generation_requests(tag: str, count: int, *, temperature: float = 1.0) -> list[GenerateRequest]:
    return [GenerateRequest(f"{tag}-{i}", f"{PROMPTS[i % len(PROMPTS)]} #{i}",
                            params=SamplingParams(temperature=temperature, seed=i)) for i in range(count)]


def generation_level(lm: LoadedModel, timer: StepTimer, c: int, mode: str, bandwidth: float) -> Row:
    """c images (c requests, n=1, CFG 5, temperature 1) in flight together; one row."""
    # Compiling and capturing need this level's batch bucket; eager only needs the code paths touched once.
    compiled = mode != "eager"
    warm_s = timer.warm(generation_requests(f"warm{c}", c if compiled else 1), WARM_STEPS if compiled else 2)
    requests = generation_requests(f"g{c}", c)
    reset_peak(lm.device)
    note = f"warm-up {warm_s:.1f} s"
    clock = Clock()
    try:
        makespan: float | None = timer.run(requests, clock)
        if len(clock.done) != c:
            raise RuntimeError(f"{len(clock.done)} of {c} requests finished")
    except RunFailed as exc:
        # The decode steps may all have run and only the batched VQ decode failed (memory at 64 images):
        # keep the step figures, drop the rate.
        if len(timer.steps) < lm.num_image_tokens // 2:
            raise
        makespan, note = None, f"failed after the decode steps: {exc}"
    ms_step, fwd_ms = timer.medians_ms()
    # Row b of a step attends over its prompt and the codes so far: on average prompt + N/2 positions.
    mean_prompt = statistics.fmean(len(build_generation_ids(lm, r.prompt)) for r in requests)
    kv_read = 2 * c * (mean_prompt + lm.num_image_tokens / 2) * kv_bytes_per_token(lm)
    roof = roofline_ms(step_weight_bytes(lm, "generate"), kv_read, bandwidth)
    return Row(lm.name.removeprefix("random-"), "generate", mode, c, ms_step=ms_step, host_ms=host_ms(ms_step, fwd_ms),
               rate=None if makespan is None else c / makespan, unit="img/s", peak_gib=peak_gib(lm.device),
               roof_ms=roof, of_roof=roof / ms_step, note=note,
               extra={"forward_ms": fwd_ms, "makespan_s": makespan, "warm_s": warm_s})


# --- understanding --------------------------------------------------------------------------------


def understanding_level(lm: LoadedModel, engine: Engine, timer: StepTimer, c: int, max_new_tokens: int,
                        bandwidth: float) -> Row:
    """c requests, each with its own fresh image (no cache hits), greedy, `max_new_tokens` each; one row."""
    pics = random_images(c, lm.image_size, seed=1000 + c)
    requests = [UnderstandRequest(f"u{c}-{i}", QUESTIONS[0], [pics[i]], max_new_tokens=max_new_tokens)
                for i in range(c)]
    forget_images(engine)
    reset_peak(lm.device)
    makespan = timer.run(requests, clock := Clock())
    tokens = sum(clock.tokens.values())
    ms_step, fwd_ms = timer.medians_ms()
    prompt = len(build_understanding_inputs(lm, pics[:1], QUESTIONS[0]).input_ids)
    kv_read = c * (prompt + max_new_tokens / 2) * kv_bytes_per_token(lm)
    roof = roofline_ms(step_weight_bytes(lm, "understand"), kv_read, bandwidth)
    return Row(lm.name.removeprefix("random-"), "understand", "eager", c, ms_step=ms_step,
               host_ms=host_ms(ms_step, fwd_ms), rate=tokens / makespan, unit="tok/s",
               ttft_s=statistics.median(clock.first.values()),
               peak_gib=peak_gib(lm.device), roof_ms=roof, of_roof=roof / ms_step,
               note=f"{tokens / c:.0f} tokens/request, prompt {prompt}",
               extra={"forward_ms": fwd_ms, "makespan_s": makespan, "tokens": tokens})


def warm_understanding(lm: LoadedModel, timer: StepTimer) -> None:
    pic = random_images(1, lm.image_size, seed=999)
    timer.run([UnderstandRequest("warm", QUESTIONS[1], pic, max_new_tokens=2)], Clock())


# --- references -----------------------------------------------------------------------------------


def reference_image_row(ref: LoadedModel, requests: int, bandwidth: float) -> Row:
    """transformers' image-mode generate, one request at a time; the first warms up when there are two or more."""
    shape = ref.name.removeprefix("random-")
    steps = ref.num_image_tokens
    times = []
    reset_peak(ref.device)
    for i in range(max(requests, 1)):
        sync(ref.device)
        started = time.perf_counter()
        hf_generate_image(ref, PROMPTS[i % len(PROMPTS)], seed=i)
        sync(ref.device)
        times.append(time.perf_counter() - started)
    image_s = statistics.fmean(times[1:] or times)
    prompt = len(build_generation_ids(ref, PROMPTS[0]))
    roof = roofline_ms(step_weight_bytes(ref, "generate"),
                       2 * (prompt + steps / 2) * kv_bytes_per_token(ref), bandwidth)
    ms_step = 1000 * image_s / steps
    return Row(shape, "transformers image", "eager", 1, ms_step=ms_step, rate=1 / image_s, unit="img/s",
               peak_gib=peak_gib(ref.device), roof_ms=roof, of_roof=roof / ms_step,
               note=f"generate(generation_mode='image'), {len(times)} request(s)", extra={"seconds": times})


def reference_text_row(ref: LoadedModel, requests: int, max_new_tokens: int, bandwidth: float) -> Row:
    """transformers' generate for text (greedy, one image each), one request at a time, after a warm-up."""
    shape = ref.name.removeprefix("random-")
    pics = random_images(max(requests, 1) + 1, ref.image_size, seed=2000)
    hf_understand(ref, pics[-1:], QUESTIONS[1], max_new_tokens=2)  # warm-up
    reset_peak(ref.device)
    runs = [hf_understand(ref, [pics[i]], QUESTIONS[0], max_new_tokens=max_new_tokens) for i in range(max(requests, 1))]
    tokens = sum(r.tokens for r in runs)
    seconds = sum(r.seconds for r in runs)
    decode_ms = 1000 * statistics.fmean((r.seconds - r.ttft) / max(r.tokens - 1, 1) for r in runs)
    text_prompt = len(build_understanding_inputs(ref, pics[:1], QUESTIONS[0]).input_ids)
    text_roof = roofline_ms(step_weight_bytes(ref, "understand"),
                            (text_prompt + max_new_tokens / 2) * kv_bytes_per_token(ref), bandwidth)
    return Row(shape, "transformers text", "eager", 1, ms_step=decode_ms, rate=tokens / seconds, unit="tok/s",
               ttft_s=statistics.fmean(r.ttft for r in runs), peak_gib=peak_gib(ref.device),
               roof_ms=text_roof, of_roof=text_roof / decode_ms,
               note=f"generate, {len(runs)} request(s), {tokens / len(runs):.0f} tokens/request",
               extra={"seconds": [r.seconds for r in runs]})


# --- greedy check -----------------------------------------------------------------------------------


def agreeing_prefix(ours: list[int], theirs: list[int]) -> int:
    n = 0
    for a, b in zip(ours, theirs, strict=False):
        if a != b:
            break
        n += 1
    return n


def _check_row(shape: str, kind: str, ours: list[list[int]], theirs: list[list[int]], dtype: torch.dtype,
               graphed: list[list[int]] | str | None) -> Row:
    """`graphed`: the same requests through an engine with CUDA graphs (None: its warm-up dropped them; a
    string: the error it raised)."""
    equal = sum(a == b for a, b in zip(ours, theirs, strict=True))
    agree = [agreeing_prefix(a, b) for a, b in zip(ours, theirs, strict=True)]
    lengths = [max(len(a), len(b)) for a, b in zip(ours, theirs, strict=True)]
    note = f"{equal}/{len(ours)} requests token-equal to transformers"
    if equal < len(ours):
        note += "; steps agreeing " + ", ".join(f"{a}/{n}" for a, n in zip(agree, lengths, strict=True))
    extra = {"equal": equal, "requests": len(ours), "agree": agree, "lengths": lengths, "dtype": str(dtype)}
    if graphed is None:
        note += "; CUDA graphs: dropped at warm-up (see the log)"
    elif isinstance(graphed, str):
        note += f"; --cuda-graphs {graphed}"
    else:
        extra["equal_graphs"] = sum(a == b for a, b in zip(graphed, theirs, strict=True))
        note += f"; with --cuda-graphs {extra['equal_graphs']}/{len(ours)}"
    return Row(shape, "greedy check", kind, len(ours), note=note, extra=extra)


CHECK_IMAGES = 2  # greedy generation requests in the check (576 transformers steps each on a real shape)


def _through_engine(lm: LoadedModel, kind: str, requests: list, mode: str) -> Clock | None:
    """Run `requests` through a fresh engine of `mode`, warmed up as a server is (every bucket captured, largest
    first, with graphs); None when that warm-up dropped the mode's graphs."""
    engine = make_engine(lm, kind, len(requests), **mode_config(mode))
    if mode != "eager":
        engine.warm_up()
        if not getattr(engine.runner, "cuda_graphs", False):
            return None
    StepTimer(engine).run(requests, clock := Clock())
    return clock


def _both_engines(lm: LoadedModel, kind: str, requests: list, tokens: Callable) -> tuple[list, list | str | None]:
    """`tokens(result)` of each request through an eager engine, and through one with CUDA graphs: a list, None
    (its warm-up dropped the graphs) or the error that engine raised (the eager figures stay)."""
    clock = _through_engine(lm, kind, requests, "eager")
    ours = [tokens(clock.results[r.request_id]) for r in requests]
    try:
        graphed_clock = _through_engine(lm, kind, requests, "graphs")
    except Exception as exc:
        traceback.print_exc()
        return ours, f"failed: {type(exc).__name__}: {exc}".splitlines()[0][:160]
    if graphed_clock is None:
        return ours, None
    return ours, [tokens(graphed_clock.results[r.request_id]) for r in requests]


def greedy_check_understanding(lm: LoadedModel, ref: LoadedModel, max_new_tokens: int) -> Row:
    """Greedy understanding requests batched through our engine (eager, and with CUDA graphs) against
    transformers one at a time."""
    pics = random_images(len(QUESTIONS), lm.image_size, seed=3000)
    und = [UnderstandRequest(f"check-u{i}", q, [pics[i]], max_new_tokens=max_new_tokens)
           for i, q in enumerate(QUESTIONS)]
    ours, graphed = _both_engines(lm, "understand", und, lambda result: list(result.token_ids))
    theirs = [hf_understand(ref, r.images, r.prompt, max_new_tokens=max_new_tokens).ids for r in und]
    return _check_row(lm.name.removeprefix("random-"), "understand", ours, theirs, lm.dtype, graphed)


def greedy_check_generation(lm: LoadedModel, ref: LoadedModel) -> Row:
    """Greedy (temperature 0) CFG image requests batched through our engine (eager, and with CUDA graphs) against
    transformers' image mode."""
    gen = generation_requests("check-g", CHECK_IMAGES, temperature=0.0)
    ours, graphed = _both_engines(lm, "generate", gen, lambda result: result.tokens[0].tolist())
    theirs = [hf_generate_image(ref, r.prompt, temperature=0.0)[0].tolist() for r in gen]
    return _check_row(lm.name.removeprefix("random-"), "generate", ours, theirs, lm.dtype, graphed)


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started
