"""Validation: a loss runs can be compared on, and images sampled for fixed prompts.

(a) Loss, by `validation.metric`. "loss": the first `validation.steps` batches of the
held-out set (the same ones every time), each at the same `loss_timesteps` stratified
timesteps t_k = (k + 1/2)/K with the same noise and no caption dropout, so the number
moves only when the model does. "mlperf" (MLPerf Training's FLUX.1 benchmark): sample i
of the first `validation.samples` of the set, in its order, at t = (i mod K)/K only, with
its own fixed noise; the metric is the mean over the K timesteps of each one's mean loss.
Rank r of W evaluates samples r, r + W, ..., and the sums and counts are added over the
ranks, so the number does not depend on the ranks or the batch size. Either is logged as
validation_metrics/loss, with the loss at each timestep beside it. A loss at or below
`validation.target_loss` ends the run (the trainer logs the time to train).
(b) Images: the prompts of `validation.sample_prompts`, Euler steps with classifier-free
guidance from fixed noise, at each of `validation.sample_sizes` (scaled to the run's
resolution; by default one square), saved by rank 0 as <dump_folder>/validation/step_<N>.png:
a row per size, a column per prompt, each image over its caption.

With [ema] enabled, both are made for the average of the weights too (or instead:
ema.validation), which is swapped into the model for the duration: its loss is logged as
validation_metrics/ema_loss (and ema_loss_t...), its images saved under validation/ema/.

Both run forward only, inside parallelize.forward_only, so FSDP units are resharded after
and a checkpoint saved right after validation sees the usual sharded parameters; on
whole sequences, inside context_parallel.whole_sequence (every rank of a context-parallel
group computes the same); and without recompiling compiled blocks or the compiled
autoencoder encoder for validation's shapes (without_recompiling).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.components.validate import BaseValidator
from torchtitan.distributed import ParallelDims
from torchtitan.distributed import utils as dist_utils
from torchtitan.tools.logging import logger

from flux.data.buckets import Buckets
from flux.data.buckets import name as bucket_name
from flux.data.dataloader import CaptionedImageLoader, batch_bucket, collate
from flux.data.dataset import CaptionedImages, held_out_seed, split_seed
from flux.data.skips import BadSample
from flux.data.streams import DataError
from flux.ema import WeightAverage
from flux.flow import FluxPreprocessor, flow_matching_loss, flow_matching_losses
from flux.generate import SampleSettings, generate, image_grid
from flux.parallel.context_parallel import whole_sequence
from flux.parallel.parallelize import forward_only
from flux.resilience import Skips, skip_counts
from flux.sampling import Streams


@contextmanager
def without_recompiling() -> Iterator[None]:
    """Compiled code runs where its graphs fit, and eagerly where they would have to be
    compiled again. Validation's shapes and mode are not training's (its batch and image
    sizes, no gradients, as many sample counts as it has prompts): recompiling every block
    type for each (minutes at full size, and torch's cap on recompiles) costs more than
    running them eagerly for a few batches."""
    with torch.compiler.set_stance("eager_on_recompile"):
        yield


def stratified_timesteps(count: int) -> torch.Tensor:
    """(count,) midpoints of count equal intervals of (0, 1)."""
    return (torch.arange(count, dtype=torch.float32) + 0.5) / count


def mlperf_timestep_classes(indices: torch.Tensor, count: int) -> torch.Tensor:
    """The timestep class k = i mod count of each held-out sample i (its t is k / count:
    count equidistant timesteps in [0, (count - 1)/count], assigned to the samples in turn)."""
    return indices % count


@dataclass
class TimestepLosses:
    """Per-sample losses summed, and samples counted, by timestep class k: (K,) each, over
    one rank's samples or (after all_reduce) over all of them."""

    sums: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def zeros(cls, count: int, device: torch.device) -> TimestepLosses:
        z = torch.zeros(count, dtype=torch.float64, device=device)
        return cls(z, z.clone())

    def add(self, classes: torch.Tensor, losses: torch.Tensor, weights: torch.Tensor) -> None:
        """Samples of classes (B,) with losses (B,); weights (B,) are 1, or 0 for padding."""
        self.sums.index_add_(0, classes, losses.double() * weights)
        self.counts.index_add_(0, classes, weights.double())

    def all_reduce(self, group: Any) -> None:
        """Sums and counts over the ranks of group (every rank calls it)."""
        for t in (self.sums, self.counts):
            torch.distributed.all_reduce(t, group=group)

    def per_timestep(self) -> list[float]:
        """Each class's mean loss (nan where it has no sample)."""
        return (self.sums / self.counts).tolist()

    def mean(self) -> float:
        """The metric: the mean over the classes with samples of each one's mean loss."""
        present = self.counts > 0
        if not present.any():
            raise DataError("validation: no usable held-out sample: nothing to average")
        return (self.sums[present] / self.counts[present]).mean().item()


def time_to_train_line(
    loss: float,
    target: float,
    step: int,
    samples: int,
    seconds: float,
    devices: int,
    device_type: str,
) -> str:
    """The line a run that reached validation.target_loss ends with."""
    kind = "GPU" if device_type == "cuda" else f"{device_type} process"
    kind += ("es" if kind.endswith("s") else "s") * (devices != 1)
    return (
        f"time to train: validation loss {loss:.4f} <= target {target} at step {step}: "
        f"{samples:,} training samples seen, {seconds:.1f} s ({seconds / 60:.2f} min) wall "
        f"time on {devices} {kind}"
    )


@dataclass(frozen=True)
class ValidationSettings:
    """What validation reads, computes and writes ([validation], with the run's seed)."""

    dataset: str
    dataset_path: str | None
    img_size: int
    local_batch_size: int
    steps: int  # held-out batches
    freq: int  # validate every freq steps (and after step 1)
    loss_timesteps: int
    sample_prompts: tuple[str, ...]
    sampling: SampleSettings  # the images sampled for the prompts (at its width × height,
    # or, with sample_sizes, at each of them)
    seed: int  # the run's data seed; held-out draws derive from it
    folder: Path  # where the image grids go
    weights: tuple[str, ...] = ("raw",)  # "raw" and/or "ema" (the average; flux.ema)
    metric: str = "loss"  # or "mlperf" (see the module's docstring)
    samples: int = -1  # mlperf: the first N held-out samples (-1: the whole set)
    target_loss: float = 0.0  # stop at or below it (0: never)
    every_samples: int = 0  # validate every N training samples (0: every freq steps)
    samples_per_step: int = 1  # training samples per optimizer step (the global batch)
    buckets: Buckets | None = None  # the held-out images' sizes (None: img_size squares)
    sample_sizes: tuple[tuple[int, int], ...] = ()  # (width, height) of each grid row

    def image_sizes(self) -> tuple[tuple[int, int], ...]:
        """(width, height) of each row of sampled images."""
        return self.sample_sizes or ((self.sampling.width, self.sampling.height),)


class FluxValidator(BaseValidator):
    def __init__(
        self,
        settings: ValidationSettings,
        dp_world_size: int,
        dp_rank: int,
        parallel_dims: ParallelDims,
        metrics_processor: MetricsProcessor,
    ):
        if settings.steps < 1:
            raise ValueError(
                f"validation.steps {settings.steps}: give the number of held-out batches "
                "(>= 1); the shapes source never runs out, so -1 cannot mean 'all'"
            )
        # (BaseValidator's own state is the JobConfig its should_validate reads; this class
        # overrides that and reads its settings instead.)
        self.settings = settings
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.parallel_dims = parallel_dims
        self.metrics_processor = metrics_processor
        self.preprocess: FluxPreprocessor | None = None  # attached by FluxTrainer
        self.device = torch.device("cpu")
        self.average: WeightAverage | None = None
        self.latest: dict[str, float] = {}  # weights -> loss, of the latest validation
        self._held_out: CaptionedImages | None = None  # mlperf: read by index

    def attach(
        self,
        preprocess: FluxPreprocessor,
        device: torch.device,
        average: WeightAverage | None = None,
    ) -> None:
        """The trainer's frozen encoders (built once, shared with training), and the
        average of the weights it keeps, if any."""
        self.preprocess, self.device, self.average = preprocess, device, average

    def should_validate(self, step: int) -> bool:
        # torchtitan's loop validates after it saves the step's checkpoint; FluxTrainer runs
        # validation inside the step instead (see is_due), so the loop is told no.
        return False

    def is_due(self, step: int) -> bool:
        """Each time the training samples seen pass a multiple of every_samples; without it,
        after the first step (a baseline to compare with) and every `freq` steps."""
        s = self.settings
        if s.every_samples:
            seen, before = step * s.samples_per_step, (step - 1) * s.samples_per_step
            return seen // s.every_samples > before // s.every_samples
        return step == 1 or step % s.freq == 0

    def reached_target(self) -> float | None:
        """The latest validation loss if it is at or below target_loss: the raw weights',
        or the average's when only it is validated; else None."""
        loss = self.latest.get("raw", self.latest.get("ema"))
        target = self.settings.target_loss
        return loss if target > 0 and loss is not None and loss <= target else None

    def loader(self) -> CaptionedImageLoader:
        s = self.settings
        return CaptionedImageLoader(
            s.dataset,
            s.img_size,
            s.local_batch_size,
            dp_rank=self.dp_rank,
            dp_world_size=self.dp_world_size,
            seed=split_seed("validation", s.dataset, s.seed),
            path=s.dataset_path,
            buckets=s.buckets,
        )

    def validate(self, model_parts: list[nn.Module], step: int) -> None:
        """Validate the weights the settings name: the model's, the average's, or both."""
        self.latest = {}
        for weights in self.settings.weights:
            average = self.average if weights == "ema" else None
            if weights == "ema" and (average is None or not average.started):
                logger.info(f"validate step: {step:2}  the EMA has not started: not validated")
                continue
            with average.swapped_in() if average is not None else nullcontext():
                self.latest[weights] = self.validate_weights(model_parts, step, weights)

    @torch.no_grad()
    def validate_weights(self, model_parts: list[nn.Module], step: int, weights: str) -> float:
        """Validate the model's current weights; returns the loss."""
        model = model_parts[0]
        model.eval()
        with forward_only(model), whole_sequence(model), without_recompiling():
            if self.settings.metric == "mlperf":
                by_class, skips = self.mlperf_loss(model)
                loss, per_t = by_class.mean(), by_class.per_timestep()
                times = [k / len(per_t) for k in range(len(per_t))]
            else:
                loss, per_t, skips, per_bucket = self.stratified_loss(model)
                times = stratified_timesteps(len(per_t)).tolist()
            images = self.sample(model) if self.settings.sample_prompts else None
        model.train()
        name = "ema_loss" if weights == "ema" else "loss"
        extra = {f"validation_metrics/{name}_t{t:.2f}": v for t, v in zip(times, per_t)}
        if self.settings.metric != "mlperf" and len(per_bucket) > 1:
            extra |= {f"validation_metrics/{name}_{b}": v for b, v in per_bucket.items()}
            logger.info(
                f"validate step: {step:2}  {name} by bucket: "
                + ", ".join(f"{b} {v:.4f}" for b, v in per_bucket.items())
            )
        batch_mesh = self.parallel_dims.get_optional_mesh("batch")
        skipped = Skips.gather(
            skips.counts, skips.used, batch_mesh.get_group() if batch_mesh is not None else None
        )
        if skipped.total:
            logger.warning(f"validation of step {step}: {skipped.line()}")
        if weights == "ema":  # torchtitan's log_validation names the raw weights' metrics
            self.metrics_processor.logger.log({"validation_metrics/ema_loss": loss} | extra, step)
            logger.info(f"validate step: {step:2}  ema loss: {loss:7.4f}")
        else:
            extra |= skipped.metrics("validation_metrics/")
            self.metrics_processor.log_validation(loss, step, extra_metrics=extra)
        rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        if images is not None and rank0:
            self.save_grid(images, step, "ema" if weights == "ema" else "")
        return loss

    def stratified_loss(
        self, model: nn.Module
    ) -> tuple[float, list[float], Skips, dict[str, float]]:
        """The "loss" metric over the data-parallel ranks, each timestep's, this rank's
        skips, and the loss of each bucket that had held-out batches (WxH -> loss)."""
        losses, skips, by_bucket = self.loss(model)
        mean = losses.mean()
        if self.parallel_dims.dp_enabled:
            batch_mesh = self.parallel_dims.get_mesh("batch")
            torch.distributed.all_reduce(by_bucket, group=batch_mesh.get_group())
        sums, counts = by_bucket.tolist()
        sizes = self.buckets().sizes
        per_bucket = {bucket_name(b): x / n for b, x, n in zip(sizes, sums, counts) if n}
        if self.parallel_dims.dp_enabled:
            per_t = [dist_utils.dist_mean(v, batch_mesh) for v in losses]
            return dist_utils.dist_mean(mean, batch_mesh), per_t, skips, per_bucket
        return mean.item(), losses.tolist(), skips, per_bucket

    def buckets(self) -> Buckets:
        s = self.settings
        return s.buckets if s.buckets is not None else Buckets.square(s.img_size)

    def held_out(self) -> CaptionedImages:
        """The held-out set, read by index (the mlperf metric)."""
        if self._held_out is None:
            s = self.settings
            seed = split_seed("validation", s.dataset, s.seed)
            self._held_out = CaptionedImages(s.dataset, s.img_size, seed=seed, path=s.dataset_path)
        return self._held_out

    def held_out_size(self) -> int:
        """The samples the mlperf metric evaluates: the first `samples`, or the whole set."""
        size, wanted = self.held_out().size(), self.settings.samples
        if wanted == -1:
            if size is None:
                raise ValueError(
                    f"validation.samples = -1 but {self.settings.dataset} has no end: give a "
                    "number of samples"
                )
            return size
        return wanted if size is None else min(wanted, size)

    def mlperf_loss(self, model: nn.Module) -> tuple[TimestepLosses, Skips]:
        """The "mlperf" metric's sums and counts by timestep, over all data-parallel ranks,
        and what this rank skipped and used.

        Every rank runs the same number of forwards (FSDP gathers in each): a rank's short
        or empty last batch is filled with its first usable sample, weighted 0."""
        assert self.preprocess is not None, "FluxTrainer attaches the encoders"
        s, data = self.settings, self.held_out()
        count = s.loss_timesteps
        n, w, b = self.held_out_size(), self.dp_world_size, s.local_batch_size
        mine = list(range(self.dp_rank, n, w))
        batches = math.ceil(math.ceil(n / w) / b)  # the same on every rank
        by_class = TimestepLosses.zeros(count, self.device)
        skipped: Counter[str] = Counter()
        filler = None
        for j in range(batches):
            samples, indices = [], []
            for i in mine[j * b : (j + 1) * b]:
                try:
                    samples.append(data.sample(i))
                except BadSample as e:
                    skipped[e.kind] += 1
                    continue
                indices.append(i)
            weights = [1.0] * len(samples)
            if filler is None and samples:
                filler = samples[0]
            if not samples:
                filler = filler if filler is not None else self.first_usable(mine)
                samples, indices, weights = [filler], [0], [0.0]
            batch = collate(samples)
            streams = Streams.of(held_out_seed(s.seed), 0, batch["keys"], self.device)
            encoded = self.preprocess.encode(batch, 0.0, streams)
            noise = streams.randn(tuple(encoded.x0.shape[1:]), self.device)
            classes = mlperf_timestep_classes(torch.tensor(indices, device=self.device), count)
            flow = self.preprocess.flow(encoded, classes.float() / count, noise)
            losses = flow_matching_losses(model, flow)
            by_class.add(classes, losses, torch.tensor(weights, device=self.device))
        batch_mesh = self.parallel_dims.get_optional_mesh("batch")
        if batch_mesh is not None and batch_mesh.size() > 1:
            by_class.all_reduce(batch_mesh.get_group())
        used = len(mine) - sum(skipped.values())
        return by_class, Skips(skipped, used)

    def first_usable(self, indices: list[int]) -> Any:
        """A usable held-out sample to fill an empty batch with (its loss weighs 0)."""
        data = self.held_out()
        for i in [*indices, *range(self.held_out_size())]:
            try:
                return data.sample(i)
            except BadSample:
                continue
        raise DataError(f"validation: no usable sample in {self.settings.dataset_path}")

    def loss(self, model: nn.Module) -> tuple[torch.Tensor, Skips, torch.Tensor]:
        """(K,) mean loss over the held-out batches at each stratified timestep, what this
        rank's loader skipped and gave for them, and (2, buckets) the sums of the batches'
        losses (their mean over the timesteps) by bucket and the batches."""
        assert self.preprocess is not None, "FluxTrainer attaches the encoders"
        s = self.settings
        times = stratified_timesteps(s.loss_timesteps).to(self.device)
        totals = torch.zeros(len(times), device=self.device)
        sizes = self.buckets().sizes
        by_bucket = torch.zeros(2, len(sizes), device=self.device)
        loader = self.loader()
        iterator = iter(loader)
        used = 0
        for _ in range(s.steps):
            batch = next(iterator)
            used += len(batch["captions"])
            streams = Streams.of(held_out_seed(s.seed), 0, batch["keys"], self.device)
            encoded = self.preprocess.encode(batch, 0.0, streams)
            noise = streams.randn(tuple(encoded.x0.shape[1:]), self.device)
            batch_losses = torch.zeros(len(times), device=self.device)
            for k, t in enumerate(times):
                t_batch = t.expand(encoded.x0.shape[0])
                flow = self.preprocess.flow(encoded, t_batch, noise)
                batch_losses[k] = flow_matching_loss(model, flow).detach()
            totals += batch_losses
            b = sizes.index(batch_bucket(batch))
            by_bucket[0, b] += batch_losses.mean()
            by_bucket[1, b] += 1
        return totals / s.steps, Skips(skip_counts(loader), used), by_bucket

    def sample(self, model: nn.Module) -> list[torch.Tensor]:
        """The prompts' images at each size: (B, 3, H, W) per size. Every rank samples the
        same prompts (FSDP needs every rank in each forward)."""
        pre, s = self.preprocess, self.settings
        assert pre is not None, "FluxTrainer attaches the encoders"
        assert pre.autoencoder is not None, "FluxPreprocessor keeps the decoder to validate"
        t5, clip = pre.text_encoders()  # with precomputed data, maybe the cache's encodings
        return [
            generate(
                model,
                t5,
                clip,
                pre.autoencoder,
                list(s.sample_prompts),
                replace(s.sampling, width=width, height=height),
                self.device,
                pre.settings.guidance_embed,
            )
            for width, height in s.image_sizes()
        ]

    def save_grid(self, images: list[torch.Tensor], step: int, subfolder: str = "") -> Path:
        grid, info = image_grid(images, list(self.settings.sample_prompts))
        folder = self.settings.folder / subfolder
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step_{step:06d}.png"
        grid.save(path, pnginfo=info)
        logger.info(f"validation images of step {step}: {path}")
        return path
