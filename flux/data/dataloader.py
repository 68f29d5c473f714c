"""Batches of captioned images for one data-parallel rank, with resumable state.

torchdata's StatefulDataLoader saves each worker's dataset state, so a resumed run
continues with the samples the unbroken run would have seen, with or without workers.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torchdata.stateful_dataloader import StatefulDataLoader
from torchtitan.components.dataloader import BaseDataLoader

from flux.data.dataset import CaptionedImages
from flux.data.precomputed import TENSORS, CachedSample


def collate(samples: list[Any]) -> dict[str, Any]:
    """Samples -> {"images": (B, 3, H, W), "captions": [str], "keys": [str]}; CachedSamples ->
    {"t5": (B, L, D_t5), "clip": (B, D_clip), "moments": (B, 2C, h, w), "captions", "keys"}."""
    if isinstance(samples[0], CachedSample):
        tensors = {name: torch.stack([getattr(s, name) for s in samples]) for name in TENSORS}
    else:
        tensors = {"images": torch.stack([s.image for s in samples])}
    return {**tensors, "captions": [s.caption for s in samples], "keys": [s.key for s in samples]}


class CaptionedImageLoader(StatefulDataLoader, BaseDataLoader):
    """StatefulDataLoader over CaptionedImages, checkpointed per data-parallel rank."""

    def __init__(
        self,
        source: str,
        img_size: int,
        batch_size: int,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        seed: int = 0,
        path: str | Path | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
    ):
        self.dataset = CaptionedImages(source, img_size, dp_rank, dp_world_size, seed, path)
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        super().__init__(
            self.dataset,
            batch_size=batch_size,
            collate_fn=collate,
            num_workers=num_workers,
            pin_memory=pin_memory,  # so the trainer's copies to the GPU need not wait
            persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None,
        )

    _load_key: str | None = None  # set by expect_saved_ranks before a checkpoint is loaded

    def state_dict(self) -> dict[str, Any]:
        # Keyed by rank: DCP stores one entry per data-parallel rank.
        if self._load_key is not None:  # the request of a load: the entry this rank reads
            return {self._load_key: b""}
        return {f"dp_rank_{self.dp_rank}": pickle.dumps(super().state_dict())}

    def expect_saved_ranks(self, saved_keys: list[str]) -> None:
        """The checkpoint about to be loaded holds these entries (dp_rank_N). A rank reads
        its own; on a resume with more data-parallel ranks than saved, a new rank reads
        rank 0's, and the dataset continues from the same global position."""
        own = f"dp_rank_{self.dp_rank}"
        self._load_key = own if own in saved_keys or not saved_keys else "dp_rank_0"

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._load_key = None
        own = f"dp_rank_{self.dp_rank}"
        key = own if own in state_dict else "dp_rank_0"
        if state_dict.get(key):
            super().load_state_dict(pickle.loads(state_dict[key]))
