"""Plan a run without its GPUs: per-GPU memory and step time of a configuration at any scale.

    python -m flux.scripts.plan --job.config_file flux/train_configs/flux_dev_model.toml \\
        --ngpu 64 --gpu h100-80gb [--json] [--sweep] [any trainer override]

Builds rank 0 of the run as the trainer would (flux.plan), on fake tensors and a fake
process group of --ngpu ranks, steps it once and prints: memory per GPU at the step's peak
by category and whether it fits each --gpu (with --margin of HBM kept free); if not, by how
much and what each knob would save (re-planned); FLOPs, collectives and the roofline step
time, images/s per GPU and MFU; and MLPerf Training's FLUX.1 benchmark at this scale beside
published results. --sweep finds the largest local batch that fits for each activation-
checkpointing setting (--sweep-ac). GPU profiles: h100-80gb, h200, b200, gb200, mi300x.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import warnings
from typing import Any

GIB = 2**30


def arguments(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m flux.scripts.plan",
        description="Per-GPU memory and step time of a training configuration at any "
        "scale. Every other argument is the trainer's (--job.config_file, "
        "--training.local_batch_size, ...).",
    )
    parser.add_argument("--ngpu", type=int, required=True, help="GPUs (processes) of the run")
    parser.add_argument(
        "--gpu",
        default="h100-80gb",
        help="GPU profile(s), comma-separated: h100-80gb, h200, b200, gb200, mi300x",
    )
    parser.add_argument(
        "--margin", type=float, default=0.1, help="fraction of HBM kept free (default 0.1)"
    )
    parser.add_argument(
        "--efficiency",
        type=float,
        default=0.4,
        help="fraction of peak dense bf16 that compute reaches (default 0.4)",
    )
    parser.add_argument(
        "--link-efficiency",
        type=float,
        default=0.8,
        help="fraction of link bandwidth collectives reach (default 0.8)",
    )
    parser.add_argument(
        "--no-overlap",
        action="store_true",
        help="FSDP/HSDP collectives do not overlap compute",
    )
    parser.add_argument(
        "--encoders",
        default="auto",
        help="online (T5/CLIP/autoencoder every step), precomputed (a cache), or auto: "
        "as training.dataset says",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument(
        "--sweep", action="store_true", help="largest local batch that fits, per AC setting"
    )
    parser.add_argument(
        "--sweep-ac",
        default="none,selective:2,full",
        help="activation_checkpoint settings for --sweep, MODE[:OPTION] comma-separated "
        "(default none,selective:2,full; selective:N checkpoints every N-th block)",
    )
    parser.add_argument(
        "--no-advice", action="store_true", help="do not re-plan knobs when a run does not fit"
    )
    return parser.parse_known_args(argv)


def gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB"


def describe_run(plan: Any, gpu: Any) -> list[str]:
    layout = ", ".join(f"{k} {v}" for k, v in plan.layout.items() if v > 1) or "one process"
    encoders = (
        "online (T5, CLIP and the autoencoder's encoder run every step)"
        if plan.encoders == "online"
        else "precomputed (a cache; no T5/CLIP)"
    )
    return [
        f"{plan.flavor} on {plan.ngpu} x {gpu.name} ({layout}), {plan.img_size} px, "
        f"T5 {plan.txt_tokens} tokens",
        f"  local batch {plan.local_batch} x {plan.accumulation} micro-batch(es), global "
        f"{plan.global_batch}; activation checkpointing {plan.activation_checkpoint}; "
        f"encoders {encoders}",
    ]


def describe_memory(plan: Any) -> list[str]:
    m = plan.memory
    lines = ["", "memory per GPU at the step's peak"]
    for name, nbytes in m.at_peak.items():
        lines.append(f"  {name:<24}{gib(nbytes):>12}")
    verdict = (
        f"fits, {gib(-m.over_bytes)} to spare"
        if m.fits
        else f"does NOT fit: {gib(m.over_bytes)} over"
    )
    lines.append(
        f"  {'peak':<24}{gib(m.peak_bytes):>12}  of {gib(m.usable_bytes)} usable "
        f"({m.hbm_bytes / 1e9:.0f} GB less {plan.settings['margin']:.0%}): {verdict}"
    )
    if m.host_bytes:
        lines.append(f"  and in host memory: {gib(m.host_bytes)} (the EMA, cpu_offload)")
    if plan.advice:
        lines.append("  what lowers the peak (each re-planned), the most first:")
        for a in plan.advice:
            fits = "fits" if a["peak_bytes"] <= m.usable_bytes else "still over"
            lines.append(
                f"    {a['change']}: peak {gib(a['peak_bytes'])} "
                f"(saves {gib(a['saves_bytes'])}), {fits}"
            )
    return lines


def describe_time(plan: Any, gpu: Any) -> list[str]:
    t, s, f = plan.time, plan.settings, plan.flops
    counted = f["counted_model"] + f["counted_encoders"]
    lines = [
        "",
        f"time per step (roofline: compute at {s['efficiency']:.0%} of "
        f"{gpu.peak_bf16_flops / 1e12:,.0f} TFLOPS dense bf16, links at "
        f"{s['link_efficiency']:.0%}; FSDP/HSDP traffic "
        f"{'overlaps compute' if s['overlap'] else 'does not overlap'})",
        f"  FLOPs per GPU: {counted / 1e12:,.1f} TFLOP counted (model with recomputation "
        f"{f['counted_model'] / 1e12:,.1f}, frozen encoders "
        f"{f['counted_encoders'] / 1e12:,.1f}); the trainer's count "
        f"{f['model'] / 1e12:,.1f}",
        f"  {'compute':<44}{t.compute_s * 1e3:>10.1f} ms",
    ]
    for link in t.traffic:
        what = f"{link.kind} over {link.group} ({link.link})"
        note = "overlapped" if link.overlapped else "exposed"
        lines.append(
            f"  {what:<44}{link.seconds * 1e3:>10.1f} ms  "
            f"{link.wire_bytes / 1e9:,.2f} GB sent per GPU, {note}"
        )
    lines += [
        f"  {'optimizer step (HBM)':<44}{t.optimizer_s * 1e3:>10.1f} ms",
        f"  {'step':<44}{t.step_s * 1e3:>10.1f} ms",
        f"  {t.images_per_s_per_gpu:.2f} images/s per GPU, MFU {t.mfu:.1%}",
        f"  assumed: {s['compile']}",
    ]
    if s["float8"] != "off":
        lines.append(f"  assumed: {s['float8']}")
    return lines


def describe_mlperf(plan: Any, gpu: Any) -> list[str]:
    m = plan.mlperf
    published = "; ".join(
        f"{p['minutes']} min on {p['gpus']:,} {p['gpu']} ({p['who']}, "
        f"{p['implied_mfu']:.0%} MFU by this count)"
        for p in m.published
    )
    return [
        "",
        f"MLPerf Training FLUX.1 (about 11.8M samples of flux-schnell at 256 px): "
        f"{m.minutes:,.1f} min on {plan.ngpu} x {gpu.name} with this layout, batch and AC",
        f"  published: {published}",
    ]


def describe(plan: Any) -> str:
    from flux.plan.gpus import GPUS

    gpu = GPUS[plan.gpu]
    lines = describe_run(plan, gpu) + describe_memory(plan)
    lines += describe_time(plan, gpu) + describe_mlperf(plan, gpu)
    return "\n".join(lines)


def describe_sweep(results: list[Any], job: Any, ngpu: int) -> str:
    from flux.plan.gpus import GPUS

    lines = [
        f"largest local batch that fits: {job.model.flavor}, {job.training.img_size} px, "
        f"{ngpu} GPUs (one micro-batch per step)",
        f"  {'GPU':<16}{'activation ckpt':<18}{'batch':>6}{'peak':>12}{'images/s/GPU':>15}",
    ]
    for r in results:
        if r.plan is None:
            lines.append(
                f"  {GPUS[r.gpu].name[:15]:<16}{r.activation_checkpoint:<18}{0:>6}"
                f"{'batch 1 does not fit':>27}"
            )
            continue
        lines.append(
            f"  {GPUS[r.gpu].name[:15]:<16}{r.activation_checkpoint:<18}{r.largest_batch:>6}"
            f"{gib(r.plan.memory.peak_bytes):>12}{r.plan.time.images_per_s_per_gpu:>15.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args, trainer_args = arguments(sys.argv[1:] if argv is None else argv)
    warnings.filterwarnings("ignore")
    for name in ("torchtitan", "torchao", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)

    from torchtitan.tools.logging import logger

    from flux.config import ConfigError, parse_config
    from flux.plan.planner import PlanSettings, advise, plan, sweep
    from flux.plan.roofline import TimeSettings

    logger.setLevel(logging.ERROR)
    try:
        job = parse_config(trainer_args)
        settings = PlanSettings(
            ngpu=args.ngpu,
            gpus=tuple(g.strip() for g in args.gpu.split(",") if g.strip()),
            margin=args.margin,
            encoders=args.encoders,
            time=TimeSettings(args.efficiency, args.link_efficiency, not args.no_overlap),
        )
        if args.sweep:
            acs = [a.strip() for a in args.sweep_ac.split(",")]
            results = sweep(job, settings, acs, progress=lambda line: print(line, file=sys.stderr))
            if args.json:
                print(json.dumps([dataclasses.asdict(r) for r in results], indent=1))
            else:
                print(describe_sweep(results, job, args.ngpu))
            return
        plans = plan(job, settings)
        if not args.no_advice and not all(p.memory.fits for p in plans):
            advice = advise(job, settings, plans[0].memory.peak_bytes)
            for p in plans:
                if not p.memory.fits:
                    p.advice = advice
    except ConfigError as e:
        print(f"flux: error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.json:
        print(json.dumps([dataclasses.asdict(p) for p in plans], indent=1))
    else:
        print("\n\n".join(describe(p) for p in plans))


if __name__ == "__main__":
    main()
