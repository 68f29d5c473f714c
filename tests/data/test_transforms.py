import io

import pytest
import torch
from PIL import Image

from flux.data.transforms import (
    device_images,
    image_to_tensor,
    load_image,
    resize_and_crop,
    to_rgb,
)


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


def test_tensor_is_chw_uint8_and_minus_one_to_one_on_the_device() -> None:
    image = Image.new("RGB", (64, 48), (255, 0, 128))
    x = image_to_tensor(image, 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8
    assert x[:, 0, 0].tolist() == [255, 0, 128]
    for dtype in (torch.float32, torch.bfloat16):
        model_input = device_images(x[None], "cpu", dtype)
        assert model_input.dtype == dtype and model_input.shape == (1, 3, 16, 16)
        # float32 arithmetic (what the float32 tensors of before were), then rounded once
        expected = (torch.tensor([255.0, 0.0, 128.0]) / 127.5 - 1).to(dtype)
        assert torch.equal(model_input[0, :, 0, 0], expected)


def _jpeg(image: Image.Image, orientation: int | None = None) -> bytes:
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation  # EXIF Orientation
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def test_exif_orientation_is_applied() -> None:
    # Stored landscape, red on the left; orientation 6: the camera was turned a quarter
    # clockwise, so upright the image is portrait with the red at the top.
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 20))
    upright = load_image(_jpeg(stored, orientation=6))
    assert upright.size == (20, 40)
    assert upright.getpixel((10, 2))[0] > 200 and upright.getpixel((10, 37))[2] > 200
    assert load_image(_jpeg(stored)).size == (40, 20)


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_never_below_the_target() -> None:
    square = _jpeg(Image.new("RGB", (1024, 1024), (10, 200, 30)))
    assert load_image(square, 256).size == (256, 256)  # 1/4, in the decoder
    assert load_image(square, 512).size == (512, 512)
    assert load_image(square).size == (1024, 1024)
    wide = _jpeg(Image.new("RGB", (1024, 768), (10, 200, 30)))
    assert load_image(wide, 256).size == (512, 384)  # 1/4 would be below 256
    assert load_image(wide, 96).size == (128, 96)  # 1/8
    assert load_image(wide, 400).size == (1024, 768)  # less than twice the target


def test_degenerate_size_is_refused() -> None:
    with pytest.raises(ValueError, match="degenerate"):
        resize_and_crop(Image.new("RGB", (0, 10)), 16)
