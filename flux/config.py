"""Reading and checking a job's configuration before any work is done.

parse_config reads the TOML itself first, so that an unreadable file, a key that does not
exist or a value of the wrong type is one ConfigError naming the file, section and key,
instead of a traceback from deep inside torchtitan. check_config then checks what the
values mean, grouped by owner (the job's folder, the model, training and its optimizer,
validation, checkpoints, data and encoders' files, parallel degrees against the world
size and the batch), and sets the values derived from them. Every setting that can be
checked before the processes start is checked here; flux.train's main and
`python -m flux.config` (run_train.sh's pre-flight) print a ConfigError as one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import sys
import tomllib
import types
import typing
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torchtitan.config import ConfigManager, JobConfig

from flux.data.buckets import Buckets, tokens
from flux.data.buckets import name as bucket_name
from flux.sampling import PIXELS_PER_TOKEN, check_image_size

if TYPE_CHECKING:
    from flux.data.precomputed import CacheSettings

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # where relative asset paths also resolve
DEBUG_CONFIG = PACKAGE_ROOT / "flux" / "train_configs" / "debug_model.toml"  # the default job
CUSTOM_CONFIG_MODULE = "flux.job_config"


class ConfigError(ValueError):
    """A configuration the user can fix; its message says how, in one line."""


def config_file_arg(args: list[str]) -> str | None:
    for i, arg in enumerate(args):
        key, _, value = arg.partition("=")
        if key in ("--job.config_file", "--job.config-file"):
            return value if value else (args[i + 1] if i + 1 < len(args) else None)
    return None


def load_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} not found: give an existing TOML with --job.config_file "
            "(see flux/train_configs/)"
        ) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid TOML ({e}): fix it") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read ({e.strerror})") from None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _matches(value: Any, tp: Any) -> bool:
    """Whether a TOML value fits a config field's annotation."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(tp))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin in (list, tuple):
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        return isinstance(value, list) and all(_matches(v, inner) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # an annotation this check does not know: leave it to the trainer


def check_toml(values: dict[str, Any], cls: type, path: str, section: str = "") -> None:
    """Every key exists in the config class and every value has the field's type."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        where = f"{section}.{key}" if section else key
        if key not in fields:
            known = ", ".join(sorted(fields))
            place = f"[{section}]" if section else "the top level"
            raise ConfigError(
                f"{path}: unknown key {key!r} in {place}; known keys: {known}"
                if section
                else f"{path}: unknown section [{key}]; known sections: {known}"
            )
        tp = fields[key].type
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: [{where}] must be a table of keys, not {value!r}")
            check_toml(value, tp, path, where)  # type: ignore[arg-type]
        elif not _matches(value, tp):
            raise ConfigError(
                f"{path}: {where} = {value!r} is not a valid {_type_name(tp)}: fix the value"
            )


def merged_config_class() -> type:
    from flux import job_config
    from flux.seam import merged_config_class as merged

    return merged(job_config.JobConfig)


def parse_config(args: list[str]) -> JobConfig:
    """Command-line arguments (torchtitan's, plus --job.config_file) -> a checked JobConfig."""
    args = list(args)
    if not any(a.split("=")[0] in ("--job.custom_config_module",) for a in args):
        args += ["--job.custom_config_module", CUSTOM_CONFIG_MODULE]
    path = config_file_arg(args)
    if path is not None:
        values = load_toml(path)
        module = values.get("job", {}).get("custom_config_module", CUSTOM_CONFIG_MODULE)
        if module != CUSTOM_CONFIG_MODULE:
            raise ConfigError(
                f"{path}: job.custom_config_module = {module!r}; flux needs "
                f"{CUSTOM_CONFIG_MODULE!r} (or leave it out)"
            )
        check_toml(values, merged_config_class(), path)
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said), warnings.catch_warnings():
            # A TOML array of pairs reaches tyro as lists where a setting holds tuples
            # (validation.sample_sizes); tyro keeps them, and warns that it might not.
            warnings.filterwarnings("ignore", "The field .* but the default value", UserWarning)
            job_config = ConfigManager().parse_args(args)
    except (AssertionError, ValueError) as e:  # torchtitan's own checks of a few fields
        message = " ".join(str(e).split()) or type(e).__name__
        raise ConfigError(f"{TORCHTITAN_CHECKS.get(message, message)}: fix it") from None
    except SystemExit as e:  # tyro's refusal of a value (a type, a choice), drawn as a box
        if not e.code:
            raise
        raise ConfigError(one_line_of_tyro(said.getvalue())) from None
    sys.stderr.write(said.getvalue())  # what parsing said besides (warnings), passed on
    return job_config


def one_line_of_tyro(box: str) -> str:
    """tyro's error box as one line: its words, without the frame and the --help advice."""
    lines = [line.strip(" │╭╮╰╯─") for line in box.splitlines()]
    words = " ".join(line for line in lines if line and "helptext" not in line)
    title = r"^(Invalid choice|Value error|Parsing error|Unrecognized options)\s+"
    return " ".join(re.sub(title, "", words).split())


# What torchtitan's own checks of its config fields say, said with the setting's name.
TORCHTITAN_CHECKS = {
    "validation steps must be positive or -1": "validation.steps: use 1 or more",
}


def resolve_path(path: str) -> str:
    """A relative path as given if it exists from here, else relative to the package's
    checkout (so the default debug assets are found from any working directory)."""
    if not path or Path(path).is_absolute() or Path(path).exists():
        return path
    candidate = PACKAGE_ROOT / path
    return str(candidate) if candidate.exists() else path


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_config(
    job_config: JobConfig, world_size: int | None = None, parallelism: bool = True
) -> None:
    """What the values mean, checked by owner; sets derived values (seq_len, resolved paths).
    parallelism=False leaves out the parallel degrees (precompute runs processes of its own)."""
    check_job(job_config)
    check_model(job_config)
    check_training(job_config)
    check_ema(job_config)
    check_validation(job_config)
    check_checkpoint(job_config)
    check_data(job_config)
    training, encoder = job_config.training, job_config.encoder
    img_tokens = max(tokens(size) for size in data_buckets(job_config, training.img_size).sizes)
    training.seq_len = img_tokens + encoder.max_t5_encoding_len
    if parallelism:
        check_parallelism(job_config, _world_size() if world_size is None else world_size)


# -- by owner: the job, the model, training, validation, checkpoints, data, parallelism -------
def at_least(name: str, value: float, low: float, why: str = "") -> None:
    """Refuse `name` = value below `low`."""
    if not value >= low:  # NaN too
        raise ConfigError(f"{name} = {value}: use {low} or more{f' ({why})' if why else ''}")


def within(name: str, value: float, low: float, high: float, why: str = "") -> None:
    """Refuse `name` = value outside [low, high]."""
    if not low <= value <= high:
        raise ConfigError(
            f"{name} = {value}: use a value from {low} to {high}{f' ({why})' if why else ''}"
        )


def check_job(job_config: JobConfig) -> None:
    """The dump folder (where checkpoints, images and logs go) can be a folder."""
    dump = Path(job_config.job.dump_folder)
    existing = next((p for p in (dump, *dump.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(
            f"job.dump_folder {dump}: {existing} is a file, not a folder: give a folder "
            "(--job.dump_folder)"
        )
    if existing is not None and not os.access(existing, os.W_OK):
        raise ConfigError(f"job.dump_folder {dump}: {existing} is not writable: give another")
    at_least("metrics.log_freq", job_config.metrics.log_freq, 1, "steps between log lines")


def check_model(job_config: JobConfig) -> None:
    from flux.model.args import flux_configs

    if job_config.model.name != "flux":
        raise ConfigError(f"model.name = {job_config.model.name!r}: this trainer runs 'flux'")
    flavor = job_config.model.flavor
    if flavor not in flux_configs:
        raise ConfigError(
            f"unknown model.flavor {flavor!r}: choose one of {', '.join(flux_configs)}"
        )


def check_training(job_config: JobConfig) -> None:
    """Steps, batch, the flow step's settings, the optimizer and the learning rate."""
    training, optimizer, schedule = (
        job_config.training,
        job_config.optimizer,
        job_config.lr_scheduler,
    )
    at_least("training.steps", training.steps, 1)
    at_least("training.local_batch_size", training.local_batch_size, 1)
    if training.global_batch_size != -1:
        at_least("training.global_batch_size", training.global_batch_size, 1, "or -1")
    if not training.max_norm > 0:
        raise ConfigError(f"training.max_norm = {training.max_norm}: use a positive number")
    at_least("training.gc_freq", training.gc_freq, 1, "steps between garbage collections")
    at_least("training.dataloader.num_workers", training.dataloader.num_workers, 0)
    within("training.classifier_free_guidance_prob", training.classifier_free_guidance_prob, 0, 1)
    at_least(
        "training.max_nonfinite_steps",
        training.max_nonfinite_steps,
        1,
        "the non-finite steps in a row that stop the run",
    )
    within(
        "training.max_skipped_fraction",
        training.max_skipped_fraction,
        0,
        1,
        "the share of skipped samples that stops the run",
    )
    check_buckets(job_config)
    at_least("encoder.max_t5_encoding_len", job_config.encoder.max_t5_encoding_len, 1)
    at_least("optimizer.lr", optimizer.lr, 0)
    at_least("optimizer.eps", optimizer.eps, 0)
    at_least("optimizer.weight_decay", optimizer.weight_decay, 0)
    for name in ("beta1", "beta2"):
        value = getattr(optimizer, name)
        if not 0 <= value < 1:
            raise ConfigError(f"optimizer.{name} = {value}: use a value in [0, 1)")
    at_least("lr_scheduler.warmup_steps", schedule.warmup_steps, 0)
    if schedule.total_steps is not None:
        at_least("lr_scheduler.total_steps", schedule.total_steps, 1, "or leave it unset")
    if schedule.decay_ratio is not None:
        within("lr_scheduler.decay_ratio", schedule.decay_ratio, 0, 1)
    within("lr_scheduler.min_lr_factor", schedule.min_lr_factor, 0, 1)
    check_activation_checkpoint(job_config.activation_checkpoint)
    check_attention_backend(training.attention_backend)


def check_attention_backend(backend: str) -> None:
    """cuDNN's and FlashAttention-3's kernels need a GPU (FlashAttention-3 a Hopper one,
    and its package)."""
    import importlib.util

    from torchtitan.tools.utils import has_cuda_capability

    if backend == "default":
        return
    if not torch.cuda.is_available():
        raise ConfigError(
            f"training.attention_backend = {backend!r} needs a CUDA GPU: use 'default'"
        )
    if backend == "flash3" and not has_cuda_capability(9, 0):
        raise ConfigError(
            "training.attention_backend = 'flash3' needs a Hopper GPU (compute capability "
            "9.0): use 'cudnn' or 'default'"
        )
    if backend == "flash3" and importlib.util.find_spec("flash_attn_interface") is None:
        raise ConfigError(
            "training.attention_backend = 'flash3' needs FlashAttention-3's "
            "flash_attn_interface package (built from flash-attention's hopper/ folder)"
        )


def check_activation_checkpoint(ac: Any) -> None:
    """The modes flux implements: none, full, selective by block interval or by op."""
    if ac.mode not in ("none", "full", "selective"):
        raise ConfigError(
            f"activation_checkpoint.mode = {ac.mode!r} is not supported for flux: use none, "
            "full or selective"
        )
    option = ac.selective_ac_option
    if ac.mode == "selective" and option != "op" and not (option.isdigit() and int(option) >= 1):
        raise ConfigError(
            f"activation_checkpoint.selective_ac_option = {option!r}: use 'op' (keep the "
            "matmul and attention outputs, recompute the rest) or a block interval N >= 1"
        )
    at_least("activation_checkpoint.skip_last_blocks", ac.skip_last_blocks, 0)


def check_buckets(job_config: JobConfig) -> None:
    """Aspect buckets: listed sizes are pairs of multiples of 16; an upscale limit above 0;
    no listed sizes for square crops."""
    training = job_config.training
    if training.buckets == "square":
        if training.bucket_sizes:
            raise ConfigError(
                "training.bucket_sizes is set but training.buckets = 'square' crops every image "
                "to img_size: set training.buckets = 'aspect', or remove the sizes"
            )
        return
    if not training.max_upscale > 0:
        raise ConfigError(
            f"training.max_upscale = {training.max_upscale}: use a positive factor (1: never "
            "enlarge an image)"
        )
    for pair in training.bucket_sizes:
        if len(pair) != 2:
            raise ConfigError(
                f"training.bucket_sizes has {pair}: give [width, height] pairs, e.g. [[512, 512], "
                "[576, 448]]"
            )
        for side in pair:
            try:
                check_image_size(side, f"training.bucket_sizes' side of {pair}")
            except ValueError as e:
                raise ConfigError(str(e)) from None
    if job_config.validation.enable and job_config.validation.metric == "mlperf":
        raise ConfigError(
            "validation.metric = 'mlperf' evaluates the held-out set at one square size, but "
            "training.buckets = 'aspect': use validation.metric = 'loss', or square buckets"
        )


def data_buckets(job_config: JobConfig, img_size: int) -> Buckets:
    """The buckets images are fitted to at img_size: training.buckets' kind; listed sizes
    at training's img_size, generated ones otherwise (picked for context parallelism's
    token counts)."""
    training = job_config.training
    if training.buckets == "square":
        return Buckets.square(img_size)
    listed = training.bucket_sizes if img_size == training.img_size else []
    return Buckets.aspect(
        img_size,
        [(w, h) for w, h in listed],
        training.max_upscale,
        job_config.parallelism.context_parallel_degree,
    )


def check_validation(job_config: JobConfig) -> None:
    validation = job_config.validation
    if not validation.enable:
        return
    at_least("validation.freq", validation.freq, 1, "steps between validations")
    at_least("validation.steps", validation.steps, 1, "held-out batches; -1 cannot mean 'all'")
    at_least("validation.local_batch_size", validation.local_batch_size, 1)
    at_least("validation.loss_timesteps", validation.loss_timesteps, 1)
    at_least("validation.sampling_steps", validation.sampling_steps, 1)
    at_least("validation.cfg_scale", validation.cfg_scale, 0)
    at_least("validation.target_loss", validation.target_loss, 0, "0 never stops the run")
    at_least("validation.every_samples", validation.every_samples, 0, "0: every freq steps")
    if validation.metric not in ("loss", "mlperf"):
        raise ConfigError(f"validation.metric = {validation.metric!r}: choose loss or mlperf")
    if validation.metric == "mlperf":
        if validation.dataset not in ("shapes", "imagefolder", "precomputed"):
            raise ConfigError(
                f"validation.metric = 'mlperf' reads sample i of the held-out set, which "
                f"validation.dataset = {validation.dataset!r} cannot: use precomputed (a cache "
                "made with precompute --split validation), imagefolder or shapes"
            )
        if validation.samples == -1 and validation.dataset == "shapes":
            raise ConfigError(
                "validation.samples = -1 (the whole set) but the shapes source is endless: "
                "give a number of samples"
            )
        if validation.samples != -1:
            at_least("validation.samples", validation.samples, 1, "or -1: the whole set")
    elif not validation.sample_prompts:
        raise ConfigError("validation.sample_prompts is empty: give at least one prompt")
    for pair in validation.sample_sizes:
        if (
            not (
                len(pair) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
            )
            or min(pair) < 1
        ):
            raise ConfigError(
                f"validation.sample_sizes holds {list(pair)}: give [width, height] pairs of "
                "positive integers, e.g. [[1024, 576], [768, 1024]]"
            )


def check_checkpoint(job_config: JobConfig) -> None:
    """Interval and retention; the checkpoint a run is told to load exists."""
    ckpt = job_config.checkpoint
    if not ckpt.enable:
        return
    at_least("checkpoint.interval", ckpt.interval, 1, "steps between checkpoints")
    at_least("checkpoint.keep_latest_k", ckpt.keep_latest_k, 0, "0 keeps them all")
    folder = Path(job_config.job.dump_folder) / ckpt.folder
    if ckpt.load_step != -1:
        at_least("checkpoint.load_step", ckpt.load_step, 0, "or -1: the newest complete one")
        step = folder / f"step-{ckpt.load_step}"
        if not step.is_dir():
            have = sorted(p.name for p in folder.glob("step-*")) if folder.is_dir() else []
            raise ConfigError(
                f"checkpoint.load_step = {ckpt.load_step} but {step} does not exist "
                f"(there: {', '.join(have) or 'no checkpoints'}): give one of those, or -1"
            )
    if ckpt.initial_load_path and not folder.exists():  # torchtitan reads it only then
        path = Path(ckpt.initial_load_path)
        index = "model.safetensors.index.json" if ckpt.initial_load_in_hf else ".metadata"
        if not path.is_dir():
            raise ConfigError(
                f"checkpoint.initial_load_path {path} is not a folder: give a checkpoint "
                "folder (checkpoint/step-N, or one made by `python -m flux.scripts.convert "
                "from-flux`)"
            )
        if not (path / index).is_file():
            raise ConfigError(
                f"checkpoint.initial_load_path {path} is not a checkpoint (no {index}): give "
                "a checkpoint/step-N folder, or one made by `python -m flux.scripts.convert "
                "from-flux`"
            )


def check_ema(job_config: JobConfig) -> None:
    ema = job_config.ema
    if not 0 <= ema.decay < 1:
        raise ConfigError(f"ema.decay = {ema.decay}: use a value in [0, 1), e.g. 0.9999")
    if ema.update_every < 1:
        raise ConfigError(f"ema.update_every = {ema.update_every}: use 1 or more (steps)")
    if ema.start_step < 0:
        raise ConfigError(f"ema.start_step = {ema.start_step}: use 0 or more (a training step)")


def check_data(job_config: JobConfig) -> None:
    """Sources, image sizes and files of the training and validation data, and the frozen
    encoders' files; relative paths are resolved."""
    from flux.data.dataset import SOURCES
    from flux.model.autoencoder import DOWNLOAD_HINT

    training, validation, encoder = job_config.training, job_config.validation, job_config.encoder
    sections = [("training", training)] + (
        [("validation", validation)] if validation.enable else []
    )
    for key, section in sections:
        if section.dataset not in SOURCES:
            raise ConfigError(
                f"unknown {key}.dataset {section.dataset!r}: choose one of {', '.join(SOURCES)}"
            )
        try:
            check_image_size(section.img_size, f"{key}.img_size")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    encoder.autoencoder_path = resolve_path(encoder.autoencoder_path)
    if not Path(encoder.autoencoder_path).is_file():
        raise ConfigError(
            f"encoder.autoencoder_path {encoder.autoencoder_path} not found: {DOWNLOAD_HINT}"
        )
    for name in ("t5_encoder", "clip_encoder"):
        check_text_encoder(f"encoder.{name}", getattr(encoder, name))
    for section in (training, validation):
        if section.dataset_path:
            section.dataset_path = resolve_path(section.dataset_path)
    for key, section in sections:
        check_dataset_path(key, section.dataset, section.dataset_path)
    check_precomputed(job_config)
    check_reader(job_config)


def check_reader(job_config: JobConfig) -> None:
    """The data reader's settings: [training] shards_open, data_streams; [training.dataloader]
    (data_streams against the data-parallel degree: check_parallelism)."""
    training, loader = job_config.training, job_config.training.dataloader
    if training.shards_open < 1:
        raise ConfigError(f"training.shards_open = {training.shards_open}: use 1 or more")
    if training.data_streams < 0:
        raise ConfigError(f"training.data_streams = {training.data_streams}: use 0 or more")
    if loader.num_workers < 0:
        raise ConfigError(f"training.dataloader.num_workers = {loader.num_workers}: use 0 or more")
    if loader.prefetch_factor is not None and loader.prefetch_factor < 1:
        raise ConfigError(
            f"training.dataloader.prefetch_factor = {loader.prefetch_factor}: use 1 or more"
        )


HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")  # name or owner/name


def check_text_encoder(name: str, value: str) -> None:
    """A text encoder is a bundled name, a local folder, or a hub id; a value that is a
    path (not shaped like a hub id) must be a folder."""
    from flux.model.text_encoders import BUNDLED

    if value in BUNDLED or Path(value).is_dir():
        return
    if not HUB_ID.fullmatch(value) or value.startswith((".", "~")):
        raise ConfigError(
            f"{name} {value} is not a folder: give a folder saved with save_pretrained, a hub "
            "id (google/t5-v1_1-xxl, openai/clip-vit-large-patch14), or t5-debug/clip-debug"
        )


def check_dataset_path(key: str, dataset: str, path: str | None) -> None:
    """The local sources read a folder of files (precomputed: check_precomputed)."""
    if dataset not in ("imagefolder", "webdataset"):
        return
    if not path:
        raise ConfigError(f"{key}.dataset = {dataset!r} needs {key}.dataset_path: its folder")
    if not Path(path).is_dir():
        raise ConfigError(
            f"{key}.dataset_path {path} is not a folder: give the folder of the "
            f"{'images and .txt captions' if dataset == 'imagefolder' else '.tar shards'}"
        )


def cache_settings(job_config: JobConfig, img_size: int) -> CacheSettings:
    """What a precomputed cache of this job's data, at img_size, is made with (precompute
    records it; training compares it). The autoencoder is named by its weights' hash."""
    from flux.data.precomputed import CacheSettings, file_sha256
    from flux.model.args import flux_configs

    enc = job_config.encoder
    return CacheSettings(
        t5_encoder=enc.t5_encoder,
        clip_encoder=enc.clip_encoder,
        max_t5_encoding_len=enc.max_t5_encoding_len,
        encoder_dtype=enc.encoder_dtype,
        img_size=img_size,
        autoencoder_sha256=file_sha256(enc.autoencoder_path),
        latent_channels=flux_configs[job_config.model.flavor].autoencoder_params.z_channels,
        buckets=data_buckets(job_config, img_size).describe(),
    )


def check_precomputed(job_config: JobConfig) -> None:
    """A `precomputed` training or validation set is a finished cache made with this job's
    encoder settings and image size."""
    from flux.data.precomputed import PRECOMPUTE_HINT, CacheError, check_cache

    training, validation = job_config.training, job_config.validation
    sections = [("training", training)] + (
        [("validation", validation)] if validation.enable else []
    )
    expected = None  # the autoencoder is hashed once
    for key, section in sections:
        if section.dataset != "precomputed":
            continue
        if not section.dataset_path:
            raise ConfigError(
                f"{key}.dataset = 'precomputed' needs {key}.dataset_path: the folder "
                f"`{PRECOMPUTE_HINT}` wrote"
            )
        if expected is None:
            expected = cache_settings(job_config, section.img_size)
        expected = dataclasses.replace(expected, img_size=section.img_size)
        try:
            check_cache(section.dataset_path, expected)
        except CacheError as e:
            raise ConfigError(f"{key}.dataset_path: {e}") from None


def check_parallelism(job_config: JobConfig, world_size: int) -> None:
    """Degrees against the world size and the model; float8; context parallelism's token
    counts."""
    from flux.model.args import flux_configs

    p = job_config.parallelism
    check_parallel_degrees(p, world_size)
    check_model_parallelism(p, flux_configs[job_config.model.flavor])
    check_global_batch(job_config, world_size)
    check_float8(job_config)
    streams = job_config.training.data_streams
    dp = world_size // (p.tensor_parallel_degree * p.context_parallel_degree)
    if streams % dp:
        raise ConfigError(
            f"training.data_streams = {streams} is not a multiple of the data-parallel degree "
            f"{dp}: use a multiple of it, or 0"
        )
    training, encoder, cp = job_config.training, job_config.encoder, p.context_parallel_degree
    counts = [
        (
            f"encoder.max_t5_encoding_len is {encoder.max_t5_encoding_len}",
            encoder.max_t5_encoding_len,
        )
    ]
    if training.buckets == "square":
        img_tokens = (training.img_size // PIXELS_PER_TOKEN) ** 2
        what = f"training.img_size {training.img_size} gives {img_tokens} image tokens"
        counts.insert(0, (what, img_tokens))
    else:  # generated buckets are picked for it; listed ones are checked
        for size in data_buckets(job_config, training.img_size).sizes:
            what = f"training.bucket_sizes' {bucket_name(size)} has {tokens(size)} image tokens"
            counts.append((what, tokens(size)))
    for what, count in counts:
        if count % cp:
            raise ConfigError(
                f"{what}, which do not split into parallelism.context_parallel_degree = {cp} "
                "equal parts: make the token count a multiple of it"
            )


def check_global_batch(job_config: JobConfig, world_size: int) -> None:
    """A global batch is a whole number of local batches on each data-parallel rank."""
    p, training = job_config.parallelism, job_config.training
    global_batch = training.global_batch_size
    if global_batch == -1:
        return
    others = p.tensor_parallel_degree * p.context_parallel_degree * p.pipeline_parallel_degree
    dp = world_size // others
    per_step = training.local_batch_size * dp
    if global_batch % per_step:
        raise ConfigError(
            f"training.global_batch_size = {global_batch} is not a multiple of "
            f"local_batch_size {training.local_batch_size} × {dp} data-parallel ranks = "
            f"{per_step}: use a multiple (gradient accumulation makes up the rest), or -1"
        )


def check_parallel_degrees(p: Any, world_size: int) -> None:
    named = {
        "data_parallel_replicate_degree": p.data_parallel_replicate_degree,
        "tensor_parallel_degree": p.tensor_parallel_degree,
        "context_parallel_degree": p.context_parallel_degree,
        "pipeline_parallel_degree": p.pipeline_parallel_degree,
    }
    for name, degree in named.items():
        if degree < 1:
            raise ConfigError(f"parallelism.{name} = {degree}: degrees are >= 1")
    product = 1
    for degree in named.values():
        product *= degree
    shard = p.data_parallel_shard_degree
    described = " × ".join(f"{k.replace('_degree', '')} {v}" for k, v in named.items() if v > 1)
    if shard == -1:
        if world_size % product:
            raise ConfigError(
                f"parallel degrees ({described or 'all 1'}) do not divide the world size "
                f"{world_size}: make their product a divisor of the number of processes"
            )
        return
    if shard < 1:
        raise ConfigError(f"parallelism.data_parallel_shard_degree = {shard}: use -1 or >= 1")
    if product * shard != world_size:
        raise ConfigError(
            f"parallel degrees multiply to {product * shard} (data_parallel_shard {shard}"
            f"{' × ' + described if described else ''}) but {world_size} process(es) were "
            "started: make them multiply to the number of processes, or set "
            "data_parallel_shard_degree = -1 to fill it"
        )


def check_model_parallelism(p: Any, args: Any) -> None:
    """What this model can be split into: heads across tensor-parallel ranks (no pipeline
    parallelism); context parallelism's token counts are checked in check_config."""
    if p.pipeline_parallel_degree > 1:
        raise ConfigError(
            "parallelism.pipeline_parallel_degree > 1 is not supported for flux: set it to 1"
        )
    tp = p.tensor_parallel_degree
    if args.num_heads % tp:
        raise ConfigError(
            f"parallelism.tensor_parallel_degree = {tp} does not divide this flavor's "
            f"{args.num_heads} attention heads: use a divisor of {args.num_heads}"
        )


def check_float8(job_config: JobConfig) -> None:
    """What torchtitan's float8 converter needs, checked before its workers start."""
    import importlib.util

    from torchtitan.tools.utils import has_cuda_capability

    quantized = [c for c in job_config.model.converters if c.startswith("quantize.linear")]
    if not quantized:
        return
    tp = job_config.parallelism.tensor_parallel_degree > 1
    if quantized != ["quantize.linear.float8"] and tp:
        raise ConfigError(
            f"model.converters {', '.join(quantized)} with tensor parallelism is not "
            "supported for flux: use quantize.linear.float8, or no tensor parallelism"
        )
    if "quantize.linear.float8" not in quantized:
        return
    float8 = job_config.quantize.linear.float8
    if tp and (
        float8.enable_fsdp_float8_all_gather or float8.recipe_name not in (None, "tensorwise")
    ):
        raise ConfigError(
            "quantize.linear.float8 with tensor parallelism takes the tensorwise recipe and "
            "no FSDP float8 all-gather: set quantize.linear.float8.enable_fsdp_float8_all_gather "
            "and precompute_float8_dynamic_scale_for_fsdp to false"
        )
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError(
            "model.converters quantize.linear.float8 needs torchao: pip install -e '.[float8]'"
        )
    from flux.parallel.parallelize import compiles_model

    compiled = compiles_model(job_config.compile)
    emulate = float8.emulate
    if emulate and compiled:
        raise ConfigError(
            "quantize.linear.float8.emulate does not work with compile.enable: drop one"
        )
    if not emulate and not has_cuda_capability(8, 9):
        raise ConfigError(
            "model.converters quantize.linear.float8 needs a GPU with float8 matmuls (compute "
            "capability 8.9 or newer): on others set quantize.linear.float8.emulate (tests only)"
        )


def main(argv: list[str] | None = None) -> None:
    """`python -m flux.config ARGS`: check a job's configuration as the trainer would (the
    world size from WORLD_SIZE), print one line and exit 2 if it is refused. run_train.sh
    runs it before torchrun, so a refused config is one line, not a launcher traceback."""
    try:
        check_config(parse_config(sys.argv[1:] if argv is None else argv))
    except ConfigError as e:
        print(f"flux: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
