"""CPU fast path for the model's linear layers: fp32 weights pre-packed once for oneDNN.

A decode step multiplies a handful of rows by every weight of the LM. On x86 CPUs, `F.linear`
(MKL) handles those skinny products poorly: on the benchmark machine (2 AMD EPYC cores) the mid
model's linears took 29-31 ms for 8 rows against 14-16 ms through oneDNN with the weights reordered
once into its blocked layout, and 14.6 against 12-13 ms for one row; a prefill's large products cost
the same either way (`bench/bench_linear.py` measures all of it). `pack_linears` swaps every fp32
`nn.Linear` of a CPU model for a `PackedLinear` holding only the packed weight, in place.

The results are the same products summed in a different order: equal to `F.linear` to within
float32 rounding, and the oracle tests check that tokens still equal transformers'.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

BATCH_HINT = 16  # rows oneDNN tunes the packed layout for; any number of rows still works


def packing_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """True when the oneDNN ops are present and the model is fp32 on the CPU."""
    if device.type != "cpu" or dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    return hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")


class PackedLinear(nn.Module):
    """`nn.Linear` with its weight in oneDNN's packed layout: (..., in) -> (..., out)."""

    def __init__(self, linear: nn.Linear, batch_hint: int = BATCH_HINT) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint), persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(model: nn.Module, batch_hint: int = BATCH_HINT) -> int:
    """Replace every fp32 CPU `nn.Linear` inside `model` by a `PackedLinear`; returns how many. Quantized
    linears (`janus_core.models.quantize`) stay as they are.

    Call it once, on a model used only for inference. It checks one product against `F.linear`
    first and leaves the model alone (returning 0) if oneDNN disagrees or fails.
    """
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear and type(child.weight) is nn.Parameter  # quantized weights are subclasses
        and child.weight.device.type == "cpu" and child.weight.dtype == torch.float32
    ]
    if not targets or not _self_check():
        return 0
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child, batch_hint))
    return len(targets)


def _self_check() -> bool:
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(3, 5, 64, generator=gen)
    try:
        with torch.inference_mode():
            got, want = PackedLinear(linear)(x), linear(x)
    except (RuntimeError, NotImplementedError) as exc:  # an op missing from this build
        log.warning("oneDNN linear packing unavailable (%s); using F.linear", exc)
        return False
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
        log.warning("oneDNN packed linear disagrees with F.linear; using F.linear")
        return False
    return True
