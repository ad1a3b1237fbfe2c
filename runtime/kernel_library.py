"""Loading a built kernel library (a pybind11 extension) into this process, and which
libraries may be loaded at all.

Each library is named after the content hash of its sources (``ffc_kernels_<hash>``), so two
artifacts with the same kernels share one module and different ones never collide.

A kernel library is native code: loading one runs it; and a plan is raw offsets and sizes
that the kernels trust. An artifact is untrusted input, so the runtime uses its plan only when
ffc lowered or checked that very file on this machine, and its library only when ffc built that
very file here for that plan: both are recorded by the SHA-256 of their bytes under
``$FFC_CACHE_DIR/kernels/trusted/`` (a compile records what it wrote; ``ffc.load`` checks a
plan it does not know against the final IR by lowering it again, and builds a library it does
not know from the sources ffc's own templates generate from the plan; ``ffc build ARTIFACT``
builds an artifact's edited sources and so vouches for them).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch  # noqa: F401 - the library links libtorch_cpu for torch's OpenMP runtime (one thread pool)

from ffc import knobs
from ffc.artifact import sha256
from ffc.errors import ArtifactError


def _registry() -> Path:
    return knobs.cache_dir() / "kernels" / "trusted"


def vouch(path: Path, plan: Optional[Path] = None) -> None:
    """Record the file at ``path`` (a plan ffc lowered or checked here, or a library ffc built
    here from ``plan``'s kernels) as one that may be used; a library is vouched for per plan."""
    reg = _registry()
    reg.mkdir(parents=True, exist_ok=True)
    entry = reg / sha256(path)
    want = sha256(plan) if plan is not None else "any"
    have = entry.read_text().split() if entry.is_file() else []
    if want not in have:
        fd, tmp = tempfile.mkstemp(dir=reg, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(have + [want]) + "\n")
        os.replace(tmp, entry)


def trusted(path: Path, plan: Optional[Path] = None) -> bool:
    """Whether the file at ``path`` is byte for byte one ffc vouched for on this machine (a
    library: built for the plan at ``plan``, byte for byte too)."""
    try:
        entry = _registry() / sha256(path)
        if not entry.is_file():
            return False
        return plan is None or sha256(plan) in entry.read_text().split()
    except OSError:
        return False


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
