"""The learning check: the debug model, trained on shapes on the CPU for a few hundred
steps through ./run_train.sh, lowers its validation loss clearly and samples red shapes for
"a red ..." prompts (and not for the others). Takes a few minutes on 2 cores."""

from __future__ import annotations

import numpy as np
from PIL import Image

from flux.generate import grid_tiles
from tests.launch import run_train

STEPS = 300


def red_fraction(image: Image.Image) -> float:
    """Share of the central quarter's pixels that are clearly red (the prompts ask for a
    large shape at the center, which covers it)."""
    pixels = np.asarray(image.convert("RGB")).astype(int)
    h, w, _ = pixels.shape
    centre = pixels[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4]
    r, g, b = centre[..., 0], centre[..., 1], centre[..., 2]
    return float(((r > 130) & (g < 100) & (b < 100)).mean())


def test_debug_model_learns_shapes_and_their_colours(tmp_path) -> None:
    run = run_train(
        tmp_path,
        "--training.steps",
        str(STEPS),
        "--validation.freq",
        str(STEPS),
        "--metrics.log_freq",
        "50",
        "--debug.seed",
        "0",
        timeout=1200,
    )
    assert run.returncode == 0, run.output[-3000:]
    first, last = run.validation_losses[1], run.validation_losses[STEPS]
    assert last < 0.6 * first, (first, last)

    tiles = grid_tiles(str(tmp_path / "validation" / f"step_{STEPS:06d}.png"))
    fractions = {prompt: red_fraction(image) for prompt, image in tiles}
    for prompt, fraction in fractions.items():
        if " red " in prompt:
            assert fraction > 0.5, fractions
        else:
            assert fraction < 0.1, fractions
