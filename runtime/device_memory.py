"""The memory a compiled plan's kernels read and write: its weights, arena and KV cache.

A CPU plan keeps them in torch tensors (``HostMemory``). A CUDA plan keeps them in allocations of
its kernel library's own executor (``OwnMemory`` of ``DeviceArray``s): the library links the CUDA
runtime statically and the runtime loads the driver when first called, so a machine with a GPU
needs only its driver, not a CUDA build of torch (ffc installs the CPU build). Where a CUDA torch
is present, ``as_torch`` views the same memory as torch tensors for NCCL's collectives.
``FFC_OWN_MEMORY=1`` puts a CPU plan on the executor's path too (host memory the executor
allocates), so the path a GPU takes runs in every test run.

Host weights of 256 KiB and more live in mappings with transparent huge pages asked for
(``HostMemory.weight``; ``host_buffer`` for a buffer of its own, such as an offload's units):
a decode step streams every weight once, and in 4 KiB pages that is a TLB miss (under
virtualization, a two-level page walk) every 4 KiB, where the hardware prefetchers stop too.
``FFC_HUGE_PAGES=0`` turns it off.

An array is only bound, copied in and copied out: ``write``/``read`` move host tensors to and
from it at a byte offset, ``copy_kv_slots`` moves K/V rows inside a cache.
"""
from __future__ import annotations

import ctypes
import math
import mmap
import weakref
from typing import Optional, Sequence, Union

import torch

from ffc import knobs
from ffc.util import available_memory_bytes

HUGE_PAGE = 2 << 20
SLAB_MIN = 256 << 10     # weights from this size on are carved from huge-page slabs


class DeviceArray:
    """A contiguous array in memory the kernel library's executor allocated (freed with it):
    the shape, dtype and address a plan binds, and byte-offset copies from and to the host."""

    def __init__(self, exe, shape: Sequence[int], dtype: torch.dtype, device: torch.device):
        self.shape = torch.Size(int(d) for d in shape)
        self.dtype = dtype
        self.device = device
        self._itemsize = torch.empty((), dtype=dtype).element_size()
        self.nbytes = math.prod(self.shape) * self._itemsize
        self._exe = exe
        self._ptr = 0
        self._ptr = int(exe.alloc(self.nbytes))

    def __del__(self):
        if self._ptr:
            self._exe.release(self._ptr)
            self._ptr = 0

    def __repr__(self) -> str:
        return f"DeviceArray({list(self.shape)}, {self.dtype}, {self.device})"

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def data_ptr(self) -> int:
        return self._ptr

    def numel(self) -> int:
        return math.prod(self.shape)

    def dim(self) -> int:
        return len(self.shape)

    def element_size(self) -> int:
        return self._itemsize

    def stride(self, d: int) -> int:
        return math.prod(self.shape[d + 1:]) if d >= 0 else self.stride(d + self.dim())

    def is_contiguous(self) -> bool:
        return True

    def _span(self, offset: int, nbytes: int) -> int:
        if offset < 0 or offset + nbytes > self.nbytes:
            raise ValueError(f"bytes {offset}..{offset + nbytes} lie outside {self!r} of {self.nbytes} bytes")
        return self._ptr + offset

    def write(self, offset: int, src: torch.Tensor) -> None:
        """Copy the host tensor ``src`` in, from byte ``offset``."""
        src = src.detach().to("cpu").contiguous()
        n = src.numel() * src.element_size()
        self._exe.upload(self._span(offset, n), src.data_ptr(), n)

    def read(self, offset: int, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
        """A host tensor of ``shape`` copied out from byte ``offset``."""
        out = torch.empty(tuple(shape), dtype=dtype)
        n = out.numel() * out.element_size()
        self._exe.download(out.data_ptr(), self._span(offset, n), n)
        return out

    def cpu(self) -> torch.Tensor:
        return self.read(0, self.dtype, self.shape)

    def copy_rows(self, dst: int, src: int, width: int, height: int, pitch: int, count: int, stride: int) -> None:
        """``count`` groups of ``height`` rows of ``width`` bytes, ``pitch`` bytes apart inside a
        group and ``stride`` bytes between groups, from byte ``src`` to byte ``dst`` of this array."""
        extent = (count - 1) * stride + (height - 1) * pitch + width
        self._exe.copy_rows(self._span(dst, extent), self._span(src, extent), width, height, pitch, count, stride)


class _Bytes:
    """A DeviceArray's bytes as CUDA's array interface (torch wraps it without a copy)."""

    def __init__(self, a: DeviceArray):
        self.__cuda_array_interface__ = {"shape": (a.nbytes,), "typestr": "|u1", "data": (a.data_ptr(), False),
                                         "version": 3, "strides": None}
        self.owner = a


def as_torch(x: Union[torch.Tensor, DeviceArray]) -> torch.Tensor:
    """``x`` as a torch tensor sharing its memory (GPU memory: only where torch is a CUDA build)."""
    if isinstance(x, torch.Tensor):
        return x
    if not x.is_cuda:
        raw = torch.frombuffer((ctypes.c_uint8 * x.nbytes).from_address(x.data_ptr()), dtype=torch.uint8)
    elif torch.cuda.is_available():
        raw = torch.as_tensor(_Bytes(x), device=x.device)
    else:
        raise RuntimeError(f"{x!r} is GPU memory; torch {torch.__version__} is not a CUDA build and cannot view it")
    return raw.view(x.dtype).view(x.shape)


def host_buffer(nbytes: int) -> torch.Tensor:
    """``nbytes`` of host memory as a uint8 tensor, uninitialized as torch.empty's: from 2 MiB on,
    a private anonymous mapping (zeros, no page touched) starting at a 2 MiB boundary with huge
    pages asked for (the kernel backs each whole 2 MiB of it with one where it has them; the
    rest, and any machine without them, gets ordinary pages); below that, or with
    FFC_HUGE_PAGES=0, torch's allocator. For buffers read whole (an offload's units and slots)."""
    if nbytes < HUGE_PAGE or not knobs.huge_pages() or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(nbytes, dtype=torch.uint8)
    m, start = _huge_mapping(nbytes)
    return torch.frombuffer(m, dtype=torch.uint8)[start:start + nbytes]   # (its views hold the mapping)


def _huge_mapping(nbytes: int) -> tuple[mmap.mmap, int]:
    """A private anonymous mapping, and the offset in it of its first 2 MiB boundary, from which
    ``nbytes`` fit; huge pages are asked for the whole 2 MiB there (a partly used one at the end
    would be resident in full)."""
    m = mmap.mmap(-1, -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = -ctypes.addressof(ctypes.c_char.from_buffer(m)) % HUGE_PAGE
    try:
        m.madvise(mmap.MADV_HUGEPAGE, start, nbytes // HUGE_PAGE * HUGE_PAGE)
    except OSError:                                   # a kernel built without them: ordinary pages
        pass
    return m, start


def _slabbed(nbytes: int) -> bool:
    """Whether a host weight of ``nbytes`` goes into a huge-page slab (HostMemory.weight)."""
    return nbytes >= SLAB_MIN and knobs.huge_pages()


class HostMemory:
    """Torch tensors in host memory; weights of 256 KiB and more in huge pages, carved one after
    another from 64 MiB mappings (``_huge_mapping``; a mapping of their own each would waste up
    to a huge page at its end). The arena and the KV pool stay torch's: they are touched
    sparsely (a decode step writes the first rows of buffers sized for the longest prefill; a
    pool's blocks are taken one at a time), and a huge page makes each such touch 2 MiB resident."""
    own = False
    device = torch.device("cpu")
    SLAB = 64 << 20

    def __init__(self):
        self._slab: Optional[weakref.ref] = None    # the mapping being filled (its weights' views hold it)
        self._used = self._end = 0                  # bytes of it used, and where its slab ends

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(tuple(shape), dtype=dtype)

    def to_device(self, t: torch.Tensor, copy: bool = True) -> torch.Tensor:
        """``t`` in host memory: a copy unless ``copy=False`` (a view of a mapped weights file would
        keep the whole file alive; a tensor made for the plan, such as packed panels, needs none)
        or it is 256 KiB or more (copied into huge pages, which the kernels stream faster)."""
        if not _slabbed(t.numel() * t.element_size()):
            return t.to("cpu", copy=copy)
        out = self.weight(t.shape, t.dtype)
        out.copy_(t)
        return out

    def weight(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized tensor for a weight the plan keeps (in huge pages from 256 KiB on), for
        packing in place."""
        n = math.prod(shape) * dtype.itemsize
        if not _slabbed(n):
            return torch.empty(tuple(shape), dtype=dtype)
        return self._carve(n).view(dtype).view(tuple(shape))

    def _carve(self, n: int) -> torch.Tensor:
        m = self._slab() if self._slab is not None else None
        start = -(-self._used // mmap.PAGESIZE) * mmap.PAGESIZE
        if m is None or start + n > self._end:
            size = max(self.SLAB, -(-n // HUGE_PAGE) * HUGE_PAGE)
            m, start = _huge_mapping(size)
            self._slab, self._end = weakref.ref(m), start + size
        self._used = start + n
        return torch.frombuffer(m, dtype=torch.uint8)[start:start + n]

    def available(self) -> int:
        return available_memory_bytes()


class OwnMemory:
    """Allocations of the kernel library's executor: device memory for a CUDA plan."""
    own = True

    def __init__(self, exe, device: torch.device):
        self.exe = exe
        self.device = device

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> DeviceArray:
        return DeviceArray(self.exe, shape, dtype, self.device)

    def weight(self, shape: Sequence[int], dtype: torch.dtype) -> None:
        """None: a weight is made in host memory and uploaded (``to_device``)."""
        return None

    def to_device(self, t: torch.Tensor, copy: bool = True) -> DeviceArray:
        """``t`` uploaded (always a copy: it crosses to the executor's memory)."""
        a = self.empty(t.shape, t.dtype)
        a.write(0, t)
        return a

    def available(self) -> int:
        free, _ = self.exe.memory_info()
        return int(free) if free >= 0 else available_memory_bytes()


HOST = HostMemory()


def write(dst: Union[torch.Tensor, DeviceArray], offset: int, src: torch.Tensor) -> None:
    """Copy the host tensor ``src`` into ``dst`` (a flat byte tensor or a DeviceArray) at byte ``offset``."""
    if isinstance(dst, DeviceArray):
        dst.write(offset, src)
        return
    src = src.contiguous()
    n = src.numel() * src.element_size()
    dst[offset:offset + n].view(src.dtype).copy_(src.reshape(-1))


def read(src: Union[torch.Tensor, DeviceArray], offset: int, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """A host copy of ``shape`` elements of ``dtype`` at byte ``offset`` of ``src`` (a flat byte
    tensor or a DeviceArray)."""
    if isinstance(src, DeviceArray):
        return src.read(offset, dtype, shape)
    n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return src[offset:offset + n].view(dtype).view(tuple(shape)).clone()


def copy_kv_slots(cache: Union[torch.Tensor, DeviceArray], blocks: Sequence[int],
                  moves: Sequence[tuple[int, int]]) -> None:
    """cache [L, 2, S, Hkv, BS, row]: slot a's rows to slot b (all layers, K and V), in order."""
    bs = cache.shape[4]
    if isinstance(cache, torch.Tensor):
        for a, b in moves:
            cache[:, :, blocks[b // bs], :, b % bs] = cache[:, :, blocks[a // bs], :, a % bs]
        return
    layers, two, _, heads, _, row = cache.shape
    e = cache.element_size()
    for a, b in moves:    # per (layer, K|V): Hkv rows BS*row apart; (layer, K|V) groups S*Hkv*BS*row apart
        src = (blocks[a // bs] * cache.stride(2) + (a % bs) * row) * e
        dst = (blocks[b // bs] * cache.stride(2) + (b % bs) * row) * e
        cache.copy_rows(dst, src, row * e, heads, cache.stride(3) * e, layers * two, cache.stride(1) * e)
