"""The streaming detokenizer: deltas add up to the decoded text, whatever the token boundaries."""

from __future__ import annotations

import random

import pytest

from janus_core.text.detok import IncrementalDecoder
from janus_core.tiny.janus import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


TEXTS = ["a photo of a cat", "naïve café — 猫の写真 🐈‍⬛ ok", "🙂🙂🙂", "  spaces  and\nlines "]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_join_to_the_text(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.push(i) for i in ids]
    assert "".join(deltas) == text == decoder.text
    assert not any("\ufffd" in d for d in deltas)  # no half characters are ever streamed


def test_random_tokens_stream_a_prefix_of_the_text(tokenizer) -> None:
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 40))]
        decoder = IncrementalDecoder(tokenizer)
        streamed = "".join(decoder.push(i) for i in ids)
        assert decoder.text == tokenizer.decode(ids, skip_special_tokens=True)
        assert decoder.text.startswith(streamed)


def test_the_backend_shortcut_decodes_as_transformers_does(tokenizer) -> None:
    decoder = IncrementalDecoder(tokenizer)
    assert decoder._backend is not None  # the tiny tokenizer takes the shortcut, like Janus' own
    rng = random.Random(1)
    for _ in range(200):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 12))]
        assert decoder._decode(ids) == tokenizer.decode(ids, skip_special_tokens=True)
