"""Collectives a rank runs in a step: which, over which group, how many bytes.

CommCounter sees the collective ops themselves (FSDP's c10d all-gathers and reduce-scatters,
HSDP's all-reduces, the functional collectives of tensor and context parallelism), on fake
and real process groups alike, and names each group by its mesh dimension. A collective's
size is the buffer it fills or reduces: the gathered output of an all-gather, the input of
a reduce-scatter, the tensor of an all-reduce. What a rank sends or receives for it over
the wire, in the ring algorithms NCCL uses, is `wire_bytes`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from flux.plan.local_ops import LocalOpsMode

c10d = torch.ops.c10d
funcol = torch.ops._c10d_functional
funcol_autograd = torch.ops._c10d_functional_autograd

ALL_GATHER, REDUCE_SCATTER, ALL_REDUCE = "all-gather", "reduce-scatter", "all-reduce"
ALL_TO_ALL, BROADCAST = "all-to-all", "broadcast"


def _bytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_bytes(y) for y in x)
    return 0


def _pg(index: int) -> Any:
    return lambda args: dist.ProcessGroup.unbox(args[index])


def _named(index: int) -> Any:
    return lambda args: _resolve_process_group(args[index])


# op -> (kind, its size from (args, out), its process group from args)
_OPS: dict[Any, tuple[str, Any, Any]] = {
    c10d._allgather_base_.default: (ALL_GATHER, lambda a, o: _bytes(a[0]), _pg(2)),
    c10d.allgather_.default: (ALL_GATHER, lambda a, o: _bytes(a[0]), _pg(2)),
    c10d.allgather_into_tensor_coalesced_.default: (ALL_GATHER, lambda a, o: _bytes(a[0]), _pg(2)),
    c10d._reduce_scatter_base_.default: (REDUCE_SCATTER, lambda a, o: _bytes(a[1]), _pg(2)),
    c10d.reduce_scatter_.default: (REDUCE_SCATTER, lambda a, o: _bytes(a[1]), _pg(2)),
    c10d.reduce_scatter_tensor_coalesced_.default: (
        REDUCE_SCATTER,
        lambda a, o: _bytes(a[1]),
        _pg(2),
    ),
    c10d.allreduce_.default: (ALL_REDUCE, lambda a, o: _bytes(a[0]), _pg(1)),
    c10d.allreduce_coalesced_.default: (ALL_REDUCE, lambda a, o: _bytes(a[0]), _pg(1)),
    c10d.broadcast_.default: (BROADCAST, lambda a, o: _bytes(a[0]), _pg(1)),
    c10d.alltoall_base_.default: (ALL_TO_ALL, lambda a, o: _bytes(a[1]), _pg(2)),
    funcol.all_gather_into_tensor.default: (ALL_GATHER, lambda a, o: _bytes(o), _named(2)),
    funcol.all_gather_into_tensor_coalesced.default: (
        ALL_GATHER,
        lambda a, o: _bytes(o),
        _named(2),
    ),
    funcol.reduce_scatter_tensor.default: (REDUCE_SCATTER, lambda a, o: _bytes(a[0]), _named(3)),
    funcol.reduce_scatter_tensor_coalesced.default: (
        REDUCE_SCATTER,
        lambda a, o: _bytes(a[0]),
        _named(3),
    ),
    funcol.all_reduce.default: (ALL_REDUCE, lambda a, o: _bytes(a[0]), _named(2)),
    funcol.all_reduce_.default: (ALL_REDUCE, lambda a, o: _bytes(a[0]), _named(2)),
    funcol.all_reduce_coalesced.default: (ALL_REDUCE, lambda a, o: _bytes(a[0]), _named(2)),
    funcol.all_to_all_single.default: (ALL_TO_ALL, lambda a, o: _bytes(a[0]), _named(3)),
    funcol.broadcast.default: (BROADCAST, lambda a, o: _bytes(a[0]), _named(2)),
    funcol_autograd.all_gather_into_tensor.default: (ALL_GATHER, lambda a, o: _bytes(o), _named(2)),
    funcol_autograd.reduce_scatter_tensor.default: (
        REDUCE_SCATTER,
        lambda a, o: _bytes(a[0]),
        _named(3),
    ),
    funcol_autograd.all_to_all_single.default: (ALL_TO_ALL, lambda a, o: _bytes(a[0]), _named(3)),
}


def wire_bytes(kind: str, size: int, ranks: int) -> float:
    """Bytes one rank sends (and receives) for a collective of `size` bytes over `ranks`,
    in the ring algorithms: an all-reduce is a reduce-scatter then an all-gather."""
    if ranks <= 1:
        return 0.0
    share = size * (ranks - 1) / ranks
    return 2 * share if kind == ALL_REDUCE else share


@dataclass
class Traffic:
    """The collectives of one kind over one group, in a step."""

    kind: str
    group: str  # the mesh dimension: fsdp, dp_replicate, tp, cp, loss, ...
    members: tuple[int, ...]  # the global ranks of this rank's group
    by_fsdp: bool  # FSDP's own (c10d) collectives; else functional ones (TP, CP, DTensor)
    calls: int
    bytes: int  # their sizes, summed

    @property
    def ranks(self) -> int:
        return len(self.members)

    @property
    def wire_bytes(self) -> float:
        return wire_bytes(self.kind, self.bytes, self.ranks)


DATA_PARALLEL = ("fsdp", "dp_replicate")


class CommCounter(LocalOpsMode):
    """Collectives this rank runs while active, by kind and group.

    group_dims maps process-group names to the mesh dimensions they form (several, when
    dimensions have the same ranks: FSDP's and context parallelism's on 2 ranks). FSDP's
    collectives (c10d ops) are named by a data-parallel dimension, the functional ones
    tensor and context parallelism and DTensor use by another if there is one; a group of
    no dimension is named by its size."""

    def __init__(self, group_dims: Mapping[str, Sequence[str]]) -> None:
        super().__init__()
        self.group_dims = {name: list(dims) for name, dims in group_dims.items()}
        self.traffic: dict[tuple[str, str], Traffic] = {}

    def seen(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        op = _OPS.get(func)
        if op is None:
            return
        kind, size, group_of = op
        group = group_of(args)
        ranks = group.size()
        if ranks <= 1:
            return
        by_fsdp = func.namespace == "c10d"
        dims = self.group_dims.get(group.group_name, [f"{ranks} ranks"])
        preferred = [d for d in dims if (d in DATA_PARALLEL) == by_fsdp]
        name = (preferred or dims)[0]
        entry = self.traffic.get((kind, name))
        if entry is None:
            members = tuple(dist.get_process_group_ranks(group))
            entry = Traffic(kind, name, members, by_fsdp, 0, 0)
            self.traffic[(kind, name)] = entry
        entry.calls += 1
        entry.bytes += size(args, out)
