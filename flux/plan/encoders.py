"""The frozen T5, CLIP and autoencoder at their real sizes, built without their weights.

The trainer loads the published encoders by hub id; the planner only needs their shapes.
For the two the full-size configs name, the shapes are written here, from the
config.json files on the hub; for the bundled debug encoders and for local folders they
are read from the folder's config.json. The autoencoder's shape is the flavor's
AutoEncoderParams. Weights stay uninitialized (or fake): memory, FLOPs and traffic do not
depend on them.

Dimension key: B batch, L_txt T5 tokens, H, W image height and width.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flux.model.args import AutoEncoderParams
from flux.model.autoencoder import AutoEncoder
from flux.model.text_encoders import CLIP_HUB_ID, T5_HUB_ID, resolve

CLIP_MAX_LENGTH = 77  # as flux.flow: CLIP reads 77 tokens

# https://huggingface.co/google/t5-v1_1-xxl/blob/main/config.json (the encoder half: 4.76B
# parameters; FLUX.1 uses its last hidden state, 4096 wide).
T5_V1_1_XXL: dict[str, Any] = {
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_heads": 64,
    "num_layers": 24,
    "vocab_size": 32128,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "tie_word_embeddings": False,
}
# https://huggingface.co/openai/clip-vit-large-patch14/blob/main/config.json, text_config
# (123M parameters; FLUX.1 uses its pooled output, 768 wide).
CLIP_VIT_L_14_TEXT: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
PUBLISHED = {T5_HUB_ID: T5_V1_1_XXL, CLIP_HUB_ID: CLIP_VIT_L_14_TEXT}


def encoder_config(kind: str, name: str) -> Any:
    """The transformers config of the T5 ("t5") or CLIP ("clip") encoder a job names."""
    from transformers import AutoConfig, CLIPTextConfig, T5Config

    from flux.config import ConfigError

    config_class = T5Config if kind == "t5" else CLIPTextConfig
    if name in PUBLISHED:
        return config_class(**PUBLISHED[name])
    folder = Path(resolve(name))
    if (folder / "config.json").is_file():
        return AutoConfig.from_pretrained(folder)
    raise ConfigError(
        f"encoder.{kind}_encoder {name!r}: the planner knows the shapes of "
        f"{T5_HUB_ID if kind == 't5' else CLIP_HUB_ID} and of local folders with a "
        "config.json; give one of those"
    )


def _empty(module_fn: Any, dtype: torch.dtype, device: torch.device) -> nn.Module:
    default = torch.get_default_dtype()
    # Made in place, in dtype: moving a transformers model's meta parameters to fake
    # tensors fails (its tied embeddings hold weak references).
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            module = module_fn()
    finally:
        torch.set_default_dtype(default)
    module.requires_grad_(False)
    return module.eval()


@dataclass
class FrozenEncoders:
    """What a rank holds of the frozen encoders, and what it runs of them per micro-batch.

    online: T5 and CLIP encode captions and the autoencoder's encoder encodes images at
    every step (the trainer keeps the whole autoencoder). Precomputed: the cache holds
    their outputs; nothing is built but, when validation samples images, the decoder."""

    t5: nn.Module | None
    clip: nn.Module | None
    autoencoder: AutoEncoder | None
    online: bool
    t5_tokens: int
    dtype: torch.dtype

    def parameters(self) -> list[Tensor]:
        modules = [m for m in (self.t5, self.clip, self.autoencoder) if m is not None]
        return [p for m in modules for p in m.parameters()]

    @torch.no_grad()
    def encode(self, batch: int, img_size: int, device: torch.device) -> tuple[Tensor, ...]:
        """A micro-batch's T5 tokens (B, L_txt, D_t5), CLIP vector (B, D_clip) and latent
        moments (B, 2C, H/8, W/8), as the trainer gets them (all float32 but the moments,
        in the encoders' dtype)."""
        assert self.t5 is not None and self.clip is not None and self.autoencoder is not None
        t5_ids = torch.zeros(batch, self.t5_tokens, dtype=torch.long, device=device)
        clip_ids = torch.zeros(batch, CLIP_MAX_LENGTH, dtype=torch.long, device=device)
        txt = self.t5(input_ids=t5_ids).last_hidden_state.float()
        y = self.clip(input_ids=clip_ids).pooler_output.float()
        images = torch.randn(batch, 3, img_size, img_size, device=device, dtype=self.dtype)
        moments = self.autoencoder.encoder(images)
        return txt, y, moments


def build_frozen_encoders(
    t5_name: str,
    clip_name: str,
    t5_tokens: int,
    ae_params: AutoEncoderParams,
    dtype: torch.dtype,
    online: bool,
    validation_images: bool,
    device: torch.device,
) -> FrozenEncoders:
    """The frozen models a rank of the trainer holds (see FluxPreprocessor)."""
    from transformers import CLIPTextModel, T5EncoderModel

    t5 = clip = autoencoder = None
    if online:
        t5_config, clip_config = encoder_config("t5", t5_name), encoder_config("clip", clip_name)
        t5 = _empty(lambda: T5EncoderModel(t5_config), dtype, device)
        clip = _empty(lambda: CLIPTextModel(clip_config), dtype, device)
    if online or validation_images:
        autoencoder = _empty(lambda: AutoEncoder(ae_params), dtype, device)
        if not online:
            autoencoder.encoder = None  # type: ignore[assignment]  # only the decoder stays
    return FrozenEncoders(t5, clip, autoencoder, online, t5_tokens, dtype)  # type: ignore[arg-type]
