"""`shapes`: a built-in, unbounded dataset of coloured shapes with matching captions.

Sample i of seed s is the same on every machine: its attributes come from a generator
seeded with (s, i). Colour, shape, size, position and background are all in the caption,
so a short run visibly learns them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 40, 170),
    "orange": (250, 140, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.25, "large": 0.5}  # fraction of the image side
POSITIONS = {
    "the top left": (0.3, 0.3),
    "the top right": (0.7, 0.3),
    "the bottom left": (0.3, 0.7),
    "the bottom right": (0.7, 0.7),
    "the center": (0.5, 0.5),
}


@dataclass(frozen=True)
class ShapeSpec:
    color: str
    shape: str
    size: str
    position: str
    background: str

    @property
    def caption(self) -> str:
        return (
            f"a {self.size} {self.color} {self.shape} at {self.position} "
            f"on a {self.background} background"
        )


def shape_spec(seed: int, index: int) -> ShapeSpec:
    """The attributes of sample `index` of the dataset seeded with `seed`."""
    rng = random.Random(seed * 1_000_003 + index)
    return ShapeSpec(
        color=rng.choice(list(COLORS)),
        shape=rng.choice(SHAPES),
        size=rng.choice(list(SIZES)),
        position=rng.choice(list(POSITIONS)),
        background=rng.choice(list(BACKGROUNDS)),
    )


def draw(spec: ShapeSpec, img_size: int) -> Image.Image:
    """Render a spec as an RGB image of img_size × img_size."""
    image = Image.new("RGB", (img_size, img_size), BACKGROUNDS[spec.background])
    canvas = ImageDraw.Draw(image)
    cx, cy = (c * img_size for c in POSITIONS[spec.position])
    half = SIZES[spec.size] * img_size / 2
    box = (cx - half, cy - half, cx + half, cy + half)
    fill = COLORS[spec.color]
    if spec.shape == "circle":
        canvas.ellipse(box, fill=fill)
    elif spec.shape == "square":
        canvas.rectangle(box, fill=fill)
    else:
        canvas.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    return image


def shapes_sample(seed: int, index: int, img_size: int) -> tuple[Image.Image, str]:
    """Sample `index`: (image, caption)."""
    spec = shape_spec(seed, index)
    return draw(spec, img_size), spec.caption
