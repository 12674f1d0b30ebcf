"""JanusFlow's ShallowUViT: the small conv nets between SDXL-VAE latents and the LM's hidden size.

The encoder turns a latent z (B, C, 2g, 2g) and a timestep into the LM's inputs: a time embedding
t_emb (B, hidden) (diffusers' `Timesteps` + `TimestepEmbedding`, so the weight names are theirs) and a
grid of patch features (B, width, g, g) that the aligner maps to g*g tokens. The decoder turns the LM's
last g*g hidden states (aligned back to `width` channels) into a velocity of z's shape, with a skip
from the encoder's features. Both are built from ConvNeXt blocks whose output is scaled and shifted by
the time embedding. The names of parameters follow DeepSeek's checkpoint (`in_conv`, `mid_block.res_blocks.K.*`,
`out_convs.0.*`, `input_norm`), so its weights load unchanged.

This module knows tensors and conv shapes; not tokens, the LM or the ODE.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from janus_core.errors import ModelLoadError


def require_diffusers() -> None:
    """diffusers is imported only for JanusFlow (it takes seconds); without it, say how to get it."""
    try:
        import diffusers  # noqa: F401
    except ImportError as exc:
        raise ModelLoadError("JanusFlow needs diffusers (its time embedding and the SDXL VAE): "
                             "pip install 'diffusers>=0.30' (a dependency of janus-server)") from exc


def _channels_last_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An RMSNorm over the channels of (B, C, H, W)."""
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2's GRN on channels-last input (B, H, W, C)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.bias = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = torch.norm(x, p=2, dim=(1, 2), keepdim=True)  # (B, 1, 1, C)
        relative = spatial / (spatial.mean(dim=-1, keepdim=True) + 1e-6)
        return torch.addcmul(self.bias, self.weight * relative + 1, x)


class ConvNextBlock(nn.Module):
    """Depthwise 7x7 -> RMSNorm -> MLP (GELU, GRN) -> residual; then x * (1 + scale) + shift from t_emb."""

    def __init__(self, channels: int, cond_dim: int, eps: float, bias: bool, ffn_factor: int = 4) -> None:
        super().__init__()
        inner = channels * ffn_factor
        self.depthwise = nn.Conv2d(channels, channels, kernel_size=7, padding=3, groups=channels, bias=bias)
        self.norm = LlamaRMSNorm(channels, eps)
        self.channelwise_linear_1 = nn.Linear(channels, inner, bias=bias)
        self.channelwise_act = nn.GELU()
        self.channelwise_norm = GlobalResponseNorm(inner)
        self.channelwise_linear_2 = nn.Linear(inner, channels, bias=bias)
        self.cond_embeds_mapper = nn.Linear(cond_dim, 2 * channels, bias=bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # x (B, C, H, W); cond (B, cond_dim)
        h = self.depthwise(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        h = self.channelwise_linear_1(self.norm(h))
        h = self.channelwise_linear_2(self.channelwise_norm(self.channelwise_act(h)))
        x = x + h.permute(0, 3, 1, 2)
        scale, shift = self.cond_embeds_mapper(F.silu(cond)).chunk(2, dim=1)  # (B, C) each
        return torch.addcmul(shift[:, :, None, None], x, 1 + scale[:, :, None, None])


class MidBlock(nn.Module):
    def __init__(self, channels: int, layers: int, cond_dim: int, eps: float, bias: bool) -> None:
        super().__init__()
        self.res_blocks = nn.ModuleList(ConvNextBlock(channels, cond_dim, eps, bias) for _ in range(layers))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        for block in self.res_blocks:
            x = block(x, cond)
        return x


class Unpatchify(nn.Module):
    """RMSNorm -> 1x1 conv -> PixelShuffle: (B, C_in, g, g) -> (B, C_out, p*g, p*g)."""

    def __init__(self, in_channels: int, out_channels: int, patch: int, eps: float, bias: bool) -> None:
        super().__init__()
        self.norm = LlamaRMSNorm(in_channels, eps)
        self.unpatch_conv = nn.Conv2d(in_channels, out_channels * patch * patch, kernel_size=1, bias=bias)
        self.pixel_shuffle = nn.PixelShuffle(patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pixel_shuffle(self.unpatch_conv(_channels_last_norm(self.norm, x)))


class ShallowUViTEncoder(nn.Module):
    def __init__(self, input_channels: int = 4, stride: int = 2, kernel_size: int = 2, padding: int | None = None,
                 block_out_channels: Sequence[int] = (768,), layers_in_middle: int = 2, hidden_size: int = 2048,
                 use_bias: bool = True, norm_eps: float = 1e-6, use_mid_block: bool = True, **_: object) -> None:
        super().__init__()
        require_diffusers()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        width = int(block_out_channels[-1])
        self.width, self.hidden_size = width, hidden_size
        self.time_proj = Timesteps(int(block_out_channels[0]), flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(int(block_out_channels[0]), hidden_size, sample_proj_bias=use_bias)
        self.padding = math.ceil(kernel_size - stride) if padding is None else padding
        self.in_conv = nn.Conv2d(input_channels, int(block_out_channels[0]), kernel_size=kernel_size, stride=stride,
                                 padding=self.padding)
        self.mid_block = (MidBlock(width, layers_in_middle, hidden_size, norm_eps, use_bias)
                          if use_mid_block else None)

    def grid(self, latent_size: int) -> int:
        """The side of the patch grid a (latent_size x latent_size) latent becomes."""
        conv = self.in_conv
        return (latent_size + 2 * self.padding - conv.kernel_size[0]) // conv.stride[0] + 1

    def forward(self, z: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (B, C, H, W), timesteps (B,) -> features (B, width, g, g), t_emb (B, hidden), skip (B, width, g, g)."""
        t_emb = self.time_embed(self.time_proj(timesteps.flatten()).to(z.dtype))  # (B, hidden)
        x = self.in_conv(z)
        if self.mid_block is not None:
            x = self.mid_block(x, t_emb)
        return x, t_emb, x


class ShallowUViTDecoder(nn.Module):
    def __init__(self, in_channels: int = 768, out_channels: int = 4, block_out_channels: Sequence[int] = (768,),
                 upsamples: int = 1, layers_in_middle: int = 2, hidden_size: int = 2048, norm_eps: float = 1e-6,
                 use_bias: bool = True, use_mid_block: bool = True, **_: object) -> None:
        super().__init__()
        width = int(block_out_channels[-1])
        self.in_channels = in_channels
        self.input_norm = LlamaRMSNorm(in_channels, norm_eps)
        self.mid_block = (MidBlock(in_channels + width, layers_in_middle, hidden_size, norm_eps, use_bias)
                          if use_mid_block else None)
        convs = []
        for rank in range(upsamples):
            c_in = in_channels + width if rank == 0 else width
            c_out = out_channels if rank == upsamples - 1 else width
            convs.append(Unpatchify(c_in, c_out, 2, norm_eps, use_bias))
        self.out_convs = nn.ModuleList(convs)
        self.scale = 2 ** upsamples

    def forward(self, x: torch.Tensor, skip: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        """x (B, in_channels, g, g) from the LM, skip (B, width, g, g), t_emb (B, hidden) -> (B, C, 2g, 2g)."""
        x = torch.cat([_channels_last_norm(self.input_norm, x), skip], dim=1)
        if self.mid_block is not None:
            x = self.mid_block(x, t_emb)
        for conv in self.out_convs:
            x = conv(x)
        return x
