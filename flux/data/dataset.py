"""The training dataset: captioned images from a source, sharded by data-parallel rank,
with a state that torchtitan's checkpoint saves so a resumed run continues exactly.

Rank r of W reads the source's samples r, r + W, r + 2W, ... in a per-epoch order fixed by
the seed. Its state is one number, how many of its samples it has consumed, so a restart
(even mid-epoch) yields exactly the samples the unbroken run would have seen.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset

from flux.data.imagefolder import BadSample, list_images, load_pair
from flux.data.shapes import shapes_sample
from flux.data.transforms import image_to_tensor

SOURCES = ("shapes", "imagefolder")


@dataclass
class Sample:
    image: torch.Tensor  # (3, H, W) in [-1, 1]
    caption: str
    index: int  # the source's sample index: lets tests check disjointness and resumption


class CaptionedImages(IterableDataset, Stateful):
    """Infinite stream of Samples for one data-parallel rank."""

    def __init__(
        self,
        source: str,
        img_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        path: str | Path | None = None,
    ):
        if source not in SOURCES:
            raise ValueError(f"unknown dataset {source!r}: choose one of {', '.join(SOURCES)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside the world of {world_size}")
        self.source, self.img_size, self.seed = source, img_size, seed
        self.rank, self.world_size = rank, world_size
        self.files = list_images(path) if source == "imagefolder" else []  # type: ignore[arg-type]
        self.consumed = 0  # samples of this rank's stream handed out (or skipped)
        self.skipped: Counter[str] = Counter()

    def _source_index(self, position: int) -> int:
        """The source sample at this rank's position in its stream."""
        global_position = self.rank + position * self.world_size
        if self.source == "shapes":
            return global_position  # unbounded: no epochs
        epoch, offset = divmod(global_position, len(self.files))
        order = list(range(len(self.files)))
        random.Random(self.seed * 7919 + epoch).shuffle(order)
        return order[offset]

    def _load(self, index: int) -> Sample:
        if self.source == "shapes":
            image, caption = shapes_sample(self.seed, index, self.img_size)
        else:
            image, caption = load_pair(self.files[index])
        try:
            tensor = image_to_tensor(image, self.img_size)
        except ValueError as e:
            raise BadSample(str(e)) from e
        return Sample(tensor, caption, index)

    def __iter__(self) -> Iterator[Sample]:
        consecutive_bad = 0
        while True:
            index = self._source_index(self.consumed)
            self.consumed += 1
            try:
                sample = self._load(index)
            except BadSample as e:
                where = self.files[index] if self.files else f"sample {index}"
                self.skipped[f"{where}: {e}"] += 1
                consecutive_bad += 1
                if consecutive_bad >= max(len(self.files), 1):
                    self._check_some_sample_is_usable()
                    consecutive_bad = 0
                continue
            consecutive_bad = 0
            yield sample

    def _check_some_sample_is_usable(self) -> None:
        """Fail (naming the path) when no sample of the source can be used at all."""
        for index in range(max(len(self.files), 1)):
            try:
                self._load(index)
                return
            except BadSample as e:
                error = e
        root = self.files[0].parent if self.files else self.source
        raise ValueError(f"no usable sample in {root}: every image was skipped (e.g. {error})")

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "world_size": self.world_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["world_size"] != self.world_size:
            # Another world size: each rank's stream changes; continue from the same global
            # position so no sample before it is read again.
            global_consumed = state_dict["consumed"] * state_dict["world_size"]
            self.consumed = -(-global_consumed // self.world_size)
        else:
            self.consumed = state_dict["consumed"]
