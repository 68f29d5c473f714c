"""One training example of rectified flow: the frozen encoders, then x_t and the target.

Per micro-batch: captions -> (caption dropout) -> T5 token embeddings and CLIP pooled
vector; images -> autoencoder latents (sampled from the posterior) -> packed 2×2 patches x0;
t from the configured sampling; x_t = (1 - t)·x0 + t·noise; the model predicts noise - x0
and the loss is the mean squared error. All randomness comes from per-sample Streams
(flux.sampling). Used by the trainer's step and by validation.

A batch of the `precomputed` source carries the encoders' outputs instead (t5, clip, latent
moments): the same draws, in the same order, turn them into the same FlowBatch, and the
encoders it replaces are not built (see FluxPreprocessor).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchtitan.config import JobConfig
from torchtitan.tools.logging import logger

from flux.data.caption_dropout import drop_captions, dropout_masks
from flux.data.precomputed import TextTable
from flux.data.transforms import device_images
from flux.model.args import AutoEncoderParams, FluxModelArgs
from flux.model.autoencoder import AutoEncoder, load_ae, posterior_latents
from flux.model.text_encoders import TextEncoder
from flux.parallelize import DTYPES
from flux.sampling import Streams, image_ids, pack_latents, sample_timesteps, text_ids

CLIP_MAX_LENGTH = 77
PRECOMPUTED = "precomputed"  # the dataset source whose batches are already encoded

TextFn = Callable[[list[str]], Tensor]  # captions -> T5 (B, L, D_t5) or CLIP (B, D_clip)


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

    @classmethod
    def of(cls, latents: Tensor, txt: Tensor, y: Tensor) -> Encoded:
        """From latents (B, C, h, w) and the text encodings."""
        return cls(pack_latents(latents), txt, y, latents.shape[2], latents.shape[3])


def build_text_encoders(encoder: Any, device: torch.device) -> tuple[TextEncoder, TextEncoder]:
    """T5 and CLIP as the [encoder] section sets them (the trainer's and precompute's)."""
    dtype = DTYPES[encoder.encoder_dtype]
    t5 = TextEncoder("t5", encoder.t5_encoder, encoder.max_t5_encoding_len, dtype).to(device)
    clip = TextEncoder("clip", encoder.clip_encoder, CLIP_MAX_LENGTH, dtype).to(device)
    return t5, clip


def build_autoencoder(encoder: Any, params: AutoEncoderParams, device: torch.device) -> AutoEncoder:
    """The autoencoder as the [encoder] section sets it, in encoder_dtype."""
    return load_ae(encoder.autoencoder_path, params, device).to(DTYPES[encoder.encoder_dtype])


class FluxPreprocessor:
    """Frozen T5, CLIP and autoencoder: a batch of images and captions -> a FlowBatch.

    Only what the run uses is built. Data read online (a training set, or a validation set,
    that is not `precomputed`) needs all three. With precomputed data: no T5/CLIP (caption
    dropout takes the empty caption's encodings from the cache, and validation images are
    sampled for prompts encoded in the cache, if all of validation.sample_prompts are; T5
    and CLIP are built for them otherwise) and no autoencoder encoder (validation keeps
    the decoder to draw its images).
    """

    def __init__(self, job_config: JobConfig, model_args: FluxModelArgs, device: torch.device):
        enc, training, validation = job_config.encoder, job_config.training, job_config.validation
        self.device = device
        self.dtype = DTYPES[enc.encoder_dtype]
        self.ae_params = model_args.autoencoder_params
        validating = validation.enable
        sections = [training, validation] if validating else [training]
        caches = [s.dataset_path for s in sections if s.dataset == PRECOMPUTED]
        online = any(s.dataset != PRECOMPUTED for s in sections)
        self.texts = TextTable.read(caches[0]).to(device) if caches else None
        prompts_cached = self.texts is not None and self.texts.has(["", *validation.sample_prompts])

        self.t5: TextEncoder | None = None
        self.clip: TextEncoder | None = None
        if online or (validating and not prompts_cached):
            self.t5, self.clip = build_text_encoders(enc, device)
        self.autoencoder: AutoEncoder | None = None
        if online or validating:
            self.autoencoder = build_autoencoder(enc, self.ae_params, device)
            if not online:
                self.autoencoder.encoder.to("meta")  # only the decoder runs: free the rest
        if caches:
            parts = {
                "T5/CLIP": self.t5 is not None,
                "autoencoder encoder": online,
                "autoencoder decoder": self.autoencoder is not None,
            }
            built = ", ".join(name for name, used in parts.items() if used)
            logger.info(f"precomputed data: frozen parts built: {built or 'none'}")

        self.guidance_embed = model_args.guidance_embed
        self.dropout_prob = training.classifier_free_guidance_prob
        self.timestep_sampling = training.timestep_sampling
        self.guidance = training.guidance

    def text_encoders(self) -> tuple[TextFn, TextFn]:
        """T5 and CLIP for prompts: the encoders, or the cache's encoded texts without them."""
        if self.t5 is not None and self.clip is not None:
            return self.t5, self.clip
        assert self.texts is not None, "FluxPreprocessor builds the encoders without a cache"
        return partial(self.texts.lookup, "t5"), partial(self.texts.lookup, "clip")

    @torch.no_grad()
    def encode_text(
        self, batch: dict[str, Any], dropout_prob: float, streams: Streams
    ) -> tuple[Tensor, Tensor]:
        """Caption dropout, then T5 (B, L_txt, D_t5) and CLIP (B, D_clip) in float32.

        A precomputed batch's encodings are used as they are, the dropped ones replaced by
        the empty caption's: the same draws drop the same samples as online."""
        captions = batch["captions"]
        if "t5" not in batch:
            assert self.t5 is not None and self.clip is not None
            t5_captions, clip_captions = drop_captions(captions, dropout_prob, streams.cpu)
            return self.t5(t5_captions).float(), self.clip(clip_captions).float()
        assert self.texts is not None
        t5_drop, clip_drop = (
            m.to(self.device) for m in dropout_masks(len(captions), dropout_prob, streams.cpu)
        )
        txt = torch.where(
            t5_drop[:, None, None], self.texts.lookup("t5", [""]), batch["t5"].to(self.device)
        )
        y = torch.where(
            clip_drop[:, None], self.texts.lookup("clip", [""]), batch["clip"].to(self.device)
        )
        return txt.float(), y.float()

    @torch.no_grad()
    def encode_latents(self, batch: dict[str, Any], streams: Streams) -> Tensor:
        """Scaled latents (B, C, h, w) sampled from the posterior: of the images' moments
        from the encoder, or a precomputed batch's stored moments."""
        if "moments" in batch:
            moments = batch["moments"].to(self.device)
        else:
            assert self.autoencoder is not None
            images = device_images(batch["images"], self.device, self.dtype)  # uint8 -> [-1, 1]
            moments = self.autoencoder.encoder(images)
        c, h, w = moments.shape[1] // 2, moments.shape[2], moments.shape[3]
        noise = streams.randn((c, h, w), self.device)
        return posterior_latents(moments, self.ae_params, noise).float()

    def encode(self, batch: dict[str, Any], dropout_prob: float, streams: Streams) -> Encoded:
        """Captions (after caption dropout) -> T5 and CLIP; images -> sampled, packed latents."""
        txt, y = self.encode_text(batch, dropout_prob, streams)
        return Encoded.of(self.encode_latents(batch, streams), txt, y)

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
    def sample_flow(self, encoded: Encoded, streams: Streams) -> FlowBatch:
        """The FlowBatch at t from the configured sampling, with noise, both per sample."""
        kind, tokens = self.timestep_sampling, encoded.x0.shape[1]
        t = torch.cat([sample_timesteps(kind, 1, tokens, g) for g in streams.cpu])
        noise = streams.randn(tuple(encoded.x0.shape[1:]), self.device)
        return self.flow(encoded, t.to(self.device), noise)

    def __call__(self, batch: dict[str, Any], streams: Streams) -> FlowBatch:
        """A training micro-batch: caption dropout, latents, t from the configured sampling."""
        return self.sample_flow(self.encode(batch, self.dropout_prob, streams), streams)


def flow_matching_loss(model: torch.nn.Module, batch: FlowBatch) -> Tensor:
    """Mean squared error between the predicted and the true velocity."""
    prediction = model(**batch.inputs)
    return F.mse_loss(prediction.float(), batch.target.float())
