"""The machine a measurement ran on, recorded in every benchmark's JSON (one helper for all of them)."""

from __future__ import annotations

import os
import platform
from typing import Any


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages, or None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine(device: str = "cpu") -> dict[str, Any]:
    """Platform, processor, cores, torch version and threads, the device (with the GPU's name) and the load
    average now: figures taken on a busy machine are not evidence, so every result says how busy it was."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "loadavg_at_start": load_average(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def busy_warning(threshold: float = 1.0) -> str | None:
    """A warning line when the 1-minute load average says other work shares the CPU, else None."""
    load = load_average()
    if load is None or load[0] <= threshold:
        return None
    return (
        f"warning: load average {load[0]:.2f} on {os.cpu_count()} cores: other work shares this machine, so timings "
        "(and even ratios) are distorted; measure on an idle machine"
    )
