"""Quantized weights repacked into the panels the CPU kernels read (csrc/ffc_quant.h).

A weight's rows of blocks (as the artifact stores them, ``ffc.ir.quant``) become panels of
``nr`` = 16 rows: per panel, superblocks of chunks of 32 values, each chunk its scale bytes
then its values interleaved so that one 64-byte load holds 4 consecutive values of all 16
rows (4-bit values two to a byte: the low nibble value 4g+j, the high one 16+4g+j). Scales
keep the file's precision (f16 as stored; the products the kernel forms from them, d * sc,
are exact in f32). Nothing is rounded: the kernel reads exactly the weights of the file.
"""
from __future__ import annotations

from typing import Optional

import torch

from ffc.ir.quant import KERNEL_CHUNK, QK_K, unpack
from ffc.ir.types import DType
from ffc.plan.schema import Packed

CHUNK = KERNEL_CHUNK


def pack_panels(w: torch.Tensor, rows, nr: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Row ranges of a [R, K] weight as panels [P, K, nr]: panel p holds rows p*nr.. of a range,
    transposed so one k step reads nr contiguous weights; a range's last panel is zero-padded.
    Written into ``out`` when given (the memory the plan keeps: no temporary of the whole)."""
    K = w.shape[1]
    if out is None:
        out = torch.empty(panel_count(rows, nr), K, nr, dtype=w.dtype)
    p = 0
    for first, count in rows:
        full, rem = divmod(count, nr)
        if full:
            out[p:p + full].copy_(w[first:first + full * nr].reshape(full, nr, K).transpose(1, 2))
            p += full
        if rem:
            out[p].zero_()
            out[p, :, :rem].copy_(w[first + full * nr:first + count].t())
            p += 1
    return out


def panel_count(rows, nr: int) -> int:
    """Panels of ``nr`` rows the row ranges ``rows`` take (each range's last one padded)."""
    return sum(-(-count // nr) for _, count in rows)


def panel_view(whole: Optional[Packed], part: Packed) -> Optional[tuple[int, int]]:
    """The panels of ``whole`` (a weight's rows packed as one range) that hold ``part`` (one
    range of them starting at a panel; a range's last panel is padded, so only the weight's last
    range may end inside one), or None."""
    if (whole is None or whole == part or whole.nr != part.nr or len(whole.rows) != 1 or whole.rows[0][0] != 0
            or len(part.rows) != 1):
        return None
    first, n = part.rows[0]
    total = whole.rows[0][1]
    if first % part.nr or first + n > total or (n % part.nr and first + n != total):
        return None
    return first // part.nr, first // part.nr + -(-n // part.nr)


def _f16_lanes(t: torch.Tensor) -> torch.Tensor:
    """f32 [P, 16, X] (values that are f16) -> bytes [P, X, 32]: per X, the 16 rows' f16."""
    return t.to(torch.float16).transpose(1, 2).contiguous().view(torch.uint8)


def _u8_lanes(t: torch.Tensor) -> torch.Tensor:
    """[P, 16, X] one byte each -> [P, X, 16]."""
    return t.view(torch.uint8).transpose(1, 2).contiguous()


def _values(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned values [P, 16, K] -> [P, K / 32, 256 or 512] in the kernels' group order."""
    p, r, k = q.shape
    q = q.reshape(p, r, k // CHUNK, CHUNK)
    if bits == 4:
        lo = q[..., :16].reshape(p, r, -1, 4, 4)                  # [P, 16, KC, g, j]
        hi = q[..., 16:].reshape(p, r, -1, 4, 4)
        return (lo | (hi << 4)).permute(0, 2, 3, 1, 4).reshape(p, k // CHUNK, 256)
    return q.reshape(p, r, -1, 8, 4).permute(0, 2, 3, 1, 4).reshape(p, k // CHUNK, 512)


def _superblocks(header: torch.Tensor, chunks: torch.Tensor, per: int) -> torch.Tensor:
    """Header bytes [P, KB, HB] and chunks [P, KB * per, CB] -> [P, bytes]."""
    p, kb = header.shape[:2]
    return torch.cat([header, chunks.reshape(p, kb, -1)], dim=2).reshape(p, -1)


def pack_qpanels(storage: torch.Tensor, fmt: DType, k: int, rows, nr: int = 16) -> torch.Tensor:
    """Row ranges (first, count) of a quantized [R, k] weight as uint8 panels [P, panel bytes]
    (a range's last panel zero-padded: zero scales, so its rows compute 0)."""
    parts = []
    for first, count in rows:
        seg = storage[first:first + count]
        pad = -count % nr
        if pad:
            seg = torch.cat([seg, seg.new_zeros(pad, seg.shape[1])])
        parts.append(_pack(seg, fmt, k, nr))
    return torch.cat(parts).contiguous()


def _pack(seg: torch.Tensor, fmt: DType, k: int, nr: int) -> torch.Tensor:
    u = unpack(seg, fmt, k)
    p = seg.shape[0] // nr

    def lanes(t: torch.Tensor) -> torch.Tensor:     # [R, X] -> [P, 16, X]
        return t.reshape(p, nr, -1)
    kc = k // CHUNK
    if fmt in (DType.Q8_0, DType.I8R):              # signed values stored + 128 (unsigned)
        vals = _values(lanes((u.q.to(torch.int16) + 128).to(torch.uint8)), 8)
    else:
        vals = _values(lanes(u.q), 8 if fmt is DType.Q6_K else 4)
    if fmt is DType.Q4_0 or fmt is DType.Q8_0:
        return torch.cat([_f16_lanes(lanes(u.d)), vals], dim=2).reshape(p, -1)
    if fmt is DType.Q4_1:
        return torch.cat([_f16_lanes(lanes(u.d)), _f16_lanes(lanes(u.m)), vals], dim=2).reshape(p, -1)
    if fmt is DType.I4G64:
        header = torch.cat([_f16_lanes(lanes(u.d)), _f16_lanes(lanes(u.m))], dim=2)
        return _superblocks(header, vals, 2)
    if fmt is DType.I8R:
        header = lanes(u.d).transpose(1, 2).contiguous().view(torch.uint8)        # [P, 1, 64]
        return _superblocks(header, vals, kc)
    if fmt is DType.Q4_K:
        header = torch.cat([_f16_lanes(lanes(u.d)), _f16_lanes(lanes(u.m))], dim=2)
        chunks = torch.cat([_u8_lanes(lanes(u.sc)), _u8_lanes(lanes(u.mq)), vals], dim=2)
        return _superblocks(header, chunks, QK_K // CHUNK)
    if fmt is DType.Q6_K:
        sc = _u8_lanes(lanes(u.sc)).reshape(p, kc, 2, nr).reshape(p, kc, 2 * nr)   # per chunk: its two halves
        chunks = torch.cat([sc, vals], dim=2)
        return _superblocks(_f16_lanes(lanes(u.d)), chunks, QK_K // CHUNK)
    raise ValueError(f"no panel layout for {fmt}")
