"""The training dataset: captioned images from a source, read by data-parallel rank as parts
of one global order (flux.data.streams), with a state that torchtitan's checkpoint saves so a
resumed run continues exactly, on the same or another number of ranks and workers.

Sources: indexed (`shapes`, `imagefolder`, `precomputed`: sample i of a known set) and
sharded (`webdataset`: .tar shards in a local folder or at an fsspec URL; `cc12m-wds`: the
shards of a hub data set). `precomputed` (precomputed.py) yields CachedSamples, the
encoders' outputs, instead of images.

Rank r of W reads its streams r, r + W, ... in turn. A reader (the training process, or
each of the rank's dataloader workers, which split its streams) hands on Items: a sample,
its stream's position after it, its reference (what reads it again), and what was skipped
on the way. The rank's CaptionedImages in the training process takes them in order (take),
so its positions, counts and skip log are exactly what the training step has consumed,
whatever the workers have read ahead.

Images are fitted to buckets (flux.data.buckets): one square, or aspect buckets. Samples
taken but waiting in a partly filled bucket (flux.data.dataloader) are `pending`: the state
keeps their references, and a resumed run reads them again (reread), on the rank that reads
their stream then.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torchtitan.tools.logging import logger

from flux.data.buckets import Buckets, TooSmall
from flux.data.imagefolder import list_images, load_pair
from flux.data.precomputed import UNREADABLE, CachedSample, CacheError, PrecomputedCache
from flux.data.shapes import shapes_sample
from flux.data.shards import (
    Record,
    Shard,
    count_records,
    decode_record,
    list_shards,
    read_records,
    shard_location,
    shards_digest,
)
from flux.data.skips import IMAGE_TOO_SMALL, UNDECODABLE_IMAGE, BadSample, Skip, SkipLog
from flux.data.streams import (
    DataError,
    IndexedStream,
    Position,
    Ref,
    ShardStream,
    check_enough_records,
)
from flux.data.transforms import image_to_tensor

SOURCES = ("shapes", "imagefolder", "webdataset", "cc12m-wds", "precomputed")
PATH_SOURCES = ("imagefolder", "webdataset", "precomputed")  # need dataset_path
SHARDED = ("webdataset", "cc12m-wds")
STATE_FORMAT = "flux-streams/1"
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
    image: torch.Tensor  # (3, H, W) uint8
    caption: str
    key: str  # where the sample came from: "17" (index), a path, or "shard.tar:KEY"

    # From a dataloader worker, the image crosses in the pipe as bytes: a shared-memory
    # segment per image (how torch sends tensors) costs more than copying it.
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "image": self.image.numpy()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, image=torch.from_numpy(state["image"]))


@dataclass
class Item:
    """What a reader hands on: one sample of stream `stream` and the stream's position after
    it, with what was skipped since its previous item; or (sample None) the skips at the end
    of a single pass, or an error that stops the run."""

    sample: Sample | CachedSample | None
    stream: int = -1
    position: Position | None = None
    skips: list[Skip] = field(default_factory=list)
    error: str | None = None
    ref: Ref = field(default_factory=list)  # what reads the sample again (reread)


class CaptionedImages(Stateful):
    """The samples of one data-parallel rank, endlessly (Samples, or CachedSamples for
    `precomputed`), with their positions, skip counts and state. Images are fitted to
    `buckets` (default: the img_size × img_size square)."""

    def __init__(
        self,
        source: str,
        img_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        path: str | Path | None = None,
        report_every_s: float = 60.0,
        streams: int = 0,
        shards_open: int = 8,
        buckets: Buckets | None = None,
    ):
        if source not in SOURCES:
            raise ValueError(f"unknown dataset {source!r}: choose one of {', '.join(SOURCES)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside the world of {world_size}")
        if source in PATH_SOURCES and path is None:
            raise ValueError(f"dataset {source!r} needs dataset_path: the folder of its files")
        if shards_open < 1:
            raise ValueError(f"training.shards_open = {shards_open}: use 1 or more")
        self.source, self.img_size, self.seed = source, img_size, seed
        self.buckets = buckets or Buckets.square(img_size)
        self.rank, self.world_size = rank, world_size
        self.streams = streams or world_size
        check_streams(self.streams, world_size)
        self.shards_open = shards_open
        self.path = Path(path) if path is not None and "://" not in str(path) else path
        self.files = list_images(path) if source == "imagefolder" else []  # type: ignore[arg-type]
        self.cache = PrecomputedCache(path) if source == "precomputed" else None  # type: ignore[arg-type]
        self.location = shard_location(source, path) if source in SHARDED else ""
        self.shards: list[Shard] = list_shards(self.location) if self.location else []
        if self.shards and len(self.shards) < self.streams and "://" not in self.location:
            # Shards shared among streams: are they large enough for all? (Local shards
            # are counted from their headers; remote ones would be downloaded whole.)
            counts = [count_records(shard) for shard in self.shards]
            check_enough_records(counts, self.streams, self.location)
        self.positions: dict[int, Position] = {}  # stream -> after its last sample taken
        self.consumed = 0  # samples this rank has taken (its turn among its streams)
        self.taken: dict[int, int] = {}  # stream -> its samples taken
        self.skips = SkipLog(report_every_s)
        self._shard_problems: set[tuple[str, str]] = set()  # logged once each
        # (stream, ref) of samples taken but not yet trained on, in the order taken: the
        # loader keeps it current; a loaded state sets it to those of this rank's streams
        self.pending: list[tuple[int, Ref]] = []

    @property
    def streamed(self) -> bool:
        """A sharded source (read front to back), rather than an indexed one."""
        return bool(self.shards)

    @property
    def skipped(self) -> Any:  # Counter[str]: kind -> count
        return self.skips.counts

    @property
    def skip_examples(self) -> Any:  # the latest "where: kind: detail"
        return self.skips.examples

    # -- indexed sources ------------------------------------------------------------------
    def size(self) -> int | None:
        """Samples of an indexed source in one epoch; None for shapes (unbounded) and shards."""
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
        BadSample for an unusable one."""
        if self.cache is not None:
            try:
                return self.cache[index]
            except CacheError as e:  # its shard went bad after start-up: its samples are lost
                raise BadSample(UNREADABLE, str(e).removeprefix(f"{UNREADABLE}: ")) from e
        if self.files:
            image, caption = load_pair(self.files[index], self.buckets)
        else:
            image, caption = shapes_sample(self.seed, index, self.img_size)
        return Sample(self._tensor(image), caption, self.key(index))

    def _tensor(self, image: Any) -> torch.Tensor:
        try:
            return image_to_tensor(image, self.buckets)
        except TooSmall as e:
            raise BadSample(IMAGE_TOO_SMALL, str(e)) from e
        except ValueError as e:
            raise BadSample(UNDECODABLE_IMAGE, str(e)) from e

    def _decode(self, shard: Shard, record: Record) -> Sample:
        image, caption = decode_record(record.files, self.buckets)
        return Sample(self._tensor(image), caption, f"{shard.name}:{record.key}")

    def reread(self, ref: Ref) -> Sample | CachedSample:
        """The sample a reference names (Item.ref), read again; raises BadSample if it
        cannot be read now."""
        if not self.shards:
            return self.sample(ref[0])
        shard_index, index, offset = ref
        shard = self.shards[shard_index]
        records = read_records(shard, index, offset)
        try:
            record = next(records, None)
        except Exception as e:  # ShardProblem, or the file is gone
            raise BadSample(UNDECODABLE_IMAGE, f"{shard.name} record {index}: {e}") from e
        finally:
            records.close()  # type: ignore[attr-defined]
        if record is None or record.index != index:
            raise BadSample(UNDECODABLE_IMAGE, f"{shard.name} has no record {index} now")
        return self._decode(shard, record)

    def _check_some_sample_is_usable(self) -> None:
        """Fail (naming the path) when an indexed source has no usable sample at all."""
        for file in self.files:
            try:
                self._tensor(load_pair(file, self.buckets)[0])
                return
            except BadSample:
                continue
        raise DataError(
            f"no usable sample in {self.path or self.source}: every sample was skipped "
            f"(latest: {self.skip_examples[-1] if self.skip_examples else 'none'})"
        )

    # -- streams --------------------------------------------------------------------------
    def rank_streams(self) -> list[int]:
        """The streams this rank reads, in the order it takes its samples from them."""
        return list(range(self.rank, self.streams, self.world_size))

    def _stream_items(self, stream: int, once: bool) -> Iterator[tuple[Any, Position, Ref]]:
        """(sample or Skip, the stream's position after it, the sample's reference)."""
        position = self.positions.get(stream)
        if self.shards:
            s = ShardStream(
                self.shards, stream, self.streams, self.seed, self.shards_open, position,
                self.location,
            )  # fmt: skip
            for thing in s.items(self._decode, once):
                yield thing, s.position(), s.last_ref
        else:
            i = IndexedStream(stream, self.streams, self.size(), self.seed, position)
            for thing in i.items(self.sample, self.key, once, self._check_some_sample_is_usable):
                yield thing, i.position(), i.last_ref

    def items(self, worker: int = 0, workers: int = 1, once: bool = False) -> Iterator[Item]:
        """Worker `worker` of `workers`' part of this rank's samples, from the current state:
        the rank's turns c + worker, c + worker + workers, ... (c = samples taken so far)
        fall on streams this worker owns, since `workers` divides the rank's streams. Each
        Item holds one sample (once: until every stream ends its epoch)."""
        local = self.rank_streams()
        if len(local) % workers:
            raise ValueError(f"{workers} workers do not divide the {len(local)} streams of a rank")
        turns = [(self.consumed + worker + t * workers) % len(local) for t in range(len(local))]
        turns = list(dict.fromkeys(turns))  # the streams this worker owns, in turn order
        readers = {q: self._stream_items(local[q], once) for q in turns}
        skips: list[Skip] = []
        try:
            while turns:
                for q in list(turns):
                    for thing, position, ref in readers[q]:
                        if isinstance(thing, Skip):
                            skips.append(thing)
                            continue
                        yield Item(thing, local[q], position, skips, ref=ref)
                        skips = []
                        break
                    else:
                        turns.remove(q)  # once: the stream's epoch has ended
            if skips:
                yield Item(None, skips=skips)
        except DataError as e:
            yield Item(None, skips=skips, error=str(e))

    def take(self, item: Item) -> None:
        """Account for an item handed to the training step: its stream's position, the
        turn, its skips (counted; a shard's problem also logged, once per shard)."""
        for skip in item.skips:
            if skip.of_shard:
                if (skip.where, skip.kind) in self._shard_problems:
                    continue
                self._shard_problems.add((skip.where, skip.kind))
                logger.warning(f"dataset {self.source} (rank {self.rank}): {skip}")
            self.skips.add(skip)
        if item.error is not None:
            raise DataError(item.error)
        if item.sample is not None:
            self.positions[item.stream] = item.position  # type: ignore[assignment]
            self.consumed += 1
            self.taken[item.stream] = self.taken.get(item.stream, 0) + 1
        if self.skips.due():
            logger.warning(f"dataset {self.source} (rank {self.rank}): {self.skip_report()}")

    def __iter__(self) -> Iterator[Sample | CachedSample]:
        """This rank's samples, read in this process."""
        yield from self._taken(self.items())

    def one_pass(self) -> Iterator[Sample | CachedSample]:
        """A sharded source's samples from the current state to the end of each stream's
        epoch (what precompute reads; indexed sources are read with `sample`)."""
        yield from self._taken(self.items(once=True))

    def _taken(self, items: Iterator[Item]) -> Iterator[Sample | CachedSample]:
        for item in items:
            self.take(item)
            if item.sample is not None:
                yield item.sample

    def skip_report(self) -> str:
        """One line for the log: what was skipped so far, and where, most recent last."""
        return self.skips.report()

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's part of the global state: its streams' positions (None: not started),
        its turn, and its pending samples' references. Plain values (precompute keeps it in
        JSON)."""
        return {
            "format": STATE_FORMAT,
            "streams": self.streams,
            "world_size": self.world_size,
            "consumed": self.consumed,
            "taken": {str(k): self.taken.get(k, 0) for k in self.rank_streams()},
            "positions": {str(k): self.positions.get(k) for k in self.rank_streams()},
            "shards": shards_digest(self.shards) if self.shards else None,
            "pending": [[stream, ref] for stream, ref in self.pending],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from a state: one rank's (state_dict), or several merged (merge_states)
        that hold every stream this rank reads now."""
        state = state_dict
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a {STATE_FORMAT} data state: {sorted(state)}")
        streams, taken = state["streams"], state["consumed"] * state["world_size"]
        pending = [(int(stream), list(ref)) for stream, ref in state.get("pending", [])]
        counts = state.get("taken") or balanced_counts(state)
        if streams % self.world_size:
            if not self.shards:
                self._continue_after(taken)
                # an index reads the same on any rank: ranks that loaded the same saved
                # states share their pending samples in turn
                g = math.gcd(state["world_size"], self.world_size)
                sharing = self.world_size // g
                self.pending = [p for j, p in enumerate(pending) if j % sharing == self.rank // g]
                return
            raise DataError(
                f"the {self.source} data was read as {streams} streams (training.data_streams, "
                f"kept in the checkpoint), which {self.world_size} data-parallel ranks do not "
                f"divide: resume on a data-parallel degree among {divisors(streams)}"
            )
        if self.streams != streams:
            logger.info(f"dataset {self.source}: reading it as {streams} streams, as saved")
        self.streams = streams
        positions = state["positions"]
        missing = [k for k in self.rank_streams() if str(k) not in positions]
        if missing:
            raise ValueError(f"the data state lacks streams {missing} of rank {self.rank}")
        self.positions = {k: positions[str(k)] for k in self.rank_streams() if positions[str(k)]}
        self.taken = {k: counts[str(k)] for k in self.rank_streams()}
        # Its turn: the stream whose next sample comes first in the global order (stream k's
        # n-th sample is global sample k + n·S). Ranks that took unequal numbers of samples
        # (aspect buckets fill at their own pace) resume each stream where it was.
        local = self.rank_streams()
        self.consumed = min(range(len(local)), key=lambda q: self.taken[local[q]] * streams + q)
        mine = set(self.rank_streams())
        self.pending = [(stream, ref) for stream, ref in pending if stream in mine]
        if self.shards and state["shards"] != shards_digest(self.shards):
            logger.warning(
                f"dataset {self.source}: the shards under {self.location} are not those the "
                "checkpoint read (names or sizes differ): the data starts again from the "
                "beginning of the epoch order"
            )
            self.positions, self.pending = {}, []

    def _continue_after(self, taken: int) -> None:
        """An indexed source on a number of ranks that does not divide its saved streams:
        this run's streams start at the first global position not taken (nothing is read
        twice; samples the saved streams had read past it are left out)."""
        logger.warning(
            f"dataset {self.source}: resuming on {self.world_size} data-parallel ranks, which "
            f"do not divide the saved streams: continuing after global sample {taken}"
        )
        self.consumed = 0
        self.positions = {
            k: {"next": max(0, math.ceil((taken - k) / self.streams))} for k in self.rank_streams()
        }


def balanced_counts(state: dict[str, Any]) -> dict[str, int]:
    """Samples taken per stream in a state without them (written before they were kept):
    its ranks had taken equal numbers, each of its streams in turn."""
    world, streams, consumed = state["world_size"], state["streams"], state["consumed"]
    counts = {}
    for k in range(streams):
        q, local = k // world, streams // world  # k is stream q of its rank's `local`
        counts[str(k)] = consumed // local + (q < consumed % local)
    return counts


def check_streams(streams: int, world_size: int) -> None:
    if streams < 1 or streams % world_size:
        raise DataError(
            f"training.data_streams = {streams}: use a multiple of the data-parallel degree "
            f"({world_size}), or 0 (that degree × dataloader workers)"
        )


def divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One state from those of several ranks of the same step (their streams together)."""
    first = states[0]
    for state in states[1:]:
        for key in ("format", "streams", "world_size", "shards"):
            if state.get(key) != first.get(key):
                raise ValueError(
                    f"data states of one checkpoint differ in {key}: {state.get(key)} and "
                    f"{first.get(key)}"
                )
    positions: dict[str, Any] = {}
    taken: dict[str, int] = {}
    pending: list[Any] = []
    for state in states:
        positions.update(state["positions"])
        taken.update(state.get("taken") or balanced_counts(state))
        pending += state.get("pending", [])
    consumed = max(state["consumed"] for state in states)  # ranks' counts differ with buckets
    return {
        **first,
        "consumed": consumed,
        "positions": positions,
        "taken": taken,
        "pending": pending,
    }
