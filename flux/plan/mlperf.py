"""MLPerf Training's FLUX.1 benchmark, estimated at a plan's scale, beside published results.

The benchmark (github.com/mlcommons/training, text_to_image/README.md): FLUX.1-schnell
(11.9B) trained from precomputed T5 (256 tokens) and CLIP embeddings and latents of 256 x
256 images of a CC12M subset, to a validation loss of 0.586, evaluated every 262,144
training samples on 29,696 COCO samples (one forward each). Published runs reach the target
after about 11.8M training samples.

The estimate trains those samples with the plan's GPUs, layout, batch and activation
checkpointing: compute scales with the FLOPs of the benchmark's sample (at the plan's
ratio of counted to model FLOPs, with no encoders), data-parallel traffic and the optimizer
step stay as planned (they depend on the parameters only), tensor- and context-parallel
traffic scales with the tokens per sample. Evaluations add their forwards.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from flux.model.args import flux_configs, training_flops_per_sample
from flux.plan.gpus import GPUS, GPUProfile
from flux.plan.roofline import StepTime, TimeSettings

SAMPLES = 11.8e6
IMG_TOKENS = (256 // 16) ** 2
TXT_TOKENS = 256
EVAL_EVERY = 262_144
EVAL_SAMPLES = 29_696


@dataclass(frozen=True)
class Published:
    who: str
    gpus: int
    gpu: str  # a key of GPUS
    minutes: float


PUBLISHED = (
    Published("NVIDIA, MLPerf Training v5.1", 1152, "gb200", 12.5),
    Published("MLPerf Training v6.0", 512, "mi300x", 74.4),
)


def flops_per_sample() -> int:
    args = copy.deepcopy(flux_configs["flux-schnell"])
    args.txt_seq_len = TXT_TOKENS
    return training_flops_per_sample(args, IMG_TOKENS, TXT_TOKENS)


@dataclass
class MLPerfEstimate:
    minutes: float
    steps: float
    step_s: float
    published: list[dict]  # each published result, with the MFU it implies by this count


def implied_mfu(result: Published) -> float:
    """The MFU a published time implies (training FLOPs only, by the trainer's count)."""
    gpu = GPUS[result.gpu]
    return SAMPLES * flops_per_sample() / (result.minutes * 60 * result.gpus * gpu.peak_bf16_flops)


def estimate(
    time: StepTime,
    counted_model_flops: float,
    model_flops: float,
    plan_tokens: int,
    global_batch: int,
    ngpu: int,
    gpu: GPUProfile,
    settings: TimeSettings,
) -> MLPerfEstimate:
    """counted/model_flops: this rank's FLOPs in the planned step, counted (recomputation
    included, encoders not) and by the trainer's count; plan_tokens: per planned sample."""
    per_sample = flops_per_sample()
    hardware = per_sample * counted_model_flops / model_flops
    rate = gpu.peak_bf16_flops * settings.efficiency
    compute = hardware * global_batch / ngpu / rate
    hidden = sum(x.seconds for x in time.traffic if x.overlapped)
    scale = (IMG_TOKENS + TXT_TOKENS) / plan_tokens
    exposed = sum(x.seconds for x in time.traffic if not x.overlapped) * scale
    step = max(compute, hidden) + exposed + time.optimizer_s
    steps = SAMPLES / global_batch
    evals = int(SAMPLES // EVAL_EVERY) * EVAL_SAMPLES * per_sample / 3 / ngpu / rate
    return MLPerfEstimate(
        minutes=(steps * step + evals) / 60,
        steps=steps,
        step_s=step,
        published=[
            {
                "who": p.who,
                "gpus": p.gpus,
                "gpu": GPUS[p.gpu].name,
                "minutes": p.minutes,
                "implied_mfu": implied_mfu(p),
            }
            for p in PUBLISHED
        ],
    )
