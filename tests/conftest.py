"""Shared fixtures: tiny random checkpoints written once per session, in both layouts; and each test's marker.

Tests live in one folder per need, and each test is marked with its folder's name (`pytest -m unit` is the fast
lane): unit (pure Python: no checkpoint, no server or subprocess), model (tiny checkpoints against the
transformers oracle, or through the engine in-process), integration (real servers on loopback), e2e (a real
browser, distributed multi-process stacks, killed processes), deploy (the deployment files). Helpers the tests
share are in tests/support; no test module imports another.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["tests.support.server_fixtures"]

TESTS = Path(__file__).resolve().parent
LANES = ("unit", "model", "integration", "e2e", "deploy")  # folders of tests/, and the markers of their tests


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks each test with the name of its top folder under tests/; a test outside those folders is an error."""
    for item in items:
        try:
            folder = item.path.resolve().relative_to(TESTS).parts[0]
        except ValueError:  # not under tests/ (a path given on the command line): no lane
            continue
        if folder not in LANES:
            raise pytest.UsageError(f"{item.nodeid}: tests belong in one of tests/{{{','.join(LANES)}}}/")
        item.add_marker(getattr(pytest.mark, folder))


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
