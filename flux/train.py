"""FluxTrainer: torchtitan's Trainer with the rectified-flow training step of FLUX.

    torchrun --nproc_per_node N -m flux.train --job.config_file flux/train_configs/debug_model.toml

Per micro-batch: captions -> (caption dropout) -> T5 token embeddings and CLIP pooled
vector; images -> autoencoder latents (sampled from the posterior) -> packed 2×2 patches x0;
t from the configured sampling; x_t = (1 - t)·x0 + t·noise; the model predicts noise - x0
and the loss is the mean squared error. Randomness (dropout, t, noise) comes from
generators seeded by (seed, data-parallel rank, step, micro-batch), so ranks differ and a
resumed run draws exactly what the unbroken run would have.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchtitan.components.dataloader import DataloaderExhaustedError
from torchtitan.config import JobConfig
from torchtitan.distributed import utils as dist_utils
from torchtitan.tools.logging import logger
from torchtitan.train import Trainer

from flux.data.caption_dropout import drop_captions
from flux.device import use_cpu_if_no_accelerator
from flux.model.args import FluxModelArgs
from flux.model.autoencoder import AutoEncoder, load_ae
from flux.model.text_encoders import TextEncoder
from flux.parallelize import DTYPES
from flux.sampling import image_ids, pack_latents, sample_timesteps, text_ids

CLIP_MAX_LENGTH = 77


@dataclass
class FlowBatch:
    """What the model sees for one micro-batch, and its velocity target."""

    inputs: dict[str, Tensor]  # FluxModel.forward keyword arguments
    target: Tensor  # (B, L_img, C): noise - x0


def step_generator(
    seed: int, rank: int, step: int, micro: int, device: torch.device | str
) -> torch.Generator:
    """The random stream of one micro-batch of one rank: stateless, so resumption is exact."""
    return torch.Generator(device=device).manual_seed(
        ((seed * 1_000_003 + rank) * 1_000_003 + step) * 1_000_003 + micro
    )


class FluxPreprocessor:
    """Frozen T5, CLIP and autoencoder: a batch of images and captions -> a FlowBatch."""

    def __init__(self, job_config: JobConfig, model_args: FluxModelArgs, device: torch.device):
        enc = job_config.encoder
        dtype = DTYPES[enc.encoder_dtype]
        self.device = device
        self.t5 = TextEncoder("t5", enc.t5_encoder, enc.max_t5_encoding_len, dtype).to(device)
        self.clip = TextEncoder("clip", enc.clip_encoder, CLIP_MAX_LENGTH, dtype).to(device)
        self.autoencoder: AutoEncoder = load_ae(
            enc.autoencoder_path, model_args.autoencoder_params, device
        ).to(dtype)
        self.dtype = dtype
        self.guidance_embed = model_args.guidance_embed
        training = job_config.training
        self.dropout_prob = training.classifier_free_guidance_prob
        self.timestep_sampling = training.timestep_sampling
        self.guidance = training.guidance

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """captions -> T5 (B, L_txt, D_t5) and CLIP pooled (B, D_clip), in fp32."""
        return self.t5(captions).float(), self.clip(captions).float()

    @torch.no_grad()
    def __call__(
        self,
        batch: dict[str, Any],
        cpu_gen: torch.Generator,
        device_gen: torch.Generator,
        timesteps: Tensor | None = None,
    ) -> FlowBatch:
        images = batch["images"].to(self.device, self.dtype)
        t5_captions, clip_captions = drop_captions(batch["captions"], self.dropout_prob, cpu_gen)
        txt = self.t5(t5_captions).float()
        y = self.clip(clip_captions).float()
        latents = self.autoencoder.encode(images, sample=True, generator=device_gen).float()
        x0 = pack_latents(latents)
        b, _, h, w = latents.shape
        if timesteps is None:
            timesteps = sample_timesteps(self.timestep_sampling, b, x0.shape[1], cpu_gen)
        t = timesteps.to(self.device)
        noise = torch.randn(x0.shape, generator=device_gen, device=self.device)
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        inputs = {
            "img": x_t,
            "img_ids": image_ids(b, h, w, self.device),
            "txt": txt,
            "txt_ids": text_ids(b, txt.shape[1], self.device),
            "timesteps": t,
            "y": y,
        }
        if self.guidance_embed:
            inputs["guidance"] = torch.full((b,), self.guidance, device=self.device)
        return FlowBatch(inputs, noise - x0)


def flow_matching_loss(model: torch.nn.Module, batch: FlowBatch) -> Tensor:
    """Mean squared error between the predicted and the true velocity."""
    prediction = model(**batch.inputs)
    return F.mse_loss(prediction.float(), batch.target.float())


class FluxTrainer(Trainer):
    def __init__(self, job_config: JobConfig):
        super().__init__(job_config)
        if self.device.type == "cpu":
            self.device = torch.device("cpu")  # torchtitan names it cpu:<local rank>
        self.preprocess = FluxPreprocessor(job_config, self.model_args, self.device)
        batch_mesh = self.parallel_dims.get_optional_mesh("batch")
        self.dp_rank = batch_mesh.get_local_rank() if batch_mesh is not None else 0
        self.images_since_log = 0

    def batch_generator(self, data_iterable: Iterable[Any]) -> Iterator[dict[str, Any]]:
        """Batches of {"images", "captions", "keys"}; counts tokens and loading time."""
        iterator = iter(data_iterable)
        seq_len = self.job_config.training.seq_len
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration as e:
                raise DataloaderExhaustedError() from e
            ntokens = len(batch["captions"]) * seq_len
            self.ntokens_seen += ntokens
            self.metrics_processor.ntokens_since_last_log += ntokens
            self.metrics_processor.data_loading_times.append(time.perf_counter() - start)
            yield batch

    def flow_batch(self, batch: dict[str, Any], micro: int) -> FlowBatch:
        seed = self.job_config.training.seed_data
        cpu_gen = step_generator(seed, self.dp_rank, self.step, micro, "cpu")
        device_gen = step_generator(seed, self.dp_rank, self.step, micro, self.device)
        return self.preprocess(batch, cpu_gen, device_gen)

    def train_step(self, data_iterator: Iterator[dict[str, Any]]) -> None:  # type: ignore[override]
        self.optimizers.zero_grad()
        lr = self.lr_schedulers.schedulers[0].get_last_lr()[0]
        model = self.model_parts[0]
        accumulation = self.gradient_accumulation_steps
        losses = []
        for micro in range(accumulation):
            batch = next(data_iterator)
            self.images_since_log += len(batch["captions"])
            flow = self.flow_batch(batch, micro)
            with self.train_context(), self.maybe_enable_amp:
                loss = flow_matching_loss(model, flow) / accumulation
            loss.backward()
            losses.append(loss.detach())

        grad_norm = dist_utils.clip_grad_norm_(
            list(model.parameters()), self.job_config.training.max_norm, foreach=True
        )
        self.checkpointer.maybe_wait_for_staging()
        self.optimizers.step()
        self.lr_schedulers.step()

        if not self.metrics_processor.should_log(self.step):
            return
        loss = torch.stack(losses).sum()
        if self.parallel_dims.dp_enabled:
            mesh = self.parallel_dims.get_mesh("batch")
            avg_loss = dist_utils.dist_mean(loss, mesh)
            max_loss = dist_utils.dist_max(loss, mesh)
        else:
            avg_loss = max_loss = loss.item()
        elapsed = time.perf_counter() - self.metrics_processor.time_last_log
        images_per_s = self.images_since_log / elapsed
        self.images_since_log = 0
        self.metrics_processor.log(
            self.step,
            avg_loss,
            max_loss,
            grad_norm.item(),
            extra_metrics={"lr": lr, "images_per_s_per_rank": images_per_s},
        )
        logger.info(f"step {self.step}: {images_per_s:.1f} images/s on this rank, lr {lr:.2e}")


def configure(job_config: JobConfig) -> None:
    """Values derived from the config, set once before the trainer is built."""
    patch = 16  # 8× autoencoder downsampling, then 2×2 patches
    if job_config.training.img_size % patch:
        raise ValueError(
            f"training.img_size {job_config.training.img_size} must be a multiple of 16"
        )
    if job_config.validation.enable:
        raise ValueError(
            "validation.enable: flux's validation (loss at fixed timesteps, sampled images) is "
            "not implemented yet; set it to false"
        )
    img_tokens = (job_config.training.img_size // patch) ** 2
    job_config.training.seq_len = img_tokens + job_config.encoder.max_t5_encoding_len


def main(argv: list[str] | None = None) -> None:
    from torchtitan.config import ConfigManager
    from torchtitan.tools.logging import init_logger

    init_logger()
    args = sys.argv[1:] if argv is None else argv
    if not any(a.startswith("--job.custom_config_module") for a in args):
        args = [*args, "--job.custom_config_module", "flux.job_config"]
    config = ConfigManager().parse_args(args)
    configure(config)
    os.environ.setdefault("LOCAL_RANK", "0")
    use_cpu_if_no_accelerator()
    trainer = None
    try:
        trainer = FluxTrainer(config)
        trainer.train()
    finally:
        if trainer is not None:
            trainer.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
