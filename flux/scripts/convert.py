"""Convert transformer weights between the trainer and the FLUX.1 format, both ways.

    python -m flux.scripts.convert to-flux outputs/checkpoint/step-1000 model.safetensors \
        --flavor flux-schnell --dtype bfloat16
    python -m flux.scripts.convert from-flux flux1-schnell.safetensors checkpoints/schnell-init \
        --flavor flux-schnell

to-flux writes one .safetensors with the published FLUX.1 names and layout (what the
reference code and diffusers' FluxTransformer2DModel.from_single_file read), from a
trainer checkpoint folder saved on any number of processes; with --ema, of the average of
the weights the run kept ([ema] enable) instead of its weights. from-flux writes a model-only
DCP checkpoint folder (with its checksums); start training from it with
`--checkpoint.enable --checkpoint.initial_load_path checkpoints/schnell-init`
(to continue training FLUX.1-schnell, say).

The input is checked before anything is written: names and shapes against --flavor, a
checkpoint folder against its checksums, and the values for NaN and infinity (written
anyway only with --allow_nonfinite, which says what it wrote).
"""

from __future__ import annotations

import sys

import torch

from flux.model.args import flux_configs
from flux.model.model import FluxModel
from flux.scripts.cli import Parser
from flux.weights import DTYPES, WeightsError, read_weights, save_dcp, save_safetensors


def meta_model(flavor: str) -> FluxModel:
    with torch.device("meta"):
        return FluxModel(flux_configs[flavor])


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="direction", required=True, parser_class=Parser)
    to_flux = sub.add_parser("to-flux", help="trainer checkpoint -> FLUX.1 .safetensors")
    to_flux.add_argument("checkpoint", help="a checkpoint/step-N folder")
    to_flux.add_argument("out", help="the .safetensors file to write")
    to_flux.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    to_flux.add_argument(
        "--ema", action="store_true", help="the average of the weights (EMA), not the weights"
    )
    from_flux = sub.add_parser("from-flux", help="FLUX.1 .safetensors -> trainer checkpoint")
    from_flux.add_argument("weights", help="a FLUX.1-format .safetensors file")
    from_flux.add_argument("out", help="a new folder for the DCP checkpoint")
    for sp in (to_flux, from_flux):
        sp.add_argument("--flavor", default="flux-debug", choices=sorted(flux_configs))
        sp.add_argument(
            "--allow_nonfinite",
            action="store_true",
            help="write weights that hold NaN or infinity (refused otherwise)",
        )
    args = p.parse_args(argv)
    source = args.checkpoint if args.direction == "to-flux" else args.weights
    try:
        model = meta_model(args.flavor)
        average = args.direction == "to-flux" and args.ema
        state = read_weights(source, model, average, allow_nonfinite=args.allow_nonfinite)
        nonfinite = [k for k, v in state.items() if not torch.isfinite(v).all()]
        if args.direction == "to-flux":
            save_safetensors(state, args.out, args.dtype)
        else:
            save_dcp(state, args.out)
    except WeightsError as e:
        print(f"convert: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"convert: error: cannot write {args.out} ({e.strerror or e})", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {args.out} ({len(state)} tensors)")
    if nonfinite:
        print(
            f"convert: warning: {len(nonfinite)} tensors hold NaN or infinity "
            f"(--allow_nonfinite), e.g. {nonfinite[0]}",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
