"""Every FFC_* environment setting, declared in one place and read only here."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """FFC_CACHE_DIR: converted models and built kernels (default ~/.cache/ffc)."""
    return Path(os.environ.get("FFC_CACHE_DIR") or Path.home() / ".cache" / "ffc")


def num_threads() -> int | None:
    """FFC_NUM_THREADS: torch intra-op threads for the runtime (default: torch's choice)."""
    v = os.environ.get("FFC_NUM_THREADS")
    return int(v) if v else None


def cuda_archs() -> list[str]:
    """FFC_CUDA_ARCHS: comma-separated SM versions CUDA kernels are built for (default 80,90)."""
    return [a.strip() for a in (os.environ.get("FFC_CUDA_ARCHS") or "80,90").split(",") if a.strip()]


def cpu_arch() -> str:
    """FFC_CPU_ARCH: the -march CPU kernels are built for (default native: the building machine's
    ISA; e.g. haswell for AVX2, x86-64 for no SIMD, or the oldest machine an artifact must run on)."""
    return os.environ.get("FFC_CPU_ARCH") or "native"


def huge_pages() -> bool:
    """FFC_HUGE_PAGES=0: a CPU plan's weights in torch's allocator (ordinary 4 KiB pages) instead
    of mappings with transparent huge pages asked for; default 1."""
    return os.environ.get("FFC_HUGE_PAGES", "1") not in ("", "0")


def own_memory() -> bool:
    """FFC_OWN_MEMORY=1: a CPU plan's weights, arena and KV cache live in its kernel library's own
    allocations, the path every CUDA plan takes (so that path runs without a GPU); default 0."""
    return os.environ.get("FFC_OWN_MEMORY", "0") not in ("", "0")
