import pytest
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from flux.model.args import FluxModelArgs, training_flops_per_sample
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


def test_axes_must_sum_to_the_head_dim() -> None:
    with pytest.raises(ValueError, match="axes_dim"):
        FluxModelArgs(hidden_size=64, num_heads=4, axes_dim=(4, 4, 4))
