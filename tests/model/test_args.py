import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from flux.model.args import FluxModelArgs, flux_configs, training_flops_per_sample
from flux.model.model import FluxModel
from tests.model.helpers import model_inputs, randomize, small_args


@pytest.mark.parametrize("guidance_embed", [True, False], ids=["dev", "schnell"])
def test_flop_count_matches_flop_counter_for_forward_and_backward(guidance_embed: bool) -> None:
    args = small_args(guidance_embed=guidance_embed)
    model = FluxModel(args)
    randomize(model)
    batch, h, w, txt_len = 2, 4, 6, 7
    inputs = model_inputs(args, batch=batch, h=h, w=w, txt_len=txt_len)

    # The math backend runs attention as matmuls, which the counter sees on the CPU.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**inputs).square().mean().backward()

    expected = batch * training_flops_per_sample(args, img_tokens=h * w, txt_tokens=txt_len)
    assert counter.get_total_flops() == expected


def test_flops_per_token_counts_matmuls_and_attention() -> None:
    args = flux_configs["flux-schnell"]
    with torch.device("meta"):
        model = FluxModel(args)
    nparams, per_token_1k = args.get_nparams_and_flops(model, seq_len=1024 + 256)
    _, per_token_4k = args.get_nparams_and_flops(model, seq_len=4096 + 256)
    assert 11.8e9 < nparams < 12.0e9
    # Dense matmuls: 6 FLOPs per parameter a token passes through: one stream of each of
    # 19 double blocks and all 38 single blocks, 12·D² each, about 6.5e9 parameters.
    dense = 6 * 12 * 3072**2 * (19 + 38)
    assert dense < per_token_1k < 1.1 * dense
    # Attention adds 12·L·D per layer per token: the longer sequence costs that much more.
    extra_attention = 12 * (4352 - 1280) * 3072 * (19 + 38)
    assert per_token_4k - per_token_1k == pytest.approx(extra_attention, rel=1e-2)


def test_flop_count_refuses_a_sequence_with_no_image_tokens() -> None:
    args = FluxModelArgs(txt_seq_len=256)
    with pytest.raises(ValueError, match="no image tokens"):
        args.get_nparams_and_flops(torch.nn.Linear(1, 1), seq_len=256)


def test_axes_must_sum_to_the_head_dim() -> None:
    with pytest.raises(ValueError, match="axes_dim"):
        FluxModelArgs(hidden_size=64, num_heads=4, axes_dim=(4, 4, 4))
