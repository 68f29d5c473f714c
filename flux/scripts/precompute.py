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
renamed, then reads each back and records its size and checksum beside it. Run the same
command again after an interruption: existing whole shards are kept, the rest written, and
whichever process finishes last writes manifest.json (sizes and checksums included). Each
process prints what it skipped, by kind; the last one the cache's totals. A cache without
a single sample is not finished: the command fails instead. Indexed sources
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
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch.utils.data import DataLoader, Dataset
from torchtitan.config import JobConfig

from flux.checksums import file_entry
from flux.config import (
    DEBUG_CONFIG,
    ConfigError,
    cache_settings,
    check_config,
    config_file_arg,
    data_buckets,
    parse_config,
)
from flux.data.buckets import name as bucket_name
from flux.data.dataloader import bucket_of
from flux.data.dataset import CaptionedImages, Sample, split_seed
from flux.data.precomputed import (
    FORMAT,
    MANIFEST,
    PLAN,
    TENSORS,
    TEXTS,
    CacheError,
    is_sealed,
    seal_shard,
    shard_entry,
    shard_metadata,
    write_json,
    write_shard,
)
from flux.data.skips import BadSample
from flux.data.transforms import device_images
from flux.flow import PRECOMPUTED, build_autoencoder, build_text_encoders, encode_images
from flux.model.args import flux_configs
from flux.scripts.cli import Parser, fail, nonnegative_int, positive_int
from flux.seam import quiet
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
        images = device_images(torch.stack([s.image for s in samples]), self.device, self.dtype)
        moments = encode_images(self.autoencoder, images).cpu()
        return {**self.texts([s.caption for s in samples]), "moments": moments}


class ShardWriter:
    """The samples of one shard, encoded a batch of one bucket at a time, then written in
    one file (flux.data.precomputed: the moments of each bucket in a tensor of their own,
    when there are several)."""

    def __init__(self, encoders: Encoders, batch_size: int):
        self.encoders, self.batch_size = encoders, batch_size
        self.pending: dict[tuple[int, int], list[tuple[int, Sample]]] = {}  # bucket -> rows
        self.parts: list[tuple[list[int], dict[str, torch.Tensor]]] = []  # rows, encodings
        self.keys: list[str] = []
        self.captions: list[str] = []
        self.skipped: list[str] = []  # "key: reason"
        self.skipped_kinds: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, sample: Sample) -> None:
        bucket = bucket_of(sample)
        waiting = self.pending.setdefault(bucket, [])
        waiting.append((len(self.keys), sample))
        self.keys.append(sample.key)
        self.captions.append(sample.caption)
        if len(waiting) == self.batch_size:
            self._encode(bucket)

    def skip(self, where: str, reason: str) -> None:
        self.skipped.append(f"{where}: {reason}")
        self.skipped_kinds[kind_of(reason)] += 1

    def _encode(self, bucket: tuple[int, int]) -> None:
        rows, samples = zip(*self.pending.pop(bucket))
        self.parts.append((list(rows), self.encoders.samples(list(samples))))

    def write(self, path: Path, **metadata: Any) -> None:
        for bucket in list(self.pending):
            self._encode(bucket)
        tensors, buckets = encoded_rows(self.parts)
        meta = {
            "keys": self.keys,
            "captions": self.captions,
            "skipped": self.skipped,  # "key: reason" (streams: the latest few)
            "skipped_count": len(self.skipped),
            "skipped_kinds": dict(self.skipped_kinds),
            **({"buckets": buckets} if buckets else {}),
        }
        write_shard(path, tensors, {**meta, **metadata})
        seal_shard(path)  # read back: a shard that does not read whole fails here


def encoded_rows(
    parts: list[tuple[list[int], dict[str, torch.Tensor]]],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A shard's tensors from its batches' encodings, in row order: t5 and clip; moments, or
    with several buckets, moments.WxH of each bucket's rows in order, with each row's bucket
    name (else [])."""
    if not parts:
        return {n: torch.empty(0) for n in TENSORS}, []
    rows = [r for part_rows, _ in parts for r in part_rows]
    order = torch.tensor(rows).argsort()
    tensors = {n: torch.cat([p[n] for _, p in parts])[order] for n in ("t5", "clip")}
    moments = [(r, p["moments"][i]) for part_rows, p in parts for i, r in enumerate(part_rows)]
    moments.sort(key=lambda rm: rm[0])
    names = [bucket_name((m.shape[2] * 8, m.shape[1] * 8)) for _, m in moments]
    if len(set(names)) == 1:
        return {**tensors, "moments": torch.stack([m for _, m in moments])}, []
    for bucket in dict.fromkeys(names):
        rows_of = [m for (_, m), n in zip(moments, names) if n == bucket]
        tensors[f"moments.{bucket}"] = torch.stack(rows_of)
    return tensors, names


def kind_of(reason: str) -> str:
    """The kind of a skip from its reason ("undecodable image: ..."), as the reader counts."""
    return reason.split(":")[0]


class IndexedShards(Dataset):
    """(shard, sample or "key: why it was skipped") for the samples of the given shards."""

    def __init__(self, source: CaptionedImages, shards: list[int], size: int, total: int):
        self.source = source
        self.entries = [(s, i) for s in shards for i in range(s * size, min(total, (s + 1) * size))]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, position: int) -> tuple[int, Sample | tuple[str, str]]:
        shard, index = self.entries[position]
        try:
            sample = self.source.sample(index)
        except (BadSample, ValueError) as e:
            return shard, (self.source.key(index), str(e))
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
        buckets=data_buckets(job, section.img_size),
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


@dataclasses.dataclass
class Written:
    """What a process wrote: shards, samples, and the samples it skipped, by kind."""

    shards: int = 0
    samples: int = 0
    skipped: Counter[str] = dataclasses.field(default_factory=Counter)

    def __add__(self, other: Written) -> Written:
        return Written(
            self.shards + other.shards, self.samples + other.samples, self.skipped + other.skipped
        )


def write_indexed(
    root: Path,
    plan: dict[str, Any],
    reader: CaptionedImages,
    args: argparse.Namespace,
    encoders: Callable[[], Encoders],
) -> Written:
    """This process's shards of an indexed source that are not written yet; returns what it
    wrote."""
    size, total = plan["shard_size"], plan["num_samples"]
    count = -(-total // size)
    mine = range(args.rank, count, args.world_size)
    todo = [s for s in mine if not is_sealed(shard_path(root, s))]
    if not todo:
        return Written()
    loader = DataLoader(
        IndexedShards(reader, todo, size, total),
        batch_size=args.batch_size,
        collate_fn=list,
        num_workers=args.workers,
    )
    items = iter(loader)  # workers start before the encoders are built: they hold none
    writer, current = ShardWriter(encoders(), args.batch_size), todo[0]
    done = Written()
    for shard, item in itertools.chain.from_iterable(items):
        if shard != current:
            done += written(writer, shard_path(root, current))
            writer, current = ShardWriter(encoders(), args.batch_size), shard
        if isinstance(item, tuple):
            writer.skip(*item)
        else:
            writer.add(item)
    done += written(writer, shard_path(root, current))
    return done


def written(writer: ShardWriter, path: Path, **metadata: Any) -> Written:
    """Write the writer's shard; what it holds."""
    writer.write(path, **metadata)
    return Written(1, len(writer), Counter(writer.skipped_kinds))


def write_streamed(
    root: Path,
    plan: dict[str, Any],
    reader: CaptionedImages,
    args: argparse.Namespace,
    encoders: Callable[[], Encoders],
) -> Written:
    """This process's share of a stream, from where its last shard ended; returns what it
    wrote (see `written`)."""
    if done_path(root, args.rank).exists():
        return Written()
    assert reader.streamed
    before = sorted(root.glob(f"shard-r{args.rank:04d}-*.safetensors"))
    if before and not is_sealed(before[-1]):  # stopped between writing and sealing it
        before.pop().unlink()
    consumed = 0
    if before:
        last = shard_metadata(before[-1])
        reader.load_state_dict(last["stream"])
        consumed = last["consumed"]
    total = plan["num_samples"]
    samples = reader.one_pass()
    if total is not None:
        share = total // args.world_size + int(args.rank < total % args.world_size)
        samples = itertools.islice(samples, max(0, share - consumed))
    shard, writer = len(before), ShardWriter(encoders(), args.batch_size)
    skips: Counter[str] = Counter()
    done = Written()

    def flush() -> None:
        nonlocal skips, done
        assert reader.streamed
        new = Counter(reader.skipped) - skips
        skips = Counter(reader.skipped)
        writer.skipped = list(reader.skip_examples)[-new.total() :] if new else []
        writer.skipped_kinds = new
        done += written(
            writer,
            shard_path(root, shard, args.rank),
            skipped_count=new.total(),
            stream=reader.state_dict(),  # just after the shard's last sample
            consumed=consumed,
        )

    for sample in samples:
        assert isinstance(sample, Sample)
        writer.add(sample)
        consumed += 1
        if len(writer) == plan["shard_size"]:
            flush()
            shard, writer = shard + 1, ShardWriter(encoders(), args.batch_size)
    if len(writer) or Counter(reader.skipped) != skips:
        flush()
        shard += 1
    write_json(done_path(root, args.rank), {"shards": shard, "samples": consumed})
    return done


def finish(root: Path, plan: dict[str, Any]) -> bool:
    """Write the manifest if every shard is written (by any process); whether it exists.
    A cache without samples is refused (CacheError) instead."""
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
    shards = [shard_entry(f) for f in files]
    metas = [shard_metadata(f) for f in files]
    skipped = sum(m["skipped_count"] for m in metas)
    kinds = sum((Counter(m.get("skipped_kinds", {})) for m in metas), Counter())
    samples = sum(s["samples"] for s in shards)
    if samples == 0:
        raise CacheError(
            f"no usable sample in the source: all {skipped} were skipped ({describe(kinds)}), "
            f"so {root} is not finished; fix the data or give another source"
        )
    texts = {"file": TEXTS, **file_entry(root / TEXTS)}
    manifest = {**plan, "samples": samples, "skipped": skipped, "skipped_kinds": dict(kinds)}
    write_json(root / MANIFEST, {**manifest, "texts_file": texts, "shards": shards})
    print(f"{root}: finished with {samples} samples; {skipped} skipped ({describe(kinds)})")
    return True


def describe(kinds: Counter[str]) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in kinds.most_common()) or "none"


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
    done = write(root, plan, reader, args, encoders)
    if not (root / TEXTS).exists():
        texts = plan["texts"]
        meta = {"texts": texts}
        write_shard(root / TEXTS, encoders().texts(texts), meta, tmp_suffix=str(os.getpid()))
    print(
        f"{root}: process {args.rank} of {args.world_size} wrote {done.shards} shards of "
        f"{done.samples} samples; skipped {done.skipped.total()} ({describe(done.skipped)})"
    )
    finished = finish(root, plan)
    if not finished:
        print(f"{root}: other processes' shards are still missing")
    return finished


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", type=Path, required=True, help="the cache folder")
    p.add_argument(
        "--num_samples",
        type=positive_int,
        help="samples to encode (required for shapes; else a cap)",
    )
    p.add_argument("--split", choices=["training", "validation"], default="training")
    p.add_argument("--shard_size", type=positive_int, default=256, help="samples per shard file")
    p.add_argument("--batch_size", type=positive_int, default=32, help="samples per encoder call")
    p.add_argument(
        "--workers", type=nonnegative_int, default=2, help="image-loading processes (indexed)"
    )
    p.add_argument("--rank", type=nonnegative_int, default=os.environ.get("RANK", "0"))
    p.add_argument("--world_size", type=positive_int, default=os.environ.get("WORLD_SIZE", "1"))
    args, rest = p.parse_known_args(argv)
    if args.output.exists() and not args.output.is_dir():
        p.error(f"--output {args.output} is a file: give a folder for the cache")
    if not 0 <= args.rank < args.world_size:
        p.error(f"--rank {args.rank} is outside --world_size {args.world_size}")
    if config_file_arg(rest) is None:
        rest = ["--job.config_file", str(DEBUG_CONFIG), *rest]
    return args, rest


def main(argv: list[str] | None = None) -> None:
    args, rest = parse_args(sys.argv[1:] if argv is None else argv)
    quiet(device().type)
    try:
        job = parse_config(rest)
        check_config(job, parallelism=False)
        precompute(job, args)
    except (ConfigError, CacheError, OSError, ValueError, SafetensorError) as e:
        fail("flux", e)


if __name__ == "__main__":
    main()
