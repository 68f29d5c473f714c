"""Benchmarks for flux.

    python -m flux.scripts.benchmark model [--hidden 1536 --heads 12 --double 2 --single 4
                                            --img-tokens 256 --txt-tokens 256 --rounds 10]

    python -m flux.scripts.benchmark ac [--hidden 512 --heads 4 --double 2 --single 4
                                         --img-tokens 256 --txt-tokens 64 --batch 2]

    python -m flux.scripts.benchmark data [--img-size 256 512 --workers 0 1 2 --batch 16
                                           --batches 12] [--source webdataset|shapes|imagefolder
                                           --path DIR]

    python -m flux.scripts.benchmark step [--steps 10 --warmup 3] [--cache DIR | --compare]
                                          [--json] [trainer arguments]

    python -m flux.scripts.benchmark ema [--flavor flux-debug | --hidden 1024 --heads 8
                                          --double 4 --single 8] [--updates 10 --json]

    python -m flux.scripts.benchmark checksum [--gib 1 | --path CHECKPOINT] [--json]

`model`: forward+backward time of FluxModel against diffusers' FluxTransformer2DModel at the
same dimensions and inputs, measured in alternating turns in one process; prints the ratio.
diffusers comes with the `dev` extra.
`ac`: the activations a forward of FluxModel leaves for backward (the storages still alive
after it), and the forward+backward time, with no activation checkpointing, op-level
selective checkpointing (`selective` + `op`) and full checkpointing; each must give no-AC's
loss and gradients exactly.
`data`: samples/s of one rank's data loader (the training process and its workers) at each
image size and worker count, in total and per worker, and the time one thread takes to turn
a JPEG into a training image (with and without PIL's reduced-size decode). `webdataset`
reads shards of --source-size-px photo-like JPEGs it writes to a temporary folder first, or
those at --path.
`step`: where the time of the trainer's own training step of a config goes (trainer
arguments, default flux/train_configs/debug_model.toml): FluxTrainer on one process, its
model sharded by FSDP over that process as every rank of a data-parallel run shards it,
compiled and checkpointed as configured, with the configured optimizer. The parts: data
loading, text encoding, latent encoding, the transformer's forward+backward, and the
optimizer (clipping, the step's verdict, the update); the mean of --steps steps after
--warmup; images/s, tokens/s, MFU (on a GPU torchtitan knows the peak of) and peak memory
(CUDA's max allocated; on the CPU the process's peak RSS). --cache DIR trains on a
precomputed cache; --compare precomputes one of the config's data to a temporary folder
and runs both, each in a process of its own (so each peak RSS is its own).
`ema`: what keeping an average of the weights (flux.ema) costs one process per update
and per validation swap, with the average beside the weights and in host memory
(cpu_offload: the weights are copied to a host buffer first; on a machine without a GPU
that is a copy within host memory), beside the time one copy of the weights takes.
`checksum`: what a checkpoint's checksums cost on one process (flux.checksums): the DCP
save, writing the checksums after it (hashing files the save left in the page cache), and
verifying them with the files in the page cache and after dropping them from it (read
from the disk). On a temporary checkpoint of --gib GiB of float32 tensors, or on an
existing checkpoint folder (--path; its checksums are rewritten).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from flux.model.args import FluxModelArgs, flux_configs, training_flops_per_sample
from flux.model.model import FluxModel
from flux.sampling import image_ids
from flux.scripts.cli import Parser, fail, nonnegative_int, positive_float, positive_int


def sized_model_args(base: FluxModelArgs, args: argparse.Namespace) -> FluxModelArgs:
    """`base` at --hidden, --heads, --double and --single; RoPE's axes split the head as
    FLUX.1's (16, 56, 56) splits 128, in channel pairs."""
    if args.hidden % args.heads:
        raise ValueError(f"--hidden {args.hidden} is not a multiple of --heads {args.heads}")
    head_dim = args.hidden // args.heads
    rope_t = 2 * max(1, head_dim // 16)
    rope_h = (head_dim - rope_t) // 4 * 2
    return dataclasses.replace(
        base,
        hidden_size=args.hidden,
        num_heads=args.heads,
        depth=args.double,
        depth_single_blocks=args.single,
        axes_dim=(rope_t, rope_h, head_dim - rope_t - rope_h),
    )


def _time_fwd_bwd(step: Callable[[], torch.Tensor]) -> float:
    start = time.perf_counter()
    step().float().square().mean().backward()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_model(args: argparse.Namespace) -> dict[str, Any]:
    from diffusers import FluxTransformer2DModel

    model_args = sized_model_args(flux_configs["flux-schnell"], args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    ours = FluxModel(model_args).to(device)
    ours.init_weights()
    # diffusers' models are torch modules, which its type hints do not tell mypy
    theirs = cast(
        torch.nn.Module,
        FluxTransformer2DModel(
            patch_size=1,
            in_channels=model_args.in_channels,
            num_layers=args.double,
            num_single_layers=args.single,
            attention_head_dim=args.hidden // args.heads,
            num_attention_heads=args.heads,
            joint_attention_dim=model_args.context_in_dim,
            pooled_projection_dim=model_args.vec_in_dim,
            guidance_embeds=False,
            axes_dims_rope=tuple(model_args.axes_dim),
        ),
    ).to(device)

    side = int(args.img_tokens**0.5)  # a square image of img_tokens patches
    if side * side != args.img_tokens:
        raise ValueError(f"--img-tokens {args.img_tokens} is not a square number (e.g. 256, 1024)")
    img = torch.randn(args.batch, args.img_tokens, model_args.in_channels, device=device)
    img_ids = image_ids(1, 2 * side, 2 * side, device)[0]
    txt = torch.randn(args.batch, args.txt_tokens, model_args.context_in_dim, device=device)
    txt_ids = torch.zeros(args.txt_tokens, 3, device=device)
    timesteps = torch.rand(args.batch, device=device)
    y = torch.randn(args.batch, model_args.vec_in_dim, device=device)

    def run_ours() -> torch.Tensor:
        return ours(
            img=img,
            img_ids=img_ids.expand(args.batch, -1, -1),
            txt=txt,
            txt_ids=txt_ids.expand(args.batch, -1, -1),
            timesteps=timesteps,
            y=y,
        )

    def run_theirs() -> torch.Tensor:
        return theirs(
            hidden_states=img,
            encoder_hidden_states=txt,
            pooled_projections=y,
            timestep=timesteps,
            img_ids=img_ids,
            txt_ids=txt_ids,
            return_dict=False,
        )[0]

    times: dict[str, list[float]] = {"flux": [], "diffusers": []}
    for round_ in range(args.warmup + args.rounds):
        # Alternate which goes first, so neither always runs on a warmer cache.
        order = [("flux", run_ours), ("diffusers", run_theirs)]
        for name, step in order if round_ % 2 == 0 else order[::-1]:
            ours.zero_grad(set_to_none=True)
            theirs.zero_grad(set_to_none=True)
            elapsed = _time_fwd_bwd(step)
            if round_ >= args.warmup:
                times[name].append(elapsed)
    flux_s, diffusers_s = (statistics.median(times[k]) for k in ("flux", "diffusers"))
    return {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "flux_fwd_bwd_s": flux_s,
        "diffusers_fwd_bwd_s": diffusers_s,
        "ratio_flux_over_diffusers": flux_s / diffusers_s,
    }


def photo_like(rng: Any, width: int, height: int | None = None) -> Any:
    """A width × height (square: width) RGB image with a photo's JPEG cost: smooth colour
    fields and grain."""
    import numpy as np
    from PIL import Image

    height = height or width
    low = rng.integers(0, 256, (max(1, height // 32), max(1, width // 32), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(low).resize((width, height), Image.Resampling.BICUBIC))
    grain = rng.normal(0.0, 6.0, (height, width, 3))
    return Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))


# A web-like mix of aspect ratios (width:height=percent): square and landscape photos most.
WEB_MIX = "1:1=30,4:3=25,3:2=15,16:9=15,3:4=10,9:16=5"


def parse_mix(text: str) -> list[tuple[float, float]]:
    """ "W:H=P,..." -> [(ratio W/H, share P/100)], the shares summing to 1."""
    mix = []
    for part in text.split(","):
        try:
            ratio, share = part.split("=")
            w, h = ratio.split(":")
            mix.append((float(w) / float(h), float(share)))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--mix {text!r}: give W:H=PERCENT pairs, e.g. {WEB_MIX}"
            ) from None
    total = sum(share for _, share in mix)
    if total <= 0 or any(share < 0 or ratio <= 0 for ratio, share in mix):
        raise argparse.ArgumentTypeError(f"--mix {text!r}: positive ratios and shares, please")
    return [(ratio, share / total) for ratio, share in mix]


def mix_sizes(mix: list[tuple[float, float]], count: int, side: int) -> list[tuple[int, int]]:
    """`count` (width, height) of about side² pixels each, in the mix's proportions (the
    largest remainders), interleaved."""
    quotas = [share * count for _, share in mix]
    counts = [int(q) for q in quotas]
    for i in sorted(range(len(mix)), key=lambda i: quotas[i] - counts[i], reverse=True):
        if sum(counts) == count:
            break
        counts[i] += 1
    sizes = [
        (round(side * math.sqrt(ratio)), round(side / math.sqrt(ratio)))
        for (ratio, _), n in zip(mix, counts)
        for _ in range(n)
    ]
    return sizes[::2] + sizes[1::2]


def write_jpeg_shards(
    root: Path, shards: int, per_shard: int, side: int, sizes: list[tuple[int, int]] | None = None
) -> list[bytes]:
    """Webdataset shards of photo-like JPEGs (quality 90) with captions, of `sizes` (in
    turn) or side × side; the JPEGs."""
    import numpy as np

    rng = np.random.default_rng(0)
    jpegs = []
    for s in range(shards):
        with tarfile.open(root / f"shard-{s:05d}.tar", "w") as tar:
            for i in range(s * per_shard, (s + 1) * per_shard):
                buf = io.BytesIO()
                width, height = sizes[i % len(sizes)] if sizes else (side, side)
                photo_like(rng, width, height).save(buf, format="JPEG", quality=90)
                jpegs.append(buf.getvalue())
                for name, data in ((f"{i:08d}.jpg", jpegs[-1]), (f"{i:08d}.txt", b"a photo")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return jpegs


def decode_ms(jpegs: list[bytes], draft: Any, buckets: Any) -> float:
    """Mean ms to turn one JPEG into a uint8 tensor of its bucket on this thread (draft:
    the buckets PIL's draft decodes for, or None: decoded at full size)."""
    from flux.data.transforms import image_to_tensor, load_image

    start = time.perf_counter()
    for data in jpegs:
        image_to_tensor(load_image(data, draft), buckets)
    return 1e3 * (time.perf_counter() - start) / len(jpegs)


def bench_data(args: argparse.Namespace) -> dict[str, Any]:
    """The loader's samples/s at each image size, kind of buckets and worker count; one
    image's decode; the share of the generated images' pixels each kind keeps."""
    from flux.data.buckets import Buckets
    from flux.data.dataloader import CaptionedImageLoader

    mix = args.mix
    with tempfile.TemporaryDirectory() as tmp:
        path, jpegs, sizes = args.path, [], []
        if args.source == "webdataset" and path is None:
            path = Path(tmp)
            sizes = mix_sizes(mix, args.images, args.source_size)
            jpegs = write_jpeg_shards(path, 8, args.images // 8, args.source_size, sizes)
        runs, decode, kept = [], {}, {}
        for img_size in args.img_size:
            for kind in args.buckets:
                buckets = (
                    Buckets.square(img_size)
                    if kind == "square"
                    else Buckets.aspect(img_size, max_upscale=args.max_upscale)
                )
                name = f"{img_size} {kind}"
                if sizes:
                    kept[name] = sum(buckets.kept(w, h) for w, h in sizes) / len(sizes)
                if jpegs:
                    decode[name] = {
                        "draft_ms": decode_ms(jpegs[:16], buckets, buckets),
                        "full_decode_ms": decode_ms(jpegs[:16], None, buckets),
                    }
                for workers in args.workers:
                    loader = CaptionedImageLoader(
                        args.source, img_size, args.batch, path=path, num_workers=workers,
                        buckets=buckets,
                    )  # fmt: skip
                    it = iter(loader)
                    for _ in range(2):  # start the workers, fill their queues
                        next(it)
                    start, taken = time.perf_counter(), loader.dataset.consumed
                    for _ in range(args.batches):
                        next(it)
                    # samples read, whether handed on or waiting in a partly filled bucket
                    # (in a long run, as many are handed on)
                    taken = loader.dataset.consumed - taken
                    rate = taken / (time.perf_counter() - start)
                    runs.append(
                        {
                            "img_size": img_size,
                            "buckets": kind,
                            "workers": workers,
                            "samples_per_s": rate,
                            "samples_per_s_per_worker": rate / max(1, workers),
                            "skipped": loader.dataset.skips.total,
                        }
                    )
                    del it, loader  # its workers end
    return {
        "source": args.source,
        "source_size": args.source_size if jpegs else None,
        "mix": {f"{r:.3f}": share for r, share in mix} if sizes else None,
        "jpeg_kib": sum(len(j) for j in jpegs) / max(1, len(jpegs)) / 1024,
        "cpus": len(os.sched_getaffinity(0)),
        "batch": args.batch,
        "decode": decode,
        "pixels_kept": kept,
        "runs": runs,
    }


class SavedActivations(TorchDispatchMode):
    """What a forward leaves for backward: the storages ops allocate while this mode is
    active that are still alive when counted (the tensors autograd saved, and the outputs
    selective checkpointing keeps). Views and in-place results are their inputs' storage."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if _dense(t)}
        for t in tree_leaves(out):
            if _dense(t) and t.untyped_storage().data_ptr() not in inputs:
                self.storages.append(weakref.ref(t.untyped_storage()))
        return out

    def live_bytes(self) -> int:
        live = {}
        for ref in self.storages:
            storage = ref()
            if storage is not None:
                live[storage.data_ptr()] = storage.nbytes()
        return sum(live.values())


def _dense(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.layout == torch.strided and t.device.type != "meta"


AC_MODES = {"none": ("none", ""), "op": ("selective", "op"), "full": ("full", "")}


def bench_ac(args: argparse.Namespace) -> dict[str, Any]:
    """Saved activations and forward+backward time of FluxModel under each activation
    checkpointing mode, and whether each gives no-AC's loss and gradients exactly."""
    import copy

    from flux.parallel.parallelize import apply_activation_checkpointing

    model_args = sized_model_args(flux_configs["flux-debug"], args)
    torch.manual_seed(0)
    reference = FluxModel(model_args)
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.02)
    inputs = _random_inputs(model_args, args.batch, args.img_tokens, args.txt_tokens)
    results: dict[str, Any] = {}
    grads: dict[str, list[torch.Tensor]] = {}
    for name, (mode, option) in AC_MODES.items():
        model = copy.deepcopy(reference)
        if mode != "none":
            apply_activation_checkpointing(model, mode, option)
        times = []
        for round_ in range(args.warmup + args.rounds):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            with SavedActivations() as saved:
                loss = model(**inputs).float().square().mean()
            activations = saved.live_bytes()
            loss.backward()
            if round_ >= args.warmup:
                times.append(time.perf_counter() - start)
        grads[name] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        exact = name == "none" or all(
            torch.equal(a, b) for a, b in zip(grads[name], grads["none"], strict=True)
        )
        results[name] = {
            "activations_mib": activations / 2**20,
            "fwd_bwd_ms": 1e3 * statistics.median(times),
            "loss": loss.item(),
            "same_gradients_as_none": exact,
        }
    return {"threads": torch.get_num_threads(), "batch": args.batch, "modes": results}


def _random_inputs(
    args: Any, batch: int, img_tokens: int, txt_tokens: int, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    side = int(img_tokens**0.5)  # a square image of img_tokens patches
    if side * side != img_tokens:
        raise ValueError(f"--img-tokens {img_tokens} is not a square number (e.g. 256, 1024)")
    g = torch.Generator().manual_seed(1)
    inputs = {
        "img": torch.randn(batch, img_tokens, args.in_channels, generator=g),
        "img_ids": image_ids(batch, 2 * side, 2 * side),
        "txt": torch.randn(batch, txt_tokens, args.context_in_dim, generator=g),
        "txt_ids": torch.zeros(batch, txt_tokens, 3),
        "timesteps": torch.rand(batch, generator=g),
        "y": torch.randn(batch, args.vec_in_dim, generator=g),
    }
    if args.guidance_embed:
        inputs["guidance"] = torch.full((batch,), 3.5)
    return {k: v.to(device) for k, v in inputs.items()}


def data_table(result: dict[str, Any]) -> str:
    lines = [f"{result['source']} on {result['cpus']} CPUs, batch {result['batch']}"]
    if result["source_size"]:
        side = result["source_size"]
        lines[0] += f": JPEGs of about {side}² px ({result['jpeg_kib']:.0f} KiB each)"
        mix = ", ".join(f"{float(r):.2f}:1 {share:.0%}" for r, share in result["mix"].items())
        lines.append(f"aspect ratios (width:height): {mix}")
    for name, ms in result["decode"].items():
        lines.append(
            f"one JPEG to {name} on one thread: {ms['draft_ms']:.1f} ms "
            f"({ms['full_decode_ms']:.1f} ms decoding it at full size)"
        )
    for name, share in result["pixels_kept"].items():
        lines.append(f"pixels kept, {name}: {share:.1%}")
    lines.append(
        f"{'img_size':>8} {'buckets':>8} {'workers':>8} {'samples/s':>10} {'per worker':>11} "
        f"{'skipped':>8}"
    )
    for run in result["runs"]:
        lines.append(
            f"{run['img_size']:>8} {run['buckets']:>8} {run['workers']:>8} "
            f"{run['samples_per_s']:>10.1f} {run['samples_per_s_per_worker']:>11.1f} "
            f"{run['skipped']:>8}"
        )
    return "\n".join(lines)


def drop_from_page_cache(folder: Path) -> None:
    """Ask the kernel to forget the folder's (written, synced) files, so the next read
    comes from the disk."""
    import os

    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def bench_checksum(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds to save, seal (hash + write the checksums) and verify a checkpoint folder."""
    from flux.checkpoint import checkpoint_problem, seal
    from flux.weights import save_dcp

    with tempfile.TemporaryDirectory() as tmp:
        times: dict[str, float] = {}
        folder = args.path
        if folder is None:
            folder = Path(tmp) / "step-1"
            n = int(args.gib * 2**30 / 4 / 2**20)  # tensors of 1 Mi float32 values
            state = {f"layer{i}.weight": torch.randn(2**20) for i in range(n)}
            start = time.perf_counter()
            save_dcp(state, folder)  # DCP's save, then the checksums
            times["save_and_seal_s"] = time.perf_counter() - start
        start = time.perf_counter()
        seal(folder, rank=0)
        times["seal_s"] = time.perf_counter() - start
        for key in ("verify_cached_s", "verify_from_disk_s"):
            if key == "verify_from_disk_s":
                drop_from_page_cache(folder)
            start = time.perf_counter()
            problem = checkpoint_problem(folder)
            times[key] = time.perf_counter() - start
            if problem is not None:
                raise ValueError(f"{folder} {problem}")
        size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    rates = {f"{k[:-2]}_gb_per_s": size / 1e9 / v for k, v in times.items()}
    return {"path": str(args.path or f"temporary, {args.gib} GiB"), "bytes": size, **times, **rates}


A100_PEAK_FLOPS = 312e12  # bf16 dense; get_peak_flops' answer for a GPU it does not know
PARTS = {
    "data": "data",
    "text": "text encoding",
    "latents": "latent encoding",
    "fwd_bwd": "fwd+bwd",
    "optimizer": "optimizer",
}


class Laps:
    """Wall time of consecutive parts of a step, the device synchronized at each lap (the
    trainer calls lap at the end of each part: FluxTrainer.lap)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: dict[str, list[float]] = {name: [] for name in PARTS}

    def start(self) -> None:
        self._sync()
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        self._sync()
        now = time.perf_counter()
        self.times[name].append(now - self.last)
        self.last = now

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def peak_rss_mib() -> float:
    """This program's peak resident memory. Linux's VmHWM starts afresh at exec; ru_maxrss
    may include the memory of the process that started this one (it does on Linux)."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
        kib = next(int(line.split()[1]) for line in lines if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux and BSDs
    return kib / 2**10


def bench_step(args: argparse.Namespace, trainer_args: list[str]) -> dict[str, Any]:
    """Time the parts of the trainer's own training steps of a config, with or without a
    cache: FluxTrainer on one process, its model sharded by FSDP over that process as every
    rank of a data-parallel run shards it, compiled and checkpointed as configured, with
    the configured optimizer; nothing logged, validated or saved."""
    from torchtitan.tools.utils import get_peak_flops

    from flux.config import check_config, parse_config
    from flux.flow import PRECOMPUTED
    from flux.train import one_process

    job = parse_config(trainer_args)
    if args.cache is not None:
        job.training.dataset, job.training.dataset_path = PRECOMPUTED, str(args.cache)
    job.validation.enable = False  # the training step only: no validation encoders
    job.checkpoint.enable = False
    job.metrics.enable_tensorboard = job.metrics.enable_wandb = False
    job.metrics.log_freq = args.warmup + args.steps + 1  # only step 1 logs, in the warmup
    check_config(job, world_size=1)
    training = job.training
    with one_process(job) as trainer:
        device = trainer.device
        laps = Laps(device)
        trainer.lap = laps.lap
        data = trainer.batch_generator(trainer.dataloader)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for step in range(1, args.warmup + args.steps + 1):
            if step == args.warmup + 1:
                laps.times = {name: [] for name in PARTS}  # warmup done: time what follows
            trainer.step += 1  # as torchtitan's loop counts and collects garbage
            trainer.gc_handler.run(trainer.step)
            laps.start()
            trainer.train_step(data)
        trainer.settle()
        model_args, preprocess = trainer.model_args, trainer.preprocess
        parts = (preprocess.t5, preprocess.clip, preprocess.autoencoder)
        frozen = [m for m in parts if m is not None]
        frozen_bytes = sum(
            p.numel() * p.element_size() for m in frozen for p in m.parameters() if not p.is_meta
        )
        if device.type == "cuda":
            peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
            memory = "max allocated CUDA memory"
        else:
            peak_mib = peak_rss_mib()
            memory = "peak RSS"

    ms = {name: 1e3 * sum(t) / args.steps for name, t in laps.times.items()}
    ms["step"] = sum(ms.values())
    batch_size = training.local_batch_size * trainer.gradient_accumulation_steps
    images_per_s = batch_size / (ms["step"] / 1e3)
    img_tokens = (training.img_size // 16) ** 2
    txt_tokens = job.encoder.max_t5_encoding_len
    mfu = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = get_peak_flops(name)
        if peak != A100_PEAK_FLOPS or "A100" in name:  # torchtitan assumes an A100 if unknown
            flops = training_flops_per_sample(model_args, img_tokens, txt_tokens)
            mfu = 100 * flops * images_per_s / peak
    return {
        "flavor": job.model.flavor,
        "dataset": training.dataset,
        "cache": str(args.cache) if args.cache is not None else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "batch": batch_size,
        "img_size": training.img_size,
        "compile": job.compile.enable,
        "activation_checkpoint": job.activation_checkpoint.mode,
        "steps": args.steps,
        "warmup": args.warmup,
        "ms": ms,
        "images_per_s": images_per_s,
        "tokens_per_s": images_per_s * (img_tokens + txt_tokens),
        "mfu_percent": mfu,
        "peak_memory_mib": peak_mib,
        "memory": memory,
        "frozen_weights_mib": frozen_bytes / 2**20,
    }


def compare_steps(argv: list[str], args: argparse.Namespace, trainer_args: list[str]) -> list:
    """Precompute a cache of the config's data, then time steps without and with it, each
    in a process of its own."""
    from flux.config import parse_config
    from flux.scripts import precompute

    job = parse_config(trainer_args)
    samples = (args.warmup + args.steps) * job.training.local_batch_size
    command = [sys.executable, "-m", "flux.scripts.benchmark"]
    command += [a for a in argv if a != "--compare"] + ["--json"]
    with tempfile.TemporaryDirectory() as tmp:
        cache = str(Path(tmp) / "cache")
        precompute.main(["--output", cache, "--num_samples", str(samples), *trainer_args])
        results = []
        for extra in ([], ["--cache", cache]):
            done = subprocess.run(command + extra, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(command + extra)} failed:\n{done.stderr[-3000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def step_table(results: list[dict[str, Any]]) -> str:
    """The results side by side, one column per run."""
    first = results[0]
    lines = [
        f"the trainer's step of {first['flavor']}: batch {first['batch']} at {first['img_size']}px "
        f"on {first['device']} ({first['threads']} threads), FSDP over one process, compile "
        f"{'on' if first['compile'] else 'off'}, activation checkpointing "
        f"{first['activation_checkpoint']}; mean of {first['steps']} steps after "
        f"{first['warmup']} warmup"
    ]
    names = ["precomputed" if r["cache"] else r["dataset"] for r in results]
    rows: list[tuple[str, list[str]]] = [("", names)]
    for key, label in PARTS.items():
        rows.append((f"{label} (ms)", [f"{r['ms'][key]:.1f}" for r in results]))
    rows.append(("step (ms)", [f"{r['ms']['step']:.1f}" for r in results]))
    rows.append(("images/s", [f"{r['images_per_s']:.1f}" for r in results]))
    rows.append(("tokens/s", [f"{r['tokens_per_s']:.0f}" for r in results]))
    rows.append(
        ("MFU (%)", [f"{r['mfu_percent']:.1f}" if r["mfu_percent"] else "-" for r in results])
    )
    memory = f"{first['memory']} (MiB)"
    rows.append((memory, [f"{r['peak_memory_mib']:.0f}" for r in results]))
    rows.append(("frozen encoders (MiB)", [f"{r['frozen_weights_mib']:.1f}" for r in results]))
    width = max(len(label) for label, _ in rows)
    for label, values in rows:
        lines.append(label.ljust(width) + "".join(v.rjust(13) for v in values))
    return "\n".join(lines)


def bench_ema(args: argparse.Namespace) -> dict[str, Any]:
    """Milliseconds per update of the average and per swap in and out, median of
    args.updates, without and with cpu_offload, for a flavor or the given dimensions."""
    from flux.ema import EmaSettings, WeightAverage

    model_args = flux_configs[args.flavor]
    if args.hidden:
        model_args = sized_model_args(model_args, args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with torch.device("meta"):
        model = FluxModel(model_args)
    model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)  # any values: the update's cost does not depend on them
    params = sum(p.numel() for p in model.parameters())

    def timed(action: Callable[[], Any]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        action()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3

    def measure(offload: bool) -> dict[str, float]:
        average = WeightAverage(model, EmaSettings(decay=0.9999, cpu_offload=offload))
        average.update(1)  # the first update copies; the timed ones average

        def swap() -> None:
            with average.swapped_in():
                pass

        updates = [timed(lambda: average.update(2)) for _ in range(args.updates)]
        swaps = [timed(swap) for _ in range(max(1, args.updates // 2))]
        return {
            "update_ms": statistics.median(updates),
            "swap_in_and_out_ms": statistics.median(swaps),
        }

    def copy() -> None:
        torch._foreach_copy_(copies, weights)

    # The time to copy the weights once: what memory bandwidth allows, for scale.
    weights = [p.detach() for p in model.parameters()]
    copies = [torch.empty_like(w) for w in weights]
    copy_ms = statistics.median(timed(copy) for _ in range(args.updates))
    copies.clear()
    result: dict[str, Any] = {"device": str(device), "threads": torch.get_num_threads()}
    result |= {"parameters": params, "average_mib": params * 4 / 2**20, "copy_ms": copy_ms}
    result["beside_weights"] = measure(offload=False)
    result["cpu_offload"] = measure(offload=True)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = Parser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    model = sub.add_parser("model", help="FluxModel vs diffusers, forward+backward")
    model.add_argument("--hidden", type=positive_int, default=1536)
    model.add_argument("--heads", type=positive_int, default=12)
    model.add_argument("--double", type=positive_int, default=2)
    model.add_argument("--single", type=positive_int, default=4)
    model.add_argument("--img-tokens", type=positive_int, default=256)
    model.add_argument("--txt-tokens", type=positive_int, default=256)
    model.add_argument("--batch", type=positive_int, default=1)
    model.add_argument("--rounds", type=positive_int, default=10)
    model.add_argument("--warmup", type=nonnegative_int, default=2)
    model.add_argument("--json", action="store_true", help="print one JSON object")
    ac = sub.add_parser("ac", help="activation checkpointing: saved activations, time")
    ac.add_argument("--hidden", type=positive_int, default=512)
    ac.add_argument("--heads", type=positive_int, default=4)
    ac.add_argument("--double", type=positive_int, default=2)
    ac.add_argument("--single", type=positive_int, default=4)
    ac.add_argument("--img-tokens", type=positive_int, default=256)
    ac.add_argument("--txt-tokens", type=positive_int, default=64)
    ac.add_argument("--batch", type=positive_int, default=2)
    ac.add_argument("--rounds", type=positive_int, default=3)
    ac.add_argument("--warmup", type=nonnegative_int, default=1)
    ac.add_argument("--json", action="store_true", help="print one JSON object")
    data = sub.add_parser("data", help="data loader throughput")
    data.add_argument(
        "--source", default="webdataset", choices=["webdataset", "shapes", "imagefolder"]
    )
    data.add_argument("--path", type=Path, default=None, help="default: generated shards")
    data.add_argument(
        "--source-size", type=positive_int, default=1024, help="generated: about this² pixels"
    )
    data.add_argument(
        "--mix", type=parse_mix, default=parse_mix(WEB_MIX),
        help=f"generated images' aspect ratios, W:H=PERCENT,... (default: {WEB_MIX})",
    )  # fmt: skip
    data.add_argument(
        "--buckets", nargs="+", choices=["square", "aspect"], default=["square", "aspect"]
    )
    data.add_argument("--max-upscale", type=positive_float, default=1.0, help="aspect buckets")
    data.add_argument("--images", type=positive_int, default=128, help="generated JPEGs")
    data.add_argument("--img-size", type=positive_int, nargs="+", default=[256, 512])
    data.add_argument("--workers", type=nonnegative_int, nargs="+", default=[0, 1, 2])
    data.add_argument("--batch", type=positive_int, default=16)
    data.add_argument("--batches", type=positive_int, default=12)
    data.add_argument("--json", action="store_true", help="print one JSON object")
    checksum = sub.add_parser("checksum", help="the cost of a checkpoint's checksums")
    checksum.add_argument("--gib", type=positive_float, default=1.0, help="temporary size")
    checksum.add_argument("--path", type=Path, default=None, help="a checkpoint folder")
    checksum.add_argument("--json", action="store_true", help="print one JSON object")
    step = sub.add_parser(
        "step",
        help="where a training step's time goes (other arguments: the trainer's)",
        description="Other arguments are the trainer's: --job.config_file, --training.*, ...",
    )
    step.add_argument("--steps", type=positive_int, default=10, help="timed steps")
    step.add_argument("--warmup", type=nonnegative_int, default=3, help="untimed steps first")
    step.add_argument("--cache", type=Path, default=None, help="a precomputed cache to train on")
    step.add_argument(
        "--compare", action="store_true", help="precompute a temporary cache; run both"
    )
    step.add_argument("--json", action="store_true", help="print JSON")
    ema = sub.add_parser("ema", help="cost of the average of the weights (EMA) per update")
    ema.add_argument("--flavor", default="flux-debug", choices=sorted(flux_configs))
    ema.add_argument(
        "--hidden", type=nonnegative_int, default=0, help="other dimensions than the flavor's"
    )
    ema.add_argument("--heads", type=positive_int, default=8)
    ema.add_argument("--double", type=positive_int, default=4)
    ema.add_argument("--single", type=positive_int, default=8)
    ema.add_argument("--updates", type=positive_int, default=10, help="timed updates")
    ema.add_argument("--json", action="store_true", help="print one JSON object")
    argv = sys.argv[1:] if argv is None else argv
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "step":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    for name in ("path", "cache"):
        folder = getattr(args, name, None)
        if folder is not None and not folder.is_dir():
            parser.error(f"--{name} {folder} is not a folder")
    try:
        run(parser, args, argv, rest)
    except (ValueError, OSError) as e:  # ConfigError, CacheError, WeightsError: one line
        fail("benchmark", e)


def run(parser: Parser, args: argparse.Namespace, argv: list[str], rest: list[str]) -> None:
    """Run the benchmark the command names and print its result."""
    if args.command == "step":
        from flux.config import DEBUG_CONFIG, config_file_arg

        if config_file_arg(rest) is None:
            rest = ["--job.config_file", str(DEBUG_CONFIG), *rest]
        if args.compare and args.cache is not None:
            parser.error("--compare makes its own cache: leave out --cache")
        if args.compare:
            results = compare_steps(argv, args, rest)
        else:
            results = [bench_step(args, rest)]
        print(
            json.dumps(results if args.compare else results[0])
            if args.json
            else step_table(results)
        )
        return
    if args.command == "ac":
        result = bench_ac(args)
        if args.json:
            print(json.dumps(result))
            return
        print(f"FluxModel forward+backward, batch {result['batch']}, {result['threads']} threads")
        print(f"{'mode':6}{'saved activations (MiB)':>26}{'fwd+bwd (ms)':>15}  gradients")
        for name, r in result["modes"].items():
            same = "exactly no-AC's" if r["same_gradients_as_none"] else "DIFFER"
            print(f"{name:6}{r['activations_mib']:26.1f}{r['fwd_bwd_ms']:15.1f}  {same}")
        return
    if args.command == "ema":
        result = bench_ema(args)
        if args.json:
            print(json.dumps(result))
            return
        print(
            f"{result['parameters'] / 1e6:.1f}M parameters ({result['average_mib']:.0f} MiB "
            f"average) on {result['device']}, {result['threads']} threads; copying the "
            f"weights once takes {result['copy_ms']:.2f} ms"
        )
        for key in ("beside_weights", "cpu_offload"):
            r = result[key]
            print(
                f"{key:15} update {r['update_ms']:9.2f} ms   "
                f"swap in and out {r['swap_in_and_out_ms']:9.2f} ms"
            )
        return
    if args.command == "checksum":
        result = bench_checksum(args)
        print(
            json.dumps(result)
            if args.json
            else "\n".join(
                f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}" for k, v in result.items()
            )
        )
        return
    if args.command == "data":
        result = bench_data(args)
        print(json.dumps(result) if args.json else data_table(result))
        return
    result = bench_model(args)
    if args.json:
        print(json.dumps(result))
        return
    print(f"device {result['device']}, {result['threads']} threads")
    print(f"flux      fwd+bwd  {result['flux_fwd_bwd_s'] * 1e3:8.1f} ms (median)")
    print(f"diffusers fwd+bwd  {result['diffusers_fwd_bwd_s'] * 1e3:8.1f} ms (median)")
    print(f"ratio flux/diffusers {result['ratio_flux_over_diffusers']:.3f}")


if __name__ == "__main__":
    main()
