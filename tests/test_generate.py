"""Text to image at any width and height that are multiples of 16, and the grid of images
of several sizes that validation writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flux import generate as generate_module
from flux.generate import SampleSettings, generate, grid_tiles, image_grid, to_pil
from flux.model.args import flux_configs
from flux.model.autoencoder import AutoEncoder
from flux.model.model import FluxModel
from flux.sampling import get_schedule
from tests.model.helpers import randomize

ARGS = flux_configs["flux-debug"]


def sample(settings: SampleSettings, prompts: int = 2) -> torch.Tensor:
    model, autoencoder = FluxModel(ARGS), AutoEncoder(ARGS.autoencoder_params)
    randomize(model, std=0.05)

    def t5(captions: list[str]) -> torch.Tensor:
        return torch.ones(len(captions), 3, ARGS.context_in_dim)

    def clip(captions: list[str]) -> torch.Tensor:
        return torch.ones(len(captions), ARGS.vec_in_dim)

    captions = [f"prompt {i}" for i in range(prompts)]
    return generate(model, t5, clip, autoencoder, captions, settings, guidance_embed=True)


def test_a_non_square_image_has_its_height_and_width_and_shifts_by_its_tokens(
    monkeypatch,
) -> None:
    token_counts: list[int] = []

    def recording_schedule(steps: int, image_seq_len: int, shift: bool) -> list[float]:
        token_counts.append(image_seq_len)
        return get_schedule(steps, image_seq_len, shift)

    monkeypatch.setattr(generate_module, "get_schedule", recording_schedule)
    images = sample(SampleSettings(width=48, height=32, steps=2, cfg_scale=1.0, shift=True))
    assert images.shape == (2, 3, 32, 48)
    assert token_counts == [(32 // 16) * (48 // 16)]
    assert torch.isfinite(images).all()


@pytest.mark.parametrize("side", ["width", "height"])
def test_a_side_that_is_not_a_multiple_of_16_is_refused_in_one_line(side: str) -> None:
    with pytest.raises(ValueError, match=rf"^{side} = 40: use a positive multiple of 16$"):
        sample(SampleSettings(**{side: 40}, steps=1))  # type: ignore[arg-type]


def test_the_grid_gives_back_every_tile_at_its_own_size(tmp_path) -> None:
    gen = torch.Generator().manual_seed(0)
    rows = [torch.rand(2, 3, h, w, generator=gen) * 2 - 1 for h, w in ((16, 48), (48, 32))]
    grid, info = image_grid(rows, ["a", "b"])
    assert grid.height > 2 * 48 * 2  # one row per size, scaled up (and captions)
    grid.save(tmp_path / "grid.png", pnginfo=info)
    tiles = [
        (prompt, np.asarray(image)) for prompt, image in grid_tiles(str(tmp_path / "grid.png"))
    ]
    expected = [(p, np.asarray(to_pil(images[i]))) for images in rows for i, p in enumerate("ab")]
    assert [p for p, _ in tiles] == [p for p, _ in expected]
    for (_, got), (_, want) in zip(tiles, expected):
        assert got.shape == want.shape and np.array_equal(got, want)
