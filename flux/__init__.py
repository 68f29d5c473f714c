"""flux: FLUX.1 pre-training on torchtitan's trainer. Importing it registers the "flux"
TrainSpec (flavors, parallelize_flux, dataloader, loss) with torchtitan."""

from __future__ import annotations

from typing import Any

import torch
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.optimizer import build_optimizers
from torchtitan.protocols.train_spec import TrainSpec, register_train_spec

from flux.data.dataloader import CaptionedImageLoader
from flux.model.args import flux_configs
from flux.model.model import FluxModel
from flux.parallelize import parallelize_flux
from flux.validate import build_flux_validator


def build_flux_dataloader(
    dp_world_size: int, dp_rank: int, tokenizer: Any, job_config: Any, **_: Any
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
    )


def build_mse_loss(job_config: Any, **_: Any) -> Any:
    """The flow-matching loss (the trainer's step calls it on a velocity and its target)."""
    return torch.nn.functional.mse_loss


register_train_spec(
    "flux",
    TrainSpec(
        model_cls=FluxModel,
        model_args=flux_configs,
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
