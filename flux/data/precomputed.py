"""The precomputed cache: what the frozen encoders make of a dataset, written once by
`python -m flux.scripts.precompute` and read by the `precomputed` source instead of images.

A cache is a folder:
    plan.json                 what is being made: settings, source, sample count, shard size
    texts.safetensors     T5 and CLIP encodings of a few fixed texts: the empty caption
                          (caption dropout) and the validation prompts
    shard-*.safetensors   N samples: t5 (N, L, D_t5), clip (N, D_clip), moments (N, 2C, h, w),
                          and the samples' keys and captions (JSON) in the file's metadata;
                          with aspect buckets (flux.data.buckets) of several sizes, instead
                          of moments: moments.WxH (N_WxH, 2C, H/8, W/8) of each bucket's
                          samples in order, and each sample's bucket (metadata "buckets")
    shard-*.sum.json      the shard's size and checksum (flux.checksums), written once the
                          shard was read back and found whole
    manifest.json         written last: the plan, and each shard's sample count, size and
                          checksum; a cache without it is unfinished and is not read

Tensors are stored in the encoders' dtype (encoder_dtype), exactly as the online encoders
return them: bfloat16 in the full-size configs (T5 at 256-512 tokens is most of a cache),
float32 in the debug one. So training on the cache computes what training on the images
would (up to the last bits of batched matmuls). The latent moments (mean and logvar) are
stored rather than a latent, so each step still samples its own posterior noise.
Each file is written under a temporary name and renamed when complete: a shard exists
whole or not at all.

Checks: training's start-up finds every shard and the text table at the size the manifest
records (a stat per file), and refuses a cache without samples; a shard that cannot be
read later (gone, cut, unreadable header, another sample count) makes its samples skipped
and counted ("unreadable cache shard"), like bad records. Caches made before sizes and
checksums were recorded are read without those checks.
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
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from flux.checksums import read_checksums, write_checksums

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
    buckets: str = "square"  # or the aspect buckets' sizes (Buckets.describe)

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


def sums_path(shard: Path) -> Path:
    return shard.with_name(shard.name.replace(".safetensors", ".sum.json"))


def check_shard(path: Path) -> int:
    """Read a shard back (header, metadata, every tensor's sample count); its sample
    count, or CacheError saying what is wrong."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys, captions = json.loads(meta["keys"]), json.loads(meta["captions"])
            buckets = json.loads(meta.get("buckets", "[]"))
            counts = {name: f.get_slice(name).get_shape()[0] for name in ("t5", "clip")}
            if buckets:  # the rows of moments.WxH are those of bucket WxH
                for bucket in set(buckets):
                    rows = f.get_slice(f"moments.{bucket}").get_shape()[0]
                    if rows != buckets.count(bucket):
                        raise ValueError(f"moments.{bucket} holds {rows} rows")
                counts["moments"] = len(buckets)
            else:
                counts["moments"] = f.get_slice("moments").get_shape()[0]
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise CacheError(f"{path.name} cannot be read ({type(e).__name__}: {e})") from None
    if len({*counts.values(), len(keys), len(captions)}) != 1:
        raise CacheError(f"{path.name} holds unequal sample counts ({counts}, {len(keys)} keys)")
    return counts["t5"]


def seal_shard(path: Path) -> dict[str, Any]:
    """Check a written shard and record its size and checksum beside it; its manifest
    entry {"file", "samples", "bytes", "digest"}."""
    samples = check_shard(path)
    write_checksums(sums_path(path), [path])
    return {"file": path.name, "samples": samples, **read_checksums(sums_path(path))[path.name]}


def shard_entry(path: Path) -> dict[str, Any]:
    """A sealed shard's manifest entry (sealed now if it was not: its writer stopped
    between writing and sealing it)."""
    sums = sums_path(path)
    if not sums.is_file():
        return seal_shard(path)
    entry = read_checksums(sums)[path.name]
    if path.stat().st_size != entry["bytes"]:
        raise CacheError(f"{path.name} is not the size it was written with: delete it, rerun")
    return {"file": path.name, "samples": shard_size(path), **entry}


def is_sealed(path: Path) -> bool:
    """Whether a shard exists whole: sealed at its size, or found whole now (and sealed)."""
    if not path.is_file():
        return False
    try:
        shard_entry(path)
        return True
    except (CacheError, ValueError):
        return False


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
    """The manifest of a finished cache made with `expected`, with samples, its files all
    there at their recorded sizes; CacheError (one line) if not."""
    root = Path(root)
    manifest = read_manifest(root)
    made = CacheSettings(**manifest["settings"])
    differences = made.differences(expected)
    if differences:
        raise CacheError(
            f"{root} was made with other settings: {'; '.join(differences)}. Precompute it "
            "again with this config, or train with the cache's settings"
        )
    if not manifest.get("samples"):
        raise CacheError(
            f"{root} holds no samples (all {manifest.get('skipped', 0)} were skipped when it "
            "was made): precompute it from data with usable samples"
        )
    texts = manifest.get("texts_file", {"file": TEXTS})
    for entry in [texts, *manifest["shards"]]:
        problem = file_problem(root, entry)
        if problem is not None:
            raise CacheError(
                f"{root} is damaged ({problem}): delete {entry['file']} and {MANIFEST}, then "
                f"run the precompute command again (it rewrites only what is missing)"
            )
    return manifest


def file_problem(root: Path, entry: dict[str, Any]) -> str | None:
    """Why a file of the cache is not the one the manifest lists (missing or another size;
    sizes are recorded since checksums were), or None."""
    path = root / entry["file"]
    if not path.is_file():
        return f"{entry['file']} is missing"
    if "bytes" in entry and path.stat().st_size != entry["bytes"]:
        return f"{entry['file']} is {path.stat().st_size} bytes, the manifest says {entry['bytes']}"
    return None


class TextTable:
    """Encodings of a few fixed texts (the empty caption, validation prompts) from a cache."""

    def __init__(self, texts: list[str], t5: torch.Tensor, clip: torch.Tensor):
        self.index = {text: i for i, text in enumerate(texts)}
        self.t5, self.clip = t5, clip  # (K, L, D_t5), (K, D_clip)

    @classmethod
    def read(cls, root: str | Path) -> TextTable:
        path = Path(root) / TEXTS
        try:
            with safe_open(str(path), framework="pt") as f:
                texts = json.loads((f.metadata() or {})["texts"])
                return cls(texts, f.get_tensor("t5"), f.get_tensor("clip"))
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise CacheError(
                f"{path} cannot be read ({type(e).__name__}): delete it and {MANIFEST}, then "
                "run the precompute command again"
            ) from None

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


UNREADABLE = "unreadable cache shard"  # the kind its samples are skipped as


class _Shard:
    def __init__(self, root: Path, entry: dict[str, Any]):
        """The shard of a manifest entry, or CacheError ("unreadable cache shard: ...")."""
        path = root / entry["file"]
        problem = file_problem(root, entry)  # before mapping it: a cut file would crash
        try:
            if problem is None:
                self.file = safe_open(str(path), framework="pt")
                meta = self.file.metadata() or {}
                self.keys: list[str] = json.loads(meta["keys"])
                self.captions: list[str] = json.loads(meta["captions"])
                rows = self.file.get_slice("t5").get_shape()[0]
                # several buckets: moments.WxH each, and each row's bucket
                self.buckets: list[str] = json.loads(meta.get("buckets", "[]"))
                self.rows = bucket_rows(self.buckets)
                if rows != entry["samples"] or len(self.keys) != rows:
                    said = entry["samples"]
                    problem = f"{path.name} holds {rows} samples, the manifest says {said}"
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            problem = f"{path.name} cannot be read ({type(e).__name__})"
        if problem is not None:
            raise CacheError(f"{UNREADABLE}: {problem}")

    def sample(self, row: int) -> CachedSample:
        t5, clip = (self.file.get_slice(name)[row : row + 1][0] for name in ("t5", "clip"))
        if self.buckets:
            moments = self.file.get_slice(f"moments.{self.buckets[row]}")
            at = self.rows[row]
        else:
            moments, at = self.file.get_slice("moments"), row
        return CachedSample(t5, clip, moments[at : at + 1][0], self.captions[row], self.keys[row])


def bucket_rows(buckets: list[str]) -> list[int]:
    """Each row's place among its bucket's rows (the row of its moments.WxH)."""
    seen: dict[str, int] = {}
    places = []
    for bucket in buckets:
        places.append(seen.get(bucket, 0))
        seen[bucket] = places[-1] + 1
    return places


class PrecomputedCache:
    """Random access to the samples of a finished cache, in the order of its manifest."""

    OPEN_SHARDS = 16  # shards kept open: a shuffled epoch jumps between them

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.shards = self.manifest["shards"]
        self.starts = [0]
        for s in self.shards:
            self.starts.append(self.starts[-1] + s["samples"])
        self._open: OrderedDict[int, _Shard] = OrderedDict()
        self._unreadable: dict[int, str] = {}  # shard -> why (its samples are skipped)

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: int) -> CachedSample:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of a cache of {len(self)}")
        s = bisect.bisect_right(self.starts, index) - 1
        if s in self._unreadable:
            raise CacheError(self._unreadable[s])
        if s not in self._open:
            try:
                self._open[s] = _Shard(self.root, self.shards[s])
            except CacheError as e:
                self._unreadable[s] = str(e)
                raise
            if len(self._open) > self.OPEN_SHARDS:
                self._open.popitem(last=False)
        self._open.move_to_end(s)
        try:
            return self._open[s].sample(index - self.starts[s])
        except (SafetensorError, OSError, IndexError) as e:
            self._unreadable[s] = f"{UNREADABLE}: {self.shards[s]['file']} ({type(e).__name__})"
            del self._open[s]
            raise CacheError(self._unreadable[s]) from None

    def __getstate__(self) -> dict[str, Any]:
        # Dataloader workers get a copy without open files; each opens its own.
        return {**self.__dict__, "_open": OrderedDict()}
