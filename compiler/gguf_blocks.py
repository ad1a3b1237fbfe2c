"""ffc's own GGUF reader for quantized weights: each HF weight's blocks as the file holds them.

transformers loads a GGUF file by dequantizing it to float (and, for Llama's q/k
projections, undoing the rotary row order llama.cpp's converter applied). ``--quant gguf``
runs the file's own blocks instead: for every HF weight whose GGUF tensor is in a block
format ffc has kernels for, the tensor's rows of blocks ([N, bytes per row], a view of the
memory-mapped file) are taken as they are, and the row order is matched to the HF weight
(rows are whole blocks, so reordering them is exact). Nothing goes through float. Every
weight taken is checked: its blocks, dequantized, must equal transformers' float weight bit
for bit, so the compiled model runs exactly the weights llama.cpp runs, or compile stops.
"""
from __future__ import annotations

import functools
import os
from collections import Counter
from pathlib import Path
from typing import Mapping, Optional

import gguf
import numpy as np
from gguf.gguf_reader import GGUFReader     # the class itself (sources.py swaps gguf.GGUFReader during a conversion)
import torch

from ffc.ir.quant import GGUF_FORMATS, QuantPolicy, dequantize
from ffc.ir.types import DType

from .errors import UnsupportedModelError

_ARCHS = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}


def reader(path: str | Path) -> GGUFReader:
    """The gguf package's reader for a file, parsed once per process while the file is unchanged.
    Parsing is the slow part (every vocabulary string becomes a numpy view: ~4 s for the default
    model's 49k tokens, ~18 s for Gemma 3's 262k), and one compile reads a file's metadata many
    times: transformers for the config, tokenizer and weights, then ffc for the block formats and
    blocks. The reader is read-only (memory-mapped), so sharing it is safe."""
    st = os.stat(path)
    return _parsed(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _parsed(path: str, size: int, mtime_ns: int) -> GGUFReader:
    del size, mtime_ns          # the cache key: a rewritten file is parsed again
    return GGUFReader(path)


def _field_str(parsed: GGUFReader, key: str) -> str:
    f = parsed.fields.get(key)
    if f is None:
        raise UnsupportedModelError(f"the GGUF file has no {key}")
    return bytes(f.parts[f.data[0]]).decode()


def _rope_rows(storage: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's converter stores each head's q/k rows as interleaved pairs; HF keeps the two
    halves apart. Undo it on whole rows (transformers' reverse permutation, on blocks)."""
    n = storage.shape[0]
    return storage.reshape(heads, n // heads // 2, 2, -1).transpose(1, 2).reshape(n, -1)


def read_blocks(path: str | Path, config, weights: Mapping[str, torch.Tensor]) -> dict[str, tuple[DType, torch.Tensor]]:
    """{HF weight name: (format, uint8 storage [N, bytes per row])} for the 2-D weights of
    ``weights`` (the float ones transformers made from this file) whose tensor the file holds
    in a block format ffc runs. Float tensors of the file are not listed."""
    parsed = reader(path)
    arch = _field_str(parsed, "general.architecture")
    if arch not in _ARCHS:
        raise UnsupportedModelError(f"GGUF architecture {arch!r} has no tensor name map in the gguf package")
    names = gguf.get_tensor_name_map(_ARCHS[arch], int(config.num_hidden_layers))
    tensors = {t.name: t for t in parsed.tensors}
    heads = {"attn_q": int(config.num_attention_heads),
             "attn_k": int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)}
    out: dict[str, tuple[DType, torch.Tensor]] = {}
    for name, w in weights.items():
        if w.dim() != 2:
            continue
        key = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if key not in tensors and key == "output.weight" and getattr(config, "tie_word_embeddings", False):
            key = "token_embd.weight"     # a tied lm_head is the embedding table
        t = tensors.get(key)
        fmt = GGUF_FORMATS.get(t.tensor_type.name) if t is not None else None
        if fmt is None:
            continue
        storage = torch.from_numpy(np.array(t.data).reshape(w.shape[0], -1))   # a copy: the file's map is read-only
        candidates = [storage]
        kind = key.split(".")[-2]
        if kind in heads:
            candidates.append(_rope_rows(storage, heads[kind]))
        for c in candidates:
            if torch.equal(dequantize(c, fmt, w.shape[1]).view(torch.int32), w.float().contiguous().view(torch.int32)):
                out[name] = (fmt, c.contiguous())
                break
        else:
            raise UnsupportedModelError(
                f"GGUF tensor {key} ({fmt}) does not decode to transformers' {name}; ffc cannot map this file's "
                "blocks to the model's weights (compile without --quant gguf to use the float weights)")
    return out


def linear_format(policy: QuantPolicy, gguf_file: Optional[str]) -> Optional[DType]:
    """The format the policy gives the layers' linears (what the strategy search prices their
    weights in): with ``gguf``, the block format most of the file's 2-D tensors have."""
    if policy.mode != "gguf" or gguf_file is None:
        return policy.format_for("linear")
    found = Counter(GGUF_FORMATS.get(t.tensor_type.name) for t in reader(gguf_file).tensors if len(t.shape) == 2)
    found.pop(None, None)
    return policy.format_for("linear", found.most_common(1)[0][0]) if found else None
