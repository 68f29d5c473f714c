"""An exponential moving average (EMA) of the transformer's weights, kept per shard.

Diffusion models are sampled from an average of their recent weights (the released SD- and
FLUX-class checkpoints are EMA weights). After the optimizer step of training step t, when
t >= start_step and t is a multiple of update_every, and only if the step was applied (a
non-finite step is not: flux.resilience):

    average <- decay_k · average + (1 - decay_k) · weights
    decay_k  = min(decay, (1 + k) / (10 + k))    with the warm-up (decay without it)

where k counts the updates made before this one, and update k = 0 copies the weights (as
diffusers' EMAModel does without `use_ema_warmup`). The warm-up keeps a high decay from
freezing the average near the random initial weights: after k updates it weighs roughly
the last k/9 of them, until the ramp reaches `decay` (k ≈ 90,000 for 0.9999).

Each rank averages the shards it holds (FSDP's and tensor parallelism's parameters are
DTensors; `.to_local()`): the update is elementwise and needs no communication. The average
is float32 whatever the training dtype, 4 bytes per parameter of a rank's shards, in device
memory or, with cpu_offload, in host memory (the update then copies the weights to the host,
through a reused buffer of STAGING_BYTES, and averages there).

Checkpoints: a WeightAverage is a Stateful under "ema" in torchtitan's checkpointer, so DCP
saves it beside the model as `ema.<parameter name>` (global tensors in the parameters'
layouts; tensor parallelism's strided shards as plain copies, flux.checkpoint) and
`ema.updates`, and reshards it on load like the model. Validation, export and inference
read it (flux.validate, flux.weights).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor
from torchtitan.tools.logging import logger

from flux.checkpoint import EMA as EMA  # the checkpoint's entry, re-exported
from flux.checkpoint import plain_layout, restore_layout
from flux.parallel.parallelize import flux_named_parameters
from flux.seam import StridedShard, dtensor_over

UPDATES = "updates"  # the checkpoint holds ema.<parameter name> and ema.updates
WARMUP = "min(decay, (1 + k) / (10 + k))"  # decay of update k >= 1; update 0 copies
STAGING_BYTES = 256 * 2**20  # with cpu_offload, weights go to the host in groups this large


@dataclass(frozen=True)
class EmaSettings:
    """The [ema] section, as the average uses it."""

    decay: float
    warmup: bool = True
    update_every: int = 1
    start_step: int = 0
    cpu_offload: bool = False

    def is_due(self, step: int) -> bool:
        """Whether applied step `step` updates the average."""
        return step >= self.start_step and step % self.update_every == 0

    def decay_at(self, k: int) -> float:
        """The decay of update k (k updates came before it); 0 (a copy) for the first."""
        if k == 0:
            return 0.0
        return min(self.decay, (1 + k) / (10 + k)) if self.warmup else self.decay


def ema_bytes_per_parameter(settings: EmaSettings | None) -> dict[str, int]:
    """Bytes the average takes per parameter element of a rank's shards, by where:
    {"device": ..., "host": ...} (for memory planning; none without [ema])."""
    if settings is None:
        return {"device": 0, "host": 0}
    return {"device": 0, "host": 4} if settings.cpu_offload else {"device": 4, "host": 0}


def local(t: Tensor) -> Tensor:
    """This rank's shard of a parameter (the tensor itself on one process)."""
    return t.to_local() if isinstance(t, DTensor) else t


def _strided(param: Tensor) -> bool:
    return isinstance(param, DTensor) and any(isinstance(p, StridedShard) for p in param.placements)


class WeightAverage(Stateful):
    """The EMA of a model's parameters, one float32 tensor per local shard."""

    def __init__(self, model: nn.Module, settings: EmaSettings):
        self.settings = settings
        self.params = dict(flux_named_parameters(model))
        self.average = {name: self._copy(local(p).detach()) for name, p in self.params.items()}
        self.updates = 0  # made so far; 0: the average has not started
        self.staging: Tensor | None = None  # cpu_offload: where the weights land, reused

    def _buffer(self, numel: int) -> Tensor:
        """A float32 buffer beside the average (pinned if the weights are on a GPU)."""
        first = next(iter(self.params.values()))
        device = next(iter(self.average.values())).device
        pinned = device.type == "cpu" and local(first).device.type == "cuda"
        return torch.empty(numel, dtype=torch.float32, device=device, pin_memory=pinned)

    def _copy(self, weights: Tensor) -> Tensor:
        host = self.settings.cpu_offload
        device = torch.device("cpu") if host else weights.device
        pinned = host and weights.device.type == "cuda"
        out = torch.empty(weights.shape, dtype=torch.float32, device=device, pin_memory=pinned)
        return out.copy_(weights)

    @property
    def started(self) -> bool:
        return self.updates > 0

    @torch.no_grad()
    def update(self, step: int, not_applied: Tensor | None = None) -> bool:
        """Average in the weights of step `step` if it is due; whether it was.

        not_applied: a () tensor, 1 where the step was not applied (the trainer knows it on
        the device only, flux.resilience.StepVerdict): the update then leaves the average
        as it was, without the host waiting for the verdict, and the trainer calls
        `not_applied()` once it has read it. None: the step was applied."""
        if not self.settings.is_due(step):
            return False
        decay = self.settings.decay_at(self.updates)
        weight = None
        if not_applied is not None:
            # lerp's weight 1 gives the weights exactly (a copy) and 0 the average. With
            # cpu_offload this copy to the host waits for the device, as staging does.
            device = next(iter(self.average.values())).device
            weight = (1.0 - not_applied.to(device, torch.float32)) * (1.0 - decay)
        for averages, weights in self._groups():
            if weight is not None:
                torch._foreach_lerp_(averages, weights, [weight] * len(averages))
            elif decay == 0.0:
                torch._foreach_copy_(averages, weights)
            else:
                torch._foreach_lerp_(averages, weights, 1.0 - decay)
        self.updates += 1
        return True

    def not_applied(self) -> None:
        """Uncount an update whose step turned out not applied (its average unchanged)."""
        self.updates -= 1

    def _groups(self) -> Iterator[tuple[list[Tensor], list[Tensor]]]:
        """(averages, the weights as float32 beside them): all at once; with cpu_offload,
        copied into a reused host buffer STAGING_BYTES (or one tensor) at a time."""
        names = list(self.average)
        weights = {n: local(self.params[n]).detach() for n in names}
        if not self.settings.cpu_offload:
            averages = [self.average[n] for n in names]
            yield averages, [w if w.dtype == torch.float32 else w.float() for w in weights.values()]
            return
        if self.staging is None:
            largest = max(t.numel() for t in self.average.values())
            self.staging = self._buffer(max(STAGING_BYTES // 4, largest))
        group: list[str] = []
        used = 0
        for i, name in enumerate(names):
            group.append(name)
            used += weights[name].numel()
            after = weights[names[i + 1]].numel() if i + 1 < len(names) else None
            if after is not None and used + after <= self.staging.numel():
                continue
            staged, offset = [], 0
            for n in group:
                w = weights[n]
                view = self.staging[offset : offset + w.numel()].view(w.shape)
                staged.append(view.copy_(w, non_blocking=True))
                offset += w.numel()
            if any(weights[n].device.type == "cuda" for n in group):
                torch.cuda.current_stream().synchronize()  # the copies have landed
            yield [self.average[n] for n in group], staged
            group, used = [], 0

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model holds the average for the duration (in its parameters' dtype) and its
        own weights after, exactly. float32 parameters trade places with the average (one
        tensor's buffer); others are kept aside, on the average's device."""
        held: dict[str, Tensor] = {}
        traded = [n for n, a in self.average.items() if local(self.params[n]).dtype == a.dtype]
        scratch = self._buffer(max((self.average[n].numel() for n in traded), default=0))
        with torch.no_grad():
            for name, average in self.average.items():
                weights = local(self.params[name])
                if name in traded:
                    _trade(weights, average, scratch)
                else:
                    held[name] = weights.to(average.device, copy=True)
                    weights.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, average in self.average.items():
                    weights = local(self.params[name])
                    if name in held:
                        weights.copy_(held[name])
                    else:
                        _trade(weights, average, scratch)

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The average as global tensors in the parameters' layouts (over the average
        itself, so DCP loads in place), strided ones as plain copies; the update count."""
        state: dict[str, Any] = {name: self._saveable(name) for name in self.average}
        state[UPDATES] = torch.tensor(self.updates, dtype=torch.int64)
        return state

    def _saveable(self, name: str) -> Tensor:
        param, average = self.params[name], self.average[name]
        if not isinstance(param, DTensor):
            return average
        if not _strided(param):
            return dtensor_over(average, param)
        # DCP cannot save strided shards: a plain copy, redistributed on the mesh's device
        # (the average may be in host memory), kept beside the average.
        on_mesh = dtensor_over(average.to(param.device_mesh.device_type), param)
        plain = plain_layout({name: on_mesh})[name]
        return dtensor_over(plain.to_local().to(average.device), plain)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name, average in self.average.items():
            value, param = state_dict[name], self.params[name]
            if isinstance(value, DTensor) and isinstance(param, DTensor):
                if _strided(param):
                    device = param.device_mesh.device_type
                    value = dtensor_over(value.to_local().to(device), value)
                    value = restore_layout({name: value}, {name: param})[name]
                value = value.to_local()
            if value.data_ptr() != average.data_ptr():
                average.copy_(value)
        self.updates = int(state_dict[UPDATES])


def _trade(a: Tensor, b: Tensor, scratch: Tensor) -> None:
    """a and b (of one shape and dtype) exchange values, through scratch (beside b)."""
    held = scratch[: a.numel()].view(a.shape).copy_(a)
    a.copy_(b)
    b.copy_(held)


def build_average(model: nn.Module, settings: EmaSettings | None) -> WeightAverage | None:
    """The trainer's average of `model` (None without [ema] enable), logged once."""
    if settings is None:
        return None
    start = time.perf_counter()
    average = WeightAverage(model, settings)
    count = sum(t.numel() for t in average.average.values())
    where = "host" if settings.cpu_offload else "device"
    warmup = f"warm-up {WARMUP}" if settings.warmup else "no warm-up"
    every = settings.update_every
    first = -(-max(settings.start_step, 1) // every) * every  # the first step due
    logger.info(
        f"EMA of the weights: decay {settings.decay} ({warmup}), every {every} step(s) from "
        f"step {first}; {count * 4 / 2**20:.1f} MiB of {where} memory on this rank "
        f"({time.perf_counter() - start:.2f}s)"
    )
    return average
