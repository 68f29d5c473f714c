"""Text to image with a FluxModel: what validation samples and the inference script run.

    images = generate(model, t5, clip, autoencoder, prompts, settings)

Image i starts from noise drawn on the CPU with seed settings.seed + i, so a seed gives the
same image on any device, world size and batch size. Images are (B, 3, H, W) in [-1, 1].
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable, Sequence
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
    width: int = 64  # pixels, a multiple of 16
    height: int = 64  # pixels, a multiple of 16
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

    t5, clip: captions -> (B, L, D_t5), (B, D_clip): TextEncoders, or encodings looked up.
    Returns (B, 3, height, width); flux-dev's schedule is shifted by its (height/16)·(width/16)
    image tokens."""
    check_image_size(settings.width, "width")
    check_image_size(settings.height, "height")
    b = len(prompts)
    h, w = settings.height // 8, settings.width // 8  # latent rows and columns
    channels = autoencoder.params.z_channels
    noise = torch.stack(
        [
            torch.randn(channels, h, w, generator=torch.Generator().manual_seed(seed))
            for seed in range(settings.seed, settings.seed + b)
        ]
    )
    img = pack_latents(noise).to(device)
    img_pos = image_ids(b, h, w, device)

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
    latents = unpack_latents(img.float(), h, w)
    dtype = next(autoencoder.parameters()).dtype
    return autoencoder.decode(latents.to(dtype)).float().clamp(-1, 1)


def to_pil(image: Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> an RGB image."""
    array = ((image.detach().cpu().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).numpy(), "RGB")


GRID_TILE = (
    256  # tiles are scaled up until their longer side reaches this: debug images stay visible
)
CAPTION_HEIGHT = 40
LETTERBOX = (128, 128, 128)  # a cell's area its image does not cover: its shape stays visible
GAP = 4  # white pixels between columns


def image_grid(rows: Sequence[Tensor], prompts: list[str]) -> tuple[Image.Image, PngInfo]:
    """The images of a validation: one row per size, one column per prompt, each image under
    its own caption; and PNG metadata holding the prompts and each tile's box (grid_tiles).

    rows[i]: (B, 3, H_i, W_i), image b for prompts[b]. Every image is scaled up by one
    integer factor and centred in a cell of the largest width and height (letterboxed),
    so sizes of other aspect ratios keep their shapes side by side."""
    longest = max(max(images.shape[-2:]) for images in rows)
    scale = max(1, -(-GRID_TILE // longest))
    cell_w = max(images.shape[-1] for images in rows) * scale
    cell_h = max(images.shape[-2] for images in rows) * scale
    row_h = cell_h + CAPTION_HEIGHT
    pitch = cell_w + GAP
    grid = Image.new("RGB", (pitch * len(prompts) - GAP, row_h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    tiles = []
    for i, images in enumerate(rows):
        height, width = images.shape[-2:]
        for j, (image, prompt) in enumerate(zip(images, prompts)):
            x, y = j * pitch, i * row_h
            draw.rectangle((x, y, x + cell_w - 1, y + cell_h - 1), fill=LETTERBOX)
            left, top = x + (cell_w - width * scale) // 2, y + (cell_h - height * scale) // 2
            pixels = to_pil(image).resize((width * scale, height * scale), Image.Resampling.NEAREST)
            grid.paste(pixels, (left, top))
            lines = textwrap.wrap(prompt, width=max(8, cell_w // 6))
            lines = [f"{width}x{height}", *lines[:2]] if len(rows) > 1 else lines[:3]
            draw.multiline_text((x + 4, y + cell_h + 2), "\n".join(lines), fill="black", spacing=1)
            tiles.append({"prompt": j, "box": [left, top], "size": [width, height], "scale": scale})
    info = PngInfo()
    info.add_text("prompts", "\n".join(prompts))
    info.add_text("tiles", json.dumps(tiles))
    return grid, info


def grid_tiles(path: str) -> list[tuple[str, Image.Image]]:
    """(prompt, image at its sampled size) for each tile of a grid written by image_grid,
    row by row (size by size), each row in the prompts' order."""
    grid = Image.open(path)
    grid.load()
    prompts = grid.text["prompts"].split("\n")  # type: ignore[attr-defined]
    tiles = []
    for tile in json.loads(grid.text["tiles"]):  # type: ignore[attr-defined]
        (left, top), (width, height), scale = tile["box"], tile["size"], tile["scale"]
        crop = grid.crop((left, top, left + width * scale, top + height * scale)).convert("RGB")
        image = crop.resize((width, height), Image.Resampling.NEAREST)
        tiles.append((prompts[tile["prompt"]], image))
    return tiles
