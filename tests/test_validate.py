"""Validation on a compiled model."""

from __future__ import annotations

import torch

from flux.model.args import flux_configs
from flux.model.model import FluxModel
from flux.parallel.parallelize import apply_compile
from flux.validate import without_recompiling
from tests.model.helpers import model_inputs, randomize


def test_validation_runs_compiled_blocks_without_compiling_them_again() -> None:
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    args = flux_configs["flux-debug"]
    model = FluxModel(args)
    randomize(model, std=0.05)
    apply_compile(model, backend=backend)  # type: ignore[arg-type]
    model(**model_inputs(args)).square().mean().backward()  # training's shapes
    trained = len(graphs)
    validation = model_inputs(args, batch=3, h=2, w=2, txt_len=5)
    with torch.no_grad(), without_recompiling():
        out = model(**validation)
    assert len(graphs) == trained
    with torch.no_grad():
        torch.testing.assert_close(model(**validation), out)  # compiles anew, the same
    assert len(graphs) > trained
