"""Configuration errors are refused before any work, each as one line that says what to do."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchtitan.tools.utils import has_cuda_capability

from flux.config import (
    DEBUG_CONFIG,
    ConfigError,
    check_config,
    data_buckets,
    parse_config,
    resolve_path,
)
from flux.config import main as preflight
from flux.data.buckets import tokens
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


def test_aspect_buckets_are_picked_or_refused_for_context_parallelism() -> None:
    aspect = ("--training.buckets", "aspect", "--parallelism.context_parallel_degree", "2")
    job = config(*aspect)
    check_config(job, 2)  # generated: each bucket's token count splits in two
    buckets = data_buckets(job, job.training.img_size)
    assert len(buckets.sizes) > 5 and all(tokens(s) % 2 == 0 for s in buckets.sizes)
    assert job.training.seq_len == max(tokens(s) for s in buckets.sizes) + 16
    message = refused(*aspect, "--training.bucket_sizes", "64", "64", "48", "48", world_size=2)
    assert "training.bucket_sizes' 48x48 has 9 image tokens, which do not split into" in message


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
        (("--training.shards_open", "0"), "training.shards_open = 0: use 1 or more"),
        (("--training.data_streams", "-1"), "training.data_streams = -1"),
        (("--training.dataloader.num_workers", "-2"), "num_workers = -2: use 0 or more"),
        (("--training.dataloader.prefetch_factor", "0"), "prefetch_factor = 0: use 1 or more"),
    ],
)
def test_data_reader_settings_are_checked(args: tuple[str, ...], expected: str) -> None:
    assert expected in refused(*args)


def test_data_streams_must_be_a_multiple_of_the_data_parallel_degree() -> None:
    message = refused("--training.data_streams", "6", world_size=4)
    assert "not a multiple of the data-parallel degree 4" in message
    check_config(config("--training.data_streams", "8"), 4)


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


@pytest.mark.parametrize(
    "args, says",
    [
        (("--activation_checkpoint.mode", "memory_budget"), "use none, full or selective"),
        (
            (
                "--activation_checkpoint.mode",
                "selective",
                "--activation_checkpoint.selective_ac_option",
                "ops",
            ),
            "'op'",
        ),
        (
            (
                "--activation_checkpoint.mode",
                "full",
                "--activation_checkpoint.skip_last_blocks",
                "-1",
            ),
            "0 or more",
        ),
    ],
)
def test_activation_checkpointing_flux_cannot_run(args: tuple[str, ...], says: str) -> None:
    assert says in refused(*args)


def test_op_level_checkpointing_of_all_but_the_last_blocks_passes() -> None:
    args = (
        "--activation_checkpoint.mode",
        "selective",
        "--activation_checkpoint.selective_ac_option",
        "op",
    )
    job = config(*args, "--activation_checkpoint.skip_last_blocks", "2")
    check_config(job, 1)
    assert job.activation_checkpoint.skip_last_blocks == 2


def test_a_preferred_attention_backend_needs_a_gpu() -> None:
    check_config(config("--training.attention_backend", "default"), 1)  # runs anywhere
    if not torch.cuda.is_available():
        assert "needs a CUDA GPU" in refused("--training.attention_backend", "cudnn")
        assert "needs a CUDA GPU" in refused("--training.attention_backend", "flash3")
    else:
        check_config(config("--training.attention_backend", "cudnn"), 1)


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


def bad_settings(tmp: Path) -> list[tuple[tuple[str, ...], str]]:
    """Settings that passed the pre-flight and then failed inside torchrun (issue 15), with
    what the one line must say."""
    a_file = tmp / "a_file"
    a_file.write_text("")
    empty = tmp / "empty_init"
    empty.mkdir()
    ckpt = ("--checkpoint.enable", "--job.dump_folder", str(tmp / "run"))
    return [
        (("--training.steps", "-1"), "training.steps = -1: use 1 or more"),
        (("--training.steps", "abc"), "Error parsing --training.steps"),  # tyro's refusals
        (("--training.attention_backend", "bogus"), "invalid choice 'bogus'"),
        (("--ema.validation", "neither"), "invalid choice 'neither' for argument '--ema.val"),
        (("--training.no_such_setting", "3"), "Unrecognized options: --training.no_such_set"),
        (("--training.steps", "0"), "training.steps = 0"),
        (("--training.local_batch_size", "0"), "training.local_batch_size = 0"),
        (("--training.global_batch_size", "12"), "global_batch_size = 12 is not a multiple"),
        (("--training.max_norm", "0"), "training.max_norm = 0"),
        (("--training.gc_freq", "0"), "training.gc_freq = 0"),
        (("--training.dataloader.num_workers", "-1"), "num_workers = -1"),
        (("--training.classifier_free_guidance_prob", "1.5"), "from 0 to 1"),
        (("--training.max_skipped_fraction", "2"), "training.max_skipped_fraction = 2.0"),
        (("--training.max_nonfinite_steps", "0"), "use 1 or more"),
        (("--training.bucket_sizes", "64", "48"), "bucket_sizes is set but training.buckets = 'sq"),
        (("--training.buckets", "round"), "invalid choice 'round'"),
        (
            ("--training.buckets", "aspect", "--training.bucket_sizes", "64", "40"),
            "training.bucket_sizes' side of (64, 40) = 40: use a positive multiple of 16",
        ),
        (("--training.buckets", "aspect", "--training.max_upscale", "0"), "max_upscale = 0.0"),
        (
            ("--training.buckets", "aspect", "--validation.metric", "mlperf"),
            "validation.metric = 'mlperf' evaluates the held-out set at one square size",
        ),
        (("--activation_checkpoint.skip_last_blocks", "-1"), "skip_last_blocks = -1"),
        (("--activation_checkpoint.mode", "memory_budget"), "use none, full or selective"),
        (("--training.dataset", "imagefolder"), "needs training.dataset_path"),
        (
            ("--training.dataset", "imagefolder", "--training.dataset_path", str(tmp / "no")),
            "is not a folder",
        ),
        (("--metrics.log_freq", "0"), "metrics.log_freq = 0"),
        (("--encoder.max_t5_encoding_len", "0"), "encoder.max_t5_encoding_len = 0"),
        (("--encoder.t5_encoder", str(tmp / "t5")), "encoder.t5_encoder"),
        (("--encoder.clip_encoder", "./clip"), "encoder.clip_encoder ./clip is not a folder"),
        (("--optimizer.lr", "-0.001"), "optimizer.lr = -0.001"),
        (("--optimizer.eps", "-1"), "optimizer.eps = -1"),
        (("--optimizer.beta2", "1.5"), "optimizer.beta2 = 1.5"),
        (("--lr_scheduler.warmup_steps", "-1"), "lr_scheduler.warmup_steps = -1"),
        (("--lr_scheduler.min_lr_factor", "2"), "lr_scheduler.min_lr_factor = 2.0"),
        (("--validation.freq", "0"), "validation.freq = 0"),
        (("--validation.steps", "0"), "validation.steps: use 1 or more"),
        (("--validation.steps", "-1"), "validation.steps = -1: use 1 or more"),
        (("--validation.local_batch_size", "0"), "validation.local_batch_size = 0"),
        (("--validation.loss_timesteps", "0"), "validation.loss_timesteps = 0"),
        (("--validation.sampling_steps", "0"), "validation.sampling_steps = 0"),
        (("--validation.cfg_scale", "-1"), "validation.cfg_scale = -1.0"),
        (("--validation.target_loss", "-0.5"), "validation.target_loss = -0.5"),
        (("--validation.every_samples", "-1"), "validation.every_samples = -1"),
        (("--validation.metric", "fid"), "validation.metric = 'fid': choose loss or mlperf"),
        (("--validation.sample_sizes", "0", "16"), "validation.sample_sizes holds [0, 16]: give"),
        (("--validation.sample_sizes", "16", "16", "5"), "Error parsing --validation.sample-sizes"),
        (("--lr_scheduler.total_steps", "0"), "lr_scheduler.total_steps = 0: use 1 or more"),
        (("--validation.metric", "mlperf", "--validation.samples", "0"), "validation.samples = 0"),
        (("--validation.metric", "mlperf"), "the shapes source is endless: give a number"),
        (
            ("--validation.metric", "mlperf", "--validation.dataset", "webdataset"),
            "validation.metric = 'mlperf' reads sample i of the held-out set",
        ),
        (("--job.dump_folder", str(a_file)), "is a file, not a folder"),
        (("--job.dump_folder", str(a_file / "run")), "is a file, not a folder"),
        ((*ckpt, "--checkpoint.interval", "0"), "checkpoint.interval = 0"),
        ((*ckpt, "--checkpoint.keep_latest_k", "-1"), "checkpoint.keep_latest_k = -1"),
        ((*ckpt, "--checkpoint.load_step", "5"), "step-5 does not exist"),
        (
            (*ckpt, "--checkpoint.initial_load_path", str(tmp / "missing")),
            "initial_load_path",
        ),
        ((*ckpt, "--checkpoint.initial_load_path", str(empty)), "is not a checkpoint"),
    ]


def test_every_bad_setting_is_refused_by_the_preflight_in_one_line(tmp_path, capsys) -> None:
    """What run_train.sh runs before torchrun (`python -m flux.config`), in this process."""
    for args, expected in bad_settings(tmp_path):
        with pytest.raises(SystemExit) as exit_:
            preflight(["--job.config_file", DEBUG, *args])
        err = capsys.readouterr().err
        assert exit_.value.code == 2, args
        assert err.count("\n") == 1 and err.startswith("flux: error: "), (args, err)
        assert expected in err, (args, err)
    assert not (tmp_path / "run").exists()  # nothing was started


@pytest.mark.e2e
@pytest.mark.parametrize(
    "ngpu, args, expected",
    [
        ("0", (), "NGPU=0: give the number of processes"),
        ("two", (), "NGPU=two"),
        # a setting the preflight refuses (each one's refusal: the table above)
        ("1", ("--model.flavor", "flux-pro"), "unknown model.flavor 'flux-pro'"),
    ],
)
def test_run_train_sh_refuses_bad_settings_in_one_line(tmp_path, ngpu, args, expected) -> None:
    run = run_train(tmp_path / "run", *args, nproc=ngpu)
    lines = [line for line in run.output.splitlines() if line.strip()]
    assert run.returncode == 2 and len(lines) == 1, run.output
    assert lines[0].startswith("flux: error:") and expected in lines[0]
    assert "Traceback" not in run.output
    assert not (tmp_path / "run").exists()
