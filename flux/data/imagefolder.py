"""`imagefolder`: a folder of images, each with a same-named `.txt` caption."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class BadSample(Exception):
    """A sample that cannot be used (undecodable image, missing caption, ...)."""


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


def load_pair(image_path: Path) -> tuple[Image.Image, str]:
    """(image, caption) of one file; raises BadSample saying what is wrong with it."""
    caption_path = image_path.with_suffix(".txt")
    try:
        caption = caption_path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise BadSample(f"no readable caption {caption_path.name}: {e}") from e
    if not caption:
        raise BadSample(f"empty caption {caption_path.name}")
    try:
        with Image.open(image_path) as image:
            image.load()
            return image.copy(), caption
    except Exception as e:  # PIL raises many kinds for bad files
        raise BadSample(f"undecodable image: {e}") from e
