"""What one rank computes: a dispatch mode that sees the ops each rank runs on its own tensors.

Three counters of the planner (memory, FLOPs, collectives) share this base. Two things
stand between a dispatch mode and a rank's own ops when parameters are DTensors:
- A mode runs before tensor subclasses. Returning NotImplemented for a DTensor op lets
  DTensor turn it into ops on the local shards, which come back to the mode.
- To find an output's global shape, DTensor's sharding propagation runs the op once more on
  tensors of global shape. Under a FakeTensorMode it reuses that mode, so a mode below it
  would see a 12B-parameter optimizer step as if every rank held every parameter.
  flux.seam's `marked_sharding_propagation` marks that run, and the modes skip what it does.
"""

from __future__ import annotations

from typing import Any

from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from flux.seam import marked_sharding_propagation, propagating_shapes


class LocalOpsMode(TorchDispatchMode):
    """Calls `seen(func, args, kwargs, out)` for every op a rank runs on its own tensors."""

    def __enter__(self) -> LocalOpsMode:
        self._marking = marked_sharding_propagation()
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
        if not propagating_shapes():
            self.seen(func, args, kwargs, out)
        return out
