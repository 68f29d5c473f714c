"""The shipped configurations: what their float8 filter keeps in high precision."""

from __future__ import annotations

import torch
from torch import nn
from torchao.float8.float8_linear import Float8Linear

from flux.model.args import flux_configs
from flux.model.model import FluxModel
from tests.parallel.tp_worker import converted, model_and_batch


def test_the_block_projections_convert_and_compute_close_to_float32() -> None:
    reference, batch = model_and_batch()
    model = converted(model_and_batch()[0])
    float8 = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    linear = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    block = ("img_attn.qkv", "img_attn.proj", "txt_mlp.0", "txt_mlp.2", "linear1", "linear2")
    assert all(any(n.endswith(b) for n in float8) for b in block), sorted(float8)
    assert all(n.startswith(("double_blocks", "single_blocks", "img_in", "txt_in")) for n in float8)
    assert not any("mod" in n for n in float8)  # modulations: one row per sample
    assert {"final_layer.linear", "time_in.in_layer", "vector_in.out_layer"} <= linear
    # The same names and shapes: checkpoints and FLUX.1 files load either way.
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in FluxModel(flux_configs["flux-debug"]).state_dict().items()
    }
    with torch.no_grad():
        want, got = reference(**batch), model(**batch)
    error = ((got - want).norm() / want.norm()).item()
    assert 0 < error < 0.1, error  # float8's rounding, and only that
