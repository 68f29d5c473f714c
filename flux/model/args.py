"""Model arguments, the FLUX.1 flavors, and the FLOP count used for MFU.

Dimension key: B batch, L tokens (L_img image, L_txt text), D hidden, H heads, K head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AutoEncoderParams:
    """Shape of the FLUX autoencoder (names as in the reference)."""

    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159


@dataclass
class FluxModelArgs:
    """Shape of the FLUX transformer (names as in the reference) and of its inputs."""

    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = False
    autoencoder_params: AutoEncoderParams = field(default_factory=AutoEncoderParams)
    # Text tokens per sample (the T5 length the flavor is sampled with; FLOP counts split a
    # sequence into text and image tokens with it). The trainer sets it from its config.
    txt_seq_len: int = 256

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        head_dim = self.hidden_size // self.num_heads
        if sum(self.axes_dim) != head_dim:
            raise ValueError(
                f"axes_dim {self.axes_dim} must sum to the head dim {head_dim} "
                "(hidden_size / num_heads)"
            )

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


def training_flops_per_sample(args: FluxModelArgs, img_tokens: int, txt_tokens: int) -> int:
    """FLOPs of one forward+backward of FluxModel for one sample, matmuls and attention.

    A matmul of (m, k) by (k, n) costs 2mkn forward and twice that backward (input and
    weight gradients). The first layers (img_in, txt_in and the first layer of each
    embedder) see data that needs no gradient, so their backward computes only the
    weight gradient. Attention costs 4·L²·D forward (QKᵀ and PV) and twice that backward.
    """
    D, mlp = args.hidden_size, args.mlp_hidden_dim
    L = img_tokens + txt_tokens

    def linear(tokens: int, d_in: int, d_out: int, first: bool = False) -> int:
        return 2 * tokens * d_in * d_out * (2 if first else 3)

    def attention(tokens: int) -> int:
        return 3 * 4 * tokens * tokens * D

    embedders = 1 + int(args.guidance_embed)  # time (+ guidance): 256 -> D -> D
    total = embedders * (linear(1, 256, D, first=True) + linear(1, D, D))
    total += linear(1, args.vec_in_dim, D, first=True) + linear(1, D, D)
    total += linear(img_tokens, args.in_channels, D, first=True)
    total += linear(txt_tokens, args.context_in_dim, D, first=True)

    def per_stream(tokens: int) -> int:  # qkv, proj, mlp of one stream of a double block
        return (
            linear(tokens, D, 3 * D)
            + linear(tokens, D, D)
            + linear(tokens, D, mlp)
            + linear(tokens, mlp, D)
        )

    double = per_stream(img_tokens) + per_stream(txt_tokens) + attention(L)
    double += 2 * linear(1, D, 6 * D)  # img_mod, txt_mod
    single = linear(L, D, 3 * D + mlp) + linear(L, D + mlp, D) + attention(L)
    single += linear(1, D, 3 * D)  # modulation
    total += args.depth * double + args.depth_single_blocks * single

    total += linear(1, D, 2 * D) + linear(img_tokens, D, args.out_channels)  # final layer
    return total


flux_configs: dict[str, FluxModelArgs] = {
    "flux-dev": FluxModelArgs(guidance_embed=True, txt_seq_len=512),
    "flux-schnell": FluxModelArgs(guidance_embed=False, txt_seq_len=256),
    # The same architecture, tiny: a full training step runs in well under a second on
    # two CPU cores. Its autoencoder and encoders are tiny too (see flux/assets).
    "flux-debug": FluxModelArgs(
        vec_in_dim=32,
        context_in_dim=64,
        hidden_size=64,
        mlp_ratio=4.0,
        num_heads=4,
        depth=2,
        depth_single_blocks=2,
        axes_dim=(4, 6, 6),
        guidance_embed=True,
        txt_seq_len=16,
        autoencoder_params=AutoEncoderParams(
            ch=32,
            ch_mult=(1, 2, 2, 2),
            num_res_blocks=1,
            z_channels=16,
            # from flux/assets/autoencoder-debug's latents (make_debug_assets prints them)
            scale_factor=0.9323,
            shift_factor=0.0555,
        ),
    ),
}
