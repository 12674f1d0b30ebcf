"""Shared fixtures: tiny random checkpoints written once per session, in both layouts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    from janus_core.tiny.janus import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-hf"), "hf", seed=0)


@pytest.fixture(scope="session")
def tiny_ds_dir(tmp_path_factory) -> Path:
    from janus_core.tiny.janus import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-ds"), "deepseek", seed=0)


@pytest.fixture(scope="session")
def tiny_sharp_dir(tmp_path_factory) -> Path:
    """The sharpened tiny checkpoint: greedy outputs depend on every input and some answers end at EOS."""
    from janus_core.tiny.janus import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-sharp"), "hf", seed=0, sharp=True)


@pytest.fixture(scope="session")
def tiny_hf(tiny_hf_dir):
    from janus_core.models.loader import load_model

    return load_model(str(tiny_hf_dir), device="cpu")


@pytest.fixture(scope="session")
def tiny_ds(tiny_ds_dir):
    from janus_core.models.loader import load_model

    return load_model(str(tiny_ds_dir), device="cpu")


@pytest.fixture(scope="session")
def reference(tiny_hf_dir):
    """transformers' own model and processor for the tiny checkpoint: the oracle."""
    from transformers import JanusForConditionalGeneration, JanusProcessor

    model = JanusForConditionalGeneration.from_pretrained(tiny_hf_dir).eval()
    return model, JanusProcessor.from_pretrained(tiny_hf_dir)


@pytest.fixture(scope="session")
def tiny_flow_dir(tmp_path_factory) -> Path:
    """A tiny random JanusFlow checkpoint (DeepSeek layout, sharpened LM) with its tiny VAE in vae/."""
    from janus_core.tiny.flow import write_tiny_flow_model

    return write_tiny_flow_model(tmp_path_factory.mktemp("tiny-janusflow"), seed=0, sharp=True)
