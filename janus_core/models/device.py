"""Device and dtype selection: `auto` means bf16 on CUDA and fp32 on CPU."""

from __future__ import annotations

from collections.abc import Callable

import torch

from janus_core.errors import ModelLoadError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {name!r} was requested but CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from exc


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}; use one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def gpu_memory_allocated(device: torch.device) -> int | None:
    """Bytes the process holds on `device` through PyTorch's allocator; None off CUDA."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.memory_allocated(device))


def device_memory(device: torch.device) -> tuple[int, int, int]:
    """A CUDA device's total bytes, what this process's tensors hold (the weights, at start-up), and what
    others hold (other processes, the CUDA context)."""
    free, total = torch.cuda.mem_get_info(device)
    others = max(total - free - torch.cuda.memory_reserved(device), 0)
    return total, torch.cuda.memory_allocated(device), others


def measure_peak(device: torch.device, run: Callable[[], object]) -> int:
    """Bytes above what is allocated now that `run()` takes at its peak (CUDA); its tensors are freed after."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    run()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    torch.cuda.empty_cache()
    return int(peak)

