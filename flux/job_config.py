"""The TOML sections this package adds to torchtitan's JobConfig.

torchtitan merges these dataclasses field by field into its own (`job.custom_config_module =
"flux.job_config"`): `[encoder]`, `[ema]` and `[inference]` are new sections, and `[training]`,
`[validation]` and `[activation_checkpoint]` gain the fields below. Each docstring is what
`--help` shows.
"""

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class Encoder:
    t5_encoder: str = "t5-debug"
    """T5 encoder and tokenizer: a hub id (google/t5-v1_1-xxl), a local folder saved with
    save_pretrained, or t5-debug (the tiny one in flux/assets)"""

    clip_encoder: str = "clip-debug"
    """CLIP text encoder and tokenizer: a hub id (openai/clip-vit-large-patch14), a local
    folder, or clip-debug"""

    max_t5_encoding_len: int = 16
    """T5 tokens per caption (padded or truncated): 256 for flux-schnell, 512 for flux-dev"""

    autoencoder_path: str = "flux/assets/autoencoder-debug/ae.safetensors"
    """The autoencoder's weights (ae.safetensors; fetch the published one with
    flux/scripts/download_autoencoder.py)"""

    encoder_dtype: Literal["bfloat16", "float32"] = "float32"
    """Dtype of the frozen T5, CLIP and autoencoder"""


@dataclass
class Training:
    img_size: int = 64
    """Training images are resized and center-cropped to img_size × img_size (buckets =
    "aspect": to buckets of about img_size² pixels)"""

    buckets: Literal["square", "aspect"] = "square"
    """How images are fitted: square (each image's centre square, resized to img_size ×
    img_size) or aspect (aspect-ratio buckets of about img_size² pixels, sides multiples of
    16, ratios 1:4 to 4:1: each image goes to the bucket nearest its aspect ratio, resized
    to cover it and centre-cropped; each micro-batch holds one bucket)"""

    bucket_sizes: list[tuple[int, int]] = field(default_factory=list)
    """With buckets = "aspect": the buckets, as [width, height] pairs in pixels, multiples of
    16 (empty: 17 generated for img_size, at ratios 2^(k/4) from 1:4 to 4:1)"""

    max_upscale: float = 1.0
    """With buckets = "aspect": the most an image may be enlarged to cover its bucket; a
    smaller image is skipped and counted ("image too small")"""

    classifier_free_guidance_prob: float = 0.1
    """Probability of replacing a caption with the empty prompt, for each encoder
    independently (teaches the unconditional prediction classifier-free guidance needs)"""

    timestep_sampling: Literal["uniform", "logit_normal", "flux_shift"] = "flux_shift"
    """Training timesteps: uniform, logit_normal (SD3), or flux_shift (logit-normal shifted by
    the image's token count, as FLUX)"""

    guidance: float = 1.0
    """Value given to the guidance embedding during training (flavors that have one)"""

    seed_data: int = 0
    """Seed of the data order, caption dropout and noise streams (each rank derives its own)"""

    attention_backend: Literal["default", "cudnn", "flash3"] = "default"
    """Which fused attention kernels the transformer prefers (GPU only): default (PyTorch's
    choice: FlashAttention-2, then memory-efficient), cudnn (cuDNN's, tried first), or
    flash3 (FlashAttention-3 on Hopper GPUs; needs the flash_attn_interface package). Not
    measured on this project's GPUs yet: try it with `benchmark step` first"""

    shards_open: int = 8
    """Shards each data stream reads at once, taking each next record from one of them at
    random (webdataset, cc12m-wds): consecutive samples come from different shards"""

    data_streams: int = 0
    """Streams the data is read as, each a fixed sequence of samples (0: data-parallel degree
    × dataloader num_workers at the run's first start). Checkpoints keep it: a resume may use
    any data-parallel degree that divides it, so set it to a multiple of the degrees a run
    may move between (more streams: more shards open per rank)"""

    max_nonfinite_steps: int = 10
    """A step whose loss or gradients are not finite is not applied; after this many in a
    row the run stops (its last checkpoint intact)"""

    max_skipped_fraction: float = 0.1
    """Bad samples (undecodable images, missing captions, unreadable cache shards) are
    skipped and counted; when more than this fraction of the samples read were skipped
    (judged from the 1000th sample read on), the run stops instead of training on what is
    left (1 never stops)"""


@dataclass
class ActivationCheckpoint:
    skip_last_blocks: int = 0
    """The last N transformer blocks (double, then single blocks, in the order they run)
    keep their activations instead of recomputing them, with mode full or selective: a GPU
    with memory to spare buys back their recompute"""


@dataclass
class Validation:
    dataset: str = "shapes"
    """Held-out data for the validation loss: a dataset source, as training.dataset (shapes
    draws its validation samples from a seed of their own; precomputed reads a cache made
    with `python -m flux.scripts.precompute --split validation`)"""

    steps: int = 2
    """Held-out batches per validation (the same ones each time; the loss metric: mlperf
    reads validation.samples)"""

    img_size: int = 64
    """Validation images are resized and center-cropped to img_size × img_size"""

    loss_timesteps: int = 8
    """Validation loss is averaged over this many fixed, evenly spaced timesteps in (0, 1)"""

    sample_prompts: list[str] = field(
        default_factory=lambda: [
            "a large red circle at the center on a white background",
            "a large red square at the center on a black background",
            "a large blue triangle at the center on a white background",
            "a large green circle at the center on a gray background",
        ]
    )
    """Prompts sampled at each validation, saved as one PNG grid per step"""

    sample_sizes: list[tuple[int, int]] = field(default_factory=list)
    """[width, height] pairs the prompts are sampled at, one grid row each (TOML:
    [[1024, 576], [768, 1024]]; command line: 1024 576 768 1024). Each is scaled to the
    run's resolution: its aspect ratio at about img_size² pixels, sides multiples of 16, so
    one list serves every stage of a progressive run (empty: one square of img_size)"""

    sampling_steps: int = 20
    """Euler steps when sampling validation images"""

    cfg_scale: float = 4.0
    """Classifier-free guidance scale when sampling validation images (1 disables it)"""

    metric: str = "loss"
    """The validation loss: loss (validation.steps batches, each at every one of the
    loss_timesteps stratified timesteps), or mlperf (MLPerf Training's FLUX.1 benchmark:
    sample i of the held-out set at timestep (i mod K)/K with K = loss_timesteps, the mean
    over the K timesteps of each one's mean over the first validation.samples samples)"""

    samples: int = -1
    """Held-out samples the mlperf metric evaluates, the first in the set's order (-1: the
    whole set; the shapes source is endless and needs a number)"""

    target_loss: float = 0.0
    """Stop the run when the validation loss is at or below this, logging the time to train
    (samples, steps, wall time, devices), with a checkpoint if checkpointing is on (0: never)"""

    every_samples: int = 0
    """Validate each time the training samples seen (steps × global batch) pass a multiple
    of this, whatever the batch size; it replaces validation.freq (0: every freq steps and
    after step 1)"""


@dataclass
class Ema:
    enable: bool = False
    """Keep an exponential moving average (EMA) of the weights: float32, per shard, saved in
    full checkpoints as ema.*; validated, exported (convert to-flux --ema) and sampled
    (run_infer.sh) beside or instead of the raw weights"""

    decay: float = 0.9999
    """Decay of the average per update (each update keeps decay of it), in [0, 1)"""

    warmup: bool = True
    """Ramp the decay up as min(decay, (1 + k) / (10 + k)) over the updates k, so the first
    steps' weights are forgotten soon; without it every update uses decay"""

    update_every: int = 1
    """Update the average every N training steps (its horizon is then N / (1 - decay) steps)"""

    start_step: int = 0
    """The first training step that updates the average (its first update copies the
    weights); validation and export of the average wait for it"""

    cpu_offload: bool = False
    """Keep the average in host memory (each update copies the weights to the host)"""

    validation: Literal["raw", "ema", "both"] = "both"
    """Which weights validation evaluates when the average is kept: raw, ema or both (the
    average's loss is validation_metrics/ema_loss, its images validation/ema/step_N.png)"""


@dataclass
class Inference:
    prompts: list[str] = field(default_factory=list)
    """Prompts to sample (or use prompts_path)"""

    prompts_path: str = ""
    """A text file with one prompt per line"""

    save_path: str = "outputs/images"
    """Folder the PNGs are written to"""


@dataclass
class JobConfig:
    encoder: Encoder = field(default_factory=Encoder)
    training: Training = field(default_factory=Training)
    validation: Validation = field(default_factory=Validation)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    ema: Ema = field(default_factory=Ema)
    inference: Inference = field(default_factory=Inference)
