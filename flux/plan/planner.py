"""Plans: per-rank memory and step time of a training configuration at any scale.

`plan` builds rank 0 of the run in a fake world (flux.plan.world) as the trainer would,
steps it once under the counters (flux.plan.step), and turns what it measured into the
memory breakdown, whether it fits each GPU asked for, and the roofline step time
(flux.plan.roofline). `advise` re-plans a run that does not fit with each knob that lowers
memory and says which helps most; `sweep` finds the largest local batch that fits for each
activation-checkpointing setting.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torchtitan.config import JobConfig

from flux.config import ConfigError, check_config
from flux.flow import PRECOMPUTED
from flux.model.args import training_flops_per_sample
from flux.plan import mlperf
from flux.plan.gpus import GiB, GPUProfile, gpu_profile
from flux.plan.roofline import StepTime, TimeSettings, step_time
from flux.plan.step import ENCODERS, StepProfile, build_run, profile_step
from flux.plan.world import fake_world

ENCODER_MODES = ("auto", "online", "precomputed")
DEBUG_AUTOENCODER = "flux/assets/autoencoder-debug/ae.safetensors"


@dataclass(frozen=True)
class PlanSettings:
    """What a plan is for (the command line's options; the run itself is the JobConfig)."""

    ngpu: int
    gpus: tuple[str, ...] = ("h100-80gb",)
    margin: float = 0.1  # of HBM kept free: CUDA context, NCCL buffers, fragmentation
    encoders: str = "auto"  # online, precomputed, or auto: as training.dataset says
    time: TimeSettings = field(default_factory=TimeSettings)


@dataclass
class Memory:
    peak_bytes: int
    at_peak: dict[str, int]  # bytes by category at the peak
    hbm_bytes: float
    usable_bytes: float  # HBM less the margin
    fits: bool
    host_bytes: int = 0  # host memory per rank: the [ema] average with cpu_offload

    @property
    def over_bytes(self) -> float:
        """How far the peak is above what is usable (negative: room left)."""
        return self.peak_bytes - self.usable_bytes


@dataclass
class Plan:
    """One rank's memory and time for a run on one GPU profile."""

    flavor: str
    ngpu: int
    gpu: str
    layout: dict[str, int]  # parallel degrees
    local_batch: int
    accumulation: int
    global_batch: int
    img_size: int
    txt_tokens: int
    activation_checkpoint: str
    encoders: str  # online or precomputed
    memory: Memory
    flops: dict[str, float]  # per GPU per step
    traffic: list[dict[str, Any]]
    time: StepTime
    mlperf: mlperf.MLPerfEstimate
    settings: dict[str, Any]
    advice: list[dict[str, Any]] = field(default_factory=list)


def ac_setting(job: JobConfig) -> str:
    """The activation-checkpointing setting as one word: MODE or MODE:OPTION."""
    ac = job.activation_checkpoint
    return f"{ac.mode}:{ac.selective_ac_option}" if ac.mode == "selective" else ac.mode


def with_ac(job: JobConfig, setting: str) -> JobConfig:
    """A copy of the job with activation_checkpoint set from MODE[:OPTION]; any mode the
    trainer takes works here (parallelize_flux refuses the ones it does not)."""
    job = copy.deepcopy(job)
    mode, _, option = setting.partition(":")
    job.activation_checkpoint.mode = mode
    if option:
        job.activation_checkpoint.selective_ac_option = option
    return job


def float8(job: JobConfig) -> bool:
    return "quantize.linear.float8" in job.model.converters


def encoders_online(job: JobConfig, settings: PlanSettings) -> bool:
    if settings.encoders == "auto":
        return job.training.dataset != PRECOMPUTED
    return settings.encoders == "online"


def check_plan(job: JobConfig, settings: PlanSettings) -> list[GPUProfile]:
    """The trainer's checks of the job at settings.ngpu processes, less the ones about the
    machine that runs them (files it reads, a float8 GPU: a plan is for another machine),
    and the planner's own options. One ConfigError line each."""
    gpus = [gpu_profile(name) for name in settings.gpus]
    if settings.ngpu < 1:
        raise ConfigError(f"--ngpu {settings.ngpu}: plan for 1 GPU or more")
    if settings.encoders not in ENCODER_MODES:
        raise ConfigError(f"--encoders {settings.encoders!r}: use {', '.join(ENCODER_MODES)}")
    if not 0 <= settings.margin < 1:
        raise ConfigError(f"--margin {settings.margin}: give a fraction of HBM in [0, 1)")
    for name in ("efficiency", "link_efficiency"):
        value = getattr(settings.time, name)
        if not 0 < value <= 1:
            raise ConfigError(f"--{name.replace('_', '-')} {value}: give a fraction in (0, 1]")
    here = copy.deepcopy(job)
    here.encoder.autoencoder_path = DEBUG_AUTOENCODER
    for section in (here.training, here.validation):
        if section.dataset == PRECOMPUTED:
            section.dataset = "shapes"
            if section is here.validation and here.validation.samples == -1:
                here.validation.samples = 1  # "the whole cache" has no meaning for shapes
    here.model.converters = []
    check_config(here, world_size=settings.ngpu)
    return gpus


def measure(job: JobConfig, settings: PlanSettings) -> tuple[StepProfile, Any]:
    """Rank 0 of the run, stepped once in a fake world: its profile and step shape. The
    blocks run eagerly: compiling fake tensors needs the GPU's compiler, and compile's
    fusion only lowers activations (so a plan errs on the safe side)."""
    job = copy.deepcopy(job)
    job.compile.enable = False
    if float8(job):
        # torchtitan converts to float8 only on a float8 GPU, or emulated: the same casts
        # and float8 all-gathers, the matmul in high precision. Precomputing FSDP's scales
        # reads a tensor's value, which fake tensors have not (it saves one small all-reduce).
        job.quantize.linear.float8.emulate = True
        job.quantize.linear.float8.precompute_float8_dynamic_scale_for_fsdp = False
    with fake_world(job.parallelism, settings.ngpu) as dims:
        fake = FakeTensorMode(allow_non_fake_inputs=True)
        run = build_run(job, dims, torch.device("cpu"), encoders_online(job, settings), fake)
        profile = profile_step(run)
        degrees = {
            "dp_replicate": dims.dp_replicate,
            "dp_shard": dims.dp_shard,
            "cp": dims.cp,
            "tp": dims.tp,
        }
        return profile, (run.shape, run.model_args, degrees)


def plan(job: JobConfig, settings: PlanSettings) -> list[Plan]:
    """Plans of the job for each GPU profile of settings (one fake step for all)."""
    gpus = check_plan(job, settings)
    profile, built = measure(job, settings)
    return [
        plan_on(job, settings, profile, built, gpu, name) for gpu, name in zip(gpus, settings.gpus)
    ]


def plan_on(
    job: JobConfig,
    settings: PlanSettings,
    profile: StepProfile,
    built: Any,
    gpu: GPUProfile,
    gpu_name: str,
) -> Plan:
    shape, args, degrees = built
    batch_degree = degrees["dp_replicate"] * degrees["dp_shard"]
    global_batch = shape.local_batch * shape.accumulation * batch_degree
    model_flops = (
        training_flops_per_sample(args, shape.img_tokens, shape.txt_tokens)
        * global_batch
        / settings.ngpu
    )
    counted = sum(profile.flops.values())
    time = step_time(
        counted,
        model_flops,
        profile.traffic,
        profile.parameter_elements,
        global_batch / settings.ngpu,
        gpu,
        settings.time,
        profile.ema_update_bytes,
    )
    usable = gpu.hbm_bytes * (1 - settings.margin)
    memory = Memory(
        peak_bytes=profile.peak_bytes,
        at_peak=profile.at_peak,
        hbm_bytes=gpu.hbm_bytes,
        usable_bytes=usable,
        fits=profile.peak_bytes <= usable,
        host_bytes=profile.host_bytes,
    )
    return Plan(
        flavor=job.model.flavor,
        ngpu=settings.ngpu,
        gpu=gpu_name,
        layout=degrees,
        local_batch=shape.local_batch,
        accumulation=shape.accumulation,
        global_batch=global_batch,
        img_size=shape.img_size,
        txt_tokens=shape.txt_tokens,
        activation_checkpoint=ac_setting(job),
        encoders="online" if shape.encoders_online else "precomputed",
        memory=memory,
        flops={
            "model": model_flops,  # the trainer's count
            "counted_model": profile.flops.get("model", 0),  # with AC recomputation
            "counted_encoders": profile.flops.get(ENCODERS, 0),
        },
        traffic=[
            {
                "kind": t.kind,
                "group": t.group,
                "ranks": t.ranks,
                "calls": t.calls,
                "bytes": t.bytes,
                "wire_bytes": t.wire_bytes,
            }
            for t in profile.traffic
        ],
        time=time,
        mlperf=mlperf.estimate(
            time,
            profile.flops.get("model", 0),
            model_flops,
            shape.img_tokens + shape.txt_tokens,
            global_batch,
            settings.ngpu,
            gpu,
            settings.time,
        ),
        settings={
            "margin": settings.margin,
            "efficiency": settings.time.efficiency,
            "link_efficiency": settings.time.link_efficiency,
            "overlap": settings.time.overlap,
            "compile": "blocks planned eagerly (compile's fusion lowers activations: conservative)",
            "float8": (
                "float8 casts and all-gathers as torchao runs them; matmuls timed at the bf16 "
                "peak (conservative)"
                if float8(job)
                else "off"
            ),
        },
    )


# What lowers memory, as (what to tell the user, the change to the job, to the settings).
def knobs(job: JobConfig, settings: PlanSettings) -> list[tuple[str, JobConfig, PlanSettings]]:
    out = []
    if job.activation_checkpoint.mode != "full":
        out.append(("--activation_checkpoint.mode full", with_ac(job, "full"), settings))
    local = job.training.local_batch_size
    if local > 1:
        # at most half the batch, a divisor of it: the same global batch in more micro-batches
        smaller = max(d for d in range(1, local // 2 + 1) if local % d == 0)
        half = copy.deepcopy(job)
        half.training.local_batch_size = smaller
        hint = f"--training.local_batch_size {smaller}"
        if half.training.global_batch_size < 0:  # keep the global batch: accumulate
            p = job.parallelism
            degree = settings.ngpu // (
                p.tensor_parallel_degree * p.context_parallel_degree * p.pipeline_parallel_degree
            )
            half.training.global_batch_size = local * degree
            hint += f" --training.global_batch_size {local * degree}"
        out.append((f"{hint} (the same global batch, accumulated)", half, settings))
    if encoders_online(job, settings):
        precomputed = PlanSettings(
            settings.ngpu, settings.gpus, settings.margin, "precomputed", settings.time
        )
        out.append(("encode once: python -m flux.scripts.precompute", job, precomputed))
    if job.parallelism.data_parallel_replicate_degree > 1:
        shard = copy.deepcopy(job)
        shard.parallelism.data_parallel_replicate_degree = 1
        shard.parallelism.data_parallel_shard_degree = -1
        hint = "--parallelism.data_parallel_replicate_degree 1 (FSDP over every rank, no HSDP)"
        out.append((hint, shard, settings))
    return out


def advise(job: JobConfig, settings: PlanSettings, peak_bytes: int) -> list[dict[str, Any]]:
    """Each knob's peak (re-planned), the most helpful first."""
    results = []
    for hint, knob_job, knob_settings in knobs(job, settings):
        profile, _ = measure(knob_job, knob_settings)
        results.append(
            {
                "change": hint,
                "peak_bytes": profile.peak_bytes,
                "saves_bytes": peak_bytes - profile.peak_bytes,
            }
        )
    return sorted(results, key=lambda r: r["peak_bytes"])


@dataclass
class SweepResult:
    activation_checkpoint: str
    gpu: str
    largest_batch: int  # 0: batch 1 does not fit
    plan: Plan | None  # at the largest batch


class Sweep:
    """Largest local batch that fits, for one activation-checkpointing setting; each batch
    is planned once and serves every GPU profile."""

    def __init__(
        self,
        job: JobConfig,
        settings: PlanSettings,
        ac: str,
        limit: int = 1024,
        progress: Callable[[str], None] | None = None,
    ):
        self.job = with_ac(job, ac)
        self.progress = progress
        self.job.training.global_batch_size = -1  # one micro-batch per step
        self.settings = settings
        self.ac = ac
        self.limit = limit
        self.gpus = check_plan(self.job, settings)
        self.plans: dict[int, list[Plan]] = {}

    def plans_at(self, batch: int) -> list[Plan]:
        if batch not in self.plans:
            job = copy.deepcopy(self.job)
            job.training.local_batch_size = batch
            profile, built = measure(job, self.settings)
            if self.progress is not None:
                self.progress(f"{self.ac}: batch {batch}, peak {profile.peak_bytes / GiB:.2f} GiB")
            self.plans[batch] = [
                plan_on(job, self.settings, profile, built, gpu, name)
                for gpu, name in zip(self.gpus, self.settings.gpus)
            ]
        return self.plans[batch]

    def peak(self, batch: int) -> int:
        return self.plans_at(batch)[0].memory.peak_bytes

    def largest(self, gpu_index: int) -> SweepResult:
        """Bracket the largest batch that fits, probing where the peak (close to linear in
        the batch) crosses the usable memory: about four plans per setting."""
        usable = self.gpus[gpu_index].hbm_bytes * (1 - self.settings.margin)
        name = self.settings.gpus[gpu_index]
        if self.peak(1) > usable:
            return SweepResult(self.ac, name, 0, None)
        fits, fails = 1, self.limit + 1
        for batch in self.plans:  # what earlier searches (other GPUs) planned
            if self.peak(batch) <= usable:
                fits = max(fits, batch)
            else:
                fails = min(fails, batch)
        moved: list[bool] = []  # which end each probe moved: True for `fits`
        while fails - fits > 1:
            guess = self._crossing(fits, fails, usable)
            if len(moved) >= 2 and moved[-1] == moved[-2] and fails <= self.limit:
                guess = (fits + fails) // 2  # the line keeps missing on one side: bisect
            probe = min(max(guess, fits + 1), fails - 1)
            ok = self.peak(probe) <= usable
            fits, fails = (probe, fails) if ok else (fits, probe)
            moved.append(ok)
        return SweepResult(self.ac, name, fits, self.plans_at(fits)[gpu_index])

    def _crossing(self, fits: int, fails: int, usable: float) -> int:
        """Where the line through the peaks at `fits` and at `fails` (or, before a batch is
        known not to fit, the nearest other planned batch) reaches `usable`."""
        if fails in self.plans:
            other = fails
        else:
            others = [b for b in self.plans if b != fits]
            if not others:
                return 2 * fits
            other = min(others, key=lambda b: abs(b - fits))
        slope = (self.peak(other) - self.peak(fits)) / (other - fits)
        if slope <= 0:
            return 2 * fits
        return fits + int((usable - self.peak(fits)) // slope)


def sweep(
    job: JobConfig,
    settings: PlanSettings,
    acs: list[str],
    progress: Callable[[str], None] | None = None,
) -> list[SweepResult]:
    """The largest batch that fits each GPU, for each activation-checkpointing setting."""
    results = []
    for ac in acs:
        runs = Sweep(job, settings, ac, progress=progress)
        results += [runs.largest(i) for i in range(len(settings.gpus))]
    return results


def gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f} GiB"
