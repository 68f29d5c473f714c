"""The "flux" TrainSpec: what torchtitan's trainer builds for model.name = "flux", and
where the job's configuration becomes the small settings the parts below the trainer take.

Registered when this module is imported (flux.train imports it). torchtitan asks model
args for two things the plain FluxModelArgs does not know of, the job's configuration and
its FLOP count per token; FluxTrainArgs adds them. FluxTrainModel is FluxModel with the
trainer's weight initialization (the same weights in every parallel layout).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.components.optimizer import build_optimizers
from torchtitan.config import TORCH_DTYPE_MAP, JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.protocols.model import BaseModelArgs
from torchtitan.protocols.train_spec import TrainSpec, register_train_spec

from flux.config import data_buckets
from flux.data.dataloader import CaptionedImageLoader
from flux.data.precomputed import TextTable
from flux.ema import EmaSettings
from flux.flow import PRECOMPUTED, EncoderSettings, FlowSettings, FluxPreprocessor, FrozenParts
from flux.generate import SampleSettings
from flux.model.args import FluxModelArgs, flux_configs, training_flops_per_sample
from flux.model.model import FluxModel
from flux.parallel.parallelize import init_as_one_process, parallelize_flux
from flux.sampling import scaled_size
from flux.validate import FluxValidator, ValidationSettings


@dataclasses.dataclass
class FluxTrainArgs(FluxModelArgs, BaseModelArgs):
    """FluxModelArgs as torchtitan's trainer uses them."""

    @classmethod
    def of(cls, args: FluxModelArgs) -> FluxTrainArgs:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(args)})

    def update_from_config(self, job_config: JobConfig, **kwargs: Any) -> None:
        """The T5 length comes from the job's [encoder] section (FLOP counts need it)."""
        encoder = getattr(job_config, "encoder", None)
        if encoder is not None:
            self.txt_seq_len = encoder.max_t5_encoding_len

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
        """Parameter count and training FLOPs per token for a sample of seq_len tokens.

        seq_len counts text and image tokens together; txt_seq_len of them are text.
        """
        nparams = sum(p.numel() for p in model.parameters())
        img_tokens = seq_len - self.txt_seq_len
        if img_tokens <= 0:
            raise ValueError(
                f"seq_len {seq_len} leaves no image tokens after {self.txt_seq_len} text tokens"
            )
        flops = training_flops_per_sample(self, img_tokens, self.txt_seq_len)
        return nparams, round(flops / seq_len)


class FluxTrainModel(FluxModel):
    """FluxModel whose init_weights gives every parallel layout one process's weights."""

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        init_as_one_process(self, lambda: super(FluxTrainModel, self).init_weights(buffer_device))


def build_flux_dataloader(
    dp_world_size: int, dp_rank: int, tokenizer: Any, job_config: JobConfig, **_: Any
) -> CaptionedImageLoader:
    """The training images and captions of this data-parallel rank."""
    training = job_config.training
    return CaptionedImageLoader(
        training.dataset,
        training.img_size,
        training.local_batch_size,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        seed=training.seed_data,
        path=training.dataset_path,
        num_workers=training.dataloader.num_workers,
        pin_memory=training.dataloader.pin_memory,
        prefetch_factor=training.dataloader.prefetch_factor,
        persistent_workers=training.dataloader.persistent_workers,
        shards_open=training.shards_open,
        data_streams=training.data_streams,
        buckets=data_buckets(job_config, training.img_size),
    )


def build_mse_loss(job_config: JobConfig, **_: Any) -> Any:
    """The flow-matching loss (the trainer's step calls it on a velocity and its target)."""
    return torch.nn.functional.mse_loss


def encoder_settings(job_config: JobConfig) -> EncoderSettings:
    enc = job_config.encoder
    return EncoderSettings(
        t5_encoder=enc.t5_encoder,
        clip_encoder=enc.clip_encoder,
        max_t5_encoding_len=enc.max_t5_encoding_len,
        autoencoder_path=enc.autoencoder_path,
        dtype=TORCH_DTYPE_MAP[enc.encoder_dtype],
    )


def frozen_parts(job_config: JobConfig) -> FrozenParts:
    """What the run's data and validation need built (see FrozenParts)."""
    training, validation = job_config.training, job_config.validation
    sections = [training, validation] if validation.enable else [training]
    caches = [s.dataset_path for s in sections if s.dataset == PRECOMPUTED]
    online = any(s.dataset != PRECOMPUTED for s in sections)
    texts = TextTable.read(caches[0]) if caches else None
    prompts_cached = texts is not None and texts.has(["", *validation.sample_prompts])
    draws_images = validation.enable and bool(validation.sample_prompts)  # mlperf may not
    return FrozenParts(
        text_encoders=online or (draws_images and not prompts_cached),
        latent_encoder=online,
        latent_decoder=draws_images,
        texts=texts,
    )


def build_preprocessor(
    job_config: JobConfig, model_args: FluxModelArgs, device: torch.device
) -> FluxPreprocessor:
    """The frozen encoders and the flow step's draws, as the job sets them."""
    training = job_config.training
    flow = FlowSettings(
        dropout_prob=training.classifier_free_guidance_prob,
        timestep_sampling=training.timestep_sampling,
        guidance=training.guidance,
        guidance_embed=model_args.guidance_embed,
    )
    return FluxPreprocessor(
        encoder_settings(job_config),
        frozen_parts(job_config),
        flow,
        model_args.autoencoder_params,
        device,
    )


def global_batch_size(job_config: JobConfig, dp_world_size: int) -> int:
    """Training samples per optimizer step: local batch × data-parallel ranks × gradient
    accumulation (training.global_batch_size, or without it one micro-batch per rank)."""
    training = job_config.training
    if training.global_batch_size > 0:
        return training.global_batch_size
    return training.local_batch_size * dp_world_size


def validation_settings(job_config: JobConfig, dp_world_size: int = 1) -> ValidationSettings:
    validation, training = job_config.validation, job_config.training
    sampling = SampleSettings(
        width=validation.img_size,
        height=validation.img_size,
        steps=validation.sampling_steps,
        cfg_scale=validation.cfg_scale,
        guidance=training.guidance,
        # the schedule matches training: shifted if training timesteps were
        shift=training.timestep_sampling == "flux_shift",
        seed=training.seed_data,
    )
    return ValidationSettings(
        dataset=validation.dataset,
        dataset_path=validation.dataset_path,
        img_size=validation.img_size,
        buckets=data_buckets(job_config, validation.img_size),
        local_batch_size=validation.local_batch_size,
        steps=validation.steps,
        freq=validation.freq,
        loss_timesteps=validation.loss_timesteps,
        sample_prompts=tuple(validation.sample_prompts),
        sample_sizes=tuple(
            scaled_size(width, height, validation.img_size)
            for width, height in validation.sample_sizes
        ),
        metric=validation.metric,
        samples=validation.samples,
        target_loss=validation.target_loss,
        every_samples=validation.every_samples,
        samples_per_step=global_batch_size(job_config, dp_world_size),
        sampling=sampling,
        seed=training.seed_data,
        folder=Path(job_config.job.dump_folder) / "validation",
        weights=validated_weights(job_config),
    )


def validated_weights(job_config: JobConfig) -> tuple[str, ...]:
    """Which weights validation evaluates: "raw", "ema" (the average), or both."""
    ema = job_config.ema
    if not ema.enable:
        return ("raw",)
    return {"raw": ("raw",), "ema": ("ema",), "both": ("raw", "ema")}[ema.validation]


def ema_settings(job_config: JobConfig) -> EmaSettings | None:
    """The [ema] section (None: no average is kept)."""
    ema = job_config.ema
    if not ema.enable:
        return None
    return EmaSettings(
        decay=ema.decay,
        warmup=ema.warmup,
        update_every=ema.update_every,
        start_step=ema.start_step,
        cpu_offload=ema.cpu_offload,
    )


def build_flux_validator(
    job_config: JobConfig,
    dp_world_size: int,
    dp_rank: int,
    parallel_dims: ParallelDims,
    metrics_processor: MetricsProcessor,
    **_: Any,
) -> FluxValidator:
    """The TrainSpec's build_validator_fn."""
    return FluxValidator(
        validation_settings(job_config, dp_world_size),
        dp_world_size,
        dp_rank,
        parallel_dims,
        metrics_processor,
    )


register_train_spec(
    "flux",
    TrainSpec(
        model_cls=FluxTrainModel,
        model_args={name: FluxTrainArgs.of(args) for name, args in flux_configs.items()},
        parallelize_fn=parallelize_flux,
        pipelining_fn=None,
        build_optimizers_fn=build_optimizers,
        build_lr_schedulers_fn=build_lr_schedulers,
        build_dataloader_fn=build_flux_dataloader,
        build_tokenizer_fn=None,
        build_loss_fn=build_mse_loss,
        build_validator_fn=build_flux_validator,
    ),
)
