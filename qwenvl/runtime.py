"""Process-wide runtime choices: compute dtype and thread count."""

from __future__ import annotations

import ctypes
import os

import torch

from .errors import QwenVLError

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}


def cpu_has_bf16() -> bool:
    """True where the CPU does bf16 math natively (AVX512-BF16 or AMX)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_dtype(name: str | torch.dtype = "auto") -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if name not in DTYPES:
        raise QwenVLError(f"unknown dtype {name!r} (choose auto, bfloat16 or float32)")
    return DTYPES[name]


def physical_cores() -> int:
    """Physical cores available to this process (hyper-threads do not help GEMMs)."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as handle:
            text = handle.read()
    except OSError:
        return available
    cores = set()
    physical = core = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            physical = value.strip()
        elif key == "core id":
            core = value.strip()
            cores.add((physical, core))
    return max(1, min(available, len(cores) or available))


def set_threads(threads: int | None) -> int:
    count = threads or physical_cores()
    if count < 1:
        raise QwenVLError(f"--threads must be at least 1, got {count}")
    torch.set_num_threads(count)
    return count


def threading_info(threads: int | None = None) -> dict[str, object]:
    """The thread count a model runs with (``threads``, else the physical cores) and the OpenMP wait
    policy in force, with where each comes from and how to change it (docs/engine.md, "Threads")."""
    from . import OMP_WAIT_POLICY_FROM_ENVIRONMENT

    return {
        "threads": threads or physical_cores(),
        "threads_from": "--threads" if threads else "physical cores",
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "").upper() or "unset",
        "omp_wait_policy_from": "environment" if OMP_WAIT_POLICY_FROM_ENVIRONMENT else "qwenvl default",
    }


def threads_note(threads: int | None = None) -> str:
    """``threading_info`` as one line for logs and ``qwenvl info``."""
    info = threading_info(threads)
    return (
        f"{info['threads']} threads ({info['threads_from']}; --threads N to change), OpenMP wait policy "
        f"{info['omp_wait_policy']} ({info['omp_wait_policy_from']}; OMP_WAIT_POLICY=ACTIVE|PASSIVE in the "
        "environment to change)"
    )


def release_free_memory() -> None:
    """Hand freed heap memory back to the system (glibc keeps it otherwise: ~70 MB after a load)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
