"""Tar shards of captioned images in the webdataset layout (KEY.jpg + KEY.txt, the files of a
record stored one after another), local or on the hub, read record by record.

One reader for both: Python's tarfile in streaming mode ("r|*") over an fsspec file, which is
a local file for a path and huggingface_hub's HfFileSystem for `hf://datasets/...`. Streaming
mode reads front to back, as the network delivers; it decompresses `.tar.gz` (and `.tar.bz2`,
`.tar.xz`) on the way; and it hands over one member at a time, so a bad member costs its
record, not the shard. A record's files are grouped here by key; what is inside them is
judged by decode_record.

Positions: after each record the reader knows its count and the byte offset of the next
record's header (tarfile's member offsets). An uncompressed shard is reopened there with a
seek (a range request on the hub); a compressed one by reading up to it again.

A shard cut short yields every record before the cut; the cut is found by tarfile (a member's
data runs past the end) or, when it falls between members, by the missing end-of-archive
blocks (the shard's size says where the archive ends).
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
from PIL import Image

from flux.data.buckets import Buckets
from flux.data.skips import (
    CAPTION_NOT_UTF8,
    EMPTY_CAPTION,
    MISSING_CAPTION,
    MISSING_IMAGE,
    NOT_A_TAR,
    TRUNCATED_SHARD,
    UNDECODABLE_IMAGE,
    UNKNOWN_FILE_KIND,
    UNREADABLE_SHARD,
    BadSample,
)
from flux.data.transforms import load_image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt", "caption", "json")  # in this order of preference
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
CC12M = "pixparse/cc12m-wds"
END_OF_ARCHIVE = 1024  # two zero blocks end every tar archive
RETRIES = (1.0, 4.0, 16.0)  # seconds before each reopening of a shard whose I/O failed


@dataclass(frozen=True)
class Shard:
    url: str  # what fsspec opens: a local path or hf://datasets/OWNER/NAME/FILE
    name: str  # relative to the data set's root (in sample keys and logs)
    size: int  # bytes

    @property
    def compressed(self) -> bool:
        return not self.name.endswith(".tar")


@dataclass
class Record:
    """The files of one key in a shard, and where the next record starts."""

    index: int  # records of the shard before this one
    key: str
    files: dict[str, bytes]  # extension (lowercase) -> bytes
    end: int  # byte offset of the next record's header (in the uncompressed stream)
    cut: bool = False  # the shard ends cut off right after it: it may lack files
    start: int = 0  # byte offset of its own first header (read_records reopens it there)


class ShardProblem(Exception):
    """A shard that cannot be read on: `kind` is TRUNCATED_SHARD, NOT_A_TAR or UNREADABLE_SHARD."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


def shard_location(source: str, path: str | Path | None) -> str:
    """Where a source's shards are: `webdataset`: a local folder or any fsspec URL
    (hf://datasets/OWNER/NAME/...); `cc12m-wds`: a hub data set id or URL (pixparse/cc12m-wds)."""
    if source == "cc12m-wds":
        hub = str(path or CC12M)
        return hub if "://" in hub else f"hf://datasets/{hub}"
    if path is None:
        raise ValueError("dataset 'webdataset' needs dataset_path: the folder of its .tar shards")
    return str(path)


def list_shards(location: str) -> list[Shard]:
    """Every shard (SHARD_SUFFIXES) under location, by name: the same list on every rank."""
    on_hub = location.startswith("hf://")
    try:
        fs, root = fsspec.core.url_to_fs(location)
        found = fs.find(root, detail=True) if on_hub or fs.isdir(root) else {}
    except Exception as e:
        if not on_hub:
            raise
        raise ConnectionError(
            f"cannot stream {location} from the hub ({e.__class__.__name__}: {e}): this "
            "machine has no access to it; download shards and use dataset = 'webdataset' "
            "with dataset_path, or dataset = 'shapes' to try things out"
        ) from e
    root = root.rstrip("/")
    shards = sorted(
        (
            Shard(fs.unstrip_protocol(p) if on_hub else p, p[len(root) :].lstrip("/"), info["size"])
            for p, info in found.items()
            if p.endswith(SHARD_SUFFIXES) and info.get("type", "file") == "file"
        ),
        key=lambda s: s.name,
    )
    if not shards:
        raise FileNotFoundError(
            f"no .tar shards under {location}: point [training] dataset_path at a folder of "
            "webdataset shards (KEY.jpg + KEY.txt; .tar or .tar.gz)"
        )
    return shards


def shards_digest(shards: list[Shard]) -> str:
    """A short fingerprint of a shard list (names and sizes): a resume checks it is the same."""
    text = "\n".join(f"{s.name} {s.size}" for s in shards)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def split_name(name: str) -> tuple[str, str]:
    """A member's (key, extension): the webdataset rule, the key ending at the first dot of
    the file name. "a/00001.seg.png" -> ("a/00001", "seg.png")."""
    folder, _, file = name.rpartition("/")
    stem, _, ext = file.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _records(
    shard: Shard, start: int, offset: int, wanted: Callable[[int], bool]
) -> Iterator[Record]:
    """One pass of read_records: the wanted records from record `start`, which begins at byte
    `offset` (0 for a compressed shard: the records before start are read and dropped)."""
    with fsspec.open(shard.url, "rb") as f:
        if offset:
            f.seek(offset)
        try:
            # "r|" at an offset: a header block never starts with a compression magic number.
            tar = tarfile.open(fileobj=f, mode="r|" if offset else "r|*")
        except (tarfile.TarError, EOFError, zlib.error) as e:
            raise ShardProblem(NOT_A_TAR, str(e)) from e
        with tar:
            index = start if offset else 0
            key: str | None = None
            files: dict[str, bytes] = {}
            begins = offset  # where the current record's first header is
            while True:
                try:
                    member = tar.next()
                except (tarfile.TarError, EOFError, zlib.error) as e:
                    # Cut in the padding after the data or inside a header: the files read
                    # so far may be a whole record.
                    if key is not None and index >= start and wanted(index):
                        yield Record(index, key, files, offset + tar.offset, True, begins)
                    raise ShardProblem(
                        TRUNCATED_SHARD, f"cut after byte {offset + tar.offset} ({e})"
                    ) from e
                if member is None:
                    break
                tar.members.clear()  # type: ignore[attr-defined]  # else it keeps every header
                if not member.isfile():
                    continue
                member_key, ext = split_name(member.name)
                if member_key != key:
                    if key is not None and index >= start and wanted(index):
                        yield Record(index, key, files, offset + member.offset, start=begins)
                    index += key is not None
                    key, files, begins = member_key, {}, offset + member.offset
                if index >= start and wanted(index):
                    reader = tar.extractfile(member)
                    assert reader is not None  # a regular file
                    files[ext] = reader.read()
            stop = offset + tar.offset
            cut = not shard.compressed and 0 <= shard.size - stop < END_OF_ARCHIVE
            if key is not None and index >= start and wanted(index):
                yield Record(index, key, files, stop, cut, begins)
            if cut:
                raise ShardProblem(
                    TRUNCATED_SHARD,
                    f"ends without the end-of-archive blocks ({shard.size} bytes, the last "
                    f"member ends at {stop}): every record before was read",
                )


def read_records(
    shard: Shard, start: int = 0, offset: int = 0, wanted: Callable[[int], bool] | None = None
) -> Iterator[Record]:
    """The records of a shard (those whose index passes `wanted`), from record `start` (at
    byte `offset`, a previous Record.end; 0 reads from the beginning), each once all its
    files are read. Ends with ShardProblem for a shard it cannot read to its end, after its
    last complete record: not a tar, truncated, or unreadable (I/O failed; a remote shard
    is reopened where the last record ended, RETRIES times)."""
    if shard.compressed:
        offset = 0  # no seeking in a compressed stream: read up to record `start` again
    attempt = 0
    while True:
        try:
            for record in _records(shard, start, offset, wanted or _every):
                yield record
                start = record.index + 1
                offset = 0 if shard.compressed else record.end
                attempt = 0
            return
        except ShardProblem:
            raise
        except (tarfile.TarError, EOFError, zlib.error) as e:
            raise ShardProblem(
                TRUNCATED_SHARD, f"cut inside a member ({e}): every record before was read"
            ) from e
        except Exception as e:  # I/O of any file system (OSError, HTTP errors, ...)
            if "://" not in shard.url or attempt == len(RETRIES):
                raise ShardProblem(UNREADABLE_SHARD, f"{type(e).__name__}: {e}") from e
            time.sleep(RETRIES[attempt])
            attempt += 1


def _every(index: int) -> bool:
    return True


def count_records(shard: Shard) -> int:
    """The records of a local shard, their files not read (an uncompressed shard's headers
    only: tarfile seeks over the rest); for a shard cut short, those before the cut."""
    count, key = 0, None
    try:
        with tarfile.open(shard.url, "r:*") as tar:
            for member in tar:
                if member.isfile():
                    member_key = split_name(member.name)[0]
                    count += member_key != key
                    key = member_key
    except (tarfile.TarError, EOFError, OSError, zlib.error):
        pass  # what was counted is what a reader gets
    return count


def record_caption(files: dict[str, bytes]) -> str:
    """The caption of a record: KEY.txt, KEY.caption, or the `caption` (or `text`) field of
    KEY.json; raises BadSample (missing, empty, not UTF-8)."""
    ext = next((e for e in CAPTION_EXTENSIONS if e in files), None)
    if ext is None:
        raise BadSample(MISSING_CAPTION, "no .txt, .caption or .json")
    try:
        text = files[ext].decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadSample(CAPTION_NOT_UTF8, f".{ext}: {e}") from e
    if ext == "json":
        try:
            meta = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadSample(MISSING_CAPTION, f".json does not parse: {e}") from e
        fields = [meta.get(k) for k in ("caption", "text")] if isinstance(meta, dict) else []
        text = next((v for v in fields if isinstance(v, str)), None)  # type: ignore[assignment]
        if text is None:
            raise BadSample(MISSING_CAPTION, ".json has no caption or text field")
    caption = text.strip()
    if not caption:
        raise BadSample(EMPTY_CAPTION, f".{ext}")
    return caption


def decode_record(
    files: dict[str, bytes], size: int | Buckets | None = None
) -> tuple[Image.Image, str]:
    """(RGB image, caption) of a record's files; raises BadSample saying what is wrong. With
    size (a side, or buckets), a large JPEG is decoded at a reduced scale
    (transforms.load_image)."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
    if ext is None:
        unknown = sorted(e for e in files if e not in CAPTION_EXTENSIONS)
        if unknown:
            raise BadSample(UNKNOWN_FILE_KIND, f"files {', '.join('.' + e for e in unknown)}")
        raise BadSample(MISSING_IMAGE, f"only {', '.join('.' + e for e in sorted(files))}")
    caption = record_caption(files)
    try:
        return load_image(files[ext], size), caption
    except Exception as e:  # PIL raises many kinds for bad files
        raise BadSample(UNDECODABLE_IMAGE, f".{ext}: {e}") from e
