"""Engine oracle tests on the tiny random model: batched outputs equal single-request outputs and
transformers' per-request `generate` (text and image tokens), seeds hold alone vs batched, requests
join and leave mid-flight, and the vision / prefix caches change nothing but the work done."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from janus_core import (
    Engine,
    EngineConfig,
    FailedOutput,
    FinishedOutput,
    GenerateRequest,
    ProgressOutput,
    TokenOutput,
    UnderstandRequest,
)
from janus_core.models.loader import LoadedModel, load_model
from janus_core.sampling.params import SamplingParams
from janus_core.simple.understand import understand
from janus_core.text.processor import build_understanding_inputs
from tests.support.engine_oracle import (
    Collector,
    reference_image_tokens,
    run,
    transformers_image_tokens,
    transformers_text_tokens,
)

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def lm(tiny_hf_dir) -> LoadedModel:
    """A model of the engine tests' own: an engine packs its linear layers in place (janus_core.step.packed_linear)."""
    return load_model(str(tiny_hf_dir), "cpu")


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (48 + 8 * i, 64, 3), dtype=np.uint8)) for i in range(3)]


def gen_mix() -> list[GenerateRequest]:
    return [
        GenerateRequest("g-short", "a cat", n=2, cfg_weight=5.0, params=GREEDY),
        GenerateRequest("g-long", "A photo of a mountain lake at sunrise, with mist over the water", n=1,
                        cfg_weight=3.0, params=GREEDY),
        GenerateRequest("g-sampled", "neon city at night", n=2, cfg_weight=5.0,
                        params=SamplingParams(temperature=1.0, top_p=0.9, seed=7)),
    ]


def understand_mix(images: list[Image.Image]) -> list[UnderstandRequest]:
    return [
        UnderstandRequest("u-one", "Describe this image in detail.", [images[0]], max_new_tokens=12),
        UnderstandRequest("u-text", "hello world", [], max_new_tokens=9),
        UnderstandRequest("u-two", "What is shown in the picture?", [images[1], images[2]], max_new_tokens=7),
        UnderstandRequest("u-sampled", "the quick brown fox", [images[2]], max_new_tokens=10,
                          params=SamplingParams(temperature=0.9, top_p=0.8, seed=11)),
    ]


def test_engine_packs_cpu_linears(lm, tiny_hf):
    from janus_core.step.packed_linear import PackedLinear

    Engine(lm)
    assert not [m for m in tiny_hf.model.modules() if isinstance(m, PackedLinear)]  # the oracle's copy
    packed = [m for m in lm.model.modules() if isinstance(m, PackedLinear)]
    assert packed and not [m for m in lm.model.modules() if type(m) is torch.nn.Linear]


def test_mixed_batch_equals_single_request_and_transformers(lm, tiny_hf, images):
    """The engine (packed linears) against transformers' generate on an untouched copy of the model."""
    gens, unds = gen_mix(), understand_mix(images)
    sink = run(Engine(lm, EngineConfig(max_batch_size=8)), [*gens, *unds])
    for req in gens:
        got = sink.result(req.request_id).tokens
        assert torch.equal(got, reference_image_tokens(lm, req)), req.request_id
        if req.params.greedy:
            assert got[0].tolist() == transformers_image_tokens(tiny_hf, req.prompt, req.cfg_weight), req.request_id
        progress = [o.step for o in sink.outputs[req.request_id] if isinstance(o, ProgressOutput)]
        assert progress == list(range(1, lm.num_image_tokens + 1))
        assert sink.result(req.request_id).images.shape == (req.n, lm.image_size, lm.image_size, 3)
    for req in unds:
        got = sink.result(req.request_id)
        ref = understand(lm, req.images, req.prompt, max_new_tokens=req.max_new_tokens, params=req.params)
        assert got.token_ids == ref.token_ids and got.finish_reason == ref.finish_reason, req.request_id
        if req.params.greedy:
            assert got.token_ids == transformers_text_tokens(tiny_hf, req), req.request_id
        streamed = [o for o in sink.outputs[req.request_id] if isinstance(o, TokenOutput)]
        assert [o.token_id for o in streamed] == got.token_ids
        # A trailing incomplete UTF-8 sequence is held back by the incremental decoder, never re-sent.
        assert got.text.startswith("".join(o.delta for o in streamed))


def test_seeded_sampling_same_alone_and_batched(lm, images):
    gen = GenerateRequest("g", "a watercolor boat", n=2, params=SamplingParams(temperature=1.0, seed=123))
    und = UnderstandRequest("u", "Describe this image.", [images[0]], max_new_tokens=10,
                            params=SamplingParams(temperature=1.0, seed=5))
    alone = run(Engine(lm), [gen, und])
    crowd = run(Engine(lm), [*gen_mix(), gen, *understand_mix(images), und])
    # The same requests in another order: our two sit at the front of the batch now.
    ahead = run(Engine(lm), [und, gen, *reversed(understand_mix(images)), *reversed(gen_mix())])
    for other in (crowd, ahead):
        assert torch.equal(alone.result("g").tokens, other.result("g").tokens)
        assert np.array_equal(alone.result("g").images, other.result("g").images)  # pixels too, to the byte
        assert alone.result("u").token_ids == other.result("u").token_ids
    assert alone.result("g").seed == 123
    assert len(set(alone.result("u").token_ids)) > 1  # sampled, not a constant answer
    # Image i of a request draws from seed + i: image 1 of seed 123 is image 0 of seed 124.
    shifted = run(Engine(lm), [GenerateRequest("s", gen.prompt, n=1, params=SamplingParams(temperature=1.0, seed=124))])
    assert torch.equal(shifted.result("s").tokens[0], alone.result("g").tokens[1])


def test_requests_join_and_cancel_mid_flight(lm, images):
    engine = Engine(lm, EngineConfig(max_batch_size=6))
    sink = Collector()
    first = [GenerateRequest("g1", "a cat", n=2, params=GREEDY),
             UnderstandRequest("u1", "Describe this image.", [images[0]], max_new_tokens=14)]
    victims = [GenerateRequest("g-x", "neon city", n=1, params=GREEDY),
               UnderstandRequest("u-x", "hello world", [], max_new_tokens=14)]
    for req in [*first, *victims]:
        engine.add_request(req, sink)
    for _ in range(4):
        engine.step()
    late = [GenerateRequest("g2", "A photo of a mountain lake", n=1, cfg_weight=2.0, params=GREEDY),
            UnderstandRequest("u2", "What color is the car?", [images[1]], max_new_tokens=6)]
    for req in late:
        engine.add_request(req, sink)
    engine.cancel("g-x")
    engine.cancel("u-x")
    engine.step()
    assert engine.stats().running == {"understand": 2, "generate": 2}  # the late ones joined, the victims left
    engine.run_until_idle()
    for rid in ("g-x", "u-x"):
        assert isinstance(sink.outputs[rid][-1], FailedOutput) and sink.outputs[rid][-1].reason == "cancelled"
        assert sum(isinstance(o, FinishedOutput | FailedOutput) for o in sink.outputs[rid]) == 1
    for req in (*first, *late):
        if isinstance(req, GenerateRequest):
            assert torch.equal(sink.result(req.request_id).tokens, reference_image_tokens(lm, req))
        else:
            ref = understand(lm, req.images, req.prompt, max_new_tokens=req.max_new_tokens)
            assert sink.result(req.request_id).token_ids == ref.token_ids
    assert engine.pool.num_used == 0  # every block came back


def test_prefix_and_vision_caches_hit_without_changing_outputs(lm, images):
    engine = Engine(lm)
    q1 = UnderstandRequest("q1", "Describe this image in detail.", [images[0]], max_new_tokens=8)
    q2 = UnderstandRequest("q2", "What color is the car?", [images[0]], max_new_tokens=8)
    q3 = UnderstandRequest("q3", "Compare the two pictures.", [images[1], images[0]], max_new_tokens=8)
    sink = run(engine, [q1])
    assert engine.stats().prefix_cache_misses == 1 and engine.stats().prefix_tokens_reused == 0
    run(engine, [q2], sink)
    after_q2 = engine.stats()
    assert after_q2.prefix_cache_hits == 1
    assert after_q2.prefix_tokens_reused > lm.num_image_tokens  # system prompt and q1's image, by reference
    run(engine, [q3], sink)
    stats = engine.stats()
    assert stats.prefix_cache_hits == 2  # q3 (a new image first) reused the system prompt's blocks only
    assert 0 < stats.prefix_tokens_reused - after_q2.prefix_tokens_reused < after_q2.prefix_tokens_reused
    assert stats.vision_cache_hits >= 1  # q3's second image was seen by q1
    for req in (q1, q2, q3):
        ref = understand(lm, req.images, req.prompt, max_new_tokens=req.max_new_tokens)
        assert sink.result(req.request_id).token_ids == ref.token_ids, req.request_id
    cold = Engine(lm, EngineConfig(prefix_caching=False, vision_cache_bytes=0))
    cold_sink = run(cold, [q1, q2])
    assert cold.stats().prefix_cache_hits == 0 and cold.stats().vision_cache_hits == 0
    assert cold_sink.result("q2").token_ids == sink.result("q2").token_ids


def test_images_are_part_of_the_block_keys(lm, images):
    """Two prompts that differ only in their image share the blocks before the image, none after."""
    engine = Engine(lm)
    a = UnderstandRequest("a", "What is in this image?", [images[0]], max_new_tokens=6)
    b = UnderstandRequest("b", "What is in this image?", [images[1]], max_new_tokens=6)
    sink = run(engine, [a])
    run(engine, [b], sink)
    ids = build_understanding_inputs(lm, b.images, b.prompt).input_ids
    first_image = ids.index(lm.special["image"])
    assert 0 < engine.stats().prefix_tokens_reused <= first_image
    for req in (a, b):
        assert sink.result(req.request_id).token_ids == understand(lm, req.images, req.prompt,
                                                                   max_new_tokens=6).token_ids


def test_shared_system_prompt_is_reused_by_text_only_and_new_image_requests(lm, tiny_hf, images):
    engine = Engine(lm)
    first = [UnderstandRequest("t1", "hello world", [], max_new_tokens=9)]
    later = [UnderstandRequest("t2", "the quick brown fox jumps", [], max_new_tokens=9),
             UnderstandRequest("i1", "Describe this image in detail.", [images[1]], max_new_tokens=9),
             UnderstandRequest("i2", "What is in both?", [images[2], images[0]], max_new_tokens=9)]
    sink = run(engine, first)
    run(engine, later, sink)
    stats = engine.stats()
    assert stats.prefix_cache_hits == 3 and stats.prefix_cache_misses == 1
    assert stats.prefix_tokens_reused >= 3 * 16
    for req in first + later:
        assert sink.result(req.request_id).token_ids == transformers_text_tokens(tiny_hf, req), req.request_id


@pytest.mark.parametrize(("request_", "words"), [
    (UnderstandRequest("r", "x", [], max_new_tokens=5000), "max_new_tokens 5000 exceeds the limit of 2048"),
    (UnderstandRequest("r", "x", [], max_new_tokens=0), "max_new_tokens must be at least 1"),
    (UnderstandRequest("r", "x", [], max_new_tokens=1000), "context length"),
    (GenerateRequest("r", "x", n=40), "n=40 exceeds"),
    (GenerateRequest("r", "x", cfg_weight=-1), "cfg_weight"),
])
def test_limits_are_checked_up_front(lm, request_, words):
    sink = run(Engine(lm), [request_])
    out = sink.outputs["r"]
    assert len(out) == 1 and out[0].reason == "invalid" and words in out[0].message


def test_too_many_images(lm, images):
    sink = run(Engine(lm, EngineConfig(max_images=2)), [UnderstandRequest("r", "x", images, max_new_tokens=2)])
    assert "3 images given; at most 2" in sink.outputs["r"][0].message


def test_engine_thread_serves_concurrent_requests(lm, images):
    engine = Engine(lm, EngineConfig(max_batch_size=4))
    sink = Collector()
    requests = [*gen_mix()[:2], *understand_mix(images)[:2]]
    sink.expected = len(requests) + 1
    engine.start()
    try:
        for req in requests:
            engine.add_request(req, sink)
        engine.add_request(GenerateRequest("late-cancel", "a cat", params=GREEDY), sink)
        engine.cancel("late-cancel")
        assert sink.done.wait(60)
    finally:
        engine.stop(timeout=10)
    assert sink.outputs["late-cancel"][-1].reason == "cancelled"
    stats = engine.stats()
    assert stats.finished == 4 and stats.failed == 1 and stats.images_generated == 3
    assert {kind for kind, _ in stats.batch_sizes} == {"understand", "generate"}


def test_overlapped_streaming_changes_nothing_but_when(lm, images):
    """With overlap (the CUDA default), a step's tokens are streamed while the next step runs: every
    request gets the same outputs in the same order, cancellations and stop strings included."""
    def outputs(overlap: bool) -> dict:
        engine = Engine(lm, EngineConfig(max_batch_size=8, overlap=overlap))
        sink = Collector()
        reqs = [*gen_mix(), *understand_mix(images),
                UnderstandRequest("u-stop", "hello world", [], max_new_tokens=20, stop=["\x00never"])]
        sink.expected = len(reqs) + 1
        for req in reqs:
            engine.add_request(req, sink)
        for _ in range(3):
            engine.step()
        engine.add_request(UnderstandRequest("u-late", "a late question", [images[0]], max_new_tokens=6), sink)
        engine.cancel("g-long")
        engine.run_until_idle()
        assert sink.done.is_set()
        def summary(o):
            result = getattr(o, "result", None)
            answer = getattr(result, "text", None) or (result.tokens.tolist() if result is not None else None)
            fields = (getattr(o, name, None) for name in ("token_id", "delta", "step"))
            return type(o).__name__, *fields, answer

        return {rid: [summary(o) for o in outs] for rid, outs in sink.outputs.items()}

    plain, overlapped = outputs(False), outputs(True)
    assert overlapped == plain
    assert plain["g-long"][-1][0] == "FailedOutput" and plain["u-late"][-1][0] == "FinishedOutput"


def assert_same_results(reqs, expected, got) -> None:
    """Every request's image codes or answer tokens in `got` equal `expected`'s (two `run` collectors)."""
    for req in reqs:
        a, b = expected.result(req.request_id), got.result(req.request_id)
        if isinstance(req, GenerateRequest):
            assert torch.equal(a.tokens, b.tokens), req.request_id
        else:
            assert a.token_ids == b.token_ids, req.request_id


def test_compiled_engine_never_recompiles_after_warm_up(lm, images):
    """Warm-up compiles each head's step once per batch bucket; serving after it (positions moving, rows
    joining and leaving, both heads, greedy and seeded) compiles nothing more, whatever the installed
    transformers wraps its layers in (its hub-kernel wrappers once added a guard that tripped after the
    first call)."""
    compiled: list[int] = []

    def counting_backend(graph, inputs):  # traced like inductor would be, run eagerly
        compiled.append(len(graph.graph.nodes))
        return graph.forward

    torch._dynamo.reset()
    engine = Engine(lm, EngineConfig(max_batch_size=16, attention="flex", compile=True,
                                     compile_backend=counting_backend))
    engine.warm_up()
    assert engine.runner.compile, "warm-up fell back to the eager step"  # 11 graphs of one code object
    warmed = len(compiled)
    assert warmed == 5 + 6  # text: buckets 1-16 (max_batch_size rows); image: 1-32 (16 images' CFG pairs)
    sink = Collector()
    sink.expected = 5
    for req in gen_mix()[:2]:
        engine.add_request(req, sink)
    engine.step()
    engine.step()
    for req in understand_mix(images)[:3]:  # rows join mid-flight
        engine.add_request(req, sink)
    engine.run_until_idle()
    assert sink.done.is_set()
    assert len(compiled) == warmed, f"{len(compiled) - warmed} recompilation(s) after warm-up"


def test_compiled_static_step_in_the_engine_equals_eager(lm, images):
    """`compile` routes decode steps through the static step (traced whole by dynamo, fullgraph, here
    with the eager backend: inductor's own compile is tests/model/test_compiled_step.py), padded to
    buckets with a scratch block: the same tokens as the eager engine, greedy and seeded."""
    reqs = [*gen_mix(), *understand_mix(images)]
    eager = run(Engine(lm, EngineConfig(max_batch_size=8)), reqs)
    compiled_engine = Engine(lm, EngineConfig(max_batch_size=8, attention="flex", compile=True,
                                              compile_backend="eager"))
    assert compiled_engine.runner.scratch_slot == compiled_engine.pool.num_blocks * compiled_engine.kv.block_size
    compiled = run(compiled_engine, reqs)
    assert set(compiled_engine.runner._static) == {"text", "image"}
    assert_same_results(reqs, eager, compiled)


def test_graphed_step_in_the_engine_equals_eager(lm, images):
    """`cuda_graphs`: warm-up captures each head's static step once per bucket, largest first (on CPU a bucket
    runs the step on its static buffers, the same path as a replayed graph); serving copies each step's rows into
    its bucket's buffers, captures nothing more, and gives the eager engine's tokens while rows join and leave
    (buckets change; a bucket's buffers keep the last step's values in rows a smaller batch does not fill)."""
    reqs = [*gen_mix(), *understand_mix(images)]
    eager = run(Engine(lm, EngineConfig(max_batch_size=8)), reqs)
    engine = Engine(lm, EngineConfig(max_batch_size=8, attention="flex", cuda_graphs=True))
    engine.warm_up()
    assert engine.runner.cuda_graphs, "warm-up dropped the graphs"
    graphs = engine.runner._graphs
    captured = {head: graphs[head].rows() for head in graphs}
    assert captured == {"image": [16, 8, 4, 2, 1], "text": [8, 4, 2, 1]}  # 8 sequences; CFG pairs of 8 images
    graphed = run(engine, reqs)
    assert {head: graphs[head].rows() for head in graphs} == captured, "captured again while serving"
    assert_same_results(reqs, eager, graphed)


def test_a_failed_capture_leaves_the_step_without_graphs(lm, images, monkeypatch, caplog):
    """A capture that raises at warm-up (an unsupported op on this torch or driver) is logged, the graphs are
    dropped, and the engine serves with the plain step: the same tokens."""
    from janus_core.step.graphs import StepGraphs

    def refuse(self, args):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(StepGraphs, "capture", refuse)
    reqs = understand_mix(images)[:2]
    eager = run(Engine(lm, EngineConfig(max_batch_size=4)), reqs)
    engine = Engine(lm, EngineConfig(max_batch_size=4, attention="flex", cuda_graphs=True))
    engine.warm_up()
    assert not engine.runner.cuda_graphs and not engine.runner._graphs
    assert "capturing the decode step as CUDA graphs failed" in caplog.text
    assert_same_results(reqs, eager, run(engine, reqs))


# --- vLLM's sampling extensions through the engine -------------------------------------------------------------


def test_repetition_penalty_matches_transformers_alone_and_batched(lm, tiny_hf, images):
    """Greedy with a repetition penalty (every prompt and answer token counted, image placeholders included)
    gives transformers' tokens, beside other requests and alone; the penalty changes the answer."""
    def request(rid: str, penalty: float) -> UnderstandRequest:
        return UnderstandRequest(rid, "Describe this image in detail.", [images[0]], max_new_tokens=16,
                                 params=SamplingParams(repetition_penalty=penalty))

    penalized, plain = request("pen", 1.6), request("plain", 1.0)
    inputs = build_understanding_inputs(tiny_hf, penalized.images, penalized.prompt)
    ids = torch.tensor([inputs.input_ids])
    out = tiny_hf.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs.pixel_values,
                                 max_new_tokens=16, do_sample=False, repetition_penalty=1.6)
    expected = out[0, ids.shape[1]:].tolist()
    eos = lm.special["eos"]
    expected = expected[:expected.index(eos)] if eos in expected else expected
    crowd = run(Engine(lm, EngineConfig(max_batch_size=8)), [penalized, plain, *understand_mix(images)])
    alone = run(Engine(lm), [request("pen", 1.6)])
    assert crowd.result("pen").token_ids == expected == alone.result("pen").token_ids
    assert crowd.result("plain").token_ids != expected


@pytest.fixture(scope="module")
def eos_model(tiny_hf_dir) -> LoadedModel:
    """The tiny model with EOS every step's best token by far (a bias on the text head)."""
    model = load_model(str(tiny_hf_dir), "cpu")
    head = model.model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    biased.weight.data.copy_(head.weight.data)
    biased.bias.data.zero_()
    biased.bias.data[model.special["eos"]] = 1000.0
    model.model.lm_head = biased
    return model


def test_ignore_eos_and_min_tokens(eos_model, images):
    eos = eos_model.special["eos"]
    sampled = dict(temperature=1.0, seed=3)
    reqs = [UnderstandRequest("plain", "hello", [images[0]], max_new_tokens=6),
            UnderstandRequest("ignore", "hello", [images[0]], max_new_tokens=6, params=SamplingParams(ignore_eos=True)),
            UnderstandRequest("min", "hello", [images[0]], max_new_tokens=6, params=SamplingParams(min_tokens=4)),
            UnderstandRequest("min-sampled", "hello", [images[1]], max_new_tokens=9,
                              params=SamplingParams(min_tokens=5, **sampled)),
            UnderstandRequest("both", "hello", [], max_new_tokens=5,
                              params=SamplingParams(min_tokens=2, ignore_eos=True))]
    sink = run(Engine(eos_model, EngineConfig(max_batch_size=8)), reqs)
    plain, ignore, least, least_sampled, both = (sink.result(r.request_id) for r in reqs)
    assert (plain.finish_reason, plain.completion_tokens) == ("stop", 0)
    assert (ignore.finish_reason, ignore.token_ids, ignore.text) == ("length", [eos] * 6, "")
    assert least.finish_reason == "stop" and len(least.token_ids) == 4 and eos not in least.token_ids
    assert least_sampled.finish_reason == "stop" and len(least_sampled.token_ids) == 5
    assert eos not in least_sampled.token_ids
    assert both.finish_reason == "length" and both.token_ids[2:] == [eos] * 3 and eos not in both.token_ids[:2]
    alone = run(Engine(eos_model), [UnderstandRequest("min-sampled", "hello", [images[1]], max_new_tokens=9,
                                                      params=SamplingParams(min_tokens=5, **sampled))])
    assert alone.result("min-sampled").token_ids == least_sampled.token_ids


def test_seeded_extensions_same_alone_and_batched(lm, images):
    """A seeded request with every extension draws the same tokens alone and in a crowd of other requests."""
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, min_p=0.02, repetition_penalty=1.3, min_tokens=3,
                            seed=21)

    def req() -> UnderstandRequest:
        return UnderstandRequest("x", "Describe this image.", [images[1]], max_new_tokens=14, params=params)

    alone = run(Engine(lm), [req()]).result("x")
    crowd = run(Engine(lm, EngineConfig(max_batch_size=8)), [*understand_mix(images), req(), *gen_mix()[:1]])
    assert crowd.result("x").token_ids == alone.token_ids and len(alone.token_ids) >= 3
    reference = understand(lm, [images[1]], "Describe this image.", max_new_tokens=14, params=params)
    assert reference.token_ids == alone.token_ids  # the one-request path (janus_core.simple.understand) agrees


def test_an_admitted_request_streams_its_first_token_before_the_running_ones_step(lm, images):
    """Time to first token: a request prefilled in a step answers its first token before the step's decode of
    the requests already running is launched, not after it."""
    engine = Engine(lm, EngineConfig(max_batch_size=4))
    order: list[str] = []
    launch = engine.text.launch

    def traced(seqs):
        order.append("decode " + ",".join(s.request_id for s in seqs))
        return launch(seqs)

    engine.text.launch = traced
    sink = lambda out: order.append(f"{type(out).__name__} {out.request_id}")  # noqa: E731
    engine.add_request(UnderstandRequest("a", "Describe this image.", [images[0]], max_new_tokens=8, params=GREEDY),
                       sink)
    engine.step()  # a: prefill and first token
    engine.add_request(UnderstandRequest("b", "What is shown?", [images[1]], max_new_tokens=8, params=GREEDY), sink)
    order.clear()
    engine.step()  # b admitted and prefilled; a decodes
    assert order == ["TokenOutput b", "decode a", "TokenOutput a"]
