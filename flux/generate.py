"""Text to image with a FluxModel: what validation samples and the inference script run.

    images = generate(model, t5, clip, autoencoder, prompts, settings)

Image i starts from noise drawn on the CPU with seed settings.seed + i, so a seed gives the
same image on any device, world size and batch size. Images are (B, 3, H, W) in [-1, 1].
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo
from torch import Tensor, nn

from flux.model.autoencoder import AutoEncoder
from flux.sampling import (
    check_image_size,
    denoise,
    get_schedule,
    image_ids,
    pack_latents,
    text_ids,
    unpack_latents,
)


@dataclass
class SampleSettings:
    img_size: int = 64  # height and width, a multiple of 16
    steps: int = 20  # Euler steps
    cfg_scale: float = 4.0  # classifier-free guidance against the empty prompt; 1 disables it
    guidance: float = 1.0  # the guidance embedding's input (flavors that have it)
    shift: bool = True  # flux-dev's resolution-shifted schedule; False for flux-schnell's
    seed: int = 0


@torch.no_grad()
def generate(
    model: nn.Module,
    t5: Callable[[list[str]], Tensor],
    clip: Callable[[list[str]], Tensor],
    autoencoder: AutoEncoder,
    prompts: list[str],
    settings: SampleSettings,
    device: torch.device | str = "cpu",
    guidance_embed: bool = False,
) -> Tensor:
    """Sample one image per prompt: Euler steps over the schedule, then the decoder.

    t5, clip: captions -> (B, L, D_t5), (B, D_clip): TextEncoders, or encodings looked up."""
    check_image_size(settings.img_size, "image size")
    b = len(prompts)
    side = settings.img_size // 8
    channels = autoencoder.params.z_channels
    noise = torch.stack(
        [
            torch.randn(channels, side, side, generator=torch.Generator().manual_seed(seed))
            for seed in range(settings.seed, settings.seed + b)
        ]
    )
    img = pack_latents(noise).to(device)
    img_pos = image_ids(b, side, side, device)

    def velocity_for(captions: list[str]):
        txt = t5(captions).float()
        y = clip(captions).float()
        txt_pos = text_ids(b, txt.shape[1], device)
        extra = {}
        if guidance_embed:
            extra["guidance"] = torch.full((b,), settings.guidance, device=device)

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            return model(
                img=x, img_ids=img_pos, txt=txt, txt_ids=txt_pos, timesteps=t, y=y, **extra
            )

        return velocity

    uncond = velocity_for([""] * b) if settings.cfg_scale != 1.0 else None
    timesteps = get_schedule(settings.steps, img.shape[1], settings.shift)
    img = denoise(velocity_for(prompts), img, timesteps, settings.cfg_scale, uncond)
    latents = unpack_latents(img.float(), side, side)
    dtype = next(autoencoder.parameters()).dtype
    return autoencoder.decode(latents.to(dtype)).float().clamp(-1, 1)


def to_pil(image: Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> an RGB image."""
    array = ((image.detach().cpu().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).numpy(), "RGB")


GRID_TILE = 256  # tiles are scaled up to at least this, so small debug images stay visible
CAPTION_HEIGHT = 40


def image_grid(images: Tensor, prompts: list[str]) -> tuple[Image.Image, PngInfo]:
    """One row of images, each with its prompt under it, and PNG metadata holding the
    prompts and the tile geometry (see grid_tiles)."""
    side = images.shape[-1]
    scale = max(1, -(-GRID_TILE // side))
    tile = side * scale
    grid = Image.new("RGB", (tile * len(prompts), tile + CAPTION_HEIGHT), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        grid.paste(to_pil(image).resize((tile, tile), Image.Resampling.NEAREST), (i * tile, 0))
        lines = textwrap.wrap(prompt, width=max(8, tile // 6))[:3]
        draw.multiline_text((i * tile + 4, tile + 2), "\n".join(lines), fill="black", spacing=1)
    info = PngInfo()
    info.add_text("prompts", "\n".join(prompts))
    info.add_text("tile", f"{tile} {scale}")
    return grid, info


def grid_tiles(path: str) -> list[tuple[str, Image.Image]]:
    """(prompt, image at its sampled size) for each tile of a grid written by image_grid."""
    grid = Image.open(path)
    grid.load()
    prompts = grid.text["prompts"].split("\n")  # type: ignore[attr-defined]
    tile, scale = (int(v) for v in grid.text["tile"].split())  # type: ignore[attr-defined]
    tiles = []
    for i, prompt in enumerate(prompts):
        crop = grid.crop((i * tile, 0, (i + 1) * tile, tile)).convert("RGB")
        tiles.append(
            (prompt, crop.resize((tile // scale, tile // scale), Image.Resampling.NEAREST))
        )
    return tiles
