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
from safetensors import SafetensorError
from torch import Tensor, nn
from torchtitan.tools.logging import logger

from flux.data.caption_dropout import drop_captions, dropout_masks
from flux.data.precomputed import TextTable
from flux.data.transforms import device_images
from flux.model.args import AutoEncoderParams
from flux.model.autoencoder import AutoEncoder, load_ae, posterior_latents
from flux.model.text_encoders import CLIP_MAX_LENGTH, TextEncoder
from flux.sampling import (
    Streams,
    image_ids,
    pack_latents,
    sample_timesteps,
    text_ids,
    to_device,
)

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


@dataclass(frozen=True)
class EncoderSettings:
    """The frozen encoders, as the [encoder] section names them."""

    t5_encoder: str  # hub id, local folder, or t5-debug
    clip_encoder: str
    max_t5_encoding_len: int
    autoencoder_path: str
    dtype: torch.dtype


@dataclass(frozen=True)
class FlowSettings:
    """How a training example is drawn ([training]), for a flavor with or without the
    guidance embedding."""

    dropout_prob: float  # caption dropout, for each encoder independently
    timestep_sampling: str  # uniform, logit_normal or flux_shift
    guidance: float  # the guidance embedding's input during training
    guidance_embed: bool


@dataclass
class FrozenParts:
    """Which frozen parts a run builds; the trainer decides from its data and validation.

    Data read online needs all of T5/CLIP and the autoencoder's encoder. Precomputed data
    needs no T5/CLIP (caption dropout takes the empty caption's encodings from the cache's
    text table, and validation samples prompts encoded there) and no encoder; validation
    keeps the decoder to draw its images."""

    text_encoders: bool
    latent_encoder: bool
    latent_decoder: bool
    texts: TextTable | None = None  # a precomputed cache's encoded texts


def build_text_encoders(
    settings: EncoderSettings, device: torch.device
) -> tuple[TextEncoder, TextEncoder]:
    """T5 and CLIP as the [encoder] section sets them (the trainer's and precompute's)."""
    encoders = []
    for kind, name, length in (
        ("t5", settings.t5_encoder, settings.max_t5_encoding_len),
        ("clip", settings.clip_encoder, CLIP_MAX_LENGTH),
    ):
        try:
            encoders.append(TextEncoder(kind, name, length, settings.dtype).to(device))
        except OSError as e:  # transformers' answer to a missing or unreachable model
            raise EncoderError(f"encoder.{kind}_encoder: {' '.join(str(e).split())}") from None
    return encoders[0], encoders[1]


def build_autoencoder(
    settings: EncoderSettings, params: AutoEncoderParams, device: torch.device
) -> AutoEncoder:
    """The autoencoder as the [encoder] section sets it, in its dtype, its encoder
    channels-last (see encode_images)."""
    try:
        autoencoder = load_ae(settings.autoencoder_path, params, device).to(settings.dtype)
    except (OSError, ValueError, SafetensorError) as e:
        raise EncoderError(f"encoder.autoencoder_path: {' '.join(str(e).split())}") from None
    # (Module.to takes memory_format; torch's type hints for it do not list it)
    autoencoder.encoder.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return autoencoder


class EncoderError(ValueError):
    """A frozen encoder that cannot be built from its setting; one line naming it."""


def encode_images(autoencoder: AutoEncoder, images: Tensor) -> Tensor:
    """Images (B, 3, H, W) on the encoder's device -> Gaussian moments (B, 2C, H/8, W/8).

    Channels-last: the layout GPUs' fused convolutions take, in which the attention's q, k
    and v come out contiguous (the fused attention kernels' input)."""
    return autoencoder.encoder(images.contiguous(memory_format=torch.channels_last))


class FluxPreprocessor:
    """Frozen T5, CLIP and autoencoder: a batch of images and captions -> a FlowBatch.
    Builds the parts `parts` names; a precomputed batch's encodings are used as they are."""

    def __init__(
        self,
        encoders: EncoderSettings,
        parts: FrozenParts,
        flow: FlowSettings,
        ae_params: AutoEncoderParams,
        device: torch.device,
    ):
        self.device = device
        self.dtype = encoders.dtype
        self.ae_params = ae_params
        self.settings = flow
        self.texts = parts.texts.to(device) if parts.texts is not None else None
        # TextEncoders, or what flux.parallel.frozen makes of them across ranks
        self.t5: nn.Module | None = None
        self.clip: nn.Module | None = None
        if parts.text_encoders:
            self.t5, self.clip = build_text_encoders(encoders, device)
        self.encodes_images = parts.latent_encoder
        self.autoencoder: AutoEncoder | None = None
        if parts.latent_encoder or parts.latent_decoder:
            self.autoencoder = build_autoencoder(encoders, ae_params, device)
            # free the half that never runs
            if not parts.latent_encoder:
                self.autoencoder.encoder.to("meta")
            if not parts.latent_decoder:
                self.autoencoder.decoder.to("meta")
        if self.texts is not None:
            built = {
                "T5/CLIP": parts.text_encoders,
                "autoencoder encoder": parts.latent_encoder,
                "autoencoder decoder": parts.latent_decoder,
            }
            names = ", ".join(name for name, used in built.items() if used)
            logger.info(f"precomputed data: frozen parts built: {names or 'none'}")

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
        masks = torch.stack(dropout_masks(len(captions), dropout_prob, streams.cpu))
        t5_drop, clip_drop = to_device(masks, self.device)  # one copy
        txt = torch.where(
            t5_drop[:, None, None],
            self.texts.lookup("t5", [""]),
            to_device(batch["t5"], self.device),
        )
        y = torch.where(
            clip_drop[:, None],
            self.texts.lookup("clip", [""]),
            to_device(batch["clip"], self.device),
        )
        return txt.float(), y.float()

    @torch.no_grad()
    def encode_latents(self, batch: dict[str, Any], streams: Streams) -> Tensor:
        """Scaled latents (B, C, h, w) sampled from the posterior: of the images' moments
        from the encoder, or a precomputed batch's stored moments."""
        if "moments" in batch:
            moments = to_device(batch["moments"], self.device)
        else:
            assert self.autoencoder is not None
            # uint8 -> [-1, 1]; pinned first (as it is where the loader pinned it), so the
            # copy to the device does not wait for it
            pixels = to_device(batch["images"], self.device)
            images = device_images(pixels, self.device, self.dtype)
            moments = encode_images(self.autoencoder, images)
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
        if self.settings.guidance_embed:
            inputs["guidance"] = torch.full((b,), self.settings.guidance, device=self.device)
        return FlowBatch(inputs, noise - x0)

    @torch.no_grad()
    def sample_flow(self, encoded: Encoded, streams: Streams) -> FlowBatch:
        """The FlowBatch at t from the configured sampling, with noise, both per sample."""
        kind, tokens = self.settings.timestep_sampling, encoded.x0.shape[1]
        t = torch.cat([sample_timesteps(kind, 1, tokens, g) for g in streams.cpu])
        noise = streams.randn(tuple(encoded.x0.shape[1:]), self.device)
        return self.flow(encoded, to_device(t, self.device), noise)

    def __call__(
        self,
        batch: dict[str, Any],
        streams: Streams,
        lap: Callable[[str], None] = lambda part: None,
    ) -> FlowBatch:
        """A training micro-batch: caption dropout, latents, t from the configured sampling.
        lap marks the end of the text and of the latent encoding (parts of the step)."""
        txt, y = self.encode_text(batch, self.settings.dropout_prob, streams)
        lap("text")
        latents = self.encode_latents(batch, streams)
        lap("latents")
        return self.sample_flow(Encoded.of(latents, txt, y), streams)


def flow_matching_loss(model: torch.nn.Module, batch: FlowBatch) -> Tensor:
    """Mean squared error between the predicted and the true velocity."""
    prediction = model(**batch.inputs)
    return F.mse_loss(prediction.float(), batch.target.float())


def flow_matching_losses(model: torch.nn.Module, batch: FlowBatch) -> Tensor:
    """(B,) each sample's mean squared error between the predicted and the true velocity."""
    prediction = model(**batch.inputs)
    errors = F.mse_loss(prediction.float(), batch.target.float(), reduction="none")
    return errors.flatten(1).mean(dim=1)
