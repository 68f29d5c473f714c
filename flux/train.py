"""FluxTrainer: torchtitan's Trainer with the rectified-flow training step of FLUX.

    torchrun --nproc_per_node N -m flux.train --job.config_file flux/train_configs/debug_model.toml

Per micro-batch: captions -> (caption dropout) -> T5 token embeddings and CLIP pooled
vector; images -> autoencoder latents (sampled from the posterior) -> packed 2×2 patches x0;
t from the configured sampling; x_t = (1 - t)·x0 + t·noise; the model predicts noise - x0
and the loss is the mean squared error. Randomness (dropout, t, posterior and flow noise)
comes from a generator per sample seeded by (seed, step, the sample's data key): ranks
differ, and a resumed run, with gradient accumulation or on another world size, draws for
each sample exactly what the unbroken run drew.

A step whose loss or gradients are not finite is not applied; SIGTERM/SIGUSR1 stop the run
after the current step with a checkpoint; too much skipped data stops it (flux.resilience).
The end of a run says how much data was skipped and which steps were not applied, and
"Training completed" only when its last step was applied. With [ema], each applied step
may update an average of the weights (flux.ema), checkpointed and validated with them.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torchtitan.components.dataloader import DataloaderExhaustedError
from torchtitan.config import JobConfig
from torchtitan.distributed import utils as dist_utils
from torchtitan.tools.logging import logger
from torchtitan.train import Trainer

from flux import seam
from flux.checkpoint import CheckpointError, FluxCheckpointManager
from flux.config import ConfigError, check_config, parse_config
from flux.data.precomputed import CacheError
from flux.data.streams import DataError
from flux.ema import EMA, build_average
from flux.flow import EncoderError, FlowBatch, flow_matching_loss
from flux.parallel.context_parallel import shard_sequence
from flux.resilience import (
    REQUEUE_EXIT_CODE,
    NonFiniteSteps,
    RunError,
    Skips,
    StopSignals,
    skip_counts,
    step_verdict,
    write_requeue_file,
)
from flux.sampling import Streams
from flux.train_spec import build_preprocessor, ema_settings
from flux.validate import FluxValidator, time_to_train_line


class FluxTrainer(Trainer):
    checkpointer: FluxCheckpointManager  # flux.seam.install has torchtitan build this class
    device: torch.device

    def __init__(self, job_config: JobConfig):
        self.stop_signals = StopSignals()
        self.stop_signals.install()  # before the (long) set-up: a signal then stops at step 1
        self.preempted = False
        self.stop_error: RunError | None = None  # ends the loop without a traceback
        self.nonfinite = NonFiniteSteps(job_config.training.max_nonfinite_steps)
        seam.install()
        super().__init__(job_config)
        if self.device.type == "cpu":
            self.device = torch.device("cpu")  # torchtitan names it cpu:<local rank>
        self.preprocess = build_preprocessor(job_config, self.model_args, self.device)
        assert isinstance(self.checkpointer, FluxCheckpointManager), "flux.seam.install"
        self.checkpointer.attach(self.save_now, plain_layouts=self.parallel_dims.tp_enabled)
        self.ema = build_average(self.model_parts[0], ema_settings(job_config))
        if self.ema is not None:
            self.checkpointer.states[EMA] = self.ema  # saved, loaded and resharded by DCP
        batch_mesh = self.parallel_dims.get_optional_mesh("batch")
        self.dp_rank = batch_mesh.get_local_rank() if batch_mesh is not None else 0
        self.batch_group = batch_mesh.get_group() if batch_mesh is not None else None
        self.images_since_log = 0
        self.samples_used = 0  # by this rank, since this start
        self.flux_validator: FluxValidator | None = None
        self.reached_target = False  # validation.target_loss: the run ends, successfully
        self.clock: tuple[float, int] = (time.perf_counter(), 0)  # (start, step), for time to train
        if job_config.validation.enable:
            assert isinstance(self.validator, FluxValidator)
            self.flux_validator = self.validator
            self.flux_validator.attach(self.preprocess, self.device, self.ema)

    def batch_generator(self, data_iterable: Iterable[Any]) -> Iterator[dict[str, Any]]:
        """Batches of {"images", "captions", "keys"}; counts tokens and loading time."""
        iterator = iter(data_iterable)
        seq_len = self.job_config.training.seq_len
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration as e:
                raise DataloaderExhaustedError() from e
            self.samples_used += len(batch["captions"])
            ntokens = len(batch["captions"]) * seq_len
            self.ntokens_seen += ntokens
            self.metrics_processor.ntokens_since_last_log += ntokens
            self.metrics_processor.data_loading_times.append(time.perf_counter() - start)
            yield batch

    def flow_batch(self, batch: dict[str, Any]) -> FlowBatch:
        """The micro-batch the model sees; with context parallelism, this rank's tokens."""
        streams = Streams.of(
            self.job_config.training.seed_data, self.step, batch["keys"], self.device
        )
        flow = self.preprocess(batch, streams)
        if self.parallel_dims.cp_enabled:
            cp = self.parallel_dims.get_mesh("cp")
            flow = FlowBatch(
                *shard_sequence(flow.inputs, flow.target, cp.get_local_rank(), cp.size())
            )
        return flow

    def save_now(self) -> bool | None:
        """Overrides the checkpoint interval: never while the latest step was not applied,
        always when stopping for a signal; None: as configured."""
        if self.nonfinite.in_streak:
            return False
        return True if self.preempted or self.reached_target else None

    def should_continue_training(self) -> bool:
        stop = self.preempted or self.stop_error is not None or self.reached_target
        return not stop and super().should_continue_training()

    def train_step(self, data_iterator: Iterator[dict[str, Any]]) -> None:  # type: ignore[override]
        """One optimizer step over gradient_accumulation_steps micro-batches, its metrics, and
        validation when due: inside the step, so the step's checkpoint comes after it."""
        if self.clock[1] < 0:  # the first step of this start (after a checkpoint's load)
            self.clock = (self.clock[0], self.step - 1)
        lr = self.lr_schedulers.schedulers[0].get_last_lr()[0]
        try:
            loss, grad_norm = self.optimize(data_iterator)
        except RunError as e:
            self.stop_error = e
            return
        if self.ema is not None and not self.nonfinite.in_streak:  # the step was applied
            self.ema.update(self.step)
        if self.preempted:
            why = self.stop_signals.received or "a signal to another rank"
            logger.warning(f"step {self.step}: stopping for {why}; saving a checkpoint")
        if self.metrics_processor.should_log(self.step):
            skips = self.skips()
            self.log_step(loss, grad_norm, lr, skips)
            try:
                skips.check(self.job_config.training.max_skipped_fraction)
            except RunError as e:
                self.stop_error = e
        if self.flux_validator is not None and self.flux_validator.is_due(self.step):
            self.flux_validator.validate(self.model_parts, self.step)
            self.images_since_log = 0  # the metrics' clock restarts after validation
            self.check_target(self.flux_validator)

    def check_target(self, validator: FluxValidator) -> None:
        """End the run (after this step's checkpoint) when validation reached its target
        loss, with the time to train."""
        loss = validator.reached_target()
        if loss is None:
            return
        self.reached_target = True
        start, start_step = self.clock
        line = time_to_train_line(
            loss,
            validator.settings.target_loss,
            self.step,
            self.step * validator.settings.samples_per_step,
            time.perf_counter() - start,
            self.parallel_dims.world_size,
            self.device.type,
        )
        resumed = f" (wall time since the resume at step {start_step})" if start_step else ""
        logger.info(line + resumed)

    def optimize(self, data_iterator: Iterator[dict[str, Any]]) -> tuple[Tensor, Tensor]:
        self.optimizers.zero_grad()
        model = self.model_parts[0]
        accumulation = self.gradient_accumulation_steps
        losses = []
        for _ in range(accumulation):
            batch = next(data_iterator)
            self.images_since_log += len(batch["captions"])
            flow = self.flow_batch(batch)
            with self.train_context(), self.maybe_enable_amp:
                loss = flow_matching_loss(model, flow) / accumulation
            loss.backward()
            losses.append(loss.detach())

        grad_norm = dist_utils.clip_grad_norm_(
            list(model.parameters()), self.job_config.training.max_norm, foreach=True
        )
        loss = torch.stack(losses).sum()
        finite, self.preempted = step_verdict(
            loss, grad_norm, self.stop_signals.received is not None
        )
        self.checkpointer.maybe_wait_for_staging()
        if finite:
            self.optimizers.step()
        self.lr_schedulers.step()  # the schedule follows the step count, applied or not
        self.nonfinite.record(self.step, finite, loss.item(), grad_norm.item())
        return loss, grad_norm

    def skips(self) -> Skips:
        """What the training data loader skipped and what it gave, over the data-parallel
        ranks (every rank calls this)."""
        return Skips.gather(skip_counts(self.dataloader), self.samples_used, self.batch_group)

    def train(self) -> None:
        """torchtitan's loop, then the end of the run: the data skipped, the steps not
        applied, and "Training completed" only when the last step was applied."""
        self.clock = (time.perf_counter(), -1)  # the step it starts from: at its first step
        super().train()
        logger.info(f"data: {self.skips().line()}")
        summary = self.nonfinite.summary()
        if summary is not None:
            logger.warning(summary)
        if self.stop_error is None and not self.preempted:
            try:
                self.nonfinite.check_last_step(self.step)
            except RunError as e:
                self.stop_error = e
        if self.stop_error is None and not self.preempted:
            logger.info("Training completed", extra={seam.OWN: True})

    def log_step(self, loss: Tensor, grad_norm: Tensor, lr: float, skips: Skips) -> None:
        if self.parallel_dims.dp_enabled or self.parallel_dims.cp_enabled:
            mesh = self.parallel_dims.get_mesh("loss")  # batch × cp: each holds a mean
            avg_loss = dist_utils.dist_mean(loss, mesh)
            max_loss = dist_utils.dist_max(loss, mesh)
        else:
            avg_loss = max_loss = loss.item()
        mp = self.metrics_processor
        elapsed = time.perf_counter() - mp.time_last_log
        steps = self.job_config.metrics.log_freq
        images_per_s = self.images_since_log / elapsed
        tps = mp.ntokens_since_last_log / (elapsed * self.parallel_dims.non_data_parallel_size)
        memory = mp.device_memory_monitor.get_peak_stats()
        metrics = {
            "loss_metrics/global_avg_loss": avg_loss,
            "loss_metrics/global_max_loss": max_loss,
            "grad_norm": grad_norm.item(),
            "lr": lr,
            "images_per_s_per_rank": images_per_s,
            "throughput(tps)": tps,
            "time_metrics/end_to_end(s)": elapsed / steps,
            "time_metrics/data_loading(s)": sum(mp.data_loading_times) / steps,
            "memory/max_reserved(GiB)": memory.max_reserved_gib,
            "memory/max_reserved(%)": memory.max_reserved_pct,
            **skips.metrics("data/"),
        }
        line = (
            f"step: {self.step:2}  loss: {avg_loss:8.5f}  grad_norm: {metrics['grad_norm']:7.4f}"
            f"  memory: {memory.max_reserved_gib:5.2f}GiB  images/s: {images_per_s:.1f}"
            f"  lr: {lr:.2e}"
        )
        if self.device.type != "cpu":  # MFU against a GPU's peak; a CPU has none to use
            tflops = mp.num_flops_per_token * tps / 1e12
            metrics |= {"tflops": tflops, "mfu(%)": 100 * tflops * 1e12 / mp.gpu_peak_flops}
            line += f"  tflops: {tflops:,.1f}  mfu: {metrics['mfu(%)']:.1f}%"
        if skips.total:
            line += f"  skipped: {skips.total} ({skips.kinds()})"
        mp.logger.log(metrics, self.step)
        logger.info(line)
        self.images_since_log = mp.ntokens_since_last_log = 0
        mp.data_loading_times.clear()
        mp.time_last_log = time.perf_counter()
        mp.device_memory_monitor.reset_peak_stats()


def main(argv: list[str] | None = None) -> None:
    from torchtitan.tools.logging import init_logger

    init_logger()
    args = sys.argv[1:] if argv is None else argv
    try:
        config = parse_config(args)
        check_config(config)
    except ConfigError as e:
        print(f"flux: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    os.environ.setdefault("LOCAL_RANK", "0")
    trainer = None
    try:
        trainer = FluxTrainer(config)
        trainer.train()
        trainer.checkpointer.wait_for_save()  # an asynchronous save, and its checksums
        if trainer.stop_error is not None:
            raise trainer.stop_error
        if trainer.preempted:
            folder = trainer.checkpointer.folder if trainer.checkpointer.enable else None
            write_requeue_file(trainer.step, folder)
            sys.exit(REQUEUE_EXIT_CODE)
    except (CheckpointError, CacheError, EncoderError, DataError) as e:  # a file a setting names
        print(f"flux: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except RunError as e:
        print(f"flux: error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        if trainer is not None:
            trainer.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
