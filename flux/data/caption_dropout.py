"""Classifier-free-guidance caption dropout: each text encoder's caption is replaced by the
empty prompt independently, so the model learns unconditional predictions for both.

The draws are the same whether the captions are encoded online (the dropped ones become "")
or come from a precomputed cache (the dropped encodings become those of ""): the same
samples are dropped either way."""

from __future__ import annotations

import torch


def caption_generator(seed: int, rank: int) -> torch.Generator:
    """A random stream of its own for each data-parallel rank (the same seed on every rank
    would drop the same captions everywhere)."""
    return torch.Generator().manual_seed(seed * 100_003 + rank + 1)


def dropout_masks(
    count: int, prob: float, generator: torch.Generator | list[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(T5 mask, CLIP mask), each (count,) bool: True where that encoder gets the empty
    prompt, with probability prob, independently.

    generator: one for the batch, or one per caption (the trainer's per-sample streams)."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"classifier_free_guidance_prob {prob} must be in [0, 1]")
    if isinstance(generator, list):
        uniforms = torch.stack([torch.rand(2, generator=g) for g in generator], dim=1)
    else:
        uniforms = torch.rand(2, count, generator=generator)
    drop = uniforms < prob
    return drop[0], drop[1]


def drop_captions(
    captions: list[str], prob: float, generator: torch.Generator | list[torch.Generator]
) -> tuple[list[str], list[str]]:
    """(T5 captions, CLIP captions): each one emptied with probability prob, independently."""
    t5_drop, clip_drop = dropout_masks(len(captions), prob, generator)
    t5 = ["" if d else c for c, d in zip(captions, t5_drop.tolist())]
    clip = ["" if d else c for c, d in zip(captions, clip_drop.tolist())]
    return t5, clip
