"""The oracle for JanusFlow generation: DeepSeek's algorithm (demo/app_janusflow.py), one request at a time.

Written straight from the official loop: 2n rows (n conditional, then n unconditional whose tokens after
BOS are pads hidden by the attention mask), the prompt's last token (begin-of-image) dropped and the time
embedding put in its place, and every Euler step a full forward pass of the LM over [prompt, t_emb, latent
tokens] with no cache. Two deliberate departures, both about inputs: the starting noise is given (image i
drawn from its own generator, seed + i, as the engine draws it; the demo uses the global RNG), and the
latents stay in fp32 (the demo keeps them in the model's dtype; in fp32 that is the same).
"""

from __future__ import annotations

import numpy as np
import torch


@torch.inference_mode()
def reference_latents(lm, prompt_ids: list[int], z0: torch.Tensor, cfg_weight: float, num_steps: int) -> torch.Tensor:
    """Final latents (n, C, L, L) for one request whose images start from `z0` (n, C, L, L)."""
    net, dtype = lm.model.model, lm.dtype
    n = z0.shape[0]
    tokens = torch.stack([torch.tensor(prompt_ids)] * (2 * n))
    tokens[n:, 1:] = lm.special["pad"]
    inputs_embeds = net.language_model.get_input_embeddings()(tokens)[:, :-1, :]  # drop begin-of-image
    grid = lm.flow.grid
    mask = torch.ones((2 * n, inputs_embeds.shape[1] + grid * grid + 1), dtype=torch.long)
    mask[n:, 1:inputs_embeds.shape[1]] = 0
    z = z0.clone().float()
    dt = 1.0 / num_steps
    for step in range(num_steps):
        z_input = torch.cat([z, z]).to(dtype)
        t = torch.tensor([step / num_steps * 1000.0] * z_input.shape[0]).to(dtype)
        z_emb, t_emb, hs = net.vision_gen_enc_model(z_input, t)
        z_emb = z_emb.view(z_emb.shape[0], z_emb.shape[1], -1).permute(0, 2, 1)
        z_emb = net.vision_gen_enc_aligner(z_emb)
        llm_emb = torch.cat([inputs_embeds, t_emb.unsqueeze(1), z_emb], dim=1)
        hidden = net.language_model(inputs_embeds=llm_emb, attention_mask=mask, use_cache=False).last_hidden_state
        hidden = net.vision_gen_dec_aligner(net.vision_gen_dec_aligner_norm(hidden[:, -grid * grid:, :]))
        hidden = hidden.reshape(z_emb.shape[0], grid, grid, -1).permute(0, 3, 1, 2)
        v = net.vision_gen_dec_model(hidden, hs, t_emb).float()
        v_cond, v_uncond = torch.chunk(v, 2)
        v = cfg_weight * v_cond - (cfg_weight - 1.0) * v_uncond
        z = z + dt * v
    return z


@torch.inference_mode()
def reference_pixels(lm, z: torch.Tensor) -> np.ndarray:
    """The demo's decode: VAE on z / scaling_factor, clip to [-1, 1], map to uint8 (one image at a time)."""
    vae = lm.flow.vae
    out = []
    for one in z:
        decoded = vae.decode((one[None] / vae.config.scaling_factor).to(lm.flow.vae_dtype)).sample
        images = decoded.float().clip_(-1.0, 1.0).permute(0, 2, 3, 1).cpu().numpy()
        out.append(((images + 1) / 2.0 * 255).astype(np.uint8))
    return np.concatenate(out)
