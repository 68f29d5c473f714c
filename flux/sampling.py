"""Timesteps for training and the Euler denoising loop for validation and inference.

Rectified flow: x_t = (1 - t)·x0 + t·noise, t in [0, 1]; the model predicts the velocity
noise - x0, so one Euler step from t to t' < t is x_t' = x_t + (t' - t)·velocity.
Dimension key: B batch, C latent channels, H/W latent height/width, L image tokens.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from einops import rearrange, repeat
from torch import Tensor

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "flux_shift")
PIXELS_PER_TOKEN = 16  # the autoencoder's 8× downsampling, then 2×2 patches


def check_image_size(size: int, name: str) -> None:
    """Refuse an image side the model cannot take: `name` = size is not a positive
    multiple of 16 (ValueError, saying so)."""
    if size < PIXELS_PER_TOKEN or size % PIXELS_PER_TOKEN:
        raise ValueError(f"{name} = {size}: use a positive multiple of {PIXELS_PER_TOKEN}")


def scaled_size(width: int, height: int, img_size: int) -> tuple[int, int]:
    """(width, height) of the aspect ratio width:height with about img_size² pixels, each
    side rounded to a multiple of 16 (at least 16): one size list serves every resolution."""
    scale = img_size / math.sqrt(width * height)

    def rounded(side: int) -> int:
        return max(1, round(side * scale / PIXELS_PER_TOKEN)) * PIXELS_PER_TOKEN

    return rounded(width), rounded(height)


def to_device(t: Tensor, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """A host tensor on the device without waiting for the device: pinned, then copied
    asynchronously (a copy from pageable memory waits until the device's queue has run).
    On the CPU, as it is."""
    if device.type == "cpu":
        return t if dtype is None else t.to(dtype)
    return t.pin_memory().to(device, dtype, non_blocking=True)


def pack_latents(latents: Tensor) -> Tensor:
    """(B, C, H, W) latents -> (B, H/2·W/2, 4C) tokens of 2×2 patches, as FLUX.1 packs them."""
    return rearrange(latents, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """(B, L, 4C) tokens -> (B, C, height, width) latents."""
    return rearrange(
        tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=height // 2, w=width // 2, ph=2, pw=2
    )


def image_ids(batch: int, height: int, width: int, device: torch.device | str = "cpu") -> Tensor:
    """(B, L, 3) positions [0, row, col] of the packed patches of a height × width latent."""
    rows, cols = height // 2, width // 2
    ids = torch.zeros(rows, cols, 3, device=device)
    ids[..., 1] = torch.arange(rows, device=device)[:, None]
    ids[..., 2] = torch.arange(cols, device=device)[None, :]
    return repeat(ids, "h w n -> b (h w) n", b=batch)


def text_ids(batch: int, length: int, device: torch.device | str = "cpu") -> Tensor:
    """(B, L_txt, 3) zeros: text tokens share one position."""
    return torch.zeros(batch, length, 3, device=device)


def shift_mu(image_seq_len: int, base: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent shift: linear in the image tokens, 0.5 at 256, 1.15 at 4096."""
    slope = (max_shift - base) / (4096 - 256)
    return base + slope * (image_seq_len - 256)


def time_shift(mu: float, t: Tensor) -> Tensor:
    """Move timesteps toward 1 (more noise) by exp(mu): e^mu / (e^mu + 1/t - 1)."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def sample_timesteps(
    kind: str, batch: int, image_seq_len: int, generator: torch.Generator | None = None
) -> Tensor:
    """Training timesteps (B,) in (0, 1).

    uniform: U(0, 1). logit_normal: sigmoid of N(0, 1), which favours the middle (SD3).
    flux_shift: logit-normal, then shifted by the image's token count as FLUX samples.
    """
    if kind == "uniform":
        return torch.rand(batch, generator=generator).clamp(1e-5, 1 - 1e-5)
    if kind not in TIMESTEP_SAMPLINGS:
        raise ValueError(
            f"unknown timestep_sampling {kind!r}: choose one of {', '.join(TIMESTEP_SAMPLINGS)}"
        )
    t = torch.sigmoid(torch.randn(batch, generator=generator)).clamp(1e-5, 1 - 1e-5)
    return time_shift(shift_mu(image_seq_len), t) if kind == "flux_shift" else t


def get_schedule(num_steps: int, image_seq_len: int, shift: bool) -> list[float]:
    """Inference timesteps from 1 to 0 (num_steps + 1 values); shift for flux-dev's schedule,
    no shift for flux-schnell's."""
    t = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    if shift:
        t[:-1] = time_shift(shift_mu(image_seq_len), t[:-1])
    return t.tolist()


Velocity = Callable[[Tensor, Tensor], Tensor]  # (img tokens, timesteps (B,)) -> velocity


def denoise(
    velocity: Velocity,
    img: Tensor,
    timesteps: list[float],
    cfg_scale: float = 1.0,
    uncond_velocity: Velocity | None = None,
) -> Tensor:
    """Euler integration of img (B, L, 4C) from timesteps[0] to timesteps[-1].

    With uncond_velocity and cfg_scale != 1, classifier-free guidance:
    v = v_uncond + cfg_scale · (v_cond - v_uncond).
    """
    for t_curr, t_next in zip(timesteps[:-1], timesteps[1:]):
        t = torch.full((img.shape[0],), t_curr, dtype=img.dtype, device=img.device)
        v = velocity(img, t)
        if uncond_velocity is not None and cfg_scale != 1.0:
            v_uncond = uncond_velocity(img, t)
            v = v_uncond + cfg_scale * (v - v_uncond)
        img = img + (t_next - t_curr) * v
    return img


def sample_generator(seed: int, step: int, key: str, device: torch.device | str) -> torch.Generator:
    """The random stream of one sample in one step, named by the sample's data key.

    Stateless, so a resumed run draws exactly what the unbroken run would have; tied to the
    sample rather than to a rank or a position in a micro-batch, so data-parallel ranks
    draw differently (their samples differ), and gradient accumulation, or a resume on
    another world size, draws for each sample what the original layout drew."""
    digest = hashlib.blake2b(f"{seed}/{step}/{key}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest) % (2**63 - 1))


@dataclass
class Streams:
    """One CPU stream (caption dropout, timestep) and one device stream (noise) per sample."""

    cpu: list[torch.Generator]
    device: list[torch.Generator]

    @classmethod
    def of(cls, seed: int, step: int, keys: list[str], device: torch.device) -> Streams:
        return cls(
            [sample_generator(seed, step, key, "cpu") for key in keys],
            [sample_generator(seed, step, key, device) for key in keys],
        )

    def randn(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """(B, *shape) standard normal, row i from sample i's device stream."""
        return torch.stack([torch.randn(shape, generator=g, device=device) for g in self.device])
