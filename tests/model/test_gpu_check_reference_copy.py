"""The GPU check's reference copy of a random tiny model stays stock while an engine packs the model it serves."""

from __future__ import annotations

import pytest
import torch

from bench.gpu.model import build_random_model, stock_copy
from bench.references import hf_understand
from janus_core import Engine, EngineConfig
from janus_core.step.packed_linear import packing_supported


def test_the_reference_copy_stays_stock_when_the_engine_packs_its_model():
    if not packing_supported(torch.device("cpu"), torch.float32):
        pytest.skip("no oneDNN packing in this torch build")
    lm = build_random_model("tiny", torch.device("cpu"), torch.float32)
    ref = stock_copy(lm)
    Engine(lm, EngineConfig(max_batch_size=1))  # packs lm's linears in place
    assert hf_understand(ref, [], "hi", max_new_tokens=2).tokens > 0
    with pytest.raises(RuntimeError, match="packed linear layers"):
        hf_understand(lm, [], "hi", max_new_tokens=2)
