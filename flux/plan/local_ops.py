"""What one rank computes: a dispatch mode that sees the ops each rank runs on its own tensors.

Three counters of the planner (memory, FLOPs, collectives) share this base. Two things
stand between a dispatch mode and a rank's own ops when parameters are DTensors:
- A mode runs before tensor subclasses. Returning NotImplemented for a DTensor op lets
  DTensor turn it into ops on the local shards, which come back to the mode.
- To find an output's global shape, DTensor's sharding propagation runs the op once more on
  tensors of global shape. Under a FakeTensorMode it reuses that mode, so a mode below it
  would see a 12B-parameter optimizer step as if every rank held every parameter.
  `ops_of_this_rank` marks that run, and the modes skip what it does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch.distributed.tensor import DTensor
from torch.distributed.tensor._sharding_prop import ShardingPropagator
from torch.utils._python_dispatch import TorchDispatchMode

_propagating = 0  # > 0 while DTensor propagates shapes: those ops are no rank's work
_installed = 0


def propagating() -> bool:
    return _propagating > 0


@contextmanager
def ops_of_this_rank() -> Iterator[None]:
    """Mark DTensor's shape propagation so LocalOpsMode subclasses can skip it (nests)."""
    global _installed
    original = ShardingPropagator._propagate_tensor_meta_non_cached
    if _installed == 0:

        def marked(self: ShardingPropagator, op_schema: Any) -> Any:
            global _propagating
            _propagating += 1
            try:
                return original(self, op_schema)
            finally:
                _propagating -= 1

        ShardingPropagator._propagate_tensor_meta_non_cached = marked  # type: ignore[method-assign]
    _installed += 1
    try:
        yield
    finally:
        _installed -= 1
        if _installed == 0:
            ShardingPropagator._propagate_tensor_meta_non_cached = original  # type: ignore[method-assign]


class LocalOpsMode(TorchDispatchMode):
    """Calls `seen(func, args, kwargs, out)` for every op a rank runs on its own tensors."""

    def __enter__(self) -> LocalOpsMode:
        self._marking = ops_of_this_rank()
        self._marking.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._marking.__exit__(*exc)

    def seen(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        raise NotImplementedError

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if any(t is DTensor or issubclass(t, DTensor) for t in types):
            return NotImplemented
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not propagating():
            self.seen(func, args, kwargs, out)
        return out
