"""Classifier-free-guidance caption dropout: each text encoder's caption is replaced by the
empty prompt independently, so the model learns unconditional predictions for both."""

from __future__ import annotations

import torch


def caption_generator(seed: int, rank: int) -> torch.Generator:
    """A random stream of its own for each data-parallel rank (the same seed on every rank
    would drop the same captions everywhere)."""
    return torch.Generator().manual_seed(seed * 100_003 + rank + 1)


def drop_captions(
    captions: list[str], prob: float, generator: torch.Generator | list[torch.Generator]
) -> tuple[list[str], list[str]]:
    """(T5 captions, CLIP captions): each one emptied with probability prob, independently.

    generator: one for the batch, or one per caption (the trainer's per-sample streams)."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"classifier_free_guidance_prob {prob} must be in [0, 1]")
    if isinstance(generator, list):
        uniforms = torch.stack([torch.rand(2, generator=g) for g in generator], dim=1)
    else:
        uniforms = torch.rand(2, len(captions), generator=generator)
    drop = uniforms < prob
    t5 = ["" if d else c for c, d in zip(captions, drop[0].tolist())]
    clip = ["" if d else c for c, d in zip(captions, drop[1].tolist())]
    return t5, clip
