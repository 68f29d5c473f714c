"""`imagefolder`: a folder of images, each with a same-named `.txt` caption."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from flux.data.buckets import Buckets
from flux.data.skips import (
    CAPTION_NOT_UTF8,
    EMPTY_CAPTION,
    MISSING_CAPTION,
    UNDECODABLE_IMAGE,
    BadSample,
)
from flux.data.transforms import load_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def list_images(root: str | Path) -> list[Path]:
    """Every image under root (recursively), in a stable order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"dataset_path {root} is not a folder: point [training] dataset_path at a folder "
            "of images with same-named .txt captions"
        )
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {root}")
    return files


def load_pair(image_path: Path, size: int | Buckets | None = None) -> tuple[Image.Image, str]:
    """(RGB image, caption) of one file, EXIF orientation applied (a JPEG of at least twice
    what its bucket needs decoded at a reduced scale); raises BadSample saying what is wrong
    with it."""
    caption_path = image_path.with_suffix(".txt")
    try:
        caption = caption_path.read_bytes().decode("utf-8-sig").strip()
    except OSError as e:
        raise BadSample(MISSING_CAPTION, f"no readable caption {caption_path.name}: {e}") from e
    except UnicodeDecodeError as e:
        raise BadSample(CAPTION_NOT_UTF8, f"{caption_path.name}: {e}") from e
    if not caption:
        raise BadSample(EMPTY_CAPTION, caption_path.name)
    try:
        return load_image(image_path, size), caption
    except Exception as e:  # PIL raises many kinds for bad files
        raise BadSample(UNDECODABLE_IMAGE, str(e)) from e
