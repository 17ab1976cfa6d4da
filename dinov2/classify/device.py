"""Device choice and memory figures shared by training, inference and the setup check."""

from __future__ import annotations

import os
from typing import Optional, Union

import torch


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def select_device(name: Optional[Union[str, torch.device]] = None) -> torch.device:
    """``name`` if given (checked), else CUDA, then Apple MPS, then CPU."""
    if name is not None and str(name) not in ("", "auto"):
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        if device.type == "mps" and not mps_available():
            raise ValueError(f"device {name!r} requested but MPS is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def system_memory() -> dict:
    """``{"total": bytes, "available": bytes}`` of host RAM (psutil, else /proc/meminfo)."""
    try:
        import psutil

        vm = psutil.virtual_memory()
        return {"total": int(vm.total), "available": int(vm.available)}
    except ImportError:
        pass
    fields = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                fields[key] = int(rest.split()[0]) * 1024  # values are in kB
    except OSError:
        return {"total": None, "available": None}
    available = fields.get("MemAvailable", fields.get("MemFree"))
    return {"total": fields.get("MemTotal"), "available": available}


def device_memory(device: torch.device) -> dict:
    """Free / total bytes of the device that holds the model (host RAM for CPU and MPS)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return {"total": int(total), "available": int(free)}
    return system_memory()


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1
