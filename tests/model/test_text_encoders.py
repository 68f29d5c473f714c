from pathlib import Path

import pytest
import torch

from flux.model.args import flux_configs
from flux.model.text_encoders import CLIP_MAX_LENGTH, TextEncoder

DEBUG = flux_configs["flux-debug"]
CAPTIONS = ["a small red circle at the top left on a white background", ""]


@pytest.fixture(scope="module")
def t5() -> TextEncoder:
    return TextEncoder("t5", "t5-debug", max_length=16, dtype=torch.float32)


@pytest.fixture(scope="module")
def clip() -> TextEncoder:
    return TextEncoder("clip", "clip-debug", max_length=CLIP_MAX_LENGTH, dtype=torch.float32)


def test_t5_gives_padded_token_embeddings_of_the_flavor_width(t5: TextEncoder) -> None:
    out = t5(CAPTIONS)
    assert out.shape == (2, 16, DEBUG.context_in_dim)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])  # the caption matters


def test_long_captions_are_truncated_to_the_configured_length(t5: TextEncoder) -> None:
    assert t5([" ".join(CAPTIONS[:1] * 10)]).shape == (1, 16, DEBUG.context_in_dim)


def test_clip_gives_a_pooled_vector_of_the_flavor_width(clip: TextEncoder) -> None:
    out = clip(CAPTIONS)
    assert out.shape == (2, DEBUG.vec_in_dim)
    assert not torch.allclose(out[0], out[1])


def test_encoders_are_frozen_and_stay_in_eval_mode(t5: TextEncoder) -> None:
    t5.train()
    assert not t5.training and not t5.model.training
    assert not any(p.requires_grad for p in t5.parameters())
    assert not t5(CAPTIONS).requires_grad


def test_a_local_folder_loads_like_a_hub_id(t5: TextEncoder, tmp_path: Path) -> None:
    t5.model.save_pretrained(tmp_path)
    t5.tokenizer.save_pretrained(tmp_path)
    local = TextEncoder("t5", str(tmp_path), max_length=16, dtype=torch.float32)
    assert torch.equal(local(CAPTIONS), t5(CAPTIONS))


def test_an_unreachable_hub_id_says_what_to_do() -> None:
    with pytest.raises(OSError, match="cannot load the clip encoder.*local folder"):
        TextEncoder("clip", "nobody/no-such-clip", max_length=CLIP_MAX_LENGTH, dtype=torch.float32)
