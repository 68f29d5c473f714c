"""Batches of captioned images for one data-parallel rank, with resumable state.

Workers (`[training.dataloader] num_workers`) read and decode; each hands on one sample at a
time with its stream's position (flux.data.dataset.Item), in the rank's turn order, and the
training process stacks them into batches of uint8 images (pinned with `pin_memory`, for a
non-blocking copy to the device). The state is what the training process has taken, so it
does not depend on how far the workers have read ahead, nor on their number.

A batch holds one bucket (flux.data.buckets): each sample joins its bucket's list, and a list
that reaches the batch size is the next batch. So buckets come in proportion to the data, in
an order fixed by the data's order (the seed). Samples waiting in a list are part of the
state, by reference (CaptionedImages.pending): a resumed run reads them again first. With
one bucket (square crops) nothing waits between batches.

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

from flux.data.buckets import Buckets, Size
from flux.data.dataset import STATE_FORMAT, CaptionedImages, Item, Sample, merge_states
from flux.data.precomputed import TENSORS, CachedSample
from flux.data.skips import BadSample, Skip
from flux.data.streams import Ref

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


def bucket_of(sample: Sample | CachedSample) -> Size:
    """A sample's bucket (width, height) in pixels, from its image or its latent moments
    (the autoencoder downsamples 8×)."""
    if isinstance(sample, CachedSample):
        return sample.moments.shape[2] * 8, sample.moments.shape[1] * 8
    return sample.image.shape[2], sample.image.shape[1]


def batch_bucket(batch: dict[str, Any]) -> Size:
    """A collated batch's bucket (width, height) in pixels."""
    if "moments" in batch:
        return batch["moments"].shape[3] * 8, batch["moments"].shape[2] * 8
    return batch["images"].shape[3], batch["images"].shape[2]


class BucketLists:
    """Samples taken, waiting in their bucket's list until it holds a batch."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.lists: dict[Size, list[tuple[int, Any, int, Ref]]] = {}  # (order, sample, stream, ref)
        self.count = 0  # samples added so far (their order)

    def add(self, sample: Any, stream: int, ref: Ref) -> list[Any] | None:
        """Add a sample; its bucket's batch when that is full (the list starts again)."""
        waiting = self.lists.setdefault(bucket_of(sample), [])
        waiting.append((self.count, sample, stream, ref))
        self.count += 1
        if len(waiting) < self.batch_size:
            return None
        del self.lists[bucket_of(sample)]
        return [s for _, s, _, _ in waiting]

    def pending(self) -> list[tuple[int, Ref]]:
        """(stream, ref) of the samples waiting, in the order they were taken."""
        waiting = sorted(w for lists in self.lists.values() for w in lists)
        return [(stream, ref) for _, _, stream, ref in waiting]

    def rest(self) -> Iterator[list[Any]]:
        """The partly filled lists, oldest first (at the end of a single pass)."""
        for waiting in sorted(self.lists.values(), key=lambda w: w[0][0]):
            yield [s for _, s, _, _ in waiting]
        self.lists = {}


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
        buckets: Buckets | None = None,
    ):
        if num_workers < 0 or (prefetch_factor is not None and prefetch_factor < 1):
            raise ValueError(
                f"training.dataloader num_workers {num_workers}, prefetch_factor "
                f"{prefetch_factor}: use num_workers >= 0 and prefetch_factor >= 1"
            )
        streams = data_streams or dp_world_size * max(1, num_workers)
        self.dataset = CaptionedImages(
            source, img_size, dp_rank, dp_world_size, seed, path,
            streams=streams, shards_open=shards_open, buckets=buckets,
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
        lists = BucketLists(self.batch_size)
        yield from self._pending(lists)
        for item in self._items():
            self.dataset.take(item)
            if item.sample is None:
                continue
            full = lists.add(item.sample, item.stream, item.ref)
            if full is not None:
                self.dataset.pending = lists.pending()  # the state, while the batch trains
                yield collate(full, self.pin_memory)
        for rest in lists.rest():  # a single pass's end
            self.dataset.pending = lists.pending()
            yield collate(rest, self.pin_memory)

    def _pending(self, lists: BucketLists) -> Iterator[dict[str, Any]]:
        """The samples a loaded state left waiting, read again into their lists (a list
        they fill is a batch at once: after a resume on fewer ranks, or at another size)."""
        saved = self.dataset.pending
        for i, (stream, ref) in enumerate(saved):
            try:
                sample = self.dataset.reread(ref)
            except BadSample as e:
                self.dataset.skips.add(Skip(e.kind, f"a waiting sample {ref}", e.detail))
                continue
            full = lists.add(sample, stream, ref)
            if full is not None:
                self.dataset.pending = lists.pending() + saved[i + 1 :]
                yield collate(full, self.pin_memory)
        self.dataset.pending = lists.pending()

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
