"""Aspect-ratio buckets: the image sizes a run trains at, and how an image is fitted to one.

`square` (training.buckets = "square") has one bucket, img_size × img_size: every image's
centre square. `aspect` has buckets of about img_size² pixels, sides multiples of 16, at
aspect ratios from 1:4 to 4:1 (generated: 17 ratios 2^(k/4), k = -8..8, evenly spaced on a
log scale; or listed in training.bucket_sizes). An image goes to the bucket nearest its
aspect ratio (on the log scale, so 2:1 and 1:2 are equally far from 1:1), is resized to cover
it and centre-cropped, keeping the most of its pixels any one crop of that bucket's shape
can keep. An image that would be enlarged more than max_upscale is refused (TooSmall).

Micro-batches hold one bucket each (flux.data.dataloader), so the model sees one token count
per micro-batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

from flux.sampling import PIXELS_PER_TOKEN

MAX_RATIO = 4.0  # generated buckets span 1:4 to 4:1
RATIO_STEPS = 8  # generated ratios per factor of 4 on each side of 1:1
BUCKETINGS = ("square", "aspect")

Size = tuple[int, int]  # (width, height) in pixels


class TooSmall(ValueError):
    """An image that its bucket would enlarge more than max_upscale."""


def tokens(size: Size) -> int:
    """Image tokens of a bucket: its 16 × 16 pixel patches."""
    return (size[0] // PIXELS_PER_TOKEN) * (size[1] // PIXELS_PER_TOKEN)


def name(size: Size) -> str:
    """A bucket's name in logs and metrics: WIDTHxHEIGHT."""
    return f"{size[0]}x{size[1]}"


def aspect_sizes(img_size: int, token_multiple: int = 1) -> list[Size]:
    """The generated buckets for img_size: for each ratio r = 2^(k/4), k = -8..8, the size
    (sides multiples of 16, token count a multiple of token_multiple) nearest to
    sqrt(img_size² r) × sqrt(img_size² / r), judged by aspect ratio and pixel count on a log
    scale; the tall ones are the wide ones turned. Ordered from the tallest to the widest;
    duplicates (small img_size) once."""
    area = img_size * img_size
    wide: list[Size] = []
    for k in range(RATIO_STEPS + 1):
        best = _nearest(area, MAX_RATIO ** (k / RATIO_STEPS), token_multiple)
        if best is not None and best not in wide:
            wide.append(best)
    tall = [(h, w) for w, h in reversed(wide) if w != h]
    return tall + [size for size in wide if size not in tall]


def _nearest(area: int, ratio: float, token_multiple: int) -> Size | None:
    step = PIXELS_PER_TOKEN
    w0, h0 = math.sqrt(area * ratio) / step, math.sqrt(area / ratio) / step
    candidates = [
        (w * step, h * step)
        for w in range(max(1, math.floor(w0) - 2), math.ceil(w0) + 3)
        for h in range(max(1, math.floor(h0) - 2), math.ceil(h0) + 3)
        if (w * h) % token_multiple == 0
    ]

    def distance(size: Size) -> float:
        w, h = size
        return abs(math.log(w / h / ratio)) + abs(math.log(w * h / area))

    return min(candidates, key=distance, default=None)


@dataclass(frozen=True)
class Buckets:
    """The sizes a data set is fitted to, and the most an image may be enlarged."""

    sizes: tuple[Size, ...]
    max_upscale: float = math.inf

    @classmethod
    def square(cls, img_size: int) -> Buckets:
        """One bucket, img_size × img_size, any enlargement (training.buckets = "square")."""
        return cls(((img_size, img_size),))

    @classmethod
    def aspect(
        cls,
        img_size: int,
        sizes: list[Size] | None = None,
        max_upscale: float = 1.0,
        token_multiple: int = 1,
    ) -> Buckets:
        """Aspect buckets: `sizes` as listed, or generated for img_size (aspect_sizes)."""
        listed = [(int(w), int(h)) for w, h in sizes] if sizes else None
        return cls(tuple(listed or aspect_sizes(img_size, token_multiple)), max_upscale)

    def describe(self) -> str:
        """ "square", or "aspect WxH ... (max upscale F)": what a cache records."""
        if self.is_square and self.max_upscale == math.inf:
            return "square"
        sizes = " ".join(name(s) for s in self.sizes)
        return f"aspect {sizes} (max upscale {self.max_upscale})"

    @property
    def is_square(self) -> bool:
        return len(self.sizes) == 1 and self.sizes[0][0] == self.sizes[0][1]

    def choose(self, width: int, height: int) -> Size:
        """The bucket for an image of width × height: the nearest aspect ratio (log scale;
        of two equally near, the one with more pixels, then the first listed)."""
        if len(self.sizes) == 1:
            return self.sizes[0]
        aspect = math.log(width / height)
        return min(
            self.sizes,
            key=lambda s: (round(abs(aspect - math.log(s[0] / s[1])), 12), -s[0] * s[1]),
        )

    def scale(self, width: int, height: int) -> float:
        """How much an image of width × height is enlarged (> 1) or reduced to cover its
        bucket."""
        w, h = self.choose(width, height)
        return max(w / width, h / height)

    def fit(self, image: Image.Image) -> Image.Image:
        """The image resized to cover its bucket and centre-cropped to it (bicubic,
        antialiased; only the crop is resampled). Raises TooSmall beyond max_upscale."""
        width, height = image.size
        if width < 1 or height < 1:
            raise ValueError(f"degenerate image size {width}x{height}")
        w, h = self.choose(width, height)
        if (width, height) == (w, h):
            return image
        scale = max(w / width, h / height)
        if scale > self.max_upscale * (1 + 1e-9):
            raise TooSmall(
                f"{width}x{height} would be enlarged {scale:.2f}x for bucket {name((w, h))}, "
                f"more than training.max_upscale = {self.max_upscale}"
            )
        crop_w, crop_h = w / scale, h / scale  # the largest crop of the bucket's shape
        left, top = (width - crop_w) / 2, (height - crop_h) / 2
        box = (left, top, left + crop_w, top + crop_h)
        return image.resize((w, h), Image.Resampling.BICUBIC, box=box)

    def kept(self, width: int, height: int) -> float:
        """The fraction of an image's pixels its bucket's crop keeps."""
        w, h = self.choose(width, height)
        scale = max(w / width, h / height)
        return (w / scale) * (h / scale) / (width * height)
