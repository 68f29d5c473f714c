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


def compiled_debug_model() -> tuple[nn.Module, list[torch.fx.GraphModule]]:
    """The debug FluxModel with each block compiled by a backend that records the graphs
    it is given (and runs them as traced): the list grows with every (re)compile."""
    from flux.model.model import FluxModel
    from flux.parallel.parallelize import apply_compile

    torch._dynamo.reset()  # forget shapes earlier tests compiled these blocks' code for
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    model = FluxModel(flux_configs["flux-debug"])
    apply_compile(model, backend=backend)  # type: ignore[arg-type]
    return model, graphs
