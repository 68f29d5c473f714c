"""The precomputed cache: what the frozen encoders make of a dataset, written once by
`python -m flux.scripts.precompute` and read by the `precomputed` source instead of images.

A cache is a folder:
    plan.json                 what is being made: settings, source, sample count, shard size
    texts.safetensors     T5 and CLIP encodings of a few fixed texts: the empty caption
                          (caption dropout) and the validation prompts
    shard-*.safetensors   N samples: t5 (N, L, D_t5), clip (N, D_clip), moments (N, 2C, h, w),
                          and the samples' keys and captions (JSON) in the file's metadata
    manifest.json         written last: the plan and the list of shards; a cache without it
                          is unfinished and is not read

Tensors are stored in the encoders' dtype (encoder_dtype), exactly as the online encoders
return them: bfloat16 in the full-size configs (T5 at 256-512 tokens is most of a cache),
float32 in the debug one. So training on the cache computes what training on the images
would (up to the last bits of batched matmuls). The latent moments (mean and logvar) are
stored rather than a latent, so each step still samples its own posterior noise.
Each file is written under a temporary name and renamed when complete: a shard exists
whole or not at all.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "flux-precomputed/1"
PLAN, MANIFEST, TEXTS = "plan.json", "manifest.json", "texts.safetensors"
TENSORS = ("t5", "clip", "moments")
PRECOMPUTE_HINT = "python -m flux.scripts.precompute --output DIR --job.config_file CONFIG"


class CacheError(ValueError):
    """A cache folder that cannot be used as asked; the message says why and what to do."""


@dataclass(frozen=True)
class CacheSettings:
    """What a cache's tensors depend on; training refuses a cache made with other ones."""

    t5_encoder: str
    clip_encoder: str
    max_t5_encoding_len: int
    encoder_dtype: str
    img_size: int
    autoencoder_sha256: str
    latent_channels: int

    def differences(self, other: CacheSettings) -> list[str]:
        """'name: ours vs theirs' for each setting that differs."""
        ours, theirs = dataclasses.asdict(self), dataclasses.asdict(other)
        return [
            f"{name} {ours[name]!r} (this run: {theirs[name]!r})"
            if name != "autoencoder_sha256"
            else "autoencoder (other weights)"
            for name in ours
            if ours[name] != theirs[name]
        ]


@dataclass
class CachedSample:
    """One sample of a cache: the encoders' outputs for its caption and image."""

    t5: torch.Tensor  # (L, D_t5)
    clip: torch.Tensor  # (D_clip,)
    moments: torch.Tensor  # (2C, h, w): mean and logvar of the latent posterior
    caption: str
    key: str  # the key of the sample in its source (its random streams are named by it)


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# -- writing ---------------------------------------------------------------------------------
def _publish(tmp: Path, path: Path) -> None:
    """Make a fully written temporary file visible under its name, durably."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # several processes may write it
    tmp.write_text(json.dumps(value, indent=1))
    _publish(tmp, path)


def write_shard(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any], tmp_suffix: str = ""
) -> None:
    """One safetensors file: tensors, and metadata values as JSON strings."""
    tmp = path.with_name(f"{path.name}.tmp{tmp_suffix}")
    meta = {k: json.dumps(v) for k, v in metadata.items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors makes it private; a cache is often shared
    _publish(tmp, path)


def shard_metadata(path: Path) -> dict[str, Any]:
    """The metadata a shard was written with (its header only is read)."""
    with safe_open(str(path), framework="pt") as f:
        return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}


def shard_size(path: Path) -> int:
    with safe_open(str(path), framework="pt") as f:
        return f.get_slice("t5").get_shape()[0]


# -- reading ---------------------------------------------------------------------------------
def read_manifest(root: str | Path) -> dict[str, Any]:
    """The manifest of a finished cache; CacheError saying what is wrong otherwise."""
    root = Path(root)
    manifest, plan = root / MANIFEST, root / PLAN
    if not manifest.is_file():
        if plan.is_file():
            shards = len(list(root.glob("shard-*.safetensors")))
            raise CacheError(
                f"{root} is an unfinished cache ({shards} shards written): run the same "
                "precompute command again to finish it"
            )
        raise CacheError(
            f"{root} is not a precomputed cache (no {MANIFEST}): make one with `{PRECOMPUTE_HINT}`"
        )
    value = json.loads(manifest.read_text())
    if value.get("format") != FORMAT:
        raise CacheError(
            f"{root} holds a cache of format {value.get('format')!r}, not {FORMAT!r}: remake it"
        )
    return value


def check_cache(root: str | Path, expected: CacheSettings) -> dict[str, Any]:
    """The manifest of a finished cache made with `expected`; CacheError (one line) if not."""
    manifest = read_manifest(root)
    made = CacheSettings(**manifest["settings"])
    differences = made.differences(expected)
    if differences:
        raise CacheError(
            f"{root} was made with other settings: {'; '.join(differences)}. Precompute it "
            "again with this config, or train with the cache's settings"
        )
    return manifest


class TextTable:
    """Encodings of a few fixed texts (the empty caption, validation prompts) from a cache."""

    def __init__(self, texts: list[str], t5: torch.Tensor, clip: torch.Tensor):
        self.index = {text: i for i, text in enumerate(texts)}
        self.t5, self.clip = t5, clip  # (K, L, D_t5), (K, D_clip)

    @classmethod
    def read(cls, root: str | Path) -> TextTable:
        with safe_open(str(Path(root) / TEXTS), framework="pt") as f:
            texts = json.loads((f.metadata() or {})["texts"])
            return cls(texts, f.get_tensor("t5"), f.get_tensor("clip"))

    def to(self, device: torch.device) -> TextTable:
        return TextTable(list(self.index), self.t5.to(device), self.clip.to(device))

    def has(self, texts: list[str]) -> bool:
        return all(t in self.index for t in texts)

    def lookup(self, kind: str, texts: list[str]) -> torch.Tensor:
        """texts -> T5 (B, L, D_t5) or CLIP (B, D_clip), as the encoder would return them."""
        missing = [t for t in texts if t not in self.index]
        if missing:
            raise KeyError(f"text {missing[0]!r} is not in the cache's table of encoded texts")
        table = self.t5 if kind == "t5" else self.clip
        return table[[self.index[t] for t in texts]]


class _Shard:
    def __init__(self, path: Path):
        self.file = safe_open(str(path), framework="pt")
        meta = self.file.metadata() or {}
        self.keys: list[str] = json.loads(meta["keys"])
        self.captions: list[str] = json.loads(meta["captions"])

    def sample(self, row: int) -> CachedSample:
        t5, clip, moments = (self.file.get_slice(name)[row : row + 1][0] for name in TENSORS)
        return CachedSample(t5, clip, moments, self.captions[row], self.keys[row])


class PrecomputedCache:
    """Random access to the samples of a finished cache, in the order of its manifest."""

    OPEN_SHARDS = 16  # shards kept open: a shuffled epoch jumps between them

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        shards = self.manifest["shards"]
        self.files = [self.root / s["file"] for s in shards]
        self.starts = [0]
        for s in shards:
            self.starts.append(self.starts[-1] + s["samples"])
        self._open: OrderedDict[int, _Shard] = OrderedDict()

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: int) -> CachedSample:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of a cache of {len(self)}")
        s = bisect.bisect_right(self.starts, index) - 1
        if s not in self._open:
            self._open[s] = _Shard(self.files[s])
            if len(self._open) > self.OPEN_SHARDS:
                self._open.popitem(last=False)
        self._open.move_to_end(s)
        return self._open[s].sample(index - self.starts[s])

    def __getstate__(self) -> dict[str, Any]:
        # Dataloader workers get a copy without open files; each opens its own.
        return {**self.__dict__, "_open": OrderedDict()}
