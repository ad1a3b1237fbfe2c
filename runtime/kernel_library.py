"""Loading a built kernel library (a pybind11 extension) into this process.

Each library is named after the content hash of its sources (``ffc_kernels_<hash>``), so two
artifacts with the same kernels share one module and different ones never collide.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch  # noqa: F401 - the library links libtorch_cpu for torch's OpenMP runtime (one thread pool)

from ffc.errors import ArtifactError


def load_library(path: Path):
    """Import the kernel library at ``path`` (the module name is the file's stem up to the suffix)."""
    path = Path(path)
    name = path.name.split(".")[0]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, str(path))
    if spec is None or spec.loader is None:
        raise ArtifactError(f"cannot load kernel library {path}")
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except ImportError as e:
        raise ArtifactError(f"kernel library {path} does not load here ({e}); rebuild it: ffc build <artifact>") from None
    sys.modules[name] = mod
    return mod
