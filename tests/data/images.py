"""Images for the tests: several aspect ratios (a folder, or tar shards), and a folder with bad
files."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from tests.data.tars import write_tar

# (width, height) of the test images: 4:3, 16:9, 1:1, 3:4, 1:3, in these proportions
MIX = {(64, 48): 8, (64, 36): 4, (48, 48): 6, (48, 64): 4, (30, 90): 2}


def mixed_folder(root: Path, mix: dict[tuple[int, int], int] = MIX) -> Path:
    """An imagefolder of the mix's sizes, interleaved."""
    root.mkdir(parents=True, exist_ok=True)
    sizes = [size for size, count in mix.items() for _ in range(count)]
    sizes = sizes[::2] + sizes[1::2]
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (i * 9 % 255, 50, 90)).save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(f"image {i} of {w}x{h}")
    return root


def mixed_shards(root: Path, shards: int = 4, per_shard: int = 31) -> Path:
    """Tar shards of images of the MIX's sizes (in turn)."""
    root.mkdir(parents=True, exist_ok=True)
    sizes = list(MIX)
    i = 0
    for s in range(shards):
        files = []
        for _ in range(per_shard):
            buf = io.BytesIO()
            Image.new("RGB", sizes[i % len(sizes)], (i * 7 % 255, 9, 9)).save(buf, "PNG")
            files += [(f"{i:05d}.png", buf.getvalue()), (f"{i:05d}.txt", f"caption {i}".encode())]
            i += 1
        write_tar(root / f"shard-{s:03d}.tar", files)
    return root


def folder_with_bad_files(root: Path, good: int) -> Path:
    """An imagefolder of `good` usable images and 3 bad files, one of each kind."""
    root.mkdir(parents=True)
    for i in range(good):
        Image.new("RGB", (32, 32), (20 * i, 0, 0)).save(root / f"good{i}.png")
        (root / f"good{i}.txt").write_text(f"a red square number {i}")
    (root / "bad0.png").write_bytes(b"not an image")
    (root / "bad0.txt").write_text("an undecodable image")
    Image.new("RGB", (32, 32)).save(root / "bad1.png")
    (root / "bad1.txt").write_text("  ")  # an empty caption
    Image.new("RGB", (32, 32)).save(root / "bad2.png")  # no caption at all
    return root
