"""The parts of the FLUX transformer, named as in the reference so its weights load.

Dimension key: B batch, L tokens, D hidden, H heads, K head dim, N position axes (3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding of timesteps in [0, 1] (scaled by 1000): t (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = 1000.0 * t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    """Rotation angles for one position axis: pos (B, L) -> (B, L, dim/2), in float64."""
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / (theta**scale)
    return pos.double()[..., None] * omega


def apply_rope(x: Tensor, pe: Tensor) -> Tensor:
    """Rotate adjacent channel pairs (x[2i], x[2i+1]) of x (B, H, L, K) by pe (B, 1, L, K/2, 2),
    the cosine and sine of each pair's angle: (cos·x[2i] - sin·x[2i+1], sin·x[2i] + cos·x[2i+1]),
    the reference's rotation, in float32.

    Real arithmetic, not a complex multiply: compilers fuse it into the kernels around it
    (the QK norm before, attention's input after), where complex tensors fall back to eager
    kernels with float32 buffers of their own.
    """
    x_even, x_odd = rearrange(x.float(), "b h l (k two) -> two b h l k", two=2)
    cos, sin = pe.unbind(-1)
    rotated = torch.stack((cos * x_even - sin * x_odd, sin * x_even + cos * x_odd), dim=-1)
    return rearrange(rotated, "b h l k two -> b h l (k two)").type_as(x)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor) -> Tensor:
    """Bidirectional attention with RoPE: q, k, v (B, H, L, K) -> (B, L, H·K)."""
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    out = F.scaled_dot_product_attention(q, k, v)
    return rearrange(out, "b h l k -> b l (h k)")


class EmbedND(nn.Module):
    """RoPE over N position axes (time/row/column): ids (B, L, N) -> pe (B, 1, L, K/2, 2),
    the cosine and sine of every channel pair's angle (angles in float64, as the reference)."""

    def __init__(self, theta: int, axes_dim: tuple[int, ...]):
        super().__init__()
        self.theta = theta
        self.axes_dim = axes_dim

    def forward(self, ids: Tensor) -> Tensor:
        angles = torch.cat(
            [rope(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)], dim=-1
        )  # (B, L, K/2)
        return torch.stack((angles.cos(), angles.sin()), dim=-1).float().unsqueeze(1)


class MLPEmbedder(nn.Module):
    """Two-layer SiLU MLP that lifts timesteps, guidance or the pooled CLIP vector to D."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMS norm computed in fp32 with a learned scale (the reference's QK norm)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=1e-6)
        return normed.to(x.dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    """The projections of one stream's attention (the attention itself is joint)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, L, D) -> normed q, k and v, each (B, H, L, K). Heads are counted from the
        head size, so a projection that holds some of the heads (tensor parallelism) works."""
        q, k, v = rearrange(self.qkv(x), "b l (t h k) -> t b h l k", t=3, k=self.head_dim)
        q, k = self.norm(q, k, v)
        return q, k, v


@dataclass
class ModulationOut:
    shift: Tensor  # (B, 1, D)
    scale: Tensor
    gate: Tensor

    def modulate(self, x: Tensor) -> Tensor:
        return (1 + self.scale) * x + self.shift


class Modulation(nn.Module):
    """adaLN parameters from the conditioning vector: vec (B, D) -> shift/scale/gate sets."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec: Tensor) -> list[ModulationOut]:
        chunks = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return [ModulationOut(*chunks[i : i + 3]) for i in range(0, self.multiplier, 3)]


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def _mlp(dim: int, mlp_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(dim, mlp_dim), nn.GELU(approximate="tanh"), nn.Linear(mlp_dim, dim)
    )


class DoubleStreamBlock(nn.Module):
    """Separate weights for image and text tokens, joint attention over both.

    attend is the joint attention (q, k, v, pe) -> (B, L, H·K); context parallelism gives
    a block one that attends across ranks (flux/parallel/context_parallel.py)."""

    attend = staticmethod(attention)

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        mlp_dim = int(hidden_size * mlp_ratio)
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = _layer_norm(hidden_size)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.img_norm2 = _layer_norm(hidden_size)
        self.img_mlp = _mlp(hidden_size, mlp_dim)
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = _layer_norm(hidden_size)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.txt_norm2 = _layer_norm(hidden_size)
        self.txt_mlp = _mlp(hidden_size, mlp_dim)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        """img (B, L_img, D), txt (B, L_txt, D), vec (B, D), pe over txt then img tokens."""
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)
        img_q, img_k, img_v = self.img_attn.qkv_heads(img_mod1.modulate(self.img_norm1(img)))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(txt_mod1.modulate(self.txt_norm1(txt)))

        joint = self.attend(
            torch.cat((txt_q, img_q), dim=2),
            torch.cat((txt_k, img_k), dim=2),
            torch.cat((txt_v, img_v), dim=2),
            pe,
        )
        txt_attn, img_attn = joint.split([txt.shape[1], img.shape[1]], dim=1)

        img = img + img_mod1.gate * self.img_attn.proj(img_attn)
        img = img + img_mod2.gate * self.img_mlp(img_mod2.modulate(self.img_norm2(img)))
        txt = txt + txt_mod1.gate * self.txt_attn.proj(txt_attn)
        txt = txt + txt_mod2.gate * self.txt_mlp(txt_mod2.modulate(self.txt_norm2(txt)))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One set of weights for all tokens; attention and MLP run in parallel from one
    fused input projection (linear1) and one fused output projection (linear2). attend:
    as DoubleStreamBlock's."""

    attend = staticmethod(attention)

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, 3 * hidden_size + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(self.head_dim)
        self.pre_norm = _layer_norm(hidden_size)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor) -> Tensor:
        """x (B, L, D) -> (B, L, D)."""
        (mod,) = self.modulation(vec)
        fused = self.linear1(mod.modulate(self.pre_norm(x)))
        # q, k, v then the MLP's input, in the proportion 3·D : M (which a projection that
        # holds a share of each, under tensor parallelism, keeps)
        width, attn = fused.shape[-1], 3 * self.hidden_size
        attn_width = width * attn // (attn + self.mlp_hidden_dim)
        qkv, mlp = fused.split([attn_width, width - attn_width], dim=-1)
        q, k, v = rearrange(qkv, "b l (t h k) -> t b h l k", t=3, k=self.head_dim)
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat((self.attend(q, k, v, pe), self.mlp_act(mlp)), dim=2))
        return x + mod.gate * out


class LastLayer(nn.Module):
    """adaLN-modulated norm and projection of image tokens to patch channels."""

    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.norm_final = _layer_norm(hidden_size)
        self.linear = nn.Linear(hidden_size, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        """x (B, L_img, D), vec (B, D) -> (B, L_img, out_channels)."""
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear((1 + scale) * self.norm_final(x) + shift)
