"""float8 linear layers through torchtitan's converter (torchao), emulated on the CPU: which
layers convert, what they compute, checkpoints that move to and from float8 runs, and the
start-up checks."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from torch import nn
from torchao.float8.float8_linear import Float8Linear
from torchtitan.distributed import ParallelDims
from torchtitan.protocols.model_converter import build_model_converters
from torchtitan.tools.utils import has_cuda_capability

from flux.config import ConfigError, check_config, parse_config
from flux.model.args import flux_configs
from flux.model.model import FluxModel
from tests.launch import ROOT, run_train
from tests.tp_worker import model_and_batch

SCHNELL = str(ROOT / "flux" / "train_configs" / "flux_schnell_model.toml")
DEBUG = str(ROOT / "flux" / "train_configs" / "debug_model.toml")
FLOAT8 = ("--model.converters", "quantize.linear.float8", "--quantize.linear.float8.emulate")
ALL_GATHER = ("--quantize.linear.float8.enable_fsdp_float8_all_gather",)


def converted(model: nn.Module, *args: str) -> nn.Module:
    """The model after torchtitan's converters of the debug config with these arguments,
    and the full-size configs' filter (which layers stay in high precision)."""
    shipped = parse_config(["--job.config_file", SCHNELL]).quantize.linear.float8.filter_fqns
    job = parse_config(["--job.config_file", DEBUG, *FLOAT8, *args])
    job.quantize.linear.float8.filter_fqns = shipped
    dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)
    build_model_converters(job, dims).convert(model)
    return model


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


def test_a_float8_checkpoint_resumes_without_float8(tmp_path) -> None:
    args = (
        *("--debug.seed", "0", "--training.steps", "2", "--training.local_batch_size", "2"),
        *("--validation.freq", "100", "--validation.steps", "1"),
        *("--validation.sampling_steps", "1", "--checkpoint.enable"),
        *("--checkpoint.interval", "2", *ALL_GATHER),
        "--quantize.linear.float8.precompute_float8_dynamic_scale_for_fsdp",
    )
    first = run_train(tmp_path / "float8", *args, *FLOAT8, nproc=2)
    assert first.returncode == 0, first.output[-3000:]
    assert "Swapped to Float8Linear" in first.output
    dump = tmp_path / "float32"
    shutil.copytree(tmp_path / "float8" / "checkpoint" / "step-2", dump / "checkpoint" / "step-2")
    later = ("--training.steps", "3", "--checkpoint.interval", "1")
    second = run_train(dump, *args, *later)
    assert second.returncode == 0, second.output[-3000:]
    assert "Training starts at step 3" in second.output and "Float8" not in second.output
    assert math.isfinite(second.losses[3])


@pytest.mark.parametrize(
    "args, expected",
    [
        (("--model.converters", "quantize.linear.float8"), "needs a GPU with float8 matmuls"),
        ((*FLOAT8, "--compile.enable"), "emulate does not work with compile.enable"),
        (
            (*FLOAT8, "--parallelism.tensor_parallel_degree", "2", *ALL_GATHER),
            "with tensor parallelism takes the tensorwise recipe and no FSDP float8 all-gather",
        ),
    ],
)
def test_float8_settings_that_cannot_run_are_refused_in_one_line(args, expected) -> None:
    if "GPU" in expected and has_cuda_capability(8, 9):
        pytest.skip("this machine has float8 matmuls")
    world_size = 2 if "--parallelism.tensor_parallel_degree" in args else 1
    with pytest.raises(ConfigError) as error:
        check_config(parse_config(["--job.config_file", DEBUG, *args]), world_size)
    assert expected in str(error.value) and "\n" not in str(error.value)
