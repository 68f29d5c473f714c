"""FluxModel: the FLUX.1 rectified-flow transformer.

Dimension key: B batch, L tokens (L_img image, L_txt text), D hidden, C patch channels
(latent channels × 2 × 2), N position axes (3).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flux.model.args import FluxModelArgs
from flux.model.layers import (
    DoubleStreamBlock,
    EmbedND,
    LastLayer,
    MLPEmbedder,
    Modulation,
    RMSNorm,
    SingleStreamBlock,
    timestep_embedding,
)


class FluxModel(nn.Module):
    """The FLUX.1 transformer; its state_dict matches the published checkpoints."""

    def __init__(self, args: FluxModelArgs):
        super().__init__()
        self.args = args
        D = args.hidden_size
        self.pe_embedder = EmbedND(args.theta, args.axes_dim)
        self.img_in = nn.Linear(args.in_channels, D)
        self.time_in = MLPEmbedder(256, D)
        self.vector_in = MLPEmbedder(args.vec_in_dim, D)
        self.guidance_in = MLPEmbedder(256, D) if args.guidance_embed else None
        self.txt_in = nn.Linear(args.context_in_dim, D)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(D, args.num_heads, args.mlp_ratio, args.qkv_bias)
            for _ in range(args.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(D, args.num_heads, args.mlp_ratio)
            for _ in range(args.depth_single_blocks)
        )
        self.final_layer = LastLayer(D, args.out_channels)

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
    ) -> Tensor:
        """Predict the velocity (noise - x0) of packed image latents.

        img (B, L_img, C), img_ids (B, L_img, N), txt (B, L_txt, context_in_dim),
        txt_ids (B, L_txt, N), timesteps (B,) in [0, 1], y (B, vec_in_dim) pooled text,
        guidance (B,) for flavors with the guidance embedding. Returns (B, L_img, C).
        """
        vec = self.time_in(timestep_embedding(timesteps, 256).to(img.dtype))
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this flavor has a guidance embedding: pass guidance (B,)")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(img.dtype))
        vec = vec + self.vector_in(y)
        img = self.img_in(img)
        txt = self.txt_in(txt)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))

        for double_block in self.double_blocks:
            img, txt = double_block(img, txt, vec, pe)
        x = torch.cat((txt, img), dim=1)
        for single_block in self.single_blocks:
            x = single_block(x, vec, pe)
        return self.final_layer(x[:, txt.shape[1] :], vec)

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        """Initialize for pre-training from scratch (DiT-style).

        Linear layers get Xavier-uniform weights and zero biases; the embedders get
        N(0, 0.02); every modulation and the output projection start at zero, so each
        block starts as the identity and the first prediction is zero. The model has
        no buffers (RoPE is computed from the ids), so buffer_device is not used.
        """
        del buffer_device
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.scale)
        embedders = [self.time_in, self.vector_in] + (
            [self.guidance_in] if self.guidance_in else []
        )
        for embedder in embedders:
            nn.init.normal_(embedder.in_layer.weight, std=0.02)
            nn.init.normal_(embedder.out_layer.weight, std=0.02)
        for module in self.modules():
            if isinstance(module, Modulation):
                zeroed: list[nn.Module] = [module.lin]
            elif isinstance(module, LastLayer):
                zeroed = [module.linear, module.adaLN_modulation]
            else:
                continue
            for part in zeroed:
                for p in part.parameters():
                    nn.init.zeros_(p)
