import pytest

from flux.data.caption_dropout import caption_generator, drop_captions


def test_each_encoder_drops_at_the_configured_rate_independently() -> None:
    captions = ["a red circle"] * 20_000
    t5, clip = drop_captions(captions, 0.1, caption_generator(0, 0))
    t5_dropped = [c == "" for c in t5]
    clip_dropped = [c == "" for c in clip]
    assert sum(t5_dropped) / len(captions) == pytest.approx(0.1, abs=0.01)
    assert sum(clip_dropped) / len(captions) == pytest.approx(0.1, abs=0.01)
    both = sum(a and b for a, b in zip(t5_dropped, clip_dropped)) / len(captions)
    assert both == pytest.approx(0.01, abs=0.004)  # independent: 0.1 × 0.1


def test_ranks_drop_different_captions() -> None:
    captions = [f"caption {i}" for i in range(200)]
    rank0, _ = drop_captions(captions, 0.5, caption_generator(0, 0))
    rank1, _ = drop_captions(captions, 0.5, caption_generator(0, 1))
    assert rank0 != rank1


@pytest.mark.parametrize("prob, kept", [(0.0, 50), (1.0, 0)])
def test_extreme_rates(prob: float, kept: int) -> None:
    t5, clip = drop_captions(["x"] * 50, prob, caption_generator(1, 0))
    assert t5.count("x") == clip.count("x") == kept


def test_a_rate_outside_zero_one_is_refused() -> None:
    with pytest.raises(ValueError, match="classifier_free_guidance_prob"):
        drop_captions(["x"], 1.5, caption_generator(0, 0))
