import pytest
import torch
from PIL import Image

from flux.data.transforms import image_to_tensor, resize_and_crop, to_rgb


def _solid(mode: str, size: tuple[int, int] = (40, 30)) -> Image.Image:
    if mode == "I;16":
        return Image.new("I;16", size, 65535)
    if mode == "P":
        return Image.new("RGB", size, (200, 10, 10)).convert("P", palette=Image.Palette.ADAPTIVE)
    color = {"L": 255, "RGBA": (0, 0, 0, 0), "CMYK": (0, 0, 0, 0), "LA": (0, 0)}[mode]
    return Image.new(mode, size, color)


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("L", (255, 255, 255)),
        ("RGBA", (255, 255, 255)),  # fully transparent: composited on white
        ("LA", (255, 255, 255)),
        ("CMYK", (255, 255, 255)),  # no ink
        ("I;16", (255, 255, 255)),  # 16-bit white scales to 8-bit white
        ("P", (200, 10, 10)),
    ],
)
def test_any_mode_becomes_rgb_with_the_right_colour(mode: str, expected: tuple) -> None:
    rgb = to_rgb(_solid(mode))
    assert rgb.mode == "RGB"
    assert rgb.getpixel((5, 5)) == pytest.approx(expected, abs=2)


def test_short_side_is_resized_and_the_centre_cropped() -> None:
    image = Image.new("RGB", (200, 100), (0, 0, 0))
    image.paste((255, 0, 0), (0, 0, 50, 100))  # left quarter red: cropped away
    out = resize_and_crop(image, 32)
    assert out.size == (32, 32)
    assert out.getpixel((0, 16))[0] < 30


def test_small_images_are_upscaled() -> None:
    assert resize_and_crop(Image.new("RGB", (5, 9)), 32).size == (32, 32)


def test_tensor_is_chw_in_minus_one_to_one() -> None:
    image = Image.new("RGB", (64, 48), (255, 0, 128))
    x = image_to_tensor(image, 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert torch.allclose(x[:, 0, 0], torch.tensor([1.0, -1.0, 128 / 127.5 - 1]), atol=1e-2)


def test_degenerate_size_is_refused() -> None:
    with pytest.raises(ValueError, match="degenerate"):
        resize_and_crop(Image.new("RGB", (0, 10)), 16)
