"""FLOPs a rank runs in a step, counted op by op with torch's FLOP formulas.

The formulas are torch.utils.flop_counter's (FlopCounterMode's): matmuls, convolutions and
attention kernels. Two differences from FlopCounterMode: the counter sees each rank's
local ops (a tensor-parallel matmul counts its shard, not the global shape), and it
counts the CPU's flash-attention kernel, which the planner's fake tensors run in place
of the GPU's, with the formula of the GPU's flash attention (the same shapes and work).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.flop_counter import flop_registry

from flux.plan.local_ops import LocalOpsMode

aten = torch.ops.aten

# The CPU kernels take the GPU kernels' leading arguments (q, k, v; and grad_out first in
# backward); the formulas read only those.
FORMULAS: dict[Any, Any] = {
    **flop_registry,
    aten._scaled_dot_product_flash_attention_for_cpu: flop_registry[
        aten._scaled_dot_product_flash_attention
    ],
    aten._scaled_dot_product_flash_attention_for_cpu_backward: flop_registry[
        aten._scaled_dot_product_flash_attention_backward
    ],
}


_part = "model"


@contextmanager
def counted_as(part: str) -> Iterator[None]:
    """Count the FLOPs run inside under `part` (e.g. the frozen encoders)."""
    global _part
    saved, _part = _part, part
    try:
        yield
    finally:
        _part = saved


class FlopCounter(LocalOpsMode):
    """FLOPs of the ops this rank runs while active, by part (see counted_as)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_part: dict[str, int] = defaultdict(int)

    @property
    def flops(self) -> int:
        return sum(self.by_part.values())

    def seen(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        formula = FORMULAS.get(func._overloadpacket)
        if formula is not None:
            self.by_part[_part] += formula(*args, **kwargs, out_val=out)
