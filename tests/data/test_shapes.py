import numpy as np

from flux.data.shapes import BACKGROUNDS, COLORS, shape_spec, shapes_sample


def test_sample_is_deterministic_from_seed_and_index() -> None:
    a_img, a_cap = shapes_sample(seed=3, index=17, img_size=32)
    b_img, b_cap = shapes_sample(seed=3, index=17, img_size=32)
    assert a_cap == b_cap and np.array_equal(np.asarray(a_img), np.asarray(b_img))
    captions = {shapes_sample(seed=3, index=i, img_size=8)[1] for i in range(50)}
    assert len(captions) > 20
    assert shape_spec(4, 17) != shape_spec(3, 17) or shape_spec(4, 18) != shape_spec(3, 18)


def test_caption_names_what_is_drawn() -> None:
    for index in range(30):
        spec = shape_spec(0, index)
        image, caption = shapes_sample(0, index, img_size=64)
        assert caption.startswith(f"a {spec.size} {spec.color} {spec.shape} at ")
        assert caption.endswith(f"on a {spec.background} background")
        pixels = np.asarray(image).reshape(-1, 3)
        # The shape's colour and the background's colour are both present.
        assert (np.abs(pixels - COLORS[spec.color]).sum(1) == 0).sum() > 20
        assert (np.abs(pixels - BACKGROUNDS[spec.background]).sum(1) == 0).sum() > 64 * 64 // 4
