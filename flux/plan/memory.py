"""Per-rank memory of a training step: the bytes of live tensor storages, and what held them
at the peak.

MemoryTracker sees every storage an op creates (and every one FSDP resizes, which no op
does), and keeps the order in which bytes came and went. What a storage *is* is decided
after the step, from the objects that hold it then: a storage the parameters, the
gradients, the optimizer's state or a frozen encoder holds at the end is counted as such at
the peak too, whatever was running when it was made. (Labelling storages by the phase
that made them, as torch's FSDPMemTracker does, calls every tensor the optimizer step
creates "optimizer state", the global-shape tensors of DTensor's shape propagation
included: 135 GiB for flux-dev on 64 ranks, where AdamW's moments are 1.4 GiB.)
During the step the tracker only notes FSDP's buffers: storages FSDP resizes (its
unsharded parameters) and the buffers its all-gathers and reduce-scatters use.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Iterable, Mapping
from functools import partial, wraps
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from flux.plan.local_ops import LocalOpsMode
from flux.seam import untyped_storages

UNSHARDED = "unsharded parameters"  # FSDP's gathered copies, alive while a block runs
COMM = "communication buffers"  # FSDP's all-gather outputs and reduce-scatter inputs
ACTIVATIONS = "activations"  # everything else: saved activations, inputs, temporaries

c10d = torch.ops.c10d


class MemoryTracker(LocalOpsMode):
    """Live storage bytes on this rank while active; `peak` and `at_peak()` after."""

    def __init__(self) -> None:
        super().__init__()
        self._record_of: dict[int, int] = {}  # id(storage) -> record, while it lives
        self._refs: dict[int, weakref.ref] = {}
        self._bytes: list[int] = []  # record -> its bytes now
        self._events: list[tuple[int, int]] = []  # (record, change in bytes), in order
        self._tags: dict[int, str] = {}
        self.current = 0
        self.peak = 0
        self._peak_at = 0  # events[:peak_at] make the peak

    # storages
    def _record(self, st: torch.UntypedStorage) -> int:
        key = id(st)
        record = self._record_of.get(key)
        if record is not None:
            return record
        record = len(self._bytes)
        self._bytes.append(0)
        self._record_of[key] = record
        self._refs[key] = weakref.ref(st, partial(self._freed, key, record))
        self._resized(record, st.nbytes())
        return record

    def _resized(self, record: int, nbytes: int) -> None:
        change = nbytes - self._bytes[record]
        if change == 0:
            return
        self._bytes[record] = nbytes
        self._events.append((record, change))
        self.current += change
        if self.current > self.peak:
            self.peak = self.current
            self._peak_at = len(self._events)

    def _freed(self, key: int, record: int, _: object = None) -> None:
        self._record_of.pop(key, None)
        self._refs.pop(key, None)
        self._resized(record, 0)

    def track(self, tensors: Iterable[Any], tag: str | None = None) -> None:
        """Count storages that existed before the tracker (parameters, optimizer state)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                for st in untyped_storages(t):
                    record = self._record(st)
                    if tag is not None:
                        self._tags[record] = tag

    # what the rank runs
    def seen(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        if func is c10d._allgather_base_.default:
            self.track([args[0]], COMM)
        elif func is c10d._reduce_scatter_base_.default:
            self.track([args[1]], COMM)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                for st in untyped_storages(t):
                    record = self._record(st)
                    if st.nbytes() != self._bytes[record]:
                        self._resized(record, st.nbytes())

    def __enter__(self) -> MemoryTracker:
        # FSDP frees and re-allocates its unsharded parameters by resizing their storage,
        # which no dispatch mode sees.
        self._resize = original = torch.UntypedStorage.resize_

        @wraps(original)
        def resize_(st: torch.UntypedStorage, size: int) -> Any:
            result = original(st, size)
            record = self._record(st)
            self._tags.setdefault(record, UNSHARDED)
            self._resized(record, st.nbytes())
            return result

        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign, assignment]
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        torch.UntypedStorage.resize_ = self._resize  # type: ignore[method-assign]

    # after the step
    def at_peak(self, owners: Mapping[str, Iterable[Any]]) -> dict[str, int]:
        """Bytes by category at the peak. owners: category -> tensors that hold its storages
        now (parameters, gradients, optimizer state, frozen encoders); earlier categories
        win. Storages none of them hold are FSDP's buffers if tagged, else activations."""
        live: dict[int, int] = defaultdict(int)
        for record, change in self._events[: self._peak_at]:
            live[record] += change
        category: dict[int, str] = {}
        for name, tensors in owners.items():
            for t in tensors:
                if not isinstance(t, torch.Tensor):
                    continue
                for st in untyped_storages(t):
                    known = self._record_of.get(id(st))
                    if known is not None:
                        category.setdefault(known, name)
        breakdown: dict[str, int] = {name: 0 for name in owners}
        breakdown.update({UNSHARDED: 0, COMM: 0, ACTIVATIONS: 0})
        for record, nbytes in live.items():
            name = category.get(record) or self._tags.get(record) or ACTIVATIONS
            breakdown[name] += nbytes
        assert sum(breakdown.values()) == self.peak
        return breakdown
