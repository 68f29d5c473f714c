"""Download the FLUX.1 autoencoder (ae.safetensors) and, for offline clusters, the text encoders.

    python flux/scripts/download_autoencoder.py --repo_id black-forest-labs/FLUX.1-dev \\
        --ae_path ae.safetensors [--hf_token T] [--out PATH] [--flavor flux-dev]
    python -m flux.scripts.download_autoencoder --encoders /data/encoders --skip_ae

The autoencoder goes through the hub cache (progress bar, resume), is hard-linked or copied to
--out (default flux/assets/autoencoder/ae.safetensors) and then loaded into the autoencoder of
--flavor, so a file that does not fit fails here rather than at training time. --encoders DIR
puts T5 and CLIP (configs, tokenizers, weights) under DIR/t5 and DIR/clip.

The token comes from --hf_token, else HF_TOKEN, else the stored `hf auth login`; it is never
printed. Failures the user can fix print one line to stderr and exit with status 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import sys
from pathlib import Path

if not __package__:  # run as a file: make the repository root (parent of flux/) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)
from safetensors import SafetensorError

import flux
from flux.model.args import flux_configs
from flux.model.autoencoder import load_ae
from flux.model.text_encoders import CLIP_HUB_ID, T5_HUB_ID
from flux.scripts.cli import Parser

DEFAULT_OUT = Path(flux.__file__).parent / "assets" / "autoencoder" / "ae.safetensors"
TOKENS_PAGE = "https://huggingface.co/settings/tokens"
# Configs, tokenizer files (T5: spiece.model; CLIP: vocab.json, merges.txt) and weights: the
# repos also hold TensorFlow/Flax/.bin copies of the weights that nothing here needs.
ENCODER_FILES = ["*.json", "*.txt", "*.model", "*.safetensors"]
# google/t5-v1_1-xxl publishes only PyTorch .bin weights; fetched when no safetensors came.
ENCODER_BIN_WEIGHTS = ["pytorch_model*.bin"]
# Hub tokens look like hf_ + 34 letters/digits; one from the stored login is scrubbed too.
TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{30,}")


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean the hub could not be reached.

    huggingface_hub has used requests, httpx and httpx2 across versions; whichever is installed
    can surface a transport error mid-download, so each one present is included.
    """
    errors: list[type[BaseException]] = [
        LocalEntryNotFoundError,  # no connection and the file is not in the cache
        OfflineModeIsEnabled,
        ConnectionError,
        TimeoutError,
    ]
    for module_name, names in (
        ("httpx2", ("TransportError",)),
        ("httpx", ("TransportError",)),
        ("requests", ("ConnectionError", "Timeout")),
    ):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        errors += [getattr(module, name) for name in names if hasattr(module, name)]
    return tuple(errors)


NETWORK_ERRORS = _network_errors()


class DownloadError(Exception):
    """A failure the user can fix; its message is the one line printed to stderr."""


def scrub(text: str, token: str | None) -> str:
    """The text on one line, with the token (and anything shaped like one) masked."""
    if token:
        text = text.replace(token, "***")
    text = TOKEN_PATTERN.sub("hf_***", text)
    return " ".join(text.split())


def explain(error: BaseException, repo_id: str, filename: str | None, dest: str) -> str | None:
    """What went wrong and what to do, for a hub error; None for an error this cannot explain.

    filename is the file asked for (None for a whole snapshot); dest is where the user should
    copy the files by hand when this machine cannot reach the hub.
    """
    page = f"https://huggingface.co/{repo_id}"
    what = f"{filename} from {repo_id}" if filename else repo_id
    # Order matters: GatedRepoError is a RepositoryNotFoundError, LocalEntryNotFoundError an
    # EntryNotFoundError, and the remote-entry and repository errors are HfHubHTTPErrors.
    if isinstance(error, GatedRepoError):
        return (
            f"{repo_id} is gated and this account has no access to it: accept the licence on "
            f"{page} while logged in, then run `hf auth login` or pass --hf_token (or set HF_TOKEN)"
        )
    if isinstance(error, NETWORK_ERRORS):
        return (
            f"cannot reach the Hugging Face hub to download {what} "
            f"({type(error).__name__}): run this on a machine with internet access and copy "
            f"the result to {dest}"
        )
    if isinstance(error, EntryNotFoundError):
        return (
            f"{filename} is not in {repo_id}: check --ae_path against the files listed at "
            f"{page}/tree/main"
        )
    if isinstance(error, RepositoryNotFoundError):
        return (
            f"the hub refused access to {repo_id}: either it does not exist (check --repo_id) "
            f"or the token was refused; create a read token at {TOKENS_PAGE} and pass it with "
            "--hf_token or HF_TOKEN"
        )
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            return (
                f"the hub refused the token (HTTP {status}) while downloading {what}: create a "
                f"read token at {TOKENS_PAGE} and pass it with --hf_token or HF_TOKEN"
            )
        return f"the hub failed to serve {what}: {error}"
    if isinstance(error, HFValidationError):
        return f"{repo_id!r} is not a valid repository id (check --repo_id): {error}"
    return None


def download_autoencoder(repo_id: str, ae_path: str, token: str | None, out: Path) -> None:
    """Fetch ae_path from repo_id through the hub cache and place it at out."""
    try:
        cached = hf_hub_download(repo_id, filename=ae_path, token=token)
    except Exception as e:
        message = explain(e, repo_id, ae_path, dest=str(out))
        if message is None:
            raise
        raise DownloadError(message) from e
    try:
        place(Path(cached), out)
    except OSError as e:
        raise DownloadError(f"cannot write {out}: {e}") from e


def place(src: Path, out: Path) -> None:
    """Put src at out: a hard link when the filesystem allows (no second copy), else a copy."""
    src = src.resolve()  # the cache's snapshot entry is a symlink to the blob
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and out.samefile(src):
        return
    partial = out.with_name(out.name + ".partial")
    partial.unlink(missing_ok=True)
    try:
        os.link(src, partial)
    except OSError:  # another filesystem, or one without hard links
        shutil.copyfile(src, partial)
    os.replace(partial, out)  # a reader never sees a half-written file


def check_autoencoder(path: Path, flavor: str) -> None:
    """Load path into the autoencoder of flavor, so a wrong file fails now."""
    try:
        load_ae(path, flux_configs[flavor].autoencoder_params)
    except ValueError as e:
        raise DownloadError(str(e)) from e
    except SafetensorError as e:
        raise DownloadError(f"{path} is not a readable safetensors file ({e})") from e


def download_encoders(root: Path, token: str | None) -> dict[str, Path]:
    """Fetch the T5 and CLIP encoders into root/t5 and root/clip; returns kind -> folder."""
    folders = {}
    for kind, repo_id in (("t5", T5_HUB_ID), ("clip", CLIP_HUB_ID)):
        folder = root / kind
        try:
            snapshot_download(repo_id, local_dir=folder, allow_patterns=ENCODER_FILES, token=token)
            if not any(folder.glob("*.safetensors")):
                snapshot_download(
                    repo_id, local_dir=folder, allow_patterns=ENCODER_BIN_WEIGHTS, token=token
                )
        except Exception as e:
            message = explain(e, repo_id, None, dest=str(folder))
            if message is None:
                raise
            raise DownloadError(message) from e
        folders[kind] = folder.resolve()
    return folders


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(
        description="Download the FLUX.1 autoencoder and, optionally, the T5/CLIP encoders."
    )
    parser.add_argument(
        "--repo_id", default="black-forest-labs/FLUX.1-dev", help="hub repository of ae_path"
    )
    parser.add_argument("--ae_path", default="ae.safetensors", help="file name in the repository")
    parser.add_argument(
        "--hf_token", default=None, help="hub token (default: HF_TOKEN, else the stored login)"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"where to put it (default {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--flavor",
        default="flux-dev",
        choices=sorted(flux_configs),
        help="model flavor whose autoencoder the file must load into",
    )
    parser.add_argument(
        "--encoders",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"also fetch {T5_HUB_ID} into DIR/t5 and {CLIP_HUB_ID} into DIR/clip",
    )
    parser.add_argument(
        "--skip_ae", action="store_true", help="do not fetch the autoencoder (with --encoders)"
    )
    args = parser.parse_args(argv)
    if args.skip_ae and args.encoders is None:
        parser.error("--skip_ae leaves nothing to do without --encoders DIR")
    if args.ae_path.startswith(("/", "./", "../", "~")) or "\\" in args.ae_path:
        parser.error(
            f"--ae_path {args.ae_path} looks like a local path, but it is the file's name in "
            f"{args.repo_id} (e.g. ae.safetensors): to put the file there, give "
            f"--out {args.ae_path}"
        )
    for name, path in (("--out", args.out.parent), ("--encoders", args.encoders)):
        if path is not None and path.exists() and not path.is_dir():
            parser.error(f"{name}: {path} is a file, not a folder")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the downloads; returns the exit status (0 done, 1 a failure explained on stderr)."""
    args = parse_args(argv)
    token = args.hf_token or os.environ.get("HF_TOKEN") or None
    try:
        if not args.skip_ae:
            download_autoencoder(args.repo_id, args.ae_path, token, args.out)
            check_autoencoder(args.out, args.flavor)
            print(f"loaded {args.out.resolve()} into the {args.flavor} autoencoder; it is ready")
        if args.encoders is not None:
            folders = download_encoders(args.encoders, token)
            t5, clip = folders["t5"], folders["clip"]
            print(f"T5 encoder in {t5}, CLIP encoder in {clip}; point the training TOML at them:")
            print(f'[encoder]\nt5_encoder = "{t5}"\nclip_encoder = "{clip}"')
    except DownloadError as e:
        print(f"error: {scrub(str(e), token)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
