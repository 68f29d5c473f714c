"""Frozen T5 and CLIP text encoders over transformers.

T5 gives per-token embeddings (B, L_txt, context_in_dim) from its last hidden state; CLIP
gives one pooled vector (B, vec_in_dim). Both load from a hub id or a local folder through
`from_pretrained`, and never train.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

ASSETS = Path(__file__).parents[1] / "assets"
# Names the debug flavor uses: folders shipped in flux/assets, no network needed.
BUNDLED = {"t5-debug": ASSETS / "t5-debug", "clip-debug": ASSETS / "clip-debug"}
T5_HUB_ID = "google/t5-v1_1-xxl"
CLIP_HUB_ID = "openai/clip-vit-large-patch14"
CLIP_MAX_LENGTH = 77  # CLIP's context: every FLUX.1 prompt is padded or cut to it


def resolve(name_or_path: str) -> str:
    """A bundled name, a local folder, or a hub id, as from_pretrained takes it."""
    return str(BUNDLED.get(name_or_path, name_or_path))


class TextEncoder(nn.Module):
    """Tokenizer + frozen encoder: captions -> T5 token embeddings or CLIP pooled vector."""

    def __init__(self, kind: str, name_or_path: str, max_length: int, dtype: torch.dtype):
        super().__init__()
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        if kind not in ("t5", "clip"):
            raise ValueError(f"unknown text encoder kind {kind!r}: use 't5' or 'clip'")
        source = resolve(name_or_path)
        model_class = T5EncoderModel if kind == "t5" else CLIPTextModel
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            self.model = model_class.from_pretrained(source, dtype=dtype)
        except OSError as e:
            raise OSError(
                f"cannot load the {kind} encoder from {name_or_path!r}: the hub is not "
                "reachable or the name is wrong; give a local folder saved with "
                f"save_pretrained (or 't5-debug'/'clip-debug' to try things out) ({e})"
            ) from e
        self.kind = kind
        self.max_length = max_length
        self.model.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> TextEncoder:
        return super().train(False)  # frozen: always in eval mode

    @torch.no_grad()
    def forward(self, captions: list[str]) -> Tensor:
        """captions -> T5: (B, max_length, D_t5); CLIP: (B, D_clip)."""
        tokens = self.tokenizer(
            captions,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        device = next(self.model.parameters()).device
        input_ids = tokens["input_ids"]
        if device.type != "cpu":  # pinned and asynchronous: the step does not wait for it
            input_ids = input_ids.pin_memory().to(device, non_blocking=True)
        if self.kind == "t5":
            return self.model(input_ids=input_ids).last_hidden_state
        return self.model(input_ids=input_ids).pooler_output
