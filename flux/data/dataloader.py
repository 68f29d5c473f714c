"""Batches of captioned images for one data-parallel rank, with resumable state.

Workers (`[training.dataloader] num_workers`) read and decode; each hands on one sample at a
time with its stream's position (flux.data.dataset.Item), in the rank's turn order, and the
training process stacks them into batches of uint8 images (pinned with `pin_memory`, for a
non-blocking copy to the device). The state is what the training process has taken, so it
does not depend on how far the workers have read ahead, nor on their number.

Checkpoints hold one entry per data-parallel rank (`dp_rank_N`: that rank's state). Before a
load, the checkpoint code tells the loader which entries the checkpoint holds
(expect_saved_ranks); the loader then asks for those that hold the streams it reads now
(one on the same number of ranks; several, or one shared with other ranks, on another), and
load_state_dict receives them.
"""

from __future__ import annotations

import math
import pickle
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchtitan.components.dataloader import BaseDataLoader
from torchtitan.tools.logging import logger

from flux.data.dataset import STATE_FORMAT, CaptionedImages, Item, merge_states
from flux.data.precomputed import TENSORS, CachedSample

ENTRY = "dp_rank_"


def collate(samples: list[Any], pin_memory: bool = False) -> dict[str, Any]:
    """Samples -> {"images": (B, 3, H, W) uint8, "captions": [str], "keys": [str]};
    CachedSamples -> {"t5": (B, L, D_t5), "clip": (B, D_clip), "moments": (B, 2C, h, w),
    "captions", "keys"}. With pin_memory, the tensors are stacked into pinned memory."""
    if isinstance(samples[0], CachedSample):
        tensors = {name: stack([getattr(s, name) for s in samples], pin_memory) for name in TENSORS}
    else:
        tensors = {"images": stack([s.image for s in samples], pin_memory)}
    return {**tensors, "captions": [s.caption for s in samples], "keys": [s.key for s in samples]}


def stack(parts: list[torch.Tensor], pin_memory: bool) -> torch.Tensor:
    """torch.stack, into pinned memory if asked; uint8 images through numpy (torch's copy may
    wait on intra-op threads, tens of times slower on a busy machine)."""
    shape = (len(parts), *parts[0].shape)
    out = torch.empty(shape, dtype=parts[0].dtype, pin_memory=pin_memory)
    if out.dtype == torch.uint8:
        np.stack([p.numpy() for p in parts], out=out.numpy())
    else:
        torch.stack(parts, out=out)
    return out


def _worker_init(worker_id: int) -> None:
    """A stop signal is the training process's to act on (it finishes its step and saves a
    checkpoint); SLURM sends SIGUSR1 and SIGTERM to every process of a job, and they would
    kill a worker mid-step. Workers end with the training process's iterator."""
    for stop in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(stop, signal.SIG_IGN)


class _WorkerItems(IterableDataset):
    """What each dataloader worker reads: its part of the rank's items."""

    def __init__(self, dataset: CaptionedImages):
        self.dataset = dataset

    def __iter__(self) -> Iterator[Item]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.dataset.items(worker, workers)


class CaptionedImageLoader(BaseDataLoader):
    """Endless batches of one data-parallel rank's samples, checkpointed per rank.

    The data set is read as `data_streams` streams (0: dp_world_size × max(1, num_workers));
    a loaded state brings its own. prefetch_factor counts batches per worker, as torch's
    does. Iterating is one endless pass: its workers live as long as the iterator, with or
    without persistent_workers (which matters only to an iterator made anew).
    """

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
        prefetch_factor: int | None = None,
        persistent_workers: bool = False,
        shards_open: int = 8,
        data_streams: int = 0,
    ):
        if num_workers < 0 or (prefetch_factor is not None and prefetch_factor < 1):
            raise ValueError(
                f"training.dataloader num_workers {num_workers}, prefetch_factor "
                f"{prefetch_factor}: use num_workers >= 0 and prefetch_factor >= 1"
            )
        streams = data_streams or dp_world_size * max(1, num_workers)
        self.dataset = CaptionedImages(
            source, img_size, dp_rank, dp_world_size, seed, path,
            streams=streams, shards_open=shards_open,
        )  # fmt: skip
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.batch_size, self.num_workers = batch_size, num_workers
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.prefetch_factor = prefetch_factor or 2
        self.persistent_workers = persistent_workers
        self._load_keys: list[str] | None = None  # set by expect_saved_ranks before a load

    def workers(self) -> int:
        """The workers this rank runs: num_workers, or fewer to divide the rank's streams
        (each worker owns some of them)."""
        if self.num_workers == 0:
            return 0
        local = len(self.dataset.rank_streams())
        workers = max(d for d in range(1, local + 1) if local % d == 0 and d <= self.num_workers)
        if workers != self.num_workers and self.dp_rank == 0:
            logger.warning(
                f"dataloader: {workers} workers instead of {self.num_workers}, which do not "
                f"divide this rank's {local} data streams (set training.data_streams to a "
                "multiple of data-parallel degree × num_workers at the start of a run)"
            )
        return workers

    def _items(self) -> Iterator[Item]:
        workers = self.workers()
        if workers == 0:
            return self.dataset.items()
        loader = DataLoader(
            _WorkerItems(self.dataset),
            batch_size=None,  # items come one by one, in turn order; batches are made here
            num_workers=workers,
            prefetch_factor=math.ceil(self.prefetch_factor * self.batch_size / workers),
            persistent_workers=self.persistent_workers,
            worker_init_fn=_worker_init,
        )
        return iter(loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        items = self._items()
        while True:
            samples = []
            for item in items:
                self.dataset.take(item)
                if item.sample is not None:
                    samples.append(item.sample)
                    if len(samples) == self.batch_size:
                        break
            if not samples:
                return
            yield collate(samples, self.pin_memory)

    # -- checkpoint -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """{"dp_rank_N": this rank's state}; while a load is being prepared, the entries
        this rank asks for (empty values that the load fills in)."""
        if self._load_keys is not None:
            return {key: b"" for key in self._load_keys}
        return {f"{ENTRY}{self.dp_rank}": pickle.dumps(self.dataset.state_dict())}

    def expect_saved_ranks(self, saved_keys: list[str]) -> None:
        """The checkpoint about to be loaded holds these entries (dp_rank_N, one for each
        data-parallel rank of the run that saved it). Ask for those whose streams this rank
        reads now: on W' ranks after W, rank r reads the streams k ≡ r (mod W'), which rank
        k mod W saved, i.e. the saved ranks a ≡ r (mod gcd(W, W'))."""
        saved = sorted(int(k[len(ENTRY) :]) for k in saved_keys if k.startswith(ENTRY))
        if not saved:
            self._load_keys = [f"{ENTRY}{self.dp_rank}"]
            return
        step = math.gcd(len(saved), self.dp_world_size)
        self._load_keys = [f"{ENTRY}{a}" for a in saved if a % step == self.dp_rank % step]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The entries asked for (or this rank's own, without expect_saved_ranks)."""
        self._load_keys = None
        states = [pickle.loads(v) for _, v in sorted(state_dict.items()) if v]
        if not states:
            return
        if not all(isinstance(s, dict) and s.get("format") == STATE_FORMAT for s in states):
            logger.warning(
                "the checkpoint's data loader state was written by an earlier version of "
                "flux: the data starts from the beginning"
            )
            return
        self.dataset.load_state_dict(merge_states(states))
