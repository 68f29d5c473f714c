"""Image transforms: an image file -> RGB uint8 tensor (3, H, W), fitted to its bucket (the
short side's centre square resized to img_size, or an aspect bucket: flux.data.buckets); and,
on the device, uint8 -> [-1, 1] floats.

Images leave the data loader as uint8 (a quarter of float32's bytes across processes and
to the device) and become model inputs where the batch reaches the device (device_images).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from flux.data.buckets import Buckets


def load_image(source: bytes | str | Path, size: int | Buckets | None = None) -> Image.Image:
    """Decode an image file (its bytes or its path) to 8-bit RGB, its EXIF orientation
    applied (a phone photo stored sideways comes out upright).

    With `size` (a square side, or the buckets the image will be fitted to), a JPEG at
    least twice as large as its bucket needs is decoded at a reduced scale (1/2, 1/4 or 1/8:
    PIL's draft, done in the JPEG decoder), never below what the bucket needs. Raises
    whatever PIL raises for a file it cannot decode.
    """
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    image = Image.open(io.BytesIO(data))
    if size is not None and image.format == "JPEG":
        buckets = Buckets.square(size) if isinstance(size, int) else size
        width, height = image.size
        # its EXIF orientation may turn it by 90° after decoding: enough for either way
        scale = max(buckets.scale(width, height), buckets.scale(height, width))
        if scale <= 0.5:
            image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
    image.load()
    ImageOps.exif_transpose(image, in_place=True)
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any mode (L, LA, P, RGBA, CMYK, I;16, I, F, ...) to 8-bit RGB.

    Transparency is composited on white, as viewers show it; 16-bit and 32-bit
    grayscale are scaled down to 8 bits rather than clipped.
    """
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        gray = np.clip(pixels / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    return image.convert("RGB")


def resize_and_crop(image: Image.Image, size: int | Buckets) -> Image.Image:
    """The image fitted to its bucket (Buckets.fit); for a side `size`, the centre square
    (its short side) resized to size × size (bicubic, antialiased). Only the crop is
    resampled, so a 2000×20 strip costs a 20×20 resize."""
    return (Buckets.square(size) if isinstance(size, int) else size).fit(image)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB image -> (3, H, W) uint8. (numpy's copy: torch's may wait on intra-op
    threads, tens of times slower on a busy machine.)"""
    pixels = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def image_to_tensor(image: Image.Image, size: int | Buckets) -> torch.Tensor:
    """The whole transform: any image -> (3, H, W) uint8 of its bucket (size × size for a
    side)."""
    return to_tensor(resize_and_crop(to_rgb(image), size))


def device_images(
    images: torch.Tensor, device: torch.device | str, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 images (B, 3, H, W) -> the model's input: [-1, 1] in dtype, on device.

    The copy does not block (from pinned memory it overlaps with the device's work); the
    arithmetic is float32 whatever dtype, so bfloat16 gets the rounding of float32 values."""
    pixels = images.to(device, non_blocking=True)
    return (pixels.float() / 127.5 - 1.0).to(dtype)
