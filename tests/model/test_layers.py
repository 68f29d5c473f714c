"""The transformer's parts as a compiler sees them."""

from __future__ import annotations

import torch
from torch._inductor.utils import run_and_get_code

from flux.model.args import flux_configs
from flux.model.model import FluxModel
from tests.model.helpers import model_inputs


def test_a_compiled_block_rotates_by_rope_in_generated_kernels_without_complex_fallbacks() -> None:
    """Inductor generates no code for complex tensors: a complex RoPE runs as eager
    fallback kernels (view_as_complex, a complex mul) inside every compiled block."""
    args = flux_configs["flux-debug"]
    torch.manual_seed(0)
    model = FluxModel(args)
    inputs = model_inputs(args, batch=1, h=2, w=2, txt_len=4)
    pe = model.pe_embedder(torch.cat((inputs["txt_ids"], inputs["img_ids"]), dim=1))
    x = torch.randn(1, 8, args.hidden_size, requires_grad=True)
    vec = torch.randn(1, args.hidden_size)
    block = model.single_blocks[0]
    compiled = torch.compile(block, fullgraph=True)

    def forward_backward() -> torch.Tensor:
        out = compiled(x, vec, pe)
        out.square().sum().backward()
        return out

    out, code = run_and_get_code(forward_backward)
    assert len(code) == 2  # the forward and the backward
    assert not [line for c in code for line in c.splitlines() if "complex" in line.lower()]
    torch.testing.assert_close(out, block(x, vec, pe))
