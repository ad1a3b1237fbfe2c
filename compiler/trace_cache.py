"""Traced modules remembered in $FFC_CACHE_DIR/traces (as TorchInductor's FX graph cache
remembers graphs): torch.export of a 30-layer model takes ~10 s, and compiling the same model
again (another --tp, --quant, --max-batch, a dry run and then the compile) traces the same
graph. The IR text is the entry; every trace, remembered or not, goes through it (printed and
parsed), so a compile's result never depends on whether the cache held the trace.

The key is what the traced graph depends on: the model's class and the source file of its
HF code, its config, every parameter and buffer's name, shape, dtype and sharing (tied
weights), max_seq_len, the torch and transformers versions, and the source of ffc's compiler
and IR (any change to the frontend traces anew). Weight values are not in it: export traces
parameters and buffers as inputs, never as constants.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import os
import tempfile
from pathlib import Path

import torch
import transformers

from ffc import ir
from ffc.ir import Module
from ffc.ir.text import parse, print_module

from . import frontend, knobs

FORMAT = 1        # bump when what an entry holds changes without a source change


@functools.lru_cache(maxsize=1)
def _ffc_source() -> str:
    h = hashlib.sha256()
    for folder in (Path(__file__).parent, Path(ir.__file__).parent):
        for f in sorted(folder.glob("*.py")):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def key(model, max_seq_len: int) -> str:
    h = hashlib.sha256()
    cls = type(model)
    try:
        code = Path(inspect.getsourcefile(cls) or "").read_bytes()
    except (OSError, TypeError):
        code = b""
    h.update(f"{FORMAT}|{torch.__version__}|{transformers.__version__}|{cls.__module__}.{cls.__qualname__}|"
             f"{max_seq_len}|{_ffc_source()}|".encode())
    h.update(hashlib.sha256(code).digest())
    h.update(model.config.to_json_string(use_diff=False).encode())
    first: dict[int, str] = {}           # tied weights: the first name of each shared tensor
    for kind, named in (("p", model.named_parameters(remove_duplicate=False)),
                        ("b", model.named_buffers(remove_duplicate=False))):
        for name, t in named:
            h.update(f"{kind}|{name}|{tuple(t.shape)}|{t.dtype}|{first.setdefault(id(t), name)}\n".encode())
    return h.hexdigest()[:32]


def folder() -> Path:
    return knobs.cache_dir() / "traces"


def _seal(text: str) -> str:
    return f"# sha256 {hashlib.sha256(text.encode()).hexdigest()}"


def trace(model, max_seq_len: int) -> Module:
    """frontend.trace(model, max_seq_len), from the cache when it holds it."""
    try:
        path = folder() / f"{key(model, max_seq_len)}.ir"
    except (TypeError, ValueError, AttributeError):     # a config that does not serialise: not cached
        return parse(print_module(frontend.trace(model, max_seq_len)))
    try:
        head, text = path.read_text().split("\n", 1)
        if head == _seal(text):            # whole, as written
            return parse(text)
    except (OSError, UnicodeDecodeError, ValueError):     # absent, or a damaged entry: trace anew
        pass
    text = print_module(frontend.trace(model, max_seq_len))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(_seal(text) + "\n" + text)
            os.replace(tmp, path)           # readers see the whole entry or none
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        pass                                # a read-only cache: the trace is still good
    return parse(text)
