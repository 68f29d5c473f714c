"""Step time from a step's FLOPs, bytes and collectives, and a GPU's peak rates.

Compute runs at `efficiency` of the GPU's dense bf16 peak: the counted FLOPs (the model's
matmuls and attention, activation-checkpointing recomputation and the frozen encoders'
forwards; elementwise work is in the efficiency). A collective's time is the bytes a rank
sends in the ring algorithm over the slowest link its group crosses (NVLink inside an
NVLink domain, the network adapter beyond) at `link_efficiency` of the link's rate. FSDP's
and HSDP's collectives overlap compute (FSDP prefetches the next block's parameters and
reduces the last one's gradients while the current one computes) unless `overlap` is off;
tensor- and context-parallel collectives sit between matmuls and never overlap. The
optimizer step reads and writes this rank's shard of parameters, gradients and moments at
the HBM bandwidth. So:

    step = max(compute, data-parallel traffic) + other traffic + optimizer   (overlap)
    step = compute + all traffic + optimizer                                 (no overlap)

MFU counts the model's FLOPs only (`training_flops_per_sample`, the trainer's count): no
recomputation, no encoders.
"""

from __future__ import annotations

from dataclasses import dataclass

from flux.plan.gpus import GPUProfile
from flux.plan.traffic import Traffic

# fp32 AdamW reads parameter, gradient and both moments and writes parameter and moments
# (7 x 4 bytes); gradient clipping reads the gradients and scales them (2 x 4 bytes).
OPTIMIZER_BYTES_PER_ELEMENT = 36


@dataclass(frozen=True)
class TimeSettings:
    efficiency: float = 0.4  # of peak dense bf16 reached by compute
    link_efficiency: float = 0.8  # of link bandwidth reached by collectives
    overlap: bool = True  # FSDP/HSDP traffic hidden behind compute


@dataclass
class LinkTime:
    kind: str
    group: str
    link: str  # "NVLink" or "network"
    wire_bytes: float  # per rank per step
    seconds: float
    overlapped: bool


@dataclass
class StepTime:
    compute_s: float
    optimizer_s: float
    traffic: list[LinkTime]
    step_s: float
    images_per_s_per_gpu: float
    mfu: float  # model FLOPs / (step time x peak)


def link_of(traffic: Traffic, gpu: GPUProfile) -> tuple[str, float]:
    """The slowest link a group's ring crosses, and its rate per direction."""
    domains = {rank // gpu.nvlink_domain for rank in traffic.members}
    if len(domains) == 1:
        return "NVLink", gpu.nvlink_bytes_per_s
    return "network", gpu.network_bytes_per_s


def step_time(
    flops: float,
    model_flops: float,
    traffic: list[Traffic],
    parameter_elements: int,
    images_per_step_per_gpu: float,
    gpu: GPUProfile,
    settings: TimeSettings,
    ema_update_bytes: float = 0,
) -> StepTime:
    """flops: all this rank computes in a step; model_flops: the trainer's count of it;
    ema_update_bytes: what the [ema] average's update reads and writes, per step."""
    compute = flops / (gpu.peak_bf16_flops * settings.efficiency)
    optimizer_bytes = parameter_elements * OPTIMIZER_BYTES_PER_ELEMENT + ema_update_bytes
    optimizer = optimizer_bytes / gpu.hbm_bytes_per_s
    links = []
    for t in traffic:
        link, rate = link_of(t, gpu)
        seconds = t.wire_bytes / (rate * settings.link_efficiency)
        overlapped = settings.overlap and t.by_fsdp
        links.append(LinkTime(t.kind, t.group, link, t.wire_bytes, seconds, overlapped))
    hidden = sum(x.seconds for x in links if x.overlapped)
    exposed = sum(x.seconds for x in links if not x.overlapped)
    step = max(compute, hidden) + exposed + optimizer
    return StepTime(
        compute_s=compute,
        optimizer_s=optimizer,
        traffic=links,
        step_s=step,
        images_per_s_per_gpu=images_per_step_per_gpu / step,
        mfu=model_flops / (step * gpu.peak_bf16_flops),
    )
