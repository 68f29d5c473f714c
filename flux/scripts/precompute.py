"""Run the frozen encoders over a dataset once: T5 and CLIP of every caption and the
autoencoder's latent moments of every image, saved as a cache the `precomputed` source reads.

    python -m flux.scripts.precompute --output cache/shapes --num_samples 4096
    torchrun --nproc_per_node 8 -m flux.scripts.precompute --output cache/images \
        --job.config_file flux/train_configs/flux_schnell_model.toml \
        --training.dataset imagefolder --training.dataset_path images/
    ./run_train.sh --training.dataset precomputed --training.dataset_path cache/shapes

Every other argument is the trainer's (default config: flux/train_configs/debug_model.toml):
the cache is made with the job's [encoder] settings from [training]'s dataset and img_size
(or [validation]'s, with --split validation), and training refuses a cache made with other
settings. The encodings of "" (caption dropout) and of validation.sample_prompts are stored
too. See flux/data/precomputed.py for the layout.

Processes share nothing: process r of W (RANK and WORLD_SIZE, as torchrun sets them, or
--rank/--world_size) writes its own shards, each whole under a temporary name and then
renamed. Run the same command again after an interruption: existing shards are kept, the
rest written, and whichever process finishes last writes manifest.json. Indexed sources
(shapes, imagefolder): shard s holds samples [s·S, (s+1)·S) of the source's own order and
belongs to process s mod W, so a restart may use another number of processes. Streamed
sources (webdataset, cc12m-wds): process r reads its share of the stream once, and resumes
from the stream position saved in its last shard; a restart needs the same number.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torchtitan.config import JobConfig

from flux.config import (
    DEBUG_CONFIG,
    ConfigError,
    cache_settings,
    check_config,
    config_file_arg,
    parse_config,
)
from flux.data.dataset import CaptionedImages, Sample, split_seed
from flux.data.imagefolder import BadSample
from flux.data.precomputed import (
    FORMAT,
    MANIFEST,
    PLAN,
    TENSORS,
    TEXTS,
    CacheError,
    shard_metadata,
    shard_size,
    write_json,
    write_shard,
)
from flux.flow import PRECOMPUTED, build_autoencoder, build_text_encoders
from flux.model.args import flux_configs
from flux.train_spec import encoder_settings

STREAMED = ("webdataset", "cc12m-wds")


class Encoders:
    """T5, CLIP and the autoencoder's encoder, as the trainer builds them."""

    def __init__(self, job: JobConfig, device: torch.device):
        self.device = device
        settings = encoder_settings(job)
        self.t5, self.clip = build_text_encoders(settings, device)
        self.autoencoder = build_autoencoder(
            settings, flux_configs[job.model.flavor].autoencoder_params, device
        )
        self.autoencoder.decoder.to("meta")  # only the encoder runs: free the rest
        self.dtype = next(self.autoencoder.encoder.parameters()).dtype

    @torch.no_grad()
    def texts(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return {"t5": self.t5(texts).cpu(), "clip": self.clip(texts).cpu()}

    @torch.no_grad()
    def samples(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        """t5 (B, L, D_t5), clip (B, D_clip), moments (B, 2C, h, w) on the CPU."""
        images = torch.stack([s.image for s in samples]).to(self.device, self.dtype)
        moments = self.autoencoder.encoder(images).cpu()
        return {**self.texts([s.caption for s in samples]), "moments": moments}


class ShardWriter:
    """The samples of one shard, encoded a batch at a time, then written in one file."""

    def __init__(self, encoders: Encoders, batch_size: int):
        self.encoders, self.batch_size = encoders, batch_size
        self.pending: list[Sample] = []
        self.parts: list[dict[str, torch.Tensor]] = []
        self.keys: list[str] = []
        self.captions: list[str] = []
        self.skipped: list[str] = []  # "key: reason"

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, sample: Sample) -> None:
        self.pending.append(sample)
        self.keys.append(sample.key)
        self.captions.append(sample.caption)
        if len(self.pending) == self.batch_size:
            self._encode()

    def _encode(self) -> None:
        if self.pending:
            self.parts.append(self.encoders.samples(self.pending))
            self.pending = []

    def write(self, path: Path, **metadata: Any) -> None:
        self._encode()
        tensors = {
            n: torch.cat([p[n] for p in self.parts]) if self.parts else torch.empty(0)
            for n in TENSORS
        }
        meta = {
            "keys": self.keys,
            "captions": self.captions,
            "skipped": self.skipped,  # "key: reason" (streams: the latest few)
            "skipped_count": len(self.skipped),
        }
        write_shard(path, tensors, {**meta, **metadata})


class IndexedShards(Dataset):
    """(shard, sample or "key: why it was skipped") for the samples of the given shards."""

    def __init__(self, source: CaptionedImages, shards: list[int], size: int, total: int):
        self.source = source
        self.entries = [(s, i) for s in shards for i in range(s * size, min(total, (s + 1) * size))]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, position: int) -> tuple[int, Sample | str]:
        shard, index = self.entries[position]
        try:
            sample = self.source.sample(index)
        except (BadSample, ValueError) as e:
            return shard, f"{self.source.key(index)}: {e}"
        assert isinstance(sample, Sample)
        return shard, sample


def shard_path(root: Path, shard: int, rank: int | None = None) -> Path:
    """Indexed sources: shard-000012; streamed: shard-r0003-000012 (process 3's 13th)."""
    middle = "" if rank is None else f"r{rank:04d}-"
    return root / f"shard-{middle}{shard:06d}.safetensors"


def done_path(root: Path, rank: int) -> Path:
    return root / f"done-r{rank:04d}.json"


def make_plan(job: JobConfig, args: argparse.Namespace) -> tuple[dict[str, Any], CaptionedImages]:
    """What this cache is (recorded in plan.json and the manifest), and this process's
    reader of the source."""
    section = job.training if args.split == "training" else job.validation
    dataset, path = section.dataset, section.dataset_path or None
    if dataset == PRECOMPUTED:
        raise ConfigError(
            f"{args.split}.dataset is 'precomputed': give the source to precompute "
            f"(--{args.split}.dataset shapes|imagefolder|webdataset|cc12m-wds)"
        )
    seed = split_seed(args.split, dataset, job.training.seed_data)
    streamed = dataset in STREAMED
    reader = CaptionedImages(
        dataset,
        section.img_size,
        rank=args.rank if streamed else 0,
        world_size=args.world_size if streamed else 1,
        seed=seed,
        path=path,
    )
    size = reader.size()
    total = args.num_samples if size is None else min(size, args.num_samples or size)
    if dataset == "shapes" and total is None:
        raise ConfigError("dataset 'shapes' is unbounded: give --num_samples")
    plan = {
        "format": FORMAT,
        "settings": dataclasses.asdict(cache_settings(job, section.img_size)),
        "source": {"dataset": dataset, "dataset_path": path, "seed": seed, "split": args.split},
        "num_samples": total,
        "shard_size": args.shard_size,
        "stream_processes": args.world_size if streamed else None,
        "texts": ["", *job.validation.sample_prompts],
    }
    return plan, reader


def start(root: Path, plan: dict[str, Any]) -> None:
    """Record the plan, or check that a started cache was started with the same one."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / PLAN
    if not path.exists():
        write_json(path, plan)
        return
    started = json.loads(path.read_text())
    differ = [k for k in plan if started.get(k) != plan[k]]
    if differ:
        raise CacheError(
            f"{root} holds a cache started with other {', '.join(differ)}: give another "
            "--output, or the arguments it was started with"
        )


def write_indexed(
    root: Path,
    plan: dict[str, Any],
    reader: CaptionedImages,
    args: argparse.Namespace,
    encoders: Callable[[], Encoders],
) -> int:
    """This process's shards of an indexed source that are not written yet; returns how many."""
    size, total = plan["shard_size"], plan["num_samples"]
    count = -(-total // size)
    todo = [s for s in range(args.rank, count, args.world_size) if not shard_path(root, s).exists()]
    if not todo:
        return 0
    loader = DataLoader(
        IndexedShards(reader, todo, size, total),
        batch_size=args.batch_size,
        collate_fn=list,
        num_workers=args.workers,
    )
    items = iter(loader)  # workers start before the encoders are built: they hold none
    writer, current = ShardWriter(encoders(), args.batch_size), todo[0]
    for shard, item in itertools.chain.from_iterable(items):
        if shard != current:
            writer.write(shard_path(root, current))
            writer, current = ShardWriter(encoders(), args.batch_size), shard
        if isinstance(item, str):
            writer.skipped.append(item)
        else:
            writer.add(item)
    writer.write(shard_path(root, current))
    return len(todo)


def write_streamed(
    root: Path,
    plan: dict[str, Any],
    reader: CaptionedImages,
    args: argparse.Namespace,
    encoders: Callable[[], Encoders],
) -> int:
    """This process's share of a stream, from where its last shard ended; returns how many
    shards it wrote."""
    if done_path(root, args.rank).exists():
        return 0
    assert reader.stream is not None
    written = sorted(root.glob(f"shard-r{args.rank:04d}-*.safetensors"))
    consumed = 0
    if written:
        last = shard_metadata(written[-1])
        reader.stream.load_state_dict(last["stream"])
        consumed = last["consumed"]
    total = plan["num_samples"]
    samples = reader.one_pass()
    if total is not None:
        share = total // args.world_size + int(args.rank < total % args.world_size)
        samples = itertools.islice(samples, max(0, share - consumed))
    shard, writer = len(written), ShardWriter(encoders(), args.batch_size)
    skips = 0

    def flush() -> None:
        nonlocal skips
        assert reader.stream is not None
        new = sum(reader.skipped.values()) - skips
        skips += new
        writer.skipped = list(reader.skip_examples)[-new:] if new else []
        writer.write(
            shard_path(root, shard, args.rank),
            skipped_count=new,
            stream=reader.stream.state_dict(),  # just after the shard's last sample
            consumed=consumed,
        )

    for sample in samples:
        assert isinstance(sample, Sample)
        writer.add(sample)
        consumed += 1
        if len(writer) == plan["shard_size"]:
            flush()
            shard, writer = shard + 1, ShardWriter(encoders(), args.batch_size)
    if len(writer) or sum(reader.skipped.values()) > skips:
        flush()
        shard += 1
    write_json(done_path(root, args.rank), {"shards": shard, "samples": consumed})
    return shard - len(written)


def finish(root: Path, plan: dict[str, Any]) -> bool:
    """Write the manifest if every shard is written (by any process); whether it exists."""
    if (root / MANIFEST).exists():
        return True
    processes = plan["stream_processes"]
    if processes is None:
        count = -(-plan["num_samples"] // plan["shard_size"])
        files = [shard_path(root, s) for s in range(count)]
        if not all(f.exists() for f in files):
            return False
    else:
        done = [done_path(root, r) for r in range(processes)]
        if not all(d.exists() for d in done):
            return False
        files = [
            shard_path(root, s, r)
            for r, d in enumerate(done)
            for s in range(json.loads(d.read_text())["shards"])
        ]
    sizes = [shard_size(f) for f in files]
    shards = [{"file": f.name, "samples": n} for f, n in zip(files, sizes)]
    skipped = sum(shard_metadata(f)["skipped_count"] for f in files)
    samples = sum(sizes)
    write_json(root / MANIFEST, {**plan, "samples": samples, "skipped": skipped, "shards": shards})
    return True


def device() -> torch.device:
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def precompute(job: JobConfig, args: argparse.Namespace) -> bool:
    """This process's part of the cache; whether the cache is finished."""
    plan, reader = make_plan(job, args)
    root = args.output
    start(root, plan)
    if (root / MANIFEST).exists():
        print(f"{root}: finished already")
        return True
    encoders = functools.cache(lambda: Encoders(job, device()))  # built if there is work
    write = write_streamed if plan["stream_processes"] else write_indexed
    written = write(root, plan, reader, args, encoders)
    if not (root / TEXTS).exists():
        texts = plan["texts"]
        meta = {"texts": texts}
        write_shard(root / TEXTS, encoders().texts(texts), meta, tmp_suffix=str(os.getpid()))
    finished = finish(root, plan)
    state = "the cache is finished" if finished else "other processes' shards are still missing"
    print(f"{root}: process {args.rank} of {args.world_size} wrote {written} shards; {state}")
    return finished


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", type=Path, required=True, help="the cache folder")
    p.add_argument(
        "--num_samples", type=int, help="samples to encode (required for shapes; else a cap)"
    )
    p.add_argument("--split", choices=["training", "validation"], default="training")
    p.add_argument("--shard_size", type=int, default=256, help="samples per shard file")
    p.add_argument("--batch_size", type=int, default=32, help="samples per encoder call")
    p.add_argument("--workers", type=int, default=2, help="image-loading processes (indexed)")
    p.add_argument("--rank", type=int, default=int(os.environ.get("RANK", "0")))
    p.add_argument("--world_size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")))
    args, rest = p.parse_known_args(argv)
    if not 0 <= args.rank < args.world_size:
        p.error(f"--rank {args.rank} is outside --world_size {args.world_size}")
    if config_file_arg(rest) is None:
        rest = ["--job.config_file", str(DEBUG_CONFIG), *rest]
    return args, rest


def main(argv: list[str] | None = None) -> None:
    args, rest = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        job = parse_config(rest)
        check_config(job, parallelism=False)
        precompute(job, args)
    except (ConfigError, CacheError) as e:
        print(f"flux: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
