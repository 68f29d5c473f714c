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
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torchtitan.components.dataloader import DataloaderExhaustedError
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.distributed import utils as dist_utils
from torchtitan.tools.logging import logger
from torchtitan.train import Trainer

from flux import seam
from flux.checkpoint import CheckpointError, FluxCheckpointManager
from flux.config import ConfigError, check_config, parse_config
from flux.data.buckets import tokens
from flux.data.dataloader import batch_bucket
from flux.data.precomputed import CacheError
from flux.data.streams import DataError
from flux.ema import EMA, build_average
from flux.flow import EncoderError, FlowBatch, flow_matching_loss
from flux.parallel.context_parallel import shard_sequence
from flux.parallel.frozen import parallelize_frozen
from flux.parallel.parallelize import compiles_model
from flux.resilience import (
    REQUEUE_EXIT_CODE,
    NonFiniteSteps,
    RunError,
    Skips,
    StepVerdict,
    StopSignals,
    skip_counts,
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
        self.verdicts: deque[StepVerdict] = deque()  # on their way to the host, oldest first
        self.process_wide = ExitStack()  # what the trainer sets for the process; close undoes
        self.process_wide.enter_context(preferred_attention(job_config.training.attention_backend))
        seam.install()
        super().__init__(job_config)
        if self.device.type == "cpu":
            self.device = torch.device("cpu")  # torchtitan names it cpu:<local rank>
        self.preprocess = build_preprocessor(job_config, self.model_args, self.device)
        compiles = compiles_model(job_config.compile)
        parallelize_frozen(
            self.preprocess, self.parallel_dims, job_config.compile.backend if compiles else None
        )
        assert isinstance(self.checkpointer, FluxCheckpointManager), "flux.seam.install"
        self.checkpointer.attach(self.should_save, plain_layouts=self.parallel_dims.tp_enabled)
        self.skips_on_device = all(seam.skips_on_device(o) for o in self.optimizers)
        self.ema = build_average(self.model_parts[0], ema_settings(job_config))
        if self.ema is not None:
            self.checkpointer.states[EMA] = self.ema  # saved, loaded and resharded by DCP
        batch_mesh = self.parallel_dims.get_optional_mesh("batch")
        self.dp_rank = batch_mesh.get_local_rank() if batch_mesh is not None else 0
        self.batch_group = batch_mesh.get_group() if batch_mesh is not None else None
        self.images_since_log = 0
        self.samples_used = 0  # by this rank, since this start
        # Marks the end of a part of the step (data, text, latents, fwd_bwd, optimizer):
        # `benchmark step` times the parts of this very step with it.
        self.lap: Callable[[str], None] = lambda part: None
        self.flux_validator: FluxValidator | None = None
        self.reached_target = False  # validation.target_loss: the run ends, successfully
        self.clock: tuple[float, int] = (time.perf_counter(), 0)  # (start, step): time to train
        if job_config.validation.enable:
            assert isinstance(self.validator, FluxValidator)
            self.flux_validator = self.validator
            self.flux_validator.attach(self.preprocess, self.device, self.ema)

    def batch_generator(self, data_iterable: Iterable[Any]) -> Iterator[dict[str, Any]]:
        """Batches of {"images", "captions", "keys"}; counts tokens and loading time."""
        iterator = iter(data_iterable)
        text_tokens = self.job_config.encoder.max_t5_encoding_len
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration as e:
                raise DataloaderExhaustedError() from e
            self.samples_used += len(batch["captions"])
            ntokens = len(batch["captions"]) * (tokens(batch_bucket(batch)) + text_tokens)
            self.ntokens_seen += ntokens
            self.metrics_processor.ntokens_since_last_log += ntokens
            self.metrics_processor.data_loading_times.append(time.perf_counter() - start)
            yield batch

    def flow_batch(self, batch: dict[str, Any]) -> FlowBatch:
        """The micro-batch the model sees; with context parallelism, this rank's tokens."""
        streams = Streams.of(
            self.job_config.training.seed_data, self.step, batch["keys"], self.device
        )
        flow = self.preprocess(batch, streams, self.lap)
        if self.parallel_dims.cp_enabled:
            cp = self.parallel_dims.get_mesh("cp")
            flow = FlowBatch(
                *shard_sequence(flow.inputs, flow.target, cp.get_local_rank(), cp.size())
            )
        return flow

    def should_save(self, due: bool) -> bool:
        """Whether to save this step's checkpoint, `due` by the configured interval: always
        when stopping for a signal, never while the latest step was not applied or the run
        is giving up. Reads the verdicts not yet read (a save waits for the step anyway)."""
        if not (due or self.preempted or self.reached_target):
            return False
        self.settle()
        return self.stop_error is None and not self.nonfinite.in_streak

    def should_continue_training(self) -> bool:
        stop = self.preempted or self.stop_error is not None or self.reached_target
        return not stop and super().should_continue_training()

    def train(self) -> None:
        """torchtitan's loop, then the end of the run: the data skipped, the steps not
        applied, and "Training completed" only when the last step was applied."""
        self.clock = (time.perf_counter(), -1)  # the step it starts from: at its first step
        super().train()
        steps = self.job_config.training.steps
        if self.clock[1] < 0 and self.step >= steps:  # no step ran: resumed at its end
            logger.warning(
                f"nothing to train: the checkpoint is at step {self.step} and training.steps "
                f"is {steps}; to train on (a longer run, the next stage of a progressive one), "
                "raise training.steps"
            )
        self.settle()  # the last steps' verdicts: the run ends knowing what each step did
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

    def close(self) -> None:
        super().close()
        self.process_wide.close()

    def train_step(self, data_iterator: Iterator[dict[str, Any]]) -> None:  # type: ignore[override]
        """One optimizer step over gradient_accumulation_steps micro-batches, its metrics, and
        validation when due: inside the step, so the step's checkpoint comes after it."""
        if self.clock[1] < 0:  # the first step of this start (after a checkpoint's load)
            self.clock = (self.clock[0], self.step - 1)
        lr = self.lr_schedulers.schedulers[0].get_last_lr()[0]
        loss, grad_norm = self.optimize(data_iterator)
        # The previous step's verdict, read a step late: its copy landed while this step was
        # queued. Every rank reads it here, so all stop after the same step.
        self.settle(through=self.step - 1)
        if self.ema is not None and self.stop_error is None:
            # Whether this step was applied is known on the device only: the update is
            # masked there (an unchanged average where it was not), and settle uncounts it.
            # After the previous verdicts, so the update count (the warm-up's decay) is true.
            verdict = self.verdicts[-1]
            verdict.averaged = self.ema.update(self.step, not_applied=verdict.nonfinite)
        logs = self.metrics_processor.should_log(self.step)
        if logs:
            self.settle()
        if self.stop_error is not None:
            return
        if self.preempted:
            why = self.stop_signals.received or "a signal to another rank"
            logger.warning(f"step {self.step}: stopping for {why}; saving a checkpoint")
        if logs:
            # Gathers the skip counts over the data-parallel ranks: on logging steps only,
            # which wait for the device anyway (settle above).
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
        """Forward and backward over the micro-batches, then the optimizer step, applied or
        not on the device's verdict; reads nothing back from the device."""
        self.optimizers.zero_grad()
        model = self.model_parts[0]
        accumulation = self.gradient_accumulation_steps
        losses = []
        for _ in range(accumulation):
            batch = next(data_iterator)
            self.lap("data")
            self.images_since_log += len(batch["captions"])
            flow = self.flow_batch(batch)
            with self.train_context(), self.maybe_enable_amp:
                loss = flow_matching_loss(model, flow) / accumulation
            loss.backward()
            losses.append(loss.detach())
            self.lap("fwd_bwd")

        grad_norm = dist_utils.clip_grad_norm_(
            list(model.parameters()), self.job_config.training.max_norm, foreach=True
        )
        loss = torch.stack(losses).sum()
        verdict = StepVerdict(self.step, loss, grad_norm, self.stop_signals.received is not None)
        self.verdicts.append(verdict)
        self.checkpointer.maybe_wait_for_staging()
        if self.skips_on_device:
            with seam.skipped_where(self.optimizers, verdict.nonfinite):
                self.optimizers.step()
        elif verdict.read()[2]:  # an optimizer that cannot skip on the device: ask now
            self.optimizers.step()
        self.lr_schedulers.step()  # the schedule follows the step count, applied or not
        self.lap("optimizer")
        return loss, grad_norm

    def settle(self, through: int | None = None) -> None:
        """Read the verdicts of the steps up to `through` (all when None): count the steps
        not applied (and the average's updates they did not make), note a stop asked for on
        any rank. Too many not applied in a row end the run (stop_error)."""
        while self.verdicts and (through is None or self.verdicts[0].step <= through):
            verdict = self.verdicts.popleft()
            loss, grad_norm, finite, stop = verdict.read()
            self.preempted = self.preempted or stop
            if not finite and verdict.averaged and self.ema is not None:
                self.ema.not_applied()
            if self.stop_error is not None:
                continue
            try:
                self.nonfinite.record(verdict.step, finite, loss, grad_norm)
            except RunError as e:
                self.stop_error = e  # ends the loop without a traceback

    def skips(self) -> Skips:
        """What the training data loader skipped and what it gave, over the data-parallel
        ranks (every rank calls this)."""
        return Skips.gather(skip_counts(self.dataloader), self.samples_used, self.batch_group)

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


class ShardedOnOneProcess(ParallelDims):
    """One process that shards its model with FSDP over itself, as every rank of a
    data-parallel run does (torchtitan applies FSDP from two ranks up): FSDP's mixed
    precision, its copies and the trainer's step as a run has them, on one device."""

    @property
    def fsdp_enabled(self) -> bool:
        return True

    def get_optional_mesh(self, dims: str | list[str]) -> DeviceMesh | None:
        if dims in ("fsdp", ["fsdp"]):
            return self.world_mesh  # the process itself
        return super().get_optional_mesh(dims)


class OneProcessTrainer(FluxTrainer):
    """FluxTrainer whose model FSDP shards over its one process (ShardedOnOneProcess)."""

    def init_distributed(self) -> ParallelDims:
        dims = super().init_distributed()
        if dims.world_size != 1:
            raise ValueError("OneProcessTrainer runs in a process group of one")
        return ShardedOnOneProcess(1, 1, 1, 1, 1, 1, 1, world_size=1)


@contextmanager
def one_process(job_config: JobConfig, fsdp: bool = True) -> Iterator[FluxTrainer]:
    """A FluxTrainer in this process, without torchrun (a process group of one; with fsdp,
    its model sharded as each rank of a data-parallel run shards it), closed after: what
    `benchmark step` and the in-process tests drive. The process's signal handlers and
    garbage collection, which the trainer takes over, are given back."""
    import gc
    import signal

    from flux.resilience import STOP_SIGNALS

    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    collecting = gc.isenabled()
    os.environ.setdefault("LOCAL_RANK", "0")
    torch.distributed.init_process_group(store=torch.distributed.HashStore(), rank=0, world_size=1)
    trainer = None
    try:
        trainer = (OneProcessTrainer if fsdp else FluxTrainer)(job_config)
        yield trainer
    finally:
        if trainer is not None:
            trainer.close()
        torch.distributed.destroy_process_group()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if collecting:
            gc.enable()


def preferred_attention(backend: str) -> AbstractContextManager[None]:
    """While entered, scaled_dot_product_attention prefers the training.attention_backend
    kernels: cuDNN's first (then PyTorch's order), or FlashAttention-3 as the flash kernel.
    Entered before the model compiles, so the compiled graphs pick the same kernels."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if backend == "cudnn":
        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]
        order += [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        return sdpa_kernel(order, set_priority=True)
    if backend == "flash3":
        return flash_attention_3()
    return nullcontext()


@contextmanager
def flash_attention_3() -> Iterator[None]:
    """FlashAttention-3 (flash_attn_interface) as SDPA's flash kernel while entered."""
    from torch.nn.attention import activate_flash_attention_impl, restore_flash_attention_impl

    activate_flash_attention_impl("FA3")
    try:
        yield
    finally:
        restore_flash_attention_impl()


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
