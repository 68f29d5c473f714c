"""Benchmarks for flux.

    python -m flux.scripts.benchmark model [--hidden 1536 --heads 12 --double 2 --single 4
                                            --img-tokens 256 --txt-tokens 256 --rounds 10]

    python -m flux.scripts.benchmark data [--source shapes|webdataset --img-size 256
                                           --batch 8 --workers 2 --batches 50]

`model`: forward+backward time of FluxModel against diffusers' FluxTransformer2DModel at the
same dimensions and inputs, measured in alternating turns in one process; prints the ratio.
diffusers comes with the `dev` extra.
`data`: samples/s of the data loader on one process (for `webdataset`, on shards of
shapes images it writes to a temporary folder first, or on --path).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import statistics
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from flux.model.args import flux_configs
from flux.model.model import FluxModel
from flux.sampling import image_ids


def _time_fwd_bwd(step: Callable[[], torch.Tensor]) -> float:
    start = time.perf_counter()
    step().float().square().mean().backward()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_model(args: argparse.Namespace) -> dict[str, float]:
    from diffusers import FluxTransformer2DModel

    head_dim = args.hidden // args.heads
    rope_t = head_dim // 8
    model_args = dataclasses.replace(
        flux_configs["flux-schnell"],
        hidden_size=args.hidden,
        num_heads=args.heads,
        depth=args.double,
        depth_single_blocks=args.single,
        axes_dim=(rope_t, (head_dim - rope_t) // 2, (head_dim - rope_t) // 2),
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    ours = FluxModel(model_args).to(device)
    ours.init_weights()
    theirs = FluxTransformer2DModel(
        patch_size=1,
        in_channels=model_args.in_channels,
        num_layers=args.double,
        num_single_layers=args.single,
        attention_head_dim=head_dim,
        num_attention_heads=args.heads,
        joint_attention_dim=model_args.context_in_dim,
        pooled_projection_dim=model_args.vec_in_dim,
        guidance_embeds=False,
        axes_dims_rope=tuple(model_args.axes_dim),
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


def _write_shapes_shards(root: Path, shards: int, per_shard: int, img_size: int) -> None:
    """Local webdataset shards of shapes images as JPEG, for the loader benchmark."""
    from flux.data.shapes import shapes_sample

    for s in range(shards):
        with tarfile.open(root / f"shard-{s:05d}.tar", "w") as tar:
            for i in range(s * per_shard, (s + 1) * per_shard):
                image, caption = shapes_sample(0, i, img_size)
                buf = io.BytesIO()
                image.save(buf, format="JPEG", quality=90)
                for name, data in (
                    (f"{i:08d}.jpg", buf.getvalue()),
                    (f"{i:08d}.txt", caption.encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def bench_data(args: argparse.Namespace) -> dict[str, float]:
    from flux.data.dataloader import CaptionedImageLoader

    with tempfile.TemporaryDirectory() as tmp:
        path = args.path
        if args.source == "webdataset" and path is None:
            path = Path(tmp)
            total = (args.batches + 5) * args.batch
            _write_shapes_shards(path, 8, -(-total // 8), max(args.img_size, 256))
        loader = CaptionedImageLoader(
            args.source, args.img_size, args.batch, path=path, num_workers=args.workers
        )
        it = iter(loader)
        for _ in range(3):  # start the workers
            next(it)
        start = time.perf_counter()
        for _ in range(args.batches):
            next(it)
        elapsed = time.perf_counter() - start
    return {
        "source": args.source,
        "img_size": args.img_size,
        "workers": args.workers,
        "samples_per_s": args.batches * args.batch / elapsed,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    model = sub.add_parser("model", help="FluxModel vs diffusers, forward+backward")
    model.add_argument("--hidden", type=int, default=1536)
    model.add_argument("--heads", type=int, default=12)
    model.add_argument("--double", type=int, default=2)
    model.add_argument("--single", type=int, default=4)
    model.add_argument("--img-tokens", type=int, default=256)
    model.add_argument("--txt-tokens", type=int, default=256)
    model.add_argument("--batch", type=int, default=1)
    model.add_argument("--rounds", type=int, default=10)
    model.add_argument("--warmup", type=int, default=2)
    model.add_argument("--json", action="store_true", help="print one JSON object")
    data = sub.add_parser("data", help="data loader throughput")
    data.add_argument("--source", default="shapes", choices=["shapes", "webdataset", "imagefolder"])
    data.add_argument("--path", type=Path, default=None)
    data.add_argument("--img-size", type=int, default=256)
    data.add_argument("--batch", type=int, default=8)
    data.add_argument("--workers", type=int, default=2)
    data.add_argument("--batches", type=int, default=50)
    data.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    if args.command == "data":
        result = bench_data(args)
        print(
            json.dumps(result)
            if args.json
            else f"{result['source']} {result['img_size']}px, {result['workers']} workers: "
            f"{result['samples_per_s']:.1f} samples/s"
        )
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
