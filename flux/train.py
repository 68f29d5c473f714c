"""FluxTrainer: torchtitan's Trainer with the rectified-flow training step of FLUX.

    torchrun --nproc_per_node N -m flux.train --job.config_file flux/train_configs/debug_model.toml

Per micro-batch: captions -> (caption dropout) -> T5 token embeddings and CLIP pooled
vector; images -> autoencoder latents (sampled from the posterior) -> packed 2×2 patches x0;
t from the configured sampling; x_t = (1 - t)·x0 + t·noise; the model predicts noise - x0
and the loss is the mean squared error. Randomness (dropout, t, posterior and flow noise)
comes from a generator per sample seeded by (seed, step, the sample's data key): ranks
differ, and a resumed run, with gradient accumulation or on another world size, draws for
each sample exactly what the unbroken run drew.
"""

from __future__ import annotations

import hashlib
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

from flux.checkpoint import install_load_hooks
from flux.config import ConfigError, check_config, parse_config
from flux.data.caption_dropout import drop_captions
from flux.device import use_cpu_if_no_accelerator
from flux.model.args import FluxModelArgs
from flux.model.autoencoder import AutoEncoder, load_ae
from flux.model.text_encoders import TextEncoder
from flux.parallelize import DTYPES
from flux.sampling import image_ids, pack_latents, sample_timesteps, text_ids
from flux.validate import FluxValidator

CLIP_MAX_LENGTH = 77


@dataclass
class FlowBatch:
    """What the model sees for one micro-batch, and its velocity target."""

    inputs: dict[str, Tensor]  # FluxModel.forward keyword arguments
    target: Tensor  # (B, L_img, C): noise - x0


@dataclass
class Encoded:
    """A micro-batch after the frozen encoders."""

    x0: Tensor  # (B, L_img, 4C) packed latents
    txt: Tensor  # (B, L_txt, D_t5)
    y: Tensor  # (B, D_clip)
    height: int  # latent height and width
    width: int


def sample_generator(seed: int, step: int, key: str, device: torch.device | str) -> torch.Generator:
    """The random stream of one sample in one step, named by the sample's data key.

    Stateless, so a resumed run draws exactly what the unbroken run would have; tied to the
    sample rather than to a rank or a position in a micro-batch, so data-parallel ranks
    draw differently (their samples differ), and gradient accumulation, or a resume on
    another world size, draws for each sample what the original layout drew."""
    digest = hashlib.blake2b(f"{seed}/{step}/{key}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest) % (2**63 - 1))


@dataclass
class Streams:
    """One CPU stream (caption dropout, timestep) and one device stream (noise) per sample."""

    cpu: list[torch.Generator]
    device: list[torch.Generator]

    @classmethod
    def of(cls, seed: int, step: int, keys: list[str], device: torch.device) -> Streams:
        return cls(
            [sample_generator(seed, step, key, "cpu") for key in keys],
            [sample_generator(seed, step, key, device) for key in keys],
        )

    def randn(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """(B, *shape) standard normal, row i from sample i's device stream."""
        return torch.stack([torch.randn(shape, generator=g, device=device) for g in self.device])


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
    def encode(
        self,
        batch: dict[str, Any],
        dropout_prob: float,
        streams: Streams,
    ) -> Encoded:
        """Captions (after caption dropout) -> T5 and CLIP; images -> sampled, packed latents."""
        images = batch["images"].to(self.device, self.dtype)
        t5_captions, clip_captions = drop_captions(batch["captions"], dropout_prob, streams.cpu)
        moments = self.autoencoder.encoder(images)
        c, h, w = moments.shape[1] // 2, moments.shape[2], moments.shape[3]
        noise = streams.randn((c, h, w), self.device)
        latents = self.autoencoder.scale_latents(moments, noise=noise).float()
        return Encoded(
            pack_latents(latents),
            self.t5(t5_captions).float(),
            self.clip(clip_captions).float(),
            h,
            w,
        )

    def flow(self, encoded: Encoded, t: Tensor, noise: Tensor) -> FlowBatch:
        """The model's inputs at timesteps t (B,) and the velocity target."""
        x0 = encoded.x0
        b = x0.shape[0]
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        inputs = {
            "img": x_t,
            "img_ids": image_ids(b, encoded.height, encoded.width, self.device),
            "txt": encoded.txt,
            "txt_ids": text_ids(b, encoded.txt.shape[1], self.device),
            "timesteps": t,
            "y": encoded.y,
        }
        if self.guidance_embed:
            inputs["guidance"] = torch.full((b,), self.guidance, device=self.device)
        return FlowBatch(inputs, noise - x0)

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any], streams: Streams) -> FlowBatch:
        """A training micro-batch: caption dropout, latents, t from the configured sampling."""
        encoded = self.encode(batch, self.dropout_prob, streams)
        x0 = encoded.x0
        kind, tokens = self.timestep_sampling, x0.shape[1]
        t = torch.cat([sample_timesteps(kind, 1, tokens, g) for g in streams.cpu])
        noise = streams.randn(tuple(x0.shape[1:]), self.device)
        return self.flow(encoded, t.to(self.device), noise)


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
        install_load_hooks(self.checkpointer, self.dataloader)
        batch_mesh = self.parallel_dims.get_optional_mesh("batch")
        self.dp_rank = batch_mesh.get_local_rank() if batch_mesh is not None else 0
        self.images_since_log = 0
        self.flux_validator: FluxValidator | None = None
        if job_config.validation.enable:
            assert isinstance(self.validator, FluxValidator)
            self.flux_validator = self.validator
            self.flux_validator.attach(self.preprocess, self.device)

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

    def flow_batch(self, batch: dict[str, Any]) -> FlowBatch:
        streams = Streams.of(
            self.job_config.training.seed_data, self.step, batch["keys"], self.device
        )
        return self.preprocess(batch, streams)

    def train_step(self, data_iterator: Iterator[dict[str, Any]]) -> None:  # type: ignore[override]
        """One optimizer step over gradient_accumulation_steps micro-batches, its metrics, and
        validation when due: inside the step, so the step's checkpoint comes after it."""
        lr = self.lr_schedulers.schedulers[0].get_last_lr()[0]
        loss, grad_norm = self.optimize(data_iterator)
        if self.metrics_processor.should_log(self.step):
            self.log_step(loss, grad_norm, lr)
        if self.flux_validator is not None and self.flux_validator.is_due(self.step):
            self.flux_validator.validate(self.model_parts, self.step)
            self.images_since_log = 0  # the metrics' clock restarts after validation

    def optimize(self, data_iterator: Iterator[dict[str, Any]]) -> tuple[Tensor, Tensor]:
        self.optimizers.zero_grad()
        model = self.model_parts[0]
        accumulation = self.gradient_accumulation_steps
        losses = []
        for _ in range(accumulation):
            batch = next(data_iterator)
            self.images_since_log += len(batch["captions"])
            flow = self.flow_batch(batch)
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
        return torch.stack(losses).sum(), grad_norm

    def log_step(self, loss: Tensor, grad_norm: Tensor, lr: float) -> None:
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


def main(argv: list[str] | None = None) -> None:
    from torchtitan.tools.logging import init_logger

    init_logger()
    args = sys.argv[1:] if argv is None else argv
    try:
        config = parse_config(args)
        check_config(config)
    except ConfigError as e:
        print(f"flux: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
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
