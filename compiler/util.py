"""Small helpers that the compiler and the runtime both use: memory sizes, free ports.

A leaf module (it imports nothing of ffc but the errors), so any layer may use it.
"""
from __future__ import annotations

import re
import socket
from typing import Callable, Optional, Union

from .errors import InvalidRequestError

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 10**3, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
          "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12, "tib": 1 << 40}


def available_memory_bytes() -> int:
    """Host memory the OS could give this process now (MemAvailable), or 4 GiB if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def parse_memory(value: Union[str, int, float, None], available: Optional[Callable[[], int]] = None,
                 what: str = "kv_cache_memory") -> Optional[int]:
    """A memory size in bytes: ``"2GiB"``, ``"512MB"``, a byte count, or a fraction of the
    available memory (``0.3``; ``available()`` bytes, default the host's). None stays None (the
    caller's default). ``what`` names the option in errors."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidRequestError(f"{what}={value!r} is not a size; give e.g. '2GiB' or 0.3")
    if isinstance(value, (int, float)):
        if 0 < value < 1:
            return int(value * (available or available_memory_bytes)())
        if value >= 1:
            return int(value)
        raise InvalidRequestError(f"{what}={value!r} must be positive")
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise InvalidRequestError(f"{what}={value!r} is not a size; give e.g. '2GiB', '512MB' or 0.3")
    number, unit = float(m.group(1)), m.group(2).lower()
    return parse_memory(number if unit == "" else number * _UNITS[unit], available, what)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
