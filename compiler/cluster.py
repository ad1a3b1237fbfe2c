"""Device and cluster profiles, and the times the cost model gives ops and collectives.

A profile holds peak FLOP/s per dtype, memory bandwidth and size, per-kernel overhead, and
the interconnect between the devices of one tensor-parallel group as an alpha-beta model
(alpha: latency per message step, beta: bytes/s per link direction), with the algorithms the
link offers per collective: ``ring`` everywhere; on NVLink also ``one_shot`` (every rank reads
its peers' buffers directly: one step, (p-1) x the bytes; what TensorRT-LLM's and vLLM's
custom all-reduce do for small messages) and ``two_shot`` (reduce-scatter then all-gather,
one step each). A collective takes its fastest algorithm for the size. Times that
``ffc calibrate`` measured (t = a + b * bytes, per collective and group size) win. Profiles are JSON: written down for A100/H100/H200
(``compiler/profiles/``) or measured on this machine by ``ffc calibrate``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from ffc.ir.sharding import CollectiveKind
from ffc.ir.types import DType, parse_dtype

from . import knobs
from .errors import InvalidRequestError

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"

# (collective, algorithm) -> time(alpha, beta, ranks p, bytes n of the full tensor)
_ALGORITHMS = {
    ("all_reduce", "ring"): lambda a, b, p, n: 2 * (p - 1) * a + 2 * (p - 1) / p * n / b,
    ("all_reduce", "one_shot"): lambda a, b, p, n: a + (p - 1) * n / b,
    ("all_reduce", "two_shot"): lambda a, b, p, n: 2 * a + 2 * (p - 1) / p * n / b,
    ("all_gather", "ring"): lambda a, b, p, n: (p - 1) * a + (p - 1) / p * n / b,
    ("all_gather", "one_shot"): lambda a, b, p, n: a + (p - 1) / p * n / b,
    ("reduce_scatter", "ring"): lambda a, b, p, n: (p - 1) * a + (p - 1) / p * n / b,
    ("reduce_scatter", "one_shot"): lambda a, b, p, n: a + (p - 1) / p * n / b,
    ("all_to_all", "ring"): lambda a, b, p, n: (p - 1) * a + (p - 1) / (p * p) * n / b,
    ("send_recv", "ring"): lambda a, b, p, n: a + n / b,
}


@dataclass(frozen=True)
class Link:
    kind: str
    latency: float            # alpha, seconds per message step
    bandwidth: float          # beta, bytes/s per direction
    fitted: tuple = ()        # ((collective, ranks, a, b), ...) measured: t = a + b * bytes
    algorithms: tuple = ()    # ((collective, (algorithm, ...)), ...); ring when absent


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    peak_flops: tuple         # ((dtype, FLOP/s), ...)
    memory_bandwidth: float   # bytes/s
    memory_bytes: float
    kernel_overhead: float    # seconds per kernel launch / barrier
    link: Link
    description: str = ""
    measured: tuple = field(default=())   # ((what, value), ...) from calibrate, for the record
    kernels: tuple = ()       # ((family, a, c, m), ...): t = a + c*FLOPs + m*bytes, fitted on this
                              # machine's generated kernels (`ffc calibrate --artifact`)
    shared: bool = False      # the whole machine, whose ranks are local processes sharing it (calibrated)

    def flops(self, dtype) -> float:
        """Peak FLOP/s for ``dtype`` (any spelling: profiles write fp32/bf16/fp16, and formats such
        as tf32 that are no DType), else fp32's."""
        def key(name):
            try:
                return parse_dtype(name)
            except ValueError:
                return name
        table = {key(k): v for k, v in self.peak_flops}
        return table.get(key(dtype)) or table.get(DType.F32) or next(iter(table.values()))

    def op_time(self, flops: float, nbytes: float, dtype: str = "f32") -> float:
        """Roofline time of one kernel: the slower of compute and memory, plus launch overhead."""
        return max(flops / self.flops(dtype), nbytes / self.memory_bandwidth) + self.kernel_overhead

    def kernel_time(self, family: str, flops: float, nbytes: float, dtype: str = "f32") -> float:
        """A generated kernel of cost ``family`` (plan.kernels.CostFamily, e.g. linear_gemv, or
        its kind, linear): the fitted model when calibrated, else the roofline."""
        fitted = {f: (a, c, m) for f, a, c, m in self.kernels}
        for f in (str(family), str(family).split("_")[0]):
            if f in fitted:
                a, c, m = fitted[f]
                return a + c * flops + m * nbytes
        return self.op_time(flops, nbytes, dtype)

    def collective_time(self, kind: CollectiveKind, nbytes: float, ranks: int) -> float:
        """Seconds for one collective over ``ranks`` devices; ``nbytes`` is the full tensor."""
        if ranks <= 1 or nbytes <= 0:
            return 0.0
        for c, p, a, b in self.link.fitted:
            if c == kind and p == ranks:
                return a + b * nbytes
        algos = dict(self.link.algorithms).get(kind, ("ring",))
        return min(_ALGORITHMS[(kind, a)](self.link.latency, self.link.bandwidth, ranks, nbytes) for a in algos)

    def scaled_link(self, factor: float) -> "DeviceProfile":
        """The same devices with an interconnect ``factor`` times slower (latency and bandwidth)."""
        link = replace(self.link, kind=self.link.kind + f"/{factor:g}", latency=self.link.latency * factor,
                       bandwidth=self.link.bandwidth / factor,
                       fitted=tuple((c, p, a * factor, b * factor) for c, p, a, b in self.link.fitted))
        return replace(self, name=f"{self.name} (link {factor:g}x slower)", link=link)

    def per_rank(self, ranks: int) -> "DeviceProfile":
        """What one of ``ranks`` ranks has: a device of its own, or for a shared (calibrated)
        machine 1/ranks of its compute, memory bandwidth and memory."""
        if ranks <= 1 or not self.shared:
            return self
        return replace(self, name=f"{self.name} (1/{ranks} per rank)",
                       peak_flops=tuple((k, v / ranks) for k, v in self.peak_flops),
                       memory_bandwidth=self.memory_bandwidth / ranks, memory_bytes=self.memory_bytes / ranks,
                       kernels=tuple((f, a, c * ranks, m * ranks) for f, a, c, m in self.kernels), shared=False)

    def with_memory(self, nbytes: float) -> "DeviceProfile":
        return replace(self, memory_bytes=float(nbytes))

    def to_json(self) -> dict:
        return {"name": self.name, "description": self.description, "peak_flops": dict(self.peak_flops),
                "memory_bandwidth": self.memory_bandwidth, "memory_bytes": self.memory_bytes,
                "kernel_overhead": self.kernel_overhead,
                "link": {"kind": self.link.kind, "latency": self.link.latency, "bandwidth": self.link.bandwidth,
                         "fitted": [list(f) for f in self.link.fitted],
                         "algorithms": {c: list(a) for c, a in self.link.algorithms}},
                "measured": dict(self.measured),
                "kernels": {f: [a, c, m] for f, a, c, m in self.kernels}, "shared": self.shared}

    @classmethod
    def from_json(cls, d: dict) -> "DeviceProfile":
        try:
            link = d["link"]
            return cls(name=d["name"], description=d.get("description", ""),
                       peak_flops=tuple(sorted((k, float(v)) for k, v in d["peak_flops"].items())),
                       memory_bandwidth=float(d["memory_bandwidth"]), memory_bytes=float(d["memory_bytes"]),
                       kernel_overhead=float(d["kernel_overhead"]),
                       link=Link(link["kind"], float(link["latency"]), float(link["bandwidth"]),
                                 tuple((str(c), int(p), float(a), float(b)) for c, p, a, b in link.get("fitted", [])),
                                 tuple(sorted((c, tuple(a)) for c, a in link.get("algorithms", {}).items()))),
                       measured=tuple(sorted(d.get("measured", {}).items())),
                       kernels=tuple(sorted((f, float(a), float(c), float(m))
                                            for f, (a, c, m) in d.get("kernels", {}).items())),
                       shared=bool(d.get("shared", False)))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InvalidRequestError(f"device profile {d.get('name', '?')!r} is malformed ({e!r}); "
                                      "see compiler/profiles/*.json for the format") from None


def builtin_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def local_profile_path() -> Path:
    return knobs.cache_dir() / "profiles" / "local.json"


def load_profile(name: Optional[str]) -> DeviceProfile:
    """A profile by name (``h100-nvlink``, ``local`` for the calibrated machine) or JSON path."""
    if name in (None, "local"):
        path = local_profile_path()
        if not path.exists():
            raise InvalidRequestError(f"no calibrated profile at {path}; run `ffc calibrate` first, or pick one "
                                      f"of {', '.join(builtin_profiles())}")
    elif Path(name).suffix == ".json" or "/" in name:
        path = Path(name)
    else:
        path = PROFILE_DIR / f"{name}.json"
        if not path.exists():
            raise InvalidRequestError(f"unknown device profile {name!r}; use one of "
                                      f"{', '.join(builtin_profiles() + ['local'])} or a JSON file")
    try:
        return DeviceProfile.from_json(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidRequestError(f"device profile {path} is unreadable ({e})") from None
