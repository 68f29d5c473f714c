"""Small FLUX configs and inputs shared by the model tests."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from flux.model.args import FluxModelArgs, flux_configs
from flux.sampling import image_ids


def small_args(**overrides: object) -> FluxModelArgs:
    """flux-debug's shape, a bit wider, so every part of the architecture is exercised."""
    base = dataclasses.replace(
        flux_configs["flux-debug"], hidden_size=96, num_heads=4, axes_dim=(4, 10, 10)
    )
    return dataclasses.replace(base, **overrides)


def randomize(module: nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Non-trivial weights everywhere (init_weights zeroes the modulations)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def model_inputs(
    args: FluxModelArgs, batch: int = 2, h: int = 4, w: int = 6, txt_len: int = 7, seed: int = 1
) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    inputs = {
        "img": torch.randn(batch, h * w, args.in_channels, generator=gen),
        "img_ids": image_ids(batch, 2 * h, 2 * w),  # h × w patches of a 2h × 2w latent
        "txt": torch.randn(batch, txt_len, args.context_in_dim, generator=gen),
        "txt_ids": torch.zeros(batch, txt_len, 3),
        "timesteps": torch.rand(batch, generator=gen),
        "y": torch.randn(batch, args.vec_in_dim, generator=gen),
    }
    if args.guidance_embed:
        inputs["guidance"] = torch.full((batch,), 3.5)
    return inputs
