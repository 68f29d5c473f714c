"""GPU profiles the planner fits runs to: public figures, each with where it comes from.

Peak is dense (no 2:4 sparsity) bf16 tensor-core throughput; vendors' headline figures are
often the sparse ones, twice as large. Bandwidths are per GPU and per direction: NVLink's
"900 GB/s" is both directions together. A ring collective sends and receives at once, so
it moves at the one-direction rate. `nvlink_domain` is how many GPUs share NVLink; beyond
it traffic goes over each GPU's network adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
GiB = 2**30


@dataclass(frozen=True)
class GPUProfile:
    name: str
    peak_bf16_flops: float  # dense, per second
    hbm_bytes: float
    hbm_bytes_per_s: float
    nvlink_bytes_per_s: float  # per direction
    nvlink_domain: int  # GPUs one NVLink fabric joins
    network_bytes_per_s: float  # per GPU, per direction, between NVLink domains
    source: str


GPUS: dict[str, GPUProfile] = {
    "h100-80gb": GPUProfile(
        name="H100 SXM 80GB",
        peak_bf16_flops=989.4e12,
        hbm_bytes=80 * GB,
        hbm_bytes_per_s=3.35e12,
        nvlink_bytes_per_s=450 * GB,
        nvlink_domain=8,
        network_bytes_per_s=50 * GB,  # one 400 Gb/s ConnectX-7 per GPU
        source=(
            "NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100): BF16 1,979 TFLOPS "
            "with sparsity, 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s; DGX H100: 8 GPUs, "
            "8 x 400 Gb/s ConnectX-7"
        ),
    ),
    "h200": GPUProfile(
        name="H200 SXM 141GB",
        peak_bf16_flops=989.4e12,
        hbm_bytes=141 * GB,
        hbm_bytes_per_s=4.8e12,
        nvlink_bytes_per_s=450 * GB,
        nvlink_domain=8,
        network_bytes_per_s=50 * GB,
        source=(
            "NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): BF16 1,979 TFLOPS "
            "with sparsity, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s; DGX H200: 8 GPUs, "
            "8 x 400 Gb/s ConnectX-7"
        ),
    ),
    "b200": GPUProfile(
        name="B200 (HGX/DGX, 1000 W)",
        peak_bf16_flops=2.25e15,
        hbm_bytes=180 * GB,
        hbm_bytes_per_s=8e12,
        nvlink_bytes_per_s=900 * GB,
        nvlink_domain=8,
        network_bytes_per_s=50 * GB,
        source=(
            "NVIDIA DGX B200 datasheet (nvidia.com/en-us/data-center/dgx-b200): 8 GPUs, "
            "1,440 GB HBM3e at 64 TB/s, NVLink 5 1.8 TB/s per GPU, 8 x 400 Gb/s "
            "ConnectX-7; HGX B200: FP16/BF16 4.5 PFLOPS per GPU with sparsity"
        ),
    ),
    "gb200": GPUProfile(
        name="GB200 NVL72",
        peak_bf16_flops=2.5e15,
        hbm_bytes=186 * GB,
        hbm_bytes_per_s=8e12,
        nvlink_bytes_per_s=900 * GB,
        nvlink_domain=72,
        network_bytes_per_s=50 * GB,
        source=(
            "NVIDIA GB200 NVL72 (nvidia.com/en-us/data-center/gb200-nvl72): 72 GPUs, "
            "FP16/BF16 360 PFLOPS with sparsity, 13.4 TB HBM3e at 576 TB/s, NVLink 5 "
            "1.8 TB/s per GPU across the rack; one 400 Gb/s ConnectX-7 per GPU"
        ),
    ),
    "mi300x": GPUProfile(
        name="AMD Instinct MI300X",
        peak_bf16_flops=1307.4e12,
        hbm_bytes=192 * GB,
        hbm_bytes_per_s=5.3e12,
        nvlink_bytes_per_s=448 * GB,  # Infinity Fabric: 7 links x 64 GB/s each way
        nvlink_domain=8,
        network_bytes_per_s=50 * GB,
        source=(
            "AMD Instinct MI300X datasheet (amd.com): BF16 1,307.4 TFLOPS dense, 192 GB "
            "HBM3 at 5.3 TB/s, 896 GB/s Infinity Fabric peer bandwidth (8-GPU platform); "
            "one 400 Gb/s adapter per GPU"
        ),
    ),
}


def gpu_profile(name: str) -> GPUProfile:
    from flux.config import ConfigError

    if name not in GPUS:
        raise ConfigError(f"unknown GPU profile {name!r}: choose one of {', '.join(GPUS)}")
    return GPUS[name]
