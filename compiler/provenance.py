"""What an artifact was built from, for the manifest's ``provenance``: enough to rebuild it and to
tell why two builds differ - the SHA-256 of every input file of the model, the toolchain
(compiler versions, flags), the device profile's numbers, the workload and memory limit the
search priced, and its prediction for one rank next to the chosen plan's.
"""
from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Union

import ninja
import pybind11

from ffc.ir.strategy import Prediction

from .artifact import sha256
from .build import toolchain
from .cluster import DeviceProfile
from .options import CompileOptions
from .sources import ModelSource


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    return sha256(Path(path))


def _file_digest(path: Path) -> str:
    st = path.stat()        # memoised per (size, mtime): a self-draft's compile does not hash again
    return _digest(str(path), st.st_size, st.st_mtime_ns)


def input_digests(source: ModelSource) -> dict[str, str]:
    """SHA-256 of each file the model came from: the GGUF file, or every file of the folder
    (weights, config, tokenizer)."""
    folder = Path(source.path)
    if source.gguf:     # the config transformers read was converted from the file's metadata
        out = {Path(source.gguf).name: _file_digest(Path(source.gguf))}
        if (folder / "config.json").is_file():
            out["config.json (from the GGUF)"] = _file_digest(folder / "config.json")
        return out
    return {p.name: _file_digest(p) for p in sorted(folder.iterdir()) if p.is_file()}


def _version(cmd: Optional[str]) -> Optional[str]:
    if not cmd:
        return None
    try:
        out = subprocess.run([cmd, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[-1] if "nvcc" in os.path.basename(cmd) else out.splitlines()[0] if out else None


def _march(cxx: str, cflags: list[str]) -> Optional[str]:
    """What -march=native (or the given -march) means on this machine, as the compiler resolves it."""
    arch = [f for f in cflags if f.startswith("-march=")]
    try:
        out = subprocess.run([cxx, *arch, "-Q", "--help=target"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return next((ln.split()[-1] for ln in out.splitlines() if ln.strip().startswith("-march=")), None)


def toolchain_record(options: CompileOptions) -> dict:
    """Compilers (versions), flags and build tools of the kernel build."""
    if not options.codegen:
        return {}
    tc = toolchain(options.target)
    rec = {"cxx": tc["cxx"], "cxx_version": _version(tc["cxx"]), "cflags": tc["cflags"], "ldflags": tc["ldflags"],
           "march": _march(tc["cxx"], tc["cflags"]), "ninja": ninja.__version__, "pybind11": pybind11.__version__}
    if "nvcc" in tc:
        rec.update(nvcc=tc["nvcc"], nvcc_version=_version(tc["nvcc"]), nvflags=tc["nvflags"])
    return rec


def record(source: ModelSource, options: CompileOptions, profile: DeviceProfile,
           one_rank: Union[Prediction, str, None], memory_limit: float) -> dict:
    """``one_rank``: the search's prediction for tp = pp = 1, or why no one-rank plan fits."""
    return {
        "inputs": input_digests(source),
        "toolchain": toolchain_record(options),
        "host": {"python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine()},
        "profile": asdict(profile),
        "search": {"workload": options.to_dict()["workload"], "memory_limit_bytes": memory_limit,
                   "predicted_one_rank": asdict(one_rank) if isinstance(one_rank, Prediction) else None,
                   **({"one_rank_refused": one_rank} if isinstance(one_rank, str) else {})},
    }
