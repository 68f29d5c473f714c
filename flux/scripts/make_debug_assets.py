"""Make the tiny encoders, tokenizers and autoencoder the debug flavor uses offline.

    python -m flux.scripts.make_debug_assets [--out flux/assets] [--only t5 clip autoencoder]

Writes flux/assets/t5-debug/ and flux/assets/clip-debug/: configs, tokenizers trained on
the shapes captions plus a little general text, and seeded random weights, each folder
loadable with `from_pretrained(folder)` exactly as the real encoders are. Writes
flux/assets/autoencoder-debug/ae.safetensors: the debug autoencoder trained on 64px shapes
(about 20 minutes on 2 idle CPU cores), so that debug runs decode to recognisable images. It
prints the latent statistics flux-debug's scale_factor/shift_factor are set from. The output
is committed; run this only to change it.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch

from flux.data.shapes import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES
from flux.model.text_encoders import CLIP_MAX_LENGTH

GENERAL_TEXT = (
    "a photo of a cat sitting on a chair in the garden, an oil painting of mountains at "
    "sunset, the quick brown fox jumps over the lazy dog, a portrait of a woman with long "
    "hair, a city street at night with neon lights, 0 1 2 3 4 5 6 7 8 9"
)


def corpus() -> list[str]:
    lines = [GENERAL_TEXT]
    for color in COLORS:
        for shape in SHAPES:
            for size in SIZES:
                for position in POSITIONS:
                    for background in BACKGROUNDS:
                        lines.append(
                            f"a {size} {color} {shape} at {position} on a {background} background"
                        )
    return lines


def make_t5(out: Path, d_model: int) -> None:
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "corpus.txt"
        text.write_text("\n".join(corpus()))
        spm.SentencePieceTrainer.train(
            input=str(text),
            model_prefix=str(Path(tmp) / "spiece"),
            vocab_size=80,
            model_type="unigram",
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            character_coverage=1.0,
        )

        pieces = spm.SentencePieceProcessor(model_file=str(Path(tmp) / "spiece.model"))
        vocab = [(pieces.id_to_piece(i), pieces.get_score(i)) for i in range(len(pieces))]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(out)
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=80,
        d_model=d_model,
        d_kv=16,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    T5EncoderModel(config).save_pretrained(out)


def make_clip(out: Path, hidden: int) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    special = ["<|startoftext|>", "<|endoftext|>"]
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=160,
        special_tokens=special,
        end_of_word_suffix="</w>",
        initial_alphabet=[chr(c) for c in range(ord("a"), ord("z") + 1)],
    )
    bpe.train_from_iterator(corpus(), trainer)
    with tempfile.TemporaryDirectory() as tmp:
        bpe.model.save(tmp)
        vocab = json.loads((Path(tmp) / "vocab.json").read_text())
        merges = (Path(tmp) / "merges.txt").read_text()
        (Path(tmp) / "merges.txt").write_text(
            merges if merges.startswith("#") else "#version: 0.2\n" + merges
        )
        tokenizer = CLIPTokenizer(
            str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), pad_token="<|endoftext|>"
        )
        tokenizer.save_pretrained(out)
    torch.manual_seed(1)
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=hidden,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    CLIPTextModel(config).save_pretrained(out)


def shapes_pool(count: int, img_size: int) -> torch.Tensor:
    from flux.data.shapes import shapes_sample
    from flux.data.transforms import device_images, image_to_tensor

    pixels = [image_to_tensor(shapes_sample(1, i, img_size)[0], img_size) for i in range(count)]
    return device_images(torch.stack(pixels), "cpu")


POSTERIOR_STD = 0.05  # the debug autoencoder's fixed posterior noise (see make_autoencoder)


def make_autoencoder(out: Path, steps: int, img_size: int = 64) -> None:
    """Train the debug autoencoder on shapes: MSE + L1 reconstruction of a latent sampled with
    a fixed, small posterior std (a learned one near 1 drowned the colours: every shape came
    back orange), then set the encoder's log-variance output to that constant, so sampling
    in training sees exactly the noise the decoder was trained with."""
    from safetensors.torch import save_file

    from flux.model.args import flux_configs
    from flux.model.autoencoder import AutoEncoder

    torch.manual_seed(0)
    params = flux_configs["flux-debug"].autoencoder_params
    ae = AutoEncoder(params)
    pool = shapes_pool(4096, img_size)
    opt = torch.optim.AdamW(ae.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for step in range(steps):
        x = pool[torch.randint(len(pool), (8,))]
        mean = ae.encoder(x)[:, : params.z_channels]
        recon = ae.decoder(mean + POSTERIOR_STD * torch.randn_like(mean))
        # Shapes cover a small part of each image: weight their pixels up (the corner is
        # always background), or the background dominates and hues are learned last.
        weight = 1 + 4 * ((x - x[:, :, :1, :1]).abs().sum(1, keepdim=True) > 0.1).float()
        rec = (weight * ((recon - x).pow(2) + 0.5 * (recon - x).abs())).mean() / weight.mean()
        loss = rec + 1e-4 * mean.pow(2).mean()  # keeps the latents near unit scale
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"autoencoder step {step}: reconstruction {rec.item():.4f}")
    ae.eval()
    with torch.no_grad():
        conv = ae.encoder.conv_out
        assert conv.bias is not None
        conv.weight[params.z_channels :] = 0.0
        conv.bias[params.z_channels :] = 2 * math.log(POSTERIOR_STD)
        mean = torch.cat([ae.encoder(pool[i : i + 256])[:, : params.z_channels] for i in (0, 256)])
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in ae.state_dict().items()}
    save_file(state, str(out / "ae.safetensors"))
    print(
        f"latent mean {mean.mean().item():.4f} std {mean.std().item():.4f}: set flux-debug's "
        f"shift_factor to the mean and scale_factor to 1/std"
    )


def main(argv: list[str] | None = None) -> None:
    from flux.model.args import flux_configs

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "assets")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["t5", "clip", "autoencoder"],
        default=None,
        help="make only these assets (default: all)",
    )
    parser.add_argument("--ae_steps", type=int, default=2500)
    args = parser.parse_args(argv)
    only = set(args.only or ["t5", "clip", "autoencoder"])
    debug = flux_configs["flux-debug"]
    if "t5" in only:
        make_t5(args.out / "t5-debug", debug.context_in_dim)
        print(f"wrote {args.out / 't5-debug'}")
    if "clip" in only:
        make_clip(args.out / "clip-debug", debug.vec_in_dim)
        print(f"wrote {args.out / 'clip-debug'}")
    if "autoencoder" in only:
        make_autoencoder(args.out / "autoencoder-debug", args.ae_steps)
        print(f"wrote {args.out / 'autoencoder-debug' / 'ae.safetensors'}")


if __name__ == "__main__":
    main()
