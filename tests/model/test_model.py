import pytest
import torch

from flux.model.args import flux_configs
from flux.model.model import FluxModel
from tests.model.helpers import model_inputs, randomize, small_args
from tests.oracle import diffusers_forward, diffusers_transformer


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).norm() / theirs.norm()).item()


@pytest.mark.parametrize("guidance_embed", [True, False], ids=["dev", "schnell"])
def test_transformer_matches_diffusers_on_the_same_weights(guidance_embed: bool) -> None:
    args = small_args(guidance_embed=guidance_embed)
    model = FluxModel(args)
    randomize(model)
    oracle = diffusers_transformer(model.state_dict(), args)
    inputs = model_inputs(args)

    with torch.no_grad():
        ours = model(**inputs)
        theirs = diffusers_forward(oracle, inputs)

    assert ours.shape == theirs.shape
    assert relative_error(ours, theirs) < 1e-5


@pytest.mark.parametrize("flavor, tensors", [("flux-dev", 780), ("flux-schnell", 776)])
def test_published_flavors_have_the_checkpoint_layout(flavor: str, tensors: int) -> None:
    with torch.device("meta"):
        model = FluxModel(flux_configs[flavor])
    sd = model.state_dict()
    assert len(sd) == tensors
    # Shapes of a few tensors of the published flux1-*.safetensors.
    assert sd["img_in.weight"].shape == (3072, 64)
    assert sd["txt_in.weight"].shape == (3072, 4096)
    assert sd["double_blocks.18.img_attn.qkv.weight"].shape == (9216, 3072)
    assert sd["double_blocks.0.txt_attn.norm.key_norm.scale"].shape == (128,)
    assert sd["single_blocks.37.linear1.weight"].shape == (21504, 3072)
    assert sd["single_blocks.37.linear2.weight"].shape == (3072, 15360)
    assert sd["final_layer.adaLN_modulation.1.weight"].shape == (6144, 3072)
    assert ("guidance_in.in_layer.weight" in sd) == (flavor == "flux-dev")
    assert 11.8e9 < sum(t.numel() for t in sd.values()) < 12.0e9


def test_state_dict_round_trips_through_safetensors_strictly(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    args = small_args()
    model = FluxModel(args)
    randomize(model, seed=3)
    save_file(model.state_dict(), tmp_path / "flux.safetensors")
    loaded = FluxModel(args)
    loaded.load_state_dict(load_file(tmp_path / "flux.safetensors"), strict=True)
    inputs = model_inputs(args)
    with torch.no_grad():
        assert torch.equal(model(**inputs), loaded(**inputs))


def test_meta_built_and_initialized_model_gives_finite_outputs() -> None:
    args = small_args()
    with torch.device("meta"):
        model = FluxModel(args)
    model.to_empty(device="cpu")
    model.init_weights(buffer_device=torch.device("cpu"))
    inputs = model_inputs(args)
    out = model(**inputs)
    # Zero-initialized output layer and modulations: the first prediction is exactly zero,
    # and a training step moves it.
    assert torch.isfinite(out).all() and out.abs().max() == 0
    loss = (out - inputs["img"]).pow(2).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


def test_bf16_stays_close_to_fp32() -> None:
    args = small_args()
    model = FluxModel(args)
    randomize(model, seed=5, std=0.05)
    inputs = model_inputs(args)
    with torch.no_grad():
        fp32 = model(**inputs)
        bf16_inputs = {
            k: v.bfloat16() if k in ("img", "txt", "y") else v for k, v in inputs.items()
        }
        bf16 = model.bfloat16()(**bf16_inputs).float()
    assert torch.isfinite(bf16).all()
    assert relative_error(bf16, fp32) < 3e-2


def test_guidance_flavor_refuses_a_missing_guidance() -> None:
    args = small_args(guidance_embed=True)
    inputs = model_inputs(args)
    del inputs["guidance"]
    with pytest.raises(ValueError, match="guidance"):
        FluxModel(args)(**inputs)
