"""Validation: a loss runs can be compared on, and images sampled for fixed prompts.

(a) Loss: the first `validation.steps` batches of the held-out set (the same ones every
time), each at the same `loss_timesteps` stratified timesteps t_k = (k + 1/2)/K with the
same noise and no caption dropout, so the number moves only when the model does. It is
logged as validation_metrics/loss, with the loss at each t_k beside it.
(b) Images: the prompts of `validation.sample_prompts`, Euler steps with classifier-free
guidance from fixed noise, saved by rank 0 as <dump_folder>/validation/step_<N>.png, one row
with each prompt under its image.

With [ema] enabled, both are made for the average of the weights too (or instead:
ema.validation), which is swapped into the model for the duration: its loss is logged as
validation_metrics/ema_loss (and ema_loss_t...), its images saved under validation/ema/.

Both run forward only, inside parallelize.forward_only, so FSDP units are resharded after
and a checkpoint saved right after validation sees the usual sharded parameters; and on
whole sequences, inside context_parallel.whole_sequence (every rank of a context-parallel
group computes the same).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.components.validate import BaseValidator
from torchtitan.distributed import ParallelDims
from torchtitan.distributed import utils as dist_utils
from torchtitan.tools.logging import logger

from flux.data.dataloader import CaptionedImageLoader
from flux.data.dataset import held_out_seed, split_seed
from flux.ema import WeightAverage
from flux.flow import FluxPreprocessor, flow_matching_loss
from flux.generate import SampleSettings, generate, image_grid
from flux.parallel.context_parallel import whole_sequence
from flux.parallel.parallelize import forward_only
from flux.resilience import Skips, skip_counts
from flux.sampling import Streams


def stratified_timesteps(count: int) -> torch.Tensor:
    """(count,) midpoints of count equal intervals of (0, 1)."""
    return (torch.arange(count, dtype=torch.float32) + 0.5) / count


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
    sampling: SampleSettings  # the images sampled for the prompts
    seed: int  # the run's data seed; held-out draws derive from it
    folder: Path  # where the image grids go
    weights: tuple[str, ...] = ("raw",)  # "raw" and/or "ema" (the average; flux.ema)


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
        """After the first step (a baseline to compare with) and every `freq` steps."""
        return step == 1 or step % self.settings.freq == 0

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
        )

    def validate(self, model_parts: list[nn.Module], step: int) -> None:
        """Validate the weights the settings name: the model's, the average's, or both."""
        for weights in self.settings.weights:
            average = self.average if weights == "ema" else None
            if weights == "ema" and (average is None or not average.started):
                logger.info(f"validate step: {step:2}  the EMA has not started: not validated")
                continue
            with average.swapped_in() if average is not None else nullcontext():
                self.validate_weights(model_parts, step, weights)

    @torch.no_grad()
    def validate_weights(self, model_parts: list[nn.Module], step: int, weights: str) -> None:
        model = model_parts[0]
        model.eval()
        with forward_only(model), whole_sequence(model):
            losses, skips = self.loss(model)
            images = self.sample(model)
        model.train()
        mean = losses.mean()
        if self.parallel_dims.dp_enabled:
            batch_mesh = self.parallel_dims.get_mesh("batch")
            per_t = [dist_utils.dist_mean(v, batch_mesh) for v in losses]
            loss = dist_utils.dist_mean(mean, batch_mesh)
        else:
            per_t, loss = losses.tolist(), mean.item()
        times = stratified_timesteps(len(per_t)).tolist()
        name = "ema_loss" if weights == "ema" else "loss"
        extra = {f"validation_metrics/{name}_t{t:.2f}": v for t, v in zip(times, per_t)}
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
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            self.save_grid(images, step, "ema" if weights == "ema" else "")

    def loss(self, model: nn.Module) -> tuple[torch.Tensor, Skips]:
        """(K,) mean loss over the held-out batches at each stratified timestep, and what
        this rank's loader skipped and gave for them."""
        assert self.preprocess is not None, "FluxTrainer attaches the encoders"
        s = self.settings
        times = stratified_timesteps(s.loss_timesteps).to(self.device)
        totals = torch.zeros(len(times), device=self.device)
        loader = self.loader()
        iterator = iter(loader)
        used = 0
        for _ in range(s.steps):
            batch = next(iterator)
            used += len(batch["captions"])
            streams = Streams.of(held_out_seed(s.seed), 0, batch["keys"], self.device)
            encoded = self.preprocess.encode(batch, 0.0, streams)
            noise = streams.randn(tuple(encoded.x0.shape[1:]), self.device)
            for k, t in enumerate(times):
                t_batch = t.expand(encoded.x0.shape[0])
                flow = self.preprocess.flow(encoded, t_batch, noise)
                totals[k] += flow_matching_loss(model, flow).detach()
        return totals / s.steps, Skips(skip_counts(loader), used)

    def sample(self, model: nn.Module) -> torch.Tensor:
        """Every rank samples the same prompts (FSDP needs every rank in each forward)."""
        pre = self.preprocess
        assert pre is not None, "FluxTrainer attaches the encoders"
        assert pre.autoencoder is not None, "FluxPreprocessor keeps the decoder to validate"
        t5, clip = pre.text_encoders()  # with precomputed data, maybe the cache's encodings
        return generate(
            model,
            t5,
            clip,
            pre.autoencoder,
            list(self.settings.sample_prompts),
            self.settings.sampling,
            self.device,
            pre.settings.guidance_embed,
        )

    def save_grid(self, images: torch.Tensor, step: int, subfolder: str = "") -> Path:
        grid, info = image_grid(images, list(self.settings.sample_prompts))
        folder = self.settings.folder / subfolder
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step_{step:06d}.png"
        grid.save(path, pnginfo=info)
        logger.info(f"validation images of step {step}: {path}")
        return path
