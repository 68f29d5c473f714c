"""Text to image from a trained model: PNGs with the prompt, seed and settings in them.

    python -m flux.scripts.infer --checkpoint outputs/checkpoint/step-30 \
        --prompts "a large red circle at the center on a white background"
    python -m flux.scripts.infer --flavor flux-schnell --checkpoint flux1-schnell.safetensors \
        --t5 google/t5-v1_1-xxl --clip openai/clip-vit-large-patch14 \
        --autoencoder flux/assets/autoencoder/ae.safetensors --width 1360 --height 768 \
        --steps 4 --schedule schnell --cfg_scale 1 --prompts_file prompts.txt

--checkpoint is a trainer checkpoint folder (checkpoint/step-N, saved on any number of
processes) or a FLUX.1-format .safetensors file. From a checkpoint of a run that kept an
average of the weights ([ema] enable), the average is sampled (--no-ema: the weights).
Image i of a run uses seed --seed + i, so a prompt's image does not depend on the batch
size. Files: <out>/<index>_<seed>.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from torchtitan.config import TORCH_DTYPE_MAP

from flux.config import resolve_path
from flux.generate import SampleSettings, generate, to_pil
from flux.model.args import flux_configs
from flux.model.autoencoder import load_ae
from flux.model.model import FluxModel
from flux.model.text_encoders import CLIP_MAX_LENGTH, TextEncoder
from flux.sampling import check_image_size
from flux.scripts.cli import Parser, fail, nonnegative_float, nonnegative_int, positive_int
from flux.seam import quiet
from flux.weights import DTYPES, check_weights, holds_average, load_weights


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint/step-N folder or .safetensors")
    p.add_argument("--flavor", default="flux-debug", choices=sorted(flux_configs))
    p.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="sample the checkpoint's average of the weights (default: when it holds one)",
    )
    p.add_argument("--prompts", nargs="*", default=[], help="prompts (or --prompts_file)")
    p.add_argument("--prompts_file", help="a text file with one prompt per line")
    p.add_argument("--out", default="outputs/images", help="folder the PNGs are written to")
    p.add_argument(
        "--size", type=positive_int, default=64, help="width and height, a multiple of 16"
    )
    p.add_argument("--width", type=positive_int, help="a multiple of 16 (default: --size)")
    p.add_argument("--height", type=positive_int, help="a multiple of 16 (default: --size)")
    p.add_argument("--steps", type=positive_int, default=20, help="Euler steps")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--batch_size", type=positive_int, default=4)
    p.add_argument("--cfg_scale", type=nonnegative_float, default=4.0, help="1 disables CFG")
    p.add_argument(
        "--schedule",
        choices=["dev", "schnell"],
        default="dev",
        help="dev: timesteps shifted by resolution; schnell: evenly spaced",
    )
    p.add_argument("--guidance", type=float, default=3.5, help="guidance-embedding input")
    p.add_argument("--t5", default="t5-debug", help="T5 hub id, local folder or t5-debug")
    p.add_argument("--clip", default="clip-debug", help="CLIP hub id, local folder or clip-debug")
    p.add_argument("--max_t5_len", type=positive_int, default=None, help="default: the flavor's")
    p.add_argument("--autoencoder", default="flux/assets/autoencoder-debug/ae.safetensors")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompts)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise ValueError(f"prompts file {path} not found")
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"prompts file {path} cannot be read ({e.strerror})") from None
        except UnicodeDecodeError:
            raise ValueError(f"prompts file {path} is not UTF-8 text") from None
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError("no prompts: give --prompts TEXT ... or --prompts_file FILE")
    return prompts


def run(args: argparse.Namespace) -> list[Path]:
    prompts = read_prompts(args)
    for side in ("width", "height"):  # each --width/--height, or --size
        given = getattr(args, side)
        check_image_size(given or args.size, f"--{side}" if given else "--size")
        setattr(args, side, given or args.size)
    model_args = flux_configs[args.flavor]
    device, dtype = torch.device(args.device), TORCH_DTYPE_MAP[args.dtype]
    if args.ema is None:
        args.ema = holds_average(args.checkpoint)
    with torch.device("meta"):  # the weights must fit the flavor before it is built
        check_weights(args.checkpoint, FluxModel(model_args), average=args.ema)
    model = FluxModel(model_args)
    load_weights(args.checkpoint, model, average=args.ema, checked=True)
    print(f"sampling {'the average of the weights (EMA)' if args.ema else 'the weights'}")
    model = model.to(device, dtype).eval()
    max_len = args.max_t5_len or model_args.txt_seq_len
    try:
        t5 = TextEncoder("t5", args.t5, max_len, dtype).to(device)
        clip = TextEncoder("clip", args.clip, CLIP_MAX_LENGTH, dtype).to(device)
    except OSError as e:  # the message names the encoder's --t5 / --clip value
        raise ValueError(str(e)) from None
    ae_path = resolve_path(args.autoencoder)
    try:
        ae = load_ae(ae_path, model_args.autoencoder_params, device).to(dtype)
    except (OSError, ValueError, SafetensorError) as e:
        raise ValueError(f"--autoencoder {ae_path}: {e}") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        settings = SampleSettings(
            width=args.width,
            height=args.height,
            steps=args.steps,
            cfg_scale=args.cfg_scale,
            guidance=args.guidance,
            shift=args.schedule == "dev",
            seed=args.seed + start,
        )
        with torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
            images = generate(
                model, t5, clip, ae, batch, settings, device, model_args.guidance_embed
            )
        for i, (prompt, image) in enumerate(zip(batch, images)):
            index, seed = start + i, settings.seed + i
            path = out / f"{index:05d}_{seed}.png"
            to_pil(image).save(path, pnginfo=png_info(prompt, seed, args))
            written.append(path)
            print(f"wrote {path}: {prompt}")
    return written


def png_info(prompt: str, seed: int, args: argparse.Namespace):
    from PIL.PngImagePlugin import PngInfo

    settings = {
        "flavor": args.flavor,
        "checkpoint": str(args.checkpoint),
        "weights": "ema" if args.ema else "raw",
        "width": args.width,
        "height": args.height,
        "steps": args.steps,
        "cfg_scale": args.cfg_scale,
        "schedule": args.schedule,
        "guidance": args.guidance if flux_configs[args.flavor].guidance_embed else None,
        "dtype": args.dtype,
    }
    info = PngInfo()
    info.add_text("prompt", prompt)
    info.add_text("seed", str(seed))
    info.add_text("settings", json.dumps(settings))
    return info


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet(torch.device(args.device).type)
    try:
        run(args)
    except (OSError, ValueError, SafetensorError) as e:  # WeightsError is a ValueError
        fail("infer", e)


if __name__ == "__main__":
    main()
