"""The training dataset: captioned images from a source, sharded by data-parallel rank,
with a state that torchtitan's checkpoint saves so a resumed run continues exactly.

Indexed sources (`shapes`, `imagefolder`, `precomputed`): rank r of W reads samples r, r + W,
r + 2W, ... of a seeded per-epoch order, and its state is how many it has consumed. Streamed
sources (`webdataset`, `cc12m-wds`) keep their position in the stream (webdataset.py).
`precomputed` (precomputed.py) yields CachedSamples, the encoders' outputs, instead of images.
"""

from __future__ import annotations

import random
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset
from torchtitan.tools.logging import logger

from flux.data.imagefolder import BadSample, list_images, load_pair
from flux.data.precomputed import CachedSample, PrecomputedCache
from flux.data.shapes import shapes_sample
from flux.data.transforms import image_to_tensor
from flux.data.webdataset import CC12M_HUB_ID, RecordStream, decode_record, hub_shards, local_shards

SOURCES = ("shapes", "imagefolder", "webdataset", "cc12m-wds", "precomputed")
PATH_SOURCES = ("imagefolder", "webdataset", "precomputed")  # need dataset_path
HELD_OUT_SEED = 1_000_003  # held-out draws are seeded apart from training's


def held_out_seed(seed: int) -> int:
    """The seed of held-out draws (validation's noise, the shapes source's validation
    samples) for a run seeded with `seed`."""
    return seed + HELD_OUT_SEED


def split_seed(split: str, source: str, seed: int) -> int:
    """The seed a split reads its source with: the shapes source draws its validation
    samples from the held-out seed (other sources hold different files)."""
    return held_out_seed(seed) if split == "validation" and source == "shapes" else seed


@dataclass
class Sample:
    image: torch.Tensor  # (3, H, W) in [-1, 1]
    caption: str
    key: str  # where the sample came from: "17" (index), a path, or "shard.tar:KEY"


class CaptionedImages(IterableDataset, Stateful):
    """Infinite stream of Samples (CachedSamples for `precomputed`) for one data-parallel rank."""

    def __init__(
        self,
        source: str,
        img_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        path: str | Path | None = None,
        report_every_s: float = 60.0,
    ):
        if source not in SOURCES:
            raise ValueError(f"unknown dataset {source!r}: choose one of {', '.join(SOURCES)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside the world of {world_size}")
        if source in PATH_SOURCES and path is None:
            raise ValueError(f"dataset {source!r} needs dataset_path: the folder of its files")
        self.source, self.img_size, self.seed = source, img_size, seed
        self.rank, self.world_size = rank, world_size
        self.path = Path(path) if path is not None else None
        self.files = list_images(path) if source == "imagefolder" else []  # type: ignore[arg-type]
        self.cache = PrecomputedCache(path) if source == "precomputed" else None  # type: ignore[arg-type]
        self.stream: RecordStream | None = None
        if source == "webdataset":
            self.stream = local_shards(path, rank, world_size, seed)  # type: ignore[arg-type]
        elif source == "cc12m-wds":
            self.stream = hub_shards(str(path or CC12M_HUB_ID), rank, world_size, seed)
        # (reader, readers): this rank, or one of its dataloader workers (set in __iter__).
        self._reader = (rank, world_size)
        self._pending_state: dict[str, Any] | None = None
        self.consumed = 0  # indexed sources: samples of this rank's order handed out or skipped
        self.skipped: Counter[str] = Counter()  # reason -> count
        self.skip_examples: deque[str] = deque(maxlen=8)  # the latest "where: reason"
        self.report_every_s = report_every_s
        self._reported = (0.0, 0)  # (time, skips) of the last report

    # -- indexed sources ------------------------------------------------------------------
    def size(self) -> int | None:
        """Samples of an indexed source in one epoch; None for shapes (unbounded) and streams."""
        if self.cache is not None:
            return len(self.cache)
        return len(self.files) if self.files else None

    def key(self, index: int) -> str:
        """The key of sample `index` of an indexed source."""
        if self.cache is not None:
            return f"sample {index} of {self.path}"  # its source key is in the cache
        return str(self.files[index]) if self.files else str(index)

    def sample(self, index: int) -> Sample | CachedSample:
        """Sample `index` of an indexed source, in its own (unshuffled) order; raises
        BadSample or ValueError for an unusable one."""
        if self.cache is not None:
            return self.cache[index]
        if self.files:
            image, caption = load_pair(self.files[index])
        else:
            image, caption = shapes_sample(self.seed, index, self.img_size)
        return Sample(image_to_tensor(image, self.img_size), caption, self.key(index))

    def _source_index(self, position: int) -> int:
        rank, world_size = self._reader
        global_position = rank + position * world_size
        size = self.size()
        if size is None:
            return global_position  # shapes, unbounded: no epochs
        epoch, offset = divmod(global_position, size)
        order = list(range(size))
        random.Random(self.seed * 7919 + epoch).shuffle(order)
        return order[offset]

    def _indexed(self) -> Iterator[tuple[str, Any]]:
        while True:
            index = self._source_index(self.consumed)
            self.consumed += 1
            yield self.key(index), lambda i=index: self.sample(i)

    def _streamed(self, once: bool = False) -> Iterator[tuple[str, Any]]:
        assert self.stream is not None
        for where, record in self.stream.records(once):
            yield where, lambda w=where, r=record: self._decoded(w, r)

    def _decoded(self, where: str, record: dict[str, Any]) -> Sample:
        image, caption = decode_record(record)
        return Sample(image_to_tensor(image, self.img_size), caption, where)

    # -- all sources ----------------------------------------------------------------------
    def __iter__(self) -> Iterator[Sample | CachedSample]:
        worker = torch.utils.data.get_worker_info()
        if worker is not None and worker.num_workers > 1 and self.stream is None:
            # Each dataloader worker reads its own share (datasets' streams split
            # themselves among workers).
            self._reader = (
                self.rank * worker.num_workers + worker.id,
                self.world_size * worker.num_workers,
            )
        self._apply_pending_state()
        yield from self._usable(self._indexed() if self.stream is None else self._streamed())

    def one_pass(self) -> Iterator[Sample | CachedSample]:
        """A streamed source's samples from its current position to the end of the epoch
        (what precompute reads; indexed sources are read with `sample`)."""
        yield from self._usable(self._streamed(once=True))

    def _usable(self, records: Iterator[tuple[str, Any]]) -> Iterator[Sample | CachedSample]:
        """The loaded samples of `records`, bad ones skipped and reported."""
        bad_in_a_row = 0
        for where, load in records:
            try:
                sample = load()
            except (BadSample, ValueError) as e:
                self._skip(where, str(e))
                bad_in_a_row += 1
                if bad_in_a_row >= self._patience():
                    self._check_some_sample_is_usable(e)
                    bad_in_a_row = 0
                continue
            bad_in_a_row = 0
            self._maybe_report()
            yield sample

    def _skip(self, where: str, reason: str) -> None:
        self.skipped[reason.split(":")[0]] += 1
        self.skip_examples.append(f"{where}: {reason}")

    def _patience(self) -> int:
        size = self.size()
        if size is not None:
            return size
        return 10_000 if self.stream is not None else 1

    def _check_some_sample_is_usable(self, error: Exception) -> None:
        """Fail (naming the path) when the source has no usable sample at all."""
        where = self.path or self.source
        if self.files:
            for file in self.files:
                try:
                    image_to_tensor(load_pair(file)[0], self.img_size)
                    return
                except (BadSample, ValueError):
                    continue
        raise ValueError(
            f"no usable sample in {where}: every sample was skipped "
            f"(latest: {self.skip_examples[-1] if self.skip_examples else error})"
        )

    def _maybe_report(self) -> None:
        """Log what was skipped, at most every report_every_s, when something new was."""
        skips = sum(self.skipped.values()) + (len(self.stream.bad_shards) if self.stream else 0)
        now = time.monotonic()
        if skips > self._reported[1] and now - self._reported[0] >= self.report_every_s:
            logger.warning(f"dataset {self.source} (rank {self.rank}): {self.skip_report()}")
            self._reported = (now, skips)

    def skip_report(self) -> str:
        """One line for the log: what was skipped so far, and where, most recent last."""
        shards = self.stream.bad_shards if self.stream is not None else []
        if not self.skipped and not shards:
            return ""
        counts = ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common())
        parts = [f"skipped samples: {counts}" if counts else ""]
        if shards:
            parts.append(f"unreadable shards: {len(shards)} (latest {shards[-1]})")
        if self.skip_examples:
            parts.append(f"latest: {'; '.join(self.skip_examples)}")
        return " | ".join(p for p in parts if p)

    def state_dict(self) -> dict[str, Any]:
        if self._pending_state is not None:  # loaded, not yet iterated
            return self._pending_state
        if self.stream is not None:
            return {"stream": self.stream.state_dict(), "world_size": self.world_size}
        return {"consumed": self.consumed, "world_size": self._reader[1]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.stream is not None:
            if state_dict["world_size"] != self.world_size:
                raise ValueError(
                    f"the {self.source} stream was saved with {state_dict['world_size']} data-"
                    f"parallel ranks and cannot resume on {self.world_size}: keep the "
                    "data-parallel degree, or start its data from the beginning"
                )
            self.stream.load_state_dict(state_dict["stream"])
        else:
            # Applied in __iter__, once this reader knows whether it is a dataloader worker.
            self._pending_state = state_dict

    def _apply_pending_state(self) -> None:
        state, self._pending_state = self._pending_state, None
        if state is None:
            return
        if state["world_size"] != self._reader[1]:
            # Another number of readers: each one's order changes; continue from the same
            # global position so no sample before it is read again.
            global_consumed = state["consumed"] * state["world_size"]
            self.consumed = -(-global_consumed // self._reader[1])
        else:
            self.consumed = state["consumed"]
