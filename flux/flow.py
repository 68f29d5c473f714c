"""One training example of rectified flow: the frozen encoders, then x_t and the target.

Per micro-batch: captions -> (caption dropout) -> T5 token embeddings and CLIP pooled
vector; images -> autoencoder latents (sampled from the posterior) -> packed 2×2 patches x0;
t from the configured sampling; x_t = (1 - t)·x0 + t·noise; the model predicts noise - x0
and the loss is the mean squared error. All randomness comes from per-sample Streams
(flux.sampling). Used by the trainer's step and by validation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchtitan.config import JobConfig

from flux.data.caption_dropout import drop_captions
from flux.model.args import FluxModelArgs
from flux.model.autoencoder import AutoEncoder, load_ae
from flux.model.text_encoders import TextEncoder
from flux.parallelize import DTYPES
from flux.sampling import Streams, image_ids, pack_latents, sample_timesteps, text_ids

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
