"""Benchmarks for flux.

    python -m flux.scripts.benchmark model [--hidden 1536 --heads 12 --double 2 --single 4
                                            --img-tokens 256 --txt-tokens 256 --rounds 10]

`model`: forward+backward time of FluxModel against diffusers' FluxTransformer2DModel at the
same dimensions and inputs, measured in alternating turns in one process; prints the ratio.
diffusers comes with the `dev` extra.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable

import torch

from flux.model.args import flux_configs
from flux.model.model import FluxModel


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

    side = int(args.img_tokens**0.5)
    img = torch.randn(args.batch, args.img_tokens, model_args.in_channels, device=device)
    img_ids = torch.zeros(args.img_tokens, 3, device=device)
    img_ids[:, 1] = torch.arange(args.img_tokens, device=device) // side
    img_ids[:, 2] = torch.arange(args.img_tokens, device=device) % side
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
    args = parser.parse_args(argv)

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
