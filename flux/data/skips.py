"""What the readers skip, and the accounting of it: one kind of skip per cause, counted per
kind, with where each one happened.

Records (one sample) are skipped for the kinds in RECORD_KINDS; whole shards, or their rest,
for the kinds in SHARD_KINDS (each of those is also logged on its own line when it happens).
Counting happens in the training process: dataloader workers send their skips along with
the samples (flux.data.dataset.Item), so the counts cover every worker.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass

UNDECODABLE_IMAGE = "undecodable image"
MISSING_IMAGE = "missing image"
UNKNOWN_FILE_KIND = "unknown file kind"
MISSING_CAPTION = "missing caption"
EMPTY_CAPTION = "empty caption"
CAPTION_NOT_UTF8 = "caption not UTF-8"
IMAGE_TOO_SMALL = "image too small"  # for its aspect bucket (training.max_upscale)
RECORD_KINDS = (
    UNDECODABLE_IMAGE,
    MISSING_IMAGE,
    UNKNOWN_FILE_KIND,
    MISSING_CAPTION,
    EMPTY_CAPTION,
    CAPTION_NOT_UTF8,
    IMAGE_TOO_SMALL,
)

TRUNCATED_SHARD = "truncated shard"  # the records before the cut are read
NOT_A_TAR = "not a tar"
UNREADABLE_SHARD = "unreadable shard"  # I/O failed (after retries): the rest of it is lost
SHARD_KINDS = (TRUNCATED_SHARD, NOT_A_TAR, UNREADABLE_SHARD)


class BadSample(Exception):
    """A sample that cannot be used; `kind` is one of RECORD_KINDS."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind, self.detail = kind, detail


@dataclass(frozen=True)
class Skip:
    """One skipped record or shard: its kind, where (a path, or "shard.tar:KEY"), and why."""

    kind: str
    where: str
    detail: str = ""

    @property
    def of_shard(self) -> bool:
        return self.kind in SHARD_KINDS

    def __str__(self) -> str:
        return f"{self.where}: {self.kind}" + (f": {self.detail}" if self.detail else "")


class SkipLog:
    """Counts of skips by kind and the latest few, and a report at most every `every_s`."""

    def __init__(self, every_s: float = 60.0, examples: int = 8):
        self.counts: Counter[str] = Counter()  # kind -> count
        self.examples: deque[str] = deque(maxlen=examples)  # the latest "where: kind: detail"
        self.every_s = every_s
        self._reported = (0.0, 0)  # (time, records skipped) of the last report

    def add(self, skip: Skip) -> None:
        self.counts[skip.kind] += 1
        self.examples.append(str(skip))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def due(self) -> bool:
        """Whether to report now: a record was skipped since the last report (a shard's
        problem has a line of its own) and every_s has passed."""
        records = sum(n for kind, n in self.counts.items() if kind not in SHARD_KINDS)
        now = time.monotonic()
        if records > self._reported[1] and now - self._reported[0] >= self.every_s:
            self._reported = (now, records)
            return True
        return False

    def report(self) -> str:
        """One line: the counts of each kind, then the latest skips."""
        if not self.counts:
            return ""
        counts = self.counts.most_common()
        records = ", ".join(f"{n} {k}" for k, n in counts if k not in SHARD_KINDS)
        shards = ", ".join(f"{n} {k}" for k, n in counts if k in SHARD_KINDS)
        parts = [f"skipped samples: {records}" * bool(records), f"shards: {shards}" * bool(shards)]
        parts.append(f"latest: {'; '.join(self.examples)}")
        return " | ".join(p for p in parts if p)
