"""diffusers' independent FLUX.1 implementation, built to match a FluxModel or AutoEncoder.

diffusers' own single-file converter assumes the full 3072-wide model, so the tests map the
reference names to diffusers' names here, for any width.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from torch import Tensor

from flux.model.args import AutoEncoderParams, FluxModelArgs


def _swap_halves(w: Tensor) -> Tensor:
    first, second = w.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def reference_to_diffusers(sd: dict[str, Tensor], args: FluxModelArgs) -> dict[str, Tensor]:
    """Reference (published FLUX.1) tensor names -> diffusers FluxTransformer2DModel names."""
    D, out = args.hidden_size, {}
    simple = {
        "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
        "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
        "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
        "txt_in": "context_embedder",
        "img_in": "x_embedder",
        "final_layer.linear": "proj_out",
    }
    for i in range(args.depth):
        ref, dif = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        simple |= {
            ref + "img_mod.lin": dif + "norm1.linear",
            ref + "txt_mod.lin": dif + "norm1_context.linear",
            ref + "img_attn.proj": dif + "attn.to_out.0",
            ref + "txt_attn.proj": dif + "attn.to_add_out",
            ref + "img_mlp.0": dif + "ff.net.0.proj",
            ref + "img_mlp.2": dif + "ff.net.2",
            ref + "txt_mlp.0": dif + "ff_context.net.0.proj",
            ref + "txt_mlp.2": dif + "ff_context.net.2",
        }
        out[dif + "attn.norm_q.weight"] = sd[ref + "img_attn.norm.query_norm.scale"]
        out[dif + "attn.norm_k.weight"] = sd[ref + "img_attn.norm.key_norm.scale"]
        out[dif + "attn.norm_added_q.weight"] = sd[ref + "txt_attn.norm.query_norm.scale"]
        out[dif + "attn.norm_added_k.weight"] = sd[ref + "txt_attn.norm.key_norm.scale"]
        for stream, names in (
            ("img", ("to_q", "to_k", "to_v")),
            ("txt", ("add_q_proj", "add_k_proj", "add_v_proj")),
        ):
            for kind in ("weight", "bias"):
                for name, part in zip(names, sd[f"{ref}{stream}_attn.qkv.{kind}"].chunk(3)):
                    out[f"{dif}attn.{name}.{kind}"] = part
    for i in range(args.depth_single_blocks):
        ref, dif = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        simple |= {ref + "modulation.lin": dif + "norm.linear", ref + "linear2": dif + "proj_out"}
        out[dif + "attn.norm_q.weight"] = sd[ref + "norm.query_norm.scale"]
        out[dif + "attn.norm_k.weight"] = sd[ref + "norm.key_norm.scale"]
        for kind in ("weight", "bias"):
            q, k, v, mlp = sd[f"{ref}linear1.{kind}"].split([D, D, D, args.mlp_hidden_dim])
            out |= {f"{dif}attn.to_q.{kind}": q, f"{dif}attn.to_k.{kind}": k}
            out |= {f"{dif}attn.to_v.{kind}": v, f"{dif}proj_mlp.{kind}": mlp}
    for ref, dif in simple.items():
        for kind in ("weight", "bias"):
            if f"{ref}.{kind}" in sd:
                out[f"{dif}.{kind}"] = sd[f"{ref}.{kind}"]
    for kind in ("weight", "bias"):  # diffusers orders the final modulation (scale, shift)
        out[f"norm_out.linear.{kind}"] = _swap_halves(sd[f"final_layer.adaLN_modulation.1.{kind}"])
    return out


def diffusers_config(args: FluxModelArgs) -> dict:
    """FluxTransformer2DModel's constructor arguments (its config.json) for these args."""
    return {
        "patch_size": 1,
        "in_channels": args.in_channels,
        "out_channels": args.out_channels,
        "num_layers": args.depth,
        "num_single_layers": args.depth_single_blocks,
        "attention_head_dim": args.hidden_size // args.num_heads,
        "num_attention_heads": args.num_heads,
        "joint_attention_dim": args.context_in_dim,
        "pooled_projection_dim": args.vec_in_dim,
        "guidance_embeds": args.guidance_embed,
        "axes_dims_rope": list(args.axes_dim),
    }


def diffusers_transformer(sd: dict[str, Tensor], args: FluxModelArgs) -> FluxTransformer2DModel:
    model = FluxTransformer2DModel(**diffusers_config(args))
    model.load_state_dict(reference_to_diffusers(sd, args), strict=True)
    return model.eval()


def diffusers_forward(model: FluxTransformer2DModel, inputs: dict[str, Tensor]) -> Tensor:
    """diffusers' forward on FluxModel.forward's keyword arguments (ids without the batch)."""
    return model(
        hidden_states=inputs["img"],
        encoder_hidden_states=inputs["txt"],
        pooled_projections=inputs["y"],
        timestep=inputs["timesteps"],
        img_ids=inputs["img_ids"][0],
        txt_ids=inputs["txt_ids"][0],
        guidance=inputs.get("guidance"),
        return_dict=False,
    )[0]


def diffusers_autoencoder(sd: dict[str, Tensor], params: AutoEncoderParams) -> AutoencoderKL:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = {
        "in_channels": params.in_channels,
        "out_channels": params.out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * len(params.ch_mult),
        "up_block_types": ["UpDecoderBlock2D"] * len(params.ch_mult),
        "block_out_channels": [params.ch * m for m in params.ch_mult],
        "latent_channels": params.z_channels,
        "layers_per_block": params.num_res_blocks,
        "scaling_factor": params.scale_factor,
        "shift_factor": params.shift_factor,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    }
    vae = AutoencoderKL(**config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(dict(sd), config), strict=True)
    return vae.eval()
