"""Where torch code runs: chosen at run time, so one artifact scores on a laptop CPU and on a GPU node alike."""

from __future__ import annotations

import torch


def pick_device(use_gpu: bool = True) -> torch.device:
    """CUDA when it is present and wanted, else the CPU."""
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    """Waits for queued CUDA work, so wall-clock timings measure the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
