"""Small webdataset shards for tests: records of tiny images and captions, good and bad."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image

FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}


def image_bytes(i: int, ext: str = "png", size: tuple[int, int] = (20, 18)) -> bytes:
    buf = io.BytesIO()
    width, height = size
    Image.new("RGB", (width + i % 5, height), (10 * i % 255, 40, 0)).save(buf, FORMATS[ext])
    return buf.getvalue()


def write_tar(path: Path, files: list[tuple[str, bytes]]) -> Path:
    """A tar (gzip-compressed if the name ends in .gz or .tgz) of (name, bytes), in order."""
    mode = "w:gz" if path.name.endswith((".gz", ".tgz")) else "w"
    with tarfile.open(path, mode) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def record(i: int, ext: str = "png", caption: str = "txt") -> list[tuple[str, bytes]]:
    """The files of a good record KEY = 00000i: an image and its caption "caption i"."""
    key, text = f"{i:05d}", f"caption {i}"
    files = [(f"{key}.{ext}", image_bytes(i, ext))]
    if caption == "json":
        files.append((f"{key}.json", json.dumps({"caption": text}).encode()))
    else:
        files.append((f"{key}.{caption}", text.encode()))
    return files


def write_shard(path: Path, keys: range, ext: str = "png", caption: str = "txt") -> Path:
    return write_tar(path, [f for i in keys for f in record(i, ext, caption)])


def make_shards(root: Path, shards: int, per_shard: int | list[int]) -> Path:
    """shard-000.tar, ...: records 0, 1, ... in order, per_shard of them in each (or the
    counts of a list)."""
    root.mkdir(parents=True, exist_ok=True)
    counts = per_shard if isinstance(per_shard, list) else [per_shard] * shards
    start = 0
    for s, count in enumerate(counts):
        write_shard(root / f"shard-{s:03d}.tar", range(start, start + count))
        start += count
    return root


def keys_of(root: Path, shards: int, per_shard: int | list[int]) -> list[str]:
    """The sample keys of make_shards(root, shards, per_shard)."""
    counts = per_shard if isinstance(per_shard, list) else [per_shard] * shards
    starts = [sum(counts[:s]) for s in range(len(counts))]
    return [
        f"shard-{s:03d}.tar:{i:05d}"
        for s, count in enumerate(counts)
        for i in range(starts[s], starts[s] + count)
    ]
