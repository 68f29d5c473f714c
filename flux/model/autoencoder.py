"""The FLUX autoencoder: images (B, 3, H, W) in [-1, 1] <-> latents (B, C, H/8, W/8).

Module names follow the reference so the published ae.safetensors loads as it is.
Dimension key: B batch, C channels, H height, W width.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from flux.model.args import AutoEncoderParams

DOWNLOAD_HINT = (
    "download it with `python flux/scripts/download_autoencoder.py "
    "--repo_id black-forest-labs/FLUX.1-dev --ae_path ae.safetensors`"
)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels of a feature map."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        height, width = h.shape[-2:]
        # Contiguous q, k, v (a copy unless the map is channels-last already): the fused
        # attention kernels take nothing else, and the math path they fall back to holds
        # the whole (H·W)² score matrix.
        q, k, v = (
            rearrange(f(h), "b c h w -> b 1 (h w) c").contiguous() for f in (self.q, self.k, self.v)
        )
        out = F.scaled_dot_product_attention(q, k, v)
        out = rearrange(out, "b 1 (h w) c -> b c h w", h=height, w=width)
        return x + self.proj_out(out)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1)
            if in_channels != out_channels
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return shortcut + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as the reference


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the encoder or decoder: res blocks, then a resampling (if any)."""

    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.resample_name = name
        if resample is not None:
            self.add_module(name, resample)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        resample = getattr(self, self.resample_name, None)
        return x if resample is None else resample(x)


class Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> Gaussian moments (B, 2·z_channels, H/8, W/8): mean, logvar."""

    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, kernel_size=3, padding=1)
        levels = []
        channels = p.ch
        for i, mult in enumerate(p.ch_mult):
            blocks = []
            for _ in range(p.num_res_blocks):
                blocks.append(ResnetBlock(channels, p.ch * mult))
                channels = p.ch * mult
            last = i == len(p.ch_mult) - 1
            levels.append(Level(blocks, None if last else Downsample(channels), "downsample"))
        self.down = nn.ModuleList(levels)
        self.mid = Mid(channels)
        self.norm_out = _group_norm(channels)
        self.conv_out = nn.Conv2d(channels, 2 * p.z_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Unscaled latents (B, z_channels, h, w) -> image (B, 3, 8h, 8w)."""

    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        channels = p.ch * p.ch_mult[-1]
        self.conv_in = nn.Conv2d(p.z_channels, channels, kernel_size=3, padding=1)
        self.mid = Mid(channels)
        levels: list[Level] = []
        for i in reversed(range(len(p.ch_mult))):
            blocks = []
            for _ in range(p.num_res_blocks + 1):
                blocks.append(ResnetBlock(channels, p.ch * p.ch_mult[i]))
                channels = p.ch * p.ch_mult[i]
            levels.insert(0, Level(blocks, Upsample(channels) if i != 0 else None, "upsample"))
        # Stored lowest resolution last (as the reference), run from the last to the first.
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(channels)
        self.conv_out = nn.Conv2d(channels, p.out_ch, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    """Encoder, decoder and the latent scale/shift the transformer is trained on."""

    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)
        self.scale_factor = params.scale_factor
        self.shift_factor = params.shift_factor

    def encode(
        self, x: Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> Tensor:
        """Image (B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/8, W/8).

        sample draws from the posterior (as in training); otherwise its mean is used.
        """
        return self.scale_latents(self.encoder(x), sample=sample, generator=generator)

    def scale_latents(
        self,
        moments: Tensor,
        sample: bool = True,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Gaussian moments (B, 2C, h, w) -> scaled, shifted latents (B, C, h, w).

        Sampling uses noise if given (standard normal, (B, C, h, w)), else draws it."""
        if sample and noise is None:
            b, c2, h, w = moments.shape
            noise = torch.randn(
                (b, c2 // 2, h, w), generator=generator, device=moments.device, dtype=moments.dtype
            )
        return posterior_latents(moments, self.params, noise if sample else None)

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents (B, C, h, w) -> image (B, 3, 8h, 8w), roughly in [-1, 1]."""
        return self.decoder(z / self.scale_factor + self.shift_factor)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


def posterior_latents(
    moments: Tensor, params: AutoEncoderParams, noise: Tensor | None = None
) -> Tensor:
    """Gaussian moments (B, 2C, h, w) -> scaled, shifted latents (B, C, h, w): the posterior
    sample mean + std·noise for standard normal noise (B, C, h, w), or the mean if noise is
    None. Needs no weights, so training on precomputed moments samples with it directly."""
    mean, logvar = moments.chunk(2, dim=1)
    z = mean if noise is None else mean + torch.exp(0.5 * logvar) * noise.to(mean.dtype)
    return params.scale_factor * (z - params.shift_factor)


def load_ae(
    path: str | Path, params: AutoEncoderParams, device: str | torch.device = "cpu"
) -> AutoEncoder:
    """Build the autoencoder and load ae.safetensors (the published FLUX.1 file)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"autoencoder weights not found at {path}: {DOWNLOAD_HINT}")
    ae = AutoEncoder(params)
    state = load_file(str(path))
    expected = ae.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [k for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"{path} does not match the autoencoder (missing {len(missing)} tensors, e.g. "
            f"{missing[:2]}; unexpected {len(unexpected)}, e.g. {unexpected[:2]}; "
            f"wrong shape {wrong_shape[:2]}): point to the FLUX.1 ae.safetensors or {DOWNLOAD_HINT}"
        )
    ae.load_state_dict(state, strict=True)
    return ae.to(device).eval()
