"""The shipped configurations: each parses and passes the checks that need no files; the
MLPerf recipe holds the reference's values; what the float8 filter keeps in high precision."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchao.float8.float8_linear import Float8Linear

from flux.config import (
    PACKAGE_ROOT,
    check_ema,
    check_model,
    check_training,
    check_validation,
    parse_config,
)
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


CONFIGS = sorted((PACKAGE_ROOT / "flux" / "train_configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses_and_passes_its_checks(path: Path) -> None:
    config = parse_config(["--job.config_file", str(path)])
    for check in (check_model, check_training, check_ema, check_validation):
        check(config)


def test_the_mlperf_recipe_holds_the_reference_values() -> None:
    assert "flux_schnell_mlperf.toml" in [p.name for p in CONFIGS]
    config = parse_config(
        ["--job.config_file", str(CONFIGS[0].parent / "flux_schnell_mlperf.toml")]
    )
    v, t, o = config.validation, config.training, config.optimizer
    assert (v.enable, v.metric, v.loss_timesteps, v.target_loss) == (True, "mlperf", 8, 0.586)
    assert (v.every_samples, v.samples, v.sample_prompts) == (262_144, -1, [])
    assert (config.model.flavor, t.img_size, t.local_batch_size, t.max_norm) == (
        "flux-schnell",
        256,
        16,
        1.0,
    )
    assert (t.timestep_sampling, t.classifier_free_guidance_prob) == ("uniform", 0.1)
    assert (o.name, o.lr, o.eps, config.lr_scheduler.warmup_steps) == ("AdamW", 1e-4, 1e-8, 0)
    assert config.encoder.max_t5_encoding_len == 256
    ae = flux_configs["flux-schnell"].autoencoder_params
    assert (ae.scale_factor, ae.shift_factor) == (0.3611, 0.1159)


@pytest.mark.parametrize("ngpu", [8, 64, 512, 1152])
def test_the_mlperf_recipe_can_be_planned_at_the_benchmarks_scales(ngpu: int) -> None:
    """What the planner checks before it estimates the time to train (its caches need not
    exist: a plan is for another machine)."""
    from flux.plan.planner import PlanSettings, check_plan

    mlperf = PACKAGE_ROOT / "flux" / "train_configs" / "flux_schnell_mlperf.toml"
    config = parse_config(["--job.config_file", str(mlperf)])
    assert [g.name for g in check_plan(config, PlanSettings(ngpu, ("gb200", "h200")))]
    assert config.validation.samples == -1  # the plan's checks changed a copy
