"""The one seam between flux and the internals of torchtitan 0.2.2, torch and torchao.

Everything flux changes in, or reads from, code that is not its own public API is here,
installed from one place (`install`, called by flux.train before the trainer is built),
each with what the library lacks that makes it necessary. PINNED lists the private
signatures this module relies on; tests/test_seam.py checks them and the versions, so an
upgrade fails there, loudly, rather than in a run.

- A machine without an accelerator: torchtitan copies `device_type` and `device_module`
  (torch.cuda) into several modules at import and calls CUDA-only functions (set_device,
  memory statistics). `install` points them at a CPU stand-in; torchtitan then picks gloo.
- The checkpointer: torchtitan builds its CheckpointManager inside Trainer.__init__ and
  offers no hook for which step to resume from, what to check before a load, the layout of
  what is saved, or when to save. `install` has the trainer build flux.checkpoint's
  subclass instead, which overrides those methods (dcp_load, dcp_save, _find_load_step,
  _should_save).
- Restarts under torchrun: torchrun keeps its key-value store across restart attempts and
  torchtitan calls init_process_group without a store, so a new attempt could read the
  addresses the killed one left there. From the second attempt on, init_process_group is
  given torchrun's store under a prefix of the attempt.
- Configuration: torchtitan merges a custom config module into its JobConfig with a
  private function; flux reads the merged class to check TOML files before torchtitan does.
- Tensor parallelism keeps FLUX.1's fused layouts as torch's private `_StridedShard`
  placement, and runs a torchao Float8Linear's matmul on local shards through torchao's
  `matmul_with_hp_or_float8_args` (torchao has no public function for it).
- A step not applied, decided on the device: fused Adam/AdamW skip their update where the
  `found_inf` tensor torch.amp.GradScaler hands them is nonzero (their step reads it from
  the optimizer and passes it to the private `_fused_adam`); no public API takes a
  device-side "skip" otherwise, and reading the verdict on the host would wait for the step.
- The planner (flux.plan) builds meshes on the CPU for a fake process group on any machine
  (torchtitan's ParallelDims reads the module's `device_type`), reads a DTensor's local
  storage without the autograd view `to_local` makes, marks DTensor's sharding propagation
  (which reruns each op on global shapes, through the same dispatch modes: no rank's work)
  and lists the storages an op touched with FSDP's memory tracker's private helper.
- The EMA of the weights (flux.ema) gives DCP its shards as DTensors over tensors where
  they are: `DTensor.from_local` would move a host-memory average to the mesh's device (all
  of it, at every save); FSDP's CPU offload builds its parameters the same private way.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import resource
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor.placement_types import _StridedShard

StridedShard = _StridedShard  # tensor parallelism's strided rows (flux.parallel.tensor_parallel)

VERSIONS = {"torchtitan": "0.2.2"}

# Private functions flux overrides or calls, with the parameters it was written against.
PINNED = {
    "torchtitan.components.checkpoint.CheckpointManager.dcp_load": (
        "(self, state_dict, checkpoint_id, from_hf, from_quantized)"
    ),
    "torchtitan.components.checkpoint.CheckpointManager.dcp_save": (
        "(self, state_dict, checkpoint_id, async_mode, enable_garbage_collection=False, "
        "to_hf=False)"
    ),
    "torchtitan.components.checkpoint.CheckpointManager._find_load_step": "(self, folder='')",
    "torchtitan.components.checkpoint.CheckpointManager._should_save": (
        "(self, curr_step, last_step=False)"
    ),
    "torchtitan.components.checkpoint.CheckpointManager._async_wait": "(self)",
    "torchtitan.config.manager.ConfigManager._merge_configs": "(base, custom)",
    "torch.distributed.tensor.placement_types._StridedShard.__init__": (
        "(self, dim, *, split_factor=1, sf=None)"
    ),
    "torchao.float8.float8_linear.matmul_with_hp_or_float8_args.forward": (
        "(ctx, input_hp, weight_hp_t, linear_mm_config, config)"
    ),
    "torch.optim.adam._fused_adam": (
        "(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, grad_scale, "
        "found_inf, *, amsgrad, has_complex, beta1, beta2, lr, weight_decay, eps, maximize, "
        "capturable, differentiable, decoupled_weight_decay)"
    ),
    "torch.distributed.tensor._dtensor_spec.DTensorSpec.__init__": (
        "(self, mesh, placements, tensor_meta=None, shard_order=None, "
        "use_strided_shard_as_shard_order=None)"
    ),
    "torch.distributed.tensor._dtensor_spec.TensorMeta": "(shape, stride, dtype)",
    "torch.distributed.tensor._sharding_prop.ShardingPropagator"
    "._propagate_tensor_meta_non_cached": "(self, op_schema)",
    "torch.distributed._tools.common_utils.get_untyped_storages": "(t)",
}

# Modules of torchtitan that copy device_type / device_module at import.
DEVICE_MODULES = (
    "torchtitan.tools.utils",
    "torchtitan.components.metrics",
    "torchtitan.distributed.parallel_dims",
    "torchtitan.distributed.utils",
    "torchtitan.tools.profiling",
)


def resolve(dotted: str) -> Any:
    """The object a dotted name (module path, then attributes) names."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: Any = __import__(".".join(parts[:i]), fromlist=["_"])
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def signature(dotted: str) -> str:
    """The parameters of a function, without annotations: "(self, folder='')"."""
    sig = inspect.signature(resolve(dotted))
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


# -- a machine without an accelerator ------------------------------------------------------
def _total_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


class CpuDeviceModule:
    """What torchtitan asks of torch.cuda, answered for the CPU."""

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def set_device(device: Any) -> None:
        pass

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def synchronize(device: Any = None) -> None:
        pass

    @staticmethod
    def empty_cache() -> None:
        pass

    @staticmethod
    def get_device_name(device: Any = None) -> str:
        return "CPU"

    @staticmethod
    def get_device_properties(device: Any = None) -> SimpleNamespace:
        return SimpleNamespace(total_memory=_total_memory_bytes(), name="CPU")

    @staticmethod
    def reset_peak_memory_stats(device: Any = None) -> None:
        pass

    @staticmethod
    def memory_stats(device: Any = None) -> dict[str, int]:
        # Peak resident set size of this process (Linux reports KiB) stands in for the
        # allocator's peak; there are no allocator retries or OOMs to report.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {
            "active_bytes.all.peak": peak,
            "reserved_bytes.all.peak": peak,
            "num_alloc_retries": 0,
            "num_ooms": 0,
        }


def has_accelerator() -> bool:
    return torch.accelerator.is_available()


def use_cpu_if_no_accelerator() -> str:
    """Point torchtitan at the CPU when there is no accelerator; returns the device type."""
    if has_accelerator():
        return torch.accelerator.current_accelerator().type  # type: ignore[union-attr]
    cpu = CpuDeviceModule()
    for name in DEVICE_MODULES:
        module = __import__(name, fromlist=["_"])
        if hasattr(module, "device_type"):
            setattr(module, "device_type", "cpu")  # noqa: B010 (module attributes)
        if hasattr(module, "device_module"):
            setattr(module, "device_module", cpu)  # noqa: B010
    return "cpu"


# -- restarts under torchrun ---------------------------------------------------------------
_init_process_group = dist.init_process_group


def init_process_group_of_this_attempt(*args: Any, **kwargs: Any) -> None:
    """init_process_group on torchrun's store under a prefix of this restart attempt (from
    the second attempt on; the first one is left as torchrun sets it up)."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        _init_process_group(*args, **kwargs)
        return
    world_size = int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=False,
        timeout=kwargs.get("timeout") or timedelta(minutes=10),
    )
    kwargs |= {
        "store": dist.PrefixStore(f"flux/attempt_{attempt}/", store),
        "rank": int(os.environ["RANK"]),
        "world_size": world_size,
    }
    _init_process_group(*args, **kwargs)


# -- configuration -------------------------------------------------------------------------
def merged_config_class(custom: type) -> type:
    """torchtitan's JobConfig class with the fields of `custom` merged in, as torchtitan
    merges `job.custom_config_module`."""
    from torchtitan.config import ConfigManager

    return ConfigManager._merge_configs(ConfigManager().config_cls, custom)


# -- tensor parallelism in float8 ----------------------------------------------------------
def float8_matmul(x: Tensor, weight: Tensor, linear_mm_config: Any, config: Any) -> Tensor:
    """x @ weight.T as a torchao Float8Linear computes it, on whatever tensors it gets
    (its tensorwise scales then come from those tensors)."""
    from torchao.float8.float8_linear import matmul_with_hp_or_float8_args

    return matmul_with_hp_or_float8_args.apply(x, weight.t(), linear_mm_config, config)


# -- a step not applied, decided on the device ---------------------------------------------
def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer can leave a step out on a device-side verdict: fused Adam or
    AdamW (AdamW is an Adam), the kind torchtitan builds by default."""
    return isinstance(optimizer, torch.optim.Adam) and all(
        group.get("fused") for group in optimizer.param_groups
    )


@contextmanager
def skipped_where(optimizers: Iterable[torch.optim.Optimizer], found_inf: Tensor) -> Iterator[None]:
    """For the duration, the optimizers' steps leave parameters, moments and step counts as
    they are where found_inf (a float32 scalar on their device) is nonzero, as under
    torch.amp.GradScaler: the verdict never leaves the device."""
    optimizers = list(optimizers)
    assert all(skips_on_device(o) for o in optimizers), "fused Adam/AdamW only"
    for optimizer in optimizers:
        optimizer.found_inf = found_inf  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for optimizer in optimizers:
            del optimizer.found_inf  # type: ignore[attr-defined]


# -- a DTensor over a tensor where it is ----------------------------------------------------
def dtensor_over(local: Tensor, like: Any) -> Any:
    """A DTensor with the mesh, placements, shape and stride of DTensor `like` whose local
    tensor is `local` itself (its dtype; on whatever device it is), not a copy."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

    meta = TensorMeta(like.shape, like.stride(), local.dtype)
    spec = DTensorSpec(like.device_mesh, tuple(like.placements), tensor_meta=meta)
    return DTensor(local, spec, requires_grad=False)  # type: ignore[call-arg]


# -- the planner ---------------------------------------------------------------------------
@contextmanager
def meshes_on_cpu() -> Iterator[None]:
    """torchtitan's ParallelDims.build_mesh builds its meshes on the CPU meanwhile."""
    import torchtitan.distributed.parallel_dims as parallel_dims

    saved = parallel_dims.device_type
    parallel_dims.device_type = "cpu"
    try:
        yield
    finally:
        parallel_dims.device_type = saved


def local_storage(t: Any) -> Any:
    """A DTensor's shard on this rank, the tensor itself (`to_local` adds an autograd view);
    anything else as it is."""
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t  # noqa: SLF001


_propagating = [0]  # > 0 while DTensor propagates shapes
_marking = [0]  # nested marked_sharding_propagation contexts


def propagating_shapes() -> bool:
    """Whether DTensor is rerunning an op on global shapes (see marked_sharding_propagation)."""
    return _propagating[0] > 0


@contextmanager
def marked_sharding_propagation() -> Iterator[None]:
    """While active, propagating_shapes() tells when DTensor's sharding propagation runs an
    op on tensors of global shape (nests)."""
    from torch.distributed.tensor._sharding_prop import ShardingPropagator

    original = ShardingPropagator._propagate_tensor_meta_non_cached
    if _marking[0] == 0:

        def marked(self: Any, op_schema: Any) -> Any:
            _propagating[0] += 1
            try:
                return original(self, op_schema)
            finally:
                _propagating[0] -= 1

        ShardingPropagator._propagate_tensor_meta_non_cached = marked  # type: ignore[method-assign]
    _marking[0] += 1
    try:
        yield
    finally:
        _marking[0] -= 1
        if _marking[0] == 0:
            ShardingPropagator._propagate_tensor_meta_non_cached = original  # type: ignore[method-assign]


def untyped_storages(t: Any) -> Any:
    """The untyped storages under a tensor (a DTensor's or a float8 tensor's inner ones)."""
    from torch.distributed._tools.common_utils import get_untyped_storages

    return get_untyped_storages(t)


# -- a first screen without noise ---------------------------------------------------------
# What the libraries print that a user cannot act on: (logger, message start) pairs, and
# Python warnings by message.
QUIET_LOGS = {
    "cpu": [
        ("root", "Error running lspci"),  # torchtitan looks for H100s with lspci
        ("root", "Peak flops undefined for: CPU"),  # MFU is not shown on the CPU
        ("root", "Peak FLOPS used for computing MFU"),
    ],
    "any": [
        ("root", "ENV[TORCH_NCCL_ASYNC_ERROR_HANDLING]"),  # torchtitan sets its own value
        # torchtitan says it at the end of any run, stopped or failed too; FluxTrainer.train
        # says it only when the last step was applied
        ("root", "Training completed"),
        ("root", "Sleeping 2 seconds for other ranks to complete"),
    ],
}
QUIET_LOGGERS_ON_CPU = (
    "torchao",  # its CUDA kernels cannot load on a machine without CUDA
    "torch.utils._pytree",  # torchao registers enums the way torch now deprecates
)
QUIET_WARNINGS = (
    "'set_vital' is deprecated",  # torchdata's own call into torch
    "In CPU autocast, but the target dtype is not supported",  # float32 "mixed" precision
    "`torch.jit.script_method` is deprecated",  # transformers' T5 on import
)


OWN = "flux_own"  # logger.info(..., extra={OWN: True}) passes the filters below


class _DropMessages(logging.Filter):
    def __init__(self, starts: list[str]):
        super().__init__()
        self.starts = tuple(starts)

    def filter(self, record: logging.LogRecord) -> bool:
        own = getattr(record, OWN, False)  # flux's own line of the same text
        return own or not str(record.msg).startswith(self.starts)


_quieted: set[str] = set()  # the device types quiet was called for


def quiet(device_type: str) -> None:
    """Keep out of the log what the libraries print that a user cannot act on (once per
    process; the trainer's install and the tools call it)."""
    if device_type in _quieted:
        return
    _quieted.add(device_type)
    drops: dict[str, list[str]] = {}
    for name, start in QUIET_LOGS["any"] + (QUIET_LOGS["cpu"] if device_type == "cpu" else []):
        drops.setdefault(name, []).append(start)
    for name, starts in drops.items():
        target = logging.getLogger() if name == "root" else logging.getLogger(name)
        target.addFilter(_DropMessages(starts))
    if device_type == "cpu":
        for name in QUIET_LOGGERS_ON_CPU:
            logging.getLogger(name).setLevel(logging.ERROR)
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message))
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # "Loading weights" bars of tiny encoders
    except ImportError:
        pass


# -- installation --------------------------------------------------------------------------
_installed: list[str] = []  # the device type, once installed


def install() -> str:
    """Install every adaptation (once per process); returns the device type."""
    import torchtitan.train

    from flux.checkpoint import FluxCheckpointManager

    if not _installed:
        device_type = use_cpu_if_no_accelerator()
        quiet(device_type)
        torchtitan.train.CheckpointManager = FluxCheckpointManager  # type: ignore[misc]
        dist.init_process_group = init_process_group_of_this_attempt
        _installed.append(device_type)
    return _installed[0]
