"""Configuration errors are refused before any work, each as one line that says what to do."""

from __future__ import annotations

from pathlib import Path

import pytest
from torchtitan.tools.utils import has_cuda_capability

from flux.config import DEBUG_CONFIG, ConfigError, check_config, parse_config, resolve_path
from flux.model.args import flux_configs
from tests.launch import run_train

DEBUG = str(DEBUG_CONFIG)
FLOAT8 = ("--model.converters", "quantize.linear.float8", "--quantize.linear.float8.emulate")
ALL_GATHER = ("--quantize.linear.float8.enable_fsdp_float8_all_gather",)


def config(*args: str):
    return parse_config(["--job.config_file", DEBUG, *args])


def refused(*args: str, world_size: int = 1) -> str:
    with pytest.raises(ConfigError) as error:
        check_config(config(*args), world_size)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_the_debug_config_passes_and_sets_the_sequence_length() -> None:
    job = config()
    check_config(job, 1)
    assert job.training.seq_len == (64 // 16) ** 2 + 16
    assert Path(job.encoder.autoencoder_path).is_file()


def test_unknown_flavor() -> None:
    assert "choose one of flux-dev, flux-schnell, flux-debug" in refused(
        "--model.flavor", "flux-pro"
    )


def test_unknown_dataset() -> None:
    assert "unknown training.dataset 'laion'" in refused("--training.dataset", "laion")


@pytest.mark.parametrize(
    "args, world_size",
    [
        (("--parallelism.data_parallel_shard_degree", "3"), 2),
        (("--parallelism.data_parallel_replicate_degree", "3"), 4),
        (("--parallelism.data_parallel_shard_degree", "2"), 1),
    ],
)
def test_degrees_that_do_not_fit_the_world_size(args: tuple[str, ...], world_size: int) -> None:
    message = refused(*args, world_size=world_size)
    assert "number of processes" in message


def test_tensor_parallel_degree_must_divide_the_heads() -> None:
    heads = flux_configs["flux-debug"].num_heads
    message = refused("--parallelism.tensor_parallel_degree", "3", world_size=3)
    assert f"does not divide this flavor's {heads} attention heads" in message


def test_context_parallel_degree_must_split_the_tokens_evenly() -> None:
    message = refused("--parallelism.context_parallel_degree", "3", world_size=3)
    assert "16 image tokens, which do not split into" in message
    check_config(config("--parallelism.context_parallel_degree", "2"), 2)


def test_missing_autoencoder_says_how_to_download_it(tmp_path) -> None:
    message = refused("--encoder.autoencoder_path", str(tmp_path / "ae.safetensors"))
    assert "download_autoencoder.py" in message


def test_image_size_must_be_a_multiple_of_16() -> None:
    assert "multiple of 16" in refused("--training.img_size", "72")


def test_max_nonfinite_steps_must_be_at_least_one() -> None:
    assert "use 1 or more" in refused("--training.max_nonfinite_steps", "0")


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
        check_config(config(*args), world_size)
    assert expected in str(error.value) and "\n" not in str(error.value)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "job.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[training]\nstepz = 3\n", "unknown key 'stepz' in [training]"),
        ("[trainig]\nsteps = 3\n", "unknown section [trainig]"),
        ("[training]\nsteps = 'ten'\n", "training.steps = 'ten' is not a valid int"),
        ("[training]\ntimestep_sampling = 'cosine'\n", "training.timestep_sampling = 'cosine'"),
        ("[encoder]\nmax_t5_encoding_len = true\n", "is not a valid int"),
        ("[training\nsteps = 3\n", "is not valid TOML"),
    ],
)
def test_bad_toml_is_one_line(tmp_path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(["--job.config_file", write(tmp_path, text)])
    assert expected in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_config_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        parse_config(["--job.config_file", str(tmp_path / "nope.toml")])


def test_relative_asset_paths_resolve_from_any_directory(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    resolved = resolve_path("flux/assets/autoencoder-debug/ae.safetensors")
    assert Path(resolved).is_file()
    assert resolve_path("not/there.bin") == "not/there.bin"


@pytest.mark.e2e
def test_run_train_sh_prints_the_error_as_one_line_and_exits_2(tmp_path) -> None:
    run = run_train(tmp_path, "--model.flavor", "flux-pro")
    assert run.returncode != 0
    lines = [line for line in run.output.splitlines() if "flux: error:" in line]
    assert len(lines) == 1 and "unknown model.flavor 'flux-pro'" in lines[0]
    assert "Traceback" not in run.output
    assert not (tmp_path / "checkpoint").exists()


@pytest.mark.parametrize(
    "args, expected",
    [
        (("--ema.decay", "1"), "ema.decay = 1.0: use a value in [0, 1)"),
        (("--ema.update_every", "0"), "ema.update_every = 0: use 1 or more"),
        (("--ema.start_step", "-1"), "ema.start_step = -1: use 0 or more"),
    ],
)
def test_ema_settings_out_of_range(args: tuple[str, ...], expected: str) -> None:
    assert expected in refused("--ema.enable", *args)
