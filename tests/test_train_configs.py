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
    load_toml,
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


CONFIG_DIR = PACKAGE_ROOT / "flux" / "train_configs"
CONFIGS = sorted(CONFIG_DIR.rglob("*.toml"))  # with progressive/


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_every_shipped_config_parses_and_passes_its_checks(path: Path) -> None:
    config = parse_config(["--job.config_file", str(path)])
    for check in (check_model, check_training, check_ema, check_validation):
        check(config)


def test_the_mlperf_recipe_holds_the_reference_values() -> None:
    assert "flux_schnell_mlperf.toml" in [p.name for p in CONFIGS]
    config = parse_config(["--job.config_file", str(CONFIG_DIR / "flux_schnell_mlperf.toml")])
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


PROGRESSIVE = [CONFIG_DIR / "progressive" / f"flux_dev_{px}.toml" for px in (256, 512, 1024)]
# What a stage of the progressive recipe may change from flux_dev_model.toml, besides the
# schedule over the whole run and the folder every stage shares.
STAGE_KEYS = {
    "training": {"img_size", "local_batch_size", "steps"},
    "activation_checkpoint": {"mode"},
    "checkpoint": {"interval"},
    "validation": {"img_size", "sample_sizes"},
    "lr_scheduler": {"total_steps", "decay_ratio"},
    "job": {"dump_folder", "description"},
}


def test_the_progressive_stages_are_flux_dev_model_at_rising_sizes_on_one_schedule() -> None:
    assert all(path in CONFIGS for path in PROGRESSIVE)
    dev = load_toml(str(CONFIG_DIR / "flux_dev_model.toml"))
    stages = [load_toml(str(path)) for path in PROGRESSIVE]
    for stage in stages:
        assert stage.keys() == dev.keys()
        for section, values in dev.items():
            free = STAGE_KEYS.get(section, set())
            same = {k: v for k, v in stage[section].items() if k not in free}
            assert same == {k: v for k, v in values.items() if k not in free}, section
    configs = [parse_config(["--job.config_file", str(path)]) for path in PROGRESSIVE]
    assert [c.training.img_size for c in configs] == [256, 512, 1024]
    assert [c.validation.img_size for c in configs] == [256, 512, 1024]
    ends = [c.training.steps for c in configs]
    assert ends == sorted(ends) and len(set(ends)) == 3  # each stage trains on from the last
    assert len({c.job.dump_folder for c in configs}) == 1  # each resumes the one before
    schedules = {str(c.lr_scheduler) for c in configs}
    assert len(schedules) == 1  # one learning-rate curve over the whole run
    schedule = configs[0].lr_scheduler
    assert schedule.total_steps == ends[-1] and schedule.decay_ratio is not None
    assert schedule.total_steps * (1 - schedule.decay_ratio) >= ends[1]  # decays in stage 3
    assert len({str(c.validation.sample_sizes) for c in configs}) == 1


@pytest.mark.parametrize("ngpu", [8, 64, 512, 1152])
def test_the_mlperf_recipe_can_be_planned_at_the_benchmarks_scales(ngpu: int) -> None:
    """What the planner checks before it estimates the time to train (its caches need not
    exist: a plan is for another machine)."""
    from flux.plan.planner import PlanSettings, check_plan

    mlperf = PACKAGE_ROOT / "flux" / "train_configs" / "flux_schnell_mlperf.toml"
    config = parse_config(["--job.config_file", str(mlperf)])
    assert [g.name for g in check_plan(config, PlanSettings(ngpu, ("gb200", "h200")))]
    assert config.validation.samples == -1  # the plan's checks changed a copy
