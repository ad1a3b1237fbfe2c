"""This machine's disk, as the offload policy prices it: read bandwidth with the page cache bypassed."""
from __future__ import annotations

import json
import mmap
import os
import time
from pathlib import Path

from ffc import knobs


def _disk_profile() -> Path:
    return knobs.cache_dir() / "profiles" / "disk.json"


def disk_bandwidth(near: Path, size: int = 256 << 20, remeasure: bool = False) -> float:
    """Bytes/s of reading a file on the file system of ``near`` with the page cache bypassed
    (O_DIRECT, 4 MiB reads; where that is refused, the pages are dropped before reading), the
    median of three passes over ``size`` bytes; measured once per file system and kept."""
    near = Path(near)
    dev = str(os.stat(near if near.exists() else near.parent).st_dev)
    prof = _disk_profile()
    try:
        known = json.loads(prof.read_text())
    except (OSError, ValueError):
        known = {}
    if not remeasure and isinstance(known.get(dev), (int, float)) and known[dev] > 0:
        return float(known[dev])
    folder = near if near.is_dir() else near.parent
    probe = folder / f".ffc-disk-probe-{os.getpid()}"
    block = 4 << 20
    buf = mmap.mmap(-1, block)       # page-aligned, as O_DIRECT needs
    try:
        with open(probe, "wb") as f:
            for _ in range(size // block):
                f.write(os.urandom(1 << 16) * (block >> 16))
            f.flush()
            os.fsync(f.fileno())
        rates = []
        for _ in range(3):
            try:
                fd = os.open(probe, os.O_RDONLY | os.O_DIRECT)
            except OSError:
                fd = os.open(probe, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                t0 = time.perf_counter()
                got = 0
                while got < size:
                    n = os.preadv(fd, [buf], got)
                    if n <= 0:
                        break
                    got += n
                rates.append(got / (time.perf_counter() - t0))
            finally:
                os.close(fd)
    finally:
        buf.close()
        probe.unlink(missing_ok=True)
    rate = sorted(rates)[1]
    known[dev] = rate
    prof.parent.mkdir(parents=True, exist_ok=True)
    tmp = prof.with_name(f".disk.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(known))
    tmp.replace(prof)
    return rate
