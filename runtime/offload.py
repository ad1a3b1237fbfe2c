"""Offloaded weights: a model larger than its memory budget, its weights streamed from disk.

The unit of placement is a *unit*: one transformer layer's weights (every weight only the steps
of that layer read), or one weight read outside the layers (the lm_head's panels, the final
norm; an lm_head larger than a layer is lowered in row chunks, a unit each: compiler/lower/
split.py). A policy (compiler/offload_policy.py: FlexGen's LP) keeps some units resident and
streams the rest; embedding tables, read a few rows per token by gather steps, are a read-only
mapping of the artifact's weights file (the page cache holds the rows touched, not the table),
or of the store when the gather reads packed panels (a tied lm_head's, whose chunks stream).

Streamed units are read from a *store*: the kernels' layout of every unit (linear weights
already in their panels, so a read is one pread and no Python touches a tensor per step), each
unit at a 4 KiB-aligned offset, built once per artifact and plan from the artifact's weights
(row chunks at a time: building it never holds a whole weight twice) into
``$FFC_CACHE_DIR/offload/<key>/`` and published by a rename. The kernels are bound to the slot
buffers that streamed units alternate between (two; one when memory is that tight); the
executor's program gets begin / wait / release steps around each unit's kernels
(csrc/ffc_stream.h), and a reader thread of the kernel library reads unit k + 1 while unit k
computes. The reader opens the store O_DIRECT where the
file system allows (the page cache would otherwise keep every weight it read in RAM, outside
the process's RSS but not outside the machine's memory, and make disk reads look free).
A policy may also put the KV cache of the last layers on disk (runtime/kv_stream.py): the same
reader thread reads it into slots of its own and writes back what each step wrote.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import mmap
import os
import shutil
import struct
import warnings
from contextlib import closing as _closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ffc import knobs
from ffc.artifact import Artifact, remove_stale
from ffc.errors import ArtifactError, InvalidRequestError
from ffc.plan.kernels import Family
from ffc.plan.schema import ArgKind, Plan

from .kv_stream import ALIGN, KVDisk, aligned as _aligned
from .qpanels import pack_panels, pack_qpanels

STORE_FORMAT = 2
TENSOR_ALIGN = 64
CHUNK_ROWS = 4096       # rows of a weight packed at a time while building the store
TABLE = "table "        # a packed gather table in the store: mapped, not placed
_TORCH = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "U8": torch.uint8, "I64": torch.int64}
_STORED = {str(t).removeprefix("torch."): t for t in [*_TORCH.values(), torch.int8, torch.int32]}   # a store's dtypes


def _up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class Unit:
    name: str                       # "layer 3", or the weight's name
    tensors: tuple[str, ...]        # the plan's weight arguments (param names, packed names)
    layer: Optional[int] = None
    offset: int = 0                 # in the store
    bytes: int = 0                  # a multiple of ALIGN
    layout: dict = field(default_factory=dict, compare=False)   # tensor -> [offset, dtype, shape]


@dataclass(frozen=True)
class OffloadPolicy:
    """What a load keeps in RAM: the resident units (by name); the rest are streamed."""
    resident: frozenset
    overlap: bool = True
    batch: Optional[int] = None     # rows per decode step the policy was priced at
    slots: int = 2                  # streamed units alternate between this many (1: nothing overlaps)
    summary: dict = field(default_factory=dict, compare=False)
    kv_disk: int = 0                # layers whose KV cache is on disk (the last ones; runtime/kv_stream.py)


def format_policy(summary: dict) -> str:
    """The chosen option and the ones priced beside it, a line each."""
    return "\n".join([f"offload policy: {summary['chosen']}"] +
                     [f"  instead      : {alt}" for alt in summary.get("alternatives", [])])


def plan_units(plan: Plan, module) -> tuple[list[Unit], list[str]]:
    """The plan's units, in the order the decode graph first reads them, and its gather tables
    (weights only gather steps read: mapped, never streamed; a packed one, the panels of a tied
    lm_head split in chunks, from the store). A step's layer is its IR nodes' (``module``: the
    final IR the plan was made from)."""
    layers: dict[str, set] = {}
    families: dict[str, set] = {}
    first: dict[str, tuple] = {}
    for g, gp in plan.graphs.items():
        node_layer = {f"%{n.name}": n.origin.layer for n in module.graphs[g].nodes} if g in module.graphs else {}
        for k, st in enumerate(gp.steps):
            found = {node_layer.get(n) for n in st.nodes}
            layer = found.pop() if len(found) == 1 else None
            for a in st.args:
                if a.kind in (ArgKind.PARAM, ArgKind.PACKED):
                    layers.setdefault(a.name, set()).add(layer)
                    families.setdefault(a.name, set()).add(st.family)
                    first.setdefault(a.name, (g != "decode", k))
                    first[a.name] = min(first[a.name], (g != "decode", k))
    gather = sorted(n for n, fams in families.items() if fams == {Family.GATHER})
    groups: dict[object, list[str]] = {}
    for name in sorted(layers, key=lambda n: first[n]):
        if name in gather:
            continue
        ls = layers[name]
        key = ("layer", next(iter(ls))) if len(ls) == 1 and None not in ls else ("weight", name)
        groups.setdefault(key, []).append(name)
    units = [Unit(f"layer {key[1]}" if key[0] == "layer" else key[1], tuple(names),
                  key[1] if key[0] == "layer" else None) for key, names in groups.items()]
    return units, gather


def pinned_units(plan: Plan, units: list[Unit]) -> set[str]:
    """Units that cannot share a slot: read again after another unit is first read (a tied
    embedding's panels, read by the first step's gather and the last step's lm_head), so their
    slot would be needed across the others'; they stay resident."""
    owner = {t: u.name for u in units for t in u.tensors}
    pinned = set()
    for gp in plan.graphs.values():
        span: dict[str, list] = {}
        for k, st in enumerate(gp.steps):
            for a in st.args:
                if a.name in owner:
                    span.setdefault(owner[a.name], [k, k])[1] = k
        starts = sorted(first for first, _ in span.values())
        for name, (first, last) in span.items():
            if any(first < s <= last for s in starts):
                pinned.add(name)
    return pinned


def _weights_file(art: Artifact) -> Path:
    return art.path("weights/rank0.safetensors", "the weights file")


def _store_key(art: Artifact) -> str:
    files = art.manifest.get("files") or {}
    h = hashlib.sha256(f"ffc offload store {STORE_FORMAT}\n".encode())
    for rel in ("weights/rank0.safetensors", (art.kernels or {}).get("plan")):
        digest = files.get(rel)
        if not isinstance(digest, str):   # an artifact opened without hashes: the file's own
            digest = hashlib.sha256(art.path(rel).read_bytes()).hexdigest()
        h.update(f"{rel} {digest}\n".encode())
    return h.hexdigest()[:32]


class _Tensors:
    """A safetensors file read with pread, a row range at a time (no mapping: the pages a mapping
    touches count in the process's RSS until it is closed, the whole file by the end)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        try:
            (n,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
            self.header = json.loads(os.pread(self.fd, n, 8))
            self.base = 8 + n
        except (struct.error, ValueError, OSError) as e:
            os.close(self.fd)
            raise ArtifactError(f"artifact file {path.name} has no readable safetensors header ({e})") from None

    def close(self) -> None:
        os.close(self.fd)

    def info(self, name: str) -> tuple[torch.dtype, list[int], int, int]:
        """dtype, shape, first and last byte (absolute) of tensor ``name``."""
        entry = self.header.get(name) if isinstance(self.header, dict) else None
        try:
            b, e = (self.base + int(x) for x in entry["data_offsets"])
            dtype, shape = _TORCH[entry["dtype"]], [int(s) for s in entry["shape"]]
        except (KeyError, TypeError, ValueError):
            raise ArtifactError(f"weight {name} has no usable entry in {self.path.name}; recompile") from None
        if not (self.base <= b <= e and e - b == math.prod(shape) * dtype.itemsize):
            raise ArtifactError(f"weight {name} in {self.path.name} has a bad size or place; recompile")
        return dtype, shape, b, e

    def rows(self, name: str, first: int, count: int) -> torch.Tensor:
        dtype, shape, b, _ = self.info(name)
        row = math.prod(shape[1:]) * dtype.itemsize
        data = os.pread(self.fd, count * row, b + first * row)
        if len(data) != count * row:
            raise ArtifactError(f"{self.path.name} ends inside weight {name} (truncated); recompile the artifact")
        os.posix_fadvise(self.fd, b + first * row, count * row, os.POSIX_FADV_DONTNEED)
        return torch.frombuffer(bytearray(data), dtype=dtype).view([count, *shape[1:]])

    def tensor(self, name: str) -> torch.Tensor:
        shape = self.info(name)[1]
        return self.rows(name, 0, shape[0]).view(shape) if shape else self.rows(name, 0, 1).view(shape)


def _packed_rows(f: _Tensors, plan: Plan, name: str):
    """The packed argument ``name`` in chunks of rows, in the plan's panel layout."""
    p = plan.packed[name]
    info = plan.params[p.param]
    chunk = max(CHUNK_ROWS // p.nr, 1) * p.nr      # whole panels: only a range's last one is padded
    for first, count in p.rows:
        for c0 in range(0, count, chunk):
            n = min(chunk, count - c0)
            seg = f.rows(p.param, first + c0, n)
            yield (pack_qpanels(seg, info.dtype, info.shape[1], [(0, n)], p.nr) if info.dtype.quantized
                   else pack_panels(seg, [(0, n)], p.nr))


def _write(out, t: torch.Tensor) -> int:
    data = t.contiguous().view(-1).view(torch.uint8).numpy()
    out.write(memoryview(data))
    return data.nbytes


def build_store(art: Artifact, plan: Plan, units: list[Unit], path: Path) -> list[Unit]:
    """Write every unit in the kernels' layout to ``path``; the units with their places."""
    placed = []
    f = _Tensors(_weights_file(art))
    with open(path, "wb") as out, _closing(f):
        for u in units:
            start = out.tell()
            layout = {}
            for name in u.tensors:
                out.write(b"\0" * (-(out.tell() - start) % TENSOR_ALIGN))
                off, n = out.tell() - start, 0
                if name in plan.packed:
                    shape, dtype = None, None
                    for part in _packed_rows(f, plan, name):
                        n += _write(out, part)
                        shape = [0, *part.shape[1:]] if shape is None else shape
                        shape[0] += part.shape[0]
                        dtype = part.dtype
                else:
                    t = f.tensor(name)
                    n, shape, dtype = _write(out, t), list(t.shape), t.dtype
                layout[name] = [off, str(dtype).removeprefix("torch."), shape]
            out.write(b"\0" * (-(out.tell() - start) % ALIGN))
            placed.append(Unit(u.name, u.tensors, u.layer, start, out.tell() - start, layout))
            out.flush()
            os.posix_fadvise(out.fileno(), start, 0, os.POSIX_FADV_DONTNEED)
    return placed


def _read_store(root: Path, units: list[Unit]) -> Optional[list[Unit]]:
    """The placed units of the store at ``root``, if it is there and whole."""
    try:
        placed = [Unit(u["name"], tuple(u["tensors"]), u["layer"], u["offset"], u["bytes"], u["layout"])
                  for u in json.loads((root / "index.json").read_text())["units"]]
        size = (root / "weights.bin").stat().st_size
    except (OSError, ValueError, KeyError, TypeError):
        return None    # absent, or not whole (a truncated file, an edited index): built again
    ok = ([u.name for u in placed] == [u.name for u in units] and size == sum(u.bytes for u in placed)
          and all(_laid_out(u, size) for u in placed))
    return placed if ok else None


def _laid_out(u: Unit, size: int) -> bool:
    """Whether a unit's index entry describes tensors inside it (the index is read back from disk:
    an edited one must not make a view past the file or name something other than a dtype)."""
    try:
        if not (isinstance(u.offset, int) and isinstance(u.bytes, int) and 0 <= u.offset <= u.offset + u.bytes <= size
                and isinstance(u.layout, dict)):
            return False
        for off, dtype, shape in u.layout.values():
            n = math.prod(shape) * _STORED[dtype].itemsize
            if not (isinstance(off, int) and all(isinstance(d, int) and d >= 0 for d in shape)
                    and 0 <= off <= off + n <= u.bytes):
                return False
    except (KeyError, TypeError, ValueError):
        return False
    return True


def open_store(art: Artifact, plan: Plan, module) -> tuple[Path, list[Unit]]:
    """The artifact's store (built on first use under a lock, published by a rename) and its units."""
    path, units, _, _ = _open_store(art, plan, module)
    return path, units


def _open_store(art: Artifact, plan: Plan, module) -> tuple[Path, list[Unit], list[Unit], list[str]]:
    """The store, its units, its packed gather tables (stored after the units as TABLE + name),
    and the gather tables mapped from the weights file instead."""
    units, gather = plan_units(plan, module)
    path, placed = _store(art, plan, units + [Unit(TABLE + name, (name,)) for name in gather if name in plan.packed])
    tables = [u for u in placed if u.name.startswith(TABLE)]
    return path, [u for u in placed if u not in tables], tables, [n for n in gather if n not in plan.packed]


def _store(art: Artifact, plan: Plan, units: list[Unit]) -> tuple[Path, list[Unit]]:
    root = knobs.cache_dir() / "offload" / _store_key(art)
    placed = _read_store(root, units)
    if placed is not None:
        return root / "weights.bin", placed
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        with open(root.with_name(f".{root.name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)       # one build per store; the others wait and read it
            placed = _read_store(root, units)
            if placed is not None:
                return root / "weights.bin", placed
            remove_stale(root)                     # what killed builds left
            tmp.mkdir()
            placed = build_store(art, plan, units, tmp / "weights.bin")
            (tmp / "index.json").write_text(json.dumps({"format": STORE_FORMAT, "units": [
                {"name": u.name, "tensors": list(u.tensors), "layer": u.layer, "offset": u.offset,
                 "bytes": u.bytes, "layout": u.layout} for u in placed]}))
            shutil.rmtree(root, ignore_errors=True)     # a damaged one
            tmp.rename(root)
    except (OSError, ArtifactError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, ArtifactError):
            raise
        raise ArtifactError(f"cannot build the offloaded weights of {art.root} in {root.parent} ({e}); "
                            "check the cache directory's free space") from None
    return root / "weights.bin", placed


def _read_only(mm: mmap.mmap, offset: int, nbytes: int, dtype: torch.dtype, shape) -> torch.Tensor:
    with warnings.catch_warnings():     # read-only memory: the kernels only read it
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=offset).view(dtype).view(shape)


def map_store_tables(path: Path, tables: list[Unit]) -> tuple[dict[str, torch.Tensor], Optional[mmap.mmap]]:
    """Read-only views of the packed gather tables in the store at ``path``."""
    if not tables:
        return {}, None
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    out = {}
    for u in tables:
        for name, (off, dtype, shape) in u.layout.items():
            t = _STORED[dtype]
            out[name] = _read_only(mm, u.offset + off, math.prod(shape) * t.itemsize, t, shape)
    return out, mm


def map_tables(art: Artifact, names: list[str]) -> tuple[dict[str, torch.Tensor], Optional[mmap.mmap]]:
    """Read-only views of the weights file's tensors ``names`` (gather tables)."""
    if not names:
        return {}, None
    f = _Tensors(_weights_file(art))
    try:
        size = os.fstat(f.fd).st_size
        mm = mmap.mmap(f.fd, 0, access=mmap.ACCESS_READ)
        out = {}
        for name in names:
            dtype, shape, b, e = f.info(name)
            if e > size:
                raise ArtifactError(f"weight {name} lies past the end of weights/rank0.safetensors (truncated?); "
                                    "recompile the artifact")
            out[name] = _read_only(mm, b, e - b, dtype, shape)
    finally:
        f.close()
    return out, mm


class WeightStream:
    """The weights of a one-rank CPU plan under a policy: resident units read once into RAM,
    streamed ones bound to the slots a kernel library's Streamer fills, gather tables mapped."""

    def __init__(self, art: Artifact, plan: Plan, module, policy: OffloadPolicy, lib):
        if art.tp * art.pp != 1 or plan.target.value != "cpu":
            raise InvalidRequestError("offloading weights (a memory budget) runs one-rank CPU artifacts; this one "
                                      f"is {plan.target.value} with tp={art.tp} pp={art.pp}")
        self.path, self.units, tables, mapped = _open_store(art, plan, module)
        self.tensors, self._map = map_tables(art, mapped)
        views, self._table_map = map_store_tables(self.path, tables)
        self.tensors.update(views)
        unknown = set(policy.resident) - {u.name for u in self.units}
        if unknown:
            raise InvalidRequestError(f"the offload policy names units the plan has not: {sorted(unknown)[:3]}")
        self.policy = policy
        self.streamed = [u for u in self.units if u.name not in policy.resident]
        pinned = sorted(pinned_units(plan, self.units) - set(policy.resident))
        if pinned:
            raise InvalidRequestError(f"the offload policy streams {pinned[0]}, which the plan reads again after "
                                      "other weights (a tied embedding's panels): keep it resident")
        self._buffers = []
        self.resident_bytes = 0
        with open(self.path, "rb") as fh:
            for u in self.units:
                if u.name in policy.resident:
                    buf, lead = _aligned(u.bytes)
                    if fh.readinto(memoryview(buf[lead:lead + u.bytes].numpy())) != u.bytes:
                        raise ArtifactError(f"the offloaded weights in {self.path} end early; remove that directory")
                    os.posix_fadvise(fh.fileno(), u.offset, u.bytes, os.POSIX_FADV_DONTNEED)
                    self._views(u, buf, lead)
                    self.resident_bytes += u.bytes
                else:
                    fh.seek(u.bytes, os.SEEK_CUR)
        # streamed units alternate between the slots, each as large as its largest unit
        n = 2 if policy.slots != 1 else 1
        sizes = [max([u.bytes for u in self.streamed[k::n]], default=0) for k in range(n)]
        self.slots = [_aligned(s) for s in sizes if s]
        self.slot_of = {u.name: k % n for k, u in enumerate(self.streamed)}
        for u in self.streamed:
            buf, lead = self.slots[self.slot_of[u.name]]
            self._views(u, buf, lead)
        self.slot_bytes = sum(sizes)
        self.streamer = None
        self.kv_layers = int(module.graphs["prefill"].input("kv_cache").type.shape[0])
        if not 0 <= policy.kv_disk <= self.kv_layers:
            raise InvalidRequestError(f"the offload policy puts {policy.kv_disk} layers' KV cache on disk; the model "
                                      f"has {self.kv_layers}")
        self.kv: Optional[KVDisk] = None       # the disk layers of the KV cache, once one is bound
        self.index = {u.name: k for k, u in enumerate(self.streamed)}
        if policy.kv_disk and not hasattr(lib.Streamer, "attach_kv"):
            raise InvalidRequestError("this artifact's kernel library cannot keep KV cache on disk (built by an older "
                                      "ffc): rebuild it with `ffc build ARTIFACT`, or load with a larger memory budget")
        if self.streamed or policy.kv_disk:
            self.streamer = lib.Streamer(str(self.path), [(u.offset, u.bytes, self.slot_of[u.name])
                                                          for u in self.streamed],
                                         [b.data_ptr() + lead for b, lead in self.slots], policy.overlap)
        self._seqs: dict[str, int] = {}

    def _views(self, u: Unit, buf: torch.Tensor, lead: int) -> None:
        for name, (off, dtype, shape) in u.layout.items():
            t = _STORED[dtype]
            n = int(torch.Size(shape).numel()) * t.itemsize
            self.tensors[name] = buf[lead + off:lead + off + n].view(t).view(shape)

    def program(self, graph: str, steps, bound: list) -> tuple[list, list]:
        """The executor program of ``steps`` (bound: (kernel, addresses) each) with the stream's
        begin, wait and release steps around each streamed unit's kernels, and per program step
        the index of its step in ``steps`` (None: a stream step)."""
        if self.streamer is None:
            return bound, list(range(len(bound)))
        owner = {t: u.name for u in self.streamed for t in u.tensors}
        owner.update({n: n for n in self.index if n.startswith("kv ")})     # a disk layer's KV cache
        first: dict[str, int] = {}
        last: dict[str, int] = {}
        for k, st in enumerate(steps):
            for a in st.args:
                name = (owner.get(a.name) if a.kind in (ArgKind.PARAM, ArgKind.PACKED) else
                        owner.get(f"kv {a.offset}") if a.kind is ArgKind.CACHE else None)
                if name is not None:
                    first.setdefault(name, k)
                    last[name] = k
        seq = sorted(first, key=first.get)
        for k, u in enumerate(seq):     # a unit's slot is free again before the next one in it is waited for
            later = [v for v in seq[k + 1:] if self.slot_of[v] == self.slot_of[u]]
            if later and first[later[0]] <= last[u]:
                raise InvalidRequestError(f"graph {graph} reads streamed units {u} and {later[0]} at once (one "
                                          "slot); keep one of them resident (a larger memory budget)")
        if graph not in self._seqs:
            self._seqs[graph] = self.streamer.add_sequence([self.index[u] for u in seq])
        ptr = self.streamer.address
        waits: dict[int, list] = {}
        releases: dict[int, list] = {}
        for u in seq:
            waits.setdefault(first[u], []).append(("ffc.stream.wait", [ptr, self.index[u]]))
            releases.setdefault(last[u], []).append(("ffc.stream.release", [ptr, self.index[u]]))
        out, where = [("ffc.stream.begin", [ptr, self._seqs[graph]])], [None]
        for k, item in enumerate(bound):
            before, after = waits.get(k, []), releases.get(k, [])
            out += before + [item] + after
            where += [None] * len(before) + [k] + [None] * len(after)
        return out, where

    def attach_kv(self, cache: torch.Tensor) -> None:
        """The KV cache the plan is bound to: its disk layers (the policy's kv_disk) get their file
        and slots (once: a plan streaming KV binds one cache)."""
        if not self.policy.kv_disk:
            return
        if self.kv is None:
            self.kv = KVDisk(self.streamer, cache, self.kv_layers, self.policy.kv_disk)
            for layer in range(self.kv.ram, self.kv_layers):     # units of their own slots
                self.index[f"kv {layer}"] = self.kv.unit(layer)
                self.slot_of[f"kv {layer}"] = ("kv", self.kv.slot(layer))
        elif self.kv.key != (cache.data_ptr(), tuple(cache.shape)):
            raise InvalidRequestError("a plan with its KV cache partly on disk runs one KV cache (the engine's)")

    def stage(self, inputs) -> None:
        """Before a run: the KV pages it reads and writes (runtime/kv_stream.py)."""
        if self.kv is not None:
            self.kv.stage(inputs)

    def trim(self) -> None:
        """Drop the mapped tables' pages from this process (the page cache keeps them): a step's
        gathers touch a few rows each, but over many tokens they would map the whole table."""
        for m in (self._map, self._table_map):
            if m is not None:
                m.madvise(mmap.MADV_DONTNEED)

    def stats(self) -> dict:
        """Bytes read from disk, seconds reading and seconds kernels waited, reads, O_DIRECT."""
        if self.streamer is None:
            return {"bytes": 0, "read_s": 0.0, "wait_s": 0.0, "reads": 0, "direct": False}
        b, r, w, n, d = self.streamer.stats()
        kr, kw, ks = self.streamer.kv_stats()
        return {"bytes": b, "read_s": r, "wait_s": w, "reads": n, "direct": d, "kv_read": kr, "kv_written": kw,
                "kv_s": ks}
