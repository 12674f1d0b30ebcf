"""Quantized weights: the LM's linear layers and both heads in int8 or fp8, quantized while the model is placed.

- `int8`: weight-only, one scale per output channel (torchao's `Int8WeightOnlyConfig`); CPU and CUDA. The
  product runs in the model's dtype from the int8 weight (eager: the whole weight converted every call); on
  CUDA the compiled step is expected to fuse that into the matmul and read one byte per weight (unmeasured).
- `fp8`: e4m3 weights with a scale per output channel, activations scaled per row at run time (torchao's
  `Float8DynamicActivationFloat8WeightConfig`, fp8 tensor cores): CUDA devices of compute capability 8.9 or
  newer (Ada, Hopper and later), in bfloat16.

What is quantized: every `nn.Linear` of the language model's decoder layers, the text head (`lm_head`) and
the image head (`generation_head`). The vision towers and aligners, the VQ decoder, JanusFlow's UViT and
VAE, norms and embeddings keep the model's dtype. A head that shares its weight with the embedding table
(tied) stays as it is: the embedding needs the full-precision rows.

`place` moves a model to its device one module at a time and quantizes each target linear as soon as it is
there, so at most one linear layer's full-precision weight (and the temporaries of quantizing it) sits on the
device beside what is already quantized: the load peak is the quantized model plus one layer, not the
full-precision model.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from janus_core.errors import ModelLoadError

log = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "int8", "fp8")
FP8_CAPABILITY = (8, 9)


def check_quantization(name: str, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a quantization this device or dtype cannot run, naming what would."""
    if name not in QUANTIZATIONS:
        raise ModelLoadError(f"unknown quantization {name!r}; use one of {', '.join(QUANTIZATIONS)}")
    if name != "fp8":
        return
    if device.type != "cuda":
        raise ModelLoadError(f"fp8 weights need a CUDA GPU of compute capability {FP8_CAPABILITY[0]}."
                             f"{FP8_CAPABILITY[1]} or newer; the device is {device.type}: use --quantization int8")
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_CAPABILITY:
        raise ModelLoadError(f"fp8 weights need compute capability {FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]} or newer "
                             f"(Ada, Hopper); {torch.cuda.get_device_name(device)} has {capability[0]}."
                             f"{capability[1]}: use --quantization int8")
    if dtype != torch.bfloat16:
        raise ModelLoadError(f"fp8 weights run with bfloat16 activations; the model is {dtype}: pass --dtype bfloat16")


def _config(name: str):
    import torchao.quantization as tq

    # torch.compile's autograd cache says once per compile that torchao's weights offer no stable hash: it then
    # skips that cache, nothing more (the step compiles once per bucket at start-up either way).
    warnings.filterwarnings("ignore", message=".*does not implement _stable_hash_for_caching", category=UserWarning)

    if name == "int8":
        return tq.Int8WeightOnlyConfig(granularity=tq.PerRow())
    return tq.Float8DynamicActivationFloat8WeightConfig(granularity=tq.PerRow())


def target_linears(model: nn.Module) -> list[nn.Linear]:
    """The linears `--quantization` covers: the LM's decoder layers and both heads (a tied head excepted)."""
    found: list[nn.Linear] = []
    lm = model.model.language_model
    embedding = lm.embed_tokens.weight
    for layer in lm.layers:
        found += [m for m in layer.modules() if isinstance(m, nn.Linear)]
    heads = [model.lm_head]
    head = getattr(model.model, "generation_head", None)  # JanusFlow has none
    if head is not None:
        heads += [m for m in head.modules() if isinstance(m, nn.Linear)]
    found += [m for m in heads if m.weight is not embedding]
    return found


@dataclass(frozen=True)
class Placement:
    quantized_layers: int
    weights_bytes: int  # what the model's parameters and buffers hold now, quantized ones at their stored size
    load_peak_bytes: int | None  # CUDA: the allocator's peak while placing; None elsewhere
    lingering: int = 0  # full-precision weights still referenced right after their quantization (should be 0)


def place(model: nn.Module, device: torch.device, quantization: str = "none") -> Placement:
    """Move `model` to `device` module by module, quantizing each target linear once it is there."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # tensors report their index
    targets = {id(m) for m in target_linears(model)} if quantization != "none" else set()
    config = _config(quantization) if targets else None
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    slots = Counter(id(t) for m in model.modules() for t in (*m._parameters.values(), *m._buffers.values()))
    tied: dict[int, torch.Tensor] = {}  # a tensor held in two places moves once and stays shared
    lingering = 0
    for module in model.modules():
        _move_own(module, device, tied, slots)
        if id(module) in targets:
            weight = weakref.ref(module.weight)
            _quantize(module, config)  # the full-precision weight's last reference goes here
            lingering += weight() is not None
    if lingering:
        log.warning("%d full-precision weights outlived their quantization while loading", lingering)
    peak = int(torch.cuda.max_memory_allocated(device) - base) if cuda else None
    placement = Placement(len(targets), stored_bytes(model), peak, lingering)
    if targets:
        log.info("quantized %d linear layers to %s while loading; weights %.2f GiB%s", len(targets), quantization,
                 placement.weights_bytes / 2**30,
                 "" if peak is None else f", load peak {peak / 2**30:.2f} GiB on {device}")
    return placement


def _move_own(module: nn.Module, device: torch.device, tied: dict[int, torch.Tensor], slots: Counter) -> None:
    for store in (module._parameters, module._buffers):
        for key, tensor in store.items():
            if tensor is None or tensor.device == device:
                continue
            moved = tied.get(id(tensor))
            if moved is None:
                data = tensor.detach().to(device)
                moved = nn.Parameter(data, requires_grad=False) if isinstance(tensor, nn.Parameter) else data
                if slots[id(tensor)] > 1:
                    tied[id(tensor)] = moved
            store[key] = moved


def _quantize(linear: nn.Module, config) -> None:
    from torchao.quantization import quantize_

    quantize_(linear, config, filter_fn=lambda m, _name: m is linear)


def stored_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters and buffers hold, each storage once (a quantized weight: its data and scales)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        for part in _parts(tensor):
            try:
                key, size = part.untyped_storage().data_ptr(), part.untyped_storage().nbytes()
            except NotImplementedError:  # an opaque layout (oneDNN-packed weights): its elements
                key, size = id(part), part.numel() * part.element_size()
            if key not in seen:
                seen.add(key)
                total += size
    return total


def _parts(tensor: torch.Tensor) -> list[torch.Tensor]:
    """A plain tensor itself; a tensor subclass (torchao's quantized weights) its inner tensors."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if type(tensor) in (torch.Tensor, nn.Parameter) or flatten is None:
        return [tensor]
    names, _ = flatten()
    inner = [getattr(tensor, name) for name in names]
    return [p for t in inner if t is not None for p in _parts(t)]


def quantized_bytes(linear: nn.Linear, dtype_bytes: int) -> int:
    """What a target linear holds once quantized: one byte per weight, per output channel a float32 scale and a
    one-byte zero point (torchao keeps one even when symmetric), the bias in the model's dtype."""
    out_features, in_features = linear.weight.shape
    bias = 0 if linear.bias is None else linear.bias.numel() * dtype_bytes
    return out_features * in_features + 5 * out_features + bias


def is_quantized(weight: torch.Tensor) -> bool:
    return type(weight) not in (torch.Tensor, nn.Parameter)
