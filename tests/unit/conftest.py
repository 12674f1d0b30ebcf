"""The unit lane runs each test on one torch thread. On a loaded 2-core machine a second OpenMP thread makes
every tiny op wait for a CPU: the sampler's 6000-step tests took 15-20 s each instead of ~1.5 s."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
