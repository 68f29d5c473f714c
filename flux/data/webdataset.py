"""`webdataset` (local .tar shards) and `cc12m-wds` (streamed from the hub): samples in the
cc12m layout, KEY.jpg/.png/.webp with KEY.txt or a KEY.json caption, read with `datasets`.

Images are kept as bytes and decoded here, so one bad image is one skipped sample rather
than a dead iterator. A shard the reader would stop on (truncated, or records holding
different files) is found from its tar headers at start-up, skipped whole and reported.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from flux.data.imagefolder import BadSample

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CC12M_HUB_ID = "pixparse/cc12m-wds"


def decode_record(record: dict[str, Any]) -> tuple[Image.Image, str]:
    """(image, caption) of one webdataset record; raises BadSample saying what is wrong."""
    image_field = next((record[k] for k in IMAGE_KEYS if record.get(k) is not None), None)
    if image_field is None:
        raise BadSample("no image (jpg/png/webp) in the record")
    caption = record.get("txt")
    if caption is None and record.get("json") is not None:
        meta = record["json"]
        meta = json.loads(meta) if isinstance(meta, str | bytes) else meta
        caption = meta.get("caption") if isinstance(meta, dict) else None
    if isinstance(caption, bytes):
        caption = caption.decode("utf-8", errors="replace")
    if not caption or not caption.strip():
        raise BadSample("missing or empty caption")
    data = image_field["bytes"] if isinstance(image_field, dict) else image_field
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.copy(), caption.strip()
    except Exception as e:  # PIL raises many kinds for bad files
        raise BadSample(f"undecodable image: {e}") from e


def _mismatched_record(names: list[str]) -> str:
    """Why datasets' webdataset reader would stop on this shard, or "" if it would not:
    it needs every record (files sharing a KEY) to hold the same kinds of file."""
    kinds: dict[str, set[str]] = {}
    for name in names:
        key, _, ext = Path(name).name.partition(".")
        kinds.setdefault(str(Path(name).parent / key), set()).add(ext)
    if not kinds:
        return "no records"
    first_key, first = next(iter(kinds.items()))
    for key, exts in kinds.items():
        if exts != first:
            return f"record {key} has {sorted(exts)} but {first_key} has {sorted(first)}"
    return ""


def list_shards(root: str | Path) -> tuple[list[Path], list[str]]:
    """(readable .tar shards under root, "path: reason" for each unreadable one).

    Only the tar headers are read (the data is seeked over), so this is quick even for
    large shards; a truncated shard is found here rather than mid-run.
    """
    root = Path(root)
    shards = sorted(root.rglob("*.tar")) if root.is_dir() else []
    if not shards:
        raise FileNotFoundError(
            f"no .tar shards under {root}: point [training] dataset_path at a folder of "
            "webdataset shards (KEY.jpg + KEY.txt)"
        )
    good, bad = [], []
    for shard in shards:
        try:
            with tarfile.open(shard) as tar:
                names = [m.name for m in tar.getmembers() if m.isfile()]
        except (tarfile.TarError, OSError) as e:
            bad.append(f"{shard}: unreadable ({e})")
            continue
        problem = _mismatched_record(names)
        if problem:
            bad.append(f"{shard}: {problem}")
        else:
            good.append(shard)
    if not good:
        raise ValueError(f"no usable sample in {root}: every shard is unreadable ({bad[-1]})")
    return good, bad


class RecordStream:
    """One rank's records of a `datasets` webdataset stream, resumable.

    Ranks split the stream with datasets' split_dataset_by_node: whole shards per rank
    when the shards divide evenly among ranks, otherwise every W-th record. Each epoch
    reshuffles (seeded); the position within the epoch is datasets' own state_dict.
    """

    def __init__(self, stream: Any, rank: int, world_size: int, seed: int, bad_shards: list[str]):
        import datasets
        from datasets.distributed import split_dataset_by_node

        for key in IMAGE_KEYS:
            if stream.features is not None and key in stream.features:
                stream = stream.cast_column(key, datasets.Image(decode=False))
        self.stream = split_dataset_by_node(
            stream.shuffle(seed=seed, buffer_size=1), rank, world_size
        )
        self.bad_shards = bad_shards
        self.epoch = 0
        self._fresh_state = self.stream.state_dict()  # the start of an epoch

    def records(self, once: bool = False) -> Iterator[tuple[str, dict[str, Any]]]:
        """(where, record) forever, or to the end of the current epoch if once; `where`
        names the shard and key (skip reports, sample keys)."""
        while True:
            self.stream.set_epoch(self.epoch)
            for record in self.stream:
                yield f"{Path(str(record.get('__url__'))).name}:{record.get('__key__')}", record
            if once:
                return
            self.epoch += 1
            self.stream.load_state_dict(self._fresh_state)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.stream.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]
        self.stream.load_state_dict(state["position"])


def local_shards(root: str | Path, rank: int, world_size: int, seed: int) -> RecordStream:
    """`webdataset`: the readable .tar shards under root."""
    import datasets

    shards, bad = list_shards(root)
    stream = datasets.load_dataset(
        "webdataset", data_files={"train": [str(s) for s in shards]}, split="train", streaming=True
    )
    return RecordStream(stream, rank, world_size, seed, bad)


def hub_shards(hub_id: str, rank: int, world_size: int, seed: int) -> RecordStream:
    """`cc12m-wds`: the data set streamed from the hub."""
    import datasets

    try:
        stream = datasets.load_dataset(hub_id, split="train", streaming=True)
    except Exception as e:
        raise ConnectionError(
            f"cannot stream {hub_id} from the hub ({e.__class__.__name__}): this machine "
            "has no access to it; download shards and use dataset = 'webdataset' with "
            "dataset_path, or dataset = 'shapes' to try things out"
        ) from e
    return RecordStream(stream, rank, world_size, seed, [])
