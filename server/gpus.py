"""Which GPUs `serve` gives workers, and how many each: pure functions, torch-free at import.

The visible devices are `CUDA_VISIBLE_DEVICES` as a scheduler set it (indices, `GPU-<uuid>` or `MIG-<uuid>`
entries; empty: no GPU; as CUDA does, the list ends at the first empty or negative entry), else the
devices torch counts. `--gpus 0,2,3` picks from that list by position; N workers are dealt round-robin
over the picks. A worker process is pinned by starting it with `CUDA_VISIBLE_DEVICES=<its entry>`, so
inside it its GPU is `cuda:0`; `device_label` names it the same way from inside.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass

ENV = "CUDA_VISIBLE_DEVICES"


@dataclass(frozen=True)
class Assignment:
    """One worker of `serve`: its slot, the GPU it is pinned to (None: unpinned), and how it is named."""

    index: int  # the worker's slot: its metrics port is the base + index
    label: str  # /ready and the logs: the visible entry as given ("0", "GPU-..."), or the device ("cpu")
    device: str  # --device of a worker process: "cuda" when pinned (its only GPU), else serve's own
    visible: str | None = None  # CUDA_VISIBLE_DEVICES of the worker process; None: inherited (CPU)
    ordinal: int | None = None  # the GPU's position in serve's visible list

    @property
    def local_device(self) -> str:
        """The device of a worker in serve's own process, where every visible GPU is seen."""
        return f"cuda:{self.ordinal}" if self.ordinal is not None else self.device


def torch_device_count() -> int:
    import torch

    return int(torch.cuda.device_count())


def parse_visible(value: str) -> list[str]:
    """The entries CUDA will use. Where CUDA would silently drop the rest of the list (a malformed entry) or
    every device (a repeated one), this raises ValueError instead, so serve does not plan workers for GPUs
    its workers will not see."""
    entries: list[str] = []
    for entry in (e.strip() for e in value.split(",")):
        if not entry or (entry.startswith("-") and entry[1:].isdigit()):
            break
        if not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
            raise ValueError(f"{ENV}={value!r}: {entry!r} is neither a device index nor a GPU-/MIG- UUID")
        if entry in entries or (entry.isdigit() and str(int(entry)) in [e for e in entries if e.isdigit()]):
            raise ValueError(f"{ENV}={value!r} names {entry!r} twice (CUDA would then show no device)")
        entries.append(entry)
    return entries


def visible_devices(environ: Mapping[str, str] | None = None,
                    count: Callable[[], int] = torch_device_count) -> list[str]:
    env = os.environ if environ is None else environ
    if ENV in env:
        return parse_visible(env[ENV])
    return [str(i) for i in range(count())]


def describe(visible: list[str], environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    if not visible:
        return "no GPU is visible" + (f" ({ENV}={env[ENV]!r})" if ENV in env else "")
    if ENV in env:
        listed = ", ".join(f"{i}: {entry}" for i, entry in enumerate(visible))
    else:
        listed = f"0-{len(visible) - 1}" if len(visible) > 1 else "0"
    return f"{len(visible)} visible ({listed})"


def pick(visible: list[str], gpus: list[str], environ: Mapping[str, str] | None = None) -> list[int]:
    """Positions in `visible` that get workers: every one, or those `--gpus` names (in its order)."""
    if not gpus:
        return list(range(len(visible)))
    chosen: list[int] = []
    for entry in gpus:
        try:
            position = int(entry)
        except ValueError:
            raise ValueError(f"--gpus: {entry!r} is not a position in the visible GPUs; "
                             f"{describe(visible, environ)}") from None
        if not 0 <= position < len(visible):
            raise ValueError(f"--gpus: {entry} is out of range; {describe(visible, environ)}")
        if position in chosen:
            raise ValueError(f"--gpus: {entry} is listed twice")
        chosen.append(position)
    return chosen


def plan_workers(device: str, workers: int | None, gpus: list[str], environ: Mapping[str, str] | None = None,
                 count: Callable[[], int] = torch_device_count) -> list[Assignment]:
    """The workers `serve` runs: on CUDA one per picked GPU (or `workers`, round-robin over them), each
    pinned; elsewhere `workers` (default 1) unpinned ones. Raises ValueError with the reason."""
    kind, _, index = device.partition(":")
    if kind == "auto":
        kind = "cuda" if count() > 0 else "cpu"
    if kind != "cuda":
        if gpus:
            raise ValueError(f"--gpus picks CUDA devices, but the device is {kind}")
        return [Assignment(i, kind, kind) for i in range(workers or 1)]
    visible = visible_devices(environ, count)
    if not visible:
        raise ValueError(f"--device {device}: {describe(visible, environ)}")
    if index:
        if gpus:
            raise ValueError(f"--device {device} names one GPU; pick GPUs with --gpus and --device cuda instead")
        gpus = [index]
    chosen = pick(visible, gpus, environ)
    slots = [chosen[i % len(chosen)] for i in range(workers or len(chosen))]  # round-robin
    return [Assignment(i, visible[p], "cuda", visible[p], p) for i, p in enumerate(slots)]


def expected_by_gpu(assignments: list[Assignment]) -> dict[str, int]:
    return dict(Counter(a.label for a in assignments))


def device_label(device_type: str, index: int | None, environ: Mapping[str, str] | None = None) -> str:
    """How a worker names its own device, as `plan_workers` labels it: the visible entry of a GPU."""
    if device_type != "cuda":
        return device_type
    env = os.environ if environ is None else environ
    position = index or 0
    visible = parse_visible(env[ENV]) if ENV in env else []
    return visible[position] if position < len(visible) else str(position)
