"""The global order of samples, the same whatever the number of ranks and workers reading it.

A data set is read as S logical streams (S: training.data_streams, or the data-parallel
degree × dataloader workers of the run's first start; checkpoints keep it). Stream k is a
fixed sequence of records given the seed, epoch after epoch; its unusable records are
skipped, so it is a fixed sequence of samples. Global sample j is the next sample of stream
j mod S. Data-parallel rank r of W (W divides S) takes the samples j ≡ r (mod W): its
streams r, r + W, r + 2W, ... in turn (flux.data.dataset); a rank's dataloader workers
split its streams among them.

Shard sources (ShardStream): each epoch puts the shards in a seeded order; stream k takes
shards k, k + S, k + 2S, ... of it, or, with fewer shards than streams, a share of one
shard's records (every m-th, where m streams share it). It reads `shards_open` of its shards
at once, each next record from one of them drawn at random (a hash of the seed, stream,
epoch and draw count), so consecutive samples come from different shards.
Indexed sources (IndexedStream): stream k takes positions k, k + S, ... of the epochs'
seeded orders of the source's samples, one after another.

A stream's position after a sample is small and plain (JSON: ints and lists): a resume on
any W that divides S gives each stream to its new rank with that position. So is a sample's
reference (`last_ref` after it is yielded): what reads that one sample again (reread), for
samples taken but not yet trained on (a partly filled aspect bucket) when a checkpoint is
saved.
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from flux.data.shards import Record, Shard, ShardProblem, read_records
from flux.data.skips import BadSample, Skip

EMPTY_LIMIT = 64  # a stream with this many shards in a row without a usable record stops the run

Position = dict[str, Any]
Ref = list[int]  # one sample: [index] of an indexed source, [shard, record, offset] of shards


class DataError(ValueError):
    """The data cannot feed the run (too small for its readers, nothing usable); the message
    says what to do, in one line."""


def check_enough_records(counts: list[int], streams: int, location: str) -> None:
    """Refuse, in one line and on every rank alike, shards too small to give every stream
    a record. With N shards for S streams, stream k takes every m-th record of a shard
    from record k // N on, so the last stream needs a shard of more than (S - 1) // N."""
    needed = (streams - 1) // len(counts) + 1
    if max(counts) >= needed:
        return
    raise DataError(
        f"dataset {location} is too small for {streams} readers: {sum(counts)} records in "
        f"{len(counts)} shards, at most {max(counts)} in one, where each of {streams} streams "
        f"(data-parallel ranks × dataloader workers, or training.data_streams) needs a shard "
        f"of {needed} or more; use fewer ranks or workers, or more data"
    )


def shard_order(seed: int, epoch: int, count: int) -> list[int]:
    """The shards' order in an epoch: the same on every rank."""
    order = list(range(count))
    random.Random(f"shards {seed} {epoch}").shuffle(order)
    return order


def draw(seed: int, stream: int, epoch: int, count: int, choices: int) -> int:
    """Draw number `count` of a stream in an epoch, in [0, choices): a hash, so a resume
    needs only the count."""
    digest = hashlib.blake2b(struct.pack("<4q", seed, stream, epoch, count), digest_size=8)
    return int.from_bytes(digest.digest(), "little") % choices


@dataclass
class OpenShard:
    """A piece (shard, or share of one) a stream is reading, and how far it is."""

    piece: int  # index into the stream's pieces of the epoch
    records: int  # records of the shard read (the next one's index)
    offset: int  # byte offset of the next record
    usable: int = 0  # usable records it gave
    seen: int = 0  # records of this stream it gave, usable or not


class ShardStream:
    """Stream `stream` of `streams` over shards (see the module docstring)."""

    def __init__(
        self,
        shards: list[Shard],
        stream: int,
        streams: int,
        seed: int,
        shards_open: int,
        position: Position | None = None,
        location: str = "",
    ):
        self.shards, self.stream, self.streams = shards, stream, streams
        self.seed, self.shards_open, self.location = seed, shards_open, location
        p = position or {}
        self.epoch: int = p.get("epoch", 0)
        self.next_piece: int = p.get("next_piece", 0)  # pieces of the epoch opened so far
        self.open = [OpenShard(*o) for o in p.get("open", [])]  # in draw order
        self.draws: int = p.get("draws", 0)  # draws made in the epoch
        self.empty: int = p.get("empty", 0)  # pieces in a row without a usable record
        self.empty_seen: int = p.get("empty_seen", 0)  # the records those pieces held
        self.latest_skip = ""
        self.last_ref: Ref = []  # the latest sample's: [shard, record index, byte offset]

    def position(self) -> Position:
        return {
            "epoch": self.epoch,
            "next_piece": self.next_piece,
            "open": [[o.piece, o.records, o.offset, o.usable, o.seen] for o in self.open],
            "draws": self.draws,
            "empty": self.empty,
            "empty_seen": self.empty_seen,
        }

    def pieces(self, epoch: int) -> list[tuple[int, int, int]]:
        """(shard, part, parts) this stream reads in an epoch: whole shards (part 0 of 1), or
        with fewer shards than streams, records i ≡ part (mod parts) of one shard."""
        count = len(self.shards)
        order = shard_order(self.seed, epoch, count)
        if count >= self.streams:
            return [(order[i], 0, 1) for i in range(self.stream, count, self.streams)]
        first = self.stream % count
        return [(order[first], self.stream // count, len(range(first, self.streams, count)))]

    def items(
        self, decode: Callable[[Shard, Record], Any], once: bool = False
    ) -> Iterator[Any | Skip]:
        """Samples (what decode returns) and Skips, forever (once: to the epoch's end). The
        position is that after the item just yielded."""
        readers: dict[int, Iterator[Record]] = {}
        try:
            while True:
                pieces = self.pieces(self.epoch)
                while self.open or self.next_piece < len(pieces):
                    while len(self.open) < self.shards_open and self.next_piece < len(pieces):
                        self.open.append(OpenShard(self.next_piece, 0, 0))
                        self.next_piece += 1
                    choice = draw(self.seed, self.stream, self.epoch, self.draws, len(self.open))
                    self.draws += 1
                    current = self.open[choice]
                    shard_index, part, parts = pieces[current.piece]
                    shard = self.shards[shard_index]
                    if current.piece not in readers:
                        readers[current.piece] = read_records(
                            shard, current.records, current.offset, _share(part, parts)
                        )
                    try:
                        record = next(readers[current.piece])
                    except (StopIteration, ShardProblem) as end:
                        del readers[current.piece]
                        self.open.pop(choice)
                        if isinstance(end, ShardProblem) and part == 0:
                            yield Skip(end.kind, shard.name, end.detail)
                        self._done(current, once)
                        continue
                    current.records, current.offset = record.index + 1, record.end
                    current.seen += 1
                    try:
                        sample = decode(shard, record)
                    except BadSample as e:
                        if not record.cut:  # a record cut off is the truncation's, not its own
                            skip = Skip(e.kind, f"{shard.name}:{record.key}", e.detail)
                            self.latest_skip = str(skip)
                            yield skip
                        continue
                    current.usable += 1
                    self.last_ref = [shard_index, record.index, record.start]
                    yield sample
                if once:
                    return
                self.epoch, self.next_piece, self.draws = self.epoch + 1, 0, 0
        finally:
            for reader in readers.values():
                reader.close()  # type: ignore[attr-defined]

    def _done(self, piece: OpenShard, once: bool) -> None:
        """A piece is read: stop the run if this stream finds nothing usable, ever."""
        if piece.usable:
            self.empty = self.empty_seen = 0
            return
        self.empty += 1
        self.empty_seen += piece.seen
        if self.empty < EMPTY_LIMIT or once:
            return
        count = len(self.shards)
        if self.empty_seen == 0:
            raise DataError(
                f"dataset {self.location} is too small for {self.streams} readers: stream "
                f"{self.stream} found no record in its part of {self.empty} shards in a row "
                f"({count} shards for {self.streams} streams: data-parallel ranks × dataloader "
                "workers, or training.data_streams); use fewer ranks or workers, or more data"
            )
        raise DataError(
            f"no usable sample in {self.location}: stream {self.stream} read {self.empty} "
            f"shards in a row whose {self.empty_seen} records were all skipped (latest: "
            f"{self.latest_skip})"
        )


def _share(part: int, parts: int) -> Callable[[int], bool] | None:
    if parts == 1:
        return None
    return lambda index: index % parts == part


class IndexedStream:
    """Stream `stream` of `streams` over an indexed source of `size` samples (None:
    unbounded): positions stream, stream + streams, ... of the global order, where epoch e is
    the e-th seeded shuffle of the samples (unbounded: the indices themselves)."""

    def __init__(
        self,
        stream: int,
        streams: int,
        size: int | None,
        seed: int,
        position: Position | None = None,
    ):
        self.stream, self.streams, self.size, self.seed = stream, streams, size, seed
        self.next: int = (position or {}).get("next", 0)  # this stream's positions read
        self._order: tuple[int, list[int]] = (-1, [])
        self.last_ref: Ref = []  # the latest sample's: [index]

    def position(self) -> Position:
        return {"next": self.next}

    def index(self, global_position: int) -> int:
        """The source index at a position of the global order."""
        if self.size is None:
            return global_position
        epoch, offset = divmod(global_position, self.size)
        if self._order[0] != epoch:
            order = list(range(self.size))
            random.Random(self.seed * 7919 + epoch).shuffle(order)
            self._order = (epoch, order)
        return self._order[1][offset]

    def items(
        self,
        load: Callable[[int], Any],
        where: Callable[[int], str],
        once: bool = False,
        stuck: Callable[[], None] = lambda: None,
    ) -> Iterator[Any | Skip]:
        """Samples (what load returns) and Skips, forever (once: to the end of the first
        epoch). After a whole epoch's worth of skips in a row, calls `stuck` (which raises
        if nothing is usable)."""
        bad = 0
        while True:
            global_position = self.stream + self.next * self.streams
            if once and self.size is not None and global_position >= self.size:
                return
            index = self.index(global_position)
            self.next += 1
            try:
                sample = load(index)
            except BadSample as e:
                yield Skip(e.kind, where(index), e.detail)
                bad += 1
                if bad >= (self.size or 1):
                    stuck()
                    bad = 0
                continue
            bad = 0
            self.last_ref = [index]
            yield sample
