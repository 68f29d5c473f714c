"""Checksums of files flux writes (checkpoints, precomputed caches), so that corruption
that keeps a file's size is found when the file is read back.

The hash is xxHash's XXH3-128: it finds accidental corruption (a flipped bit, a block of
zeros, a torn write) as well as a cryptographic hash would, and it runs at memory speed
(12 GB/s on one core here, against 1 GB/s for SHA-256), so checking a file costs little
more than reading it. It releases the GIL, so hashing in a background thread leaves the
training loop's thread running.

A checksum file is JSON: {"format", "hash", "files": {name: {"bytes", "digest"}}}, names
relative to the folder it sits in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import xxhash

FORMAT = "flux-checksums/1"
HASH = "xxh3_128"
CHUNK = 16 * 2**20  # bytes read at a time


def file_digest(path: str | Path) -> str:
    """The XXH3-128 digest of a file's bytes (hex)."""
    digest = xxhash.xxh3_128()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def file_entry(path: str | Path) -> dict[str, Any]:
    """{"bytes", "digest"} of one file."""
    return {"bytes": os.path.getsize(path), "digest": file_digest(path)}


def write_checksums(path: str | Path, files: list[Path]) -> None:
    """Hash `files` (in the folder of `path`) and write the checksum file, whole or not at
    all (written under a temporary name, flushed to disk, then renamed)."""
    path = Path(path)
    entries = {f.name: file_entry(f) for f in files}
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as out:
        json.dump({"format": FORMAT, "hash": HASH, "files": entries}, out, indent=1)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def read_checksums(path: str | Path) -> dict[str, dict[str, Any]]:
    """name -> {"bytes", "digest"} from a checksum file; ValueError if it is not one."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{Path(path).name} cannot be read ({type(e).__name__})") from None
    if not isinstance(value, dict) or value.get("format") != FORMAT or value.get("hash") != HASH:
        raise ValueError(f"{Path(path).name} is not a {FORMAT} file of {HASH} digests")
    return value["files"]


def mismatch(path: Path, entry: dict[str, Any], check_digest: bool = True) -> str | None:
    """Why `path` is not the file `entry` describes (None if it is): missing, another
    size, or (check_digest) other bytes."""
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"{path.name} is {size} bytes, not the {entry['bytes']} it was written with"
    if check_digest and file_digest(path) != entry["digest"]:
        return f"{path.name} does not match its checksum"
    return None
