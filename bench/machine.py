"""One line about where a benchmark's numbers come from: the CPU, the GPU, the software and the load."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU's model name where Linux tells it, else what the platform module says."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def machine() -> str:
    """The CPU and its cores, the GPU if any, Python and torch, and the load average now."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu_name()}, {os.cpu_count()} logical cores, {device}; "
        f"Python {platform.python_version()}, torch {torch.__version__}; load average {load_average():.1f} at start"
    )
