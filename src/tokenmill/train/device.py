"""Where training runs and in what precision: the device, bf16 autocast, and the peaks MFU and memory
are measured against."""

from __future__ import annotations

import torch

# Dense bf16 tensor-core peak per device, matched (first hit) by substring of the CUDA device name.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def uses_bf16(dtype: str, device: torch.device) -> bool:
    if dtype == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return dtype == "bfloat16"


def peak_flops(device: torch.device, bf16: bool) -> float | None:
    """The device's bf16 peak, or None where MFU would be meaningless (CPU, fp32, unknown GPU)."""
    if device.type != "cuda" or not bf16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def peak_memory_gib(device: torch.device) -> float | None:
    """Most memory the caching allocator has handed out since the start, or None off CUDA."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
