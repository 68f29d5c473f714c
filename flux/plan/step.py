"""One training step as the trainer runs it, on whatever tensors are at hand.

`build_run` builds a rank of the trainer (FluxTrainer.__init__): the flavor's FluxModel on
meta, torchtitan's model converters (float8), `parallelize_flux`, the parameters on the
device, the optimizer as torchtitan builds it, and the frozen encoders. `training_step`
runs FluxTrainer.optimize: micro-batches of accumulation (encoders, x_t, the model's
forward and backward), gradient clipping, the optimizer step. `profile_step` runs it under
the planner's counters. Under a FakeTensorMode and a fake process group this is the
planner; on real tensors and a real process group it is the measurement the planner is
checked against.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torchtitan.components.optimizer import build_optimizers
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.distributed import utils as dist_utils
from torchtitan.protocols.model_converter import build_model_converters

from flux.ema import ema_bytes_per_parameter
from flux.flow import FlowBatch, flow_matching_loss
from flux.model.args import FluxModelArgs, flux_configs
from flux.model.autoencoder import posterior_latents
from flux.parallel.context_parallel import shard_sequence
from flux.parallel.parallelize import parallelize_flux
from flux.plan.encoders import FrozenEncoders, build_frozen_encoders
from flux.plan.flops import FlopCounter, counted_as
from flux.plan.memory import MemoryTracker
from flux.plan.traffic import CommCounter, Traffic
from flux.sampling import image_ids, pack_latents, text_ids
from flux.seam import local_storage
from flux.train_spec import FluxTrainArgs, FluxTrainModel, ema_settings, encoder_settings

PARAMETERS, GRADIENTS, OPTIMIZER, ENCODERS, EMA = (
    "parameters",
    "gradients",
    "optimizer state",
    "frozen encoders",
    "weight average (EMA)",
)
# A due EMA update (torch._foreach_lerp_ on the device) reads the average and the weights
# and writes the average: float32, 3 x 4 bytes per element of the rank's shards.
EMA_UPDATE_BYTES_PER_ELEMENT = 12
MESH_DIMS = ("dp_replicate", "fsdp", "cp", "tp", "batch", "loss")


@dataclass(frozen=True)
class StepShape:
    """What one rank computes per step."""

    local_batch: int  # samples per micro-batch
    accumulation: int  # micro-batches per step
    img_size: int
    txt_tokens: int  # T5 tokens per sample
    encoders_online: bool  # T5/CLIP/autoencoder run every step (else a precomputed cache)

    @property
    def img_tokens(self) -> int:
        return (self.img_size // 16) ** 2  # 8x autoencoder, then 2x2 patches


def step_shape(job: JobConfig, parallel_dims: ParallelDims, encoders_online: bool) -> StepShape:
    """Micro-batches per step as torchtitan's trainer computes them."""
    training = job.training
    local = training.local_batch_size
    batch_degree = parallel_dims.dp_replicate * parallel_dims.dp_shard
    global_batch = training.global_batch_size
    if global_batch < 0:
        global_batch = local * batch_degree
    if global_batch <= 0 or global_batch % (local * batch_degree):
        from flux.config import ConfigError

        raise ConfigError(
            f"training.global_batch_size {global_batch} is not a multiple of "
            f"local_batch_size {local} x data-parallel degree {batch_degree}: make it one"
        )
    return StepShape(
        local_batch=local,
        accumulation=global_batch // (local * batch_degree),
        img_size=training.img_size,
        txt_tokens=job.encoder.max_t5_encoding_len,
        encoders_online=encoders_online,
    )


@dataclass
class Run:
    """One rank of the trainer."""

    model: nn.Module
    model_args: FluxModelArgs
    optimizer: Any  # torchtitan's OptimizersContainer
    encoders: FrozenEncoders
    parallel_dims: ParallelDims
    shape: StepShape
    device: torch.device
    amp: AbstractContextManager
    max_norm: float
    guidance: float
    fake: FakeTensorMode | None  # the tensors' mode, for a plan
    shards: list[tuple[Tensor, Tensor]]  # (parameter, what the optimizer updates)
    ema_bytes: dict[str, int]  # the [ema] average per parameter element: device and host
    ema_update_every: int  # steps between its updates

    def local_parameters(self) -> list[Tensor]:
        return [shard for _, shard in self.shards]

    def gradients(self) -> list[Tensor]:
        return [_local(p.grad) for p in self.model.parameters() if p.grad is not None]

    def optimizer_state(self) -> list[Tensor]:
        return [
            v
            for optimizer in self.optimizer.optimizers  # torchtitan's container holds them
            for state in optimizer.state.values()
            for v in state.values()
            if isinstance(v, Tensor)
        ]


_local = local_storage  # a DTensor's shard on this rank, its storage


def build_run(
    job: JobConfig,
    parallel_dims: ParallelDims,
    device: torch.device,
    encoders_online: bool,
    fake: FakeTensorMode | None = None,
) -> Run:
    """A rank of the trainer, built in the order of torchtitan's Trainer.__init__. With a
    FakeTensorMode the parameters, optimizer state and encoders are fake (and the weights
    are not initialized); the model is parallelized on meta before, as the trainer does."""
    args = FluxTrainArgs.of(copy.deepcopy(flux_configs[job.model.flavor]))
    args.update_from_config(job)
    with torch.device("meta"):
        model: nn.Module = FluxTrainModel(args)
    converters = build_model_converters(job, parallel_dims)
    converters.convert(model)
    model = parallelize_flux(model, parallel_dims, job)  # type: ignore[arg-type]
    with fake or nullcontext():
        model.to_empty(device=device)
        if fake is None:
            with torch.no_grad():
                model.init_weights()  # type: ignore[operator]
        model.train()
        optimizer = build_optimizers([model], job.optimizer, parallel_dims)
        shards = optimize_shards(optimizer)
        optimizer.register_step_post_hook(lambda *a, **k: converters.post_optimizer_hook([model]))
        enc = encoder_settings(job)
        encoders = build_frozen_encoders(
            enc.t5_encoder,
            enc.clip_encoder,
            enc.max_t5_encoding_len,
            args.autoencoder_params,
            enc.dtype,
            online=encoders_online,
            validation_images=job.validation.enable,
            device=device,
        )
    ema = ema_settings(job)
    amp = dist_utils.maybe_enable_amp(
        parallel_dims, job.training.mixed_precision_param, device.type
    )
    return Run(
        model=model,
        model_args=args,
        optimizer=optimizer,
        encoders=encoders,
        parallel_dims=parallel_dims,
        shape=step_shape(job, parallel_dims, encoders_online),
        device=device,
        amp=amp,
        max_norm=job.training.max_norm,
        guidance=job.training.guidance,
        fake=fake,
        shards=shards,
        ema_bytes=ema_bytes_per_parameter(ema),
        ema_update_every=1 if ema is None else ema.update_every,
    )


def micro_batch(run: Run) -> FlowBatch:
    """What FluxPreprocessor and FluxTrainer.flow_batch give the model (random values)."""
    shape, args, device = run.shape, run.model_args, run.device
    b, latent = shape.local_batch, shape.img_size // 8
    channels = args.autoencoder_params.z_channels
    if shape.encoders_online:
        with counted_as(ENCODERS):
            txt, y, moments = run.encoders.encode(b, shape.img_size, device)
    else:
        dtype = run.encoders.dtype  # the cache stores the encoders' outputs in their dtype
        txt = torch.randn(b, shape.txt_tokens, args.context_in_dim, device=device, dtype=dtype)
        y = torch.randn(b, args.vec_in_dim, device=device, dtype=dtype)
        moments = torch.randn(b, 2 * channels, latent, latent, device=device, dtype=dtype)
        txt, y = txt.float(), y.float()
    noise = torch.randn(b, channels, latent, latent, device=device)
    x0 = pack_latents(posterior_latents(moments, args.autoencoder_params, noise).float())
    t = torch.rand(b, device=device)
    flow_noise = torch.randn_like(x0)
    inputs = {
        "img": (1 - t[:, None, None]) * x0 + t[:, None, None] * flow_noise,
        "img_ids": image_ids(b, latent, latent, device),
        "txt": txt,
        "txt_ids": text_ids(b, txt.shape[1], device),
        "timesteps": t,
        "y": y,
    }
    if args.guidance_embed:
        inputs["guidance"] = torch.full((b,), run.guidance, device=device)
    target = flow_noise - x0
    if run.parallel_dims.cp_enabled:
        cp = run.parallel_dims.get_mesh("cp")
        return FlowBatch(*shard_sequence(inputs, target, cp.get_local_rank(), cp.size()))
    return FlowBatch(inputs, target)


def training_step(run: Run) -> None:
    """FluxTrainer.optimize, without the bookkeeping."""
    run.model.zero_grad(set_to_none=True)  # the optimizers hold the shards (optimize_shards)
    accumulation = run.shape.accumulation
    for _ in range(accumulation):
        flow = micro_batch(run)
        with run.amp:
            loss = flow_matching_loss(run.model, flow) / accumulation
        loss.backward()
        del flow, loss
    dist_utils.clip_grad_norm_(list(run.model.parameters()), run.max_norm, foreach=True)
    optimizer_step(run, [p.grad for p, _ in run.shards])


def optimize_shards(container: Any) -> list[tuple[Tensor, Tensor]]:
    """Give the optimizers each rank's shard of every DTensor parameter in its place;
    returns (parameter, what the optimizer updates) pairs.

    AdamW's update is elementwise: on a sharded parameter DTensor runs it on the local
    shards, with no communication. Handing the optimizer the shards runs the same ops on
    the same storage, without DTensor's sharding propagation over lists of a thousand
    tensors (seconds a step on fake tensors); its state is then the shards' as well."""
    pairs = []
    for optimizer in container.optimizers:
        for group in optimizer.param_groups:
            for i, p in enumerate(group["params"]):
                group["params"][i] = _local(p)
                pairs.append((p, group["params"][i]))
    return pairs


@torch.no_grad()
def optimizer_step(run: Run, grads: list[Tensor | None]) -> None:
    """The optimizers' step with these gradients of the parameters (in run.shards order)."""
    for (_, shard), grad in zip(run.shards, grads):
        shard.grad = None if grad is None else _local(grad)
    run.optimizer.step()
    for p, shard in run.shards:
        if shard is not p:
            shard.grad = None


def create_optimizer_state(run: Run) -> None:
    """Give AdamW its moments, as after a first step: the step the planner measures is a
    steady one, with the optimizer's state already there."""
    with torch.no_grad():
        optimizer_step(run, [torch.zeros_like(shard) for _, shard in run.shards])
    run.model.zero_grad(set_to_none=True)


@dataclass
class StepProfile:
    """What one rank holds, computes and sends in a step."""

    peak_bytes: int
    at_peak: dict[str, int]  # bytes by category at the peak
    start_bytes: int  # held when the step starts: parameters, optimizer state, encoders
    flops: dict[str, int]  # counted: "model" (AC recomputation included) and ENCODERS
    traffic: list[Traffic] = field(default_factory=list)
    parameter_elements: int = 0  # of this rank's shards (the optimizer's work)
    host_bytes: int = 0  # in host memory: the [ema] average with cpu_offload
    ema_update_bytes: float = 0  # HBM traffic of the [ema] update, per step on average


def group_dims(parallel_dims: ParallelDims) -> dict[str, list[str]]:
    """Process-group names -> the mesh dimensions they form."""
    dims: dict[str, list[str]] = {}
    for dim in MESH_DIMS:
        mesh = parallel_dims.get_optional_mesh(dim)
        if mesh is not None and mesh.size() > 1:
            dims.setdefault(mesh.get_group().group_name, []).append(dim)
    return dims


def profile_step(run: Run, also: Sequence[AbstractContextManager] = ()) -> StepProfile:
    """One steady training step under the memory tracker and the FLOP and traffic counters
    (and `also`: torch's own counters, which tests hold the planner's against)."""
    memory, flops = MemoryTracker(), FlopCounter()
    comm = CommCounter(group_dims(run.parallel_dims))
    with run.fake or nullcontext():
        create_optimizer_state(run)
        memory.track(_existing(run))
        start = memory.current
        with ExitStack() as modes:
            for mode in (memory, flops, comm, *also):
                modes.enter_context(mode)
            training_step(run)
        at_peak = memory.at_peak(
            {
                PARAMETERS: run.local_parameters(),
                GRADIENTS: run.gradients(),
                OPTIMIZER: run.optimizer_state(),
                ENCODERS: run.encoders.parameters(),
            }
        )
        elements = sum(p.numel() for p in run.local_parameters())
    # The trainer's [ema] average (flux.ema): float32 copies of the rank's shards, made
    # before the first step and held through every step, so they add to every moment of
    # it; a device update allocates nothing (an in-place lerp over float32 weights).
    average = elements * run.ema_bytes["device"]
    peak = memory.peak
    if average:
        at_peak[EMA] = average
        peak, start = peak + average, start + average
    return StepProfile(
        peak,
        at_peak,
        start,
        dict(flops.by_part),
        list(comm.traffic.values()),
        elements,
        host_bytes=elements * run.ema_bytes["host"],
        ema_update_bytes=(
            elements * EMA_UPDATE_BYTES_PER_ELEMENT / run.ema_update_every if average else 0
        ),
    )


def _existing(run: Run) -> Iterator[Tensor]:
    yield from run.local_parameters()
    yield from run.optimizer_state()
    yield from run.encoders.parameters()
